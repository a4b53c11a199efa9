import Foundation
import XCTest

/// Issue 2 acceptance 2: a real ext4 filesystem on the master's export (nbdfuse + loop +
/// mkfs + mount + files + sync + umount); then the **backup's** backing store, attached
/// read-only, passes `e2fsck -fn` and holds the files. Every mount, loop device and FUSE
/// process is undone, also on failure.
final class FilesystemReplicationTests: XCTestCase {
    func testExt4WrittenOnTheMasterIsCleanOnTheBackupsDisk() throws {
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/dev/fuse") else { throw XCTSkip("needs root and /dev/fuse") }
        for tool in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"] {
            guard (try? shell(["which", tool]))?.status == 0 else { throw XCTSkip("\(tool) is not installed") }
        }
        let h = try ClusterHarness(name: "fs", subnet: 41, size: "128MiB")
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        let fuseDir = h.dir.appendingPathComponent("fuse").path, mnt = h.dir.appendingPathComponent("mnt").path
        let roMnt = h.dir.appendingPathComponent("ro").path
        for d in [fuseDir, mnt, roMnt] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }

        let fuse = Process()
        fuse.executableURL = URL(fileURLWithPath: "/usr/bin/nbdfuse")
        fuse.arguments = [fuseDir + "/nbd", h.node(master).nbdURI]
        fuse.standardOutput = FileHandle.nullDevice
        fuse.standardError = FileHandle.nullDevice
        try fuse.run()
        var loops: [String] = []
        var mounts: [String] = []
        defer {
            for m in mounts.reversed() { _ = try? shell(["umount", "-l", m], timeout: 30) }
            for l in loops { _ = try? shell(["losetup", "-d", l], timeout: 30) }
            _ = try? shell(["fusermount3", "-u", fuseDir], timeout: 30)
            if fuse.isRunning { fuse.terminate() }
            fuse.waitUntilExit()
        }
        XCTAssertTrue(waitUntil(15) { ((try? FileManager.default.attributesOfItem(atPath: fuseDir + "/nbd"))?[.size] as? Int) == 128 << 20 })
        let lo = try shell(["losetup", "--find", "--show", fuseDir + "/nbd"], timeout: 30)
        XCTAssertEqual(lo.status, 0, lo.stderr)
        let dev = lo.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        loops.append(dev)
        XCTAssertEqual(try shell(["mkfs.ext4", "-q", "-F", dev], timeout: 120).status, 0)
        XCTAssertEqual(try shell(["mount", dev, mnt], timeout: 60).status, 0)
        mounts.append(mnt)
        var expected: [String: Data] = [:]
        for i in 0..<20 {
            let data = Data((0..<(48 * 1024 + i * 4099)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) })
            expected["f\(i)"] = data
            try data.write(to: URL(fileURLWithPath: "\(mnt)/f\(i)"))
        }
        XCTAssertEqual(try shell(["sync", "-f", mnt], timeout: 60).status, 0)
        XCTAssertEqual(try shell(["umount", mnt], timeout: 60).status, 0)
        mounts.removeAll()
        XCTAssertEqual(try shell(["losetup", "-d", dev], timeout: 30).status, 0)
        loops.removeAll()

        // The backup's own disk, read-only: a clean filesystem holding the same files.
        let rlo = try shell(["losetup", "-r", "--find", "--show", h.backing(backup)], timeout: 30)
        XCTAssertEqual(rlo.status, 0, rlo.stderr)
        let rdev = rlo.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        loops.append(rdev)
        let fsck = try shell(["e2fsck", "-fn", rdev], timeout: 120)
        XCTAssertEqual(fsck.status, 0, "e2fsck on the backup's store: \(fsck.stdout) \(fsck.stderr)")
        XCTAssertEqual(try shell(["mount", "-o", "ro,noload", rdev, roMnt], timeout: 60).status, 0)
        mounts.append(roMnt)
        for (name, data) in expected {
            XCTAssertEqual(try? Data(contentsOf: URL(fileURLWithPath: "\(roMnt)/\(name)")), data, "\(name) differs on the backup")
        }
    }
}
