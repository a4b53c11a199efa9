import Foundation
import XCTest

/// Issue 2 acceptance 4 and 5 with real processes and SIGKILL: resync after a backup crash
/// sends only the dirty chunks; after a master crash the activity-log extents are resynced.
final class ResyncProcessTests: XCTestCase {
    private func metric(_ h: ClusterHarness, _ node: String, _ name: String) -> Double? {
        guard let r = try? shell(["curl", "-sf", "--max-time", "2", "http://\(h.node(node).statusAddress)/metrics"]) else { return nil }
        return r.stdout.split(separator: "\n").first { $0.hasPrefix(name + " ") || $0.hasPrefix(name + "{") }
            .flatMap { Double($0.split(separator: " ").last ?? "") }
    }

    private func replication(_ s: [String: Any]) -> String? { (s["peer"] as? [String: Any])?["replication"] as? String }

    func testBackupKilledMidWorkloadResyncsOnlyDirtyChunks() throws {
        let h = try ClusterHarness(name: "bkill", subnet: 39)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 600, slots: 300, logPath: h.dir.appendingPathComponent("load.log").path)
        try load.start()
        XCTAssertTrue(waitUntil(20) { load.acknowledgedOffsets().count >= 100 })
        h.kill9(backup)
        load.wait(seconds: 60)
        XCTAssertEqual(load.acknowledgedOffsets().count, 600, "the master did not go on without its backup\n\(h.tail(master))")
        let dirty = (h.status(master)?["out_of_sync_bytes"] as? Int) ?? 0
        XCTAssertGreaterThan(dirty, 0, "no chunk marked out of sync while the backup was down")
        let sentBefore = metric(h, master, "hamgr_resync_sent_bytes_total") ?? 0

        try h.startNode(backup)
        h.waitFor(master, "backup resynced", within: 60) { self.replication($0) == "inSync" }
        let sent = (metric(h, master, "hamgr_resync_sent_bytes_total") ?? 0) - sentBefore
        print("backup crash: \(dirty) bytes out of sync (\(dirty / 65536) chunks × 64 KiB); resync sent \(Int(sent)) bytes of chunk data")
        XCTAssertGreaterThan(sent, 0)
        XCTAssertLessThanOrEqual(Int(sent), dirty, "resync sent more than the dirty chunks")
        XCTAssertTrue(h.tail(master, lines: 400).contains("resync source: \(dirty / 65536) chunks (\(dirty) bytes)"),
                      "no resync log line naming the dirty chunks")

        let bad = try verifyPatterns(uri: h.node(master).nbdURI, expected: load.expectedSlots())
        XCTAssertEqual(bad, [])
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "stores differ after the resync")
    }

    func testMasterKilledMidWorkloadRejoinsAsTargetAndResyncsItsActivityLog() throws {
        let h = try ClusterHarness(name: "mkill", subnet: 40)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        var first = PatternWorkload(uri: h.node(master).nbdURI, count: 2000, slots: 600, logPath: h.dir.appendingPathComponent("load1.log").path)
        try first.start()
        XCTAssertTrue(waitUntil(20) { first.acknowledgedOffsets().count >= 100 })
        h.kill9(master)
        first.wait(seconds: 10)
        h.waitForRole(backup, "primary", within: 15)

        var second = PatternWorkload(uri: h.node(backup).nbdURI, first: 5000, count: 200, slots: 600,
                                     logPath: h.dir.appendingPathComponent("load2.log").path)
        try second.start()
        second.wait(seconds: 60)
        XCTAssertEqual(second.acknowledgedOffsets().count, 200)
        var expected = first.expectedSlots()
        expected.merge(second.expectedSlots()) { _, new in new }

        try h.startNode(master)
        h.waitFor(backup, "old master resynced as target", within: 60) { self.replication($0) == "inSync" }
        h.waitForRole(master, "secondary", within: 5)
        let targetLog = h.tail(master, lines: 400)
        XCTAssertTrue(targetLog.contains("resync target"), "the old master did not become resync target:\n\(targetLog)")
        let sourceLine = h.tail(backup, lines: 400).split(separator: "\n").last { $0.contains("resync source:") } ?? ""
        print("master crash: \(sourceLine)")
        let bad = try verifyPatterns(uri: h.node(backup).nbdURI, expected: expected)
        XCTAssertEqual(bad, [], "acknowledged writes missing after the master crash")
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "stores differ after the AL resync")
    }
}
