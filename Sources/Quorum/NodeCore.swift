import HACore

/// The quorum state machine of one data node (design.md §2): leases, elections, outdating the
/// peer, switchover. Pure: `handle(event, at: now) -> [NodeAction]`; no clock, socket or global RNG.
public struct NodeCore: Sendable {
    public let cluster: String
    public let me: NodeID
    public let peer: NodeID
    public let arbitrator: NodeID
    public let settings: QuorumSettings

    // Durable state as this node acts on it (every change is followed by a `.persist`).
    private var state: NodePersistentState
    private var disk: LocalDisk
    private var rng: SplitMix64
    private var role: Role = .secondary
    private var gate: WriteGate
    /// Highest epoch seen anywhere; a new candidacy goes above it.
    private var highestSeenEpoch: Epoch
    /// The replication fencing token handed to the volume (`NodeAction.fence`): the highest
    /// epoch promised to the peer, followed, or held as master — never a self-vote alone.
    private var fencedEpoch: Epoch

    // As a voter.
    /// The node holding the lease this node granted (nil: unknown, e.g. right after a restart).
    private var grantedLeaseHolder: NodeID?
    /// Until then this node votes for nobody but `grantedLeaseHolder` (restart: now + lease).
    private var grantedLeaseExpiry: Instant
    private var lastHeardMaster: Instant
    private var nextCandidacyAt: Instant

    private var lastPeerContact: Instant?
    private var lastArbitratorContact: Instant?
    private var peerHeartbeat: Heartbeat?
    private var lastHeartbeatSent: Instant?

    private var candidacy: Candidacy?
    private var roundCounter: UInt64 = 0
    /// After handing over in a switchover: resend the release until the new master renews.
    private var handover: Handover?

    // As master.
    private var masterEpoch: Epoch = .zero
    private var primarySince: Instant
    private var leaseValidUntil: Instant = .zero
    private var lastGrantAt: Instant = .zero
    private var renewSeq: UInt64 = 0
    private var renewsSent: [(seq: UInt64, at: Instant)] = []
    private var lastRenewSent: Instant?
    private var peerReplication: PeerReplicationState = .disconnected
    private var peerReplicationSince: Instant
    private var fence = PeerFence()
    private var drainingSince: Instant?
    /// Clock-freeze rule: a voter reported a promised epoch above `masterEpoch`, so another node
    /// may already be master there (this node's clock may have stood still while the others'
    /// ran). The gate stays closed until this node is master of an epoch at least this new.
    private var newerEpochReported: Epoch?
    /// A clock jump (`NodeEvent.clockJump`) was detected at this local instant: the gate stays
    /// closed until a renewal (or vote round) sent at or after it is granted.
    private var clockJumpAt: Instant?
    /// `.fenceServices` was emitted and no `.unfenceServices` since (primary only).
    private var servicesFenced = false

    private var whyNotPromoted: String?
    /// The incarnation the arbitrator's latest answer came from, when it is not the one this
    /// node trusts (`state.arbitratorIncarnation`): its answers are dropped until accepted.
    private var foreignArbitratorIncarnation: UInt64?
    /// An admin promotion waiting for the lease this node granted to run out (its own vote
    /// obeys the same rule as any other).
    private var promotionRequest: (force: Bool, until: Instant)?
    private var lastRefusedRenewEpoch: Epoch?
    private var lastNow: Instant
    /// The promised epoch of the last `.persist` (or of the state loaded at start).
    private var persistedPromise: Epoch

    struct Candidacy: Sendable {
        var epoch: Epoch
        var force: Bool
        /// A sitting master moving itself to a newer epoch its peer already promised.
        var bump: Bool
        var startedAt: Instant
        var lastSentAt: Instant
        var rounds: [(round: UInt64, at: Instant)] = []
        var heardFrom: Set<NodeID> = []
    }

    struct Handover: Sendable {
        var epoch: Epoch
        var until: Instant
        var lastSent: Instant
    }

    /// Progress of "outdate before continuing" for the current mastership.
    struct PeerFence: Sendable {
        /// Last mark instance used; marks of one epoch are ordered by it.
        var instance: UInt64 = 0
        var requesting: (epoch: Epoch, instance: UInt64, since: Instant, lastSent: Instant)?
        /// The arbitrator recorded the peer as outdated: `peerRequired` is false.
        var confirmed = false
        var clearing: (epoch: Epoch, instance: UInt64, lastSent: Instant)?
    }

    public init(cluster: String, me: NodeID, peer: NodeID, arbitrator: NodeID, settings: QuorumSettings,
                persisted: NodePersistentState, disk: LocalDisk, now: Instant) {
        self.cluster = cluster
        self.me = me
        self.peer = peer
        self.arbitrator = arbitrator
        self.settings = settings
        self.state = persisted
        self.disk = disk
        self.rng = SplitMix64(seed: settings.jitterSeed ^ fnv1a(cluster) ^ fnv1a(me.name) &* 31)
        self.gate = WriteGate(epoch: persisted.promisedEpoch, validUntil: .zero, peerRequired: true)
        self.highestSeenEpoch = persisted.promisedEpoch
        self.persistedPromise = persisted.promisedEpoch
        self.fencedEpoch = persisted.fencedEpoch ?? persisted.promisedEpoch
        // Restart quarantine: before the crash this node may have granted a lease it no longer
        // remembers; it votes for nobody until such a lease would have run out.
        self.grantedLeaseExpiry = settings.has(.skipLeaseWait) ? now : now + settings.timings.lease
        self.lastHeardMaster = now
        self.nextCandidacyAt = now
        self.primarySince = now
        self.peerReplicationSince = now
        self.lastNow = now
    }

    private var timings: LeaseTimings { settings.timings }

    /// How long a grant counts for this node as master: `lease·(1−drift)` from the request's
    /// send time. The planted bug `noDriftMargin` drops the drift discount.
    private var leaseSpan: Duration { settings.has(.noDriftMargin) ? timings.lease : timings.masterLeaseSpan }

    /// The instant a grant's lease is counted from: the request's send time. The planted bug
    /// `leaseAnchoredAtReply` counts it from the reply's arrival instead.
    private func leaseAnchor(sent: Instant, now: Instant) -> Instant { settings.has(.leaseAnchoredAtReply) ? now : sent }

