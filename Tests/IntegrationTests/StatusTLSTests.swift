// The status listener over HTTPS and with a read token: real StatusServers (HamgrKit,
// internal API) with certificates made by `hamgr certs`' openssl code, reached by
// HTTPClient, by the built hactl binary and by curl.
import Foundation
import HAShell
@testable import HamgrKit
import Logging
import NIOCore
import NIOPosix
import XCTest

final class StatusTLSTests: XCTestCase {
    static let adminToken = "tls-admin-token-0123456789"
    static let readToken = "tls-read-token-0123456789"

    /// Every line the servers logged, with its journal fields.
    final class LogLines: @unchecked Sendable {
        private let lock = NSLock()
        private var entries: [(String, [String])] = []
        func add(_ line: String, _ fields: [String]) { lock.lock(); entries.append((line, fields)); lock.unlock() }
        func count(event: String) -> Int {
            lock.lock(); defer { lock.unlock() }
            return entries.filter { $0.1.contains("HAMGR_EVENT=\(event)") }.count
        }
        /// True once exactly `count` lines of `event` were logged (the server logs on its own
        /// loop, maybe after the client gave up); false if another number after 2 s.
        func wait(event: String, count expected: Int) -> Bool {
            for _ in 0..<40 {
                if count(event: event) == expected { return true }
                usleep(50_000)
            }
            return false
        }
    }

    var group: MultiThreadedEventLoopGroup!
    var servers: [StatusServer] = []
    var dir = ""
    var pki: OpenSSLPKI!
    var logs = LogLines()
    var a: HactlTests.FakeNode!, b: HactlTests.FakeNode!
    var urlA = "", urlB = ""

