import Foundation
@testable import HAShell
import XCTest

/// `DurableFile.write` is the quorum state's durability (votes, promised epochs): a write whose
/// rename is not made durable (the directory fsync failed) must fail, so the caller never acts
/// on a vote that could vanish at a power loss.
final class DurableFileTests: XCTestCase {
    func testFailedDirectoryFsyncFailsTheWrite() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("durable-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("state").path
        try DurableFile.write(Array("one".utf8), to: path)
        XCTAssertEqual(try DurableFile.read(path), Array("one".utf8))

        let real = DurableFile.syncDirectory
        defer { DurableFile.syncDirectory = real }
        DurableFile.syncDirectory = { _ in errno = EIO; return -1 }
        XCTAssertThrowsError(try DurableFile.write(Array("two".utf8), to: path)) { error in
            XCTAssertTrue("\(error)".contains("fsync directory"), "\(error)")
        }
    }
}
