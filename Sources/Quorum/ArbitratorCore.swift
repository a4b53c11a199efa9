import HACore

public enum ArbitratorAction: Equatable, Sendable {
    case send(cluster: String, to: NodeID, QuorumMessage)
    /// Must be durable before any later action of the same batch runs.
    case persist(cluster: String, ArbitratorPersistentState)
    case log(QuorumEvent)
}

/// What /metrics and /status show for one cluster.
public struct ArbitratorClusterStatus: Equatable, Sendable {
    public var cluster: String
    public var epoch: Epoch
    public var master: NodeID?
    public var votedFor: NodeID?
    public var leaseHolder: NodeID?
    /// On the arbitrator's clock; nil when no lease is running.
    public var leaseExpiry: Instant?
    public var outdated: [OutdateMark]
    public var lastContact: [NodeID: Instant]
    /// The state's incarnation, stamped on every reply.
    public var incarnation: UInt64 = 0
}

/// One cluster's /metrics figures (see `ArbitratorCore.metricsRows`).
public struct ArbitratorClusterMetrics: Equatable, Sendable {
    public var cluster: String
    public var epoch: Epoch
    public var leaseValid: Bool
    public var outdatedNodes: Int
    /// Filled in by the daemon (the core knows no connections).
    public var connectedNodes = 0
}

/// The arbitrator (witness) of design.md §2: one vote per cluster, for many clusters in one
/// process. Per message: one dictionary lookup and a few comparisons; it persists only when
/// an epoch, vote, master, generation or mark changes, never for a routine renewal.
public struct ArbitratorCore: Sendable {
    public let settings: QuorumSettings

    struct ClusterState: Sendable {
        var persisted: ArbitratorPersistentState
        var leaseHolder: NodeID?
        var leaseExpiry: Instant?
        var lastContact: [NodeID: Instant] = [:]
    }

    private var table: [String: ClusterState] = [:]
    /// First instant seen after (re)start: a lease granted before a crash is honoured until
    /// `startedAt + lease` (restart quarantine), since its expiry was not persisted.
    private var startedAt: Instant?

    public init(settings: QuorumSettings, persisted: [String: ArbitratorPersistentState]) {
        self.settings = settings
        for (name, p) in persisted { table[name] = ClusterState(persisted: p) }
    }

    public var clusters: [String] { table.keys.sorted() }

    public func status(cluster: String) -> ArbitratorClusterStatus? {
        guard let c = table[cluster] else { return nil }
        return ArbitratorClusterStatus(cluster: cluster, epoch: c.persisted.promisedEpoch, master: c.persisted.master,
                                       votedFor: c.persisted.votedFor, leaseHolder: c.leaseHolder, leaseExpiry: c.leaseExpiry,
                                       outdated: c.persisted.outdated, lastContact: c.lastContact,
                                       incarnation: c.persisted.incarnation)
    }

    /// The promised epoch of one cluster (zero if unknown): the fencing token every reply
    /// carries. Cheaper than `status(cluster:)` on the per-message path.
    public func epoch(cluster: String) -> Epoch {
        table[cluster]?.persisted.promisedEpoch ?? .zero
    }

    /// What /metrics shows per cluster, for every cluster the core knows, unsorted: one pass
    /// over the table, no per-cluster copies (10,000 clusters are scraped on the decision loop).
    public func metricsRows(at now: Instant) -> [ArbitratorClusterMetrics] {
        var rows: [ArbitratorClusterMetrics] = []
        rows.reserveCapacity(table.count)
        for (name, c) in table {
            rows.append(ArbitratorClusterMetrics(cluster: name, epoch: c.persisted.promisedEpoch,
                                                 leaseValid: c.leaseExpiry.map { now < $0 } ?? false,
                                                 outdatedNodes: c.persisted.outdated.count))
        }
        return rows
    }

