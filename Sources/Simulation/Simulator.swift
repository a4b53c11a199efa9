import HACore
import NodeRuntime
import Quorum
import Replication

/// What one simulated run is: a seed, optional planted bugs, tracing.
public struct SimulationConfig: Sendable {
    public var seed: UInt64
    /// Quorum bugs to plant (`PlantedBug`, Sources/Quorum/Settings.swift).
    public var quorumBugs: Set<PlantedBug> = []
    /// Replication bugs to plant (`ReplicationPlantedBug`).
    public var replicationBugs: Set<ReplicationPlantedBug> = []
    /// Keep a one-line-per-event trace (costs time: off for seed sweeps).
    public var trace = false
    /// Also roll the arbitrator's state back to an older snapshot of the same incarnation: the
    /// gap docs/quorum-protocol.md §6b names as undetected. Off by default (it breaks the
    /// invariants by design).
    public var arbitratorRollback = false
    /// A scripted run instead of random faults (issue 13, stuck writes): once the pair is in
    /// sync, the replication session is reset with writes and a flush in flight, and the
    /// link stays down this many milliseconds before the redial may succeed. Everything else
    /// stays healthy (the arbitrator answers).
    public var linkDropMilliseconds: Int64?
    public init(seed: UInt64) { self.seed = seed }
}

public struct SimulationViolation: Sendable, CustomStringConvertible {
    /// The acceptance invariant (1–6) that broke.
    public var invariant: Int
    public var message: String
    /// Simulated real time, nanoseconds.
    public var time: Int64
    public var description: String { "invariant (\(invariant)) at t=\(Simulator.fmt(time)): \(message)" }
}

public struct SimulationStats: Sendable {
    public var events = 0
    public var writesAcked = 0
    public var flushesAcked = 0
    public var reads = 0
    public var promotions = 0
    public var faults = 0
    public var syncChecks = 0
    public var simulatedNanoseconds: Int64 = 0
    public var liveAfterHealNanoseconds: Int64 = -1
    /// The longest a client request (write or flush) waited for its answer, acknowledgement
    /// or error, on a node that was never stopped or frozen meanwhile (simulated real time),
    /// and what it was.
    public var longestRequestNanoseconds: Int64 = 0
    public var longestRequest = ""
    /// What a request may wait with the arbitrator reachable, whatever the link does:
    /// `renew_interval + failure_timeout` (docs/failure-modes.md F22), where the daemon's
    /// link timeout is its failure timeout; the simulated link draws its own timeout, so the
    /// larger of the two counts here. Random runs exceed it legitimately (an arbitrator down
    /// while the link is, a paused arbitrator, quorum cuts); the scripted link drop may not.
    public var requestBoundNanoseconds: Int64 = 0
    /// Requests still unanswered at the end of the run after more than the bound, on a node
    /// still up and never stopped meanwhile.
    public var unanswered = 0
}

public struct SimulationResult: Sendable {
    public var seed: UInt64
    /// The run's shape: protocol, policy, timings, volume.
    public var setup: String
    public var violation: SimulationViolation?
    public var trace: [String]
    public var stats: SimulationStats
}

/// Entry point: runs one seed to its end or its first violation.
public enum WholeNodeSimulation {
    public static func run(_ config: SimulationConfig) -> SimulationResult {
        Simulator(config).run()
    }

    /// Planted bugs by name: a `PlantedBug` (quorum) or a `ReplicationPlantedBug`. Quorum bugs
    /// are parsed by raw value, so names added to `PlantedBug` later work without a change here.
    public static func plant(_ name: String, into config: inout SimulationConfig) -> Bool {
        if let q = PlantedBug(rawValue: name) { config.quorumBugs.insert(q); return true }
        if let r = ReplicationPlantedBug(rawValue: name) { config.replicationBugs.insert(r); return true }
        return false
    }

    /// Every bug name this build knows.
    public static var plantableBugs: [String] {
        PlantedBug.allCases.map(\.rawValue) + ReplicationPlantedBug.allCases.map(\.rawValue)
    }
}

/// The world of one run: two data nodes (each the real `NodeRuntime` + `NodeCore` and a
/// `SimVolume` around the real `ReplicationCore`), the arbitrator (`ArbitratorRuntime` +
/// `ArbitratorCore`), the quorum network, the replication link, disks, clocks, a client
/// workload, an operator, faults — all from one `SplitMix64` seeded by the run's seed — and
/// the acceptance invariants checked after every event.
final class Simulator {
    static let cluster = "sim"
    static let names: [NodeID] = ["a", "b", "w"]
    static let arbitratorName: NodeID = "w"
    static func index(of n: NodeID) -> Int { n == names[0] ? 0 : n == names[1] ? 1 : 2 }

    let config: SimulationConfig
    var rng: SplitMix64
    private(set) var now: Int64 = 0
    private var queue = EventQueue()

    let quorumSettings: QuorumSettings
    let proto: ReplicationProtocol
    let policy: SplitBrainPolicy
    let chunkCount: Int
    let chunkBytes = 4096
    let resyncRate: Int

    var nodes: [SimNode] = []
    var arbitrator: SimArbitrator!
    var quorum: QuorumNet!
    var link: ReplicationLink!

    private var violation: SimulationViolation?
    private var traceLines: [String] = []
    private var stats = SimulationStats()
    private var setup = ""

    // Phases.
    private let warmup: Int64 = 2_000_000_000
    private var faultEnd: Int64 = 0
    /// Waits are measured from here: 0, or the scripted link drop (a request in flight then
    /// counts from the drop).
    private var measureFrom: Int64 = 0
    private var healAt: Int64 = .max
    private let liveBound: Int64 = 12_000_000_000
    private var endAt: Int64 = .max
    private var live = false

    init(_ config: SimulationConfig) {
        self.config = config
        var rng = SplitMix64(seed: config.seed &* 0x9E37_79B9_7F4A_7C15 &+ 0x51ED)
        let presets: [LeaseTimings] = [
            .defaults,
            LeaseTimings(renewInterval: .milliseconds(100), lease: .milliseconds(700), failureTimeout: .milliseconds(450), drift: 0.1),
            LeaseTimings(renewInterval: .milliseconds(150), lease: .milliseconds(1000), failureTimeout: .milliseconds(600), drift: 0.25),
        ]
        let timings = presets[Int(rng.next() % UInt64(presets.count))]
        precondition(timings.violations().isEmpty, "simulator timings break the lease rule: \(timings.violations())")
        policy = rng.next() % 10 == 0 ? .allow : .prohibit
        quorumSettings = QuorumSettings(timings: timings, splitBrain: policy, plantedBugs: config.quorumBugs, jitterSeed: config.seed)
        proto = [ReplicationProtocol.c, .c, .c, .b, .a][Int(rng.next() % 5)]
        chunkCount = [16, 32, 32, 64][Int(rng.next() % 4)]
        resyncRate = [128 << 10, 512 << 10, 4 << 20][Int(rng.next() % 3)]
        self.rng = rng
        history = [[WriteRecord]](repeating: [], count: chunkCount)
        historyBase = [Int](repeating: 0, count: chunkCount)
        reinsertAt = [Int](repeating: 0, count: chunkCount)
    }

