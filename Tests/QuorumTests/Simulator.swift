import HACore
@testable import Quorum

/// A seeded, deterministic simulation of one cluster (data nodes a, b and arbitrator w) on a
/// simulated network with per-node clocks (FoundationDB / TigerBeetle VOPR style). Everything
/// random comes from the seed, so a failing seed replays exactly.
///
/// Faults: partitions of any shape (each direction of each link separately), loss,
/// duplication, reordering and long delays, crash/restart (persisted state kept, memory lost),
/// pauses longer than the lease (the clock keeps running), clock rates within the drift bound.
/// Workload: client writes with a model of protocol C replication (see `clientWrite`).
///
/// Invariants, checked after every event:
///  1. never two nodes whose write gates allow acknowledging at the same real instant;
///  2. no acknowledged write is missing on a node when it becomes master;
///  3. an outdated or inconsistent node is never promoted (without force);
///  4. epochs never go back (per node, across restarts), one master per epoch;
///  5. after the faults heal, a master with an open gate exists within `liveBound`.
final class Simulation {
    struct Config {
        var seed: UInt64
        var bugs: Set<PlantedBug> = []
        var trace = false
        /// nil: each seed picks one of `timingPresets` (all satisfy the lease rule).
        var timings: LeaseTimings? = nil
        /// Time before the first fault (the first election happens here).
        var warmup: Duration = .milliseconds(1500)
        var faultPhase: Duration = .seconds(4)
        var healPhase: Duration = .seconds(5)
        /// After healing, a master must exist within this bound.
        var liveBound: Duration = .seconds(4)
        /// Once that master exists the run goes on this long, then stops (keeps seeds cheap).
        var afterLive: Duration = .seconds(1)
    }

    struct Failure: Error, CustomStringConvertible {
        var seed: UInt64
        var time: Int64
        var message: String
        var trace: [String]
        var description: String {
            "simulation seed \(seed) failed at t=\(Simulation.fmt(time)): \(message)"
            + (trace.isEmpty ? "" : "\n--- trace (replay: HAMGR_SIM_SEED=\(seed)) ---\n" + trace.joined(separator: "\n"))
        }
    }

    enum Fault {
        case cut(from: Int, to: Int, duration: Int64)
        case isolate(Int, duration: Int64)
        case crash(Int, downFor: Int64)
        case pause(Int, duration: Int64)
        case switchover
        case demote
        case promote(Int)
        case maintenance(Int, on: Bool)
    }

    enum Event {
        case tick(node: Int, incarnation: Int)
        case deliver(from: Int, to: Int, QuorumMessage)
        case local(node: Int, incarnation: Int, NodeEvent)
        case frame(session: Int, write: Int, epoch: Epoch)
        case frameAck(node: Int, write: Int, epoch: Epoch)
        case resyncDone(session: Int)
        case clientWrite
        case fault(Fault)
        case linkUp(from: Int, to: Int)
        case restart(Int)
        case drainCheck(node: Int, attempt: Int)
        case heal
    }

    struct DataNode {
        var core: NodeCore?
        var incarnation = 0
        var persisted = NodePersistentState.initial
        var gate = WriteGate.closed
        /// The replication fencing token the core handed out (`NodeAction.fence`); like the
        /// volume's header it survives a crash. Frames of older epochs are refused.
        var fence = Epoch.zero
        var role: Role = .secondary
        var log: [Int] = []
        var disk: DiskState = .upToDate
        var gens = DataGenerations(current: GenerationID(1))
        var pending: [Int: (epoch: Epoch, peerAcked: Bool)] = [:]
        var draining = false
        var maxEpoch = Epoch.zero
        var rate = 1.0
        var offset: Int64 = 0
        var pausedUntil: Int64 = 0
    }

    struct Session {
        var id: Int
        var master: Int
        var peer: Int
        var epoch: Epoch
        var inSync: Bool
    }

