import HACore
import Quorum
import Replication

/// The answer to an admin request, as the status server returns it (HTTP status + message).
public struct NodeAdminOutcome: Equatable, Sendable {
    public var ok: Bool
    public var message: String
    /// 200 done (or started), 409 refused in this state, 504 did not complete in time.
    public var status: Int
    public static func ok(_ m: String) -> NodeAdminOutcome { NodeAdminOutcome(ok: true, message: m, status: 200) }
    public static func refused(_ m: String, status: Int = 409) -> NodeAdminOutcome { NodeAdminOutcome(ok: false, message: m, status: status) }
}

/// The one interpreter of a data node's decisions (issue 9, "one runtime"): it feeds the
/// quorum core, carries out its actions in order against a `NodeHost`, couples the core to
/// the replicated volume (volume events in, gate / fence / role out), and owns the small
/// policies around them — disk failure, disk repair after a failed store, admin requests
/// with their deadlines. `hamgr run` and the whole-node simulator both run exactly this.
///
/// Confinement: every method runs on the host's serial context (the daemon's control queue,
/// the simulator's event loop); work from other threads comes back through `host.enqueue`.
/// That is why the class is `@unchecked Sendable`: it is never touched concurrently.
public final class NodeRuntime<Host: NodeHost>: @unchecked Sendable {
    public private(set) var core: NodeCore
    private unowned let host: Host
    private let me: NodeID

    /// Events raised while carrying out actions (a refused promotion, the link state after a
    /// promotion); fed after the current batch, in order, so each batch runs to its end first.
    private var queued: [NodeEvent] = []
    private var feeding = false
    private var halted = false

    /// A store failure in this run (diskless until a restart) and the repair of a failure
    /// recorded by an earlier run (outdated until a full verify finds nothing).
    private var diskFailure: String?
    private var repair: DiskRepair?
    private var maintenanceApplied: Bool
    /// Switchover drains started (`.drainForSwitchover`) and cancelled (`.cancelDrain`): a
    /// drain whose service stop ends after its cancel is never started (it would suspend the
    /// volume for good while the core stays master).
    private var drainsStarted: UInt64 = 0
    private var drainsCancelled: UInt64 = 0

    private struct Pending {
        var command: Quorum.AdminCommand
        var deadline: Instant
        /// A promotion answers when this node is master (or at the deadline), not when the
        /// election starts.
        var awaitingPromotion: Bool
        var reply: (NodeAdminOutcome) -> Void
    }
    private var pending: [Pending] = []
    /// Admin requests answer within this (a switchover answers after its drain).
    public var adminTimeout: Duration = .seconds(30)

    /// `repairPending`: this node's store failed in an earlier run (the host's record exists).
    public init(core: NodeCore, host: Host, repairPending: Bool) {
        self.core = core
        self.host = host
        self.me = core.me
        self.maintenanceApplied = core.status.maintenance
        if repairPending { repair = DiskRepair() }
    }

    /// The disk state the core may rely on: diskless after a failure in this run, outdated
    /// while a failure of an earlier run is not yet verified away.
    public func reportedDisk(_ state: DiskState) -> DiskState {
        if diskFailure != nil { return .diskless }
        if repair != nil, state == .upToDate { return .outdated }
        return state
    }

    /// The core's start entry: the persisted fencing token and the closed gate reach the
    /// volume before anything else runs (before any replication session can be routed to it).
    public func start() {
        guard !halted else { return }
        let now = host.now()
        for a in core.start(at: now) where !halted { perform(a, now: now) }
    }

    // MARK: feeding the core

    public func feed(_ event: NodeEvent) {
        guard !halted else { return }
        queued.append(event)
        guard !feeding else { return }
        feeding = true
        defer { feeding = false }
        var guardCount = 0
        while !queued.isEmpty, !halted, guardCount < 1_000 {
            guardCount += 1
            let e = queued.removeFirst()
            let now = host.now()
            let actions = core.handle(e, at: now)
            for a in actions where !halted { perform(a, now: now) }
            let maintenance = core.status.maintenance
            if maintenance != maintenanceApplied {
                maintenanceApplied = maintenance
                host.holdServiceRestarts(maintenance)
            }
        }
        if case .tick = event { expireAdmin() }
        answerPromotions()
    }