    func replicationSettings(for i: Int) -> ReplicationSettings {
        var s = ReplicationSettings(me: Self.names[i], peer: Self.names[1 - i], sizeBytes: UInt64(chunkCount * chunkBytes),
                                    chunkBytes: chunkBytes, replicationProtocol: proto,
                                    activityLogExtentBytes: 4 * chunkBytes, activityLogExtents: 4, windowChunks: 4,
                                    resyncRateBytesPerSecond: resyncRate)
        s.plantedBugs = config.replicationBugs
        return s
    }

    // MARK: - randomness, time, trace

    func uniform(_ lo: Int64, _ hi: Int64) -> Int64 { hi <= lo ? lo : lo + Int64(rng.next() % UInt64(hi - lo)) }
    func chance(_ p: Double) -> Bool { p > 0 && Double(rng.next() >> 11) / Double(1 << 53) < p }
    static func ms(_ v: Int64) -> Int64 { v * 1_000_000 }

    static func fmt(_ t: Int64) -> String {
        let ms = t / 1_000_000
        let frac = String(ms % 1000)
        return "\(ms / 1000).\(String(repeating: "0", count: 3 - frac.count))\(frac)s"
    }

    func trace(_ line: @autoclosure () -> String) {
        if config.trace { traceLines.append("\(Self.fmt(now)) \(line())") }
    }

    func violate(_ invariant: Int, _ message: String) {
        guard violation == nil else { return }
        violation = SimulationViolation(invariant: invariant, message: message, time: now)
        trace("VIOLATION (\(invariant)): \(message)")
    }

    func at(_ t: Int64, _ f: @escaping () -> Void) { queue.push(max(t, now), f) }

    /// Work for node `n`'s process: dropped if the process died meanwhile, held while it is
    /// stopped or frozen (in arrival order), run when it runs again.
    func onNode(_ n: SimNode, after d: Int64, _ f: @escaping () -> Void) {
        let inc = n.incarnation
        at(now + d) { [self] in fire(n, inc, f) }
    }

    func onNode(_ n: SimNode, afterLocal d: Int64, _ f: @escaping () -> Void) {
        onNode(n, after: n.clock.realDelay(forLocal: d), f)
    }

    private func fire(_ n: SimNode, _ inc: Int, _ f: @escaping () -> Void) {
        guard n.up, n.incarnation == inc else { return }
        if n.suspendedUntil != nil {
            n.deferred.append { [self] in fire(n, inc, f) }
            return
        }
        f()
    }

    private func resume(_ n: SimNode) {
        guard n.suspendedUntil == nil else { return }
        let work = n.deferred
        n.deferred = []
        for w in work { at(now, w) }
    }

    private func onArbitrator(_ f: @escaping () -> Void) {
        let w = arbitrator!
        let inc = w.incarnation
        func attempt() {
            guard w.up, w.incarnation == inc else { return }
            if w.suspendedUntil != nil { w.deferred.append(attempt); return }
            f()
        }
        attempt()
    }

    private func resumeArbitrator() {
        let w = arbitrator!
        guard w.suspendedUntil == nil else { return }
        let work = w.deferred
        w.deferred = []
        for f in work { at(now, f) }
    }

    func ioLatency(sync: Bool) -> Int64 {
        if chance(0.01) { return uniform(Self.ms(5), Self.ms(40)) }
        return sync ? uniform(300_000, 2_000_000) : uniform(30_000, 300_000)
    }

    func serviceStopDelay(wasPrimary: Bool) -> Int64 {
        guard wasPrimary else { return 1_000_000 }
        // Sometimes a resource takes longer to stop than failure_timeout.
        if chance(0.2) { return quorumSettings.timings.failureTimeout.nanosecondsClamped + uniform(Self.ms(50), Self.ms(600)) }
        return uniform(Self.ms(2), Self.ms(60))
    }

    func operatorDelay() -> Int64 { uniform(Self.ms(300), Self.ms(1500)) }

    // MARK: - run