    public var status: NodeQuorumStatus {
        let now = lastNow
        let window = timings.failureTimeout
        let peerUp = lastPeerContact.map { now - $0 < window } ?? false
        let arbUp: Bool? = role == .primary || candidacy != nil
            ? (lastArbitratorContact.map { now - $0 < window } ?? false) : nil
        return NodeQuorumStatus(
            role: role, epoch: state.promisedEpoch,
            master: role == .primary ? me : state.master,
            leaseValidUntil: role == .primary ? desiredGate.validUntil : nil,
            hasQuorum: role == .primary ? now < desiredGate.validUntil : (state.master != nil && now - lastHeardMaster < window),
            peerReachable: peerUp, arbitratorReachable: arbUp, maintenance: state.maintenance,
            whyNotPromoted: role == .primary ? nil : [arbitratorRefused, whyNotPromoted].compactMap { $0 }.joined(separator: "; ").nilIfEmpty,
            gate: gate, disk: disk.state,
            peerReplication: peerReplication, peerOutdated: role == .primary && fence.confirmed,
            switchoverInProgress: drainingSince != nil, arbitratorRefused: arbitratorRefused)
    }

    private var arbitratorRefused: String? {
        guard let seen = foreignArbitratorIncarnation else { return nil }
        let known = state.arbitratorIncarnation.map { String($0, radix: 16) } ?? "none"
        return "the arbitrator's state is incarnation \(String(seen, radix: 16)), this node knows \(known) (rebuilt, wiped or rolled back): "
            + "its votes and grants are not counted until an operator runs `hactl arbitrator-accept` (docs/operator-guide.md, Arbitrator rebuild)"
    }

    // MARK: - Entry point

    public mutating func handle(_ event: NodeEvent, at now: Instant) -> [NodeAction] {
        var out: [NodeAction] = []
        lastNow = now
        if role == .primary, now >= max(leaseValidUntil, primarySince + leaseSpan) {
            stepDown(reason: "lease lapsed", master: nil, now: now, &out)
        }
        switch event {
        case .tick:
            if role == .primary { primaryTick(now, &out) } else { secondaryTick(now, &out) }
        case .linkUp(let n):
            // Reachability follows from messages, not from connections; but learn (or check)
            // the arbitrator's incarnation now, not first when its vote is needed.
            if n == arbitrator { out.append(.send(to: arbitrator, .identify)) }
        case .linkDown(let n):
            if n == peer { lastPeerContact = nil } else if n == arbitrator { lastArbitratorContact = nil }
        case .received(let from, let message):
            receive(message, from: from, now: now, &out)
        case .disk(let d):
            onDisk(d, now: now, &out)
        case .peerReplication(let s):
            onPeerReplication(s, now: now, &out)
        case .admin(let command):
            onAdmin(command, now: now, &out)
        case .switchoverDrained:
            onDrained(now: now, &out)
        case .clockJump(let d):
            onClockJump(d, now: now, &out)
        }
        syncGate(&out)
        syncServices(now, &out)
        precondition(role != .primary || masterEpoch <= state.promisedEpoch,
                     "\(me): master of epoch \(masterEpoch) while promised only \(state.promisedEpoch)")
        precondition(role == .primary || !gate.allowsAck(at: now),
                     "\(me): secondary with an open gate \(gate) at \(now)")
        return out
    }

    /// Gap 3, services above the block layer: one rule. A master fences its services while its
    /// gate is closed or its lease will lapse within `servicesMargin` without a fresh grant, and
    /// unfences them when a grant moves the lease end beyond the margin again. A step-down
    /// fences (if not yet) before `.becomeSecondary`.
    private mutating func syncServices(_ now: Instant, _ out: inout [NodeAction]) {
        guard role == .primary else { return }
        let g = desiredGate
        let fence = !g.allowsAck(at: now) || g.validUntil - now <= settings.servicesMargin
        if fence != servicesFenced {
            servicesFenced = fence
            out.append(fence ? .fenceServices : .unfenceServices)
            if fence {
                let left = g.allowsAck(at: now) ? "\(Int64((g.validUntil - now).milliseconds)) ms of lease left" : "gate closed"
                log("servicesFenced", [("why", left)], &out)
            } else {
                log("servicesUnfenced", [("leaseLeftMs", String(Int64((g.validUntil - now).milliseconds)))], &out)
            }
        }
    }

    /// The start entry: the actions the shell runs before any event, in order. First the
    /// replication fencing token persisted before the restart (the volume must refuse frames
    /// of older epochs before the first frame or quorum message is handled), then the closed
    /// gate carrying the promised epoch.
    public mutating func start(at now: Instant) -> [NodeAction] {
        lastNow = now
        return [.fence(fencedEpoch), .writeGate(gate)]
    }

    /// The clock stood still for about `d` while real time went on (a paused VM): every lease
    /// this node measured as master or candidate may be over in real time already.
    private mutating func onClockJump(_ d: Duration, now: Instant, _ out: inout [NodeAction]) {
        guard d > .zero else { return }
        log("clockJump", [("missedMs", String(Int64(d.milliseconds)))], &out)
        // A vote granted to a round sent before the freeze may be older than its lease.
        if var c = candidacy { c.rounds.removeAll(); candidacy = c }
        guard role == .primary else { return }
        clockJumpAt = now
        syncGate(&out) // closed before anything else
        log("gateClosed", [("why", "clock jump of \(Int64(d.milliseconds)) ms")], &out)
        sendRenewals(now, &out) // the first renewal that can reopen it
    }

    /// Clock-freeze rule: a voter (peer or arbitrator, in any reply) promised an epoch above
    /// ours. Someone else may be master there already, with a lease our (possibly frozen)
    /// clock knows nothing of: close the gate now; a re-election may follow, but writes stay
    /// closed until this node is master of an epoch at least that new.
    private mutating func onNewerEpochReported(_ p: Epoch, by from: NodeID, _ out: inout [NodeAction]) {
        guard role == .primary, p > masterEpoch, !settings.has(.gateOpenOnNewerEpoch) else { return }
        let wasOpen = gateHeld == nil
        if newerEpochReported.map({ p > $0 }) ?? true { newerEpochReported = p }
        guard wasOpen else { return }
        syncGate(&out)
        log("gateClosed", [("why", "\(from) promised epoch \(p)")], &out)
    }

    /// The promised epoch a voter's reply reports, when that promise may belong to another
    /// master (a vote granted to us does not). Heartbeats do not count: they are not answers to
    /// anything this master sent, and a backup cut off from the master (one-way) announces its
    /// own failed candidacies in them while the master still renews at the arbitrator — closing
    /// the gate then would stop writes with no re-election to reopen it (no flapping, §3). A
    /// thawed master learns a newer epoch from the replies to its first renewals.
    private func reportedPromise(_ m: QuorumMessage) -> Epoch? {
        switch m {
        case let .renewReply(_, _, _, promised): return promised
        case let .voteReply(_, _, promised, refusal): return refusal == nil ? nil : promised
        case let .outdateReply(_, _, _, _, promised): return promised
        case let .identifyReply(promised): return promised
        default: return nil
        }
    }

    // MARK: - Gate, persistence, logging

