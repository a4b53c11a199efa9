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
        // Both nodes run on this one host: `{name}` keeps their attachments apart, as
        // separate hosts would.
        func state(_ n: String) -> String { scratch + "/\(n)/state" }
        func device(_ n: String) -> String { scratch + "/\(n)/disk" }
        func mnt(_ n: String) -> String { scratch + "/\(n)/mnt" }
        for n in ["a", "b"] { try FileManager.default.createDirectory(atPath: mnt(n), withIntermediateDirectories: true) }
        let attach = """
            [export]
            unix_socket = "\(scratch)/{name}.sock"

            [[resource]]
            name = "disk"
            agent = "hamgr:nbd-attach"
            params = { device = "\(scratch)/{name}/disk", state_dir = "\(scratch)/{name}/state" }
            monitor_interval_ms = 1000
            timeout_ms = 30000

            """
        let h = try ClusterHarness(name: "attach", subnet: 97, size: "128MiB", extraTOML: attach)
        defer {
            h.shutdown()
            Self.undo(scratch: scratch, fuseDirs: [state("a") + "/fuse", state("b") + "/fuse"], mountPoints: [mnt("a"), mnt("b")])
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
        func nbdfuseLog(_ n: String) -> String { (try? String(contentsOfFile: state(n) + "/nbdfuse.log", encoding: .utf8)) ?? "(no nbdfuse log)" }

        // Attached on the master: the device path is a symlink to a loop device on the
        // FUSE file, and the monitor says so in /status.
        XCTAssertTrue(waitUntil(30) { (try? FileManager.default.destinationOfSymbolicLink(atPath: device(master)))?.hasPrefix("/dev/loop") == true },
                      "not attached\n\(h.tail(master))\n\(nbdfuseLog(master))")
        XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: device(backup)), "attached on the master only")
        var attached = Set<String>()  // every loop device an attachment used: none may stay
        if let l = try? FileManager.default.destinationOfSymbolicLink(atPath: device(master)) { attached.insert(l) }
        h.waitFor(master, "disk running", within: 10) { s in ((s["resources"] as? [[String: Any]])?.first?["state"] as? String) == "running" }
        XCTAssertEqual(Self.loops(backingUnder: scratch).count, 1)
        let mkfs = try shell(["mkfs.ext4", "-q", "-F", device(master)], timeout: 120)
        XCTAssertEqual(mkfs.status, 0, mkfs.stderr)

        // The Filesystem resource goes after it (a reload adds it live, on both nodes).
        var toml = try String(contentsOfFile: h.configPath, encoding: .utf8)
        toml += """

            [[resource]]
            name = "fs"
            agent = "ocf:heartbeat:Filesystem"
            params = { device = "\(scratch)/{name}/disk", directory = "\(scratch)/{name}/mnt", fstype = "ext4" }
            monitor_interval_ms = 1000
            timeout_ms = 30000

            """
        try toml.write(toFile: h.configPath, atomically: true, encoding: .utf8)
        for n in [master, backup] { h.signal(n, SIGHUP) }
        XCTAssertTrue(waitUntil(30) { Self.isMountPoint(mnt(master)) }, "Filesystem did not mount\n\(h.tail(master))")
        guard Self.isMountPoint(mnt(master)) else { return }
        let payload = Data((0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        try payload.write(to: URL(fileURLWithPath: mnt(master) + "/hello"))
        XCTAssertEqual(try shell(["sync", "-f", mnt(master) + "/hello"], timeout: 60).status, 0)

        // Switchover: Filesystem unmounts, the attachment goes, the new master attaches and
        // mounts; the file is there.
        let sw = try h.admin(master, "switchover")
        XCTAssertEqual(sw.code, 200, sw.body)
        guard sw.code == 200 else { return }
        XCTAssertNotNil(h.waitForRole(backup, "primary", within: 60))
        XCTAssertTrue(waitUntil(60) {
            ((h.status(backup)?["resources"] as? [[String: Any]])?.compactMap { $0["state"] as? String }) == ["running", "running"]
        }, "resources not running on the new master\n\(h.tail(backup))\n--- old master:\n\(h.tail(master))\n--- nbdfuse:\n\(nbdfuseLog(backup))")
        XCTAssertTrue(Self.isMountPoint(mnt(backup)))
        XCTAssertFalse(Self.isMountPoint(mnt(master)), "unmounted on the old master")
        if let l = try? FileManager.default.destinationOfSymbolicLink(atPath: device(backup)) { attached.insert(l) }
        XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: device(master)), "detached on the old master")
        XCTAssertEqual(try? Data(contentsOf: URL(fileURLWithPath: mnt(backup) + "/hello")), payload, "the file written on the old master")
        XCTAssertEqual(Self.loops(backingUnder: scratch).count, 1, "exactly one attachment (the new master's)")
        XCTAssertTrue(h.tail(master, lines: 2000).contains("resource=disk"), h.tail(master))

        // Stopping the nodes detaches everything: the secondary first, so that the master's
        // SIGTERM has no peer to hand over to and stops its resources itself.
        XCTAssertEqual(h.stop(master, seconds: 60), 0, h.tail(master))
        XCTAssertEqual(h.stop(backup, seconds: 60), 0, h.tail(backup))
        XCTAssertTrue(h.tail(backup, lines: 400).contains("stopping: no peer to hand over to; stopping resources before stepping down"),
                      "the filesystem unmounts while the export still serves\n\(h.tail(backup))")
        XCTAssertFalse(Self.isMountPoint(mnt("a")) || Self.isMountPoint(mnt("b")), "still mounted")
        XCTAssertFalse(Self.isMountPoint(state("a") + "/fuse") || Self.isMountPoint(state("b") + "/fuse"), "FUSE still mounted")
        XCTAssertEqual(Self.loops(backingUnder: scratch), [], "loop devices left")
        for loop in attached.sorted() {
            let back = "/sys/block/\((loop as NSString).lastPathComponent)/loop/backing_file"
            XCTAssertFalse(FileManager.default.fileExists(atPath: back), "\(loop) is still attached (to \((try? String(contentsOfFile: back, encoding: .utf8)) ?? "?"))")
        }
        for n in [master, backup] {
            XCTAssertFalse((try? String(contentsOfFile: h.log(n), encoding: .utf8))?.contains("resource stop failed") ?? true, "a stop failed on \(n)\n\(h.tail(n, lines: 200))")
        }
        XCTAssertEqual(Self.nbdfusePids(under: scratch), [], "nbdfuse left running")
        for n in ["a", "b"] {
            XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: device(n)), "the device symlink is left on \(n)")
        }
    }

    /// Without a Unix socket the attachment dials the node's service address; with
    /// `export.tls = "require"` and `client_ca_file` it upgrades with STARTTLS, verifies the
    /// node's certificate with the cluster CA and presents the node's own certificate.
    func testAttachOverTLSWithAClientCertificate() throws {
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("needs root and /dev/fuse") }
        for tool in ["nbdfuse", "losetup", "fusermount3", "setsid"] {
            guard (try? shell(["which", tool]))?.status == 0 else { throw XCTSkip("\(tool) is not installed") }
        }
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-attach-tls-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        func device(_ n: String) -> String { scratch + "/\(n)/disk" }
        let h = try ClusterHarness(name: "attachtls", subnet: 98, extraTOML: """
            [tls]
            ca_file = "tls/ca.crt"
            cert_file = "tls/{name}.crt"
            key_file = "tls/{name}.key"

            [export]
            tls = "require"
            client_ca_file = "tls/ca.crt"

            [status]
            tls = false

            [[resource]]
            name = "disk"
            agent = "hamgr:nbd-attach"
            params = { device = "\(scratch)/{name}/disk", state_dir = "\(scratch)/{name}/state" }
            monitor_interval_ms = 500

            """)
        defer {
            h.shutdown()
            Self.undo(scratch: scratch, fuseDirs: ["a", "b"].map { scratch + "/\($0)/state/fuse" }, mountPoints: [])
            try? FileManager.default.removeItem(atPath: scratch)
        }
        let certs = try shell([ClusterHarness.hamgr, "certs", "--config", h.configPath])
        XCTAssertEqual(certs.status, 0, certs.stderr)
        let (master, backup) = try h.startedCluster()
        func log(_ n: String) -> String { (try? String(contentsOfFile: scratch + "/\(n)/state/nbdfuse.log", encoding: .utf8)) ?? "" }
        XCTAssertTrue(waitUntil(30) { (try? FileManager.default.destinationOfSymbolicLink(atPath: device(master)))?.hasPrefix("/dev/loop") == true },
                      "not attached over TLS\n\(h.tail(master))\n\(log(master))")
        h.waitFor(master, "disk running", within: 10) { s in ((s["resources"] as? [[String: Any]])?.first?["state"] as? String) == "running" }
        let read = try shell(["dd", "if=\(device(master))", "of=/dev/null", "bs=64k", "count=16", "iflag=direct", "status=none"], timeout: 30)
        XCTAssertEqual(read.status, 0, read.stderr)
        // The export requires TLS and a client certificate: attaching at all proves both; the
        // log shows the upgrade.
        XCTAssertTrue(((try? String(contentsOfFile: h.log(master), encoding: .utf8)) ?? "").contains("event=nbd_starttls"), h.tail(master))
        XCTAssertEqual(h.stop(backup, seconds: 60), 0, h.tail(backup))
        XCTAssertEqual(h.stop(master, seconds: 60), 0, h.tail(master))
        XCTAssertEqual(Self.loops(backingUnder: scratch), [], "loop devices left")
        XCTAssertEqual(Self.nbdfusePids(under: scratch), [], "nbdfuse left running")
        XCTAssertNil(try? FileManager.default.destinationOfSymbolicLink(atPath: device(master)))
    }

    /// Loop devices whose backing file lies under `dir`, or is the attachment's FUSE file on
    /// a lazily detached mount (shown as `/hamgr-CLUSTER-RESOURCE`).
    static func loops(backingUnder dir: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            guard let back = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return nil }
            return back.hasPrefix(dir + "/") || back.hasPrefix("/hamgr-attach-disk") ? "/dev/\(name)" : nil
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
    static func undo(scratch: String, fuseDirs: [String], mountPoints: [String]) {
        for m in mountPoints where isMountPoint(m) { _ = try? shell(["umount", "-l", m], timeout: 30) }
        for l in loops(backingUnder: scratch) { _ = try? shell(["losetup", "-d", l], timeout: 30) }
        // The FUSE mount goes only once no loop device holds its file (a lazy unmount under
        // one would orphan it); the kernel drops a detached loop's file asynchronously.
        _ = waitUntil(10) { loops(backingUnder: scratch).isEmpty }
        for fuseDir in fuseDirs where isMountPoint(fuseDir) {
            if (try? shell(["fusermount3", "-u", fuseDir], timeout: 30))?.status != 0 && loops(backingUnder: scratch).isEmpty {
                _ = try? shell(["fusermount3", "-u", "-z", fuseDir], timeout: 30)
            }
        }
        for pid in nbdfusePids(under: scratch) { kill(pid, SIGKILL) }
    }
}