    func run() -> SimulationResult {
        quorum = QuorumNet(sim: self)
        link = ReplicationLink(sim: self)
        let drift = quorumSettings.timings.drift
        // Rates within the drift bound: r_voter / r_master ≤ 1/(1 − drift) for every pair.
        let x = drift / (2 - drift) * 0.98
        func rate() -> Double {
            switch rng.next() % 4 {
            case 0: return 1 - x
            case 1: return 1 + x
            default: return 1 + (Double(rng.next() % 2001) / 1000 - 1) * x
            }
        }
        for i in 0..<2 {
            nodes.append(SimNode(sim: self, index: i, name: Self.names[i], peer: Self.names[1 - i],
                                 disk: SimDisk(sizeBytes: chunkCount * chunkBytes, chunkBytes: chunkBytes),
                                 clock: SimClock(rate: rate(), offset: uniform(0, Self.ms(100_000)))))
        }
        arbitrator = SimArbitrator(sim: self, clock: SimClock(rate: rate(), offset: uniform(0, Self.ms(100_000))),
                                   initial: ArbitratorPersistentState.fresh(using: &rng))
        link.linkTimeout = uniform(Self.ms(400), Self.ms(1500))
        link.latency = [(Int64(100_000), Int64(1_000_000)), (Int64(500_000), Int64(5_000_000)), (Int64(2_000_000), Int64(20_000_000))][Int(rng.next() % 3)]
        let faultPhase = uniform(Self.ms(3000), Self.ms(6000))
        faultEnd = warmup + faultPhase
        setup = "protocol \(proto) split_brain=\(policy.rawValue) \(quorumSettings.timings) rates a=\(nodes[0].clock.rate) b=\(nodes[1].clock.rate) w=\(arbitrator.clock.rate) "
            + "\(chunkCount)×4KiB resync \(resyncRate >> 10) KiB/s link timeout \(Self.fmt(link.linkTimeout)) latency \(link.latency.0 / 1000)–\(link.latency.1 / 1000) µs"
        trace("seed \(config.seed): \(setup)")

        arbitrator.start()
        for n in nodes { at(uniform(0, Self.ms(50))) { [self] in n.start(); _ = self } }
        link.dialLoop()
        // How this pair gets its first data (docs/replication.md "Disk identity and bootstrap").
        switch rng.next() % 3 {
        case 0: trace("start: two fresh, provably empty stores (they pair by themselves)")
        case 1:
            let src = Int(rng.next() % 2)
            at(Self.ms(300)) { [self] in nodes[src].admin(.bootstrap(assumeClean: false)) }
        default:
            at(Self.ms(300)) { [self] in nodes[0].admin(.bootstrap(assumeClean: true)) }
        }
        at(Self.ms(100)) { [self] in clientLoop() }
        stats.requestBoundNanoseconds = quorumSettings.timings.renewInterval.nanosecondsClamped
            + max(quorumSettings.timings.failureTimeout.nanosecondsClamped, link.linkTimeout)
        if let d = config.linkDropMilliseconds {
            at(warmup + uniform(0, Self.ms(500))) { [self] in dropLinkWithRequestsInFlight(downFor: Self.ms(d)) }
            faultEnd = warmup + Self.ms(d) + Self.ms(600)
        }
        let faults = config.linkDropMilliseconds == nil ? 1 + Int(rng.next() % 8) : 0
        for _ in 0..<faults {
            let t = uniform(warmup, faultEnd)
            at(t) { [self] in injectRandomFault(maxDuration: max(Self.ms(50), faultEnd - now)) }
        }
        at(faultEnd) { [self] in heal() }

        while violation == nil, let e = queue.pop() {
            if e.time > endAt { break }
            now = e.time
            stats.events += 1
            e.run()
            if violation == nil { checkInvariants() }
        }
        if violation == nil, !live {
            violate(6, "no master with an in-sync backup within \(Self.fmt(liveBound)) after the faults healed")
        }
        for n in nodes where n.up {
            guard let v = n.vol else { continue }
            let stuck = v.asked.filter { $0.value.1 == n.suspensions && now - max($0.value.0, measureFrom) > stats.requestBoundNanoseconds }
            stats.unanswered += stuck.count
            // (7) Every request gets its answer: by the end of the run, well after the faults
            // healed, one older than the bound on a node that never stopped meanwhile is stuck
            // (seeds 3183, 4667, 5393: a flush caught by a link drop, the link back in sync).
            if let (id, asked) = stuck.min(by: { $0.value.0 < $1.value.0 }), violation == nil {
                violate(7, "\(n.name): \(v.requests[id].map { "\($0)" } ?? "request \(id)") asked at \(Self.fmt(asked.0)) is still unanswered")
            }
        }
        stats.simulatedNanoseconds = now
        return SimulationResult(seed: config.seed, setup: setup, violation: violation, trace: traceLines, stats: stats)
    }

    // MARK: - quorum delivery

    func deliverQuorum(from: Int, to: Int, _ bytes: [UInt8]) {
        guard let m = try? QuorumMessage.decode(bytes) else {
            return violate(5, "quorum message from \(Self.names[from]) did not decode")
        }
        if to == 2 {
            onArbitrator { [self] in
                trace("w <- \(Self.names[from]) \(m)")
                arbitrator.receive(from: Self.names[from], m)
            }
        } else {
            let n = nodes[to]
            onNode(n, after: 0) { [self] in
                trace("\(n.name) <- \(Self.names[from]) \(m)")
                n.runtime?.feed(.received(from: Self.names[from], m))
                if n.residualWindow == .untilVoterReply, let p = m.reportedPromise, let g = n.vol?.core.gate, p > g.epoch {
                    n.residualWindow = nil
                }
            }
        }
    }

    func quorumLinkUp(_ i: Int, _ j: Int) -> Bool { !quorum.cut[i][j] && !quorum.cut[j][i] }

    private func announceArbitratorLink(up: Bool) {
        for n in nodes where n.up {
            let ok = up && arbitrator.up && quorumLinkUp(n.index, 2)
            onNode(n, after: 1_000_000) { n.runtime?.feed(ok ? .linkUp(Self.arbitratorName) : .linkDown(Self.arbitratorName)) }
        }
    }

    // MARK: - client workload

    private func clientLoop() {
        at(now + uniform(Self.ms(15), Self.ms(60))) { [self] in
            clientOp()
            clientLoop()
        }
    }

    /// One client request at every node whose volume believes it is primary (a client that
    /// has not noticed a failover keeps talking to the old master).
    private func clientOp() {
        for n in nodes where n.up && n.suspendedUntil == nil {
            guard let v = n.vol, v.core.role == .primary else { continue }
            let r = rng.next() % 100
            if r < 65 {
                let chunk = Int(rng.next() % UInt64(chunkCount))
                let tag: UInt64 = rng.next() % 10 == 0 ? 0 : nextTag()
                let fua = rng.next() % 7 == 0
                let index = historyBase[chunk] + history[chunk].count
                history[chunk].append(WriteRecord(tag: tag, by: n.index))
                trace("\(n.name) client write chunk \(chunk) tag \(tag)\(fua ? " FUA" : "")")
                v.submit(.write(chunk: chunk, tag: tag, index: index, fua: fua))
            } else if r < 77 {
                trace("\(n.name) client flush")
                v.submit(.flush(submittedAt: now))
            } else {
                let chunk = Int(rng.next() % UInt64(chunkCount))
                guard let bytes = v.read(chunk: chunk) else { continue }
                stats.reads += 1
                guard let tag = Pattern.tag(of: bytes[...]) else {
                    violate(2, "\(n.name) read chunk \(chunk): bytes of no single write (torn or mixed)"); return
                }
                if policy == .prohibit, n.residualWindow == nil, !allowed(chunk, tag) {
                    violate(1, "\(n.name) (epoch \(v.core.gate.epoch)) answered a read of chunk \(chunk) with tag \(tag), older than the newest acknowledged write \(describeFloor(chunk)): a stale master served a read while another acknowledged writes")
                }
            }
        }
    }

    private var tagCounter: UInt64 = 0
    private func nextTag() -> UInt64 { tagCounter += 1; return (config.seed << 24) ^ tagCounter | 1 << 63 }

    // MARK: - the model of acknowledged content

