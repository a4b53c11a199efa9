import Foundation
import XCTest

/// `systemctl reload` is SIGHUP (issue 12): the real node re-reads its config, applies the
/// log level at once, names every section that needs a restart, and never exits.
final class ReloadProcessTests: XCTestCase {
    func testSighupAppliesTheLogLevelNamesWhatNeedsARestartAndNeverExits() throws {
        let h = try ClusterHarness(name: "reload", subnet: 93, extraTOML: "[log]\nlevel = \"error\"\n")
        defer { h.shutdown() }
        try h.startArbitrator()
        // No $HAMGR_LOG_LEVEL: the config's level is in force (the harness sets debug otherwise).
        try h.startNode("a", env: ["HAMGR_LOG_LEVEL": ""])
        let status = "\(h.node("a").statusAddress)"
        func refusedAdmin() throws -> String {
            try shell(["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                       "-H", "Authorization: Bearer not-the-token", "http://\(status)/admin/maintenance"], timeout: 10).stdout
        }
        var code = ""
        for _ in 0..<100 {
            code = try refusedAdmin()
            if code == "401" || code == "403" { break }
            usleep(100_000)
        }
        XCTAssertTrue(code == "401" || code == "403", "the node answers: \(code)\n\(h.tail("a"))")
        usleep(200_000)
        XCTAssertFalse(h.tail("a", lines: 400).contains("admin request refused"), "a warning is below level error")

        // The level goes to notice (the reload's own lines are notices); a timeout changes
        // too, which needs a restart.
        var toml = try String(contentsOfFile: h.configPath, encoding: .utf8)
        toml = toml.replacingOccurrences(of: "level = \"error\"", with: "level = \"notice\"")
        toml += "\n[timeouts]\nrenew_interval_ms = 150\n"
        try toml.write(toFile: h.configPath, atomically: true, encoding: .utf8)
        for round in 1...2 {  // a second reload changes nothing new and still does not exit
            h.signal("a", SIGHUP)
            var log = ""
            for _ in 0..<50 {
                log = h.tail("a", lines: 400)
                if log.components(separatedBy: "reload done").count - 1 >= round { break }
                usleep(100_000)
            }
            XCTAssertEqual(log.components(separatedBy: "reload done").count - 1, round, log)
            XCTAssertTrue(h.isRunning("a"), "SIGHUP must not end the process\n\(log)")
        }
        let log = h.tail("a", lines: 400)
        XCTAssertEqual(log.components(separatedBy: "reload: log level error → notice").count - 1, 1, log)
        XCTAssertEqual(log.components(separatedBy: "reload: [timeouts] changed; it takes effect at the next restart").count - 1, 2, log)
        XCTAssertFalse(log.contains("reload: [[node]]"), "only what changed is named")
        _ = try refusedAdmin()
        var seen = false
        for _ in 0..<20 where !seen {
            seen = h.tail("a", lines: 400).contains("admin request refused")
            if !seen { usleep(100_000) }
        }
        XCTAssertTrue(seen, "after the reload the warning is logged\n\(h.tail("a"))")

        // A config that no longer parses is refused; the node keeps running on the old one.
        try "[cluster\n".write(toFile: h.configPath, atomically: true, encoding: .utf8)
        h.signal("a", SIGHUP)
        var refused = false
        for _ in 0..<50 where !refused {
            refused = h.tail("a", lines: 400).contains("reload refused")
            if !refused { usleep(100_000) }
        }
        XCTAssertTrue(refused, h.tail("a"))
        XCTAssertTrue(h.isRunning("a"))
        XCTAssertEqual(h.stop("a"), 0, "SIGTERM still ends it cleanly")
    }
}
