import Foundation
import HACore
import HAShell
import XCTest

final class MetricsTests: XCTestCase {
    func testExpositionTextIsExact() {
        let r = MetricsRegistry()
        r.counter("hamgr_failovers", help: "Promotions.", labels: ["kind": "switchover"]).increment()
        r.counter("hamgr_failovers_total", help: "Promotions.", labels: ["kind": "switchover"]).increment(by: 2)
        r.gauge("hamgr_epoch", help: "Current epoch.").set(7)
        let h = r.histogram("hamgr_write_latency_seconds", help: "Write latency.", buckets: [0.25, 1, 4])
        h.observe(0.125)
        h.observe(0.5)
        h.observe(0.5)
        h.observe(8)
        XCTAssertEqual(r.render(), """
        # HELP hamgr_epoch Current epoch.
        # TYPE hamgr_epoch gauge
        hamgr_epoch 7
        # HELP hamgr_failovers_total Promotions.
        # TYPE hamgr_failovers_total counter
        hamgr_failovers_total{kind="switchover"} 3
        # HELP hamgr_write_latency_seconds Write latency.
        # TYPE hamgr_write_latency_seconds histogram
        hamgr_write_latency_seconds_bucket{le="0.25"} 1
        hamgr_write_latency_seconds_bucket{le="1"} 3
        hamgr_write_latency_seconds_bucket{le="4"} 3
        hamgr_write_latency_seconds_bucket{le="+Inf"} 4
        hamgr_write_latency_seconds_sum 9.125
        hamgr_write_latency_seconds_count 4

        """)
    }

    func testLabelValuesAndHelpAreEscaped() {
        let r = MetricsRegistry()
        r.gauge("hamgr_x", help: "a \\ b\nc", labels: ["path": "C:\\dir \"q\"\nnext"]).set(1.5)
        XCTAssertEqual(r.render(), """
        # HELP hamgr_x a \\\\ b\\nc
        # TYPE hamgr_x gauge
        hamgr_x{path="C:\\\\dir \\"q\\"\\nnext"} 1.5

        """)
    }

    func testSpecialFloats() {
        XCTAssertEqual(MetricsRegistry.format(.infinity), "+Inf")
        XCTAssertEqual(MetricsRegistry.format(-.infinity), "-Inf")
        XCTAssertEqual(MetricsRegistry.format(.nan), "NaN")
        XCTAssertEqual(MetricsRegistry.format(42), "42")
        XCTAssertEqual(MetricsRegistry.format(0.25), "0.25")
    }

    func testSameNameAndLabelsIsTheSameSeries() {
        let r = MetricsRegistry()
        let a = r.gauge("hamgr_peer_up", help: "h")
        let b = r.gauge("hamgr_peer_up", help: "h")
        a.set(1)
        XCTAssertEqual(b.value, 1)
        XCTAssertFalse(MetricsRegistry.isValidMetricName("9bad"))
        XCTAssertFalse(MetricsRegistry.isValidLabelName("__reserved"))
        XCTAssertTrue(MetricsRegistry.isValidMetricName("hamgr_ok:sub"))
    }