    static let names: [NodeID] = ["a", "b", "w"]
    static let cluster = "sim"
    let config: Config
    let settings: QuorumSettings
    var rng: SplitMix64
    var now: Int64 = 0
    var queue = EventQueue()
    var nodes = [DataNode(), DataNode()]
    var arbitrator: ArbitratorCore?
    var arbitratorPersisted = ArbitratorPersistentState.initial
    var arbitratorMaxEpoch = Epoch.zero
    var arbitratorRate = 1.0
    var arbitratorOffset: Int64 = 0
    var arbitratorPausedUntil: Int64 = 0
    var arbitratorIncarnation = 0
    /// link[from][to]: the direction from → to delivers.
    var link = [[Bool]](repeating: [Bool](repeating: true, count: 3), count: 3)
    var loss = 0.0, duplicate = 0.0, slow = 0.0
    var session: Session?
    var nextSessionID = 1
    var nextWrite = 1
    var nextGeneration: UInt64 = 2
    var acked = Set<Int>()
    var masterOfEpoch: [Epoch: Int] = [:]
    var healedAt: Int64 = .max
    var masterSinceHeal = false
    var end: Int64 = 0
    var traceLines: [String] = []
    var failure: Failure?
    var stats = Stats()

    struct Stats { var events = 0; var acked = 0; var promotions = 0; var switchovers = 0 }

    static let timingPresets: [LeaseTimings] = [
        .defaults,
        LeaseTimings(renewInterval: .milliseconds(100), lease: .milliseconds(700), failureTimeout: .milliseconds(450), drift: 0.1),
        LeaseTimings(renewInterval: .milliseconds(150), lease: .milliseconds(1000), failureTimeout: .milliseconds(600), drift: 0.25),
    ]

    init(_ config: Config) {
        self.config = config
        var rng = SplitMix64(seed: config.seed &* 0x9E37_79B9_7F4A_7C15 &+ 1)
        let timings = config.timings ?? Self.timingPresets[Int(rng.next() % UInt64(Self.timingPresets.count))]
        precondition(timings.violations().isEmpty, "simulator timings break the lease rule: \(timings.violations())")
        self.settings = QuorumSettings(timings: timings, plantedBugs: config.bugs, jitterSeed: config.seed)
        self.rng = rng
    }

    // MARK: - Randomness and clocks

    func uniform(_ lo: Int64, _ hi: Int64) -> Int64 { hi <= lo ? lo : lo + Int64(rng.next() % UInt64(hi - lo)) }
    func chance(_ p: Double) -> Bool { p > 0 && Double(rng.next() >> 11) / Double(1 << 53) < p }
    static func ms(_ v: Int64) -> Int64 { v * 1_000_000 }
    static func fmt(_ t: Int64) -> String {
        let ms = t / 1_000_000
        return "\(ms / 1000).\(String(ms % 1000).leftPad(3))s"
    }

    func localNow(_ i: Int) -> Instant {
        if i == 2 { return Instant(nanoseconds: arbitratorOffset + Int64(Double(now) * arbitratorRate)) }
        return Instant(nanoseconds: nodes[i].offset + Int64(Double(now) * nodes[i].rate))
    }

    func trace(_ line: @autoclosure () -> String) {
        if config.trace { traceLines.append("\(Self.fmt(now)) \(line())") }
    }

    func fail(_ message: String) {
        if failure == nil { failure = Failure(seed: config.seed, time: now, message: message, trace: []) }
    }

    // MARK: - Run

