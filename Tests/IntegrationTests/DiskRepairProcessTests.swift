import Foundation
import XCTest

/// After a disk failure a node's store may lack writes the failure dropped from the page
/// cache. Such a node (its `.disk-failed` marker present) must not be trusted, nor promoted,
/// until a full online verify against the peer passes; mismatches are resynced.
final class DiskRepairProcessTests: XCTestCase {
    func testNodeWithFailedStoreVerifiesAndRepairsBeforeItIsTrusted() throws {
        let h = try ClusterHarness(name: "repair", subnet: 46)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 200, slots: 200, logPath: h.dir.appendingPathComponent("l.log").path)
        try load.start(); load.wait(seconds: 60)
        XCTAssertEqual(load.acknowledgedOffsets().count, 200)
        h.kill9(backup)
        // What a failed disk leaves behind: two chunks that lost their last writes, and the marker.
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: h.backing(backup)))
        for chunk in [3, 77] { fh.seek(toFileOffset: UInt64(chunk * 65536)); fh.write(Data(repeating: 0, count: 65536)) }
        try fh.close()
        try "pwrite: Input/output error\n".write(toFile: h.dir.appendingPathComponent("\(backup).meta.disk-failed").path, atomically: true, encoding: .utf8)

        try h.startNode(backup)
        XCTAssertTrue(waitUntil(10) { (h.status(backup)?["disk_state"] as? String) == "outdated" || h.tail(backup).contains("diskRepair") },
                      "the node trusted its failed store")
        h.waitFor(backup, "repaired and upToDate", within: 60) { ($0["disk_state"] as? String) == "upToDate" }
        let log = h.tail(backup, lines: 500)
        XCTAssertTrue(log.contains("event=diskRepairResync"), "no mismatch was resynced:\n\(log)")
        XCTAssertTrue(log.contains("event=diskRepaired"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: h.dir.appendingPathComponent("\(backup).meta.disk-failed").path))
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "stores differ after the repair")
    }
}