    public mutating func handle(cluster: String, from: NodeID, _ message: QuorumMessage, at now: Instant) -> [ArbitratorAction] {
        if startedAt == nil { startedAt = now }
        var c = table[cluster] ?? ClusterState(persisted: .initial)
        var out: [ArbitratorAction] = []
        c.lastContact[from] = now
        switch message {
        case let .renew(e, seq, generation):
            let granted = mayFollow(&c, master: from, epoch: e, generation: generation, cluster: cluster, &out)
            if granted {
                c.leaseHolder = from
                c.leaseExpiry = now + settings.timings.lease
                // Gap 4: a mark on the master itself from an older epoch is stale — it won e
                // (a forced vote skips marks, and the peer's vote does not consult ours) and its
                // data is the data of e. Drop it, recording its position as cleared so that a
                // late duplicate of that outdate cannot bring it back.
                if let m = c.persisted.mark(of: from), m.epoch < e {
                    c.persisted.outdated.removeAll { $0.node == from }
                    if m.position > c.persisted.clearedPosition(of: from) {
                        c.persisted.cleared.removeAll { $0.node == from }
                        c.persisted.cleared.append(m)
                        c.persisted.cleared.sort { $0.node < $1.node }
                    }
                    out.append(.persist(cluster: cluster, c.persisted))
                    out.append(.log(event("staleMarkCleared", cluster, c, [("node", from.name), ("markEpoch", m.epoch.description)])))
                }
            } else {
                out.append(.log(event("renewRefused", cluster, c, [("master", from.name), ("masterEpoch", e.description)])))
            }
            out.append(.send(cluster: cluster, to: from, .renewReply(epoch: e, seq: seq, granted: granted, promised: c.persisted.promisedEpoch)))
        case let .voteRequest(r):
            vote(&c, r, candidate: from, cluster: cluster, now: now, &out)
        case let .outdate(peer, e, instance):
            var granted = peer != from && mayFollow(&c, master: from, epoch: e, generation: nil, cluster: cluster, &out)
            if granted {
                let pos = MarkPosition(epoch: e, instance: instance)
                if pos <= c.persisted.clearedPosition(of: peer) {
                    granted = false // a late duplicate of a mark that was already cleared
                } else if let m = c.persisted.mark(of: peer), pos <= m.position {
                    // Already recorded (duplicate) or superseded by a newer mark: still outdated.
                } else {
                    c.persisted.outdated.removeAll { $0.node == peer }
                    c.persisted.outdated.append(OutdateMark(node: peer, epoch: e, instance: instance))
                    c.persisted.outdated.sort { $0.node < $1.node }
                    out.append(.persist(cluster: cluster, c.persisted))
                    out.append(.log(event("peerOutdated", cluster, c, [("node", peer.name), ("by", from.name), ("markEpoch", e.description)])))
                }
            }
            out.append(.send(cluster: cluster, to: from, .outdateReply(peer: peer, epoch: e, instance: instance, granted: granted,
                                                                    promised: c.persisted.promisedEpoch)))
        case let .clearOutdate(peer, e, instance):
            // Bound to sender and epoch (gap 7): only the master of epoch e — the node this
            // arbitrator follows there (or in a newer epoch it adopts, as for a renewal) — may
            // clear, and only marks of its peer at or below (e, instance), so only marks of an
            // epoch ≤ its own. The marked node itself, a deposed master (an older epoch) or a
            // node that is not master never clear anything, nor record a cleared position that
            // would make a later mark look like a late duplicate. No reply: the sender resends.
            guard peer != from, mayFollow(&c, master: from, epoch: e, generation: nil, cluster: cluster, &out) else {
                out.append(.log(event("clearRefused", cluster, c, [("node", peer.name), ("by", from.name), ("clearEpoch", e.description),
                                                                   ("why", peer == from ? "a node cannot clear its own mark" : "not the master of that epoch")])))
                break
            }
            let pos = MarkPosition(epoch: e, instance: instance)
            var changed = false
            if pos > c.persisted.clearedPosition(of: peer) {
                c.persisted.cleared.removeAll { $0.node == peer }
                c.persisted.cleared.append(OutdateMark(node: peer, epoch: e, instance: instance))
                c.persisted.cleared.sort { $0.node < $1.node }
                changed = true
            }
            if let m = c.persisted.mark(of: peer), m.position <= pos {
                c.persisted.outdated.removeAll { $0.node == peer }
                changed = true
                out.append(.log(event("outdateCleared", cluster, c, [("node", peer.name), ("by", from.name)])))
            }
            if changed { out.append(.persist(cluster: cluster, c.persisted)) }
            out.append(.send(cluster: cluster, to: from, .clearOutdateReply(peer: peer, epoch: e, instance: instance)))
        case let .release(e, to):
            // The sender closed its write gate before sending this: its lease is over.
            if e == c.persisted.promisedEpoch, c.persisted.master == from, c.leaseHolder == from {
                c.leaseExpiry = now
                out.append(.log(event("leaseReleased", cluster, c, [("by", from.name), ("handoverTo", to?.name ?? "none")])))
            }
        case .identify:
            out.append(.send(cluster: cluster, to: from, .identifyReply(promised: c.persisted.promisedEpoch)))
        case .renewReply, .voteReply, .outdateReply, .clearOutdateReply, .heartbeat, .stamped, .identifyReply:
            out.append(.log(QuorumEvent("messageIgnored", [.init("cluster", cluster), .init("from", from.name), .init("kind", NodeCore.kind(message))])))
        }
        if let before = table[cluster]?.persisted {
            // One vote per epoch rests on this: a promise is never taken back.
            precondition(c.persisted.promisedEpoch >= before.promisedEpoch,
                         "arbitrator, cluster \(cluster): promised epoch went back from \(before.promisedEpoch) to \(c.persisted.promisedEpoch) on \(message) from \(from)")
        }
        table[cluster] = c
        // Every reply names the state it comes from, so a node can tell a lost or rolled-back
        // state (a new incarnation) from the one it knows (docs/quorum-protocol.md).
        for i in out.indices {
            if case let .send(cl, to, m) = out[i] { out[i] = .send(cluster: cl, to: to, .stamped(incarnation: c.persisted.incarnation, m)) }
        }
        return out
    }

