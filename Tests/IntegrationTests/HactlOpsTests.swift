// hactl for production use (issue "Running hamgr in production", item 4): status exit codes,
// --config, --json on every command, --version. Same fixture as HactlTests (two in-process
// StatusServers with fake documents; hactl runs as the built binary).
import Foundation
import HAShell
@testable import HamgrKit
import Logging
import NIOCore
import NIOPosix
import XCTest

extension HactlTests {
    /// `status` and `status --json` with the expected exit code; returns the verdict line and the JSON.
    private func status(expect code: Int32, _ args: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws -> (String, [String: Any]) {
        let r = try hactl((args.isEmpty ? ["--endpoint", urlA] : args) + ["status"], token: false)
        XCTAssertEqual(r.status, code, r.stdout + r.stderr, file: file, line: line)
        let j = try hactl((args.isEmpty ? ["--endpoint", urlA] : args) + ["status", "--json"], token: false)
        XCTAssertEqual(j.status, code, j.stdout + j.stderr, file: file, line: line)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any], j.stdout, file: file, line: line)
        XCTAssertEqual(o["exit_code"] as? Int, Int(code), file: file, line: line)
        let verdict = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertEqual(o["summary"] as? String, verdict, "the JSON summary is the verdict line", file: file, line: line)
        return (verdict, o)
    }

    func testExitZeroWhenHealthy() throws {
        let (line, o) = try status(expect: 0)
        XCTAssertEqual(line, "healthy")
        XCTAssertEqual(o["verdict"] as? String, "healthy")
        XCTAssertEqual(o["reasons"] as? [String], [])
    }

    func testExitOneWhenDegraded() throws {
        a.doc.peer.replication = .behind
        a.doc.outOfSyncBytes = 12 << 20
        let (line, o) = try status(expect: 1)
        XCTAssertEqual(line, "degraded: peer b behind by 12 MiB")
        XCTAssertEqual(o["verdict"] as? String, "degraded")

        a.doc.peer.replication = .inSync
        a.doc.outOfSyncBytes = 0
        b.doc.maintenance = true
        b.doc.arbitrator.reachable = false
        let (line2, _) = try status(expect: 1)
        XCTAssertTrue(line2.contains("arbitrator unreachable from b") && line2.contains("b in maintenance"), line2)

        b.doc.maintenance = false
        b.doc.arbitrator.reachable = true
        try servers[1].stop().wait()   // b's status endpoint
        let (line3, _) = try status(expect: 1)
        XCTAssertTrue(line3.hasPrefix("degraded: peer b unreachable from here"), line3)
    }

    func testExitTwoWithoutMaster() throws {
        for n in [a!, b!] {
            n.doc.role = .secondary
            n.doc.master = nil
            n.doc.leaseValidMs = 0
            n.doc.quorum = false
        }
        b.doc.whyNotPromoted = "no quorum"
        let (line, o) = try status(expect: 2)
        XCTAssertTrue(line.hasPrefix("no master"), line)
        XCTAssertTrue(line.contains("b not promoted: no quorum"), line)
        XCTAssertEqual(o["verdict"] as? String, "no_master")
        XCTAssertTrue(o["master"] is NSNull)
        // A primary whose lease ran out is no master either.
        a.doc.role = .primary
        let (line2, _) = try status(expect: 2)
        XCTAssertTrue(line2.contains("a is primary without quorum"), line2)
    }

    func testExitThreeOnSplitBrainWorstWins() throws {
        a.doc.splitBrain = "generations 5eed and 6eed diverged"
        b.doc.maintenance = true   // degraded too: the split brain wins
        let (line, o) = try status(expect: 3)
        XCTAssertTrue(line.hasPrefix("split brain: a reports generations 5eed and 6eed diverged"), line)
        XCTAssertTrue(line.contains("b in maintenance"), "every reason is listed, the worst first: \(line)")
        XCTAssertEqual(o["verdict"] as? String, "split_brain")
        // Two valid leases at once are a split brain as well.
        a.doc.splitBrain = nil
        b.doc.maintenance = false
        b.doc.role = .primary
        b.doc.leaseValidMs = 900
        let (line2, _) = try status(expect: 3)
        XCTAssertTrue(line2.contains("a and b all hold a valid master lease"), line2)
    }

    func testExitFourWhenNothingAnswers() throws {
        for s in servers { try s.stop().wait() }
        let (line, o) = try status(expect: 4)
        XCTAssertTrue(line.hasPrefix("unknown: no node answered"), line)
        XCTAssertEqual(o["verdict"] as? String, "unknown")
        XCTAssertEqual((o["nodes"] as? [[String: Any]])?.first?["reachable"] as? Bool, false)
        // hactl could not even ask (a CA file that is not there): also 4, with --json an error object.
        let bad = try hactl(["--endpoint", urlA, "--ca-file", dir + "/missing.crt", "status"], token: false)
        XCTAssertEqual(bad.status, 4)
        XCTAssertTrue(bad.stderr.hasPrefix("hactl: --ca-file"), bad.stderr)
        let badJSON = try hactl(["--endpoint", urlA, "--ca-file", dir + "/missing.crt", "status", "--json"], token: false)
        XCTAssertEqual(badJSON.status, 4)
        let e = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(badJSON.stdout.utf8)) as? [String: Any], badJSON.stdout)
        XCTAssertEqual(e["action"] as? String, "status")
        XCTAssertEqual(e["ok"] as? Bool, false)
        XCTAssertTrue((e["message"] as? String ?? "").contains("--ca-file"), "\(e)")
        // A usage error stays 64.
        XCTAssertEqual(try hactl(["status", "--bogus"], token: false).status, 64)
    }

    // MARK: --config

    private func writeConfig(statusTLS: Bool = false, extra: String = "", portA: Int, portB: Int, arbitratorStatus: String? = nil) throws -> String {
        let path = dir + "/web1.toml"
        try """
        [cluster]
        name = "web1"
        key_file = "web1.key"
        admin_token_file = "token"

        [volume]
        size = "1GiB"

        [[node]]
        name = "a"
        replication_address = "127.0.0.1:17788"
        service_address = "10.1.0.1:10809"
        status_address = "127.0.0.1:\(portA)"
        backing = "a.img"
        metadata = "a.meta"

        [[node]]
        name = "b"
        replication_address = "127.0.0.1:27788"
        service_address = "10.2.0.1:10809"
        status_address = "127.0.0.1:\(portB)"
        backing = "b.img"
        metadata = "b.meta"

        [arbitrator]
        address = "127.0.0.1:7790"
        \(arbitratorStatus.map { "status_address = \"\($0)\"" } ?? "")
        \(extra)
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    private func port(_ url: String) -> Int { Int(url.split(separator: ":").last!)! }

    func testConfigFindsBothEndpointsAndTheToken() throws {
        let config = try writeConfig(portA: port(urlA), portB: port(urlB))
        // No --endpoint, no --token-file: both come from the config (the key file need not exist here).
        let st = try hactl(["--config", config, "status", "--no-peer", "--json"], token: false)
        XCTAssertEqual(st.status, 0, st.stdout + st.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(st.stdout.utf8)) as? [String: Any], st.stdout)
        XCTAssertEqual((o["nodes"] as? [[String: Any]])?.map { $0["endpoint"] as? String }, [urlA, urlB])
        let sw = try hactl(["--config", config, "switchover"], token: false)
        XCTAssertEqual(sw.status, 0, sw.stderr)
        XCTAssertEqual(a.seen, [.switchover])
        // $HACTL_CONFIG does the same; an explicit --endpoint overrides the config's.
        let env = try OpsTest.run([try OpsTest.binary("hactl"), "--endpoint", urlB, "maintenance", "on"],
                                  env: ["HACTL_CONFIG": config, "HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_CA_FILE": "", "HACTL_READ_TOKEN_FILE": ""])
        XCTAssertEqual(env.status, 0, env.stderr)
        XCTAssertEqual(b.seen, [.maintenance(on: true)])
        XCTAssertEqual(a.seen, [.switchover])
        // A config that does not parse is one error naming the file.
        try "[cluster\n".write(toFile: dir + "/bad.toml", atomically: true, encoding: .utf8)
        let bad = try hactl(["--config", dir + "/bad.toml", "demote"], token: false)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("--config \(dir)/bad.toml"), bad.stderr)
    }

    func testConfigAddsTheArbitratorsView() throws {
        let doc = ArbitratorStatusDocument(clusters: [.init(name: "web1", master: "a", epoch: 7, outdated: [], lastContactMs: ["a": 10, "b": 12])])
        let w = StatusServer(group: group, host: "127.0.0.1", port: 0, adminToken: nil,
                             handlers: StatusHandlers(statusDocument: { doc }, metrics: { "" }, healthy: { true },
                                                      admin: { _, loop in loop.makeSucceededFuture(.refused("no", status: 404)) }),
                             logger: .init(label: "hactl-test"))
        try w.start().wait()
        servers.append(w)
        let config = try writeConfig(portA: port(urlA), portB: port(urlB), arbitratorStatus: "127.0.0.1:\(w.boundPort!)")
        let r = try hactl(["--config", config, "status"], token: false)
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        XCTAssertTrue(r.stdout.contains("arbitrator (version \(hamgrVersion)): 1 cluster(s)"), r.stdout)
        XCTAssertTrue(r.stdout.hasSuffix("healthy\n"), r.stdout)
        let j = try hactl(["--config", config, "status", "--json"], token: false)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any], j.stdout)
        let arb = try XCTUnwrap(o["arbitrator"] as? [String: Any], j.stdout)
        XCTAssertEqual(arb["reachable"] as? Bool, true)
        XCTAssertEqual((arb["status"] as? [String: Any])?["role"] as? String, "arbitrator")
        XCTAssertEqual((o["nodes"] as? [Any])?.count, 2)
    }

    // MARK: --json on every command

    private static let resultKeys: Set<String> = ["action", "node", "endpoint", "ok", "message", "fields", "results"]

    private func jsonResult(_ args: [String], expect code: Int32 = 0, token: Bool = true) throws -> [String: Any] {
        let r = try hactl(args + ["--json"], token: token)
        XCTAssertEqual(r.status, code, "\(args): \(r.stdout) \(r.stderr)")
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], "\(args): \(r.stdout)")
        XCTAssertEqual(Set(o.keys), Self.resultKeys, "\(args)")
        return o
    }

    func testEveryAdminCommandPrintsOneJSONObject() throws {
        let cases: [([String], String, String)] = [
            (["--endpoint", urlB, "switchover"], "switchover", "a"),
            (["--endpoint", urlA, "demote"], "demote", "a"),
            (["--endpoint", urlB, "promote", "--yes"], "promote", "b"),
            (["--endpoint", urlB, "maintenance", "on"], "maintenance", "b"),
            (["--endpoint", urlA, "verify", "--no-wait"], "verify", "a"),
            (["--endpoint", urlA, "resync"], "resync", "a"),
            (["--endpoint", urlA, "bootstrap", "--source", "b", "--yes"], "bootstrap", "b"),
            (["--endpoint", urlB, "invalidate", "--yes"], "invalidate", "b"),
            (["--endpoint", urlB, "resolve", "--discard", "local", "--yes"], "resolve", "b"),
            (["--endpoint", urlB, "arbitrator-accept", "--yes"], "arbitrator-accept", "b"),
            (["--endpoint", urlA, "resource", "cleanup", "fs", "--node", "b"], "resource-cleanup", "b"),
        ]
        for (args, action, node) in cases {
            let o = try jsonResult(args)
            XCTAssertEqual(o["action"] as? String, action)
            XCTAssertEqual(o["node"] as? String, node, action)
            XCTAssertEqual(o["ok"] as? Bool, true, action)
            XCTAssertEqual(o["message"] as? String, "done", action)
            XCTAssertEqual((o["results"] as? [[String: Any]])?.count, 1, action)
            if action == "resync" {
                XCTAssertEqual((o["fields"] as? [String: Any])?["out_of_sync_bytes"] as? Int, 0, "waited for the job: \(o)")
            }
        }
        XCTAssertEqual(a.seen, [.switchover, .demote, .verify(repair: false), .resync])
        XCTAssertEqual(b.seen.last, .resourceCleanup(name: "fs"), "cleanup reaches only --node, with the name")

        // A refusal: same shape, ok false, exit 1, the node's fields kept.
        b.reply = .refused("node b is outdated; it cannot be promoted", fields: ["disk_state": .string("outdated")])
        let refused = try jsonResult(["--endpoint", urlB, "promote", "--yes"], expect: 1)
        XCTAssertEqual(refused["ok"] as? Bool, false)
        XCTAssertEqual(refused["message"] as? String, "node b is outdated; it cannot be promoted")
        XCTAssertEqual((refused["fields"] as? [String: Any])?["disk_state"] as? String, "outdated")
        XCTAssertEqual((refused["results"] as? [[String: Any]])?.first?["http_status"] as? Int, 409)
        // Several endpoints: one object, one result each, node null.
        let both = try jsonResult(["--endpoint", urlA, "--endpoint", urlB, "maintenance", "off"], expect: 1)
        XCTAssertTrue(both["node"] is NSNull)
        XCTAssertEqual((both["results"] as? [[String: Any]])?.map { $0["ok"] as? Bool }, [true, false])
        // An error before any node is asked: same shape, no results.
        let noToken = try jsonResult(["--endpoint", urlA, "demote"], expect: 1, token: false)
        XCTAssertEqual(noToken["ok"] as? Bool, false)
        XCTAssertTrue((noToken["message"] as? String ?? "").contains("needs --token-file"), "\(noToken)")
        XCTAssertEqual((noToken["results"] as? [Any])?.count, 0)
        // drill --json fails with the same error object when there is no master to drill.
        for n in [a!, b!] { n.doc.role = .secondary; n.doc.master = nil }
        let drill = try jsonResult(["--endpoint", urlA, "drill"], expect: 1)
        XCTAssertEqual(drill["action"] as? String, "drill")
        XCTAssertEqual(drill["ok"] as? Bool, false)
    }

    // MARK: --version

    func testVersionOnBothBinaries() throws {
        for tool in ["hactl", "hamgr"] {
            let r = try OpsTest.run([try OpsTest.binary(tool), "--version"])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(r.stdout, hamgrVersion + "\n", tool)
        }
    }
}

extension StatusTLSTests {
    /// `--config` with `[tls]` and `status.tls`: https:// endpoints, the CA from tls.ca_file,
    /// both tokens from the config; nothing given on the command line.
    func testHactlConfigFindsHTTPSEndpointsCAAndTokens() throws {
        func port(_ url: String) -> String { String(url.split(separator: ":").last!) }
        let env = ["HACTL_ENDPOINT": "", "HACTL_TOKEN_FILE": "", "HACTL_CA_FILE": "", "HACTL_READ_TOKEN_FILE": "", "HACTL_CONFIG": ""]
        try writeConfig(portA: port(urlA), portB: port(urlB), adminTokenFile: "admin.token")
        let config = dir + "/web1.toml"
        let st = try OpsTest.run([try OpsTest.binary("hactl"), "--config", config, "status", "--no-peer", "--json"], env: env, timeout: 60)
        XCTAssertEqual(st.status, 0, st.stdout + st.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(st.stdout.utf8)) as? [String: Any], st.stdout)
        XCTAssertEqual((o["nodes"] as? [[String: Any]])?.map { $0["endpoint"] as? String }, [urlA, urlB], "https:// from status.tls")
        XCTAssertEqual(o["verdict"] as? String, "healthy")
        let sw = try OpsTest.run([try OpsTest.binary("hactl"), "switchover", "--json"],
                                 env: env.merging(["HACTL_CONFIG": config]) { $1 }, timeout: 60)
        XCTAssertEqual(sw.status, 0, sw.stdout + sw.stderr)
        XCTAssertEqual(a.seen, [.switchover], "the admin token came from cluster.admin_token_file")

        // A node that requires the read token, and a config without the admin token: the
        // read token comes from status.read_token_file.
        let guarded = try start(HactlTests.FakeNode(a.doc), host: "a", readToken: Self.readToken)
        try writeConfig(portA: port(guarded), portB: port(urlB), adminTokenFile: nil)
        let read = try OpsTest.run([try OpsTest.binary("hactl"), "--config", config, "status", "--no-peer"], env: env, timeout: 60)
        XCTAssertEqual(read.status, 0, read.stdout + read.stderr)
        XCTAssertEqual(read.stdout.split(separator: "\n").last, "healthy", read.stdout)
    }

    private func writeConfig(portA: String, portB: String, adminTokenFile: String?) throws {
        try """
        [cluster]
        name = "web1"
        key_file = "web1.key"
        \(adminTokenFile.map { "admin_token_file = \"\($0)\"" } ?? "")

        [volume]
        size = "1GiB"

        [[node]]
        name = "a"
        replication_address = "127.0.0.1:17788"
        service_address = "10.1.0.1:10809"
        status_address = "127.0.0.1:\(portA)"
        backing = "a.img"
        metadata = "a.meta"

        [[node]]
        name = "b"
        replication_address = "127.0.0.1:27788"
        service_address = "10.2.0.1:10809"
        status_address = "127.0.0.1:\(portB)"
        backing = "b.img"
        metadata = "b.meta"

        [arbitrator]
        address = "127.0.0.1:7790"

        [tls]
        ca_file = "ca.crt"
        cert_file = "{name}.crt"
        key_file = "{name}.key"

        [status]
        tls = true
        read_token_file = "read.token"

        """.write(toFile: dir + "/web1.toml", atomically: true, encoding: .utf8)
    }
}

extension OperationsProcessTests {
    /// `hactl demo --keep --json`: --keep is a flag (no value), the walkthrough goes to stderr,
    /// stdout is one JSON result, and the kept directory is there (removed here).
    func testDemoKeepIsAFlagAndJSONIsOneObject() throws {
        let r = try shell([ClusterHarness.hactl, "demo", "--keep", "--json"], timeout: 180, env: ["HAMGR_BIN": ClusterHarness.hamgr])
        let kept = r.stderr.split(separator: "\n").first { $0.hasPrefix("kept ") }.map { String($0.dropFirst("kept ".count)) }
        defer { if let kept { try? FileManager.default.removeItem(atPath: kept) } }
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], r.stdout)
        XCTAssertEqual(o["action"] as? String, "demo")
        XCTAssertEqual(o["ok"] as? Bool, true)
        XCTAssertTrue(r.stderr.contains("data intact"), r.stderr)
        let dir = try XCTUnwrap(kept, "demo --keep names the directory it kept: \(r.stderr)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir), dir)
        sleep(1)
        XCTAssertEqual(try shell(["pgrep", "-fa", "hamgr-demo-"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines), "",
                       "demo processes left behind")
    }
}