    struct WriteRecord {
        var tag: UInt64
        /// The node it was submitted to (-1: a rebaseline's reference content).
        var by: Int = -1
        /// Real time of the acknowledgement; -1 while not acknowledged.
        var ackedAt: Int64 = -1
        /// Acknowledged and made durable on both nodes (FUA, or a later acknowledged flush).
        var durable = false
        /// The node that acknowledged it alone (its peer outdated at the arbitrator, not in
        /// sync): by design its only copy is on that node's disk until a resync.
        var soleHolder: Int? = nil
        /// Its write frame was queued to the peer (the submitter's I/O queue sent it).
        var queued = false
        /// The other node's core took it: its write frame, or a resync chunk holding it.
        var peerGot = false
        /// Protocol A: the other node took over without a handover while this write was only
        /// queued to it — the loss protocol A allows (see `floor`).
        var mayBeLost = false
    }

    /// Per chunk, every write submitted to any master, in submission order.
    private var history: [[WriteRecord]]
    private var historyBase: [Int]
    /// Per chunk, where a write in flight across the last rebaseline is placed when it is
    /// acknowledged (after the reference and the ones placed before it).
    private var reinsertAt: [Int]
    private var lastPowerLoss: Int64 = -1
    private var lastCrash: Int64 = -1
    private var lastLinkLoss: Int64 = -1
    private var lastAck: (node: Int, epoch: Epoch)?

    func noteLinkLoss() { lastLinkLoss = now }

    /// The newest acknowledged write of a chunk that the protocol promises to keep
    /// (docs/replication.md "What an acknowledgement promises"):
    /// - durable ones (FUA, or covered by an acknowledged flush: both disks synced) always;
    /// - C (peer wrote it): unless a power loss came after the acknowledgement (the peer's
    ///   copy was in its page cache);
    /// - B (peer received it): unless a crash came after it (received, not yet written);
    /// - A (local write + queued to the peer): as B once the peer took the frame; a write the
    ///   peer had not taken may be lost exactly when the peer takes over without a handover
    ///   (master crash, isolation or lease lapse, demote, disk failure): `mayBeLost`, set at
    ///   that promotion. A planned switchover drains first, so it loses nothing; a link loss
    ///   alone loses nothing (the master keeps the write and resyncs it).
    private func floor(_ c: Int) -> Int {
        let relaxAfter: Int64
        switch proto {
        case .c: relaxAfter = lastPowerLoss
        case .b, .a: relaxAfter = lastCrash
        }
        let h = history[c]
        var k = h.count - 1
        while k >= 0 {
            let w = h[k]
            if w.ackedAt >= 0 && (w.durable || (w.ackedAt > relaxAfter && !w.mayBeLost)) { return k }
            k -= 1
        }
        return -1
    }

    /// The last switchover handover: the node that handed over (its peer's next promotion is
    /// planned, not a takeover).
    private var handover: Int?

    func handedOver(from i: Int) { handover = i }

    /// Protocol A: `n` takes over from its peer without a handover; what the peer acknowledged
    /// but had only queued to `n` may be lost from now on.
    private func takeover(by n: SimNode) {
        guard proto == .a, handover != 1 - n.index else { return }
        var relaxed = 0
        for c in 0..<chunkCount {
            for k in history[c].indices {
                let w = history[c][k]
                if w.by == 1 - n.index, w.ackedAt >= 0, w.queued, !w.peerGot, !w.durable, !w.mayBeLost {
                    history[c][k].mayBeLost = true
                    relaxed += 1
                }
            }
        }
        if relaxed > 0 { trace("model: protocol A takeover by \(n.name): \(relaxed) acknowledged writes it never received may be lost") }
    }

    /// `from`'s I/O queue sent a write frame to its peer.
    func writeQueued(_ from: Int, _ m: LinkMessage) {
        guard case let .write(_, offset, _, _, data) = m else { return }
        let c = Int(offset) / chunkBytes
        guard c < chunkCount else { return }
        let tag = data.flatMap { Pattern.tag(of: Array($0.readableBytesView)[...]) } ?? 0
        // The newest match: data tags are unique, but every zero write has tag 0, and an
        // older zero write that was never sent (issued while no link followed) must not take
        // the mark of the one being sent now (seed 3001: a later zero write counted as never
        // queued, so protocol A's allowance for it did not apply).
        if let k = history[c].lastIndex(where: { $0.by == from && $0.tag == tag && !$0.queued }) { history[c][k].queued = true }
    }

    /// Node `to`'s core took a write frame or a resync chunk.
    func peerReceived(_ to: Int, _ m: LinkMessage) {
        switch m {
        case let .write(_, offset, _, _, data):
            let c = Int(offset) / chunkBytes
            guard c < chunkCount else { return }
            let tag = data.flatMap { Pattern.tag(of: Array($0.readableBytesView)[...]) } ?? 0
            if let k = history[c].lastIndex(where: { $0.by == 1 - to && $0.tag == tag && $0.queued && !$0.peerGot }) { history[c][k].peerGot = true }
        case let .resyncData(chunk, data):
            let c = Int(chunk)
            guard c < chunkCount, let tag = Pattern.tag(of: Array(data.readableBytesView)[...]) else { return }
            if let k = history[c].lastIndex(where: { $0.tag == tag }), history[c][k].by != to { history[c][k].peerGot = true }
        case .resyncZeroes(let chunk):
            let c = Int(chunk)
            guard c < chunkCount else { return }
            if let k = history[c].lastIndex(where: { $0.tag == 0 }), history[c][k].by != to { history[c][k].peerGot = true }
        default: break
        }
    }

    private func allowed(_ c: Int, _ tag: UInt64) -> Bool {
        let f = floor(c)
        if f < 0 { return tag == 0 || history[c].contains { $0.tag == tag } }
        for k in f..<history[c].count where history[c][k].tag == tag { return true }
        return false
    }

    private func describeFloor(_ c: Int) -> String {
        let f = floor(c)
        guard f >= 0 else { return "(none)" }
        let w = history[c][f]
        return "tag \(w.tag) acknowledged at \(Self.fmt(w.ackedAt))\(w.durable ? " (durable)" : "")"
    }

    /// Invariant (2): `n`'s bytes hold every acknowledged write the protocol promises.
    private func checkHoldsAcknowledged(_ n: SimNode, _ why: String) {
        guard policy == .prohibit else { return }
        for c in 0..<chunkCount {
            let bytes = n.disk.current[c * chunkBytes..<(c + 1) * chunkBytes]
            guard let tag = Pattern.tag(of: bytes) else {
                return violate(2, "\(n.name) \(why): chunk \(c) holds bytes of no single write")
            }
            if !allowed(c, tag) {
                return violate(2, "\(n.name) \(why) without an acknowledged write: chunk \(c) holds tag \(tag), newest promised is \(describeFloor(c))")
            }
        }
    }