    func run() -> Failure? {
        let drift = settings.timings.drift
        for i in 0..<2 {
            nodes[i].rate = 1 + (Double(rng.next() % 1001) / 1000 - 0.5) * drift
            nodes[i].offset = uniform(0, Self.ms(100_000))
        }
        arbitratorRate = 1 + (Double(rng.next() % 1001) / 1000 - 0.5) * drift
        arbitratorOffset = uniform(0, Self.ms(100_000))
        for i in 0..<2 { startNode(i) }
        arbitrator = ArbitratorCore(settings: settings, persisted: [:])

        let warm = config.warmup.nanosecondsClamped
        let faultEnd = warm + config.faultPhase.nanosecondsClamped
        end = faultEnd + config.healPhase.nanosecondsClamped
        // Fault parameters for this seed.
        loss = [0, 0, 0.01, 0.05, 0.2][Int(rng.next() % 5)]
        duplicate = [0, 0.02, 0.1][Int(rng.next() % 3)]
        slow = [0, 0, 0.02, 0.1][Int(rng.next() % 4)]
        let faults = 1 + Int(rng.next() % 6)
        for _ in 0..<faults {
            let at = uniform(warm, faultEnd)
            queue.push(at, .fault(randomFault(maxDuration: faultEnd - at)))
        }
        queue.push(uniform(Self.ms(10), Self.ms(100)), .clientWrite)
        queue.push(faultEnd, .heal)
        trace("seed \(config.seed): \(settings.timings) rates a=\(nodes[0].rate) b=\(nodes[1].rate) w=\(arbitratorRate) loss=\(loss) dup=\(duplicate) slow=\(slow) faults=\(faults)")

        while let entry = queue.pop(), entry.time <= end {
            now = entry.time
            stats.events += 1
            process(entry.event)
            if failure == nil { checkInvariants() }
            if var f = failure {
                f.trace = traceLines
                return f
            }
        }
        now = end
        if !masterSinceHeal {
            fail("no master with an open write gate within \(config.liveBound) after the faults healed")
        }
        if var f = failure { f.trace = traceLines; return f }
        return nil
    }

    func randomFault(maxDuration: Int64) -> Fault {
        let d = max(Self.ms(50), min(maxDuration, uniform(Self.ms(200), Self.ms(3000))))
        switch rng.next() % 12 {
        case 0, 1: return .cut(from: Int(rng.next() % 3), to: Int(rng.next() % 3), duration: d)
        case 2: return .isolate(Int(rng.next() % 3), duration: d)
        case 3, 4: return .crash(Int(rng.next() % 3), downFor: d)
        case 5, 6: return .pause(Int(rng.next() % 3), duration: d)
        case 7, 8: return .switchover
        case 9: return .demote
        case 10: return .promote(Int(rng.next() % 2))
        default: return .maintenance(Int(rng.next() % 2), on: rng.next() % 2 == 0)
        }
    }

    // MARK: - Nodes

    func startNode(_ i: Int) {
        var n = nodes[i]
        n.incarnation += 1
        // Only what was persisted survives; it goes through the real encoding.
        let persisted = (try? NodePersistentState.decode(n.persisted.encoded())) ?? NodePersistentState.initial
        n.core = NodeCore(cluster: Self.cluster, me: Self.names[i], peer: Self.names[1 - i], arbitrator: Self.names[2],
                          settings: settings, persisted: persisted, disk: LocalDisk(state: n.disk, generations: n.gens),
                          now: localNow(i))
        n.gate = n.core!.status.gate
        n.role = .secondary
        n.pending = [:]
        n.draining = false
        if n.core!.status.epoch < n.maxEpoch {
            fail("\(Self.names[i]) restarted at epoch \(n.core!.status.epoch) after having promised \(n.maxEpoch): epoch went back")
        }
        nodes[i] = n
        var core = nodes[i].core!
        let first = core.start(at: localNow(i))
        nodes[i].core = core
        apply(first, at: i)
        queue.push(now + uniform(Self.ms(1), Self.ms(100)), .tick(node: i, incarnation: n.incarnation))
        trace("\(Self.names[i]) starts (persisted epoch \(persisted.promisedEpoch), vote \(persisted.votedFor?.name ?? "-"))")
    }

    func isUp(_ i: Int) -> Bool {
        i == 2 ? arbitrator != nil : nodes[i].core != nil
    }

    func pausedUntil(_ i: Int) -> Int64 { i == 2 ? arbitratorPausedUntil : nodes[i].pausedUntil }