    private var desiredGate: WriteGate {
        role == .primary
            ? WriteGate(epoch: masterEpoch, validUntil: gateHeld == nil ? leaseValidUntil : .zero, peerRequired: !fence.confirmed)
            : WriteGate(epoch: state.promisedEpoch, validUntil: .zero, peerRequired: true)
    }

    /// Why a master's gate is closed although its lease runs (nil: it is not).
    private var gateHeld: String? {
        if let n = newerEpochReported, n > masterEpoch { return "a voter promised epoch \(n)" }
        if clockJumpAt != nil { return "clock jump: waiting for a renewal sent after it to be granted" }
        return nil
    }

    private mutating func syncGate(_ out: inout [NodeAction]) {
        let g = desiredGate
        if g != gate { gate = g; out.append(.writeGate(g)) }
    }

    private mutating func persist(_ out: inout [NodeAction]) {
        // A promise is never taken back: that is what keeps a voter from voting twice.
        precondition(state.promisedEpoch >= persistedPromise,
                     "\(me): promised epoch would go back from \(persistedPromise) to \(state.promisedEpoch) (role \(role), state \(state))")
        persistedPromise = state.promisedEpoch
        out.append(.persist(state))
    }

    /// Records `e` as the fencing token if it is newer; the caller persists `state` next and
    /// then emits `.fence(e)` (`emitFence`), so the token is durable before it is acted on.
    ///
    /// Why a self-vote never fences (gap 5): the token exists so that a backup that promised a
    /// newer epoch to *another* node never applies (and so never lets an old master count) a
    /// frame of an older epoch. A candidate's promise to itself protects nothing: if it wins,
    /// its volume becomes primary and refuses every replication write from the peer; if it
    /// loses, the master it followed may still hold a valid lease (the candidacy failed exactly
    /// because a voter still honoured that lease), and refusing its frames would only stall
    /// that live master's protocol-B/C acknowledgements and get this node outdated. Any frame
    /// of the old epoch it still applies is one the old master can acknowledge only under its
    /// lease, which the voters checked had run out before granting a newer epoch (§8 b).
    private mutating func raiseFence(_ e: Epoch) -> Bool {
        guard e > fencedEpoch else { return false }
        fencedEpoch = e
        state.fencedEpoch = e
        return true
    }

    private func emitFence(_ out: inout [NodeAction]) { out.append(.fence(fencedEpoch)) }

    /// Persisting a vote (and the epoch it promises) before replying is what keeps a restarted
    /// voter from voting twice; the planted bug leaves it out.
    private mutating func persistVote(_ out: inout [NodeAction]) {
        if settings.has(.votesNotPersisted) { return }
        persist(&out)
    }

    private func log(_ name: String, _ fields: [(String, String)] = [], _ out: inout [NodeAction]) {
        var f = [QuorumEvent.Field("cluster", cluster), QuorumEvent.Field("node", me.name),
                 QuorumEvent.Field("epoch", String(role == .primary ? masterEpoch.value : state.promisedEpoch.value)),
                 QuorumEvent.Field("role", role.rawValue)]
        f.append(contentsOf: fields.map { QuorumEvent.Field($0.0, $0.1) })
        out.append(.log(QuorumEvent(name, f)))
    }

    private mutating func noteEpoch(_ e: Epoch) { if e > highestSeenEpoch { highestSeenEpoch = e } }

    private mutating func jitter(upTo d: Duration) -> Duration {
        let ms = max(1, Int64(d.milliseconds))
        return .milliseconds(Int64(rng.next() % UInt64(ms)))
    }

    // MARK: - Ticks

    private mutating func primaryTick(_ now: Instant, _ out: inout [NodeAction]) {
        if let since = drainingSince, now >= since + timings.failureTimeout {
            drainingSince = nil
            out.append(.adminResult(.switchover, .failure(AdminRefusal("drain did not finish within \(Int(timings.failureTimeout.milliseconds)) ms; writes resume, this node stays master"))))
            // The shell resumes writes and restarts the services it stopped; a late
            // `.switchoverDrained` is ignored (drainingSince is nil).
            out.append(.cancelDrain)
            log("switchoverAbandoned", [("reason", "drain timeout")], &out)
        }
        if lastRenewSent.map({ now >= $0 + timings.renewInterval }) ?? true {
            sendRenewals(now, &out)
        }
        if settings.splitBrain == .allow, now >= lastGrantAt + timings.failureTimeout {
            // Availability over consistency: an isolated master keeps its own lease.
            leaseValidUntil = max(leaseValidUntil, now + leaseSpan)
        }
        progressFence(now, &out)
        if var c = candidacy {
            if now >= c.startedAt + timings.failureTimeout {
                candidacy = nil
                nextCandidacyAt = now + jitter(upTo: timings.failureTimeout)
                log("reelectionFailed", [("candidateEpoch", c.epoch.description)], &out)
            } else if now >= c.lastSentAt + timings.renewInterval {
                sendVoteRound(&c, now, &out)
                candidacy = c
            }
        }
    }

    private mutating func secondaryTick(_ now: Instant, _ out: inout [NodeAction]) {
        if lastHeartbeatSent.map({ now >= $0 + timings.renewInterval }) ?? true {
            lastHeartbeatSent = now
            out.append(.send(to: peer, .heartbeat(Heartbeat(epoch: state.promisedEpoch, master: state.master, disk: disk.state,
                                                            generations: disk.generations, maintenance: state.maintenance))))
        }
        if var h = handover {
            if now >= h.until {
                handover = nil
            } else if now >= h.lastSent + timings.renewInterval {
                h.lastSent = now
                handover = h
                out.append(.send(to: peer, .release(epoch: h.epoch, handoverTo: peer)))
            }
        }
        if var c = candidacy {
            if now >= c.startedAt + timings.failureTimeout {
                if settings.splitBrain == .allow, c.heardFrom.isEmpty, !c.bump {
                    winAlone(c, now, &out)
                } else {
                    candidacy = nil
                    nextCandidacyAt = now + jitter(upTo: timings.failureTimeout)
                    log("candidacyFailed", [("candidateEpoch", c.epoch.description), ("why", whyNotPromoted ?? "no grant")], &out)
                }
            } else if now >= c.lastSentAt + timings.renewInterval {
                sendVoteRound(&c, now, &out)
                candidacy = c
            }
            return
        }
        if let p = promotionRequest {
            if now >= p.until || state.maintenance {
                promotionRequest = nil
            } else if settings.has(.skipLeaseWait) || now >= grantedLeaseExpiry {
                promotionRequest = nil
                if p.force || disk.state == .upToDate {
                    startCandidacy(force: p.force, bump: false, now, &out)
                    return
                }
            }
        }
        if now < lastHeardMaster + timings.failureTimeout { return } // the master is alive
        if let blocker = candidacyBlocker(now) {
            // The wait for the peer's copy of the crash extents can last a resync: say so once.
            if blocker != whyNotPromoted, blocker == crashCopyBlocker(now) {
                log("waitingForPeerCopy", [("peer", peer.name), ("why", blocker)], &out)
            }
            whyNotPromoted = blocker
            return
        }
        if now < nextCandidacyAt { return }
        startCandidacy(force: false, bump: false, now, &out)
    }

