import Foundation
import XCTest

/// The example hooks in contrib/hooks do what their comments say, with the real shell and
/// stand-ins for nsupdate and the proxy's check/reload commands.
final class HooksExampleTests: XCTestCase {
    static let contrib = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("contrib/hooks").path
    var dir = ""
    override func setUpWithError() throws { dir = try OpsTest.scratchDirectory("hook-examples") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func env(_ extra: [String: String]) -> [String: String] {
        var e = ["HAMGR_CLUSTER": "web1", "HAMGR_NODE": "b", "HAMGR_ROLE": "primary", "HAMGR_EPOCH": "8",
                 "HAMGR_SERVICE_ADDRESS": "10.2.0.1:10809", "HAMGR_MASTER_NODE": "b", "HAMGR_PEER_NODE": "a",
                 "HAMGR_HOOK": "on_promote", "PATH": "\(dir)/bin:/usr/bin:/bin"]
        for (k, v) in extra { e[k] = v }
        return e
    }

    func testDNSUpdateSendsTheRecord() throws {
        try FileManager.default.createDirectory(atPath: dir + "/bin", withIntermediateDirectories: true)
        try OpsTest.writeScript(dir + "/bin/nsupdate", "#!/bin/sh\necho \"$@\" > \(dir)/args\ncat > \(dir)/update\n")
        try "DNS_SERVER=ns1.example.com\nDNS_NAME=web1.ha.example.com.\nDNS_KEY=\(dir)/k\n".write(toFile: dir + "/dns.conf", atomically: true, encoding: .utf8)
        let r = try OpsTest.run([Self.contrib + "/dns-update.sh"], env: env(["HAMGR_DNS_CONF": dir + "/dns.conf"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try String(contentsOfFile: dir + "/args", encoding: .utf8), "-k \(dir)/k -t 10\n")
        XCTAssertEqual(try String(contentsOfFile: dir + "/update", encoding: .utf8), """
        server ns1.example.com
        update delete web1.ha.example.com. A
        update add web1.ha.example.com. 30 A 10.2.0.1
        send

        """)
        let v6 = try OpsTest.run([Self.contrib + "/dns-update.sh"], env: env(["HAMGR_DNS_CONF": dir + "/dns.conf", "HAMGR_SERVICE_ADDRESS": "[fd00::2]:10809"]))
        XCTAssertEqual(v6.status, 0, v6.stderr)
        XCTAssertTrue(try String(contentsOfFile: dir + "/update", encoding: .utf8).contains("update add web1.ha.example.com. 30 AAAA fd00::2\n"))
        let demoted = try OpsTest.run([Self.contrib + "/dns-update.sh"], env: env(["HAMGR_DNS_CONF": dir + "/none", "HAMGR_ROLE": "secondary"]))
        XCTAssertEqual(demoted.status, 0)
        let unconfigured = try OpsTest.run([Self.contrib + "/dns-update.sh"], env: env(["HAMGR_DNS_CONF": dir + "/none"]))
        XCTAssertNotEqual(unconfigured.status, 0, "without DNS_SERVER the hook fails loudly")
    }

    func testProxyUpstreamRewritesAndReloads() throws {
        let file = dir + "/upstream.conf"
        try "upstream hamgr_web1 { server 10.1.0.1:443; }\n".write(toFile: file, atomically: true, encoding: .utf8)
        let conf = "PROXY_FILE=\(file)\nPROXY_PORT=443\nPROXY_CHECK='grep -q 10.2.0.1 \(file)'\nPROXY_RELOAD='touch \(dir)/reloaded'\n"
        try conf.write(toFile: dir + "/proxy.conf", atomically: true, encoding: .utf8)
        let r = try OpsTest.run([Self.contrib + "/proxy-upstream.sh"], env: env(["HAMGR_PROXY_CONF": dir + "/proxy.conf"]))
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try String(contentsOfFile: file, encoding: .utf8),
                       "# written by hamgr proxy-upstream.sh: cluster web1, node b, epoch 8\nupstream hamgr_web1 { server 10.2.0.1:443; }\n")
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/reloaded"))

        // A check that refuses the new file: the old one comes back and nothing reloads.
        try FileManager.default.removeItem(atPath: dir + "/reloaded")
        let before = try String(contentsOfFile: file, encoding: .utf8)
        try (conf + "PROXY_CHECK=false\n").write(toFile: dir + "/proxy.conf", atomically: true, encoding: .utf8)
        let refused = try OpsTest.run([Self.contrib + "/proxy-upstream.sh"], env: env(["HAMGR_PROXY_CONF": dir + "/proxy.conf", "HAMGR_SERVICE_ADDRESS": "10.9.9.9:10809", "HAMGR_EPOCH": "9"]))
        XCTAssertEqual(refused.status, 1)
        XCTAssertEqual(try String(contentsOfFile: file, encoding: .utf8), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/reloaded"))
    }
}