    func feed(_ i: Int, _ event: NodeEvent) {
        guard var core = nodes[i].core else { return }
        let actions = core.handle(event, at: localNow(i))
        nodes[i].core = core
        if config.trace {
            if case .tick = event {} else { trace("\(Self.names[i]) <- \(Self.describe(event))") }
        }
        apply(actions, at: i)
        let e = core.status.epoch
        if e < nodes[i].maxEpoch { fail("\(Self.names[i]) epoch went back from \(nodes[i].maxEpoch) to \(e)") }
        nodes[i].maxEpoch = max(nodes[i].maxEpoch, e)
    }

    func apply(_ actions: [NodeAction], at i: Int) {
        for a in actions {
            switch a {
            case let .send(to, m):
                send(from: i, to: Self.index(to), m)
            case let .persist(p):
                if p.promisedEpoch < nodes[i].persisted.promisedEpoch {
                    fail("\(Self.names[i]) persisted epoch \(p.promisedEpoch) below \(nodes[i].persisted.promisedEpoch)")
                }
                nodes[i].persisted = p
            case let .writeGate(g):
                let old = nodes[i].gate
                nodes[i].gate = g
                trace("\(Self.names[i]) \(g)")
                if nodes[i].role == .primary, old.peerRequired, !g.peerRequired, g.epoch == old.epoch {
                    // The data path starts a new generation when it goes on without the peer.
                    nodes[i].gens.branch(to: GenerationID(nextGeneration)); nextGeneration += 1
                    queueLocal(i, .disk(LocalDisk(state: nodes[i].disk, generations: nodes[i].gens)))
                }
                tryAck(i)
            case let .becomePrimary(epoch, newGeneration):
                trace("\(Self.names[i]) BECOMES PRIMARY epoch \(epoch)\(newGeneration ? " (new generation)" : "")")
                stats.promotions += 1
                if let other = masterOfEpoch[epoch], other != i {
                    fail("two masters of epoch \(epoch): \(Self.names[other]) and \(Self.names[i])")
                }
                masterOfEpoch[epoch] = i
                if !newGeneration {
                    if nodes[i].disk != .upToDate {
                        fail("\(Self.names[i]) promoted with disk \(nodes[i].disk.rawValue)")
                    }
                    let have = Set(nodes[i].log)
                    let lost = acked.subtracting(have)
                    if !lost.isEmpty {
                        fail("\(Self.names[i]) promoted at epoch \(epoch) without acknowledged writes \(lost.sorted().prefix(8)) (outdated node promoted: acknowledged writes lost)")
                    }
                } else {
                    nodes[i].gens.branch(to: GenerationID(nextGeneration)); nextGeneration += 1
                    queueLocal(i, .disk(LocalDisk(state: nodes[i].disk, generations: nodes[i].gens)))
                }
                nodes[i].role = .primary
            case let .becomeSecondary(epoch, master):
                trace("\(Self.names[i]) becomes secondary epoch \(epoch) master \(master?.name ?? "-")")
                nodes[i].role = .secondary
                nodes[i].pending = [:]
                nodes[i].draining = false
            case .drainForSwitchover:
                nodes[i].draining = true
                queue.push(now + Self.ms(10), .drainCheck(node: i, attempt: 0))
            case let .adminResult(cmd, result):
                trace("\(Self.names[i]) admin \(cmd): \(result)")
                if case .switchover = cmd {
                    nodes[i].draining = false
                    if case .success = result { stats.switchovers += 1 }
                }
            case let .log(ev):
                trace("\(Self.names[i]) log \(ev)")
            case let .fence(e):
                trace("\(Self.names[i]) fence \(e)")
                nodes[i].fence = max(nodes[i].fence, e)
            case .cancelDrain:
                trace("\(Self.names[i]) cancelDrain")
                nodes[i].draining = false
            case .fenceServices, .unfenceServices:
                trace("\(Self.names[i]) \(a)")
            }
        }
    }

