import HACore
import NIOCore

/// One replication session, as the shell numbers them (it maps ids to `PeerConnection`s).
public typealias SessionID = UInt64
/// One client request (the shell maps ids to promises).
public typealias RequestID = UInt64

public enum WriteOp: Hashable, Sendable {
    case data(ByteBuffer)
    case zeroes(mayDeallocate: Bool)
}

/// The knobs of the core, from `ReplicatedVolumeConfig`.
public struct ReplicationSettings: Hashable, Sendable {
    public var me: NodeID
    public var peer: NodeID
    public var sizeBytes: UInt64
    public var chunkBytes: Int
    public var replicationProtocol: ReplicationProtocol
    public var activityLogExtentBytes: Int
    public var activityLogExtents: Int
    public var windowChunks: Int
    public var resyncRateBytesPerSecond: Int
    public var maximumWriteBytes: Int
    /// Deliberate replication bugs, for proving that the whole-node simulator catches them.
    /// Empty in production (nothing but the simulator sets it).
    public var plantedBugs: Set<ReplicationPlantedBug> = []

    public init(me: NodeID, peer: NodeID, sizeBytes: UInt64, chunkBytes: Int, replicationProtocol: ReplicationProtocol,
                activityLogExtentBytes: Int, activityLogExtents: Int, windowChunks: Int, resyncRateBytesPerSecond: Int,
                maximumWriteBytes: Int = 32 << 20) {
        self.me = me; self.peer = peer; self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes
        self.replicationProtocol = replicationProtocol; self.activityLogExtentBytes = activityLogExtentBytes
        self.activityLogExtents = activityLogExtents; self.windowChunks = windowChunks
        self.resyncRateBytesPerSecond = resyncRateBytesPerSecond; self.maximumWriteBytes = maximumWriteBytes
    }

    public var chunkCount: Int { MetadataLayout.chunkCount(sizeBytes: sizeBytes, chunkBytes: chunkBytes) }
}

/// Test-only faults that break one replication rule each (the whole-node simulator must catch
/// every one through its invariants). Never set outside the simulator.
public enum ReplicationPlantedBug: String, Hashable, Sendable, CaseIterable {
    /// A fresh (new, empty) disk joining an up-to-date peer adopts the peer's generation as if
    /// it were up to date, instead of taking a full sync.
    case freshMetadataTrusted
    /// The sync target applies a resync chunk after the application write that followed it
    /// in the stream (it holds each chunk back until the next frame).
    case resyncOverNewerWrite
}

/// A bitmap page in its on-disk form: one to persist, or one sent to the peer after the
/// handshake.
public struct BitmapPage: Hashable, Sendable {
    public var index: Int
    public var bytes: [UInt8]
    public init(index: Int, bytes: [UInt8]) { self.index = index; self.bytes = bytes }
}

/// One step for the serial I/O queue. Steps of a batch run in order, and batches run in
/// the order the core emitted them: that order is the write order of the local disk and of
/// the data stream to the peer.
public enum IOStep: Sendable {
    case writeAL([Int])
    case writeHeader(MetadataHeader)
    case writeBitmapPages([BitmapPage])
    case writeBitmap(DirtyBitmap)
    /// Hand a data-stream frame to the session (from the I/O queue, so it keeps disk order).
    case send(SessionID, LinkMessage)
    case writeData(offset: UInt64, data: ByteBuffer)
    case writeZeroes(offset: UInt64, length: Int, mayDeallocate: Bool)
    case sync
    /// Read a chunk and send it as `resyncData`.
    case sendChunk(SessionID, chunk: Int, offset: UInt64, length: Int)
    /// Read a chunk, hash it and send `verifyRequest`.
    case sendChunkHash(SessionID, chunk: Int, offset: UInt64, length: Int)
    /// Read a chunk, compare its hash, send `verifyReply`, report `.verifyCompared`.
    case compareChunkHash(SessionID, chunk: Int, offset: UInt64, length: Int, sha256: [UInt8])
}

