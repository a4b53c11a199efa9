import Foundation
import XCTest

/// Issue 8, arbitrator continuity: a lost arbitrator state must not elect an outdated backup.
final class ArbitratorContinuityProcessTests: XCTestCase {
    func testArbitratorRefusesAMissingStateWithoutInit() throws {
        let h = try ClusterHarness(name: "noinit", subnet: 79)
        defer { h.shutdown() }
        let r = try shell([ClusterHarness.hamgr, "arbitrator", "--config", h.configPath], timeout: 20)
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("cluster noinit") && r.stderr.contains("--init") && r.stderr.contains("noinit.state"), r.stderr)
    }

    /// The master writes alone (the backup is outdated at the arbitrator), the arbitrator's
    /// state is wiped and re-created with `--init`, the master dies: the backup is not promoted
    /// and says why. As the operator guide says, the old master comes back, the two nodes elect
    /// it between themselves, the backup resyncs; then both accept the new arbitrator state, and
    /// the arbitrator's vote counts again (the master keeps its lease with the backup gone).
    func testWipedArbitratorStateNeverElectsTheOutdatedBackup() throws {
        let h = try ClusterHarness(name: "arbwipe", subnet: 80)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        for n in [master, backup] {
            XCTAssertTrue(h.tail(n, lines: 400).contains("event=arbitratorAdopted"), "\(n) did not learn the arbitrator's incarnation\n\(h.tail(n))")
        }
        h.kill9(backup)
        // A write after the backup left makes the master outdate it at the arbitrator.
        XCTAssertNotNil(firstAcknowledgedWrite(uri: h.node(master).nbdURI, within: 10))
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 50, slots: 50, logPath: h.dir.appendingPathComponent("w.log").path)
        try load.start(); load.wait(seconds: 30)
        XCTAssertEqual(load.acknowledgedOffsets().count, 50)
        // The arbitrator's host is rebuilt: its state is gone and it starts fresh.
        h.kill9("w")
        try FileManager.default.removeItem(at: h.dir.appendingPathComponent("arbitrator"))
        try h.startArbitrator(initialize: true)
        try h.startNode(backup)
        h.kill9(master)
        // Several leases later the backup is still not master, and says why.
        let end = Date().addingTimeInterval(6)
        while Date() < end {
            XCTAssertNotEqual(h.role(backup), "primary", "an arbitrator with a lost state elected the outdated backup")
            usleep(200_000)
        }
        let s = h.status(backup)
        let refused = (s?["arbitrator"] as? [String: Any])?["refused"] as? String ?? ""
        XCTAssertTrue(refused.contains("arbitrator-accept"), "\(String(describing: s))")
        XCTAssertTrue(((s?["why_not_promoted"] as? String) ?? "").contains("arbitrator"), "\(String(describing: s))")
        XCTAssertTrue(h.tail(backup, lines: 400).contains("event=arbitratorIncarnationMismatch"))
        let st = try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(backup).statusAddress)", "status", "--no-peer"])
        XCTAssertTrue(st.stdout.contains("ARBITRATOR NOT COUNTED"), st.stdout)
        // Without --yes and without a terminal, accepting is refused.
        let noYes = try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(backup).statusAddress)", "--token-file", h.tokenPath, "arbitrator-accept"])
        XCTAssertNotEqual(noYes.status, 0)

        // The procedure: bring back the node with the newest data; the two elect it.
        try h.startNode(master)
        h.waitForRole(master, "primary", within: 30)
        h.waitFor(master, "backup resynced", within: 60) { (($0["peer"] as? [String: Any])?["replication"] as? String) == "inSync" }
        XCTAssertEqual(try verifyPatterns(uri: h.node(master).nbdURI, expected: load.expectedSlots()), [])
        // Then accept the new arbitrator state on both.
        for n in [master, backup] {
            let r = try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(n).statusAddress)", "--token-file", h.tokenPath,
                               "arbitrator-accept", "--yes"])
            XCTAssertEqual(r.status, 0, "\(n): \(r.stdout) \(r.stderr)")
            XCTAssertTrue(h.waitFor(n, "arbitrator counted again", within: 10) { (($0["arbitrator"] as? [String: Any])?["refused"]) is NSNull })
        }
        // The arbitrator's grant counts again: the master keeps writing with its backup gone.
        h.kill9(backup)
        usleep(3_000_000)
        XCTAssertEqual(h.role(master), "primary")
        XCTAssertNotNil(firstAcknowledgedWrite(uri: h.node(master).nbdURI, within: 10), "the master lost quorum: the accepted arbitrator is not counted\n\(h.tail(master))")
    }
}
