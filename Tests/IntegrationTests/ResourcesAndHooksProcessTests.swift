import Foundation
import XCTest

/// Issue 4 acceptance 3 and 4 with real processes: the real `ocf:heartbeat:Dummy` agent
/// from Debian's resource-agents runs as a resource of the master, and hooks announce
/// promotions and demotions with the documented environment.
final class ResourcesAndHooksProcessTests: XCTestCase {
    static let dummyAgent = "/usr/lib/ocf/resource.d/heartbeat/Dummy"

    /// A cluster whose one resource is the real Dummy agent, each node with its own
    /// `HA_RSCTMP` (where the agent keeps its state file). `extraTOML` follows the resource.
    private func dummyCluster(name: String, subnet: Int, monitorMs: Int, maxRestarts: Int? = nil,
                              extraTOML: String = "") throws -> ClusterHarness {
        guard FileManager.default.isExecutableFile(atPath: Self.dummyAgent) else { throw XCTSkip("resource-agents is not installed") }
        let h = try ClusterHarness(name: name, subnet: subnet, extraTOML: """
            [[resource]]
            name = "dummy"
            agent = "ocf:heartbeat:Dummy"
            monitor_interval_ms = \(monitorMs)
            \(maxRestarts.map { "max_restarts = \($0)" } ?? "")

            \(extraTOML)
            """)
        for n in ["a", "b"] { try FileManager.default.createDirectory(atPath: rscDir(h, n), withIntermediateDirectories: true) }
        return h
    }

    private func rscDir(_ h: ClusterHarness, _ node: String) -> String { h.dir.appendingPathComponent("\(node)-rsc").path }
    /// The Dummy agent's state file on `node`: present while it runs there.
    private func stateFile(_ h: ClusterHarness, _ node: String) -> String { rscDir(h, node) + "/Dummy-dummy.state" }

    /// Arbitrator, then both nodes; returns (master, backup) once the cluster is up.
    private func start(_ h: ClusterHarness) throws -> (String, String) {
        try h.startArbitrator()
        for n in ["a", "b"] { try h.startNode(n, env: ["HA_RSCTMP": rscDir(h, n)]) }
        return try h.startedCluster(startProcesses: false)
    }

