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

    static let volatile = ["HAMGR_TEST_VOLATILE_CACHE": "1"]

    /// Arbitrator and both nodes, each with a volatile cache; returns (master, backup).
    private func startVolatileCluster(_ h: ClusterHarness) throws -> (String, String) {
        try h.startArbitrator()
        try h.startNode("a", env: Self.volatile)
        try h.startNode("b", env: Self.volatile)
        return try h.startedCluster(startProcesses: false)
    }

    /// Writes each 64 KiB slot through libnbd, acknowledged, with a pattern of its own;
    /// `flush` last or not at all (qemu-io would flush on exit). Returns offset → pattern.
    private func write(_ uri: String, _ slots: ClosedRange<Int>, pattern: Int, flush: Bool) throws -> [Int: Int] {
        let r = try shell(["/usr/bin/python3", "-c", """
            import nbd, sys
            h = nbd.NBD(); h.connect_uri(sys.argv[1])
            for s in range(\(slots.lowerBound), \(slots.upperBound) + 1):
                h.pwrite(bytes([(s + \(pattern)) % 250 + 1]) * \(PatternWorkload.writeBytes), s * \(PatternWorkload.writeBytes))
            \(flush ? "h.flush()" : "")
            h.shutdown()
            """, uri], timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        return Dictionary(uniqueKeysWithValues: slots.map { ($0 * PatternWorkload.writeBytes, ($0 + pattern) % 250 + 1) })
    }

    /// Once the pair is in sync again: every write in `expected` reads back through the
    /// master, and after a flush both stores are byte-identical.
    private func assertEveryWriteKept(_ h: ClusterHarness, master: String, backup: String, _ expected: [Int: Int],
                                      file: StaticString = #filePath, line: UInt = #line) throws {
        h.waitFor(master, "in sync", within: 60, file: file, line: line) { self.replication($0) == "inSync" }
        let bad = try verifyPatterns(uri: h.node(master).nbdURI, expected: expected, file: file, line: line)
        XCTAssertEqual(bad, [], "acknowledged writes missing on the master", file: file, line: line)
        try flush(h.node(master).nbdURI)
        h.kill9(master); h.kill9(backup)
        XCTAssertEqual(try h.volumeDigest(master), try h.volumeDigest(backup), "the stores differ", file: file, line: line)
    }

    func testBackupPowerCutAfterUnflushedWrites() throws {
        let h = try ClusterHarness(name: "pcut", subnet: 48)
        defer { h.shutdown() }
        let (master, backup) = try startVolatileCluster(h)
        XCTAssertTrue(h.tail(backup, lines: 400).contains("HAMGR_TEST_VOLATILE_CACHE=1"), "the backup runs with a volatile cache")
        // 300 slots of 64 KiB, never flushed: on the backup they live only in its cache.
        var expected = try write(h.node(master).nbdURI, 1...300, pattern: 0, flush: false)
        h.kill9(backup)  // a power cut: its unsynced writes die with it
        // The master goes on alone (once the arbitrator outdated the backup) in 50 slots
        // only: the other 250 reach the backup again only if the master recorded that the
        // backup had not synced them (its transfer log).
        expected.merge(try write(h.node(master).nbdURI, 1...50, pattern: 7, flush: true)) { _, new in new }
        try h.startNode(backup, env: Self.volatile)
        try assertEveryWriteKept(h, master: master, backup: backup, expected)
    }

    /// The master is cut after acknowledged, unflushed protocol C writes while the arbitrator
    /// is down and the backup in maintenance: nobody can take over, and the old master comes
    /// back as master. It must take its crash extents from the backup, which wrote every one
    /// of those writes before they were acknowledged; with its own copy as the source (as
    /// before issue 13's last change) they were lost on both nodes.
    func testMasterPowerCutReturnsAsMasterWithEveryAcknowledgedWrite() throws {
        let h = try ClusterHarness(name: "pcutm", subnet: 49)
        defer { h.shutdown() }
        let (master, backup) = try startVolatileCluster(h)
        XCTAssertEqual(try h.admin(backup, "maintenance", body: "{\"on\": true}").code, 200)
        _ = h.stop("w")
        let expected = try write(h.node(master).nbdURI, 1...300, pattern: 0, flush: false)
        h.kill9(master)  // a power cut: its unsynced writes, all 300, die with it
        try h.startNode(master, env: Self.volatile)
        XCTAssertNotNil(h.waitForRole(master, "primary", within: 60))
        try assertEveryWriteKept(h, master: master, backup: backup, expected)
    }
}
