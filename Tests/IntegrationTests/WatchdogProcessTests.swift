import Foundation
import XCTest

/// Issue 8: a failed disk must not crash-loop the node. The master's store starts returning
/// EIO (ext4's shutdown ioctl on the file system holding it, as the test bed's `disk-eio`);
/// the node steps down, stays up and keeps pinging the systemd watchdog, because the pings
/// prove that its loops answer, not that it is healthy. Health goes to /healthz and metrics.
final class WatchdogProcessTests: XCTestCase {
    func testDiskEIOOnTheMasterStepsDownButTheWatchdogKeepsBeingFed() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root to mount a loop file system") }
        let h = try ClusterHarness(name: "wdog", subnet: 78)
        let mnt = h.dir.appendingPathComponent("a-disk").path
        let img = h.dir.appendingPathComponent("a-disk.ext4").path
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        XCTAssertEqual(try shell(["truncate", "-s", "128M", img]).status, 0)
        XCTAssertEqual(try shell(["mkfs.ext4", "-q", "-F", img], timeout: 60).status, 0)
        XCTAssertEqual(try shell(["mount", "-o", "loop", img, mnt]).status, 0)
        // A datagram socket standing in for systemd's NOTIFY_SOCKET: every message, timestamped.
        let sock = h.dir.appendingPathComponent("notify.sock").path
        let notes = h.dir.appendingPathComponent("notify.log").path
        let script = h.dir.appendingPathComponent("notify-listener.py").path
        try """
            import socket, sys, time
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(sys.argv[1])
            s.settimeout(1)
            end = time.time() + 180
            with open(sys.argv[2], "a", buffering=1) as f:
                while time.time() < end:
                    try:
                        m = s.recv(4096).decode()
                    except socket.timeout:
                        continue
                    for line in m.split("\\n"):
                        f.write("%.3f %s\\n" % (time.time(), line))
            """.write(toFile: script, atomically: true, encoding: .utf8)
        try h.spawn("notify", ["/usr/bin/python3", script, sock, notes])  // killed by shutdown()
        XCTAssertTrue(waitUntil(5) { FileManager.default.fileExists(atPath: sock) }, "the notify listener did not start")
        defer {
            for n in ["a", "b", "w"] { h.kill9(n) }
            _ = try? shell(["umount", "-l", mnt])
            h.shutdown()
        }
        try FileManager.default.createSymbolicLink(atPath: h.backing("a"), withDestinationPath: mnt + "/a.img")
        try h.startArbitrator()
        try h.startNode("a", env: ["NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "1000000"])
        try h.startNode("b")
        var (master, _) = try h.startedCluster(startProcesses: false)
        if master != "a" {
            XCTAssertEqual(try h.admin(master, "switchover").code, 200)
            h.waitForRole("a", "primary", within: 20)
            master = "a"
        }
        func pings(after t: Double) -> Int {
            ((try? String(contentsOfFile: notes, encoding: .utf8)) ?? "").split(separator: "\n")
                .filter { $0.hasSuffix("WATCHDOG=1") && (Double($0.split(separator: " ")[0]) ?? 0) > t }.count
        }
        XCTAssertTrue(waitUntil(5) { pings(after: 0) >= 2 }, "no watchdog pings from a healthy node")
        XCTAssertTrue(((try? String(contentsOfFile: notes, encoding: .utf8)) ?? "").contains("READY=1"))

        // Writes on the master, then every read and write on its store fails with EIO.
        var load = PatternWorkload(uri: h.node("a").nbdURI, count: 400, slots: 400, logPath: h.dir.appendingPathComponent("w.log").path)
        try load.start()
        usleep(300_000)
        let shutdown = try shell(["python3", "-c", "import fcntl,os,struct,sys; fd=os.open(sys.argv[1], os.O_RDONLY); fcntl.ioctl(fd, 0x8004587D, struct.pack('I', 2))", mnt])
        XCTAssertEqual(shutdown.status, 0, shutdown.stderr)
        let failedAt = Date().timeIntervalSince1970
        load.wait(seconds: 60)

        XCTAssertTrue(h.waitFor("a", "diskless after the EIO", within: 20) { ($0["disk_state"] as? String) == "diskless" })
        h.waitForRole("b", "primary", within: 20)
        XCTAssertEqual(h.role("a"), "secondary", "a master with a failed store must step down")
        // Five watchdog intervals later the process still runs and has kept pinging (every 0.5 s).
        usleep(5_000_000)
        XCTAssertTrue(h.processes["a"]?.isRunning ?? false, "the node exited after its disk failed\n\(h.tail("a"))")
        let after = pings(after: failedAt + 0.5)
        XCTAssertGreaterThanOrEqual(after, 8, "watchdog pings stopped after the disk failed (\(after) in ≈ 5 s)")
        // Health is reported where monitoring looks for it.
        XCTAssertEqual(try shell(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://\(h.node("a").statusAddress)/healthz"]).stdout, "503")
        let metrics = try shell(["curl", "-sf", "--max-time", "2", "http://\(h.node("a").statusAddress)/metrics"]).stdout
        XCTAssertTrue(metrics.contains("hamgr_healthy 0"), metrics)
        XCTAssertTrue(metrics.contains("hamgr_watchdog_misses_total 0"), "the loops kept answering")
        // Every acknowledged write is on the new master.
        let bad = try verifyPatterns(uri: h.node("b").nbdURI, expected: load.expectedSlots())
        XCTAssertEqual(bad, [], "acknowledged writes missing on b")
    }
}