    /// A forced promotion, a lone promotion under `allow`, a bootstrap or the side an operator
    /// keeps when resolving a split brain makes this node's bytes the truth from now on (acknowledged writes elsewhere may be discarded by design).
    private func rebaseline(_ n: SimNode, _ why: String) {
        trace("model: \(n.name)'s data is the reference from now on (\(why))")
        for c in 0..<chunkCount {
            let tag = Pattern.tag(of: n.disk.current[c * chunkBytes..<(c + 1) * chunkBytes]) ?? 0
            historyBase[c] += history[c].count
            history[c] = [WriteRecord(tag: tag, ackedAt: now, durable: false)]
            reinsertAt[c] = 1
        }
    }

    /// `n` acknowledges without its peer: the arbitrator outdated the peer (the gate no longer
    /// requires it) and the peer is not in sync.
    private func acknowledgedAlone(_ n: SimNode) -> Bool {
        guard let v = n.vol else { return false }
        return !v.core.gate.peerRequired && v.status.peerState != .inSync
    }

    /// Node `i`'s store was destroyed (replaced by an empty one). With two replicas no product
    /// keeps what existed only there, so the promise for such a chunk falls back to what the
    /// surviving store holds — but only where losing it is by design: the surviving store is
    /// itself a replacement that never received data (both copies gone), or the newest
    /// promised write was acknowledged (or made durable by a flush) by `i` alone (peer outdated
    /// at the arbitrator, docs/replication.md "Data path" step 5: one copy until the resync). A promised write
    /// the survivor should hold and does not stays a violation. (Seeds 113, 370, 1518, 1671,
    /// 1698, 1950: the master wrote alone, then lost its disk; seed 1288: both disks replaced.)
    private func diskDestroyed(_ i: Int) {
        let survivor = nodes[1 - i].disk
        for c in 0..<chunkCount {
            let tag = Pattern.tag(of: survivor.current[c * chunkBytes..<(c + 1) * chunkBytes]) ?? 0
            let f = floor(c)
            guard f >= 0, !allowed(c, tag), !survivor.everWritten || history[c][f].soleHolder == i else { continue }
            trace("model: chunk \(c)'s promised content (\(describeFloor(c))) existed only on \(Self.names[i])'s destroyed store; the survivor's tag \(tag) is the reference")
            historyBase[c] += history[c].count
            history[c] = [WriteRecord(tag: tag, ackedAt: now, durable: false)]
            reinsertAt[c] = 1
        }
    }

    private func prune(_ c: Int) {
        guard history[c].count > 64 else { return }
        guard let d = history[c].lastIndex(where: { $0.durable }), d > 0 else { return }
        history[c].removeFirst(d)
        historyBase[c] += d
    }

    // MARK: - hooks from the volumes

    /// A client request completed. Invariant (1): acknowledgements ordered by real time never
    /// go back in epoch, and two nodes never acknowledge in the same epoch.
    /// A request submitted at `since` (real time) got its answer now.
    func answered(_ n: SimNode, _ op: ClientOp, since: Int64, suspensions: Int, error: VolumeError?) {
        guard n.suspensions == suspensions else { return }
        let waited = now - max(since, measureFrom)
        if waited > stats.longestRequestNanoseconds {
            stats.longestRequestNanoseconds = waited
            stats.longestRequest = "\(n.name) \(op) at \(Self.fmt(since)): \(error.map { "\($0)" } ?? "acknowledged") after \(Self.fmt(waited))"
        }
    }

    func completed(_ n: SimNode, _ op: ClientOp, error: VolumeError?, epoch: Epoch) {
        guard error == nil else { return }
        if n.residualWindow != nil {
            // Inside a VM freeze's documented residual window the product promises nothing
            // for gate-only acknowledgements (protocol A) and reads: not counted as acknowledged.
            trace("\(n.name) ack in the residual window of a freeze (not counted)")
            return
        }
        if policy == .prohibit {
            if let last = lastAck {
                if epoch < last.epoch {
                    violate(1, "\(n.name) acknowledged a write in epoch \(epoch) after \(Self.names[last.node]) acknowledged in epoch \(last.epoch): two masters acknowledging")
                } else if epoch == last.epoch, n.index != last.node {
                    violate(1, "\(n.name) and \(Self.names[last.node]) both acknowledged writes in epoch \(epoch)")
                }
            }
            if epoch >= (lastAck?.epoch ?? .zero) { lastAck = (n.index, epoch) }
        }
        switch op {
        case let .write(chunk, tag, index, fua):
            stats.writesAcked += 1
            trace("\(n.name) ACK write chunk \(chunk) tag \(tag) (epoch \(epoch))")
            var k = index - historyBase[chunk]
            if k < 0 || k >= history[chunk].count || history[chunk][k].tag != tag {
                if let j = history[chunk].lastIndex(where: { $0.tag == tag && $0.by == n.index && $0.ackedAt < 0 }) {
                    k = j
                } else {
                    // The model was rebaselined while this write was in flight (seed 4783: a
                    // forced promotion's reference taken before the write reached the disk).
                    // Submitted before every write recorded since, it goes right after the
                    // reference (and after writes placed there the same way), not at the end
                    // (seed 1886: a newer write was submitted and written meanwhile).
                    let at = min(reinsertAt[chunk], history[chunk].count)
                    history[chunk].insert(WriteRecord(tag: tag, by: n.index), at: at)
                    reinsertAt[chunk] = at + 1
                    k = at
                }
            }
            history[chunk][k].ackedAt = now
            if fua { history[chunk][k].durable = true }
            if acknowledgedAlone(n) { history[chunk][k].soleHolder = n.index }
            prune(chunk)
        case .flush(let submittedAt):
            stats.flushesAcked += 1
            trace("\(n.name) ACK flush (epoch \(epoch))")
            // A flush makes durable what the flushing node holds: per chunk, the newest write
            // acknowledged before the flush was submitted, if that (or a later write) is what
            // this node's store holds (a write it never got stays as promised as it was). A
            // flush acknowledged alone makes it durable on this node only.
            let alone = acknowledgedAlone(n)
            for c in 0..<chunkCount {
                let held = Pattern.tag(of: n.disk.current[c * chunkBytes..<(c + 1) * chunkBytes])
                guard let k = history[c].lastIndex(where: { $0.ackedAt >= 0 && $0.ackedAt <= submittedAt }) else { continue }
                if let h = held, let j = history[c].lastIndex(where: { $0.tag == h }), j >= k {
                    if !history[c][k].durable {
                        history[c][k].durable = true
                        if alone { history[c][k].soleHolder = n.index }
                    }
                    prune(c)
                }
            }
        }
    }