/// Acknowledgement a backup sends after a batch, with status 0 or the failing errno.
public enum PeerAck: Hashable, Sendable {
    case write(seq: UInt64)
    case flush(id: UInt64)
    case resync(chunk: UInt64)

    public func message(status: Int32) -> LinkMessage {
        switch self {
        case .write(let s): return .writeAck(seq: s, stage: .written, status: status)
        case .flush(let id): return .flushAck(id: id, status: status)
        case .resync(let c): return .resyncAck(chunk: c, status: status)
        }
    }
}

public struct IOBatch: Sendable {
    public var steps: [IOStep]
    /// Fed back to the core when every step succeeded.
    public var then: IOCompletion?
    /// Fed back (as `.ioFailed`) when a step failed; nil: only a disk failure is reported.
    public var failure: IOCompletion?
    /// Sent after the steps, with the outcome as status.
    public var ack: (SessionID, PeerAck)?
}

/// What the shell reports when an I/O batch ends.
public enum IOCompletion: Hashable, Sendable {
    /// `queued`: its frame went to the link and the link's send buffer had room. A frame
    /// sent into a full buffer reports `queued: false`, and `queuedToPeer` once it drained.
    case localWrite(seq: UInt64, queued: Bool)
    /// The link's send buffer drained below its low-water mark: these writes' frames count
    /// as queued to the peer now (what protocol A acknowledges on).
    case queuedToPeer([UInt64])
    case bitmapDurable([UInt64])
    case resyncChunkSent(bytes: Int)
    case targetChunkWritten(bytes: Int)
    case targetSynced(SessionID)
    case verifyCompared(chunk: Int, match: Bool)
}

public enum CoreLogLevel: Sendable { case info, notice, warning, error, critical }

/// Inputs of the core.
public enum CoreEvent: Sendable {
    case write(RequestID, WriteOp, offset: UInt64, length: Int, fua: Bool)
    case flush(RequestID)
    case io(IOCompletion)
    case ioFailed(IOCompletion?, String, errno: Int32)
    /// A session finished its authenticated hello.
    case linkUp(SessionID, NodeID)
    /// A session ended; nil when it never got past the hello.
    case linkDown(SessionID?, String)
    case frame(SessionID, kind: UInt8, epoch: Epoch, payload: ByteBuffer)
    case gate(WriteGate)
    case becomeSecondary(Epoch)
    case promise(Epoch)
    case drain(RequestID)
    /// The switchover was abandoned and this node stays primary: writes resume (no longer
    /// suspended) and a drain still waiting fails. A drain flush already sent may still
    /// complete; its `.drained` then means nothing to the quorum core (it ignores it).
    case cancelDrain
    case startVerify(repair: Bool)
    case requestResync
    case resolveSplitBrain(discardLocal: Bool)
    /// A wake-up the core asked for (gate expiry, throttle).
    case tick
    case stop
}

/// Outputs of the core, carried out in order by the shell.
public enum CoreAction: Sendable {
    case io(IOBatch)
    /// A control frame, sent now (not part of the ordered data stream).
    case send(SessionID, LinkMessage)
    case close(SessionID)
    /// Complete a client request: nil = success.
    case complete(RequestID, VolumeError?)
    /// The switchover drain ended: nil = the peer has everything.
    case drained(RequestID, VolumeError?)
    case emit(ReplicationEvent)
    case log(CoreLogLevel, String)
    /// Deliver `.tick` after this long.
    case wakeUp(after: Duration)
}