    /// Renewal rule: follow `master` in epoch `e` unless an older epoch, or this epoch belongs
    /// to someone else (our vote or the master we know). A newer epoch is adopted: its master
    /// won a quorum, which already required the old master's lease to be over or given up.
    private func mayFollow(_ c: inout ClusterState, master: NodeID, epoch e: Epoch, generation: GenerationID?,
                           cluster: String, _ out: inout [ArbitratorAction]) -> Bool {
        var p = c.persisted
        if e < p.promisedEpoch { return false }
        if e == p.promisedEpoch {
            if let v = p.votedFor, v != master { return false }
            if let m = p.master, m != master { return false }
        } else {
            p.promisedEpoch = e
            p.votedFor = nil
        }
        p.master = master
        if let g = generation, !g.isNone { p.masterGeneration = g }
        if p != c.persisted {
            let newEpoch = p.promisedEpoch != c.persisted.promisedEpoch || p.master != c.persisted.master
            c.persisted = p
            out.append(.persist(cluster: cluster, p))
            if newEpoch { out.append(.log(event("following", cluster, c, [("master", master.name)]))) }
        }
        return true
    }

    private func vote(_ c: inout ClusterState, _ r: VoteRequest, candidate: NodeID, cluster: String, now: Instant,
                      _ out: inout [ArbitratorAction]) {
        let p = c.persisted
        var why: VoteRefusal?
        var repeatVote = false
        if r.epoch < p.promisedEpoch {
            why = .staleEpoch
        } else if r.epoch == p.promisedEpoch, let v = p.votedFor {
            if v == candidate { repeatVote = true } else { why = .alreadyVoted(v) }
        } else if r.epoch == p.promisedEpoch, let m = p.master, m != candidate {
            why = .alreadyVoted(m)
        }
        if why == nil, !repeatVote, !settings.has(.skipLeaseWait) {
            let quarantineEnd = (startedAt ?? now) + settings.timings.lease
            if let expiry = c.leaseExpiry, let holder = c.leaseHolder, holder != candidate, now < expiry {
                why = .leaseHeld(holder: holder, remainingMilliseconds: Self.ms(expiry - now))
            } else if now < quarantineEnd, c.leaseHolder != candidate {
                why = .restartQuarantine(remainingMilliseconds: Self.ms(quarantineEnd - now))
            }
        }
        if why == nil, !repeatVote, !r.force {
            if r.disk != .upToDate {
                why = .notUpToDate(r.disk)
            } else if let m = p.mark(of: candidate) {
                why = .outdated(at: m.epoch)
            } else if !p.masterGeneration.isNone, r.generations.current != p.masterGeneration,
                      !r.generations.knows(p.masterGeneration) {
                why = .dataBehind
            }
        }
        if let why {
            out.append(.send(cluster: cluster, to: candidate, .voteReply(epoch: r.epoch, round: r.round, promised: p.promisedEpoch, refusal: why)))
            out.append(.log(event("voteRefused", cluster, c, [("candidate", candidate.name), ("candidateEpoch", r.epoch.description), ("why", NodeCore.explain(why, candidate: candidate))])))
            return
        }
        if !repeatVote {
            c.persisted.promisedEpoch = r.epoch
            c.persisted.votedFor = candidate
            c.persisted.master = candidate
            if r.force { c.persisted.masterGeneration = .none } // a forced master starts a new generation
            if !settings.has(.votesNotPersisted) { out.append(.persist(cluster: cluster, c.persisted)) }
            out.append(.log(event("voteGranted", cluster, c, [("candidate", candidate.name), ("force", String(r.force))])))
        }
        // A vote is a lease grant to the winner, starting now on this clock.
        c.leaseHolder = candidate
        c.leaseExpiry = now + settings.timings.lease
        out.append(.send(cluster: cluster, to: candidate, .voteReply(epoch: r.epoch, round: r.round, promised: r.epoch, refusal: nil)))
    }

    private static func ms(_ d: Duration) -> UInt32 { UInt32(clamping: Int64(d.milliseconds.rounded(.up))) }

    private func event(_ name: String, _ cluster: String, _ c: ClusterState, _ fields: [(String, String)]) -> QuorumEvent {
        QuorumEvent(name, [.init("cluster", cluster), .init("epoch", c.persisted.promisedEpoch.description)]
                    + fields.map { QuorumEvent.Field($0.0, $0.1) })
    }
}