    static func index(_ n: NodeID) -> Int { n == names[0] ? 0 : n == names[1] ? 1 : 2 }

    func queueLocal(_ i: Int, _ e: NodeEvent) {
        queue.push(now, .local(node: i, incarnation: nodes[i].incarnation, e))
    }

    // MARK: - Network

    func send(from: Int, to: Int, _ m: QuorumMessage) {
        guard link[from][to], !chance(loss) else {
            trace("\(Self.names[from]) -> \(Self.names[to]) LOST \(m)")
            return
        }
        let copies = chance(duplicate) ? 2 : 1
        for _ in 0..<copies {
            let delay = chance(slow) ? uniform(Self.ms(100), Self.ms(1500)) : uniform(Self.ms(1), Self.ms(15))
            queue.push(now + delay, .deliver(from: from, to: to, m))
        }
    }

    // MARK: - Events

    func deferIfPaused(_ i: Int, _ e: Event) -> Bool {
        let p = pausedUntil(i)
        if p > now { queue.push(p, e); return true }
        return false
    }

    func process(_ event: Event) {
        switch event {
        case let .tick(i, inc):
            guard nodes[i].core != nil, nodes[i].incarnation == inc else { return }
            if deferIfPaused(i, event) { return }
            feed(i, .tick)
            queue.push(now + Int64(Double(Self.ms(100)) / nodes[i].rate), .tick(node: i, incarnation: inc))
        case let .deliver(from, to, m):
            guard isUp(to) else { return }
            if deferIfPaused(to, event) { return }
            // Every delivered message also goes through the wire codec.
            guard let decoded = try? QuorumMessage.decode(m.encoded()), decoded == m else {
                return fail("codec round trip changed \(m)")
            }
            if to == 2 {
                guard var w = arbitrator else { return }
                let actions = w.handle(cluster: Self.cluster, from: Self.names[from], decoded, at: localNow(2))
                arbitrator = w
                trace("w <- \(Self.names[from]) \(m)")
                applyArbitrator(actions)
                if let e = w.status(cluster: Self.cluster)?.epoch {
                    if e < arbitratorMaxEpoch { fail("arbitrator epoch went back from \(arbitratorMaxEpoch) to \(e)") }
                    arbitratorMaxEpoch = max(arbitratorMaxEpoch, e)
                }
            } else {
                if config.trace { trace("\(Self.names[to]) <- \(Self.names[from]) \(m)") }
                feedQuiet(to, .received(from: Self.names[from], decoded))
            }
        case let .local(i, inc, e):
            guard nodes[i].core != nil, nodes[i].incarnation == inc else { return }
            if deferIfPaused(i, event) { return }
            feed(i, e)
        case let .frame(sid, w, epoch):
            guard let s = session, s.id == sid else { return }
            let p = s.peer
            guard nodes[p].core != nil else { return }
            if deferIfPaused(p, event) { return }
            // The backup's volume refuses writes while primary and frames below its fence.
            if nodes[p].role != .primary, epoch >= nodes[p].fence {
                nodes[p].log.append(w)
                if link[p][s.master] {
                    queue.push(now + uniform(Self.ms(1), Self.ms(15)), .frameAck(node: s.master, write: w, epoch: epoch))
                }
            }
        case let .frameAck(i, w, epoch):
            guard nodes[i].core != nil else { return }
            if deferIfPaused(i, event) { return }
            if let p = nodes[i].pending[w], p.epoch == epoch {
                nodes[i].pending[w] = (epoch, true)
                tryAck(i)
            }
        case let .resyncDone(sid):
            guard var s = session, s.id == sid else { return }
            let m = s.master, p = s.peer
            if !nodes[m].gens.bitmap.isNone {
                nodes[m].gens.pushHistory(nodes[m].gens.bitmap)
                nodes[m].gens.bitmap = .none
                queueLocal(m, .disk(LocalDisk(state: nodes[m].disk, generations: nodes[m].gens)))
            }
            nodes[p].log = nodes[m].log
            nodes[p].gens = nodes[m].gens
            nodes[p].disk = .upToDate
            queueLocal(p, .disk(LocalDisk(state: .upToDate, generations: nodes[p].gens)))
            s.inSync = true
            session = s
            trace("resync \(Self.names[m]) -> \(Self.names[p]) done (\(nodes[p].log.count) writes)")
            queueLocal(m, .peerReplication(.inSync))
            for (w, pw) in nodes[m].pending where pw.epoch == s.epoch { nodes[m].pending[w] = (pw.epoch, true) }
            tryAck(m)
        case .clientWrite:
            clientWrite()
            queue.push(now + uniform(Self.ms(30), Self.ms(150)), .clientWrite)
        case let .fault(f):
            inject(f)
        case let .linkUp(from, to):
            link[from][to] = true
        case let .restart(i):
            restart(i)
        case let .drainCheck(i, attempt):
            guard nodes[i].core != nil, nodes[i].draining else { return }
            if deferIfPaused(i, event) { return }
            if nodes[i].pending.isEmpty, let s = session, s.master == i, s.inSync {
                feed(i, .switchoverDrained)
            } else if attempt < 40 {
                queue.push(now + Self.ms(10), .drainCheck(node: i, attempt: attempt + 1))
            }
        case .heal:
            heal()
        }
        updateReplication()
    }

