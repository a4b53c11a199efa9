import HACore

/// The local disk as the replication layer reports it.
public struct LocalDisk: Equatable, Sendable {
    public var state: DiskState
    public var generations: DataGenerations
    /// This node crashed as primary under protocol B or C and has not yet taken its crash
    /// extents back from its peer, which holds every write it acknowledged there: it does not
    /// stand for election while that peer is up to date in its generation and reachable.
    public var crashCopyOnPeer: Bool
    public init(state: DiskState, generations: DataGenerations, crashCopyOnPeer: Bool = false) {
        self.state = state; self.generations = generations; self.crashCopyOnPeer = crashCopyOnPeer
    }
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
    /// The operator discarded this node's data (`resolve` keeping the peer's side, or
    /// `invalidate`): what this node recorded about its own former data — its outdate mark on
    /// the peer, the generation it last knew a master in — no longer speaks for anything.
    case localDataDiscarded
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
    /// One that arrives after the switchover was abandoned (`.cancelDrain`) is ignored.
    case switchoverDrained
    /// The local monotonic clock stood still (or fell behind) while real time went on, by
    /// about this much: the process or its VM was frozen (a paused KVM guest's CLOCK_MONOTONIC
    /// stops). The shell compares, every tick, how far CLOCK_MONOTONIC advanced against
    /// CLOCK_BOOTTIME / CLOCK_REALTIME and feeds this when the difference exceeds what the
    /// drift bound allows (docs/quorum-protocol.md "Clock freeze"). A master closes its gate
    /// until a renewal *sent after this event* is granted; a candidate forgets the vote rounds
    /// it sent before it (their grants may be stale by more than the lease).
    case clockJump(Duration)
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
    /// The switchover is abandoned and this node **stays master** (the drain did not finish
    /// within `failure_timeout`, or the drain ended after the epoch moved on while the node
    /// is still master). The shell must: resume writes on the volume (un-suspend it and fail a
    /// drain request still pending: `ReplicatedVolume.cancelDrain()`), then restart the
    /// services it stopped for the drain. It must be ordered *after* the drain request that
    /// `.drainForSwitchover` started (a drain started after the cancel would suspend writes
    /// for good), e.g. by running it on the same serial resource queue. A `.switchoverDrained`
    /// fed after this is ignored by the core (logged `drainIgnored`). Always preceded by
    /// `.adminResult(.switchover, .failure)`, which is only the operator's answer: the shell
    /// must not resume anything on that result alone. Not emitted when the node steps down
    /// instead (then `.becomeSecondary` follows and the volume leaves the primary role).
    case cancelDrain
    /// The replication fencing token: from now on refuse replication frames (writes, resync)
    /// of epochs below this one (`ReplicatedVolume.setPromisedEpoch`). Emitted only for epochs
    /// this node promised to *another* node (a vote for the peer, following the peer as master
    /// of a newer epoch, the handover vote of a switchover) or holds as master, never for its
    /// own candidacy: a self-vote that fails must not fence the live master's replication, and
    /// one that wins makes the volume primary, which refuses the peer's writes anyway. Never
    /// goes down. `start(at:)` emits it first for the persisted value.
    case fence(Epoch)
    /// Services above the block layer (mounted filesystem, page cache, applications) must
    /// stop serving now: this master's gate is closed (newer epoch reported, clock jump, lease
    /// lapse) or its lease will lapse within `QuorumSettings.serviceFenceMargin` without a
    /// fresh grant. The shell freezes them (e.g. the cgroup freezer: `systemctl freeze UNIT`,
    /// `fsfreeze` only if it needs no writes) — fast, no I/O — so reads from the page cache stop
    /// before a new master can be elected. Writes need nothing: a closed gate fails them (EIO)
    /// at the block layer. Emitted at most once per fenced period, always before the
    /// `.becomeSecondary` of a step-down (which then stops them for good; thaw before stopping).
    case fenceServices
    /// The master got a fresh grant after `.fenceServices` (its gate is open and its lease runs
    /// longer than the margin again): thaw the services frozen by `.fenceServices`.
    case unfenceServices
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