    /// Invariants (2) and (4) at every promotion.
    func promoted(_ n: SimNode, epoch: Epoch, newGeneration: Bool) {
        stats.promotions += 1
        trace("\(n.name) BECOMES PRIMARY epoch \(epoch)\(newGeneration ? " (new generation)" : "")")
        defer { handover = nil }
        if newGeneration { return rebaseline(n, "promoted in a new generation") }
        takeover(by: n)
        if let rt = n.runtime, let v = n.vol {
            let reported = rt.reportedDisk(v.status.diskState)
            if reported != .upToDate { violate(4, "\(n.name) promoted in epoch \(epoch) with its disk \(reported)") }
        }
        checkHoldsAcknowledged(n, "promoted in epoch \(epoch)")
    }

    func bootstrapped(_ n: SimNode) { rebaseline(n, "bootstrap") }

    // MARK: - invariants after every event

    private var lastSyncVersions: (UInt64, UInt64, Int) = (.max, .max, -1)

    private func checkInvariants() {
        // (5) epochs never go back.
        for n in nodes where n.up {
            guard let e = n.runtime?.core.status.epoch else { continue }
            if e < n.maxEpoch { violate(5, "\(n.name) epoch went back from \(n.maxEpoch) to \(e)") }
            n.maxEpoch = max(n.maxEpoch, e)
        }
        checkOpenGates()
        checkSyncPoint()
        checkLiveness()
    }

    /// (1) on the gates themselves: never two nodes whose gates allow acknowledging at one real
    /// instant (each judged on its own clock). The one allowance is the documented residual
    /// window of a VM freeze (docs/quorum-protocol.md §2b, `SimNode.residualWindow`).
    private func checkOpenGates() {
        guard policy == .prohibit else { return }
        let open = nodes.filter { n in
            guard n.up, n.suspendedUntil == nil, n.residualWindow == nil, let v = n.vol else { return false }
            return v.core.role == .primary && v.core.gate.allowsAck(at: n.localNow())
        }
        if open.count > 1, let a = open.first, let b = open.last, let ga = a.vol?.core.gate, let gb = b.vol?.core.gate {
            violate(1, "two open gates at one real instant: \(a.name) epoch \(ga.epoch), \(b.name) epoch \(gb.epoch)")
        }
    }

    /// (3) At a sync point — the link in sync on both sides, nothing in flight anywhere — a node
    /// that reports upToDate holds its source's bytes.
    private func checkSyncPoint() {
        let a = nodes[0], b = nodes[1]
        guard let s = link.session, s.alive, a.up, b.up, let va = a.vol, let vb = b.vol,
              let ra = a.runtime, let rb = b.runtime else { return }
        let key = (a.disk.version, b.disk.version, Int(s.id))
        if key == lastSyncVersions { return }
        guard s.heads[0] == s.inbox[0].count, s.heads[1] == s.inbox[1].count, s.held[0].isEmpty, s.held[1].isEmpty,
              va.ioIdle, vb.ioIdle, va.requests.isEmpty, vb.requests.isEmpty else { return }
        let sa = va.status, sb = vb.status
        guard sa.peerState == .inSync, sb.peerState == .inSync, sa.inFlightWrites == 0, sb.inFlightWrites == 0,
              sa.replicationLagBytes == 0, sb.replicationLagBytes == 0, sa.outOfSyncBytes == 0, sb.outOfSyncBytes == 0,
              ra.reportedDisk(sa.diskState) == .upToDate, rb.reportedDisk(sb.diskState) == .upToDate else { return }
        lastSyncVersions = key
        stats.syncChecks += 1
        if a.disk.current != b.disk.current {
            var c = 0
            while c < chunkCount, a.disk.current[c * chunkBytes..<(c + 1) * chunkBytes] == b.disk.current[c * chunkBytes..<(c + 1) * chunkBytes] { c += 1 }
            let ta = Pattern.tag(of: a.disk.current[c * chunkBytes..<(c + 1) * chunkBytes]).map { String($0) } ?? "mixed"
            let tb = Pattern.tag(of: b.disk.current[c * chunkBytes..<(c + 1) * chunkBytes]).map { String($0) } ?? "mixed"
            violate(3, "sync point (link in sync, nothing in flight, both report upToDate) but the stores differ: chunk \(c) is tag \(ta) on a, \(tb) on b")
        }
    }

    /// (6) After the faults heal: one master and an in-sync backup within `liveBound`.
    private func checkLiveness() {
        guard now >= healAt, !live else { return }
        for m in nodes where m.up && m.suspendedUntil == nil {
            guard let rt = m.runtime, let v = m.vol, rt.core.status.role == .primary, v.core.gate.allowsAck(at: m.localNow()),
                  v.status.peerState == .inSync else { continue }
            let p = nodes[1 - m.index]
            // The peer must follow this master (a frozen master thawing with its lease still
            // valid by its stopped clock is not "the" master).
            guard p.up, let pr = p.runtime, let pv = p.vol, pr.reportedDisk(pv.status.diskState) == .upToDate,
                  pr.core.status.master == m.name, pr.core.status.epoch == rt.core.status.epoch else { continue }
            live = true
            stats.liveAfterHealNanoseconds = now - healAt
            trace("LIVE: \(m.name) master with \(p.name) in sync, \(Self.fmt(now - healAt)) after the heal")
            checkHoldsAcknowledged(m, "is master after the heal")
            endAt = now + Self.ms(300)
            return
        }
        if now > healAt + liveBound {
            violate(6, "no master with an in-sync backup within \(Self.fmt(liveBound)) after the faults healed")
        }
    }

    // MARK: - faults

    enum Fault {
        case quorumCut(from: Int, to: Int)
        case replicationCut(from: Int, to: Int)
        case isolate(Int)
        case crash(Int, powerLoss: Bool, replaceDisk: Bool)
        case pause(Int)
        case freeze(Int)
        /// A paused VM whose peer cannot reach it for a while after the thaw (a one-way cut
        /// from the peer), with its wall clock not synced on resume: only the voters' replies
        /// tell it about the newer epoch (the newer-epoch rule, §2b rule 2).
        case freezeBehindCut(Int)
        /// A data node's inbound quorum path turns slow (every reply to it arrives late) and
        /// then its outbound path fails: its last renewals are granted, but the grants arrive
        /// long after they were sent — the case that tells a lease anchored at the request's
        /// send time from one anchored at the reply's arrival.
        case lateRepliesThenCut(Int)
        case arbitratorCrash(loseState: Bool)
        case arbitratorRollback
        case diskError(Int, errno: Int32)
        case chaos
        case garble
        case switchover
        case demote
        case promote(force: Bool)
        case invalidate
        case verify
        case maintenance
    }

