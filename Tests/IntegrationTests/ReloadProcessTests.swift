import Foundation
import XCTest

/// `systemctl reload` is SIGHUP (issue 12): the real node re-reads its config, applies the
/// log level, the resource list, hooks, the resync rate and the export allow-list at once,
/// names every other changed key as needing a restart, and never exits.
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
        XCTAssertEqual(log.components(separatedBy: "reload: timeouts.renew_interval_ms changed; needs a restart (not applied)").count - 1, 2,
                       "refused by key, and again at the next reload: it is still not in force\n\(log)")
        XCTAssertFalse(log.contains("reload: node["), "only what changed is named")
        XCTAssertFalse(log.contains("reload: timeouts.lease_ms"), "only what changed is named")
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

    /// The resource list, hooks, resync rate and allow-list apply live on both nodes; a new
    /// resource starts on the master only; a changed timeout is refused by key; a removed
    /// resource is stopped; the new list follows a switchover. Nobody restarts.
    func testSighupAppliesTheResourceListLiveAndRefusesATimeoutByKey() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/lib/ocf/resource.d/heartbeat/Dummy") else {
            throw XCTSkip("resource-agents is not installed")
        }
        let one = """
            [[resource]]
            name = "first"
            agent = "ocf:heartbeat:Dummy"
            monitor_interval_ms = 300

            """
        let h = try ClusterHarness(name: "reloadrsc", subnet: 92, extraTOML: one)
        defer { h.shutdown() }
        func stateFile(_ n: String, _ r: String) -> String { h.dir.appendingPathComponent("\(n)-rsc/Dummy-\(r).state").path }
        func running(_ n: String, _ r: String) -> Bool { FileManager.default.fileExists(atPath: stateFile(n, r)) }
        for n in ["a", "b"] {
            try FileManager.default.createDirectory(atPath: h.dir.appendingPathComponent("\(n)-rsc").path, withIntermediateDirectories: true)
        }
        try h.startArbitrator()
        for n in ["a", "b"] { try h.startNode(n, env: ["HA_RSCTMP": h.dir.appendingPathComponent("\(n)-rsc").path]) }
        let (master, backup) = try h.startedCluster(startProcesses: false)
        XCTAssertTrue(waitUntil(10) { running(master, "first") }, h.tail(master))
        let hookLog = h.dir.appendingPathComponent("hooks.log").path
        let hook = h.dir.appendingPathComponent("hook.sh").path
        try "#!/bin/sh\necho \"$HAMGR_HOOK $HAMGR_NODE\" >> \(hookLog)\n".write(toFile: hook, atomically: true, encoding: .utf8)
        chmod(hook, 0o755)

        func fullLog(_ n: String) -> String { (try? String(contentsOfFile: h.log(n), encoding: .utf8)) ?? "" }
        func reload(_ toml: String, round: Int) {
            try? toml.write(toFile: h.configPath, atomically: true, encoding: .utf8)
            for n in [master, backup] {
                h.signal(n, SIGHUP)
                XCTAssertTrue(waitUntil(20) { fullLog(n).components(separatedBy: "reload done").count - 1 >= round },
                              "no reload done on \(n)\n\(h.tail(n))")
                XCTAssertTrue(h.isRunning(n), "SIGHUP must not end the process\n\(h.tail(n))")
            }
        }

        // Added: a second resource; hooks; a resync rate; an allow-list; a lease (refused).
        let base = try String(contentsOfFile: h.configPath, encoding: .utf8)
        let two = base + """

            [[resource]]
            name = "second"
            agent = "ocf:heartbeat:Dummy"
            monitor_interval_ms = 300

            [hooks]
            on_demote = "\(hook)"
            on_promote = "\(hook)"

            [timeouts]
            lease_ms = 1500

            [export]
            allow = ["127.0.0.0/8"]

            """
        let withRate = two.replacingOccurrences(of: "chunk_size = \"64KiB\"", with: "chunk_size = \"64KiB\"\nresync_rate = \"50MiB\"")
        XCTAssertNotEqual(withRate, two, "the harness's [volume] has chunk_size")
        reload(withRate, round: 1)
        XCTAssertTrue(waitUntil(10) { running(master, "second") }, "the added resource starts on the master\n\(h.tail(master))")
        XCTAssertTrue(running(master, "first"), "the unchanged one keeps running")
        XCTAssertFalse(running(backup, "second"), "and only there")
        let log = fullLog(master)
        for line in ["reload: resource second: added; started", "reload: timeouts.lease_ms changed; needs a restart (not applied)",
                     "reload: hooks applied", "reload: volume.resync_rate 50 MiB/s applied", "reload: export.allow applied to new connections (127.0.0.0/8)"] {
            XCTAssertTrue(log.contains(line), "missing \(line)\n\(log)")
        }
        XCTAssertFalse(log.contains("resource first: "), "the unchanged prefix is not touched\n\(log)")
        XCTAssertTrue(fullLog(backup).contains("reload: resource second: added (starts with the next promotion)"), h.tail(backup))
        h.waitFor(master, "both resources shown", within: 5) { s in
            (s["resources"] as? [[String: Any]])?.compactMap { $0["name"] as? String } == ["first", "second"]
        }
        // The export still answers clients from the allowed network.
        XCTAssertEqual(try shell(["nbdinfo", "--size", h.node(master).nbdURI], timeout: 20).status, 0)

        // Removed: the first resource stops (and the second, after it, restarts in order).
        reload(withRate.replacingOccurrences(of: one, with: ""), round: 2)
        XCTAssertTrue(waitUntil(10) { !running(master, "first") }, "the removed resource stops\n\(h.tail(master))")
        XCTAssertTrue(waitUntil(10) { running(master, "second") }, h.tail(master))
        XCTAssertEqual(fullLog(master).components(separatedBy: "reload: timeouts.lease_ms changed").count - 1, 2,
                       "still refused: the lease in force is the old one")

        // The new list and hooks follow the master role.
        let sw = try h.admin(master, "switchover")
        XCTAssertEqual(sw.code, 200, sw.body)
        XCTAssertNotNil(h.waitForRole(backup, "primary", within: 20))
        XCTAssertTrue(waitUntil(10) { running(backup, "second") && !running(master, "second") }, h.tail(backup))
        XCTAssertFalse(running(backup, "first"))
        XCTAssertTrue(waitUntil(10) { hookLines(hookLog).contains("on_promote \(backup)") && hookLines(hookLog).contains("on_demote \(master)") },
                      "the reloaded hooks run: \(hookLines(hookLog))")
        XCTAssertTrue(h.isRunning(master) && h.isRunning(backup))

        // A hook that is not executable here is refused (the hooks in force stay), as
        // `hamgr check --node` would refuse it at start.
        let current = try String(contentsOfFile: h.configPath, encoding: .utf8)
        reload(current.replacingOccurrences(of: "on_demote = \"\(hook)\"", with: "on_demote = \"\(h.dir.path)/missing-hook\""), round: 3)
        XCTAssertTrue(fullLog(backup).contains("reload: hooks not applied: hooks.on_demote: \(h.dir.path)/missing-hook is not an executable file"),
                      fullLog(backup))
        XCTAssertTrue(h.isRunning(master) && h.isRunning(backup))
    }
}
