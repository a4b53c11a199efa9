import Foundation
import XCTest

/// Issue 5 acceptance 5: a backing store that fails writes (here: a full 16 MiB tmpfs under
/// node a's 64 MiB volume) is reported in /status, /metrics and the log, and the node steps
/// down (master) or goes diskless (backup) instead of acknowledging a write it could not store.
final class DiskFailureProcessTests: XCTestCase {
    func testFullBackingStoreIsReportedAndNeverAcknowledged() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root to mount a small tmpfs") }
        let h = try ClusterHarness(name: "disk", subnet: 45)
        let small = h.dir.appendingPathComponent("a-disk").path
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: true)
        XCTAssertEqual(try shell(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", small]).status, 0)
        defer {
            for n in ["a", "b", "w"] { h.kill9(n) }
            _ = try? shell(["umount", "-l", small])
            h.shutdown()
        }
        try FileManager.default.createSymbolicLink(atPath: h.backing("a"), withDestinationPath: small + "/a.img")
        let (master, backup) = try h.startedCluster()

        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 640, slots: 640, logPath: h.dir.appendingPathComponent("load.log").path)
        try load.start()
        load.wait(seconds: 90)
        let acked = load.acknowledgedWrites().count
        print("node a's store filled up while \(master) was master: \(acked) of 640 writes acknowledged")

        XCTAssertTrue(h.waitFor("a", "a reports its failed disk", within: 20) { s in
            (s["disk_state"] as? String) == "diskless" && (s["disk_error"] as? String) != nil
        })
        print("a /status: disk_state=diskless, disk_error=\(h.status("a")?["disk_error"] as? String ?? "-")")
        let metrics = try shell(["curl", "-sf", "--max-time", "2", "http://\(h.node("a").statusAddress)/metrics"]).stdout
        XCTAssertTrue(metrics.contains("hamgr_disk_state{state=\"diskless\"} 1"), "metrics do not show the failed disk")
        XCTAssertTrue(h.tail("a", lines: 2000).contains("event=disk_failure"), "no disk_failure event in a's log")
        XCTAssertEqual(try shell(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://\(h.node("a").statusAddress)/healthz"]).stdout, "503")
        XCTAssertTrue(FileManager.default.fileExists(atPath: h.dir.appendingPathComponent("a.meta.disk-failed").path),
                      "the failure was not recorded for the next start")

        // b holds every acknowledged write and is (or stays) the master; a never is.
        h.waitForRole("b", "primary", within: 20)
        XCTAssertEqual(h.role("a"), "secondary")
        if master == "b" {
            XCTAssertEqual(acked, 640, "the master stopped although only its backup's disk failed")
        }
        let bad = try verifyPatterns(uri: h.node("b").nbdURI, expected: load.expectedSlots())
        XCTAssertEqual(bad, [], "acknowledged writes missing on b")
        _ = backup
    }
}