/// The replicated volume's decisions as a value (style.md: `handle(event, now) -> [action]`,
/// no sockets, no clock, no global random numbers). `ReplicatedVolume` is the shell that
/// feeds it events and carries out its actions.
public struct ReplicationCore: Sendable {
    /// Fixed at start but for `resyncRateBytesPerSecond` (`setResyncRate`).
    public internal(set) var settings: ReplicationSettings
    public internal(set) var header: MetadataHeader
    public internal(set) var bitmap: DirtyBitmap
    public internal(set) var role: Role = .secondary
    public internal(set) var roleEpoch: Epoch
    public internal(set) var promisedEpoch: Epoch
    public internal(set) var gate: WriteGate = .closed
    /// Chunks the peer has written but not yet made durable (no peer flush or FUA since),
    /// with the barrier tag of their newest write. A backup power loss would lose them, so a
    /// dropped link marks them out of sync — DRBD's transfer log, kept per chunk.
    var unflushedAtPeer: [Int: UInt64] = [:]
    var barriersIssued: UInt64 = 0
    var al: ActivityLog
    var suspended = false
    var stopped = false
    var link: Link?
    var writes = WriteTable()
    var nextSeq: UInt64 = 1
    var alWaiting: [Held] = []
    var drainWaiting: [RequestID] = []
    var resync: ResyncRun?
    var targetRun: TargetRun?
    var verify: VerifyRun?
    var targetMismatches: [Int] = []
    var counters = ReplicationStatus()
    var lastPeerState: PeerReplicationState = .disconnected
    var lastDisk: DiskSnapshot?
    var rng: SplitMix64
    var out: [CoreAction] = []
    /// The instant of the event being handled (latest seen): writes record it as issued,
    /// also where a path replays them with `.zero` (held, AL-queued writes).
    var eventNow: Instant = .zero
    /// Fresh metadata on a store that provably reads as zeroes (the shell checked at open).
    var emptyFresh: Bool
    /// Primary at some point since this process opened the store (the handshake's
    /// `wasPrimary`).
    var primarySinceOpen = false
    /// The source's disk state when this node became a sync target: the target ends no more
    /// up to date than its source.
    var syncSourceDisk: DiskState = .upToDate
    /// The source's generations from `resyncDone`, taken once the target's data is synced.
    var pendingTargetGenerations: DataGenerations?
    /// PLANTED BUG `resyncOverNewerWrite` only (test-only): the resync chunk held back.
    var plantedHeldResyncChunk: IOBatch?

    struct DiskSnapshot: Hashable { var state: DiskState; var generations: DataGenerations; var crashCopyOnPeer: Bool }

    /// A crashed primary whose acknowledged writes were all on its peer (protocol B or C, this
    /// generation), crash extents not yet resynced.
    var crashCopyOnPeer: Bool {
        header.flags.contains(.crashRecoveryPending) && header.flags.contains(.acknowledgedOnPeer)
            && !header.flags.contains(.steppedDown) && header.diskState == .upToDate
    }

    enum Held: Sendable {
        case write(RequestID, WriteOp, offset: UInt64, length: Int, fua: Bool)
        case flush(RequestID, drain: Bool)
    }

    struct Link: Sendable {
        var session: SessionID
        var sent: LinkHandshake
        var peer: LinkHandshake?
        var decision: SyncDecision?
        /// The peer's dirty bitmap as its `dirtyBitmap` frames arrive after its handshake.
        var peerBitmap: DirtyBitmap?
        /// Pages of it still to come; the decision waits for the last.
        var pagesAwaited = 0
        /// Requests that arrived while the handshake was open; they wait for the decision so
        /// both sides decide on the generations they still hold.
        var held: [Held] = []
        var ready: Bool { decision != nil }
        var following: Bool {
            switch decision { case .inSync?, .becomeSource?: return true; default: return false }
        }
    }

    struct Write: Sendable {
        var seq: UInt64
        var request: RequestID?
        var isDrain: Bool
        var chunks: Range<Int>
        var extents: [Int]
        var bytes: Int
        var barrier: Bool
        var open: Bool
        /// When the core admitted it (a held or AL-queued write: when it left the queue).
        var issued: Instant = .zero
        var localDone = false
        var confirmation: PeerConfirmation = .pending
        var peerLost: Bool
        var bitmapDurable = false
        var failedLocally = false
        /// Barriers (flushes, FUA writes) submitted before this one. A barrier's own tag is its
        /// number; the peer's sync for barrier n makes every write tagged ≤ n durable there.
        var barrierTag: UInt64 = 0
    }

