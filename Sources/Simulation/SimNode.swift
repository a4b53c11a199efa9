import HACore
import NodeRuntime
import Quorum
import Replication

/// A node's clock: real time scaled by a rate within the drift bound, from an offset. A freeze
/// (VM paused) stops it; a pause (process stopped) does not.
struct SimClock {
    var rate: Double
    private var localBase: Int64
    private var realBase: Int64 = 0
    private(set) var frozen = false

    init(rate: Double, offset: Int64) { self.rate = rate; localBase = offset }

    /// The guest's wall clock as synced after a resume: the same oscillator (rate), but it
    /// does not stop during a freeze (the guest agent steps it forward on resume).
    func wall(at real: Int64) -> Int64 { Int64(Double(real) * rate) }

    func local(at real: Int64) -> Int64 {
        frozen ? localBase : localBase + Int64(Double(real - realBase) * rate)
    }

    mutating func freeze(at real: Int64) {
        guard !frozen else { return }
        localBase = local(at: real); realBase = real; frozen = true
    }

    mutating func thaw(at real: Int64) {
        guard frozen else { return }
        realBase = real; frozen = false
    }

    /// Real nanoseconds until this clock has advanced by `local` nanoseconds (ignoring freezes).
    func realDelay(forLocal local: Int64) -> Int64 { Int64(Double(max(0, local)) / rate) + 1 }
}

/// One data node: its durable state (disk with metadata, the quorum state file, the disk
/// failure record) survives crashes; the process — `NodeRuntime` with the real `NodeCore`, and
/// the `SimVolume` with the real `ReplicationCore` — is rebuilt at every start.
final class SimNode: NodeHost, @unchecked Sendable {
    unowned let sim: Simulator
    let index: Int
    let name: NodeID
    let peerName: NodeID

    // durable
    var disk: SimDisk
    var quorumState = NodePersistentState.initial
    var diskFailureRecord: String?

    // process
    var up = false
    /// Times this node was stopped or frozen (a request in flight across one waited for it).
    var suspensions = 0
    var incarnation = 0
    var runtime: NodeRuntime<SimNode>?
    var vol: SimVolume?
    var clock: SimClock
    var pausedUntil: Int64 = 0
    var servicesUp = false
    var servicesFenced = false
    /// After a VM freeze, the window docs/quorum-protocol.md §2b documents, in which the gate
    /// may still look open on the stopped clock: with the guest's wall clock synced on resume,
    /// until the first tick (its freeze detector closes the gate); without, until a voter's
    /// reply reports an epoch above the gate's (the newer-epoch rule closes the gate there).
    enum ResidualWindow: Equatable { case untilTick, untilVoterReply }
    var residualWindow: ResidualWindow?

    func thaw(synced: Bool) {
        guard clock.frozen else { return }
        clock.thaw(at: sim.now)
        residualWindow = synced ? .untilTick : .untilVoterReply
        // An unsynced wall clock stood still with the monotonic one: nothing to detect.
        if !synced { clockJumps = ClockJumpDetector(threshold: .milliseconds(100)) }
        sim.trace("\(name) thawed (wall clock \(synced ? "synced" : "not synced"))")
    }
    /// Work that arrived while the process was stopped or frozen, in arrival order.
    var deferred: [() -> Void] = []

    // invariant bookkeeping
    var maxEpoch = Epoch.zero
    var starts = 0

    init(sim: Simulator, index: Int, name: NodeID, peer: NodeID, disk: SimDisk, clock: SimClock) {
        self.sim = sim; self.index = index; self.name = name; self.peerName = peer; self.disk = disk; self.clock = clock
    }

    func localNow() -> Instant { Instant(nanoseconds: clock.local(at: sim.now)) }

    /// Not running its code right now: stopped (SIGSTOP) or its VM frozen.
    var suspendedUntil: Int64? {
        if clock.frozen { return Int64.max }
        return pausedUntil > sim.now ? pausedUntil : nil
    }

    // MARK: lifecycle

    func start() {
        incarnation += 1
        starts += 1
        clockJumps = ClockJumpDetector(threshold: .milliseconds(100))  // a new process samples afresh
        up = true
        servicesUp = false
        let v = SimVolume(node: self, settings: sim.replicationSettings(for: index), seed: sim.rng.next())
        vol = v
        // Only what was persisted survives, and it goes through the real encoding.
        let persisted = (try? NodePersistentState.decode(quorumState.encoded())) ?? .initial
        let st = v.status
        let repairPending = diskFailureRecord != nil
        let reported: DiskState = repairPending && st.diskState == .upToDate ? .outdated : st.diskState
        let core = NodeCore(cluster: Simulator.cluster, me: name, peer: peerName, arbitrator: Simulator.arbitratorName,
                            settings: sim.quorumSettings, persisted: persisted,
                            disk: LocalDisk(state: reported, generations: st.generations, crashCopyOnPeer: st.crashCopyOnPeer), now: localNow())
        if core.status.epoch < maxEpoch {
            sim.violate(5, "\(name) restarted at epoch \(core.status.epoch) after having promised \(maxEpoch): epoch went back")
        }
        let rt = NodeRuntime(core: core, host: self, repairPending: repairPending)
        runtime = rt
        sim.trace("\(name) starts #\(starts) (epoch \(persisted.promisedEpoch), vote \(persisted.votedFor?.name ?? "-"), disk \(st.diskState) gen \(st.generations.current)\(repairPending ? ", repair pending" : ""))")
        rt.start()
        scheduleTick(first: true)
        if sim.quorumLinkUp(index, 2) { sim.onNode(self, after: 1_000_000) { [self] in runtime?.feed(.linkUp(Simulator.arbitratorName)) } }
    }

