import Foundation
import XCTest

/// Issue 12, the arbitrator's status page in a real browser: a real arbitrator and two nodes,
/// headless Chromium loads `GET /?token=…` from the arbitrator's status listener, its DOM
/// names the cluster and its master, and its screenshot is kept for a human to look at.
final class ArbitratorPageProcessTests: XCTestCase {
    /// Where the screenshot goes: `$HAMGR_TEST_ARTIFACTS`, else `.build/test-artifacts` in the package.
    static var artifactsDirectory: URL {
        if let dir = ProcessInfo.processInfo.environment["HAMGR_TEST_ARTIFACTS"], !dir.isEmpty {
            return URL(fileURLWithPath: dir)
        }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/test-artifacts")
    }

    /// The browser, or nil. In CI (`CI=true`) a missing browser is a failure, not a skip:
    /// scripts/deps.sh installs it.
    static func chromium() throws -> String? {
        for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        if ProcessInfo.processInfo.environment["CI"] == "true" {
            XCTFail("chromium is not installed (scripts/deps.sh installs it); CI must run this test")
            return nil
        }
        throw XCTSkip("chromium is not installed (apt-get install chromium, or scripts/deps.sh)")
    }

    func testChromiumShowsTheClusterAndItsMaster() throws {
        guard let chromium = try Self.chromium() else { return }
        let h = try ClusterHarness(name: "page", subnet: 98, extraTOML: """
        [status]
        read_token_file = "read.token"

        """)
        defer { h.shutdown() }
        let readToken = "read-\(UInt64.random(in: 0...UInt64.max))"
        XCTAssertTrue(FileManager.default.createFile(atPath: h.dir.appendingPathComponent("read.token").path, contents: Data(readToken.utf8),
                                       attributes: [.posixPermissions: 0o600]))
        h.statusReadToken = readToken
        let (master, _) = try h.startedCluster()
        let base = "http://\(h.arbitratorIP):\(h.arbitratorStatusPort)"

        // The arbitrator's /status names the master with both nodes heard and nobody outdated
        // (a node may be marked outdated until the first sync is done): bounded wait.
        var cluster: [String: Any] = [:]
        let ready = h.waitFor("w", "the arbitrator sees master \(master), both nodes, no outdated mark", within: 20) { doc in
            cluster = (doc["clusters"] as? [[String: Any]])?.first ?? [:]
            return cluster["master"] as? String == master && (cluster["outdated"] as? [Any])?.isEmpty == true
                && (cluster["last_contact_ms"] as? [String: Any])?.values.allSatisfy({ $0 is NSNumber }) == true
        }
        XCTAssertTrue(ready, "arbitrator /status: \(cluster)\n\(h.tail("w"))")

        // Without the token the page is refused; the browser gets it as ?token=.
        XCTAssertEqual(try shell(["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", base + "/"], timeout: 10).stdout, "401")
        let url = base + "/?token=\(readToken)"
        let profile = h.dir.appendingPathComponent("chromium-profile").path
        // `timeout` signals chromium's whole process group (its zygote and renderers too);
        // shell()'s own limit is the backstop.
        func browser(_ args: [String], _ target: String) throws -> CommandResult {
            try shell(["timeout", "-k", "5", "60", chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                       "--disable-dev-shm-usage", "--user-data-dir=\(profile)"] + args + [target], timeout: 75, env: ["HOME": h.dir.path])
        }

        let dom = try browser(["--dump-dom"], url)
        XCTAssertEqual(dom.status, 0, "chromium --dump-dom: \(dom.stderr.suffix(2000))")
        XCTAssertTrue(dom.stdout.contains("data-cluster=\"page\""), dom.stdout)
        XCTAssertTrue(dom.stdout.contains("<td class=\"cluster\">page</td><td class=\"master\">\(master)</td>"), dom.stdout)
        XCTAssertTrue(dom.stdout.contains("data-state=\"healthy\""), "a started, synced pair is healthy:\n\(dom.stdout)")
        XCTAssertTrue(dom.stdout.contains("1 cluster(s)"), dom.stdout)
        XCTAssertFalse(dom.stdout.contains("needs the read token"), dom.stdout)

        try FileManager.default.createDirectory(at: Self.artifactsDirectory, withIntermediateDirectories: true)
        let png = Self.artifactsDirectory.appendingPathComponent("arbitrator-page.png").path
        try? FileManager.default.removeItem(atPath: png)
        let shot = try browser(["--screenshot=\(png)", "--window-size=1200,800", "--hide-scrollbars"], url)
        XCTAssertEqual(shot.status, 0, "chromium --screenshot: \(shot.stderr.suffix(2000))")
        print("arbitrator page screenshot: \(png)")
        let bytes = try XCTUnwrap(FileManager.default.contents(atPath: png), "no screenshot at \(png)")
        XCTAssertEqual(Array(bytes.prefix(8)), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A], "not a PNG")
        // IHDR: width and height, big-endian, at bytes 16..<24.
        func be32(_ at: Int) -> Int { bytes[at..<at + 4].reduce(0) { $0 << 8 | Int($1) } }
        XCTAssertEqual(bytes.count >= 24 ? [be32(16), be32(20)] : [], [1200, 800])

        // Non-trivial: much larger than the same window with nothing on it (a blank page
        // compresses to a few KiB).
        let blankPNG = h.dir.appendingPathComponent("blank.png").path
        let blank = try browser(["--screenshot=\(blankPNG)", "--window-size=1200,800", "--hide-scrollbars"], "about:blank")
        XCTAssertEqual(blank.status, 0, String(blank.stderr.suffix(2000)))
        let blankBytes = FileManager.default.contents(atPath: blankPNG)?.count ?? 0
        XCTAssertGreaterThan(blankBytes, 0)
        XCTAssertGreaterThan(bytes.count, 3 * blankBytes, "the page's screenshot (\(bytes.count) bytes) looks blank (\(blankBytes) bytes empty)")
    }
}
