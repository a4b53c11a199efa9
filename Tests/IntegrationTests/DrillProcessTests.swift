import Foundation
import XCTest

/// Issue 4 acceptance 7: `hactl drill` against a live local cluster, planned and crash.
final class DrillProcessTests: XCTestCase {
    private func drill(_ h: ClusterHarness, _ master: String, _ args: [String], global: [String] = []) throws -> [String: Any] {
        let scheme = h.statusCAFile == nil ? "http" : "https"
        let r = try shell([ClusterHarness.hactl, "--endpoint", "\(scheme)://\(h.node(master).statusAddress)",
                         "--token-file", h.tokenPath] + global + ["drill", "--json"] + args, timeout: 120)
        guard let obj = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else {
            XCTFail("drill printed no JSON (exit \(r.status)): \(r.stdout) \(r.stderr)")
            return [:]
        }
        XCTAssertEqual(r.status, 0, "drill failed: \(r.stdout)")
        return obj
    }

    func testSwitchoverAndCrashDrillsReportZeroRPO() throws {
        let h = try ClusterHarness(name: "drill", subnet: 38)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()

        let planned = try drill(h, master, ["--mode", "switchover"])
        print("switchover drill: \(planned)")
        XCTAssertEqual(planned["lost_acknowledged_writes"] as? Int, 0)
        XCTAssertEqual(planned["blocks_mismatched"] as? Int, 0)
        XCTAssertEqual(planned["new_master"] as? String, backup)
        XCTAssertEqual(planned["new_service_address"] as? String, h.node(backup).serviceAddress)
        XCTAssertNotNil(planned["rto_ms"] as? Double)
        h.waitFor(backup, "old master back in sync", within: 30) { (($0["peer"] as? [String: Any])?["replication"] as? String) == "inSync" }

        // Crash drill: the operator's kill command SIGKILLs the current master (now `backup`).
        guard let pid = h.processes[backup]?.processIdentifier else { return XCTFail("no process for \(backup)") }
        let crash = try drill(h, backup, ["--mode", "crash", "--kill-command", "kill -9 \(pid)"])
        print("crash drill: \(crash)")
        XCTAssertEqual(crash["lost_acknowledged_writes"] as? Int, 0)
        XCTAssertEqual(crash["blocks_mismatched"] as? Int, 0)
        XCTAssertEqual(crash["new_master"] as? String, master)
        XCTAssertGreaterThan(crash["blocks_checked"] as? Int ?? 0, 0)
        XCTAssertNotNil(crash["rto_ms"] as? Double)
    }

    /// The drill against a cluster with `[tls]` (export.tls defaults to require, status to
    /// HTTPS): with --ca-file its NBD writer and reader run over STARTTLS; without TLS the
    /// export says so and the drill stops before failing anything over.
    func testSwitchoverDrillOverTLS() throws {
        let h = try ClusterHarness(name: "drilltls", subnet: 47, extraTOML: """
        [tls]
        ca_file = "tls/ca.crt"
        cert_file = "tls/{name}.crt"
        key_file = "tls/{name}.key"

        """)
        defer { h.shutdown() }
        let certs = try shell([ClusterHarness.hamgr, "certs", "--config", h.configPath])
        XCTAssertEqual(certs.status, 0, certs.stderr)
        let ca = h.dir.appendingPathComponent("tls/ca.crt").path
        h.statusCAFile = ca
        let (master, backup) = try h.startedCluster()

        let plain = try shell([ClusterHarness.hactl, "--endpoint", "https://\(h.node(master).statusAddress)", "--ca-file", ca,
                               "--token-file", h.tokenPath, "drill", "--nbd-plaintext"], timeout: 60)
        XCTAssertEqual(plain.status, 1, plain.stdout + plain.stderr)
        XCTAssertTrue(plain.stderr.contains("the server requires TLS (NBD_REP_ERR_TLS_REQD)"), plain.stderr)
        XCTAssertEqual(h.role(master), "primary", "a refused drill fails nothing over")

        let report = try drill(h, master, ["--mode", "switchover"], global: ["--ca-file", ca])
        print("switchover drill over TLS: \(report)")
        XCTAssertEqual(report["lost_acknowledged_writes"] as? Int, 0)
        XCTAssertEqual(report["blocks_mismatched"] as? Int, 0)
        XCTAssertEqual(report["new_master"] as? String, backup)
        XCTAssertGreaterThan(report["blocks_checked"] as? Int ?? 0, 0)
        XCTAssertNotNil(report["rto_ms"] as? Double)
    }
}