    /// The process ends without any cleanup. `powerLoss`: the host lost power (unsynced writes
    /// may be lost); otherwise only the process died (kill -9: the page cache survives).
    func crash(powerLoss: Bool, why: String) {
        guard up else { return }
        up = false
        runtime = nil
        vol = nil
        servicesUp = false
        pausedUntil = 0
        deferred = []
        clock.thaw(at: sim.now)
        residualWindow = nil
        let r = disk.crash(powerLoss: powerLoss, rng: &sim.rng)
        sim.trace("\(name) CRASH (\(why)\(powerLoss ? ", power loss: \(r.lost) unsynced writes lost, \(r.kept) kept" : ""))")
        sim.link.nodeDown(index, abrupt: powerLoss)
    }

    /// An operator's restart: clean volume stop, then start.
    func cleanRestart() {
        guard up else { return }
        vol?.stop()
        up = false
        runtime = nil
        vol = nil
        servicesUp = false
        sim.link.nodeDown(index, abrupt: false)
        sim.trace("\(name) stopped cleanly (operator restart)")
        start()
    }

    private func scheduleTick(first: Bool = false) {
        let period = sim.quorumSettings.timings.renewInterval.nanosecondsClamped / 4
        let inc = incarnation
        sim.onNode(self, afterLocal: first ? Int64(sim.rng.next() % UInt64(period)) : period) { [self] in
            guard incarnation == inc, let rt = runtime else { return }
            // The daemon's freeze detector (wall clock against monotonic clock): the guest's
            // wall clock is synced on resume, as docs/quorum-protocol.md §2b requires.
            if let gap = clockJumps.observe(monotonic: localNow(), reference: Instant(nanoseconds: clock.wall(at: sim.now))) {
                rt.feed(.clockJump(gap))
            }
            if residualWindow == .untilTick { residualWindow = nil }
            rt.feed(.tick)
            tickCount += 1
            if tickCount % 16 == 0 { rt.pollRepair() }
            scheduleTick()
        }
    }
    private var tickCount = 0
    fileprivate(set) var clockJumps = ClockJumpDetector(threshold: .milliseconds(100))

    func admin(_ command: HACore.AdminCommand) {
        guard up, let rt = runtime else { return }
        sim.trace("\(name) OPERATOR \(command)")
        rt.admin(command) { [sim, name] outcome in
            sim.trace("\(name) admin \(command): \(outcome.ok ? "ok" : "refused") \(outcome.message)")
        }
    }

    // MARK: NodeHost

    func now() -> Instant { localNow() }

    func persist(_ state: NodePersistentState) throws {
        if state.promisedEpoch < quorumState.promisedEpoch {
            sim.violate(5, "\(name) persisted epoch \(state.promisedEpoch) below \(quorumState.promisedEpoch)")
        }
        quorumState = state
    }

    func send(_ message: QuorumMessage, to node: NodeID, epoch: Epoch) {
        sim.quorum.send(from: index, to: Simulator.index(of: node), message)
    }

    func log(_ event: QuorumEvent) {
        sim.trace("\(name) \(event)")
        if event.name == "switchedOver" { sim.handedOver(from: index) }
    }

    func fatal(_ reason: String) {
        sim.trace("\(name) FATAL \(reason)")
        let inc = incarnation
        sim.at(sim.now) { [self] in
            guard incarnation == inc else { return }
            crash(powerLoss: false, why: "fatal: \(reason)")
            sim.at(sim.now + 500_000_000) { [self] in if !up { start() } }
        }
    }

    var volume: any NodeVolume { vol! }

    func startServices(epoch: Epoch, kind: PromotionKind) {
        servicesUp = true
        sim.trace("\(name) services started (epoch \(epoch), \(kind.rawValue))")
    }

    func stopServices(epoch: Epoch, master: NodeID?, wasPrimary: Bool, then done: @escaping () -> Void) {
        let delay = sim.serviceStopDelay(wasPrimary: wasPrimary && servicesUp)
        servicesUp = false
        sim.onNode(self, after: delay) { done() }
    }