    /// A crashed primary under protocol B or C whose peer is reachable and up to date in the
    /// same generation waits for the replication link to bring its crash extents back from
    /// that peer: promoted first, it would be the sync source and overwrite acknowledged writes
    /// only the peer still holds. A peer that is silent, outdated or elsewhere in history
    /// leaves the choice to the usual rules (the peer, if it can, stands itself meanwhile).
    private func crashCopyBlocker(_ now: Instant) -> String? {
        guard disk.crashCopyOnPeer, let c = lastPeerContact, now - c < timings.failureTimeout,
              let h = peerHeartbeat, h.disk == .upToDate, h.generations.current == disk.generations.current else { return nil }
        return "\(peer) holds every write this node acknowledged before it crashed: waiting for the replication link to resync the crash extents from it"
    }

    private func candidacyBlocker(_ now: Instant) -> String? {
        if state.maintenance { return "maintenance mode is on" }
        if handover != nil { return "handed over to \(peer) (switchover)" }
        if disk.state != .upToDate { return "local disk is \(disk.state.rawValue)" }
        if let b = crashCopyBlocker(now) { return b }
        if let g = state.masterGeneration, !g.isNone, disk.generations.current != g, !disk.generations.knows(g) {
            return "local data is behind generation \(g), which the last master announced (its newer data is on no reachable disk: promote --force accepts the loss)"
        }
        if !settings.has(.skipLeaseWait), now < grantedLeaseExpiry {
            let ms = Int((grantedLeaseExpiry - now).milliseconds)
            if let h = grantedLeaseHolder { return "waiting \(ms) ms for the lease granted to \(h) to expire" }
            return "restart quarantine: \(ms) ms more"
        }
        if highestSeenEpoch.value == UInt64.max || state.promisedEpoch.value == UInt64.max { return "epoch space exhausted" }
        return nil
    }

    // MARK: - Master: renewals, lease, outdate

    private mutating func sendRenewals(_ now: Instant, _ out: inout [NodeAction]) {
        renewSeq &+= 1
        renewsSent.append((renewSeq, now))
        if renewsSent.count > 32 { renewsSent.removeFirst(renewsSent.count - 32) }
        lastRenewSent = now
        let m = QuorumMessage.renew(epoch: masterEpoch, seq: renewSeq, generation: disk.generations.current)
        out.append(.send(to: peer, m))
        out.append(.send(to: arbitrator, m))
    }

    private mutating func progressFence(_ now: Instant, _ out: inout [NodeAction]) {
        if peerReplication != .inSync, !fence.confirmed, now >= peerReplicationSince + timings.renewInterval {
            if settings.has(.skipOutdate) {
                fence.confirmed = true
                log("peerOutdated", [("peer", peer.name), ("confirmedBy", "nobody")], &out)
                return
            }
            if let r = fence.requesting {
                if settings.splitBrain == .allow, now >= r.since + timings.failureTimeout {
                    fence.requesting = nil
                    fence.confirmed = true
                    log("peerOutdated", [("peer", peer.name), ("confirmedBy", "nobody (split_brain=allow)")], &out)
                } else if now >= r.lastSent + timings.renewInterval {
                    fence.requesting = (r.epoch, r.instance, r.since, now)
                    out.append(.send(to: arbitrator, .outdate(peer: peer, epoch: r.epoch, instance: r.instance)))
                }
            } else {
                fence.instance += 1
                fence.clearing = nil
                fence.requesting = (masterEpoch, fence.instance, now, now)
                log("outdatingPeer", [("peer", peer.name), ("replication", peerReplication.rawValue), ("instance", String(fence.instance))], &out)
                out.append(.send(to: arbitrator, .outdate(peer: peer, epoch: masterEpoch, instance: fence.instance)))
            }
        }
        if let c = fence.clearing, now >= c.lastSent + timings.renewInterval {
            fence.clearing = (c.epoch, c.instance, now)
            out.append(.send(to: arbitrator, .clearOutdate(peer: peer, epoch: c.epoch, instance: c.instance)))
        }
    }

    private mutating func onPeerReplication(_ s: PeerReplicationState, now: Instant, _ out: inout [NodeAction]) {
        let old = peerReplication
        if s != old { peerReplication = s; peerReplicationSince = now }
        guard role == .primary, s != old else { return }
        if s == .inSync {
            fence.requesting = nil
            if fence.confirmed {
                // The gate requires the peer again before the arbitrator forgets the mark.
                fence.confirmed = false
                syncGate(&out)
            }
            if state.peerOutdatedAt != nil {
                state.peerOutdatedAt = nil
                persist(&out)
            }
            log("peerInSync", [("peer", peer.name)], &out)
            startClear(now, &out)
        } else {
            log("peerReplication", [("peer", peer.name), ("state", s.rawValue)], &out)
        }
    }

    private mutating func startClear(_ now: Instant, _ out: inout [NodeAction]) {
        fence.clearing = (masterEpoch, fence.instance, now)
        out.append(.send(to: arbitrator, .clearOutdate(peer: peer, epoch: masterEpoch, instance: fence.instance)))
    }

    private mutating func stepDown(reason: String, master: NodeID?, now: Instant, _ out: inout [NodeAction]) {
        role = .secondary
        leaseValidUntil = .zero
        syncGate(&out) // closed before anything else happens
        if !servicesFenced { out.append(.fenceServices) }
        servicesFenced = false
        if drainingSince != nil {
            drainingSince = nil
            out.append(.adminResult(.switchover, .failure(AdminRefusal("switchover failed: \(reason)"))))
        }
        candidacy = nil
        fence = PeerFence()
        lastHeardMaster = now
        lastRenewSent = nil
        state.role = .secondary
        // Our own vote in this epoch (still persisted) keeps us from following anyone else in it.
        state.master = master
        persist(&out)
        out.append(.becomeSecondary(epoch: state.promisedEpoch, master: master))
        log("demoted", [("reason", reason)], &out)
    }

    // MARK: - Elections

