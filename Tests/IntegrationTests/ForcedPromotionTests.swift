import Foundation
import XCTest

/// Issue 3 acceptance 7: an outdated node can be promoted only with --force; the forced
/// promotion starts a new data generation, so when the old master returns the reconnect
/// reports divergence (split brain) and leaves both stores untouched.
final class ForcedPromotionTests: XCTestCase {
    func testForcedPromotionOfOutdatedNodeIsDetectedAsDivergenceLater() throws {
        let h = try ClusterHarness(name: "force", subnet: 42)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        h.kill9(backup)
        // Writes after the backup left: the master outdates it and branches.
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 50, slots: 100, logPath: h.dir.appendingPathComponent("l1.log").path)
        try load.start(); load.wait(seconds: 30)
        XCTAssertEqual(load.acknowledgedOffsets().count, 50)
        h.kill9(master)
        try h.startNode(backup)
        sleep(3)
        XCTAssertEqual(h.role(backup), "secondary", "an outdated node was promoted automatically")

        let hactl = { (args: [String]) in
            try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(backup).statusAddress)", "--token-file", h.tokenPath] + args, timeout: 60)
        }
        let plain = try hactl(["promote"])
        XCTAssertNotEqual(plain.status, 0, "promote without --force must be refused: \(plain.stdout)")
        XCTAssertEqual(h.role(backup), "secondary")
        print("promote without --force: \(plain.stdout)\(plain.stderr)".trimmingCharacters(in: .whitespacesAndNewlines))

        let genBefore = h.status(backup)?["generation"] as? String
        let forced = try hactl(["promote", "--force", "--yes"])
        XCTAssertEqual(forced.status, 0, "forced promotion failed: \(forced.stdout) \(forced.stderr)\n\(h.tail(backup))")
        h.waitForRole(backup, "primary", within: 15)
        let genAfter = h.status(backup)?["generation"] as? String
        XCTAssertNotEqual(genBefore, genAfter, "forced promotion must start a new data generation")
        var load2 = PatternWorkload(uri: h.node(backup).nbdURI, first: 1000, count: 20, slots: 100, logPath: h.dir.appendingPathComponent("l2.log").path)
        try load2.start(); load2.wait(seconds: 30)
        XCTAssertEqual(load2.acknowledgedOffsets().count, 20)

        let masterStore = try h.volumeDigest(master)
        let backupStore = try h.volumeDigest(backup)
        try h.startNode(master)
        let detected = waitUntil(20) {
            (h.status(backup)?["split_brain"] as? String) != nil || (h.status(master)?["split_brain"] as? String) != nil
        }
        XCTAssertTrue(detected, "the reconnect did not report divergence\n\(h.tail(master))\n\(h.tail(backup))")
        print("split brain reported: \(h.status(backup)?["split_brain"] as? String ?? h.status(master)?["split_brain"] as? String ?? "-")")
        sleep(2)
        XCTAssertEqual(try h.volumeDigest(master), masterStore, "the returning master's store was changed")
        XCTAssertEqual(try h.volumeDigest(backup), backupStore, "the forced master's store was changed by the reconnect")
        XCTAssertEqual(h.role(master), "secondary")
    }
}