    private func randomFault() -> Fault {
        let i = Int(rng.next() % 2)
        let any = Int(rng.next() % 3)
        switch rng.next() % 40 {
        case 0, 1, 2: let f = Int(rng.next() % 3); return .quorumCut(from: f, to: (f + 1 + Int(rng.next() % 2)) % 3)
        case 3, 4, 5: return .replicationCut(from: i, to: 1 - i)
        case 6, 7, 8: return .isolate(any)
        case 9, 10: return .crash(i, powerLoss: false, replaceDisk: false)
        case 11, 12, 13: return .crash(i, powerLoss: true, replaceDisk: false)
        case 14: return .crash(i, powerLoss: true, replaceDisk: true)
        case 15, 16: return any == 2 ? .arbitratorCrash(loseState: false) : .pause(any)
        case 17, 18: return .freeze(any)
        case 19: return .arbitratorCrash(loseState: false)
        case 20: return .arbitratorCrash(loseState: rng.next() % 2 == 0)
        case 21: return config.arbitratorRollback ? .arbitratorRollback : .arbitratorCrash(loseState: false)
        case 22, 23: return .diskError(i, errno: rng.next() % 3 == 0 ? 28 : 5)
        case 24, 25: return .chaos
        case 26: return .garble
        case 27, 28, 29: return .switchover
        case 30, 31: return .demote
        case 32, 33: return .promote(force: false)
        case 34: return .promote(force: true)
        case 35: return .invalidate
        case 36: return .verify
        case 37: return .maintenance
        case 38: return .lateRepliesThenCut(i)
        case 39: return .freezeBehindCut(i)
        default: return .pause(any)
        }
    }

    private var master: SimNode? { nodes.first { $0.up && $0.runtime?.core.status.role == .primary } }
    private var secondary: SimNode? { nodes.first { $0.up && $0.runtime?.core.status.role == .secondary } }

    private func injectRandomFault(maxDuration: Int64) {
        let d = max(Self.ms(50), min(maxDuration, uniform(Self.ms(100), Self.ms(3000))))
        let f = randomFault()
        stats.faults += 1
        trace("FAULT \(f) for \(Self.fmt(d))")
        switch f {
        case let .quorumCut(from, to):
            quorum.cut[from][to] = true
            if from == 2 || to == 2 { announceArbitratorLink(up: false) }
            at(now + d) { [self] in
                quorum.cut[from][to] = false
                if from == 2 || to == 2 { announceArbitratorLink(up: true) }
            }
        case let .replicationCut(from, to):
            link.setCut(from: from, to: to, true)
            at(now + d) { [self] in link.setCut(from: from, to: to, false) }
        case .isolate(let i):
            for j in 0..<3 where j != i { quorum.cut[i][j] = true; quorum.cut[j][i] = true }
            if i < 2 { link.setCut(from: i, to: 1 - i, true); link.setCut(from: 1 - i, to: i, true) }
            announceArbitratorLink(up: false)
            at(now + d) { [self] in
                for j in 0..<3 where j != i { quorum.cut[i][j] = false; quorum.cut[j][i] = false }
                if i < 2 { link.setCut(from: i, to: 1 - i, false); link.setCut(from: 1 - i, to: i, false) }
                announceArbitratorLink(up: true)
            }
        case let .crash(i, powerLoss, replaceDisk):
            let n = nodes[i]
            guard n.up else { return }
            n.crash(powerLoss: powerLoss, why: replaceDisk ? "disk replaced" : "fault")
            lastCrash = now
            lastLinkLoss = now
            if powerLoss { lastPowerLoss = now }
            if replaceDisk {
                n.disk = SimDisk(sizeBytes: chunkCount * chunkBytes, chunkBytes: chunkBytes)
                n.diskFailureRecord = nil
                diskDestroyed(i)
            }
            at(now + d) { [self] in if !n.up && now < healAt { n.start() } }
        case .pause(let i):
            suspend(i, for: d, freeze: false)
        case .freeze(let i):
            suspend(i, for: d, freeze: true)
        case .lateRepliesThenCut(let i):
            quorum.lagTo[i] = uniform(Self.ms(150), Self.ms(900))
            let cutAt = uniform(Self.ms(50), Self.ms(400))
            at(now + cutAt) { [self] in for j in 0..<3 where j != i { quorum.cut[i][j] = true } }
            at(now + max(d, cutAt + Self.ms(100))) { [self] in
                quorum.lagTo[i] = nil
                for j in 0..<3 where j != i { quorum.cut[i][j] = false }
            }
        case .freezeBehindCut(let i):
            let extra = uniform(Self.ms(200), Self.ms(1000))
            quorum.cut[1 - i][i] = true
            at(now + d + extra) { [self] in quorum.cut[1 - i][i] = false }
            suspend(i, for: d, freeze: true, synced: false)
        case .arbitratorCrash(let lose):
            guard arbitrator.up else { return }
            arbitrator.crash()
            announceArbitratorLink(up: false)
            if lose {
                // A rebuilt host: the state is created again (`--init`), a new incarnation.
                arbitrator.durable = ArbitratorPersistentState.fresh(using: &rng)
                arbitrator.maxEpoch = .zero
                trace("w state LOST: restarts as a new incarnation")
            }
            at(now + d) { [self] in if !arbitrator.up { arbitrator.start(); announceArbitratorLink(up: true) } }
        case .arbitratorRollback:
            if let snap = arbitrator.snapshot, arbitrator.up {
                arbitrator.crash()
                arbitrator.durable = snap
                arbitrator.maxEpoch = snap.promisedEpoch
                trace("w state ROLLED BACK to epoch \(snap.promisedEpoch)")
                at(now + d) { [self] in if !arbitrator.up { arbitrator.start(); announceArbitratorLink(up: true) } }
            } else {
                arbitrator.snapshot = arbitrator.durable
            }
        case let .diskError(i, errno):
            nodes[i].disk.failCount = 1
            nodes[i].disk.failErrno = errno
            at(now + d) { [self] in nodes[i].disk.failCount = 0 }
        case .chaos:
            quorum.loss = [0.01, 0.05, 0.2][Int(rng.next() % 3)]
            quorum.duplicate = [0, 0.05, 0.2][Int(rng.next() % 3)]
            quorum.slow = [0, 0.02, 0.1][Int(rng.next() % 3)]
            link.spike = [0, 0.01, 0.05][Int(rng.next() % 3)]
            at(now + d) { [self] in quorum.loss = 0; quorum.duplicate = 0; quorum.slow = 0; link.spike = 0 }
        case .garble:
            link.garble = 0.01
            at(now + d) { [self] in link.garble = 0 }
        case .switchover:
            master?.admin(.switchover)
        case .demote:
            master?.admin(.demote)
        case .promote(let force):
            secondary?.admin(.promote(force: force))
        case .invalidate:
            secondary?.admin(.invalidate)
        case .verify:
            master?.admin(.verify(repair: rng.next() % 2 == 0))
        case .maintenance:
            if let s = secondary {
                s.admin(.maintenance(on: true))
                at(now + d) { s.admin(.maintenance(on: false)) }
            }
        }
    }