    private mutating func startCandidacy(force: Bool, bump: Bool, _ now: Instant, _ out: inout [NodeAction]) {
        let e = Epoch(max(state.promisedEpoch, highestSeenEpoch).value + 1)
        state.promisedEpoch = e
        state.votedFor = me
        if !bump { state.master = nil }
        persistVote(&out)
        noteEpoch(e)
        var c = Candidacy(epoch: e, force: force, bump: bump, startedAt: now, lastSentAt: now)
        syncGate(&out)
        log(bump ? "reelection" : "candidacy", [("candidateEpoch", e.description), ("force", String(force))], &out)
        sendVoteRound(&c, now, &out)
        candidacy = c
    }

    private mutating func sendVoteRound(_ c: inout Candidacy, _ now: Instant, _ out: inout [NodeAction]) {
        roundCounter &+= 1
        c.rounds.append((roundCounter, now))
        if c.rounds.count > 16 { c.rounds.removeFirst() }
        c.lastSentAt = now
        let r = VoteRequest(epoch: c.epoch, round: roundCounter, disk: disk.state, generations: disk.generations, force: c.force)
        out.append(.send(to: peer, .voteRequest(r)))
        out.append(.send(to: arbitrator, .voteRequest(r)))
    }

    private mutating func onVoteReply(from: NodeID, epoch: Epoch, round: UInt64, promised: Epoch, refusal: VoteRefusal?,
                                      now: Instant, _ out: inout [NodeAction]) {
        noteEpoch(promised)
        guard var c = candidacy, epoch == c.epoch else { return }
        c.heardFrom.insert(from)
        candidacy = c
        if let refusal {
            let who = from == arbitrator ? "arbitrator" : "peer \(from)"
            whyNotPromoted = "\(who) refused vote: \(Self.explain(refusal, candidate: me))"
            log("voteRefused", [("by", from.name), ("candidateEpoch", epoch.description), ("why", Self.explain(refusal, candidate: me))], &out)
            if promised > c.epoch {
                candidacy = nil
                nextCandidacyAt = now + jitter(upTo: timings.renewInterval)
            }
            return
        }
        guard let sent = c.rounds.first(where: { $0.round == round }) else { return }
        // A grant is worth only the lease it carries: once that would have lapsed, the voter may
        // have voted again (in a newer epoch) and this epoch may already be superseded.
        guard now < sent.at + leaseSpan else {
            log("staleVoteIgnored", [("by", from.name), ("candidateEpoch", epoch.description)], &out)
            return
        }
        win(c, leaseAnchor: leaseAnchor(sent: sent.at, now: now), via: from, now, &out)
    }

    static func explain(_ r: VoteRefusal, candidate: NodeID) -> String {
        switch r {
        case .outdated(let e): return "\(candidate) is outdated at epoch \(e)"
        case .notUpToDate(let d): return "\(candidate) disk is \(d.rawValue)"
        case .dataBehind: return "\(candidate) data is behind"
        case .diverged: return "\(candidate) data diverged (split brain)"
        default: return r.description
        }
    }

    private mutating func win(_ c: Candidacy, leaseAnchor: Instant, via: NodeID, _ now: Instant, _ out: inout [NodeAction]) {
        precondition(c.epoch == state.promisedEpoch,
                     "\(me): won epoch \(c.epoch) but promised \(state.promisedEpoch) (candidacy \(c))")
        candidacy = nil
        whyNotPromoted = nil
        let wasPrimary = role == .primary
        masterEpoch = c.epoch
        state.master = me
        state.lastMasterEpoch = c.epoch
        state.role = .primary
        if !disk.generations.current.isNone { state.masterGeneration = disk.generations.current }
        let fenced = raiseFence(c.epoch)
        persist(&out)
        defer { if fenced { emitFence(&out) } }
        // A vote granted by another voter is also a lease grant, anchored at the request's send time.
        leaseValidUntil = max(wasPrimary ? leaseValidUntil : .zero, leaseAnchor + leaseSpan)
        lastGrantAt = now
        if let j = clockJumpAt, leaseAnchor >= j { clockJumpAt = nil }
        if wasPrimary {
            syncGate(&out)
            log("epochRaised", [("via", via.name)], &out)
            return
        }
        becomeMaster(now)
        syncGate(&out)
        out.append(.becomePrimary(epoch: c.epoch, newGeneration: c.force))
        log("promoted", [("via", "vote of \(via)"), ("force", String(c.force))], &out)
    }

    private mutating func winAlone(_ c: Candidacy, _ now: Instant, _ out: inout [NodeAction]) {
        candidacy = nil
        whyNotPromoted = nil
        masterEpoch = c.epoch
        state.master = me
        state.lastMasterEpoch = c.epoch
        state.role = .primary
        if !disk.generations.current.isNone { state.masterGeneration = disk.generations.current }
        let fenced = raiseFence(c.epoch)
        persist(&out)
        becomeMaster(now)
        leaseValidUntil = now + leaseSpan
        syncGate(&out)
        out.append(.becomePrimary(epoch: c.epoch, newGeneration: true))
        if fenced { emitFence(&out) }
        log("promoted", [("via", "nobody answered for failure_timeout (split_brain=allow)")], &out)
    }

    /// A master's own generation is the newest its voters must find in a candidate's data
    /// (it announces it in every renewal; recorded here for when this node votes later).
    private mutating func noteOwnGeneration(_ out: inout [NodeAction]) {
        let g = disk.generations.current
        guard !g.isNone, state.masterGeneration != g else { return }
        state.masterGeneration = g
        persist(&out)
    }

    private mutating func becomeMaster(_ now: Instant) {
        role = .primary
        primarySince = now
        newerEpochReported = nil
        clockJumpAt = nil
        servicesFenced = false
        fence = PeerFence()
        peerReplication = .disconnected
        peerReplicationSince = now
        lastRenewSent = nil
        drainingSince = nil
        handover = nil
        grantedLeaseHolder = me
    }

    /// The voting rules of design.md §2, for a data node voting for its peer.
    private func refusal(for r: VoteRequest, from candidate: NodeID, now: Instant) -> VoteRefusal? {
        if r.epoch < state.promisedEpoch { return .staleEpoch }
        if r.epoch == state.promisedEpoch {
            if let v = state.votedFor { return v == candidate ? nil : .alreadyVoted(v) }
            if let m = state.master, m != candidate { return .alreadyVoted(m) }
        }
        if role == .primary { return .isMaster }
        if !settings.has(.skipLeaseWait), grantedLeaseHolder != candidate, now < grantedLeaseExpiry {
            let ms = UInt32(clamping: Int64((grantedLeaseExpiry - now).milliseconds.rounded(.up)))
            if let h = grantedLeaseHolder { return .leaseHeld(holder: h, remainingMilliseconds: ms) }
            return .restartQuarantine(remainingMilliseconds: ms)
        }
        if !r.force {
            if r.disk != .upToDate { return .notUpToDate(r.disk) }
            if let e = state.peerOutdatedAt { return .outdated(at: e) }
            let mine = disk.generations
            // A voter whose own data nobody vouches for (inconsistent: mid-sync, fresh, just
            // discarded) has no generation to hold against the candidate.
            if disk.state != .diskless, disk.state != .inconsistent, !mine.current.isNone, mine.current != r.generations.current,
               !r.generations.knows(mine.current) {
                return mine.knows(r.generations.current) ? .dataBehind : .diverged
            }
            // The arbitrator's rule, here too: the candidate must hold the last master's data,
            // even when this voter's own copy is just as stale (the master wrote alone, then its
            // disk was lost; the two stale copies must not elect each other).
            if let g = state.masterGeneration, !g.isNone, r.generations.current != g, !r.generations.knows(g) {
                return .dataBehind
            }
        }
        return nil
    }