    private func perform(_ action: NodeAction, now: Instant) {
        switch action {
        case .send(let to, let message):
            host.send(message, to: to, epoch: core.status.epoch)
        case .persist(let state):
            do { try host.persist(state) } catch {
                halted = true
                host.fatal("cannot persist quorum state: \(error)")
            }
        case .writeGate(let gate):
            host.volume.setWriteGate(gate)
        case .becomePrimary(let epoch, let newGeneration):
            promote(epoch: epoch, newGeneration: newGeneration)
        case .becomeSecondary(let epoch, let master):
            let wasPrimary = host.volume.status.role == .primary
            host.volume.becomeSecondary(epoch: epoch)
            host.stopServices(epoch: epoch, master: master, wasPrimary: wasPrimary) {}
        case .drainForSwitchover:
            // Planned handover: services stop first (a filesystem flushes through the export),
            // then the volume drains and confirms the peer has every write.
            drainsStarted += 1
            let drain = drainsStarted
            host.suspendServices { [self] in
                guard drain > drainsCancelled else { return }  // abandoned while services stopped
                host.volume.drainForSwitchover { [self] result in
                    host.enqueue { [self] in
                        switch result {
                        case .success: feed(.switchoverDrained)
                        case .failure(let e):
                            host.log(event("switchoverDrainFailed", [("why", "\(e)")]))
                        }
                    }
                }
            }
        case .cancelDrain:
            // An abandoned switchover: this node stays master. A drain already handed to the
            // volume is cancelled there (the volume runs calls in order, so the cancel comes
            // after it); one still waiting for the services to stop is never started.
            drainsCancelled = drainsStarted
            host.volume.cancelDrain()
            host.resumeServices(epoch: core.status.epoch)
        case .fence(let epoch):
            host.volume.setPromisedEpoch(epoch)
        case .fenceServices:
            host.fenceServices()
        case .unfenceServices:
            host.unfenceServices()
        case .adminResult(let command, let result):
            complete(command, result)
        case .log(let e):
            host.log(e)
        }
    }

    private func promote(epoch: Epoch, newGeneration: Bool) {
        do {
            try host.volume.becomePrimary(epoch: epoch, newGeneration: newGeneration)
        } catch {
            // The volume refused: give the lease back at once so the peer can take over.
            host.log(event("promoteFailed", [("why", "\(error)")]))
            queued.append(.disk(LocalDisk(state: .diskless, generations: host.volume.status.generations)))
            queued.append(.admin(.demote))
            return
        }
        // The core starts a mastership assuming nothing of the peer; the volume reports only
        // changes, so tell the core where the link stands now.
        queued.append(.peerReplication(host.volume.status.peerState))
        let kind: PromotionKind = newGeneration ? .forced : (pending.isEmpty ? .failover : .switchover)
        host.startServices(epoch: epoch, kind: kind)
    }

    // MARK: the volume's events

    public func volumeEvent(_ e: ReplicationEvent) {
        guard !halted else { return }
        switch e {
        case .peer(let state):
            feed(.peerReplication(state))
            if state == .inSync { advanceRepair(mismatches: nil) }
        case .disk(let state, let generations, let crashCopyOnPeer):
            feed(.disk(LocalDisk(state: reportedDisk(state), generations: generations, crashCopyOnPeer: crashCopyOnPeer)))
        case .splitBrain(let detail):
            host.log(event("splitBrain", [("detail", detail)]))
        case .diskFailure(let detail):
            // A store that failed a write is not trusted again until an operator restarts the
            // node: it reports diskless, never stands for election, and a master steps down so
            // the peer — which holds every acknowledged write — takes over.
            guard diskFailure == nil else { return }
            diskFailure = detail
            host.recordDiskFailure(detail)  // logs it (critical) and records it durably
            feed(.disk(LocalDisk(state: .diskless, generations: host.volume.status.generations)))
            if core.status.role == .primary { feed(.admin(.demote)) }
        case .resyncProgress:
            break
        case .verifyFinished(let mismatched):
            host.log(event("verifyFinished", [("mismatchedChunks", String(mismatched.count))]))
            advanceRepair(mismatches: mismatched)
        }
    }

