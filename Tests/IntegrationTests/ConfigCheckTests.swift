import Foundation
import XCTest

/// `hamgr check` as an operator runs it: one line, exit 0 — or one error naming the key, exit 1.
final class ConfigCheckTests: XCTestCase {
    static let valid = """
    [cluster]
    name = "web1"
    key_file = "web1.key"
    admin_token_file = "web1.token"

    [volume]
    size = "1GiB"

    [[node]]
    name = "a"
    replication_address = "127.0.0.1:17788"
    service_address = "127.0.0.1:10809"
    status_address = "127.0.0.1:9650"
    backing = "a.img"
    metadata = "a.meta"

    [[node]]
    name = "b"
    replication_address = "127.0.0.1:27788"
    service_address = "127.0.0.1:20809"
    status_address = "127.0.0.1:9660"
    backing = "b.img"
    metadata = "b.meta"

    [arbitrator]
    address = "127.0.0.1:7790"

    """

    var dir = ""

    override func setUpWithError() throws {
        dir = try OpsTest.scratchDirectory("check")
        FileManager.default.createFile(atPath: dir + "/web1.key", contents: Data((0..<32).map { UInt8($0) }))
        chmod(dir + "/web1.key", 0o600)
        FileManager.default.createFile(atPath: dir + "/web1.token", contents: Data("token-token-token-1234\n".utf8))
        chmod(dir + "/web1.token", 0o600)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func check(_ toml: String, _ extra: [String] = []) throws -> OpsTest.Output {
        let path = dir + "/web1.toml"
        try toml.write(toFile: path, atomically: true, encoding: .utf8)
        return try OpsTest.run([try OpsTest.binary("hamgr"), "check", "--config", path] + extra)
    }

    func testValidConfigPrintsOneLine() throws {
        let r = try check(Self.valid)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "config OK: cluster web1, nodes a, b\n")
        // With --node, the node's backing store must exist (or create = true).
        let missing = try check(Self.valid, ["--node", "b"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("node[1].backing") && missing.stderr.contains(dir + "/b.img"), missing.stderr)
        FileManager.default.createFile(atPath: dir + "/b.img", contents: nil)
        let n = try check(Self.valid, ["--node", "b"])
        XCTAssertEqual(n.status, 0, n.stderr)
        XCTAssertEqual(n.stdout, "config OK: cluster web1, nodes a, b (checked for node b)\n")
    }

    func testEachBrokenConfigFailsWithOneMessageNamingTheKey() throws {
        let cases: [(String, String, String)] = [
            ("service_address = \"127.0.0.1:20809\"", "service_address = \"127.0.0.1:10809\"", "node[1].service_address"),
            ("name = \"web1\"", "name = \"web1\"\nprotocol = \"Z\"", "cluster.protocol"),
            ("size = \"1GiB\"", "size = \"1GiB\"\nchunk_size = \"3000\"", "volume.chunk_size"),
            ("size = \"1GiB\"", "sise = \"1GiB\"", "volume.sise"),
            ("[arbitrator]", "[timeouts]\nlease_ms = 500\n\n[arbitrator]", "timeouts.renew_interval_ms"),
            ("key_file = \"web1.key\"", "key_file = \"nope.key\"", "cluster.key_file"),
        ]
        for (old, new, key) in cases {
            XCTAssertTrue(Self.valid.contains(old))
            let r = try check(Self.valid.replacingOccurrences(of: old, with: new))
            XCTAssertEqual(r.status, 1, "\(new): \(r.stdout)")
            XCTAssertEqual(r.stdout, "")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains(": \(key): "), "expected key \(key) in: \(r.stderr)")
        }
    }

    func testUnknownNodeAndOpenKeyFile() throws {
        let r = try check(Self.valid, ["--node", "c"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("no node named 'c'"), r.stderr)
        chmod(dir + "/web1.key", 0o644)
        let k = try check(Self.valid)
        XCTAssertEqual(k.status, 1)
        XCTAssertTrue(k.stderr.contains("cluster.key_file") && k.stderr.contains("chmod 600"), k.stderr)
    }
}
