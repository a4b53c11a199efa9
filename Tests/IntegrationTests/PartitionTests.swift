import Foundation
import XCTest

/// Cuts one link between real processes on loopback with an nftables rule on the output
/// hook (root only). The A–B link is identified by the nodes' replication port, which no
/// other traffic uses, so the arbitrator links stay up.
final class LinkCut {
    let table: String
    init(name: String) { table = "hamgr_test_\(name)_\(getpid())" }

    func cut(ips: [String], port: Int) throws {
        let set = ips.joined(separator: ", ")
        let script = """
        table inet \(table) {
          chain out_filter {
            type filter hook output priority 0; policy accept;
            ip daddr { \(set) } tcp dport \(port) drop
            ip saddr { \(set) } tcp sport \(port) drop
          }
        }
        """
        let r = try shell(["nft", "-f", "-"], timeout: 10, stdin: script)
        guard r.status == 0 else { throw XCTSkip("nft unavailable: \(r.stderr)") }
    }

    func heal() { _ = try? shell(["nft", "delete", "table", "inet", table], timeout: 10) }
}

final class PartitionTests: XCTestCase {
    /// Issue 3, 5b: cut the A–B link only — the master outdates B at the arbitrator and goes
    /// on; B is not promoted; after healing B resyncs and is in sync again.
    func testCutReplicationLinkOutdatesBackupAndResyncsOnHeal() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root for nftables") }
        let h = try ClusterHarness(name: "cut", subnet: 36)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        let link = LinkCut(name: "ab")
        defer { link.heal() }
        try link.cut(ips: h.nodes.map(\.ip), port: h.nodes[0].replicationPort)
        let t0 = Date()
        guard let acked = firstAcknowledgedWrite(uri: h.node(master).nbdURI, within: 15) else {
            return XCTFail("master stopped acknowledging after the A–B cut\n\(h.tail(master))")
        }
        print("A–B cut: master acknowledged again after \(String(format: "%.2f", acked.timeIntervalSince(t0))) s (outdate at the arbitrator)")
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 100, slots: 300, logPath: h.dir.appendingPathComponent("load.log").path)
        try load.start()
        load.wait(seconds: 60)
        XCTAssertEqual(load.acknowledgedOffsets().count, 100)
        sleep(2)
        XCTAssertEqual(h.role(backup), "secondary", "B was promoted while the master held the arbitrator")
        XCTAssertEqual(h.role(master), "primary")
        link.heal()
        h.waitFor(master, "backup resynced after heal", within: 60) {
            (($0["peer"] as? [String: Any])?["replication"] as? String) == "inSync"
        }
        h.waitFor(backup, "backup upToDate", within: 10) { ($0["disk_state"] as? String) == "upToDate" }
        // The backup's copy now holds what was written during the cut.
        h.stop(master)
        h.stop(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup),
                       "stores differ after the resync")
    }
}