    /// Maintenance on the master (issue 12): its resources are unmanaged — one stopped by
    /// hand is neither restarted nor a reason to switch over — while it stays master; off
    /// again, the monitor restarts it.
    func testMaintenanceOnTheMasterUnmanagesItsResources() throws {
        let h = try dummyCluster(name: "maint", subnet: 95, monitorMs: 200, maxRestarts: 0)
        defer { h.shutdown() }
        func stateFile(_ n: String) -> String { self.stateFile(h, n) }
        let (master, _) = try start(h)
        XCTAssertTrue(waitUntil(10) { FileManager.default.fileExists(atPath: stateFile(master)) }, h.tail(master))

        let on = try h.admin(master, "maintenance", body: "{\"on\": true}")
        XCTAssertEqual(on.code, 200, on.body)
        h.waitFor(master, "maintenance shown", within: 5) { ($0["maintenance"] as? Bool) == true }
        // Stopped by hand: with max_restarts = 0 a managed resource would switch over at once.
        try FileManager.default.removeItem(atPath: stateFile(master))
        usleep(1_500_000)  // several monitor intervals
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile(master)), "restarted while unmanaged\n\(h.tail(master))")
        XCTAssertEqual(h.role(master), "primary", "a resource failure under maintenance must not move the master")
        // A cleanup while unmanaged shows the probe's answer and starts nothing.
        let cleanup = try h.admin(master, "resource_cleanup", body: "{\"resource\": \"dummy\"}")
        XCTAssertEqual(cleanup.code, 200, cleanup.body)
        XCTAssertTrue(cleanup.body.contains("→ stopped"), cleanup.body)
        XCTAssertFalse(cleanup.body.contains("started"), cleanup.body)
        usleep(600_000)
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile(master)), "cleanup started it while unmanaged\n\(h.tail(master))")
        XCTAssertEqual(h.role(master), "primary")

        let off = try h.admin(master, "maintenance", body: "{\"on\": false}")
        XCTAssertEqual(off.code, 200, off.body)
        // Managed again: the failure counts now (max_restarts = 0: the master switches over).
        let backup = master == "a" ? "b" : "a"
        XCTAssertNotNil(h.waitForRole(backup, "primary", within: 20), h.tail(master))
    }

    /// `hactl resource cleanup` (issue 12): the master's restart count of a resource goes back
    /// to 0 through the admin endpoint; an unknown name is refused naming the known ones.
    func testResourceCleanupResetsTheFailureCount() throws {
        let h = try dummyCluster(name: "cleanup", subnet: 96, monitorMs: 200, maxRestarts: 3)
        defer { h.shutdown() }
        func stateFile(_ n: String) -> String { self.stateFile(h, n) }
        let (master, backup) = try start(h)
        XCTAssertTrue(waitUntil(10) { FileManager.default.fileExists(atPath: stateFile(master)) }, h.tail(master))
        func dummy(_ n: String) -> [String: Any]? { (h.status(n)?["resources"] as? [[String: Any]])?.first }
        try FileManager.default.removeItem(atPath: stateFile(master))
        h.waitFor(master, "one restart recorded", within: 10) { _ in (dummy(master)?["restarts"] as? Int) == 1 }

        let hactl = [ClusterHarness.hactl, "--endpoint", "http://\(h.node(master).statusAddress)", "--token-file", h.tokenPath]
        let r = try shell(hactl + ["resource", "cleanup", "dummy", "--node", master, "--json"], timeout: 30)
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        let doc = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        XCTAssertEqual(doc?["action"] as? String, "resource-cleanup")
        XCTAssertEqual(doc?["ok"] as? Bool, true, r.stdout)
        XCTAssertEqual(doc?["node"] as? String, master)
        XCTAssertTrue((doc?["message"] as? String)?.contains("dummy: restarts 1 → 0, running → running") ?? false, r.stdout)
        h.waitFor(master, "restarts back to 0", within: 5) { _ in (dummy(master)?["restarts"] as? Int) == 0 }
        XCTAssertEqual(dummy(master)?["state"] as? String, "running")
        XCTAssertEqual(h.role(master), "primary")
        XCTAssertTrue(h.tail(master, lines: 400).contains("event=resource_cleanup"), h.tail(master))

        // Both nodes without --node; an unknown name is refused by each, naming the resources.
        let all = try shell(hactl + ["resource", "cleanup"], timeout: 30)
        XCTAssertEqual(all.status, 0, all.stdout + all.stderr)
        XCTAssertTrue(all.stdout.contains("\(backup): cleaned up: dummy: restarts 0 → 0, stopped → stopped"), all.stdout)
        let unknown = try shell(hactl + ["resource", "cleanup", "nope"], timeout: 30)
        XCTAssertEqual(unknown.status, 1, unknown.stdout + unknown.stderr)
        XCTAssertTrue(unknown.stderr.contains("no resource named 'nope' on this node (resources: dummy)"), unknown.stderr)
    }

    /// A resource left running (by a crash of this node as master, or by hand) is found by a
    /// probe at start and stopped before the node can be master (issue 12).
    func testResourceLeftRunningIsStoppedAtStart() throws {
        let h = try dummyCluster(name: "stray", subnet: 94, monitorMs: 300)
        defer { h.shutdown() }
        let rsc = rscDir(h, "a")
        // What the agent's own start leaves: its state file.
        let state = stateFile(h, "a")
        let started = try shell([Self.dummyAgent, "start"],
                                env: ["OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "dummy", "HA_RSCTMP": rsc])
        XCTAssertEqual(started.status, 0, started.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: state), "the stray is running before hamgr starts")
        try h.startArbitrator()
        try h.startNode("a", env: ["HA_RSCTMP": rsc])
        XCTAssertTrue(waitUntil(10) { !FileManager.default.fileExists(atPath: state) }, "the stray was not stopped\n\(h.tail("a"))")
        // The line is written once the probe pass is over, just after the stop.
        XCTAssertTrue(waitUntil(5) { h.tail("a", lines: 400).contains("resource dummy: found running at start; stopped") }, h.tail("a"))
        XCTAssertEqual(h.role("a"), "secondary")
    }

    func testDummyResourceFollowsTheMasterAndRepeatedFailureSwitchesOver() throws {
        let hookDir = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-hooks-\(getpid())")
        try FileManager.default.createDirectory(at: hookDir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: hookDir) }
        let hookLog = hookDir.appendingPathComponent("hooks.log").path
        let hook = hookDir.appendingPathComponent("hook.sh").path
        try "#!/bin/sh\necho \"$(env | grep '^HAMGR_' | sort | tr '\\n' ' ')\" >> \(hookLog)\n"
            .write(toFile: hook, atomically: true, encoding: .utf8)
        chmod(hook, 0o755)
        let h = try dummyCluster(name: "rsc", subnet: 37, monitorMs: 300, maxRestarts: 1, extraTOML: """
            [hooks]
            on_promote = "\(hook)"
            on_demote = "\(hook)"
            """)
        defer { h.shutdown() }
        func stateFile(_ n: String) -> String { self.stateFile(h, n) }
        let (master, backup) = try start(h)

        // Started after promotion, on the master only.
        XCTAssertTrue(waitUntil(10) { FileManager.default.fileExists(atPath: stateFile(master)) }, "Dummy not started on the master\n\(h.tail(master))")
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile(backup)))
        XCTAssertTrue(waitUntil(10) { hookLines(hookLog).contains { $0.contains("HAMGR_HOOK=on_promote") && $0.contains("HAMGR_NODE=\(master)") } })
        let promoteLine = hookLines(hookLog).first { $0.contains("HAMGR_HOOK=on_promote") && $0.contains("HAMGR_NODE=\(master)") } ?? ""
        for expected in ["HAMGR_CLUSTER=rsc", "HAMGR_ROLE=primary", "HAMGR_SERVICE_ADDRESS=\(h.node(master).serviceAddress)",
                         "HAMGR_MASTER_NODE=\(master)", "HAMGR_EPOCH="] {
            XCTAssertTrue(promoteLine.contains(expected), "on_promote environment lacks \(expected): \(promoteLine)")
        }

        // A monitor failure restarts the resource.
        try FileManager.default.removeItem(atPath: stateFile(master))
        XCTAssertTrue(waitUntil(10) { FileManager.default.fileExists(atPath: stateFile(master)) }, "Dummy not restarted\n\(h.tail(master))")
        h.waitFor(master, "one restart recorded", within: 5) { s in
            ((s["resources"] as? [[String: Any]])?.first?["restarts"] as? Int) == 1
        }

        // Failing again exceeds max_restarts = 1: the master switches over.
        try FileManager.default.removeItem(atPath: stateFile(master))
        h.waitForRole(backup, "primary", within: 20)
        h.waitForRole(master, "secondary", within: 5)
        XCTAssertTrue(waitUntil(10) { FileManager.default.fileExists(atPath: stateFile(backup)) }, "Dummy not started on the new master")
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateFile(master)), "Dummy still running on the demoted node")
        XCTAssertTrue(waitUntil(10) { hookLines(hookLog).contains { $0.contains("HAMGR_HOOK=on_demote") && $0.contains("HAMGR_NODE=\(master)") && $0.contains("HAMGR_ROLE=secondary") } },
                      "no on_demote hook: \(hookLines(hookLog))")
        XCTAssertTrue(waitUntil(10) { hookLines(hookLog).contains { $0.contains("HAMGR_HOOK=on_promote") && $0.contains("HAMGR_NODE=\(backup)") } })
    }
}

func hookLines(_ path: String) -> [String] {
    ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
}

/// Polls `cond` every 50 ms for at most `seconds`.
func waitUntil(_ seconds: Double, _ cond: () -> Bool) -> Bool {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if cond() { return true }
        usleep(50_000)
    }
    return cond()
}