    /// In-flight writes by sequence number, with the two sums `/status` reports kept current
    /// on every change: the shell publishes the status after every event, and summing the
    /// table (and scanning the bitmap) each time cost an eighth of a master's CPU under
    /// 4 KiB random writes.
    struct WriteTable: Sendable {
        var bySeq: [UInt64: Write] = [:]
        /// Writes a client still waits for.
        internal(set) var openRequests = 0
        /// Bytes written here that the peer has not yet confirmed written.
        internal(set) var unconfirmedBytes: UInt64 = 0

        /// Sequence numbers of the unconfirmed writes in the order they became unconfirmed
        /// (issue order); entries no longer unconfirmed leave from the front lazily. Gives
        /// the oldest unconfirmed write in O(1), amortised, without scanning the table.
        private var unconfirmedOrder: [UInt64] = []
        private var unconfirmedHead = 0

        subscript(seq: UInt64) -> Write? {
            get { bySeq[seq] }
            set {
                let was = bySeq[seq].map(Self.unconfirmed) ?? false
                if let old = bySeq[seq] { count(old, -1) }
                if let new = newValue { count(new, 1) }
                bySeq[seq] = newValue
                let now = newValue.map(Self.unconfirmed) ?? false
                if now && !was { unconfirmedOrder.append(seq) }
                if was && !now { dropConfirmedFront() }
            }
        }

        static func unconfirmed(_ w: Write) -> Bool { !w.peerLost && w.confirmation < .written }

        private mutating func dropConfirmedFront() {
            while unconfirmedHead < unconfirmedOrder.count,
                  !(bySeq[unconfirmedOrder[unconfirmedHead]].map(Self.unconfirmed) ?? false) {
                unconfirmedHead += 1
            }
            if unconfirmedHead == unconfirmedOrder.count {
                unconfirmedOrder.removeAll(keepingCapacity: true)
                unconfirmedHead = 0
            } else if unconfirmedHead >= 1024, unconfirmedHead * 2 >= unconfirmedOrder.count {
                unconfirmedOrder.removeFirst(unconfirmedHead)
                unconfirmedHead = 0
            }
        }

        /// When the oldest write the peer has not confirmed was issued (nil when none).
        var oldestUnconfirmedIssued: Instant? {
            unconfirmedHead < unconfirmedOrder.count ? bySeq[unconfirmedOrder[unconfirmedHead]]?.issued : nil
        }
        var values: Dictionary<UInt64, Write>.Values { bySeq.values }
        var keys: Dictionary<UInt64, Write>.Keys { bySeq.keys }

        mutating func count(_ w: Write, _ sign: Int) {
            if w.open && w.request != nil { openRequests += sign }
            if Self.unconfirmed(w) {
                unconfirmedBytes = sign > 0 ? unconfirmedBytes + UInt64(w.bytes) : unconfirmedBytes - UInt64(w.bytes)
            }
        }
    }

    struct ResyncRun: Sendable {
        var cursor: ResyncCursor
        var throttle: ResyncThrottle
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
        var wakeScheduled = false
        var finishing = false
    }

    struct TargetRun: Sendable {
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
    }

    struct VerifyRun: Sendable {
        var next = 0
        var inFlight = 0
        var mismatches: [Int] = []
        /// Chunks whose hash request is out (sent, no reply yet).
        var hashing: Set<Int> = []
        /// Of those, chunks the peer wrote meanwhile: a mismatch is checked again.
        var raced: Set<Int> = []
        /// `verify --repair`: resync exactly the mismatched chunks when the pass ends.
        var repair = false
    }

    public init(settings: ReplicationSettings, header: MetadataHeader, bitmap: DirtyBitmap, seed: UInt64, emptyFresh: Bool = false) {
        self.settings = settings
        self.emptyFresh = emptyFresh && header.flags.contains(.fresh)
        self.header = header
        self.bitmap = bitmap
        al = ActivityLog(capacity: settings.activityLogExtents)
        roleEpoch = header.epoch
        promisedEpoch = header.epoch
        rng = SplitMix64(seed: seed)
        lastDisk = DiskSnapshot(state: header.diskState, generations: header.generations, crashCopyOnPeer: crashCopyOnPeer)
    }