    var caFile: String { dir + "/ca.crt" }
    var adminTokenFile: String { dir + "/admin.token" }
    var readTokenFile: String { dir + "/read.token" }

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        dir = try OpsTest.scratchDirectory("status-tls")
        pki = OpenSSLPKI(caCert: caFile, caKey: dir + "/ca.key", days: 30)
        try pki.ensureCA(commonName: "hamgr CA test")
        // Node a's and b's certificates name 127.0.0.1, where both listen.
        for host in ["a", "b"] { try issue(host, sans: ["DNS:\(host)", "IP:127.0.0.1"]) }
        for (path, token) in [(adminTokenFile, Self.adminToken), (readTokenFile, Self.readToken)] {
            FileManager.default.createFile(atPath: path, contents: Data((token + "\n").utf8))
            chmod(path, 0o600)
        }
        a = HactlTests.FakeNode(HactlTests.doc(node: "a", peer: "b", role: .primary, service: "10.1.0.1:10809"))
        b = HactlTests.FakeNode(HactlTests.doc(node: "b", peer: "a", role: .secondary, service: "10.2.0.1:10809"))
        urlA = try start(a, host: "a")
        urlB = try start(b, host: "b")
        a.doc.peer.statusURL = urlB
        b.doc.peer.statusURL = urlA
    }

    override func tearDownWithError() throws {
        for s in servers { try s.stop().wait() }
        try group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func issue(_ host: String, sans: [String]) throws {
        try pki.issue(commonName: host, sans: sans, cert: dir + "/\(host).crt", key: dir + "/\(host).key", renew: true)
    }

    /// A status server for `node` with `host`'s certificate (nil: plaintext); returns its URL.
    func start(_ node: HactlTests.FakeNode, host: String?, readToken: String? = nil) throws -> String {
        let tls = try host.map {
            try TLSFiles.identity(TLSSettings(caFile: caFile, certFile: dir + "/{name}.crt", keyFile: dir + "/{name}.key"), host: $0)
                .serverConfiguration()
        }
        let logs = self.logs
        var logger = Logger(label: "status-tls-test") { label in
            HamgrLogHandler(label: label, output: LogOutput(toStderr: false, toJournal: false, capture: { logs.add($0, $1) }))
        }
        logger.logLevel = .info
        let s = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: Self.adminToken, readToken: readToken, tls: tls,
                             handlers: StatusHandlers(statusDocument: { node.status() }, metrics: { "hamgr_up 1\n" }, healthy: { true },
                                                      admin: { req, loop in loop.makeSucceededFuture(node.admin(req.command)) }),
                             logger: logger)
        try s.start().wait()
        servers.append(s)
        return "\(host == nil ? "http" : "https")://127.0.0.1:\(s.boundPort!)"
    }

    private func trust(_ path: String? = nil) throws -> HTTPClient.TrustedCA {
        try HTTPClient.TrustedCA(file: path ?? caFile, key: "ca")
    }

    private func hactl(_ args: [String]) throws -> OpsTest.Output {
        try OpsTest.run([try OpsTest.binary("hactl")] + args,
                        env: ["HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_CA_FILE": "", "HACTL_READ_TOKEN_FILE": "", "HACTL_CONFIG": ""], timeout: 60)
    }

    // MARK: hactl over HTTPS

    func testHactlStatusOverHTTPSFollowsThePeer() throws {
        let r = try hactl(["--endpoint", urlB, "--ca-file", caFile, "status"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.first, "cluster web1: master a at 10.1.0.1:10809, epoch 7", r.stdout)
        // Node a was reached through b's document, at its https:// status URL, with the same CA.
        let rows = lines.map { $0.split(separator: " ").map(String.init) }
        XCTAssertEqual(rows[2].prefix(3), ["*", "a", "primary"], r.stdout)
        XCTAssertEqual(rows[3].prefix(2), ["b", "secondary"], r.stdout)

        // $HACTL_CA_FILE does the same, and a bare HOST:PORT then means https://.
        let bare = try OpsTest.run([try OpsTest.binary("hactl"), "--endpoint", String(urlA.dropFirst("https://".count)), "status", "--json"],
                                   env: ["HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_CA_FILE": caFile], timeout: 60)
        XCTAssertEqual(bare.status, 0, bare.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(bare.stdout.utf8)) as? [String: Any], bare.stdout)
        XCTAssertEqual((o["nodes"] as? [[String: Any]])?.map { $0["endpoint"] as? String }, [urlA, urlB], "the peer followed over https://")

        // hactl cannot ask without the CA: exit 4 (status: unknown).
        let noCA = try hactl(["--endpoint", urlA, "status"])
        XCTAssertEqual(noCA.status, 4)
        XCTAssertTrue(noCA.stderr.contains("\(urlA): an https:// endpoint needs --ca-file"), noCA.stderr)
    }

    func testEveryAdminActionOverHTTPS() throws {
        let common = ["--endpoint", urlA, "--ca-file", caFile, "--token-file", adminTokenFile]
        let commands: [[String]] = [
            ["switchover"], ["promote"], ["demote"], ["maintenance", "on"], ["verify", "--no-wait"], ["resync", "--no-wait"],
            ["resolve", "--discard", "peer", "--yes"], ["bootstrap", "--source", "a", "--yes"], ["invalidate", "--yes"],
            ["arbitrator-accept", "--yes"], ["resource", "cleanup", "--node", "a"],
        ]
        for c in commands {
            let r = try hactl(common + c)
            XCTAssertEqual(r.status, 0, "\(c): \(r.stderr)")
        }
        XCTAssertEqual(a.seen, [.switchover, .promote(force: false), .demote, .maintenance(on: true), .verify(repair: false), .resync,
                                .resolve(discard: .peer), .bootstrap(assumeClean: false), .invalidate, .acceptArbitrator,
                                .resourceCleanup(name: nil)])
        XCTAssertEqual(Set(a.seen.map(\.action)), Set(AdminCommand.actions), "every admin action the API has")
        XCTAssertEqual(b.seen, [])
    }

    // MARK: What TLS refuses

    func testPlaintextRequestsAreRefusedAndTheServerKeepsServing() throws {
        let plain = "http://" + urlA.dropFirst("https://".count)
        // An admin request in plaintext, with the right token: no answer, nothing done.
        XCTAssertThrowsError(try HTTPClient(endpoint: plain, bearerToken: Self.adminToken).post("/admin/demote", json: Data("{}".utf8))) { error in
            XCTAssertTrue("\(error)".hasSuffix("closed the connection without answering (a TLS listener? then use https:// and a CA file)"), "\(error)")
        }
        XCTAssertEqual(a.seen, [])
        XCTAssertTrue(logs.wait(event: "status_tls_refused", count: 1), "one log line per refused connection")
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") {
            XCTAssertThrowsError(try OpsTest.curl(plain + "/status"), "curl gets no HTTP answer")
            XCTAssertTrue(logs.wait(event: "status_tls_refused", count: 2))
        }
        // hactl says what is wrong.
        let r = try hactl(["--endpoint", plain, "--token-file", adminTokenFile, "maintenance", "on"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("\(plain): 127.0.0.1:\(servers[0].boundPort!) closed the connection without answering"), r.stderr)
        XCTAssertEqual(a.seen, [])
        // The listener still serves the next good request.
        let ok = try HTTPClient(endpoint: urlA, bearerToken: Self.adminToken, trust: try trust()).post("/admin/demote", json: Data("{}".utf8))
        XCTAssertEqual(ok.status, 200, ok.text)
        XCTAssertEqual(a.seen, [.demote])
    }

    func testWrongCAIsAClearVerificationError() throws {
        let other = OpenSSLPKI(caCert: dir + "/other-ca.crt", caKey: dir + "/other-ca.key", days: 30)
        try other.ensureCA(commonName: "some other CA")
        let hostPort = String(urlA.dropFirst("https://".count))
        XCTAssertThrowsError(try HTTPClient(endpoint: urlA, trust: try trust(dir + "/other-ca.crt")).get("/status")) { error in
            XCTAssertTrue("\(error)".hasPrefix("TLS handshake with \(hostPort) failed: certificate verify failed"), "\(error)")
        }
        let r = try hactl(["--endpoint", urlA, "--ca-file", dir + "/other-ca.crt", "status"])
        XCTAssertEqual(r.status, 4, "no node's status could be read: unknown")
        XCTAssertTrue(r.stdout.contains("did not answer: TLS handshake with \(hostPort) failed: certificate verify failed"), r.stdout)
        XCTAssertTrue(logs.wait(event: "status_tls_refused", count: 2), "the server logs each refused handshake")
    }

    func testCertificateForAnotherAddressIsRefused() throws {
        try issue("elsewhere", sans: ["DNS:elsewhere", "IP:127.0.0.9"])
        let url = try start(HactlTests.FakeNode(a.doc), host: "elsewhere")
        XCTAssertThrowsError(try HTTPClient(endpoint: url, trust: try trust()).get("/status")) { error in
            XCTAssertTrue("\(error)".contains("certificate verify failed: the server's certificate is not issued for 127.0.0.1"), "\(error)")
        }
        let port = String(url.split(separator: ":").last!)
        XCTAssertThrowsError(try HTTPClient(endpoint: "https://localhost:\(port)", trust: try trust()).get("/status")) { error in
            XCTAssertTrue("\(error)".contains("not issued for localhost"), "\(error)")
        }
        // A certificate naming only the DNS name is accepted under that name.
        try issue("named", sans: ["DNS:localhost"])
        let named = try start(HactlTests.FakeNode(a.doc), host: "named")
        let ok = try HTTPClient(endpoint: "https://localhost:\(named.split(separator: ":").last!)", trust: try trust()).get("/status")
        XCTAssertEqual(ok.status, 200)
    }

    func testWrongSchemeErrors() throws {
        let plainURL = try start(HactlTests.FakeNode(a.doc), host: nil)
        let asHTTPS = "https://" + plainURL.dropFirst("http://".count)
        XCTAssertThrowsError(try HTTPClient(endpoint: asHTTPS, trust: try trust()).get("/status")) { error in
            XCTAssertTrue("\(error)".contains("the server speaks plaintext HTTP"), "\(error)")
        }
        XCTAssertThrowsError(try HTTPClient(endpoint: urlA.replacingOccurrences(of: "https://", with: "ftp://")).get("/status")) { error in
            XCTAssertTrue("\(error)".contains("is not an http(s)://HOST:PORT"), "\(error)")
        }
    }

    // MARK: Read token

    func testReadTokenGuardsMetricsAndStatusNotHealthz() throws {
        let node = HactlTests.FakeNode(a.doc)
        let url = try start(node, host: "a", readToken: Self.readToken)
        let ca = try trust()
        func get(_ path: String, _ token: String?) throws -> Int {
            try HTTPClient(endpoint: url, bearerToken: token, trust: ca).get(path).status
        }
        XCTAssertEqual(try get("/metrics", nil), 401)
        XCTAssertEqual(try get("/status", nil), 401)
        XCTAssertEqual(try get("/metrics", "wrong-token-0123456789"), 401)
        XCTAssertEqual(try get("/metrics", Self.readToken), 200)
        XCTAssertEqual(try get("/status", Self.readToken), 200)
        XCTAssertEqual(try get("/metrics", Self.adminToken), 200, "the admin token also opens reads")
        XCTAssertEqual(try get("/healthz", nil), 200, "health checks need no token")
        XCTAssertTrue(logs.wait(event: "read_unauthorized", count: 3))

        // The read token does not open the admin API.
        let denied = try HTTPClient(endpoint: url, bearerToken: Self.readToken, trust: ca).post("/admin/demote", json: Data("{}".utf8))
        XCTAssertEqual(denied.status, 401)
        XCTAssertEqual(node.seen, [])

        // hactl: --read-token-file or the admin token for status; no token is explained.
        let withRead = try hactl(["--endpoint", url, "--ca-file", caFile, "--read-token-file", readTokenFile, "status", "--no-peer"])
        XCTAssertEqual(withRead.status, 0, withRead.stderr + withRead.stdout)
        let withAdmin = try hactl(["--endpoint", url, "--ca-file", caFile, "--token-file", adminTokenFile, "status", "--no-peer"])
        XCTAssertEqual(withAdmin.status, 0, withAdmin.stderr + withAdmin.stdout)
        let without = try hactl(["--endpoint", url, "--ca-file", caFile, "status", "--no-peer"])
        XCTAssertEqual(without.status, 4, "no node's status could be read: unknown")
        XCTAssertTrue(without.stdout.contains("needs the read token (--read-token-file) or the admin token (--token-file); none was given"), without.stdout)
        let readOnlyAdmin = try hactl(["--endpoint", url, "--ca-file", caFile, "--token-file", readTokenFile, "demote"])
        XCTAssertEqual(readOnlyAdmin.status, 1)
        XCTAssertTrue(readOnlyAdmin.stderr.contains("admin token was refused"), readOnlyAdmin.stderr)
        let admin = try hactl(["--endpoint", url, "--ca-file", caFile, "--token-file", adminTokenFile, "--read-token-file", readTokenFile, "demote"])
        XCTAssertEqual(admin.status, 0, admin.stderr)
        XCTAssertEqual(node.seen, [.demote])
    }

    // MARK: A real client

    func testCurlVerifiesTheCertificate() throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/bin/curl"), "curl is not installed")
        let r = try OpsTest.run(["/usr/bin/curl", "-sS", "--max-time", "10", "--cacert", caFile, urlA + "/metrics"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "hamgr_up 1\n")
        let unverified = try OpsTest.run(["/usr/bin/curl", "-sS", "--max-time", "10", urlA + "/metrics"])
        XCTAssertEqual(unverified.status, 60, "curl refuses a certificate it cannot verify: \(unverified.stderr)")
    }
}