    /// Stops a process (its clock runs on) or freezes its VM (its clock stops too).
    private func suspend(_ i: Int, for d: Int64, freeze: Bool, synced: Bool? = nil) {
        if i == 2 {
            let w = arbitrator!
            guard w.up else { return }
            if freeze { w.clock.freeze(at: now) } else { w.pausedUntil = max(w.pausedUntil, now + d) }
            let inc = w.incarnation
            at(now + d) { [self] in
                guard w.incarnation == inc else { return }
                if freeze { w.clock.thaw(at: now) }
                resumeArbitrator()
            }
            return
        }
        let n = nodes[i]
        guard n.up else { return }
        if freeze { n.clock.freeze(at: now) } else { n.pausedUntil = max(n.pausedUntil, now + d) }
        n.suspensions += 1
        let inc = n.incarnation
        if d > link.linkTimeout, let s = link.session {
            at(now + link.linkTimeout) { [self] in
                if let cur = link.session, cur === s, n.incarnation == inc, n.suspendedUntil != nil {
                    link.timeout(by: 1 - i, "\(n.name) silent")
                }
            }
        }
        at(now + d) { [self] in
            guard n.incarnation == inc else { return }
            if freeze { n.thaw(synced: synced ?? (rng.next() % 4 != 0)) }
            resume(n)
        }
    }

    // MARK: - heal and the operator

    /// The scripted link drop: a write and a flush go to the master, the session is reset
    /// under them, and the replication network stays cut for `d`.
    private func dropLinkWithRequestsInFlight(downFor d: Int64) {
        guard let m = master, let v = m.vol else { return trace("link drop: no master") }
        measureFrom = now
        let chunk = Int(rng.next() % UInt64(chunkCount))
        let tag = nextTag()
        history[chunk].append(WriteRecord(tag: tag, by: m.index))
        v.submit(.write(chunk: chunk, tag: tag, index: historyBase[chunk] + history[chunk].count - 1, fua: false))
        v.submit(.flush(submittedAt: now))
        stats.faults += 1
        trace("FAULT link reset with a write and a flush in flight, down for \(Self.fmt(d))")
        for i in 0..<2 { link.setCut(from: i, to: 1 - i, true) }
        link.reset("connection reset")
        at(now + d) { [self] in for i in 0..<2 { link.setCut(from: i, to: 1 - i, false) } }
    }

    private func heal() {
        healAt = now
        trace("HEAL: faults stop; crashed processes restart; the operator repairs")
        quorum.loss = 0; quorum.duplicate = 0; quorum.slow = 0; quorum.lagTo = [nil, nil, nil]
        link.spike = 0; link.garble = 0
        for i in 0..<3 { for j in 0..<3 { quorum.cut[i][j] = false } }
        for i in 0..<2 { for j in 0..<2 where i != j { link.setCut(from: i, to: j, false) } }
        for n in nodes {
            n.disk.failCount = 0
            n.pausedUntil = min(n.pausedUntil, now)
            if n.clock.frozen { n.thaw(synced: true) }
            resume(n)
            if !n.up { n.start() }
        }
        arbitrator.pausedUntil = min(arbitrator.pausedUntil, now)
        arbitrator.clock.thaw(at: now)
        resumeArbitrator()
        if !arbitrator.up { arbitrator.start() }
        announceArbitratorLink(up: true)
        for n in nodes { n.admin(.maintenance(on: false)) }
        operatorLoop()
    }

    /// What an operator does until the pair is healthy again: resolve a split brain on the
    /// secondary (discarding its changes), bootstrap when neither side has consistent data,
    /// accept a rebuilt arbitrator on a node that holds the newest data.
    private var forcedAfterHeal = false

    private func operatorLoop() {
        at(now + Self.ms(400)) { [self] in
            guard !live else { return }
            for n in nodes where n.up {
                guard let v = n.vol, let rt = n.runtime else { continue }
                if v.status.splitBrain != nil, rt.core.status.role == .secondary {
                    // The operator keeps the peer's side: acknowledged writes of this side are
                    // discarded by that decision, and the kept side's bytes are the reference.
                    n.admin(.resolve(discard: .local))
                    rebaseline(nodes[1 - n.index], "the operator resolved the split brain keeping \(nodes[1 - n.index].name)'s side")
                    break
                }
            }
            if nodes.allSatisfy({ $0.up && $0.vol?.status.diskState == .inconsistent }) {
                nodes[0].admin(.bootstrap(assumeClean: false))
            }
            // The last master's newer data is on no disk any more (it wrote alone, then its disk
            // was replaced): no stale copy is elected by itself; the operator accepts the loss.
            if !forcedAfterHeal, now > healAt + Self.ms(3000), master == nil,
               let n = nodes.first(where: { $0.up && $0.vol?.status.diskState == .upToDate
                                            && ($0.runtime?.core.status.whyNotPromoted ?? "").contains("promote --force accepts the loss") }) {
                forcedAfterHeal = true
                trace("operator: the last master's data is lost; promote --force on \(n.name)")
                n.admin(.promote(force: true))
            }
            for n in nodes where n.up {
                guard let rt = n.runtime, let v = n.vol, rt.core.status.arbitratorRefused != nil else { continue }
                if rt.core.status.role == .primary || (v.status.peerState == .inSync && v.status.diskState == .upToDate) {
                    n.admin(.acceptArbitrator)
                }
            }
            operatorLoop()
        }
    }
}