    // MARK: entry points

    public mutating func handle(_ event: CoreEvent, now: Instant) -> [CoreAction] {
        out = []
        eventNow = max(eventNow, now)
        switch event {
        case let .write(id, op, offset, length, fua): submitWrite(.write(id, op, offset: offset, length: length, fua: fua), now)
        case .flush(let id): submitWrite(.flush(id, drain: false), now)
        case .io(let c): completed(c, now)
        case let .ioFailed(c, why, errno): ioFailed(c, why, errno, now)
        case let .linkUp(s, node): linkUp(s, node)
        case let .linkDown(s, why): linkDown(s, why, now)
        case let .frame(s, kind, epoch, payload): frame(s, kind, epoch, payload, now)
        case .gate(let g):
            gate = g
            if role == .primary && g.epoch > roleEpoch {
                // Re-elected in a newer epoch (same master): frames carry the new fencing token.
                roleEpoch = g.epoch
                promisedEpoch = max(promisedEpoch, g.epoch)
                header.epoch = max(header.epoch, g.epoch)
                header.primaryEpoch = max(header.primaryEpoch, g.epoch)
                persistHeader()
            }
            if role == .primary && !g.peerRequired && header.generations.bitmap.isNone && !bitmap.isEmpty {
                branchForUnreplicatedWrites()
                persistHeader()
            }
            let wait = g.validUntil - now
            if wait > .zero { out.append(.wakeUp(after: wait + .microseconds(1))) }
            evaluateAll(now)
        case .becomeSecondary(let e): becomeSecondary(e, now)
        case .promise(let e):
            if e > promisedEpoch {
                promisedEpoch = e
                header.epoch = max(header.epoch, e)
                persistHeader()
            }
        case .drain(let id): drain(id, now)
        case .cancelDrain: cancelDrain()
        case .startVerify(let repair): startVerify(repair: repair)
        case .requestResync: requestResync(now)
        case .resolveSplitBrain(let discard): resolveSplitBrain(discard)
        case .tick:
            if var r = resync { r.wakeScheduled = false; resync = r }
            evaluateAll(now)
            pumpResync(now)
        case .stop: stop(now)
        }
        noteChanges()
        return out
    }

    /// Promotion: refused unless upToDate. The returned actions start with the header
    /// persist, which the shell makes durable before it returns to the caller.
    public mutating func becomePrimary(epoch: Epoch, newGeneration: Bool, now: Instant) -> Result<[CoreAction], VolumeError> {
        out = []
        guard !stopped else { return .failure(.shuttingDown) }
        guard header.diskState == .upToDate else {
            return .failure(.invalid("disk is \(header.diskState); only an upToDate disk may be promoted"))
        }
        role = .primary
        suspended = false
        roleEpoch = max(roleEpoch, epoch)
        promisedEpoch = max(promisedEpoch, epoch)
        header.epoch = max(header.epoch, epoch)
        header.flags.insert(.wasPrimary)
        header.flags.remove(.steppedDown)
        if settings.replicationProtocol == .a { header.flags.remove(.acknowledgedOnPeer) } else { header.flags.insert(.acknowledgedOnPeer) }
        header.primaryEpoch = max(header.primaryEpoch, roleEpoch)
        primarySinceOpen = true
        if newGeneration { header.generations.branch(to: freshGeneration()); header.flags.remove(.assumeClean) }
        log(.notice, "primary in epoch \(epoch)\(newGeneration ? ", new generation \(header.generations.current)" : "")")
        // A handshake sent before this promotion and not yet decided told the peer this node
        // is a secondary (and, with a new generation, named the old one): the decision both
        // sides take from it could make this primary a sync target — its disk inconsistent
        // while it serves, then overwritten by an outdated peer, or refused on every redial
        // (simulator seeds 146, 782, 1477). Start the session over; the redial's handshake
        // says primary.
        if let l = link, !l.ready {
            dropLink(l, reason: "promoted while the handshake was open")
            out.append(.close(l.session))
        }
        persistHeader()
        noteChanges()
        return .success(out)
    }

