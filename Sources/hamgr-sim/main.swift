import Foundation
import Simulation

// hamgr-sim: runs the whole-node simulator over a range of seeds (or one seed, traced).
//   hamgr-sim [--seeds N] [--start K] [--seed S] [--plant BUG]... [--rollback] [--quiet]
//             [--link-drop MS]   (scripted: reset the link under a write and a flush, down MS ms)
// Last line: "N seeds, V violations". Exit 1 on violations; with --plant, exit 0 when the
// bug was caught ("caught at seed S") and 1 when it was not.
var args = Array(CommandLine.arguments.dropFirst())
var seeds: UInt64 = 1000
var start: UInt64 = 1
var single: UInt64?
var plants: [String] = []
var rollback = false
var linkDrop: Int64?
var verbose = true
@MainActor func value(_ flag: String) -> String {
    guard !args.isEmpty else { FileHandle.standardError.write("\(flag) needs a value\n".data(using: .utf8)!); exit(2) }
    return args.removeFirst()
}
while !args.isEmpty {
    let a = args.removeFirst()
    switch a {
    case "--seeds": seeds = UInt64(value(a)) ?? seeds
    case "--start": start = UInt64(value(a)) ?? start
    case "--seed": single = UInt64(value(a))
    case "--plant": plants.append(value(a))
    case "--rollback": rollback = true
    case "--link-drop": linkDrop = Int64(value(a))
    case "--quiet": verbose = false
    case "--list-bugs": print(WholeNodeSimulation.plantableBugs.joined(separator: "\n")); exit(0)
    default: FileHandle.standardError.write("unknown argument \(a)\n".data(using: .utf8)!); exit(2)
    }
}
var base = SimulationConfig(seed: 0)
base.arbitratorRollback = rollback
base.linkDropMilliseconds = linkDrop
for p in plants where !WholeNodeSimulation.plant(p, into: &base) {
    print("unknown planted bug \(p) (this build knows: \(WholeNodeSimulation.plantableBugs.joined(separator: ", ")))")
    exit(3)
}

if let s = single {
    var c = base
    c.seed = s
    c.trace = true
    let r = WholeNodeSimulation.run(c)
    for line in r.trace { print(line) }
    if let v = r.violation { print("seed \(s): VIOLATION \(v)") }
    print("1 seeds, \(r.violation == nil ? 0 : 1) violations")
    exit(r.violation == nil ? 0 : 1)
}

let clock = ContinuousClock()
let t0 = clock.now
var violations = 0
var events = 0, acks = 0, promotions = 0, faults = 0, syncChecks = 0
var simulated: Int64 = 0
var firstCaught: UInt64?
var longest: (Int64, UInt64, String) = (0, 0, "")
var overBound = 0, unanswered = 0
for seed in start..<(start + seeds) {
    var c = base
    c.seed = seed
    let r = WholeNodeSimulation.run(c)
    events += r.stats.events; acks += r.stats.writesAcked; promotions += r.stats.promotions
    faults += r.stats.faults; syncChecks += r.stats.syncChecks; simulated += r.stats.simulatedNanoseconds
    if r.stats.longestRequestNanoseconds > longest.0 { longest = (r.stats.longestRequestNanoseconds, seed, r.stats.longestRequest) }
    if r.stats.longestRequestNanoseconds > r.stats.requestBoundNanoseconds { overBound += 1 }
    unanswered += r.stats.unanswered
    if r.stats.unanswered > 0 && unanswered - r.stats.unanswered < 5 { print("seed \(seed): \(r.stats.unanswered) requests unanswered at the end") }
    if let v = r.violation {
        if !plants.isEmpty {
            // Caught only if the same seed without the planted bug keeps every invariant.
            var clean = c
            clean.quorumBugs = []; clean.replicationBugs = []
            if WholeNodeSimulation.run(clean).violation != nil { continue }
        }
        violations += 1
        if verbose || plants.isEmpty { print("seed \(seed): \(v)  [\(r.setup)]  replay: scripts/simulate.sh --seed \(seed)\(plants.map { " --plant \($0)" }.joined())") }
        if !plants.isEmpty { firstCaught = seed; break }
    }
}
let elapsed = clock.now - t0
let ran = firstCaught.map { $0 - start + 1 } ?? seeds
let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
print("\(ran) seeds in \(String(format: "%.1f", secs)) s (\(String(format: "%.0f", Double(ran) / max(secs, 1e-9))) seeds/s; \(events) events, \(acks) acknowledged writes, \(promotions) promotions, \(faults) faults, \(syncChecks) sync-point checks, \(simulated / 1_000_000_000) simulated s)")
print("longest wait for an answer (node never stopped meanwhile): seed \(longest.1): \(longest.2); "
      + "\(overBound) seeds over renew_interval + link timeout, \(unanswered) requests unanswered at the end after more than that")
if !plants.isEmpty {
    if let s = firstCaught {
        print("caught at seed \(s) (\(ran) seeds)")
    } else {
        print("NOT caught within \(seeds) seeds")
    }
}
print("\(ran) seeds, \(violations) violations")
if !plants.isEmpty { exit(firstCaught == nil ? 1 : 0) }
exit(violations == 0 ? 0 : 1)
