import Foundation
import XCTest

/// Issue 4 acceptance 1, 2 and 8 against real processes.
final class OperationsProcessTests: XCTestCase {
    private func scrape(_ address: String) throws -> String {
        try shell(["curl", "-sf", "--max-time", "3", "http://\(address)/metrics"]).stdout
    }

    private func promtool(_ text: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try shell(["promtool", "check", "metrics"], timeout: 30, stdin: text)
        XCTAssertEqual(r.status, 0, "promtool on \(what): \(r.stdout)\(r.stderr)", file: file, line: line)
    }

    private func value(_ text: String, _ series: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
    }

    /// 1. /metrics of master, backup and arbitrator pass promtool; values follow a failover.
    func testMetricsPassPromtoolAndFollowAFailover() throws {
        guard (try? shell(["which", "promtool"]))?.status == 0 else { throw XCTSkip("promtool is not installed") }
        let h = try ClusterHarness(name: "metrics", subnet: 43)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        XCTAssertNotNil(firstAcknowledgedWrite(uri: h.node(master).nbdURI, within: 5))
        let w = "\(h.arbitratorIP):\(h.arbitratorStatusPort)"
        let before = (m: try scrape(h.node(master).statusAddress), b: try scrape(h.node(backup).statusAddress), w: try scrape(w))
        try promtool(before.m, "master"); try promtool(before.b, "backup"); try promtool(before.w, "arbitrator")
        XCTAssertEqual(value(before.m, "hamgr_role{role=\"primary\"}"), 1)
        XCTAssertEqual(value(before.b, "hamgr_role{role=\"secondary\"}"), 1)
        XCTAssertEqual(value(before.m, "hamgr_nbd_requests_total{op=\"write\",result=\"ok\"}").map { $0 >= 1 }, true, before.m)
        XCTAssertNotNil(value(before.m, "hamgr_write_latency_seconds_count"))
        XCTAssertEqual(value(before.w, "hamgr_arbitrator_lease_valid{cluster=\"metrics\"}"), 1)
        let failoversBefore = value(before.b, "hamgr_failovers_total{kind=\"failover\"}") ?? 0

        // Identity without relabelling: cluster and node on the nodes, node="arbitrator" alone there.
        for (text, node) in [(before.m, master), (before.b, backup)] {
            XCTAssertTrue(text.contains("\nhamgr_build_info{cluster=\"metrics\",node=\"\(node)\",version="), text)
        }
        XCTAssertTrue(before.w.contains("\nhamgr_build_info{node=\"arbitrator\",version="), before.w)
        // Known label sets exist at 0 before their first event.
        XCTAssertEqual(value(before.b, "hamgr_failovers_total{kind=\"forced\"}"), 0, before.b)
        XCTAssertEqual(value(before.m, "hamgr_nbd_requests_total{op=\"trim\",result=\"EIO\"}"), 0, before.m)
        XCTAssertEqual(value(before.m, "hamgr_hook_runs_total{hook=\"on_demote\",result=\"failed\"}"), 0, before.m)
        // process_* on every daemon, plausible.
        for (text, what) in [(before.m, "master"), (before.b, "backup"), (before.w, "arbitrator")] {
            XCTAssertGreaterThan(value(text, "process_resident_memory_bytes") ?? 0, 1_048_576, what)
            XCTAssertGreaterThan(value(text, "process_open_fds") ?? 0, 3, what)
            XCTAssertGreaterThan(value(text, "process_max_fds") ?? 0, value(text, "process_open_fds") ?? .infinity, what)
            XCTAssertGreaterThanOrEqual(value(text, "process_cpu_seconds_total") ?? -1, 0, what)
            let start = value(text, "process_start_time_seconds") ?? 0
            XCTAssertLessThan(abs(Date().timeIntervalSince1970 - start), 600, what)
        }
        // Link bytes: the master sends what it writes (4 KiB writes plus framing), the backup
        // receives it; NBD bytes and connections are exported.
        let sentBefore = try XCTUnwrap(value(before.m, "hamgr_replication_sent_bytes_total"), before.m)
        XCTAssertGreaterThan(sentBefore, 4096)
        XCTAssertGreaterThan(value(before.b, "hamgr_replication_received_bytes_total") ?? 0, 4096, before.b)
        XCTAssertGreaterThanOrEqual(value(before.m, "hamgr_nbd_written_bytes_total") ?? 0, 4096, before.m)
        XCTAssertNotNil(value(before.m, "hamgr_nbd_connections"), before.m)
        // No client is waiting for a reply between the workload and the scrape.
        XCTAssertEqual(value(before.m, "hamgr_nbd_in_flight_requests"), 0, before.m)
        XCTAssertEqual(value(before.m, "hamgr_nbd_in_flight_bytes"), 0, before.m)
        let writes = try shell(["qemu-io", "-f", "raw", "-c", "write -P 9 1M 1M", h.node(master).nbdURI], timeout: 30)
        XCTAssertEqual(writes.status, 0, writes.stdout + writes.stderr)
        let later = (m: try scrape(h.node(master).statusAddress), b: try scrape(h.node(backup).statusAddress))
        try promtool(later.m, "master after writes")
        XCTAssertGreaterThan(value(later.m, "hamgr_replication_sent_bytes_total") ?? 0, sentBefore + 1_048_576, later.m)
        XCTAssertGreaterThan(value(later.b, "hamgr_replication_received_bytes_total") ?? 0, 1_048_576, later.b)
        XCTAssertGreaterThanOrEqual(value(later.m, "hamgr_nbd_written_bytes_total") ?? 0, 1_048_576 + 4096, later.m)
        XCTAssertGreaterThan(value(later.m, "hamgr_nbd_connections_accepted_total") ?? 0, 1, later.m)

        h.kill9(master)
        h.waitForRole(backup, "primary", within: 15)
        XCTAssertNotNil(firstAcknowledgedWrite(uri: h.node(backup).nbdURI, within: 5))
        let after = try scrape(h.node(backup).statusAddress)
        try promtool(after, "new master")
        XCTAssertEqual(value(after, "hamgr_role{role=\"primary\"}"), 1)
        XCTAssertEqual(value(after, "hamgr_failovers_total{kind=\"failover\"}"), failoversBefore + 1, after)
        XCTAssertEqual(value(after, "hamgr_peer_up"), 0)
        XCTAssertGreaterThan(value(after, "hamgr_epoch") ?? 0, value(before.b, "hamgr_epoch") ?? 0)
    }