    /// `hactl bootstrap`: this node's data becomes the pair's, in a new generation; the peer
    /// then joins as a full-sync target (or, with `assumeClean`, a fresh peer adopts the
    /// generation without a sync). Only for a node whose data nobody vouches for yet
    /// (inconsistent) and never while the peer is up to date.
    public mutating func bootstrap(assumeClean: Bool, now: Instant) -> Result<[CoreAction], VolumeError> {
        out = []
        guard !stopped else { return .failure(.shuttingDown) }
        guard role == .secondary else { return .failure(.invalid("this node is primary")) }
        guard header.diskState == .inconsistent else {
            return .failure(.invalid("disk is \(header.diskState): bootstrap is only for a node whose data no generation vouches for (inconsistent)"))
        }
        if link?.decision != nil, counters.peerDiskState == .upToDate {
            return .failure(.invalid("\(settings.peer) is up to date: this node syncs from it by itself; bootstrap here would discard the peer's data"))
        }
        if targetRun != nil { return .failure(.invalid("a sync from \(settings.peer) is running")) }
        header.generations = DataGenerations(current: freshGeneration())
        header.diskState = .upToDate
        header.flags.subtract([.fresh, .discardLocal, .crashRecoveryPending])
        if assumeClean { header.flags.insert(.assumeClean) }
        emptyFresh = false
        bitmap.clearAll()
        log(.notice, "bootstrap: this node's data is generation \(header.generations.current)"
            + (assumeClean ? "; declared clean: a fresh peer adopts it without a sync" : "; the peer gets a full sync"))
        persistHeader(withBitmap: true)
        if let l = link { dropLink(l, reason: "bootstrap"); out.append(.close(l.session)) }
        noteChanges()
        return .success(out)
    }

    /// `hactl invalidate`: this node discards its data and becomes a full-sync target of its
    /// connected, up-to-date peer (a new generation of its own, unrelated to the peer's).
    public mutating func invalidate(now: Instant) -> Result<[CoreAction], VolumeError> {
        out = []
        guard !stopped else { return .failure(.shuttingDown) }
        guard role == .secondary else { return .failure(.invalid("a primary cannot discard its data; switch over first")) }
        guard let l = link, l.decision != nil, counters.peerDiskState == .upToDate else {
            return .failure(.invalid("invalidate needs a connected, up-to-date \(settings.peer) to sync from"))
        }
        header.generations = DataGenerations(current: freshGeneration())
        header.diskState = .inconsistent
        header.flags.subtract([.fresh, .discardLocal, .crashRecoveryPending, .assumeClean])
        emptyFresh = false
        bitmap.clearAll()
        log(.warning, "invalidate: local data discarded; full sync from \(settings.peer) follows")
        persistHeader(withBitmap: true)
        dropLink(l, reason: "invalidate")
        out.append(.close(l.session))
        noteChanges()
        return .success(out)
    }

    // MARK: status

    public var status: ReplicationStatus {
        var s = counters
        s.role = role
        s.epoch = roleEpoch
        s.promisedEpoch = promisedEpoch
        s.diskState = header.diskState
        s.generations = header.generations
        s.peerState = peerState
        if link == nil { s.peerDiskState = nil }
        s.outOfSyncBytes = bytes(of: bitmap)
        if let r = resync { s.resyncDoneBytes = r.doneBytes; s.resyncTotalBytes = r.totalBytes }
        if let t = targetRun { s.resyncDoneBytes = t.doneBytes; s.resyncTotalBytes = max(t.totalBytes, t.doneBytes) }
        s.inFlightWrites = writes.openRequests
        s.replicationLagBytes = writes.unconfirmedBytes
        s.oldestUnconfirmedWrite = writes.oldestUnconfirmedIssued
        s.verifyRunning = verify != nil
        s.fresh = header.flags.contains(.fresh)
        s.crashCopyOnPeer = crashCopyOnPeer
        s.diskNote = diskNote
        return s
    }

