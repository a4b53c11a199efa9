import Foundation
import XCTest

/// Issue 13, a power cut at process level: both daemons run with
/// `HAMGR_TEST_VOLATILE_CACHE=1` (debug builds only), so their stores keep every unsynced
/// write in process memory and SIGKILL loses it, as a host's power loss loses a disk's
/// volatile cache. The backup is cut after acknowledged, unflushed protocol C writes; the
/// master goes on alone, the backup returns and is resynced, and after a flush through the
/// master both stores are byte-identical and hold every acknowledged write.
final class PowerCutProcessTests: XCTestCase {
    private func replication(_ s: [String: Any]) -> String? { (s["peer"] as? [String: Any])?["replication"] as? String }

    /// FLUSH through a real client (libnbd): the master syncs, and so does its backup.
    private func flush(_ uri: String) throws {
        // Debian's interpreter: the libnbd binding is its package (python3-libnbd).
        let r = try shell(["/usr/bin/python3", "-c", "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()", uri])
        XCTAssertEqual(r.status, 0, "flush failed: \(r.stderr)")
    }

    func testBackupPowerCutAfterUnflushedWrites() throws {
        let h = try ClusterHarness(name: "pcut", subnet: 48)
        defer { h.shutdown() }
        let volatile = ["HAMGR_TEST_VOLATILE_CACHE": "1"]
        try h.startArbitrator()
        try h.startNode("a", env: volatile)
        try h.startNode("b", env: volatile)
        let (master, backup) = try h.startedCluster(startProcesses: false)
        XCTAssertTrue(h.tail(backup, lines: 400).contains("HAMGR_TEST_VOLATILE_CACHE=1"), "the backup runs with a volatile cache")
        // Writes through libnbd, acknowledged; `flush` last or not at all (qemu-io would
        // flush on exit).
        func write(_ slots: ClosedRange<Int>, pattern: Int, flush: Bool) throws {
            let r = try shell(["/usr/bin/python3", "-c", """
                import nbd, sys
                h = nbd.NBD(); h.connect_uri(sys.argv[1])
                for s in range(\(slots.lowerBound), \(slots.upperBound) + 1):
                    h.pwrite(bytes([(s + \(pattern)) % 250 + 1]) * \(PatternWorkload.writeBytes), s * \(PatternWorkload.writeBytes))
                \(flush ? "h.flush()" : "")
                h.shutdown()
                """, h.node(master).nbdURI], timeout: 120)
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        var expected: [Int: Int] = [:]
        // 300 slots of 64 KiB, never flushed: on the backup they live only in its cache.
        try write(1...300, pattern: 0, flush: false)
        for s in 1...300 { expected[s * PatternWorkload.writeBytes] = s % 250 + 1 }
        h.kill9(backup)  // a power cut: its unsynced writes die with it
        // The master goes on alone (once the arbitrator outdated the backup) in 50 slots
        // only: the other 250 reach the backup again only if the master recorded that the
        // backup had not synced them (its transfer log).
        try write(1...50, pattern: 7, flush: true)
        for s in 1...50 { expected[s * PatternWorkload.writeBytes] = (s + 7) % 250 + 1 }

        try h.startNode(backup, env: volatile)
        h.waitFor(master, "backup resynced", within: 60) { self.replication($0) == "inSync" }
        let bad = try verifyPatterns(uri: h.node(master).nbdURI, expected: expected)
        XCTAssertEqual(bad, [], "acknowledged writes missing on the master")
        try flush(h.node(master).nbdURI)
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "stores differ after the backup's power cut and resync")
    }

    /// The master is cut after acknowledged, unflushed protocol C writes while the arbitrator
    /// is down and the backup in maintenance: nobody can take over, and the old master comes
    /// back as master. It must take its crash extents from the backup, which wrote every one
    /// of those writes before they were acknowledged; with its own copy as the source (as
    /// before issue 13's last change) they were lost on both nodes.
    func testMasterPowerCutReturnsAsMasterWithEveryAcknowledgedWrite() throws {
        let h = try ClusterHarness(name: "pcutm", subnet: 49)
        defer { h.shutdown() }
        let volatile = ["HAMGR_TEST_VOLATILE_CACHE": "1"]
        try h.startArbitrator()
        try h.startNode("a", env: volatile)
        try h.startNode("b", env: volatile)
        let (master, backup) = try h.startedCluster(startProcesses: false)
        XCTAssertEqual(try h.admin(backup, "maintenance", body: "{\"on\": true}").code, 200)
        _ = h.stop("w")
        let r = try shell(["/usr/bin/python3", "-c", """
            import nbd, sys
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            for s in range(1, 301):
                h.pwrite(bytes([s % 250 + 1]) * \(PatternWorkload.writeBytes), s * \(PatternWorkload.writeBytes))
            h.shutdown()
            """, h.node(master).nbdURI], timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        var expected: [Int: Int] = [:]
        for s in 1...300 { expected[s * PatternWorkload.writeBytes] = s % 250 + 1 }
        h.kill9(master)  // a power cut: its unsynced writes, all 300, die with it
        try h.startNode(master, env: volatile)
        XCTAssertNotNil(h.waitForRole(master, "primary", within: 60))
        h.waitFor(master, "in sync", within: 60) { self.replication($0) == "inSync" }
        let bad = try verifyPatterns(uri: h.node(master).nbdURI, expected: expected)
        XCTAssertEqual(bad, [], "acknowledged writes lost by the returning master")
        try flush(h.node(master).nbdURI)
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "stores differ after the master's power cut")
    }
}
