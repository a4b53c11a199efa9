import Foundation
import HAShell
@testable import HamgrKit
import Logging
import XCTest

/// The resource list against real agents: `ocf:heartbeat:Dummy` from the resource-agents
/// package, and `exec:` scripts that record what they were asked.
final class ResourceManagerTests: XCTestCase {
    var dir = ""
    var log: String { dir + "/actions.log" }
    let dummy = "/usr/lib/ocf/resource.d/heartbeat/Dummy"

    final class GiveUps: @unchecked Sendable {
        let lock = NSLock()
        var calls: [(String, String)] = []
        func add(_ r: String, _ why: String) { lock.lock(); calls.append((r, why)); lock.unlock() }
        var all: [(String, String)] { lock.lock(); defer { lock.unlock() }; return calls }
    }

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: dummy) else {
            throw XCTSkip("resource-agents is not installed (apt-get install resource-agents)")
        }
        dir = try OpsTest.scratchDirectory("resources")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private var logger: Logger { var l = Logger(label: "resources-test"); l.logLevel = .critical; return l }

    private func dummyResource(_ name: String, interval: Duration = .seconds(60), maxRestarts: Int = 3) -> ClusterConfig.Resource {
        .init(name: name, agent: .ocf(provider: "heartbeat", agent: "Dummy"), params: ["state": "\(dir)/\(name).state"],
              monitorInterval: interval, maxRestarts: maxRestarts, timeout: .seconds(10))
    }

    /// An exec: agent that logs "<instance> <action>" and keeps a state file; `monitorCode`
    /// and `startCode` override its answers.
    private func recorder(_ name: String, startCode: Int = 0, monitorCode: Int? = nil, startSleep: Int = 0,
                          interval: Duration = .seconds(60), maxRestarts: Int = 3, timeout: Duration = .seconds(10)) throws -> ClusterConfig.Resource {
        let script = "\(dir)/\(name).sh"
        try OpsTest.writeScript(script, """
        #!/bin/sh
        echo "$OCF_RESOURCE_INSTANCE $1 color=$OCF_RESKEY_color root=$OCF_ROOT interval=$OCF_RESKEY_CRM_meta_interval" >> \(log)
        state=\(dir)/\(name).state
        case "$1" in
          start) sleep \(startSleep); [ \(startCode) -eq 0 ] && touch $state; exit \(startCode) ;;
          stop) rm -f $state; exit 0 ;;
          monitor) \(monitorCode.map { "exit \($0)" } ?? "[ -f $state ] && exit 0 || exit 7") ;;
          *) exit 3 ;;
        esac
        """)
        return .init(name: name, agent: .exec(path: script), params: ["color": "blue"], monitorInterval: interval,
                     maxRestarts: maxRestarts, timeout: timeout)
    }

    private func actions() -> [String] {
        ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").map { String($0.split(separator: " ").prefix(2).joined(separator: " ")) }
    }

    private func exists(_ name: String) -> Bool { FileManager.default.fileExists(atPath: "\(dir)/\(name).state") }

    private func waitUntil(_ seconds: Double, _ cond: () async -> Bool) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if await cond() { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return await cond()
    }

    func testStartInOrderStopInReverse() async throws {
        let m = ResourceManager(resources: [dummyResource("d1"), try recorder("r2"), dummyResource("d3")], logger: logger) { _, _ in }
        let before = await m.probeAll()
        XCTAssertEqual(before["d1"]?.status, .notRunning)
        try await m.startAll()
        XCTAssertTrue(exists("d1") && exists("r2") && exists("d3"))
        let running = await m.snapshot().map(\.state)
        XCTAssertEqual(running, ["running", "running", "running"])
        let probe = await m.probeAll()
        XCTAssertEqual(probe["d3"]?.ok, true)
        try await m.stopAll()
        XCTAssertFalse(exists("d1") || exists("r2") || exists("d3"))
        let stopped = await m.snapshot().map(\.state)
        XCTAssertEqual(stopped, ["stopped", "stopped", "stopped"])
        XCTAssertEqual(actions(), ["r2 monitor", "r2 start", "r2 monitor", "r2 stop"])
        let line = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n")[1]
        XCTAssertEqual(line, "r2 start color=blue root=/usr/lib/ocf interval=0", "OCF environment and OCF_RESKEY_<param>")
        let probeLine = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n")[0]
        XCTAssertEqual(probeLine, "r2 monitor color=blue root=/usr/lib/ocf interval=0", "a probe is a monitor with interval 0")
    }

    func testOrderAcrossAgentsIsTheConfigOrder() async throws {
        let m = ResourceManager(resources: [try recorder("a1"), try recorder("a2"), try recorder("a3")], logger: logger) { _, _ in }
        try await m.startAll()
        try await m.stopAll()
        XCTAssertEqual(actions(), ["a1 start", "a2 start", "a3 start", "a3 stop", "a2 stop", "a1 stop"])
    }

    func testMonitorFailureRestartsTheDummy() async throws {
        let giveUps = GiveUps()
        let metrics = NodeMetrics()
        let m = ResourceManager(resources: [dummyResource("d1", interval: .milliseconds(200))], logger: logger, metrics: metrics) { giveUps.add($0, $1) }
        try await m.startAll()
        XCTAssertTrue(exists("d1"))
        try FileManager.default.removeItem(atPath: "\(dir)/d1.state")   // the "service" died
        // The agent's state file appears before its start returns: wait for the state too.
        let restarted = await waitUntil(5) { await m.snapshot().first.map { $0.restarts == 1 && $0.state == "running" } == true && self.exists("d1") }
        let snap = await m.snapshot()
        XCTAssertTrue(restarted, "the monitor notices and restarts: \(snap)")
        XCTAssertEqual(snap.first?.state, "running")
        XCTAssertTrue(metrics.registry.render().contains("hamgr_resource_restarts_total{resource=\"d1\"} 1"))
        XCTAssertTrue(giveUps.all.isEmpty)
        try await m.stopAll()
        XCTAssertFalse(exists("d1"))
    }

    /// A resource restarted after a failed monitor takes the running ones after it along
    /// (they may sit on it: a filesystem on an attached device), in stop and start order.
    func testRestartAfterAFailedMonitorRestartsThoseAfterIt() async throws {
        let m = ResourceManager(resources: [try recorder("dev", interval: .milliseconds(100)), try recorder("fs"), try recorder("web")],
                                logger: logger) { _, _ in }
        try await m.startAll()
        try FileManager.default.removeItem(atPath: log)
        try FileManager.default.removeItem(atPath: "\(dir)/dev.state")
        let back = await waitUntil(5) { self.actions().filter { $0.hasSuffix("start") }.count == 3 }
        XCTAssertTrue(back, "\(actions())")
        XCTAssertEqual(actions().filter { !$0.hasSuffix("monitor") }, ["web stop", "fs stop", "dev stop", "dev start", "fs start", "web start"])
        let snap = await m.snapshot()
        XCTAssertEqual(snap.map(\.state), ["running", "running", "running"])
        XCTAssertEqual(snap.map(\.restarts), [1, 0, 0], "only the failed one counts")
        try await m.stopAll()
    }

    func testRepeatedFailureGivesUpOnce() async throws {
        let giveUps = GiveUps()
        let r = try recorder("flaky", monitorCode: 7, interval: .milliseconds(100), maxRestarts: 2)
        let m = ResourceManager(resources: [dummyResource("d1"), r], logger: logger) { giveUps.add($0, $1) }
        try await m.startAll()
        let gaveUp = await waitUntil(10) { !giveUps.all.isEmpty }
        XCTAssertTrue(gaveUp)
        try await Task.sleep(for: .milliseconds(500))
        XCTAssertEqual(giveUps.all.count, 1, "give up once, then stop monitoring")
        XCTAssertEqual(giveUps.all.first?.0, "flaky")
        XCTAssertTrue(giveUps.all.first?.1.contains("after 2 restart(s)") ?? false, giveUps.all.first?.1 ?? "")
        let snap = await m.snapshot()
        XCTAssertEqual(snap[1].state, "failed")
        XCTAssertEqual(snap[1].restarts, 2)
        XCTAssertEqual(actions().filter { $0 == "flaky start" }.count, 3, "first start plus two restarts")
        let monitorLine = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").first { $0.hasPrefix("flaky monitor") }
        XCTAssertEqual(monitorLine.map(String.init), "flaky monitor color=blue root=/usr/lib/ocf interval=100", "recurring monitors carry their interval")
        try await m.stopAll()
        XCTAssertFalse(exists("d1"))
    }

    func testHeldRestartsDoNotAct() async throws {
        let giveUps = GiveUps()
        let m = ResourceManager(resources: [try recorder("r", monitorCode: 7, interval: .milliseconds(100), maxRestarts: 0)], logger: logger) { giveUps.add($0, $1) }
        await m.holdRestarts(true)
        try await m.startAll()
        try await Task.sleep(for: .milliseconds(600))
        XCTAssertTrue(giveUps.all.isEmpty)
        XCTAssertEqual(actions().filter { $0 == "r start" }.count, 1)
        let held = await m.snapshot()
        XCTAssertEqual(held.first?.state, "failed", "the failure still shows")
        await m.holdRestarts(false)
        let gaveUp = await waitUntil(5) { !giveUps.all.isEmpty }
        XCTAssertTrue(gaveUp)
        try await m.stopAll()
    }

    func testFailedStartRollsBackTheEarlierOnes() async throws {
        let m = ResourceManager(resources: [dummyResource("d1"), try recorder("r2"), try recorder("bad", startCode: 6)], logger: logger) { _, _ in }
        do {
            try await m.startAll()
            XCTFail("start must fail")
        } catch let e as ResourceManager.ResourceError {
            XCTAssertEqual(e.resource, "bad")
            XCTAssertTrue(e.description.contains("errConfigured (rc 6)"), e.description)
        }
        XCTAssertFalse(exists("d1") || exists("r2"), "started resources are stopped again")
        XCTAssertEqual(actions(), ["r2 start", "bad start", "r2 stop"])
    }

    func testSlowAgentTimesOut() async throws {
        let m = ResourceManager(resources: [try recorder("slow", startSleep: 30, timeout: .milliseconds(300))], logger: logger) { _, _ in }
        let start = Date()
        do {
            try await m.startAll()
            XCTFail("start must time out")
        } catch {
            XCTAssertTrue("\(error)".contains("timed out"), "\(error)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 5, "the agent and its sleep are killed")
    }

    /// A reload's list (docs/operator-guide.md, "Reload"): the unchanged prefix keeps
    /// running, a new timing applies in place, and from the first change on the old tail
    /// stops in reverse and the new tail starts in order.
    func testReconfigureKeepsThePrefixAndRestartsFromTheFirstChange() async throws {
        let m = ResourceManager(resources: [try recorder("a1"), try recorder("a2"), try recorder("a3")], logger: logger) { _, _ in }
        try await m.startAll()
        try FileManager.default.removeItem(atPath: log)
        var a1 = try recorder("a1")
        a1.monitorInterval = .seconds(30)             // timing only: no restart
        var a2 = try recorder("a2")
        a2.params["color"] = "red"                     // params: restarted, and a3 after it
        let lines = await m.reconfigure([a1, a2, try recorder("a3"), try recorder("a4")])
        XCTAssertEqual(actions(), ["a3 stop", "a2 stop", "a2 start", "a3 start", "a4 start"], "\(lines)")
        XCTAssertTrue(lines.contains { $0.hasPrefix("a4: added; started") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.hasPrefix("a1: monitor_interval_ms 30000") }, "\(lines)")
        XCTAssertTrue(try String(contentsOfFile: log, encoding: .utf8).contains("a2 start color=red"))
        let names = await m.snapshot().map(\.name)
        XCTAssertEqual(names, ["a1", "a2", "a3", "a4"])

        // Removing the last one stops only it.
        try FileManager.default.removeItem(atPath: log)
        let removed = await m.reconfigure([a1, a2, try recorder("a3")])
        XCTAssertEqual(actions(), ["a4 stop"], "\(removed)")
        XCTAssertFalse(exists("a4"))
        try await m.stopAll()
        XCTAssertFalse(exists("a1") || exists("a2") || exists("a3"))
    }

    /// Not master (never started, or stopped): a reload changes the list and runs nothing.
    func testReconfigureOnASecondaryRunsNothing() async throws {
        let m = ResourceManager(resources: [try recorder("a1")], logger: logger) { _, _ in }
        _ = await m.reconfigure([try recorder("a1"), try recorder("a2")])
        XCTAssertEqual(actions(), [])
        try await m.startAll()
        XCTAssertEqual(actions(), ["a1 start", "a2 start"], "the next promotion starts the new list")
        try await m.stopAll()
    }

    /// `hactl resource cleanup`: a resource whose monitor gave up is probed again, its
    /// restarts go back to 0, it is started (a managed master) and monitored again.
    func testCleanupResetsFailuresAndRestartsAGivenUpResource() async throws {
        let giveUps = GiveUps()
        let m = ResourceManager(resources: [dummyResource("d1", interval: .milliseconds(100), maxRestarts: 1)], logger: logger) { giveUps.add($0, $1) }
        try await m.startAll()
        try FileManager.default.removeItem(atPath: "\(dir)/d1.state")
        let restarted = await waitUntil(5) { await m.snapshot().first?.restarts == 1 && self.exists("d1") }
        XCTAssertTrue(restarted)
        try FileManager.default.removeItem(atPath: "\(dir)/d1.state")
        let gaveUp = await waitUntil(5) { !giveUps.all.isEmpty }
        XCTAssertTrue(gaveUp)
        let failed = await m.snapshot().first
        XCTAssertEqual(failed?.state, "failed")
        XCTAssertEqual(failed?.restarts, 1)

        do {
            _ = try await m.cleanup("nope")
            XCTFail("an unknown name is refused")
        } catch let e as ResourceManager.UnknownResource {
            XCTAssertTrue(e.description.contains("resources: d1"), e.description)
        }
        let lines = try await m.cleanup("d1")
        XCTAssertEqual(lines, ["d1: restarts 1 → 0, failed → stopped; started"])
        let clean = await m.snapshot().first
        XCTAssertEqual(clean?.state, "running")
        XCTAssertEqual(clean?.restarts, 0)
        XCTAssertTrue(exists("d1"))
        // Monitored again: a new failure is restarted (and counted) instead of ignored.
        try FileManager.default.removeItem(atPath: "\(dir)/d1.state")
        let again = await waitUntil(5) { await m.snapshot().first?.restarts == 1 && self.exists("d1") }
        XCTAssertTrue(again, "the monitor runs again after a cleanup")
        XCTAssertEqual(giveUps.all.count, 1)
        try await m.stopAll()
    }

    /// Held restarts (maintenance): cleanup resets the count and shows the probe's state,
    /// and starts nothing.
    func testCleanupUnderHeldRestartsStartsNothing() async throws {
        let m = ResourceManager(resources: [dummyResource("d1", interval: .milliseconds(100))], logger: logger) { _, _ in }
        try await m.startAll()
        await m.holdRestarts(true)
        try FileManager.default.removeItem(atPath: "\(dir)/d1.state")
        let shown = await waitUntil(5) { await m.snapshot().first?.state == "failed" }
        XCTAssertTrue(shown)
        let lines = try await m.cleanup(nil)
        XCTAssertEqual(lines, ["d1: restarts 0 → 0, failed → stopped"])
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertFalse(exists("d1"), "unmanaged: not started")
        try await m.stopAll()
    }

    /// No D-Bus here: systemd: resources fail, clearly, and nothing else is left running.
    func testSystemdUnitWithoutDBusFailsClearly() async throws {
        let unit = ClusterConfig.Resource(name: "web", agent: .systemd(unit: "nginx.service"))
        let m = ResourceManager(resources: [dummyResource("d1"), unit], logger: logger) { _, _ in }
        do {
            try await m.startAll()
            if FileManager.default.fileExists(atPath: "/run/dbus/system_bus_socket") {
                throw XCTSkip("a system D-Bus exists here; the failure path is not reachable")
            }
            XCTFail("systemd: must fail without D-Bus")
        } catch let e as ResourceManager.ResourceError {
            XCTAssertEqual(e.resource, "web")
            XCTAssertTrue(e.description.contains("needs the system D-Bus"), e.description)
        }
        XCTAssertFalse(exists("d1"))
        let probe = await m.probeAll()
        XCTAssertEqual(probe["web"]?.ok, false)
    }
}