    /// Why this node's disk is not up to date, in words an operator can act on.
    var diskNote: String? {
        switch header.diskState {
        case .upToDate: return nil
        case .diskless: return "no usable backing store"
        case .outdated: return "outdated: the peer wrote without this node; it catches up when the link is back"
        case .inconsistent:
            if let t = targetRun { return "sync target of \(settings.peer): \(t.doneBytes) of \(max(t.totalBytes, t.doneBytes)) bytes received" }
            if header.flags.contains(.fresh) {
                return "new metadata, no data yet: becomes up to date by a full sync from an up-to-date \(settings.peer), "
                    + "or by `hactl bootstrap` when neither node has data to keep"
                    + (emptyFresh ? " (this store is provably empty: it pairs with an equally empty new peer by itself)" : "")
            }
            return "inconsistent: waits for a sync from an up-to-date \(settings.peer)"
        }
    }

    var peerState: PeerReplicationState {
        guard let l = link else { return .disconnected }
        if case .inSync? = l.decision { return .inSync }
        return .behind
    }

    /// The epoch this node's frames carry (its fencing token).
    public var frameEpoch: Epoch { role == .primary ? roleEpoch : max(roleEpoch, promisedEpoch) }

    // MARK: helpers

    mutating func persistHeader(withBitmap: Bool = false) {
        var steps: [IOStep] = []
        if withBitmap { steps.append(.writeBitmap(bitmap)) }
        steps.append(.writeHeader(header))
        out.append(.io(IOBatch(steps: steps, then: nil, failure: nil, ack: nil)))
    }

    mutating func persistPages(_ pages: [Int]) {
        guard !pages.isEmpty else { return }
        out.append(.io(IOBatch(steps: [.writeBitmapPages(pages.map { BitmapPage(index: $0, bytes: bitmap.pageBytes($0)) })], then: nil, failure: nil, ack: nil)))
    }

    mutating func log(_ level: CoreLogLevel, _ message: String) { out.append(.log(level, message)) }

    /// Bytes of a bitmap's set chunks, in O(1): only the volume's last chunk can be short.
    func bytes(of map: DirtyBitmap) -> UInt64 {
        let last = settings.chunkCount - 1
        let full = UInt64(map.setCount) * UInt64(settings.chunkBytes)
        guard last >= 0, map.isSet(last) else { return full }
        return full - UInt64(settings.chunkBytes) + UInt64(chunkLength(last))
    }

    func chunkLength(_ c: Int) -> Int {
        Int(min(UInt64(settings.chunkBytes), settings.sizeBytes - UInt64(c) * UInt64(settings.chunkBytes)))
    }

    mutating func branchForUnreplicatedWrites() {
        header.generations.branch(to: freshGeneration())
        header.flags.remove(.assumeClean)  // written alone: a fresh peer needs the data now
        log(.notice, "peer not following and outdated: new generation \(header.generations.current) over \(header.generations.bitmap)")
    }

    mutating func freshGeneration() -> GenerationID {
        var g: UInt64 = 0
        while g == 0 { g = rng.next() }
        return GenerationID(g)
    }

    /// Emits peer / disk events when they changed.
    mutating func noteChanges() {
        let p = peerState
        if p != lastPeerState { lastPeerState = p; out.append(.emit(.peer(p))) }
        let d = DiskSnapshot(state: header.diskState, generations: header.generations, crashCopyOnPeer: crashCopyOnPeer)
        if d != lastDisk { lastDisk = d; out.append(.emit(.disk(d.state, d.generations, crashCopyOnPeer: d.crashCopyOnPeer))) }
    }
}

extension IOBatch {
    public init(steps: [IOStep], then: IOCompletion?, failure: IOCompletion?) {
        self.init(steps: steps, then: then, failure: failure, ack: nil)
    }
}
