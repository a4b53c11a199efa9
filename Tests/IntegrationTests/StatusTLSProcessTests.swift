import Foundation
import XCTest

/// The real daemons with `[tls]` and a read token: `hamgr certs` makes the certificates,
/// `hamgr arbitrator` and `hamgr run` serve status over HTTPS, hactl and curl reach them.
final class StatusTLSProcessTests: XCTestCase {
    func testDaemonsServeStatusAndAdminOverHTTPSOnly() throws {
        let h = try ClusterHarness(name: "tls", subnet: 91, extraTOML: """
        [tls]
        ca_file = "tls/ca.crt"
        cert_file = "tls/{name}.crt"
        key_file = "tls/{name}.key"

        [export]
        tls = "off"

        [status]
        read_token_file = "read.token"

        """)
        defer { h.shutdown() }
        let readToken = h.dir.appendingPathComponent("read.token").path
        FileManager.default.createFile(atPath: readToken, contents: Data("read-\(UInt64.random(in: 0...UInt64.max))".utf8),
                                       attributes: [.posixPermissions: 0o600])
        let certs = try shell([ClusterHarness.hamgr, "certs", "--config", h.configPath])
        XCTAssertEqual(certs.status, 0, certs.stderr)
        let ca = h.dir.appendingPathComponent("tls/ca.crt").path

        try h.startArbitrator()
        try h.startNode("a")
        let a = "https://\(h.node("a").statusAddress)"
        let w = "https://\(h.arbitratorIP):\(h.arbitratorStatusPort)"
        func hactl(_ args: [String]) throws -> CommandResult {
            try shell([ClusterHarness.hactl, "--ca-file", ca] + args, timeout: 30,
                      env: ["HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_READ_TOKEN_FILE": "", "HACTL_CONFIG": ""])
        }

        // Node a answers over HTTPS (bounded wait for its start).
        // (Exit 4 = no node answered yet; once a answers, b is still down, so not 0 either.)
        var status = try hactl(["--endpoint", a, "--read-token-file", readToken, "status", "--json"])
        for _ in 0..<100 where status.status == 4 {
            usleep(100_000)
            status = try hactl(["--endpoint", a, "--read-token-file", readToken, "status", "--json"])
        }
        XCTAssertTrue([1, 2].contains(status.status), "\(status.status): " + status.stderr + "\n" + h.tail("a"))
        XCTAssertTrue(status.stdout.contains("\"node\" : \"a\"") || status.stdout.contains("\"node\":\"a\""), status.stdout)
        XCTAssertTrue(status.stdout.contains("https://\(h.node("b").statusAddress)"), "the peer's status URL is https://: \(status.stdout)")

        // The arbitrator too, with the read token (it does not know the admin token).
        let arb = try hactl(["--endpoint", w, "--read-token-file", readToken, "status"])
        XCTAssertEqual(arb.status, 0, arb.stderr + "\n" + h.tail("w"))
        XCTAssertTrue(arb.stdout.hasPrefix("arbitrator (version"), arb.stdout)

        // An admin action with the admin token, over HTTPS.
        let maint = try hactl(["--endpoint", a, "--token-file", h.tokenPath, "maintenance", "on"])
        XCTAssertEqual(maint.status, 0, maint.stderr)

        // Plaintext is refused on both listeners, logged once each, and they keep serving.
        for (name, addr) in [("a", h.node("a").statusAddress), ("w", "\(h.arbitratorIP):\(h.arbitratorStatusPort)")] {
            let plain = try shell(["curl", "-sS", "--max-time", "5", "http://\(addr)/healthz"], timeout: 10)
            XCTAssertNotEqual(plain.status, 0, "\(name): a plaintext request got an answer: \(plain.stdout)")
            var logged = 0
            for _ in 0..<20 {
                logged = h.tail(name, lines: 400).components(separatedBy: "event=status_tls_refused").count - 1
                if logged >= 1 { break }
                usleep(100_000)
            }
            XCTAssertEqual(logged, 1, "\(name): one log line for the refused connection\n\(h.tail(name))")
            XCTAssertTrue(h.tail(name, lines: 400).contains("plaintext HTTP on the HTTPS listener"), h.tail(name))
            let health = try shell(["curl", "-sS", "--max-time", "5", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
                                    "https://\(addr)/healthz"], timeout: 10)
            XCTAssertEqual(health.stdout, "200", "\(name): /healthz over https without a token: \(health.stderr)")
            let metrics = try shell(["curl", "-sS", "--max-time", "5", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
                                     "https://\(addr)/metrics"], timeout: 10)
            XCTAssertEqual(metrics.stdout, "401", "\(name): /metrics without the read token")
            // With it, the certificate's expiry is there to alert on (hamgr certs: 825 days).
            let token = try String(contentsOfFile: readToken, encoding: .utf8)
            let text = try shell(["curl", "-sS", "--max-time", "5", "--cacert", ca, "-H", "Authorization: Bearer \(token)",
                                  "https://\(addr)/metrics"], timeout: 10).stdout
            let line = text.split(separator: "\n").first { $0.hasPrefix("hamgr_tls_certificate_expiry_timestamp_seconds ") }
            let expiry = line.flatMap { Double($0.split(separator: " ")[1]) } ?? 0
            let days = (expiry - Date().timeIntervalSince1970) / 86400
            XCTAssertTrue(days > 824 && days <= 825, "\(name): certificate expiry gauge \(String(describing: line))")
        }
    }
}
