import Foundation
import XCTest

/// Issue 12, keys as systemd credentials: the real daemons read `key_file =
/// "${CREDENTIALS_DIRECTORY}/…"` from the directory systemd names (set by hand here, as
/// `LoadCredential=` would), and refuse to start in one line without it.
final class CredentialProcessTests: XCTestCase {
    func testDaemonsReadTheClusterKeyFromTheCredentialsDirectory() throws {
        let h = try ClusterHarness(name: "cred", subnet: 99)
        defer { h.shutdown() }
        // Move the key where systemd would put it (mode 0400, as systemd makes credentials).
        let creds = h.dir.appendingPathComponent("credentials").path
        try FileManager.default.createDirectory(atPath: creds, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        let key = h.dir.appendingPathComponent("cluster.key").path
        try FileManager.default.moveItem(atPath: key, toPath: creds + "/cred.key")
        chmod(creds + "/cred.key", 0o400)
        let config = try String(contentsOfFile: h.configPath, encoding: .utf8)
        XCTAssertTrue(config.contains("key_file = \"\(key)\""), config)
        try config.replacingOccurrences(of: "key_file = \"\(key)\"", with: "key_file = \"${CREDENTIALS_DIRECTORY}/cred.key\"")
            .write(toFile: h.configPath, atomically: true, encoding: .utf8)

        // Without the variable: refused like any bad config (a usage error), the first line
        // naming the key and LoadCredential=.
        let refused = try shell([ClusterHarness.hamgr, "arbitrator", "--config", h.configPath, "--init"], timeout: 20,
                                env: ["CREDENTIALS_DIRECTORY": ""])
        XCTAssertNotEqual(refused.status, 0, refused.stderr)
        let first = refused.stderr.split(separator: "\n").first ?? ""
        XCTAssertTrue(first.contains("cluster.key_file") && first.contains("CREDENTIALS_DIRECTORY is not set")
                      && first.contains("LoadCredential="), refused.stderr)
        let check = try shell([ClusterHarness.hamgr, "check", "--config", h.configPath, "--arbitrator"], timeout: 20, env: ["CREDENTIALS_DIRECTORY": creds])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)

        // With it, all three hosts open their links with the key and elect a master.
        try h.spawn("w", [ClusterHarness.hamgr, "arbitrator", "--config", h.configPath, "--init"], env: ["CREDENTIALS_DIRECTORY": creds])
        try h.startNode("a", env: ["CREDENTIALS_DIRECTORY": creds])
        try h.startNode("b", env: ["CREDENTIALS_DIRECTORY": creds])
        let (master, _) = try h.startedCluster(startProcesses: false)
        XCTAssertTrue(h.waitFor("w", "the arbitrator names \(master) master", within: 20) { doc in
            (doc["clusters"] as? [[String: Any]])?.first?["master"] as? String == master
        })
        XCTAssertFalse(h.tail("w", lines: 400).contains("link_refused"), h.tail("w"))
    }
}
