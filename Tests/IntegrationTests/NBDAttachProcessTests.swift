import Foundation
import XCTest

/// Issue 12 acceptance 5: the operator guide's Filesystem example works as written. The
/// built-in `hamgr:nbd-attach` resource attaches the master's own export (here over its Unix
/// socket; this host has no kernel nbd module, so nbdfuse + losetup) at a stable path; the
/// real `ocf:heartbeat:Filesystem` agent after it mounts that path. A file written on one
/// master is read on the next after a switchover, and stopping the cluster leaves no loop
/// device, FUSE mount, mount or nbdfuse process behind. Everything is undone also on failure.
final class NBDAttachProcessTests: XCTestCase {
    func testFilesystemOnTheAttachedExportFollowsTheMasterAndDetachesCleanly() throws {
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("needs root and /dev/fuse") }
        for tool in ["nbdfuse", "losetup", "mkfs.ext4", "fusermount3", "setsid"] {
            guard (try? shell(["which", tool]))?.status == 0 else { throw XCTSkip("\(tool) is not installed") }
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/lib/ocf/resource.d/heartbeat/Filesystem") else {
            throw XCTSkip("resource-agents is not installed")
        }
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-attach-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let state = scratch + "/state", device = scratch + "/dev/disk", mnt = scratch + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let attach = """
            [export]
            unix_socket = "\(scratch)/{name}.sock"

            [[resource]]
            name = "disk"
            agent = "hamgr:nbd-attach"
            params = { device = "\(device)", state_dir = "\(state)" }
            monitor_interval_ms = 1000
            timeout_ms = 30000

            """
        let h = try ClusterHarness(name: "attach", subnet: 97, size: "128MiB", extraTOML: attach)
        defer {
            h.shutdown()
            Self.undo(scratch: scratch, fuseDir: state + "/fuse", mountPoint: mnt)
            try? FileManager.default.removeItem(atPath: scratch)
        }
        // The Filesystem agent insists on modprobe (kmod), which this test host may lack;
        // ext4 is in /proc/filesystems, so the agent never calls it.
        var env: [String: String] = [:]
        if (try? shell(["which", "modprobe"]))?.status != 0 {
            let bin = scratch + "/bin"
            try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
            try "#!/bin/sh\necho \"modprobe: no kmod on this test host\" >&2\nexit 1\n".write(toFile: bin + "/modprobe", atomically: true, encoding: .utf8)
            chmod(bin + "/modprobe", 0o755)
            env["PATH"] = bin + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin")
        }
        try h.startArbitrator()
        for n in ["a", "b"] { try h.startNode(n, env: env) }
        let (master, backup) = try h.startedCluster(startProcesses: false)
        func nbdfuseLog() -> String { (try? String(contentsOfFile: state + "/nbdfuse.log", encoding: .utf8)) ?? "(no nbdfuse log)" }

        // Attached on the master: the device path is a symlink to a loop device on the
        // FUSE file, and the monitor says so in /status.
        XCTAssertTrue(waitUntil(30) { (try? FileManager.default.destinationOfSymbolicLink(atPath: device))?.hasPrefix("/dev/loop") == true },
                      "not attached\n\(h.tail(master))")
        var attached = Set<String>()  // every loop device an attachment used: none may stay
        if let l = try? FileManager.default.destinationOfSymbolicLink(atPath: device) { attached.insert(l) }
        h.waitFor(master, "disk running", within: 10) { s in ((s["resources"] as? [[String: Any]])?.first?["state"] as? String) == "running" }
        XCTAssertEqual(Self.loops(backingUnder: scratch).count, 1)
        let mkfs = try shell(["mkfs.ext4", "-q", "-F", device], timeout: 120)
        XCTAssertEqual(mkfs.status, 0, mkfs.stderr)