    /// Deliveries are traced by the caller; keep `feed` from tracing them twice.
    func feedQuiet(_ i: Int, _ e: NodeEvent) {
        guard var core = nodes[i].core else { return }
        let actions = core.handle(e, at: localNow(i))
        nodes[i].core = core
        apply(actions, at: i)
        let ep = core.status.epoch
        if ep < nodes[i].maxEpoch { fail("\(Self.names[i]) epoch went back from \(nodes[i].maxEpoch) to \(ep)") }
        nodes[i].maxEpoch = max(nodes[i].maxEpoch, ep)
    }

    func applyArbitrator(_ actions: [ArbitratorAction]) {
        for a in actions {
            switch a {
            case let .send(_, to, m): send(from: 2, to: Self.index(to), m)
            case let .persist(_, p):
                if p.promisedEpoch < arbitratorPersisted.promisedEpoch { fail("arbitrator persisted an older epoch") }
                arbitratorPersisted = p
            case let .log(ev): trace("w log \(ev)")
            }
        }
    }

    // MARK: - Faults

    func inject(_ f: Fault) {
        trace("FAULT \(f)")
        switch f {
        case let .cut(from, to, d):
            guard from != to else { return }
            link[from][to] = false
            queue.push(now + d, .linkUp(from: from, to: to))
        case let .isolate(i, d):
            for j in 0..<3 where j != i {
                link[i][j] = false; link[j][i] = false
                queue.push(now + d, .linkUp(from: i, to: j))
                queue.push(now + d, .linkUp(from: j, to: i))
            }
        case let .crash(i, d):
            guard isUp(i) else { return }
            if i == 2 {
                arbitrator = nil
            } else {
                nodes[i].core = nil
                nodes[i].pending = [:]
                nodes[i].gate = .closed
                nodes[i].role = .secondary
                nodes[i].draining = false
            }
            queue.push(now + d, .restart(i))
        case let .pause(i, d):
            if i == 2 { arbitratorPausedUntil = max(arbitratorPausedUntil, now + d) } else { nodes[i].pausedUntil = max(nodes[i].pausedUntil, now + d) }
        case .switchover:
            if let m = (0..<2).first(where: { nodes[$0].role == .primary && nodes[$0].core != nil && nodes[$0].pausedUntil <= now }) {
                feed(m, .admin(.switchover))
            }
        case .demote:
            if let m = (0..<2).first(where: { nodes[$0].role == .primary && nodes[$0].core != nil && nodes[$0].pausedUntil <= now }) {
                feed(m, .admin(.demote))
            }
        case let .promote(i):
            if nodes[i].pausedUntil <= now { feed(i, .admin(.promote(force: false))) }
        case let .maintenance(i, on):
            if nodes[i].pausedUntil <= now { feed(i, .admin(.maintenance(on))) }
        }
    }

