import HACore

// Value types the replication core reports in and the shells (ReplicatedVolume, NBD) pass on.
// Moved here from ReplicationShell/BlockVolume.swift and ReplicatedVolume.swift so that the
// pure core does not depend on its shell.

/// Why the volume refused or failed a request; the NBD server maps it to an errno reply.
public enum VolumeError: Error, Equatable, CustomStringConvertible {
    /// The backing store failed (errno from the system call).
    case io(errno: Int32)
    case noSpace
    /// This node is not primary (or lost its lease); `master` is the current master's service address if known.
    case notPrimary(master: String?)
    /// The request is outside the volume or malformed.
    case invalid(String)
    /// Writes are suspended (switchover, demotion, shutdown).
    case shuttingDown

    public var description: String {
        switch self {
        case .io(let e): return "I/O error (errno \(e))"
        case .noSpace: return "no space left on the backing store"
        case .notPrimary(let m): return m.map { "not primary; the master serves at \($0)" } ?? "not primary; no master is known"
        case .invalid(let why): return "invalid request: \(why)"
        case .shuttingDown: return "writes are suspended"
        }
    }
}

/// What an export may advertise. Only flags the volume honours are set (design.md §3).
public struct VolumeCapabilities: Sendable, Equatable {
    public var flush = true
    public var fua = true
    public var trim = true
    public var writeZeroes = true
    /// Several connections see one consistent view, and a flush on one covers writes acked on all.
    public var multiConn = true
    public var readOnly = false
    public var minimumBlockSize: UInt32 = 1
    public var preferredBlockSize: UInt32 = 4096
    public var maximumBlockSize: UInt32 = 32 * 1024 * 1024
    public init() {}
}

/// What the volume reports to the daemon (metrics, hooks, quorum core).
public enum ReplicationEvent: Sendable {
    case peer(PeerReplicationState)
    /// `crashCopyOnPeer`: a crashed primary whose peer holds the newest copy of its crash
    /// extents (`ReplicationStatus.crashCopyOnPeer`).
    case disk(DiskState, DataGenerations, crashCopyOnPeer: Bool)
    case splitBrain(String)
    case diskFailure(String)
    case resyncProgress(done: UInt64, total: UInt64)
    case verifyFinished(mismatchedChunks: [Int])
}

/// A point-in-time view of the volume for /status, /metrics and hactl.
public struct ReplicationStatus: Sendable, Equatable {
    public var role: Role = .secondary
    public var epoch: Epoch = .zero
    public var promisedEpoch: Epoch = .zero
    public var diskState: DiskState = .upToDate
    public var generations = DataGenerations(current: .none)
    public var peerState: PeerReplicationState = .disconnected
    public var peerDiskState: DiskState?
    /// Bytes this node knows the peer lacks (bitmap) or that it lacks itself (crash AL).
    public var outOfSyncBytes: UInt64 = 0
    public var resyncDoneBytes: UInt64 = 0
    public var resyncTotalBytes: UInt64 = 0
    /// Cumulative chunk payload bytes this node sent as resync source.
    public var resyncBytesSent: UInt64 = 0
    public var inFlightWrites: Int = 0
    /// Bytes written locally that the peer has not yet confirmed.
    public var replicationLagBytes: UInt64 = 0
    /// When the oldest of those writes was issued (nil when the peer has confirmed all):
    /// `now - oldestUnconfirmedWrite` is the replication lag in time.
    public var oldestUnconfirmedWrite: Instant?
    public var lastVerifyMismatches: [Int]?
    public var verifyRunning = false
    /// Metadata created on this store and no data adopted since.
    public var fresh = false
    /// This node crashed as primary under protocol B or C and its crash extents are not yet
    /// resynced: its peer, if up to date in the same generation, holds every write this node
    /// acknowledged there, so the node takes them from the peer before it stands for election.
    public var crashCopyOnPeer = false
    /// Why the disk is not up to date, for /status (nil when it is).
    public var diskNote: String?
    public var splitBrain: String?
    /// Why the link was last refused or closed.
    public var lastLinkError: String?
    /// Sessions that completed the authenticated hello.
    public var linksEstablished: Int = 0
    /// Frames refused by epoch fencing.
    public var fencedFrames: Int = 0
    public init() {}
}