    func suspendServices(then done: @escaping () -> Void) {
        let delay = sim.serviceStopDelay(wasPrimary: servicesUp)
        servicesUp = false
        sim.onNode(self, after: delay) { done() }
    }

    func resumeServices(epoch: Epoch) {
        servicesUp = true
        sim.trace("\(name) services restarted (abandoned switchover, epoch \(epoch))")
    }

    func fenceServices() {
        servicesFenced = true
        sim.trace("\(name) services fenced")
    }

    func unfenceServices() {
        servicesFenced = false
        sim.trace("\(name) services unfenced")
    }

    func holdServiceRestarts(_ on: Bool) {}

    /// The simulated services have no failure counts to forget.
    func cleanupResources(_ name: String?, reply: @escaping (NodeAdminOutcome) -> Void) {
        reply(.ok("no resources in the simulator"))
    }

    func recordDiskFailure(_ detail: String) {
        diskFailureRecord = detail
        // An operator restarts a node whose store failed (the runtime keeps it diskless until then).
        let inc = incarnation
        sim.at(sim.now + sim.operatorDelay()) { [self] in
            guard incarnation == inc, up else { return }
            cleanRestart()
        }
    }

    func clearDiskFailure() { diskFailureRecord = nil }

    func enqueue(_ work: @escaping @Sendable () -> Void) { sim.onNode(self, after: 0) { work() } }
}

/// The arbitrator: the real `ArbitratorCore` through `ArbitratorRuntime`, its per-cluster state
/// durable across restarts (and, as faults, lost or rolled back).
final class SimArbitrator: ArbitratorHost, @unchecked Sendable {
    unowned let sim: Simulator
    var clock: SimClock
    var up = false
    var incarnation = 0
    var pausedUntil: Int64 = 0
    var deferred: [() -> Void] = []
    var runtime: ArbitratorRuntime<SimArbitrator>?
    var durable: ArbitratorPersistentState
    var snapshot: ArbitratorPersistentState?
    var maxEpoch = Epoch.zero

    init(sim: Simulator, clock: SimClock, initial: ArbitratorPersistentState) {
        self.sim = sim; self.clock = clock; durable = initial
    }

    var suspendedUntil: Int64? {
        if clock.frozen { return Int64.max }
        return pausedUntil > sim.now ? pausedUntil : nil
    }

    func start() {
        incarnation += 1
        up = true
        let p = (try? ArbitratorPersistentState.decode(durable.encoded())) ?? durable
        if p.promisedEpoch < maxEpoch {
            sim.violate(5, "arbitrator restarted at epoch \(p.promisedEpoch) after having promised \(maxEpoch): epoch went back")
        }
        runtime = ArbitratorRuntime(core: ArbitratorCore(settings: sim.quorumSettings, persisted: [Simulator.cluster: p]), host: self)
        sim.trace("w starts (epoch \(p.promisedEpoch), vote \(p.votedFor?.name ?? "-"), incarnation \(String(p.incarnation, radix: 16)))")
    }

    func crash() {
        guard up else { return }
        up = false
        runtime = nil
        pausedUntil = 0
        deferred = []
        clock.thaw(at: sim.now)
        sim.trace("w CRASH")
    }

    func receive(from: NodeID, _ m: QuorumMessage) {
        runtime?.receive(cluster: Simulator.cluster, from: from, m)
        if let e = runtime?.core.epoch(cluster: Simulator.cluster) {
            if e < maxEpoch { sim.violate(5, "arbitrator epoch went back from \(maxEpoch) to \(e)") }
            maxEpoch = max(maxEpoch, e)
        }
    }

    func now() -> Instant { Instant(nanoseconds: clock.local(at: sim.now)) }

    func persist(cluster: String, _ state: ArbitratorPersistentState) throws {
        if state.promisedEpoch < durable.promisedEpoch, state.incarnation == durable.incarnation {
            sim.violate(5, "arbitrator persisted epoch \(state.promisedEpoch) below \(durable.promisedEpoch)")
        }
        durable = state
    }

    func send(_ message: QuorumMessage, cluster: String, to node: NodeID, epoch: Epoch) {
        sim.quorum.send(from: 2, to: Simulator.index(of: node), message)
    }

    func log(cluster: String, _ event: QuorumEvent) { sim.trace("w \(event)") }

    func fatal(_ reason: String) {
        sim.trace("w FATAL \(reason)")
        crash()
    }
}

extension QuorumMessage {
    /// The promised epoch a voter's answer reports (what the newer-epoch rule reads).
    var reportedPromise: Epoch? {
        switch self.unstamped {
        case let .renewReply(_, _, _, promised): return promised
        case let .voteReply(_, _, promised, _): return promised
        case let .outdateReply(_, _, _, _, promised): return promised
        case let .identifyReply(promised): return promised
        default: return nil
        }
    }
}
