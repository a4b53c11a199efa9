// The real StatusServer comes from HamgrKit (internal API, hence @testable); hactl itself
// runs as the built binary.
import Foundation
import HAShell
@testable import HamgrKit
import Logging
import NIOCore
import NIOPosix
import XCTest

/// hactl against two real status servers standing in for nodes a (master) and b.
final class HactlTests: XCTestCase {
    final class FakeNode: @unchecked Sendable {
        let lock = NSLock()
        var doc: StatusDocument
        var calls: [AdminCommand] = []
        /// Each /status read advances a running job by this many bytes.
        var jobStep: UInt64 = 0
        var reply: AdminResponse = .ok("done")

        init(_ doc: StatusDocument) { self.doc = doc }

        func status() -> StatusDocument {
            lock.lock(); defer { lock.unlock() }
            if var job = doc.resync {
                job.doneBytes += jobStep
                doc.resync = job.doneBytes >= job.totalBytes ? nil : job
                if doc.resync == nil { doc.outOfSyncBytes = 0 }
            }
            return doc
        }

        func admin(_ c: AdminCommand) -> AdminResponse {
            lock.lock(); defer { lock.unlock() }
            calls.append(c)
            if c == .resync { doc.resync = .init(doneBytes: 0, totalBytes: 10 << 20); jobStep = 1 << 20 }
            return reply
        }

        var seen: [AdminCommand] { lock.lock(); defer { lock.unlock() }; return calls }
    }