    func restart(_ i: Int) {
        guard !isUp(i) else { return }
        if i == 2 {
            let p = (try? ArbitratorPersistentState.decode(arbitratorPersisted.encoded())) ?? .initial
            arbitrator = ArbitratorCore(settings: settings, persisted: [Self.cluster: p])
            arbitratorIncarnation += 1
            if p.promisedEpoch < arbitratorMaxEpoch {
                fail("arbitrator restarted at epoch \(p.promisedEpoch) after having promised \(arbitratorMaxEpoch): epoch went back")
            }
            trace("w restarts (epoch \(p.promisedEpoch), vote \(p.votedFor?.name ?? "-"))")
        } else {
            startNode(i)
        }
    }

    func heal() {
        trace("HEAL")
        healedAt = now
        loss = 0; duplicate = 0; slow = 0
        for i in 0..<3 { for j in 0..<3 { link[i][j] = true } }
        for i in 0..<3 where !isUp(i) { restart(i) }
        for i in 0..<2 { nodes[i].pausedUntil = min(nodes[i].pausedUntil, now) }
        for i in 0..<2 { feed(i, .admin(.maintenance(false))) }
        arbitratorPausedUntil = min(arbitratorPausedUntil, now)
    }

    // MARK: - Replication model (protocol C)

    func connected(_ a: Int, _ b: Int) -> Bool {
        nodes[a].core != nil && nodes[b].core != nil && link[a][b] && link[b][a]
            && nodes[a].pausedUntil <= now && nodes[b].pausedUntil <= now
    }

    /// One replication session at a time, from the node that believes it is master to its peer.
    /// It breaks on any disconnection or epoch change; a new one starts with a resync by copying
    /// unless both sides already hold the same data.
    func updateReplication() {
        if let s = session {
            let m = s.master, p = s.peer
            let ok = nodes[m].role == .primary && connected(m, p) && nodes[m].gate.epoch == s.epoch && nodes[p].fence <= s.epoch
                && nodes[p].role != .primary
            if !ok {
                session = nil
                trace("replication \(Self.names[m]) -> \(Self.names[p]) breaks")
                if nodes[m].core != nil { queueLocal(m, .peerReplication(.disconnected)) }
            }
        }
        guard session == nil else { return }
        let primaries = (0..<2).filter { nodes[$0].role == .primary && nodes[$0].core != nil && nodes[$0].gate.epoch > .zero }
        guard let m = primaries.max(by: { nodes[$0].gate.epoch < nodes[$1].gate.epoch }) else { return }
        let p = 1 - m
        guard connected(m, p), nodes[p].fence <= nodes[m].gate.epoch, nodes[p].role != .primary else { return }
        let s = Session(id: nextSessionID, master: m, peer: p, epoch: nodes[m].gate.epoch, inSync: false)
        nextSessionID += 1
        if nodes[p].log == nodes[m].log, nodes[p].disk == .upToDate, nodes[p].gens == nodes[m].gens {
            session = Session(id: s.id, master: m, peer: p, epoch: s.epoch, inSync: true)
            trace("replication \(Self.names[m]) -> \(Self.names[p]) in sync")
            queueLocal(m, .peerReplication(.inSync))
        } else {
            session = s
            nodes[p].disk = .inconsistent
            trace("replication \(Self.names[m]) -> \(Self.names[p]) resync starts")
            queueLocal(p, .disk(LocalDisk(state: .inconsistent, generations: nodes[p].gens)))
            queueLocal(m, .peerReplication(.behind))
            queue.push(now + uniform(Self.ms(50), Self.ms(300)), .resyncDone(session: s.id))
        }
    }

