import Foundation
import HAShell
@testable import HamgrKit
import Logging
import NIOCore
import NIOPosix
import XCTest

final class StatusServerTests: XCTestCase {
    static let token = "t0ken-for-tests-0123456789"

    /// Records what reached the daemon side.
    final class Daemon: @unchecked Sendable {
        let lock = NSLock()
        var adminCalls: [AdminCommand] = []
        var healthy = true
        func record(_ c: AdminCommand) { lock.lock(); adminCalls.append(c); lock.unlock() }
        var calls: [AdminCommand] { lock.lock(); defer { lock.unlock() }; return adminCalls }
    }

    var group: MultiThreadedEventLoopGroup!
    var server: StatusServer!
    var daemon: Daemon!
    var base: String!

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        daemon = Daemon()
        try startServer(token: Self.token)
    }

    override func tearDownWithError() throws {
        try server?.stop().wait()
        try group.syncShutdownGracefully()
    }

    private func startServer(token: String?) throws {
        try server?.stop().wait()
        let daemon = self.daemon!
        let metrics = NodeMetrics()
        metrics.epoch.set(7)
        let handlers = StatusHandlers(
            statusDocument: { StatusDocumentSample.make() },
            metrics: { metrics.registry.render() },
            healthy: { daemon.lock.lock(); defer { daemon.lock.unlock() }; return daemon.healthy },
            admin: { req, loop in
                daemon.record(req.command)
                if case .promote(force: false) = req.command {
                    return loop.makeSucceededFuture(.refused("peer is up to date and primary; use switchover", fields: ["master": .string("b")]))
                }
                return loop.makeSucceededFuture(.ok("\(req.command.action) done", fields: ["epoch": .number(8)]))
            })
        var logger = Logger(label: "status-test")
        logger.logLevel = .critical
        server = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: token, handlers: handlers, logger: logger)
        try server.start().wait()
        base = "http://127.0.0.1:\(server.boundPort!)"
    }

    func testStatusMetricsAndHealthOverRealHTTP() throws {
        let (code, body) = try OpsTest.curl(base + "/status")
        XCTAssertEqual(code, 200)
        let doc = try JSONDecoder().decode(StatusDocument.self, from: Data(body.utf8))
        XCTAssertEqual(doc, StatusDocumentSample.make())

        let metrics = try HTTPClient(endpoint: base).get("/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertEqual(metrics.header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        XCTAssertTrue(metrics.text.contains("\nhamgr_epoch 7\n"), metrics.text)

        XCTAssertEqual(try OpsTest.curl(base + "/healthz").0, 200)
        daemon.lock.lock(); daemon.healthy = false; daemon.lock.unlock()
        let unhealthy = try OpsTest.curl(base + "/healthz")
        XCTAssertEqual(unhealthy.0, 503)
        XCTAssertEqual(try OpsTest.curl(base + "/nope").0, 404)
        XCTAssertEqual(try OpsTest.curl(base + "/status", method: "DELETE").0, 405)
        XCTAssertEqual(try OpsTest.curl(base + "/admin/promote", token: Self.token).0, 405, "admin needs POST")
        XCTAssertEqual(try OpsTest.curl(base + "/admin/reboot", method: "POST", token: Self.token, body: "{}").0, 404)
        XCTAssertTrue(daemon.calls.isEmpty)
    }

    func testAdminNeedsTheBearerToken() throws {
        let missing = try OpsTest.curl(base + "/admin/switchover", method: "POST", body: "{}")
        XCTAssertEqual(missing.0, 401)
        let wrong = try OpsTest.curl(base + "/admin/switchover", method: "POST", token: Self.token + "x", body: "{}")
        XCTAssertEqual(wrong.0, 401)
        let prefix = try OpsTest.curl(base + "/admin/switchover", method: "POST", token: String(Self.token.dropLast()), body: "{}")
        XCTAssertEqual(prefix.0, 401)
        let basic = try HTTPClient(endpoint: base).request(method: "POST", path: "/admin/demote", body: Data("{}".utf8),
                                                           extraHeaders: [("Authorization", "Basic \(Self.token)")])
        XCTAssertEqual(basic.status, 401)
        XCTAssertTrue(daemon.calls.isEmpty, "the handler must not run without the right token")

        let ok = try OpsTest.curl(base + "/admin/switchover", method: "POST", token: Self.token, body: "{}")
        XCTAssertEqual(ok.0, 200)
        let reply = try JSONDecoder().decode(AdminReply.self, from: Data(ok.1.utf8))
        XCTAssertEqual(reply, AdminReply(ok: true, message: "switchover done", fields: ["epoch": .number(8)]))
        XCTAssertEqual(daemon.calls, [.switchover])
    }

    func testAdminParametersAndRefusals() throws {
        let client = HTTPClient(endpoint: base, bearerToken: Self.token)
        XCTAssertEqual(try client.post("/admin/maintenance", json: Data(#"{"on":true}"#.utf8)).status, 200)
        XCTAssertEqual(try client.post("/admin/resolve", json: Data(#"{"discard":"local"}"#.utf8)).status, 200)
        XCTAssertEqual(try client.post("/admin/promote", json: Data(#"{"force":true}"#.utf8)).status, 200)
        let refused = try client.post("/admin/promote", json: Data())
        XCTAssertEqual(refused.status, 409)
        XCTAssertEqual(try JSONDecoder().decode(AdminReply.self, from: refused.body).fields["master"], .string("b"))
        XCTAssertEqual(daemon.calls, [.maintenance(on: true), .resolve(discard: .local), .promote(force: true), .promote(force: false)])

        for (path, body) in [("/admin/maintenance", "{on:true"), ("/admin/maintenance", "[true]"), ("/admin/maintenance", "{}"),
                             ("/admin/resolve", #"{"discard":"both"}"#), ("/admin/switchover", #"{"to":"b"}"#)] {
            let r = try client.post(path, json: Data(body.utf8))
            XCTAssertEqual(r.status, 400, "\(path) \(body)")
            XCTAssertEqual(try JSONDecoder().decode(AdminReply.self, from: r.body).ok, false)
        }
        XCTAssertEqual(daemon.calls.count, 4, "bad requests never reach the handler")
    }

    func testAdminRefusedWithoutTokenFile() throws {
        try startServer(token: nil)
        let r = try OpsTest.curl(base + "/admin/switchover", method: "POST", token: "anything", body: "{}")
        XCTAssertEqual(r.0, 403)
        XCTAssertTrue(r.1.contains("admin_token_file"), r.1)
        XCTAssertTrue(daemon.calls.isEmpty)
        XCTAssertEqual(try OpsTest.curl(base + "/status").0, 200, "read-only endpoints still serve")
    }

    func testSurvivesGarbageHugeHeadersAndBodies() throws {
        let port = server.boundPort!
        // Garbage: a 400 (or a plain close), never a hang or a crash.
        let garbage = try rawExchange(port: port, Data("\u{01}\u{02}NOT HTTP AT ALL\r\n\r\n".utf8))
        XCTAssertTrue(garbage.hasPrefix("HTTP/1.1 400"), garbage)
        // 64 KiB of headers against a 16 KiB limit.
        let huge = "GET /status HTTP/1.1\r\nHost: x\r\nX-Big: \(String(repeating: "a", count: 64 * 1024))\r\n\r\n"
        let hugeReply = try rawExchange(port: port, Data(huge.utf8))
        XCTAssertTrue(hugeReply.hasPrefix("HTTP/1.1 400"), String(hugeReply.prefix(200)))
        XCTAssertFalse(hugeReply.contains("\"cluster\""), "the oversized request must not be served")
        // A body over 64 KiB.
        let big = try HTTPClient(endpoint: base, bearerToken: Self.token).post("/admin/verify", json: Data(repeating: 0x20, count: 100_000))
        XCTAssertEqual(big.status, 413)
        // A client that connects and says nothing does not block others.
        let idle = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(idle) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET); addr.sin_port = in_port_t(UInt16(port).bigEndian); addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(idle, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        // Still serving.
        XCTAssertEqual(try OpsTest.curl(base + "/healthz").0, 200)
        XCTAssertTrue(daemon.calls.isEmpty)
    }

    /// State confined to another event loop is served through futures, never by waiting.
    func testHandlersOnAnotherLoop() throws {
        let daemonGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? daemonGroup.syncShutdownGracefully() }
        let daemonLoop = daemonGroup.next()
        let registry = MetricsRegistry()
        registry.gauge("hamgr_epoch", help: "e").set(9)
        let handlers = StatusHandlers(
            status: { caller in daemonLoop.submit { try JSONEncoder.hamgr.encode(StatusDocumentSample.make()) }.hop(to: caller) },
            asyncMetrics: { caller in
                daemonLoop.submit { () -> String in
                    daemonLoop.preconditionInEventLoop()
                    return registry.render()
                }.hop(to: caller)
            },
            healthy: { true },
            admin: { _, caller in caller.makeSucceededFuture(.ok("ok")) })
        var logger = Logger(label: "status-test"); logger.logLevel = .critical
        let other = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: nil, handlers: handlers, logger: logger)
        try other.start().wait()
        defer { try? other.stop().wait() }
        let url = "http://127.0.0.1:\(other.boundPort!)"
        let m = try OpsTest.curl(url + "/metrics")
        XCTAssertEqual(m.0, 200)
        XCTAssertTrue(m.1.contains("hamgr_epoch 9"), m.1)
        XCTAssertEqual(try OpsTest.curl(url + "/status").0, 200)
    }

    /// The arbitrator's `GET /` page: HTML with a refresh and a strict content policy; with a
    /// read token it needs the token, as a bearer header or as `?token=` (the read token only).
    func testArbitratorPageRouteAndToken() throws {
        let readToken = "read-t0ken-0123456789"
        let doc = ArbitratorStatusDocument(clusters: [.init(name: "web1", master: "a", epoch: 7, outdated: [],
                                                            lastContactMs: ["a": 10, "b": 20], leaseRemainingMs: 4_000)])
        let handlers = StatusHandlers(
            status: { loop in loop.makeCompletedFuture { try JSONEncoder.hamgr.encode(doc) } },
            asyncMetrics: { loop in loop.makeSucceededFuture("") },
            healthy: { true },
            admin: { _, loop in loop.makeSucceededFuture(.refused("no", status: 404)) },
            page: { loop in loop.makeSucceededFuture(ArbitratorPage.render(doc, generatedAt: "now", staleAfterMs: 800)) })
        var logger = Logger(label: "status-test"); logger.logLevel = .critical
        func serve(readToken: String?) throws -> (StatusServer, String) {
            let s = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: Self.token, readToken: readToken,
                                 handlers: handlers, logger: logger)
            try s.start().wait()
            return (s, "http://127.0.0.1:\(s.boundPort!)")
        }

        let (open, openURL) = try serve(readToken: nil)
        defer { try? open.stop().wait() }
        let page = try HTTPClient(endpoint: openURL).get("/")
        XCTAssertEqual(page.status, 200, page.text)
        XCTAssertEqual(page.header("Content-Type"), "text/html; charset=utf-8")
        XCTAssertEqual(page.header("Content-Security-Policy"), "default-src 'none'; style-src 'unsafe-inline'")
        XCTAssertEqual(page.header("Referrer-Policy"), "no-referrer")
        XCTAssertTrue(page.text.contains("data-cluster=\"web1\" data-state=\"healthy\""), page.text)
        XCTAssertTrue(page.text.contains("http-equiv=\"refresh\""), page.text)
        let head = try OpsTest.run(["/usr/bin/curl", "-sS", "--max-time", "10", "-I", "-o", "-", openURL + "/"])
        XCTAssertTrue(head.stdout.hasPrefix("HTTP/1.1 200"), head.stdout + head.stderr)
        XCTAssertTrue(head.stdout.lowercased().contains("content-length: \(page.body.count)"), "HEAD reports the page's length: \(head.stdout)")
        XCTAssertEqual(try OpsTest.curl(openURL + "/", method: "POST", body: "{}").0, 405)
        XCTAssertEqual(try OpsTest.curl(openURL + "/?x=1").0, 200)

        let (guarded, url) = try serve(readToken: readToken)
        defer { try? guarded.stop().wait() }
        let refused = try OpsTest.curl(url + "/")
        XCTAssertEqual(refused.0, 401)
        XCTAssertTrue(refused.1.contains("?token="), refused.1)
        XCTAssertEqual(try OpsTest.curl(url + "/?token=wrong-token-0123456789").0, 401)
        XCTAssertEqual(try OpsTest.curl(url + "/?token=" + String(readToken.dropLast())).0, 401)
        XCTAssertEqual(try OpsTest.curl(url + "/?token=\(Self.token)").0, 401, "the admin token is never taken from a URL")
        XCTAssertEqual(try OpsTest.curl(url + "/?token=\(readToken)").0, 200)
        XCTAssertEqual(try OpsTest.curl(url + "/?refresh=1&token=\(readToken)").0, 200)
        XCTAssertEqual(try OpsTest.curl(url + "/", token: readToken).0, 200)
        XCTAssertEqual(try OpsTest.curl(url + "/", token: Self.token).0, 200, "the admin token opens it as a header")
        XCTAssertEqual(try OpsTest.curl(url + "/status?token=\(readToken)").0, 401, "?token= opens the page only")
        XCTAssertEqual(try OpsTest.curl(url + "/healthz").0, 200)

        // A data node (no page handler) keeps 404 on /, for every method.
        XCTAssertEqual(try OpsTest.curl(base + "/").0, 404)
        XCTAssertEqual(try OpsTest.curl(base + "/", method: "POST", body: "{}").0, 404)
    }

    func testPageRoutingAndQueryParsing() {
        XCTAssertEqual(StatusRoute.route(method: .GET, uri: "/", servesPage: true), .page)
        XCTAssertEqual(StatusRoute.route(method: .HEAD, uri: "/?token=x", servesPage: true), .page)
        XCTAssertEqual(StatusRoute.route(method: .POST, uri: "/", servesPage: true), .methodNotAllowed(allow: "GET, HEAD"))
        XCTAssertEqual(StatusRoute.route(method: .GET, uri: "/"), .notFound)
        XCTAssertEqual(StatusRoute.route(method: .GET, uri: "/index.html", servesPage: true), .notFound)
        XCTAssertEqual(StatusRoute.queryValue("/?token=abc", "token"), "abc")
        XCTAssertEqual(StatusRoute.queryValue("/?a=1&token=a%2Fb%3D&token=second", "token"), "a/b=")
        XCTAssertEqual(StatusRoute.queryValue("/?tokens=abc", "token"), nil)
        XCTAssertEqual(StatusRoute.queryValue("/?token", "token"), "")
        XCTAssertEqual(StatusRoute.queryValue("/", "token"), nil)
        XCTAssertEqual(StatusRoute.path("/?token=secret"), "/")
        XCTAssertEqual(AdminAuth.checkPage(authorization: nil, queryToken: nil, readToken: nil, adminToken: "adm"), .allowed)
        XCTAssertEqual(AdminAuth.checkPage(authorization: nil, queryToken: nil, readToken: "rd", adminToken: "adm"), .unauthorized)
        XCTAssertEqual(AdminAuth.checkPage(authorization: nil, queryToken: "rd", readToken: "rd", adminToken: "adm"), .allowed)
        XCTAssertEqual(AdminAuth.checkPage(authorization: nil, queryToken: "adm", readToken: "rd", adminToken: "adm"), .unauthorized)
        XCTAssertEqual(AdminAuth.checkPage(authorization: "Bearer adm", queryToken: nil, readToken: "rd", adminToken: "adm"), .allowed)
        XCTAssertEqual(AdminAuth.checkPage(authorization: "Bearer bad", queryToken: "rd", readToken: "rd", adminToken: "adm"), .allowed)
    }

    func testKeepAliveServesSeveralRequestsOnOneConnection() throws {
        let r = try OpsTest.run(["/usr/bin/curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-o", "/dev/null",
                                 "-w", "%{http_code} %{num_connects}\n", base + "/healthz", base + "/status"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "200 1\n200 0\n", "the second request reuses the connection")
    }

    /// Send bytes on a fresh connection, half-close, and return everything the server says.
    private func rawExchange(port: Int, _ bytes: Data) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET); addr.sin_port = in_port_t(UInt16(port).bigEndian); addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        XCTAssertEqual(rc, 0)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        shutdown(fd, Int32(SHUT_WR))
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

enum StatusDocumentSample {
    static func make() -> StatusDocument {
        StatusDocument(
            cluster: "web1", node: "a", role: .primary, epoch: 7,
            master: .init(node: "a", serviceAddress: "127.0.0.1:10809"), diskState: .upToDate,
            peer: .init(node: "b", reachable: true, replication: .inSync, diskState: .upToDate),
            arbitrator: .init(reachable: true), quorum: true, leaseValidMs: 900,
            serviceAddress: "127.0.0.1:10809", generation: "abc")
    }
}
