import Foundation
import HAShell
@testable import HamgrKit
import Logging
import XCTest

final class HooksTests: XCTestCase {
    var dir = ""
    override func setUpWithError() throws { dir = try OpsTest.scratchDirectory("hooks") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private var logger: Logger { var l = Logger(label: "hooks-test"); l.logLevel = .critical; return l }

    private let context = HookContext(cluster: "web1", node: "b", role: .primary, epoch: 8, serviceAddress: "10.2.0.1:10809",
                                      masterNode: "b", masterServiceAddress: "10.2.0.1:10809", peerNode: "a")

    func testPromoteHookGetsTheEnvironment() async throws {
        let hook = dir + "/announce.sh"
        try OpsTest.writeScript(hook, "#!/bin/sh\nenv | grep '^HAMGR_' | sort > \(dir)/env.txt\necho announced\n")
        let metrics = NodeMetrics()
        let runner = HookRunner(hooks: .init(onPromote: hook), logger: logger, metrics: metrics)
        let outcome = await runner.run(.onPromote, context: context)
        XCTAssertEqual(outcome, .succeeded(output: "announced\n"))
        let env = try String(contentsOfFile: dir + "/env.txt", encoding: .utf8)
        XCTAssertEqual(env, """
        HAMGR_CLUSTER=web1
        HAMGR_EPOCH=8
        HAMGR_HOOK=on_promote
        HAMGR_MASTER_NODE=b
        HAMGR_MASTER_SERVICE_ADDRESS=10.2.0.1:10809
        HAMGR_NODE=b
        HAMGR_PEER_NODE=a
        HAMGR_ROLE=primary
        HAMGR_SERVICE_ADDRESS=10.2.0.1:10809

        """)
        XCTAssertTrue(metrics.registry.render().contains("hamgr_hook_runs_total{hook=\"on_promote\",result=\"ok\"} 1"))
        let demote = await runner.run(.onDemote, context: context)
        XCTAssertEqual(demote, .notConfigured)
    }

    func testFailingHookIsReported() async throws {
        let hook = dir + "/fail.sh"
        try OpsTest.writeScript(hook, "#!/bin/sh\necho 'nsupdate: REFUSED' >&2\nexit 3\n")
        let outcome = await HookRunner(hooks: .init(onDemote: hook), logger: logger).run(.onDemote, context: context)
        XCTAssertEqual(outcome, .failed(status: "exit 3", output: "nsupdate: REFUSED\n"))
    }

    func testHangingHookIsKilledWithItsChildren() async throws {
        let hook = dir + "/hang.sh"
        try OpsTest.writeScript(hook, "#!/bin/sh\nsleep 30 &\necho $! > \(dir)/child.pid\nwait\n")
        let start = Date()
        let outcome = await HookRunner(hooks: .init(onPromote: hook, timeout: .milliseconds(300)), logger: logger).run(.onPromote, context: context)
        XCTAssertEqual(outcome, .timedOut(output: ""))
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        let child = Int32(try String(contentsOfFile: dir + "/child.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))!
        try await Task.sleep(for: .milliseconds(200))
        // Gone, or a zombie waiting for init to reap it: either way no longer running.
        let stat = (try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8)) ?? ""
        let state = stat.split(separator: ")").last?.split(separator: " ").first.map(String.init)
        XCTAssertTrue(stat.isEmpty || state == "Z", "the hook's background child was killed with its process group: \(stat)")
    }

    func testMissingHookCannotStart() async {
        let outcome = await HookRunner(hooks: .init(onPromote: dir + "/missing.sh"), logger: logger).run(.onPromote, context: context)
        guard case .couldNotStart(let why) = outcome else { return XCTFail("\(outcome)") }
        XCTAssertTrue(why.contains("No such file"), why)
    }
}
