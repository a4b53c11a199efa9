import Foundation
import HACore
import XCTest
@testable import Quorum

/// Acceptance (issue 3, items 1–2): the seeded simulator over many seeds, and proof that it
/// catches each planted bug.
final class SimulationTests: XCTestCase {
    static func env(_ key: String) -> String? { ProcessInfo.processInfo.environment[key] }

    /// Runs one seed; on failure replays it with the trace on and returns the report.
    static func runSeed(_ seed: UInt64, bugs: Set<PlantedBug> = []) -> Simulation.Failure? {
        guard Simulation(.init(seed: seed, bugs: bugs)).run() != nil else { return nil }
        return Simulation(.init(seed: seed, bugs: bugs, trace: true)).run()
    }

    func testSeededSimulationKeepsEveryInvariant() {
        let seeds: [UInt64]
        if let one = Self.env("HAMGR_SIM_SEED").flatMap(UInt64.init) {
            seeds = [one]
        } else {
            let count = Self.env("HAMGR_SIM_SEEDS").flatMap(UInt64.init) ?? 10_000
            let first = Self.env("HAMGR_SIM_SEED_START").flatMap(UInt64.init) ?? 1
            seeds = Array(first..<first + max(1, count))
        }
        let start = ContinuousClock.now
        var events = 0, acked = 0, promotions = 0, switchovers = 0
        for seed in seeds {
            let sim = Simulation(.init(seed: seed, trace: seeds.count == 1))
            if let failure = sim.run() {
                let report = seeds.count == 1 ? failure : (Self.runSeed(seed) ?? failure)
                print(report.description)
                XCTFail("simulation seed \(seed): \(failure.message) (replay: HAMGR_SIM_SEED=\(seed))")
                return
            }
            events += sim.stats.events; acked += sim.stats.acked
            promotions += sim.stats.promotions; switchovers += sim.stats.switchovers
            if seeds.count == 1 { print(sim.traceLines.joined(separator: "\n")) }
        }
        let elapsed = ContinuousClock.now - start
        print("simulation: \(seeds.count) seeds in \(elapsed) (\(events) events, \(acked) acknowledged writes, \(promotions) promotions, \(switchovers) switchovers)")
        XCTAssertGreaterThan(acked, 0, "the workload never acknowledged a write: the simulator checks nothing")
        XCTAssertGreaterThan(promotions, seeds.count, "no failovers happened beyond the first election")
    }

    /// Seeds that once failed, kept as regressions: 6086 (a vote delayed across a pause promoted
    /// a node into a superseded epoch), 69059 (an admin promotion skipped the node's own
    /// lease wait: two open gates).
    func testRegressionSeeds() {
        for seed: UInt64 in [6086, 69059] {
            if let f = Self.runSeed(seed) {
                print(f.description)
                XCTFail("regression seed \(seed): \(f.message)")
            }
        }
    }

    /// Each planted bug must be caught within this many seeds (measured: see docs/quorum-protocol.md).
    static let bugBudget: UInt64 = 2000

    func checkCaught(_ bug: PlantedBug) {
        let start = ContinuousClock.now
        for seed in 1...Self.bugBudget {
            if let f = Simulation(.init(seed: seed, bugs: [bug])).run() {
                print("planted bug \(bug.rawValue): caught at seed \(seed) after \(ContinuousClock.now - start): \(f.message)")
                return
            }
        }
        XCTFail("planted bug \(bug.rawValue) was not caught within \(Self.bugBudget) seeds")
    }

    func testCatchesPlantedBugSkipLeaseWait() { checkCaught(.skipLeaseWait) }
    func testCatchesPlantedBugSkipOutdate() { checkCaught(.skipOutdate) }
    func testCatchesPlantedBugVotesNotPersisted() { checkCaught(.votesNotPersisted) }
    func testCatchesPlantedBugNoDriftMargin() { checkCaught(.noDriftMargin) }
    func testCatchesPlantedBugLeaseAnchoredAtReply() { checkCaught(.leaseAnchoredAtReply) }
    // gateOpenOnNewerEpoch is not caught within 2000 seeds: this simulator's pauses keep the
    // paused node's clock running (a process stop), so a thawed master's lease has lapsed on its
    // own clock and it never opens its gate on a stale lease. The clock-freeze transcript shows
    // the bug instead (Transcript/testdata/clock-freeze.txt, last section).
}
