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