    /// A client write at the node that believes it is master. The master writes locally and
    /// replicates when its gate allows at this instant; it acknowledges only when the gate still
    /// allows and the peer applied the write in the same epoch, or the gate does not require the peer.
    func clientWrite() {
        guard let m = (0..<2).first(where: { nodes[$0].role == .primary && nodes[$0].core != nil }) else { return }
        guard nodes[m].pausedUntil <= now, !nodes[m].draining else { return }
        let g = nodes[m].gate
        guard g.allowsAck(at: localNow(m)) else { return }
        let w = nextWrite
        nextWrite += 1
        nodes[m].log.append(w)
        nodes[m].pending[w] = (g.epoch, false)
        if let s = session, s.master == m, s.inSync, s.epoch == g.epoch, link[m][s.peer] {
            queue.push(now + uniform(Self.ms(1), Self.ms(15)), .frame(session: s.id, write: w, epoch: g.epoch))
        }
        tryAck(m)
    }

    func tryAck(_ i: Int) {
        guard !nodes[i].pending.isEmpty else { return }
        let g = nodes[i].gate
        guard g.allowsAck(at: localNow(i)) else { return }
        for (w, p) in nodes[i].pending where p.epoch == g.epoch && (p.peerAcked || !g.peerRequired) {
            acked.insert(w)
            stats.acked += 1
            nodes[i].pending[w] = nil
            trace("\(Self.names[i]) ACKS write \(w) (epoch \(p.epoch)\(p.peerAcked ? "" : ", peer not required"))")
        }
    }

    // MARK: - Invariants

    func checkInvariants() {
        let open = (0..<2).filter { nodes[$0].core != nil && nodes[$0].gate.allowsAck(at: localNow($0)) }
        if open.count == 2 {
            fail("two nodes may acknowledge writes at the same instant: a \(nodes[0].gate) local \(localNow(0)), b \(nodes[1].gate) local \(localNow(1))")
        }
        if now >= healedAt, !masterSinceHeal {
            if open.count == 1 {
                masterSinceHeal = true
                end = min(end, now + config.afterLive.nanosecondsClamped)
                trace("master \(Self.names[open[0]]) serving \(Self.fmt(now - healedAt)) after heal")
            } else if now > healedAt + config.liveBound.nanosecondsClamped {
                fail("no master with an open write gate within \(config.liveBound) after the faults healed")
            }
        }
    }

    static func describe(_ e: NodeEvent) -> String {
        switch e {
        case .tick: return "tick"
        case let .linkUp(n): return "linkUp \(n)"
        case let .linkDown(n): return "linkDown \(n)"
        case let .received(from, m): return "\(from) \(m)"
        case let .disk(d): return "disk \(d.state.rawValue) gen \(d.generations.current) bitmap \(d.generations.bitmap)"
        case let .peerReplication(s): return "peerReplication \(s.rawValue)"
        case let .admin(c): return "admin \(c)"
        case .switchoverDrained: return "switchoverDrained"
        case let .clockJump(d): return "clockJump \(d)"
        }
    }
}

/// A binary min-heap on (time, insertion order): equal times keep their order.
struct EventQueue {
    struct Entry { var time: Int64; var seq: UInt64; var event: Simulation.Event }
    private var heap: [Entry] = []
    private var seq: UInt64 = 0

    init() { heap.reserveCapacity(256) }

    private static func less(_ a: Entry, _ b: Entry) -> Bool { a.time != b.time ? a.time < b.time : a.seq < b.seq }

    mutating func push(_ time: Int64, _ event: Simulation.Event) {
        seq += 1
        heap.append(Entry(time: time, seq: seq, event: event))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if Self.less(heap[i], heap[parent]) { heap.swapAt(i, parent); i = parent } else { break }
        }
    }

    mutating func pop() -> Entry? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count, Self.less(heap[l], heap[m]) { m = l }
            if r < heap.count, Self.less(heap[r], heap[m]) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return top
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