    /// Verify → resync mismatches → verify again, until a verify finds nothing (bounded).
    /// `mismatches` nil: the link is in sync now.
    private func advanceRepair(mismatches: [Int]?) {
        guard var r = repair, diskFailure == nil else { return }
        switch r.next(mismatches: mismatches) {
        case .none:
            break
        case .verify(let round):
            host.log(event("diskRepairVerify", [("round", String(round))]))
            host.volume.startVerify(repair: false)
        case .resync(let count):
            host.log(event("diskRepairResync", [("chunks", String(count))]))
            host.volume.requestResync()
        case .repaired:
            repair = nil
            host.clearDiskFailure()
            host.log(event("diskRepaired"))
            let v = host.volume.status
            feed(.disk(LocalDisk(state: v.diskState, generations: v.generations, crashCopyOnPeer: v.crashCopyOnPeer)))
            return
        case .gaveUp:
            host.log(event("diskRepairFailed", [("why", "still mismatching after \(DiskRepair.maxRounds - 1) resyncs; this node stays outdated")]))
        }
        if repair != nil { repair = r }
    }

    /// A requested resync of a few chunks may end without the link ever leaving inSync: the
    /// host's periodic refresh calls this (every ~500 ms) so repair sees its end.
    public func pollRepair() {
        guard let r = repair, r.isResyncing else { return }
        let v = host.volume.status
        if v.peerState == .inSync, v.resyncDoneBytes >= v.resyncTotalBytes { advanceRepair(mismatches: nil) }
    }

    // MARK: admin

    /// An authenticated admin request. `reply` runs on the runtime's context exactly once.
    public func admin(_ command: HACore.AdminCommand, reply: @escaping (NodeAdminOutcome) -> Void) {
        guard !halted else { return reply(.refused("the node is stopping", status: 503)) }
        switch command {
        case .switchover: submit(.switchover, reply)
        case .promote(let force): submit(.promote(force: force), awaitPromotion: true, reply)
        case .demote: submit(.demote, reply)
        case .maintenance(let on): submit(.maintenance(on), reply)
        case .acceptArbitrator: submit(.acceptArbitrator, reply)
        case .verify(let repair):
            host.volume.startVerify(repair: repair)
            reply(.ok(repair ? "verify started; mismatched chunks are resynced when it ends; watch /status"
                             : "verify started; watch /status"))
        case .bootstrap(let clean):
            do {
                try host.volume.bootstrap(assumeClean: clean)
                host.log(event("bootstrap", [("assumeClean", String(clean))]))
                reply(.ok(clean ? "bootstrapped as clean: a fresh peer adopts this generation without a sync"
                                : "bootstrapped: this node is up to date; the peer gets a full sync (watch /status)"))
            } catch {
                reply(.refused("bootstrap refused: \(error)"))
            }
        case .invalidate:
            do {
                try host.volume.invalidate()
                host.log(event("invalidate"))
                feed(.admin(.localDataDiscarded))
                reply(.ok("invalidated: this node is inconsistent until the full sync from its peer completes (watch /status)"))
            } catch {
                reply(.refused("invalidate refused: \(error)"))
            }
        case .resync:
            host.volume.requestResync()
            reply(.ok("resync requested; watch /status"))
        case .resolve(let side):
            host.volume.resolveSplitBrain(discardLocal: side == .local)
            if side == .local { feed(.admin(.localDataDiscarded)) }
            reply(.ok("split brain resolved by discarding the \(side.rawValue) side's changes; resync follows"))
        case .resourceCleanup(let name):
            // Local to this node's services: no quorum decision involved.
            host.cleanupResources(name, reply: reply)
        }
    }

