import HACore

/// The local disk as the replication layer reports it.
public struct LocalDisk: Equatable, Sendable {
    public var state: DiskState
    public var generations: DataGenerations
    public init(state: DiskState, generations: DataGenerations) { self.state = state; self.generations = generations }
}

public enum AdminCommand: Equatable, Sendable {
    /// Planned handover from the master to its peer (zero loss, < 1 s).
    case switchover
    /// Start an election here now; `force` skips the data checks and starts a new generation.
    case promote(force: Bool)
    /// The master steps down; the best candidate takes over.
    case demote
    /// While on, this node never becomes a candidate (it still votes).
    case maintenance(Bool)
    /// Trust the arbitrator incarnation this node has seen (after a rebuilt or rolled-back
    /// arbitrator state); until then its votes and grants are not counted.
    case acceptArbitrator
}

public enum NodeEvent: Sendable {
    /// Periodic wake-up; the shell ticks at least every renew_interval / 2.
    case tick
    case linkUp(NodeID)
    case linkDown(NodeID)
    case received(from: NodeID, QuorumMessage)
    case disk(LocalDisk)
    case peerReplication(PeerReplicationState)
    case admin(AdminCommand)
    /// Answer to `.drainForSwitchover`: no write in flight, the peer has every acknowledged write.
    case switchoverDrained
}

public enum NodeAction: Equatable, Sendable {
    case send(to: NodeID, QuorumMessage)
    /// Must be durable before any later action of the same batch runs.
    case persist(NodePersistentState)
    /// The new gate for the data path. On a secondary the gate is closed and its epoch is
    /// the promised epoch: the fencing token below which replication frames are refused.
    case writeGate(WriteGate)
    case becomePrimary(epoch: Epoch, newGeneration: Bool)
    case becomeSecondary(epoch: Epoch, master: NodeID?)
    /// Suspend new writes, drain in-flight ones, confirm the peer has them all, then feed
    /// `.switchoverDrained`. A `.adminResult(.switchover, .failure)` means: resume writes.
    case drainForSwitchover
    case adminResult(AdminCommand, Result<String, AdminRefusal>)
    case log(QuorumEvent)
}

/// A node's quorum view, for /status, /metrics and hactl.
public struct NodeQuorumStatus: Equatable, Sendable {
    public var role: Role
    /// The promised epoch.
    public var epoch: Epoch
    /// The master this node knows for `epoch` (itself when primary).
    public var master: NodeID?
    /// The master's lease end on the local clock (primary only).
    public var leaseValidUntil: Instant?
    /// Primary: its lease is valid. Secondary: it heard a master within failure_timeout.
    public var hasQuorum: Bool
    public var peerReachable: Bool
    /// nil on a secondary: only the master and candidates talk to the arbitrator.
    public var arbitratorReachable: Bool?
    public var maintenance: Bool
    /// Why this node is not master although no master is alive, e.g.
    /// "arbitrator refused vote: b is outdated at epoch 7".
    public var whyNotPromoted: String?
    public var gate: WriteGate
    public var disk: DiskState
    public var peerReplication: PeerReplicationState
    /// The arbitrator confirmed our outdate of the peer: writes are acknowledged without it.
    public var peerOutdated: Bool
    public var switchoverInProgress: Bool
    /// Why the arbitrator's answers are not counted (its state is another incarnation than
    /// the one this node knows), nil when they are.
    public var arbitratorRefused: String? = nil
}

extension NodeQuorumStatus {
    /// `why_not_promoted` of a master whose lease ran out by its own clock before its core
    /// stepped down (the process was paused, a tick is late).
    public static let leaseLapsedReason = "demoting: lease lapsed"

    /// The view to announce at `now` (the local monotonic clock, read when rendering, after
    /// the snapshot was taken). A snapshot is the core's state as of its last event; a
    /// primary's lease may have run out since. Mastership is derived here from the lease
    /// expiry, not taken from the cached role: primary only while `now < leaseValidUntil`,
    /// the same rule the write gate applies to every acknowledgement. Past it the node reads
    /// as a secondary that is demoting, with no master, whatever the timers have done yet.
    public func announced(at now: Instant) -> NodeQuorumStatus {
        guard role == .primary else { return self }
        var s = self
        if let until = leaseValidUntil, now < until {
            s.hasQuorum = true
            return s
        }
        s.role = .secondary
        s.master = nil
        s.leaseValidUntil = nil
        s.hasQuorum = false
        s.whyNotPromoted = Self.leaseLapsedReason
        s.peerOutdated = false
        return s
    }

    /// The lease left at `now` (zero unless primary with a running lease).
    public func leaseRemaining(at now: Instant) -> Duration {
        guard role == .primary, let until = leaseValidUntil, now < until else { return .zero }
        return until - now
    }
}