    /// 2. A real `hamgr run` talks to a NOTIFY_SOCKET: READY=1, STATUS=, WATCHDOG=1 (with
    /// WATCHDOG_USEC) and STOPPING=1 on SIGTERM.
    func testNodeNotifiesSystemd() throws {
        let h = try ClusterHarness(name: "notify", subnet: 44)
        defer { h.shutdown() }
        let path = h.dir.appendingPathComponent("notify.sock").path
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes.prefix(raw.count - 1))
        }
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        XCTAssertEqual(bound, 0, "bind: \(String(cString: strerror(errno)))")
        var tv = timeval(tv_sec: 0, tv_usec: 200_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))

        try h.startArbitrator()
        try h.startNode("b")
        try h.startNode("a", env: ["NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"])
        var messages: [String] = []
        func receive(for seconds: Double) {
            let end = Date().addingTimeInterval(seconds)
            var buf = [UInt8](repeating: 0, count: 4096)
            while Date() < end {
                let n = recv(fd, &buf, buf.count, 0)
                if n > 0 { messages.append(String(decoding: buf[0..<n], as: UTF8.self)) }
            }
        }
        receive(for: 3)
        XCTAssertTrue(messages.contains { $0.contains("READY=1") }, "\(messages)")
        XCTAssertTrue(messages.contains { $0.contains("STATUS=") }, "\(messages)")
        XCTAssertGreaterThanOrEqual(messages.filter { $0.contains("WATCHDOG=1") }.count, 3, "watchdog pings at half of 400 ms: \(messages)")
        h.signal("a", SIGTERM)
        receive(for: 3)
        XCTAssertTrue(messages.contains { $0.contains("STOPPING=1") }, "\(messages.suffix(5))")
    }

    /// 8. `hactl demo` runs and leaves no process, file or mount behind.
    func testDemoRunsAndLeavesNothingBehind() throws {
        let start = Date()
        let r = try shell([ClusterHarness.hactl, "demo"], timeout: 180, env: ["HAMGR_BIN": ClusterHarness.hamgr])
        print("hactl demo took \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        XCTAssertTrue(r.stdout.contains("data intact"), r.stdout)
        XCTAssertTrue(r.stdout.contains("was promoted"), r.stdout)
        // TLS everywhere: hamgr certs made the certificates; NBD and status ran over TLS.
        XCTAssertTrue(r.stdout.contains("NBD, status and admin all run over TLS"), r.stdout)
        XCTAssertTrue(r.stdout.contains("over TLS (NBD_OPT_STARTTLS"), r.stdout)
        sleep(1)
        let ps = try shell(["pgrep", "-fa", "hamgr-demo-"]).stdout
        XCTAssertEqual(ps.trimmingCharacters(in: .whitespacesAndNewlines), "", "demo processes left behind")
        let left = try FileManager.default.contentsOfDirectory(atPath: NSTemporaryDirectory()).filter { $0.hasPrefix("hamgr-demo-") }
        let demoDir = r.stdout.split(separator: " ").first { $0.contains("hamgr-demo-") }.map(String.init)
        if let d = demoDir { XCTAssertFalse(FileManager.default.fileExists(atPath: d), "demo directory \(d) left behind (others: \(left))") }
        XCTAssertFalse(try shell(["mount"]).stdout.contains("hamgr-demo"), "demo mount left behind")
    }
}
