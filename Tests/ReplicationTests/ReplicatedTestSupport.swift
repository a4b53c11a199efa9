import Foundation
import XCTest

/// A temporary directory removed when the test ends.
func makeTempDir(_ test: XCTestCase, _ name: String = #function) throws -> String {
    let dir = NSTemporaryDirectory() + "hamgr-repl-\(name.filter { $0.isLetter || $0.isNumber })-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}