    private mutating func onVoteRequest(_ r: VoteRequest, from: NodeID, now: Instant, _ out: inout [NodeAction]) {
        noteEpoch(r.epoch)
        if let why = refusal(for: r, from: from, now: now) {
            log("voteRefused", [("candidate", from.name), ("candidateEpoch", r.epoch.description), ("why", why.description)], &out)
            out.append(.send(to: from, .voteReply(epoch: r.epoch, round: r.round, promised: state.promisedEpoch, refusal: why)))
            return
        }
        let fresh = !(r.epoch == state.promisedEpoch && state.votedFor == from)
        candidacy = nil
        handover = nil
        state.promisedEpoch = r.epoch
        state.votedFor = from
        state.master = from
        let fenced = raiseFence(r.epoch)
        if fresh || fenced { persistVote(&out) }
        if fenced { emitFence(&out) }
        // A vote is also a lease grant to the candidate (its lease starts at the request).
        grantedLeaseHolder = from
        grantedLeaseExpiry = now + timings.lease
        lastHeardMaster = now
        syncGate(&out)
        if fresh {
            out.append(.becomeSecondary(epoch: r.epoch, master: from))
            log("voteGranted", [("candidate", from.name), ("candidateEpoch", r.epoch.description)], &out)
        }
        out.append(.send(to: from, .voteReply(epoch: r.epoch, round: r.round, promised: r.epoch, refusal: nil)))
    }

    // MARK: - Messages

    private mutating func receive(_ stamped: QuorumMessage, from: NodeID, now: Instant, _ out: inout [NodeAction]) {
        var m = stamped
        if from == arbitrator {
            // Arbitrator continuity: its answers count only from the state incarnation this
            // node knows (adopted on first contact, durably, before it is relied on).
            var incarnation: UInt64 = 0
            if case let .stamped(i, inner) = stamped { incarnation = i; m = inner }
            switch state.arbitratorIncarnation {
            case nil:
                state.arbitratorIncarnation = incarnation
                persist(&out)
                log("arbitratorAdopted", [("incarnation", String(incarnation, radix: 16))], &out)
            case incarnation?:
                if foreignArbitratorIncarnation != nil {
                    foreignArbitratorIncarnation = nil
                    log("arbitratorTrusted", [("incarnation", String(incarnation, radix: 16))], &out)
                }
            case let known?:
                // It answered, even if it does not count: under split_brain = "allow" a node
                // must not take that for silence and promote alone.
                if case .voteReply(let e, _, _, _) = m, var c = candidacy, c.epoch == e { c.heardFrom.insert(from); candidacy = c }
                if foreignArbitratorIncarnation != incarnation {
                    foreignArbitratorIncarnation = incarnation
                    log("arbitratorIncarnationMismatch", [("known", String(known, radix: 16)), ("seen", String(incarnation, radix: 16)),
                                                          ("why", "its votes and grants are not counted until hactl arbitrator-accept")], &out)
                }
                return
            }
        } else if case .stamped = stamped {
            return log("messageIgnored", [("from", from.name), ("why", "only the arbitrator stamps its answers")], &out)
        }
        if from == peer { lastPeerContact = now } else if from == arbitrator { lastArbitratorContact = now } else {
            log("messageIgnored", [("from", from.name), ("why", "not a member of this cluster")], &out)
            return
        }
        if let p = reportedPromise(m) { onNewerEpochReported(p, by: from, &out) }
        switch m {
        case let .renew(e, seq, generation) where from == peer:
            onRenew(epoch: e, seq: seq, generation: generation, now: now, &out)
        case let .renewReply(e, seq, granted, promised):
            onRenewReply(from: from, epoch: e, seq: seq, granted: granted, promised: promised, now: now, &out)
        case let .voteRequest(r) where from == peer:
            onVoteRequest(r, from: from, now: now, &out)
        case let .voteReply(e, round, promised, refusal):
            onVoteReply(from: from, epoch: e, round: round, promised: promised, refusal: refusal, now: now, &out)
        case let .outdateReply(p, e, i, granted, promised) where from == arbitrator:
            noteEpoch(promised)
            guard role == .primary, p == peer, let r = fence.requesting, r.epoch == e, r.instance == i else { return }
            fence.requesting = nil
            if granted {
                fence.confirmed = true
                state.peerOutdatedAt = e
                persist(&out) // before the gate lets a write through without the peer
                syncGate(&out)
                log("peerOutdated", [("peer", peer.name), ("confirmedBy", arbitrator.name), ("instance", String(i))], &out)
            } else {
                log("outdateRefused", [("peer", peer.name), ("arbitratorEpoch", promised.description)], &out)
            }
        case let .clearOutdateReply(p, e, i) where from == arbitrator:
            if let c = fence.clearing, p == peer, c.epoch == e, c.instance == i { fence.clearing = nil }
        case let .release(e, to) where from == peer:
            onRelease(epoch: e, handoverTo: to, now: now, &out)
        case let .heartbeat(h) where from == peer:
            peerHeartbeat = h
            noteEpoch(h.epoch)
        case .identifyReply(let promised) where from == arbitrator:
            noteEpoch(promised)  // the incarnation was checked (or adopted) above
        default:
            log("messageIgnored", [("from", from.name), ("kind", Self.kind(m))], &out)
        }
    }

    static func kind(_ m: QuorumMessage) -> String {
        switch m {
        case .renew: return "renew"
        case .renewReply: return "renewReply"
        case .voteRequest: return "voteRequest"
        case .voteReply: return "voteReply"
        case .outdate: return "outdate"
        case .outdateReply: return "outdateReply"
        case .clearOutdate: return "clearOutdate"
        case .clearOutdateReply: return "clearOutdateReply"
        case .release: return "release"
        case .heartbeat: return "heartbeat"
        case .stamped: return "stamped"
        case .identify: return "identify"
        case .identifyReply: return "identifyReply"
        }
    }