        // The Filesystem resource goes after it (a reload adds it live, on both nodes).
        var toml = try String(contentsOfFile: h.configPath, encoding: .utf8)
        toml += """

            [[resource]]
            name = "fs"
            agent = "ocf:heartbeat:Filesystem"
            params = { device = "\(device)", directory = "\(mnt)", fstype = "ext4" }
            monitor_interval_ms = 1000
            timeout_ms = 30000

            """
        try toml.write(toFile: h.configPath, atomically: true, encoding: .utf8)
        for n in [master, backup] { h.signal(n, SIGHUP) }
        XCTAssertTrue(waitUntil(30) { Self.isMountPoint(mnt) }, "Filesystem did not mount\n\(h.tail(master))")
        guard Self.isMountPoint(mnt) else { return }
        let payload = Data((0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        try payload.write(to: URL(fileURLWithPath: mnt + "/hello"))
        XCTAssertEqual(try shell(["sync", "-f", mnt + "/hello"], timeout: 60).status, 0)

        // Switchover: Filesystem unmounts, the attachment goes, the new master attaches and
        // mounts; the file is there.
        let sw = try h.admin(master, "switchover")
        XCTAssertEqual(sw.code, 200, sw.body)
        guard sw.code == 200 else { return }
        XCTAssertNotNil(h.waitForRole(backup, "primary", within: 60))
        XCTAssertTrue(waitUntil(60) {
            ((h.status(backup)?["resources"] as? [[String: Any]])?.compactMap { $0["state"] as? String }) == ["running", "running"]
        }, "resources not running on the new master\n\(h.tail(backup))\n--- old master:\n\(h.tail(master))\n--- nbdfuse:\n\(nbdfuseLog())")
        XCTAssertTrue(Self.isMountPoint(mnt))
        if let l = try? FileManager.default.destinationOfSymbolicLink(atPath: device) { attached.insert(l) }
        XCTAssertEqual(try? Data(contentsOf: URL(fileURLWithPath: mnt + "/hello")), payload, "the file written on the old master")
        XCTAssertEqual(Self.loops(backingUnder: scratch).count, 1, "exactly one attachment (the new master's)")
        XCTAssertTrue(h.tail(master, lines: 2000).contains("resource=disk"), h.tail(master))

        // Stopping the nodes detaches everything.
        XCTAssertEqual(h.stop(backup, seconds: 60), 0, h.tail(backup))
        XCTAssertEqual(h.stop(master, seconds: 60), 0, h.tail(master))
        XCTAssertFalse(Self.isMountPoint(mnt), "still mounted")
        XCTAssertFalse(Self.isMountPoint(state + "/fuse"), "FUSE still mounted")
        XCTAssertEqual(Self.loops(backingUnder: scratch), [], "loop devices left")
        for loop in attached.sorted() {
            let back = "/sys/block/\((loop as NSString).lastPathComponent)/loop/backing_file"
            XCTAssertFalse(FileManager.default.fileExists(atPath: back), "\(loop) is still attached (to \((try? String(contentsOfFile: back, encoding: .utf8)) ?? "?"))")
        }
        for n in [master, backup] {
            XCTAssertFalse((try? String(contentsOfFile: h.log(n), encoding: .utf8))?.contains("resource stop failed") ?? true, "a stop failed on \(n)\n\(h.tail(n, lines: 200))")
        }
        XCTAssertEqual(Self.nbdfusePids(under: scratch), [], "nbdfuse left running")
        XCTAssertFalse(FileManager.default.fileExists(atPath: device) || (try? FileManager.default.destinationOfSymbolicLink(atPath: device)) != nil,
                       "the device symlink is left")
    }

    /// Loop devices whose backing file lies under `dir`.
    static func loops(backingUnder dir: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            guard let back = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return nil }
            return back.hasPrefix(dir + "/") ? "/dev/\(name)" : nil
        }
    }

    static func isMountPoint(_ dir: String) -> Bool {
        let text = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").contains { $0.split(separator: " ").count > 4 && $0.split(separator: " ")[4] == dir }
    }

    /// nbdfuse processes whose command line names a path under `dir`.
    static func nbdfusePids(under dir: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap(Int32.init).filter { pid in
            guard (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?.hasPrefix("nbdfuse") == true,
                  let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: cmd.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(dir)
        }
    }

    /// Whatever a failed run left: mounts, loop devices, the FUSE mount, nbdfuse.
    static func undo(scratch: String, fuseDir: String, mountPoint: String) {
        if isMountPoint(mountPoint) { _ = try? shell(["umount", "-l", mountPoint], timeout: 30) }
        for l in loops(backingUnder: scratch) { _ = try? shell(["losetup", "-d", l], timeout: 30) }
        // The FUSE mount goes only once no loop device holds its file (a lazy unmount under
        // one would orphan it); the kernel drops a detached loop's file asynchronously.
        _ = waitUntil(10) { loops(backingUnder: scratch).isEmpty }
        if isMountPoint(fuseDir) && (try? shell(["fusermount3", "-u", fuseDir], timeout: 30))?.status != 0 && loops(backingUnder: scratch).isEmpty {
            _ = try? shell(["fusermount3", "-u", "-z", fuseDir], timeout: 30)
        }
        for pid in nbdfusePids(under: scratch) { kill(pid, SIGKILL) }
    }
}