    func testConcurrentUpdatesAreNotLost() {
        let r = MetricsRegistry()
        let c = r.counter("hamgr_ops", help: "h")
        let h = r.histogram("hamgr_lat_seconds", help: "h")
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            for _ in 0..<10_000 {
                c.increment()
                h.observe(0.002)
                r.counter("hamgr_by_worker", help: "h", labels: ["w": String(i % 2)]).increment()
            }
        }
        XCTAssertEqual(c.value, 80_000)
        XCTAssertTrue(r.render().contains("hamgr_lat_seconds_count 80000\n"))
        XCTAssertTrue(r.render().contains("hamgr_by_worker_total{w=\"0\"} 40000\n"))
    }

    /// The real linter: `promtool check metrics` exits 0 only on clean exposition text
    /// (1 on parse errors, 3 on lint problems such as a counter without `_total`).
    func testNodeMetricsPassPromtool() throws {
        guard let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw XCTSkip("promtool is not installed (apt-get install prometheus)")
        }
        let m = NodeMetrics()
        m.epoch.set(3)
        m.quorum.set(true)
        m.setRole(.primary)
        m.setDiskState(.upToDate)
        m.writeLatencySeconds.observe(.microseconds(800))
        m.nbdRequest(op: "write", result: "ok")
        m.nbdRequest(op: "read", result: "EIO")
        m.failover(kind: "switchover")
        m.resourceUp("fs", true)
        m.resourceRestarted("fs")
        m.hookRun("on_promote", result: "ok")
        m.registry.gauge("hamgr_odd_label", help: "escaping \"check\"", labels: ["v": "a\"b\\c\nd"]).set(1)
        let text = m.registry.render()
        XCTAssertEqual(try runPromtool(promtool, text), 0, text)

        // The arbitrator's exposition is checked with promtool against a real process
        // (IntegrationTests/OperationsProcessTests).

        // And the linter does catch what we promise to avoid: the test can fail.
        XCTAssertNotEqual(try runPromtool(promtool, "# TYPE bad counter\nbad 1\n"), 0)
    }

    /// Counters whose label values are known when the daemon starts exist at 0 before their
    /// first event, so `increase()` counts that event.
    func testKnownLabelSetsExistAtZero() {
        let m = NodeMetrics(cluster: "prod", node: "alpha")
        m.precreate(resources: ["fs"], hooks: ["on_promote", "on_demote"])
        let text = m.registry.render()
        for line in [
            "hamgr_build_info{cluster=\"prod\",node=\"alpha\",version=\"\(hamgrVersion)\"} 1",
            "hamgr_failovers_total{kind=\"failover\"} 0",
            "hamgr_failovers_total{kind=\"switchover\"} 0",
            "hamgr_failovers_total{kind=\"forced\"} 0",
            "hamgr_nbd_requests_total{op=\"write\",result=\"ok\"} 0",
            "hamgr_nbd_requests_total{op=\"read\",result=\"EIO\"} 0",
            "hamgr_nbd_requests_total{op=\"flush\",result=\"ENOSPC\"} 0",
            "hamgr_hook_runs_total{hook=\"on_promote\",result=\"failed\"} 0",
            "hamgr_hook_runs_total{hook=\"on_demote\",result=\"timeout\"} 0",
            "hamgr_resource_restarts_total{resource=\"fs\"} 0",
            "hamgr_resource_up{resource=\"fs\"} 0",
            "hamgr_role{role=\"primary\"} 0",
            "hamgr_disk_state{state=\"outdated\"} 0",
            "hamgr_replication_sent_bytes_total 0",
            "hamgr_replication_received_bytes_total 0",
            "hamgr_resync_sent_bytes_total 0",
            "hamgr_nbd_read_bytes_total 0",
            "hamgr_nbd_written_bytes_total 0",
            "hamgr_nbd_connections 0",
            "hamgr_nbd_in_flight_requests 0",
            "hamgr_nbd_in_flight_bytes 0",
            "hamgr_nbd_connections_accepted_total 0",
            "hamgr_watchdog_misses_total 0",
        ] {
            XCTAssertTrue(text.contains("\n" + line + "\n"), "missing \(line) in\n\(text)")
        }
        XCTAssertEqual(text.components(separatedBy: "\nhamgr_nbd_requests_total{").count - 1,
                       NodeMetrics.nbdOperations.count * NodeMetrics.nbdResults.count)
        // The first event is then an increase from 0 on the same series.
        m.failover(kind: "forced")
        XCTAssertTrue(m.registry.render().contains("\nhamgr_failovers_total{kind=\"forced\"} 1\n"))
        // Without an identity (tests, tools), no empty labels.
        XCTAssertTrue(NodeMetrics().registry.render().contains("\nhamgr_build_info{version=\"\(hamgrVersion)\"} 1\n"))
    }

    /// The standard process metrics, read from /proc at scrape time, with plausible values.
    func testProcessMetricsArePlausible() throws {
        #if !os(Linux)
        throw XCTSkip("process metrics read /proc")
        #else
        let text = ProcessMetrics.render()
        func value(_ name: String) -> Double? {
            text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ")[1]) }
        }
        let s = try XCTUnwrap(ProcessMetrics.sample())
        XCTAssertGreaterThanOrEqual(s.cpuSeconds, 0)
        // CPU time counts work done here (clock ticks are 10 ms; spin for 200 ms of wall time).
        let spinEnd = Date().addingTimeInterval(0.2)
        var spins = 0
        while Date() < spinEnd { spins &+= 1 }
        XCTAssertGreaterThan(try XCTUnwrap(ProcessMetrics.sample()).cpuSeconds, s.cpuSeconds, "after \(spins) spins")
        XCTAssertGreaterThan(s.residentBytes, 1_048_576)
        XCTAssertGreaterThanOrEqual(s.virtualBytes, s.residentBytes)
        XCTAssertGreaterThanOrEqual(s.openFDs, 3)  // stdin, stdout, stderr at least
        XCTAssertGreaterThan(s.maxFDs, s.openFDs)
        let now = Date().timeIntervalSince1970
        XCTAssertGreaterThan(s.startTimeSeconds, now - 86_400)  // this test process started today
        XCTAssertLessThanOrEqual(s.startTimeSeconds, now + 1)
        // The same figures in the text, each family typed.
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                     "process_open_fds", "process_max_fds", "process_start_time_seconds"] {
            XCTAssertNotNil(value(name), "\(name) in\n\(text)")
            XCTAssertTrue(text.contains("# TYPE \(name) "), name)
        }
        // A descriptor opened here shows up in the next sample.
        let before = try XCTUnwrap(ProcessMetrics.sample()).openFDs
        let fd = open("/dev/null", O_RDONLY)
        defer { close(fd) }
        XCTAssertEqual(try XCTUnwrap(ProcessMetrics.sample()).openFDs, before + 1)
        if let promtool = Self.promtoolPath {
            XCTAssertEqual(try runPromtool(promtool, text + NodeMetrics().registry.render()), 0, text)
        }
        #endif
    }

    static var promtoolPath: String? {
        ["/usr/bin/promtool", "/usr/local/bin/promtool"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// contrib/prometheus/hamgr.rules.yml is valid and its unit tests (every alert firing and
    /// not firing) pass: `promtool check rules`, `promtool test rules`.
    func testAlertRulesPassPromtool() throws {
        guard let promtool = Self.promtoolPath else { throw XCTSkip("promtool is not installed (apt-get install prometheus)") }
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("contrib/prometheus")
        let check = try runPromtool(promtool, arguments: ["check", "rules", dir.appendingPathComponent("hamgr.rules.yml").path])
        XCTAssertEqual(check.status, 0, check.output)
        XCTAssertTrue(check.output.contains("SUCCESS: 10 rules found"), check.output)
        let test = try runPromtool(promtool, arguments: ["test", "rules", dir.appendingPathComponent("hamgr.rules.test.yml").path])
        XCTAssertEqual(test.status, 0, test.output)
        // Every alert the rules define is named by the tests.
        let rules = try String(contentsOf: dir.appendingPathComponent("hamgr.rules.yml"), encoding: .utf8)
        let tests = try String(contentsOf: dir.appendingPathComponent("hamgr.rules.test.yml"), encoding: .utf8)
        let alerts = rules.split(separator: "\n").compactMap { line -> String? in
            let t = line.trimmingCharacters(in: .whitespaces)
            return t.hasPrefix("- alert: ") ? String(t.dropFirst("- alert: ".count)) : nil
        }
        XCTAssertEqual(alerts.count, 10)
        for a in alerts { XCTAssertTrue(tests.contains("alertname: \(a)\n"), "\(a) has no test") }
    }

    private func runPromtool(_ path: String, arguments: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        let output = Pipe()
        p.standardOutput = output
        p.standardError = output
        try p.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    private func runPromtool(_ path: String, _ text: String) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = ["check", "metrics"]
        let input = Pipe(), output = Pipe()
        p.standardInput = input
        p.standardOutput = output
        p.standardError = output
        try p.run()
        input.fileHandleForWriting.write(Data(text.utf8))
        try input.fileHandleForWriting.close()
        _ = output.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return p.terminationStatus
    }
}
