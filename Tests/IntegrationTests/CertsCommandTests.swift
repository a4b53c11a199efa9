import Foundation
import HAShell
import XCTest

/// `hamgr certs` and the security keys of a config, as an operator meets them: certificates
/// made with two commands, every mistake one error naming its key.
final class CertsCommandTests: XCTestCase {
    static let tlsSection = """

    [tls]
    ca_file = "tls/ca.crt"
    cert_file = "tls/{name}.crt"
    key_file = "tls/{name}.key"

    """

    var dir = ""

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw XCTSkip("openssl is not installed") }
        dir = try OpsTest.scratchDirectory("certs")
        FileManager.default.createFile(atPath: dir + "/web1.key", contents: Data((0..<32).map { UInt8($0) }))
        chmod(dir + "/web1.key", 0o600)
        FileManager.default.createFile(atPath: dir + "/web1.token", contents: Data("token-token-token-1234\n".utf8))
        chmod(dir + "/web1.token", 0o600)
        FileManager.default.createFile(atPath: dir + "/a.img", contents: Data())
    }

    override func tearDown() { if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) } }

    private func write(_ toml: String) throws -> String {
        let path = dir + "/web1.toml"
        try toml.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    private func hamgr(_ args: [String]) throws -> OpsTest.Output {
        try OpsTest.run([try OpsTest.binary("hamgr")] + args)
    }

    private func openssl(_ args: [String]) throws -> OpsTest.Output { try OpsTest.run(["/usr/bin/openssl"] + args) }

    func testCertsThenCheckPassForEveryHostAndRenewKeepsTheCA() throws {
        let config = try write(ConfigCheckTests.valid + Self.tlsSection)
        let made = try hamgr(["certs", "--config", config])
        XCTAssertEqual(made.status, 0, made.stderr)
        for host in ["a", "b", "arbitrator"] {
            XCTAssertTrue(made.stdout.contains("\(host): \(dir)/tls/\(host).crt"), made.stdout)
            // Signed by the cluster CA, naming the host and the addresses it serves on.
            let verify = try openssl(["verify", "-CAfile", dir + "/tls/ca.crt", dir + "/tls/\(host).crt"])
            XCTAssertEqual(verify.status, 0, verify.stdout + verify.stderr)
            let text = try openssl(["x509", "-in", dir + "/tls/\(host).crt", "-noout", "-ext", "subjectAltName"]).stdout
            XCTAssertTrue(text.contains("DNS:\(host)") && text.contains("IP Address:127.0.0.1"), text)
            var st = stat()
            XCTAssertEqual(stat(dir + "/tls/\(host).key", &st), 0)
            XCTAssertEqual(st.st_mode & 0o777, 0o600, "\(host).key mode")
        }
        let a = try hamgr(["check", "--config", config, "--node", "a"])
        XCTAssertEqual(a.status, 0, a.stderr)
        let w = try hamgr(["check", "--config", config, "--arbitrator"])
        XCTAssertEqual(w.status, 0, w.stderr)
        XCTAssertEqual(w.stdout, "config OK: cluster web1, nodes a, b (checked for the arbitrator)\n")

        // A second run keeps everything; --renew re-issues the host certificates under the same CA.
        let ca = try Data(contentsOf: URL(fileURLWithPath: dir + "/tls/ca.crt"))
        let cert = try Data(contentsOf: URL(fileURLWithPath: dir + "/tls/a.crt"))
        let again = try hamgr(["certs", "--config", config])
        XCTAssertEqual(again.status, 0, again.stderr)
        XCTAssertTrue(again.stdout.contains("a: \(dir)/tls/a.crt exists; kept"), again.stdout)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/tls/a.crt")), cert)
        let renewed = try hamgr(["certs", "--config", config, "--renew"])
        XCTAssertEqual(renewed.status, 0, renewed.stderr)
        XCTAssertNotEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/tls/a.crt")), cert)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dir + "/tls/ca.crt")), ca)
        XCTAssertEqual(try hamgr(["check", "--config", config, "--node", "a"]).status, 0)

        // A client directory in the layout libnbd and qemu read.
        let client = try hamgr(["certs", "--config", config, "--client", "web-frontend", "--out", dir + "/client"])
        XCTAssertEqual(client.status, 0, client.stderr)
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/client/" + f), f)
        }
        XCTAssertEqual(try openssl(["verify", "-CAfile", dir + "/client/ca-cert.pem", dir + "/client/client-cert.pem"]).status, 0)
    }

    func testEachTLSMistakeNamesItsKey() throws {
        let config = try write(ConfigCheckTests.valid + Self.tlsSection)
        XCTAssertEqual(try hamgr(["certs", "--config", config]).status, 0)
        func expect(_ key: String, _ words: String, _ args: [String] = ["--node", "a"], line: UInt = #line) throws {
            let r = try hamgr(["check", "--config", config] + args)
            XCTAssertEqual(r.status, 1, "expected an error for \(key)", line: line)
            XCTAssertTrue(r.stderr.contains("\(key): ") && r.stderr.contains(words), r.stderr, line: line)
        }
        // The key of another host does not match this host's certificate.
        try FileManager.default.copyItem(atPath: dir + "/tls/a.key", toPath: dir + "/a.key.saved")
        try? FileManager.default.removeItem(atPath: dir + "/tls/a.key")
        try FileManager.default.copyItem(atPath: dir + "/tls/b.key", toPath: dir + "/tls/a.key")
        try expect("tls.key_file", "does not match the certificate")
        // A private key readable by others.
        try FileManager.default.removeItem(atPath: dir + "/tls/a.key")
        try FileManager.default.copyItem(atPath: dir + "/a.key.saved", toPath: dir + "/tls/a.key")
        chmod(dir + "/tls/a.key", 0o644)
        try expect("tls.key_file", "chmod 600")
        chmod(dir + "/tls/a.key", 0o600)
        // Not a certificate; a missing one.
        try "not a certificate\n".write(toFile: dir + "/tls/b.crt", atomically: true, encoding: .utf8)
        try expect("tls.cert_file", "not a PEM certificate", ["--node", "b"])
        // This arbitrator serves no status: it needs no certificate.
        XCTAssertEqual(try hamgr(["check", "--config", config, "--arbitrator"]).status, 0)
        try FileManager.default.removeItem(atPath: dir + "/tls/ca.crt")
        try expect("tls.ca_file", "cannot read")
    }

    func testCertificateDatesAreChecked() throws {
        let config = try write(ConfigCheckTests.valid + Self.tlsSection)
        XCTAssertEqual(try hamgr(["certs", "--config", config, "--days", "30"]).status, 0)
        let tls = try XCTUnwrap(ClusterConfig.load(path: config).tls)
        XCTAssertNoThrow(try TLSFiles.identity(tls, host: "a"))
        // In 40 days the 30-day host certificate has expired (the CA has not).
        XCTAssertThrowsError(try TLSFiles.identity(tls, host: "a", now: Date().addingTimeInterval(40 * 86400))) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "tls.cert_file")
            XCTAssertTrue("\(error)".contains("expired"), "\(error)")
        }
        // A host whose clock is behind sees certificates that are not valid yet.
        XCTAssertThrowsError(try TLSFiles.identity(tls, host: "a", now: Date().addingTimeInterval(-2 * 86400))) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "tls.ca_file")
            XCTAssertTrue("\(error)".contains("clock"), "\(error)")
        }
    }

    func testExportAndKeyRolloverKeys() throws {
        // TLS modes need certificates.
        var r = try hamgr(["check", "--config", try write(ConfigCheckTests.valid + "\n[export]\ntls = \"require\"\n")])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("export.tls: "), r.stderr)
        r = try hamgr(["check", "--config", try write(ConfigCheckTests.valid + "\n[export]\nallow = [\"10.0.0.0/8\", \"10.1.2.300/32\"]\n")])
        XCTAssertTrue(r.stderr.contains("export.allow[1]: "), r.stderr)
        r = try hamgr(["check", "--config", try write(ConfigCheckTests.valid + "\n[export]\nclient_ca_file = \"ca.crt\"\n")])
        XCTAssertTrue(r.stderr.contains("export.client_ca_file: "), r.stderr)
        // With [tls], the export requires TLS unless told otherwise; the socket may name the node.
        let c = try ClusterConfig.load(path: try write(ConfigCheckTests.valid + Self.tlsSection
            + "\n[export]\nallow = [\"127.0.0.0/8\", \"::1\"]\nunix_socket = \"/run/hamgr/web1-{name}.nbd\"\n"))
        XCTAssertEqual(c.export.tls, .require)
        XCTAssertEqual(c.export.allow.map(\.description), ["127.0.0.0/8", "0:0:0:0:0:0:0:1/128"])
        XCTAssertEqual(c.export.unixSocket(for: "b"), "/run/hamgr/web1-b.nbd")

        // A rollover: key_file plus accepted keys, each checked like the key itself.
        FileManager.default.createFile(atPath: dir + "/old.key", contents: Data((0..<32).map { UInt8(255 - $0) }))
        chmod(dir + "/old.key", 0o640)
        let rollover = ConfigCheckTests.valid.replacingOccurrences(of: "key_file = \"web1.key\"\n", with: "key_file = \"web1.key\"\naccept_key_files = [\"old.key\"]\n")
        r = try hamgr(["check", "--config", try write(rollover)])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("cluster.accept_key_files[0]: ") && r.stderr.contains("chmod 600"), r.stderr)
        chmod(dir + "/old.key", 0o600)
        XCTAssertEqual(try ClusterConfig.load(path: try write(rollover)).loadClusterKeys().count, 2)
    }

    func testClientNetworks() {
        XCTAssertNil(ClientNetwork("10.0.0.0/33"))
        XCTAssertNil(ClientNetwork("10.0.0/8"))
        XCTAssertNil(ClientNetwork("2001:db8::1::2"))
        XCTAssertNil(ClientNetwork("example.org"))
        let net = ClientNetwork("10.1.0.0/16")!
        XCTAssertTrue(net.contains(try! .init(ipAddress: "10.1.200.3", port: 1)))
        XCTAssertFalse(net.contains(try! .init(ipAddress: "10.2.0.1", port: 1)))
        // A dual-stack socket reports IPv4 peers as mapped IPv6 addresses.
        XCTAssertTrue(net.contains(try! .init(ipAddress: "::ffff:10.1.0.9", port: 1)))
        let v6 = ClientNetwork("2001:db8::/32")!
        XCTAssertTrue(v6.contains(try! .init(ipAddress: "2001:db8:ffff::1", port: 1)))
        XCTAssertFalse(v6.contains(try! .init(ipAddress: "2001:db9::1", port: 1)))
        XCTAssertFalse(v6.contains(try! .init(ipAddress: "10.1.0.9", port: 1)))
        XCTAssertTrue(ClientNetwork("0.0.0.0/0")!.contains(try! .init(ipAddress: "192.0.2.1", port: 1)))
        XCTAssertEqual(ClientNetwork("192.0.2.77/24")?.description, "192.0.2.0/24")
    }
}