    private mutating func onRenew(epoch e: Epoch, seq: UInt64, generation: GenerationID, now: Instant, _ out: inout [NodeAction]) {
        noteEpoch(e)
        if role == .primary {
            guard e > masterEpoch else {
                out.append(.send(to: peer, .renewReply(epoch: e, seq: seq, granted: false, promised: state.promisedEpoch)))
                return
            }
            // The peer won a newer epoch, so our lease has lapsed by the voters' clocks.
            stepDown(reason: "\(peer) is master of epoch \(e)", master: nil, now: now, &out)
        }
        let acceptable = e > state.promisedEpoch
            || (e == state.promisedEpoch && (state.votedFor == nil || state.votedFor == peer) && (state.master == nil || state.master == peer))
        guard acceptable else {
            if lastRefusedRenewEpoch != e {
                // Logged once per epoch: a deposed master renews every interval until it notices.
                lastRefusedRenewEpoch = e
                log("renewRefused", [("master", peer.name), ("masterEpoch", e.description),
                                     ("why", e < state.promisedEpoch ? "promised a newer epoch" : "voted for or follows \((state.votedFor ?? state.master)?.name ?? "another node") in this epoch")], &out)
            }
            out.append(.send(to: peer, .renewReply(epoch: e, seq: seq, granted: false, promised: state.promisedEpoch)))
            return
        }
        let newMaster = e != state.promisedEpoch || state.master != peer
        if let c = candidacy, c.epoch <= e { candidacy = nil }
        if e > state.promisedEpoch { state.votedFor = nil }
        let fenced = raiseFence(e)
        if newMaster {
            state.promisedEpoch = e
            state.master = peer
        }
        // Gap 4: the peer is master of an epoch newer than our mark on it, so our data follows
        // its data from now on and the mark is stale. Checked on every granted renewal, not only
        // when we start following: a vote (a forced one skips the mark) already made the peer
        // our master, and its renewals then are not "new".
        var staleMark = false
        if let o = state.peerOutdatedAt, e > o {
            state.peerOutdatedAt = nil
            staleMark = true
            log("staleMarkCleared", [("peer", peer.name), ("markEpoch", o.description)], &out)
        }
        // The master's data generation, as the arbitrator records it: a later candidate must know it.
        let announced = !generation.isNone && state.masterGeneration != generation
        if announced { state.masterGeneration = generation }
        if newMaster || fenced || staleMark || announced { persist(&out) }
        if fenced { emitFence(&out) }
        if let h = handover, e > h.epoch { handover = nil }
        grantedLeaseHolder = peer
        grantedLeaseExpiry = now + timings.lease
        lastHeardMaster = now
        whyNotPromoted = nil
        promotionRequest = nil
        syncGate(&out)
        if newMaster {
            out.append(.becomeSecondary(epoch: e, master: peer))
            log("following", [("master", peer.name)], &out)
        }
        out.append(.send(to: peer, .renewReply(epoch: e, seq: seq, granted: true, promised: state.promisedEpoch)))
    }

    private mutating func onRenewReply(from: NodeID, epoch e: Epoch, seq: UInt64, granted: Bool, promised: Epoch,
                                       now: Instant, _ out: inout [NodeAction]) {
        noteEpoch(promised)
        guard role == .primary, e == masterEpoch else { return }
        if granted {
            if let sent = renewsSent.first(where: { $0.seq == seq }) {
                leaseValidUntil = max(leaseValidUntil, leaseAnchor(sent: sent.at, now: now) + leaseSpan)
                lastGrantAt = now
                if let j = clockJumpAt, sent.at >= j {
                    clockJumpAt = nil
                    log("gateReopened", [("why", "renewal sent after the clock jump granted by \(from)")], &out)
                }
            }
        } else if from == peer, promised >= masterEpoch, candidacy == nil, drainingSince == nil,
                  now < leaseValidUntil, now >= nextCandidacyAt {
            // The peer promised an epoch at least ours to someone else (its own failed candidacy):
            // it will never follow us there. Move to a newer epoch with the voters' consent.
            startCandidacy(force: false, bump: true, now, &out)
        }
    }

    private mutating func onRelease(epoch e: Epoch, handoverTo: NodeID?, now: Instant, _ out: inout [NodeAction]) {
        guard role == .secondary, e.value < UInt64.max else { return }
        let next = e.next
        guard e >= state.promisedEpoch else {
            // Late or duplicate. Only a handover into the epoch we already stand in is still
            // useful (its sender voted for us there); it never touches a lease.
            if handoverTo == me, var c = candidacy, c.epoch == next, now >= c.lastSentAt + timings.renewInterval / 2 {
                sendVoteRound(&c, now, &out)
                candidacy = c
            }
            return
        }
        // The sender, master of e (the newest epoch we know), closed its gate before sending
        // this: the lease we granted it is given up.
        if grantedLeaseHolder == peer || grantedLeaseHolder == nil { grantedLeaseExpiry = now }
        lastHeardMaster = now - timings.failureTimeout
        nextCandidacyAt = now
        let mayTake = handoverTo == me && disk.state == .upToDate && !state.maintenance
        guard mayTake else {
            log("masterReleased", [("releasedEpoch", e.description), ("handover", handoverTo?.name ?? "none")], &out)
            return
        }
        // The old master voted for us in e+1. Stand at once in e+1: its vote is granted again
        // with a fresh lease anchor, so a release that arrives late (after the old master moved
        // on to a newer epoch) promotes nobody.
        guard next.value < UInt64.max else { return }
        candidacy = nil
        state.promisedEpoch = next
        state.votedFor = me
        state.master = nil
        persist(&out)
        noteEpoch(next)
        var c = Candidacy(epoch: next, force: false, bump: false, startedAt: now, lastSentAt: now)
        syncGate(&out)
        log("candidacy", [("candidateEpoch", next.description), ("via", "switchover from \(peer)")], &out)
        sendVoteRound(&c, now, &out)
        candidacy = c
    }

    private mutating func onDisk(_ d: LocalDisk, now: Instant, _ out: inout [NodeAction]) {
        let old = disk
        disk = d
        if role == .primary { noteOwnGeneration(&out) }
        if old.state != d.state {
            log("diskState", [("from", old.state.rawValue), ("to", d.state.rawValue)], &out)
            if d.state != .upToDate, let c = candidacy, !c.force, !c.bump { candidacy = nil }
        }
    }

    // MARK: - Admin