    private func submit(_ command: Quorum.AdminCommand, awaitPromotion: Bool = false, _ reply: @escaping (NodeAdminOutcome) -> Void) {
        let now = host.now()
        let deadline = awaitPromotion ? now + core.settings.timings.failureTimeout * 2 + .milliseconds(500) : now + adminTimeout
        pending.append(Pending(command: command, deadline: deadline, awaitingPromotion: false, reply: reply))
        feed(.admin(command))
    }

    private func complete(_ command: Quorum.AdminCommand, _ result: Result<String, AdminRefusal>) {
        guard let i = pending.firstIndex(where: { $0.command == command && !$0.awaitingPromotion }) else { return }
        switch result {
        case .success(let msg):
            if case .promote = command {
                // Started (or scheduled): keep waiting for the outcome.
                pending[i].awaitingPromotion = true
                return
            }
            pending.remove(at: i).reply(.ok(msg))
        case .failure(let refusal):
            pending.remove(at: i).reply(.refused(refusal.reason))
        }
    }

    private func answerPromotions() {
        guard pending.contains(where: { $0.awaitingPromotion }) else { return }
        let now = host.now()
        let st = core.status.announced(at: now)
        guard st.role == .primary else { return }
        for p in pending where p.awaitingPromotion { p.reply(.ok("promoted: master in epoch \(st.epoch)")) }
        pending.removeAll { $0.awaitingPromotion }
    }

    private func expireAdmin() {
        let now = host.now()
        var kept: [Pending] = []
        for p in pending {
            guard now >= p.deadline else { kept.append(p); continue }
            if p.awaitingPromotion {
                let why = core.status.announced(at: now).whyNotPromoted ?? "no quorum within the election timeout"
                p.reply(.refused("not promoted: \(why)"))
            } else {
                p.reply(.refused("\(p.command) did not complete within \(Int(adminTimeout.milliseconds / 1000)) s", status: 504))
            }
        }
        pending = kept
    }

    private func event(_ name: String, _ fields: [(String, String)] = []) -> QuorumEvent {
        let st = core.status
        var f = [QuorumEvent.Field("cluster", core.cluster), QuorumEvent.Field("node", me.name),
                 QuorumEvent.Field("epoch", String(st.epoch.value)), QuorumEvent.Field("role", st.role.rawValue)]
        f.append(contentsOf: fields.map { QuorumEvent.Field($0.0, $0.1) })
        return QuorumEvent(name, f)
    }
}

/// Repair of a store that failed in an earlier run: full verify against the peer, resync the
/// mismatches, verify again, until a verify finds nothing (at most `maxRounds` verifies).
struct DiskRepair: Sendable, Equatable {
    static let maxRounds = 5
    enum Phase: Sendable, Equatable { case waitingForPeer, verifying(round: Int), resyncing(round: Int) }
    enum Step: Sendable, Equatable { case none, verify(round: Int), resync(chunks: Int), repaired, gaveUp }
    var phase: Phase = .waitingForPeer

    var isResyncing: Bool { if case .resyncing = phase { return true }; return false }

    mutating func next(mismatches: [Int]?) -> Step {
        switch (phase, mismatches) {
        case (.waitingForPeer, nil), (.resyncing, nil):
            let round: Int
            if case .resyncing(let r) = phase { round = r + 1 } else { round = 1 }
            guard round <= Self.maxRounds else { return .gaveUp }
            phase = .verifying(round: round)
            return .verify(round: round)
        case (.verifying(let round), let found?):
            if found.isEmpty { return .repaired }
            phase = .resyncing(round: round)
            return .resync(chunks: found.count)
        case (.verifying(let round), nil):
            // The link came back in sync while a verify was running: that verify was aborted
            // when the link dropped (no verifyFinished will come), so run this round again.
            // (Found by the whole-node simulator, seed 7: without it the repair waited forever
            // and the node stayed outdated.)
            return .verify(round: round)
        default:
            return .none
        }
    }
}