    static let token = "hactl-test-token-0123456789"
    var group: MultiThreadedEventLoopGroup!
    var servers: [StatusServer] = []
    var a: FakeNode!, b: FakeNode!
    var urlA = "", urlB = "", dir = "", tokenFile = ""

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        dir = try OpsTest.scratchDirectory("hactl")
        tokenFile = dir + "/token"
        FileManager.default.createFile(atPath: tokenFile, contents: Data((Self.token + "\n").utf8))
        chmod(tokenFile, 0o600)
        a = FakeNode(Self.doc(node: "a", peer: "b", role: .primary, service: "10.1.0.1:10809"))
        b = FakeNode(Self.doc(node: "b", peer: "a", role: .secondary, service: "10.2.0.1:10809"))
        urlA = try start(a)
        urlB = try start(b)
        a.doc.peer.statusURL = urlB
        b.doc.peer.statusURL = urlA + "/status"   // either form is accepted
    }

    override func tearDownWithError() throws {
        for s in servers { try s.stop().wait() }
        try group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    static func doc(node: String, peer: String, role: Role, service: String) -> StatusDocument {
        StatusDocument(cluster: "web1", node: node, role: role, epoch: 7,
                       master: .init(node: "a", serviceAddress: "10.1.0.1:10809"), diskState: .upToDate,
                       peer: .init(node: peer, reachable: true, replication: .inSync, diskState: .upToDate),
                       arbitrator: .init(reachable: true), quorum: true, leaseValidMs: role == .primary ? 1000 : 0,
                       serviceAddress: service, generation: "5eed",
                       resources: role == .primary ? [.init(name: "fs", state: "running", restarts: 0)] : [])
    }

    func start(_ node: FakeNode) throws -> String {
        var logger = Logger(label: "hactl-test"); logger.logLevel = .critical
        let s = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: Self.token,
                             handlers: StatusHandlers(statusDocument: { node.status() }, metrics: { "" }, healthy: { true },
                                                      admin: { req, loop in loop.makeSucceededFuture(node.admin(req.command)) }),
                             logger: logger)
        try s.start().wait()
        servers.append(s)
        return "http://127.0.0.1:\(s.boundPort!)"
    }

    func hactl(_ args: [String], token: Bool = true) throws -> OpsTest.Output {
        var argv = [try OpsTest.binary("hactl")] + args
        if token { argv.insert(contentsOf: ["--token-file", tokenFile], at: 1) }
        return try OpsTest.run(argv, env: ["HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_CONFIG": "", "HACTL_CA_FILE": "", "HACTL_READ_TOKEN_FILE": ""], timeout: 60)
    }

    func testStatusShowsBothNodesAndTheMaster() throws {
        let r = try hactl(["--endpoint", urlB, "status"], token: false)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.first, "cluster web1: master a at 10.1.0.1:10809, epoch 7")
        let rows = lines.map { $0.split(separator: " ").map(String.init) }
        XCTAssertEqual(rows[2].prefix(4), ["*", "a", "primary", "upToDate"], r.stdout)
        XCTAssertTrue(rows[2].contains("10.1.0.1:10809"), "the master row names its service address")
        XCTAssertEqual(rows[3].prefix(3), ["b", "secondary", "upToDate"], r.stdout)
        XCTAssertTrue(r.stdout.contains("a: resources fs running"), r.stdout)
        XCTAssertEqual(lines.last, "healthy", "the verdict line closes the table")

        // The master's status endpoint is down: it shows as unreachable, the command still
        // answers; b still names a as master, so degraded (exit 1), not "no master".
        try servers[0].stop().wait()
        let partial = try hactl(["--endpoint", urlB, "status"], token: false)
        XCTAssertEqual(partial.status, 1, partial.stdout + partial.stderr)
        let partialRows = partial.stdout.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        XCTAssertEqual(partialRows[2].prefix(2), ["a", "unreachable"], partial.stdout)
        XCTAssertTrue(partial.stdout.contains("a: \(urlA) did not answer"), partial.stdout)
    }

    /// `status --json` is one document: the verdict and both nodes' /status documents as served.
    func testStatusJSONIsTheDocument() throws {
        for args in [["--endpoint", urlA], ["--endpoint", urlA, "--endpoint", urlB]] {
            let r = try hactl(args + ["status", "--json"], token: false)
            XCTAssertEqual(r.status, 0, r.stderr)
            let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
            XCTAssertEqual(Set(o.keys), ["cluster", "verdict", "exit_code", "summary", "reasons", "master", "epoch", "nodes", "arbitrator"])
            XCTAssertEqual(o["verdict"] as? String, "healthy")
            XCTAssertEqual(o["exit_code"] as? Int, 0)
            XCTAssertEqual((o["master"] as? [String: Any])?["node"] as? String, "a")
            XCTAssertTrue(o["arbitrator"] is NSNull)
            let nodes = try XCTUnwrap(o["nodes"] as? [[String: Any]])
            XCTAssertEqual(nodes.map { $0["node"] as? String }, ["a", "b"], "the peer is followed")
            let docA = try JSONSerialization.data(withJSONObject: try XCTUnwrap(nodes[0]["status"]))
            XCTAssertEqual(try JSONDecoder().decode(StatusDocument.self, from: docA), a.doc)
        }
    }

    func testArbitratorEndpointShowsItsClusters() throws {
        var logger = Logger(label: "hactl-test"); logger.logLevel = .critical
        let doc = ArbitratorStatusDocument(clusters: [.init(name: "web1", master: "a", epoch: 7, outdated: [.init(node: "b", epoch: 6)],
                                                            lastContactMs: ["a": 120, "b": nil], leaseRemainingMs: 950, connected: ["a"]),
                                                      .init(name: "web2", master: nil, epoch: 3, outdated: [], lastContactMs: ["c": 40],
                                                            connected: [])])
        let w = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: nil,
                             handlers: StatusHandlers(statusDocument: { doc }, metrics: { "" }, healthy: { true },
                                                      admin: { _, loop in loop.makeSucceededFuture(.refused("no", status: 404)) }),
                             logger: logger)
        try w.start().wait()
        servers.append(w)
        let url = "http://127.0.0.1:\(w.boundPort!)"
        let r = try hactl(["--endpoint", url, "status"], token: false)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, """
        arbitrator (version \(hamgrVersion)): 2 cluster(s)
        CLUSTER  MASTER  EPOCH  LEASE LEFT  LINKED  OUTDATED  LAST CONTACT
        web1     a       7      950 ms      a       b@6       a 120 ms, b never
        web2     none    3      -           none    -         c 40 ms

        """)
        let json = try hactl(["--endpoint", url, "status", "--json"], token: false)
        XCTAssertEqual(json.status, 0, json.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any], json.stdout)
        XCTAssertTrue(o["verdict"] is NSNull, "no verdict from an arbitrator alone")
        XCTAssertEqual((o["nodes"] as? [Any])?.count, 0)
        let arb = try XCTUnwrap(o["arbitrator"] as? [String: Any])
        XCTAssertEqual(try JSONDecoder().decode(ArbitratorStatusDocument.self,
                                                from: try JSONSerialization.data(withJSONObject: try XCTUnwrap(arb["status"]))), doc)
    }

    func testSwitchoverGoesToTheMaster() throws {
        let r = try hactl(["--endpoint", urlB, "switchover"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "done\n")
        XCTAssertEqual(a.seen, [.switchover])
        XCTAssertEqual(b.seen, [])
    }

    func testAdminNeedsAGoodTokenFile() throws {
        let none = try hactl(["--endpoint", urlA, "demote"], token: false)
        XCTAssertEqual(none.status, 1)
        XCTAssertTrue(none.stderr.contains("needs --token-file"), none.stderr)
        FileManager.default.createFile(atPath: dir + "/wrong", contents: Data("wrong-token-but-long-enough".utf8))
        chmod(dir + "/wrong", 0o600)
        let wrong = try hactl(["--token-file", dir + "/wrong", "--endpoint", urlA, "demote"], token: false)
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.stderr.contains("admin token was refused"), wrong.stderr)
        chmod(tokenFile, 0o644)
        let open = try hactl(["--endpoint", urlA, "demote"])
        XCTAssertEqual(open.status, 1)
        XCTAssertTrue(open.stderr.contains("chmod 600"), open.stderr)
        XCTAssertEqual(a.seen, [])
    }

    func testForcedPromoteNeedsConfirmation() throws {
        let refused = try hactl(["--endpoint", urlB, "promote", "--force"])
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.stderr.contains("--yes"), refused.stderr)
        XCTAssertEqual(b.seen, [])
        let r = try hactl(["--endpoint", urlB, "promote", "--force", "--yes"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(b.seen, [.promote(force: true)])
    }

    func testRefusalIsReportedWithExitOne() throws {
        b.reply = .refused("node b is outdated; it cannot be promoted", fields: ["disk_state": .string("outdated")])
        let r = try hactl(["--endpoint", urlB, "promote"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("promote refused (HTTP 409): node b is outdated"), r.stderr)
        XCTAssertTrue(r.stderr.contains("disk_state: \"outdated\""), r.stderr)
    }

    func testMaintenanceGoesOnlyToTheGivenNodes() throws {
        let r = try hactl(["--endpoint", urlB, "maintenance", "on"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "b: done\n")
        XCTAssertEqual(b.seen, [.maintenance(on: true)])
        XCTAssertEqual(a.seen, [], "never sent to a peer found through the endpoint")
        a.reply = .refused("this node is the master; switch over first")
        let both = try hactl(["--endpoint", urlA, "--endpoint", urlB, "maintenance", "off"])
        XCTAssertEqual(both.status, 1)
        XCTAssertEqual(both.stdout, "b: done\n")
        XCTAssertTrue(both.stderr.contains("switch over first"), both.stderr)
        XCTAssertEqual(a.seen, [.maintenance(on: false)])
        XCTAssertEqual(b.seen, [.maintenance(on: true), .maintenance(on: false)])
    }

    func testResyncFollowsProgressUntilDone() throws {
        let r = try hactl(["--endpoint", urlA, "resync"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(a.seen, [.resync])
        let progress = r.stdout.split(separator: "\n").filter { $0.hasPrefix("resync [") }
        XCTAssertGreaterThanOrEqual(progress.count, 3, r.stdout)
        XCTAssertTrue(r.stdout.hasSuffix("resync finished; out of sync: 0 B\n"), r.stdout)
        let noWait = try hactl(["--endpoint", urlA, "resync", "--no-wait"])
        XCTAssertEqual(noWait.stdout, "done\n")
    }

    func testResolveSendsTheSide() throws {
        let r = try hactl(["--endpoint", urlB, "resolve", "--discard", "local", "--yes"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(b.seen, [.resolve(discard: .local)])
        let bad = try hactl(["--endpoint", urlB, "resolve", "--discard", "both", "--yes"])
        XCTAssertEqual(bad.status, 64, "usage error")
        let unconfirmed = try hactl(["--endpoint", urlB, "resolve", "--discard", "peer"])
        XCTAssertEqual(unconfirmed.status, 1)
        XCTAssertEqual(b.seen.count, 1)
    }

    func testCompletionsAndDrillOptions() throws {
        let bash = try hactl(["--generate-completion-script", "bash"], token: false)
        XCTAssertEqual(bash.status, 0)
        XCTAssertTrue(bash.stdout.contains("switchover") && bash.stdout.contains("--kill-command"))
        let crash = try hactl(["drill", "--mode", "crash"], token: false)
        XCTAssertEqual(crash.status, 64)
        XCTAssertTrue(crash.stderr.contains("--kill-command"), crash.stderr)
    }
}