    private mutating func onAdmin(_ command: AdminCommand, now: Instant, _ out: inout [NodeAction]) {
        func refuse(_ why: String) {
            out.append(.adminResult(command, .failure(AdminRefusal(why))))
            log("adminRefused", [("command", "\(command)"), ("why", why)], &out)
        }
        switch command {
        case .switchover:
            guard role == .primary else { return refuse("this node is not the master (master: \(state.master?.name ?? "none"))") }
            guard drainingSince == nil else { return refuse("a switchover is already draining") }
            guard candidacy == nil else { return refuse("an epoch change is in progress; retry") }
            guard now < leaseValidUntil else { return refuse("this master holds no valid lease") }
            guard !fence.confirmed else { return refuse("peer is outdated") }
            guard peerReplication == .inSync else { return refuse("peer is not in sync (\(peerReplication.rawValue))") }
            guard let c = lastPeerContact, now - c < timings.failureTimeout else { return refuse("peer is unreachable") }
            if let h = peerHeartbeat {
                guard !h.maintenance else { return refuse("peer is in maintenance") }
                guard h.disk == .upToDate else { return refuse("peer disk is \(h.disk.rawValue)") }
            }
            drainingSince = now
            out.append(.drainForSwitchover)
            log("switchoverDraining", [("to", peer.name)], &out)
        case .promote(let force):
            guard role == .secondary else { return refuse("already master at epoch \(masterEpoch)") }
            guard !state.maintenance else { return refuse("maintenance mode is on") }
            // A forced promotion is the operator overriding the automatic elections that keep
            // failing (e.g. this node is outdated and the master is gone): it replaces them.
            guard candidacy == nil || force else { return refuse("an election is already running") }
            if force { candidacy = nil }
            if !force, disk.state != .upToDate { return refuse("local disk is \(disk.state.rawValue); promote --force overrides") }
            if !force, let b = crashCopyBlocker(now) { return refuse(b + "; promote --force overrides") }
            if let m = state.master, m != me, now < lastHeardMaster + timings.failureTimeout {
                return refuse("\(m) is master at epoch \(state.promisedEpoch); run switchover there")
            }
            if state.promisedEpoch.value == UInt64.max || highestSeenEpoch.value == UInt64.max { return refuse("epoch space exhausted") }
            if !settings.has(.skipLeaseWait), now < grantedLeaseExpiry {
                // This node's own vote waits for the lease it granted, like any vote.
                promotionRequest = (force, grantedLeaseExpiry + timings.failureTimeout)
                let ms = Int((grantedLeaseExpiry - now).milliseconds.rounded(.up))
                let holder = grantedLeaseHolder.map { "the lease granted to \($0)" } ?? "the restart quarantine"
                out.append(.adminResult(command, .success("election starts in \(ms) ms, when \(holder) has expired")))
                return
            }
            startCandidacy(force: force, bump: false, now, &out)
            out.append(.adminResult(command, .success("election started for epoch \(state.promisedEpoch)\(force ? " (forced: new data generation)" : "")")))
        case .demote:
            guard role == .primary else { return refuse("this node is not the master") }
            let e = masterEpoch
            stepDown(reason: "admin demote", master: nil, now: now, &out)
            out.append(.send(to: peer, .release(epoch: e, handoverTo: nil)))
            out.append(.send(to: arbitrator, .release(epoch: e, handoverTo: nil)))
            out.append(.adminResult(command, .success("stepped down from epoch \(e)")))
        case .maintenance(let on):
            // On the master, maintenance unmanages its resources (the runtime holds their
            // restarts and give-ups) while the lease and the data path go on; on a backup it
            // also keeps the node from standing. Either way the node is never elected anew.
            if state.maintenance != on {
                state.maintenance = on
                persist(&out)
                if on, let c = candidacy, !c.bump { candidacy = nil }
            }
            out.append(.adminResult(command, .success("maintenance \(on ? "on" : "off")")))
            log("maintenance", [("on", String(on))], &out)
        case .localDataDiscarded:
            guard state.peerOutdatedAt != nil || state.masterGeneration != nil else { return }
            let mark = state.peerOutdatedAt
            state.peerOutdatedAt = nil
            state.masterGeneration = nil
            persist(&out)
            log("localDataDiscarded", [("peerOutdatedAtCleared", mark?.description ?? "-")], &out)
        case .acceptArbitrator:
            guard let seen = foreignArbitratorIncarnation else {
                return refuse("nothing to accept: the arbitrator has answered from no other incarnation than the one this node knows"
                              + (state.arbitratorIncarnation.map { " (\(String($0, radix: 16)))" } ?? ""))
            }
            let old = state.arbitratorIncarnation
            state.arbitratorIncarnation = seen
            foreignArbitratorIncarnation = nil
            persist(&out)
            out.append(.adminResult(command, .success("now counting the arbitrator's incarnation \(String(seen, radix: 16)) (was \(old.map { String($0, radix: 16) } ?? "none"))")))
            log("arbitratorAccepted", [("incarnation", String(seen, radix: 16)), ("was", old.map { String($0, radix: 16) } ?? "none")], &out)
        }
    }

    private mutating func onDrained(now: Instant, _ out: inout [NodeAction]) {
        guard role == .primary, drainingSince != nil else {
            log("drainIgnored", [("why", "no switchover in progress")], &out)
            return
        }
        drainingSince = nil
        guard candidacy == nil, state.promisedEpoch == masterEpoch, now < leaseValidUntil else {
            out.append(.adminResult(.switchover, .failure(AdminRefusal("switchover failed: the epoch changed or the lease lapsed while draining"))))
            // Still master (a step-down would have ended the drain already): resume.
            out.append(.cancelDrain)
            log("switchoverAbandoned", [("reason", "epoch changed while draining")], &out)
            return
        }
        let e = masterEpoch
        // Close the gate first: from here on this node never acknowledges in epoch e.
        leaseValidUntil = now
        role = .secondary
        servicesFenced = false // the shell stopped them for the drain
        syncGate(&out)
        fence = PeerFence()
        state.promisedEpoch = e.next
        state.votedFor = peer
        state.master = peer
        state.role = .secondary
        let fenced = raiseFence(e.next)
        persist(&out)
        if fenced { emitFence(&out) }
        noteEpoch(e.next)
        grantedLeaseHolder = peer
        grantedLeaseExpiry = now + timings.lease
        lastHeardMaster = now
        handover = Handover(epoch: e, until: now + timings.failureTimeout, lastSent: now)
        syncGate(&out)
        out.append(.becomeSecondary(epoch: e.next, master: peer))
        out.append(.send(to: peer, .release(epoch: e, handoverTo: peer)))
        out.append(.send(to: arbitrator, .release(epoch: e, handoverTo: peer)))
        out.append(.adminResult(.switchover, .success("handed over to \(peer) for epoch \(e.next)")))
        log("switchedOver", [("to", peer.name)], &out)
    }
}

/// FNV-1a, to derive per-node jitter seeds without a global RNG.
func fnv1a(_ s: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return h
}

private extension String {
    var nilIfEmpty: String? { isEmpty ? nil : self }
}
