import Foundation
import XCTest
@testable import Replication

/// A real filesystem on the export: nbdfuse exposes it as a file, a loop device turns that
/// into a block device, ext4 goes on top, files are written and synced, and e2fsck checks
/// the result. Every mount, loop device and FUSE process is undone even on failure.
final class NBDFilesystemTests: XCTestCase {
    func testExt4OverNbdfuseAndLoopIsClean() throws {
        try requireTools("nbdfuse", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "fusermount3")
        guard getuid() == 0, FileManager.default.fileExists(atPath: "/dev/fuse") else {
            throw XCTSkip("needs root and /dev/fuse for FUSE, loop devices and mount")
        }
        let export = try TestExport(size: 128 << 20)
        defer { export.stop() }
        let fuseDir = export.directory + "/fuse", mountDir = export.directory + "/mnt"
        try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: mountDir, withIntermediateDirectories: true)

        let fuse = try ProcessRunner.start("nbdfuse", [fuseDir + "/nbd", export.uri], logDirectory: export.directory)
        var loop: String?
        var mounted = false
        defer {
            if mounted { _ = try? ProcessRunner.run("umount", ["-l", mountDir], timeout: 30) }
            if let l = loop { _ = try? ProcessRunner.run("losetup", ["-d", l], timeout: 30) }
            _ = try? ProcessRunner.run("fusermount3", ["-u", fuseDir], timeout: 30)
            fuse.stop()
        }
        XCTAssertTrue(TestExport.eventually(timeout: 15) {
            ((try? FileManager.default.attributesOfItem(atPath: fuseDir + "/nbd"))?[.size] as? Int) == 128 << 20
        }, "nbdfuse did not expose the export: \(fuse.stderr)")

        let lo = try ProcessRunner.run("losetup", ["--find", "--show", fuseDir + "/nbd"], timeout: 30)
        XCTAssertEqual(lo.exitCode, 0, "\(lo)")
        loop = lo.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let device = try XCTUnwrap(loop)
        XCTAssertTrue(device.hasPrefix("/dev/loop"), device)

        let mkfs = try ProcessRunner.run("mkfs.ext4", ["-q", "-F", device], timeout: 120)
        XCTAssertEqual(mkfs.exitCode, 0, "\(mkfs)")
        let mount = try ProcessRunner.run("mount", [device, mountDir], timeout: 60)
        XCTAssertEqual(mount.exitCode, 0, "\(mount)")
        mounted = mount.exitCode == 0
        guard mounted else { return }

        var expected: [String: Data] = [:]
        for i in 0..<20 {
            var bytes = [UInt8](repeating: 0, count: 64 * 1024 + i * 4099)
            for j in bytes.indices { bytes[j] = UInt8(truncatingIfNeeded: j &* 31 &+ i) }
            let data = Data(bytes)
            expected["f\(i)"] = data
            try data.write(to: URL(fileURLWithPath: "\(mountDir)/f\(i)"))
        }
        XCTAssertEqual(try ProcessRunner.run("sync", ["-f", mountDir], timeout: 60).exitCode, 0)
        for (name, data) in expected {
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: "\(mountDir)/\(name)")), data, name)
        }
        let umount = try ProcessRunner.run("umount", [mountDir], timeout: 60)
        XCTAssertEqual(umount.exitCode, 0, "\(umount)")
        mounted = umount.exitCode != 0

        let fsck = try ProcessRunner.run("e2fsck", ["-fn", device], timeout: 120)
        XCTAssertEqual(fsck.exitCode, 0, "e2fsck found problems: \(fsck)")
        XCTAssertGreaterThan(export.server.statistics.count("flush"), 0, "ext4 and the loop device must have flushed")
        XCTAssertGreaterThan(export.server.statistics.bytesWritten, 20 * 64 * 1024)
    }
}
