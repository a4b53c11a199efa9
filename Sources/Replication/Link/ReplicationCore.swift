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

/// A bitmap page to persist.
public struct BitmapPage: Hashable, Sendable {
    public var index: Int
    public var bytes: [UInt8]
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
    case localWrite(seq: UInt64, queued: Bool)
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
    public let settings: ReplicationSettings
    public private(set) var header: MetadataHeader
    public private(set) var bitmap: DirtyBitmap
    public private(set) var role: Role = .secondary
    public private(set) var roleEpoch: Epoch
    public private(set) var promisedEpoch: Epoch
    public private(set) var gate: WriteGate = .closed
    /// Chunks the peer has written but not yet made durable (no peer flush or FUA since),
    /// with the barrier tag of their newest write. A backup power loss would lose them, so a
    /// dropped link marks them out of sync — DRBD's transfer log, kept per chunk.
    private var unflushedAtPeer: [Int: UInt64] = [:]
    private var barriersIssued: UInt64 = 0
    private var al: ActivityLog
    private var suspended = false
    private var stopped = false
    private var link: Link?
    private var writes = WriteTable()
    private var nextSeq: UInt64 = 1
    private var alWaiting: [Held] = []
    private var drainWaiting: [RequestID] = []
    private var resync: ResyncRun?
    private var targetRun: TargetRun?
    private var verify: VerifyRun?
    private var targetMismatches: [Int] = []
    private var counters = ReplicationStatus()
    private var lastPeerState: PeerReplicationState = .disconnected
    private var lastDisk: DiskSnapshot?
    private var rng: SplitMix64
    private var out: [CoreAction] = []
    /// Fresh metadata on a store that provably reads as zeroes (the shell checked at open).
    private var emptyFresh: Bool
    /// The source's disk state when this node became a sync target: the target ends no more
    /// up to date than its source.
    private var syncSourceDisk: DiskState = .upToDate

    private struct DiskSnapshot: Hashable { var state: DiskState; var generations: DataGenerations }

    private enum Held: Sendable {
        case write(RequestID, WriteOp, offset: UInt64, length: Int, fua: Bool)
        case flush(RequestID, drain: Bool)
    }

    private struct Link: Sendable {
        var session: SessionID
        var sent: LinkHandshake
        var peer: LinkHandshake?
        var decision: SyncDecision?
        /// Requests that arrived while the handshake was open; they wait for the decision so
        /// both sides decide on the generations they still hold.
        var held: [Held] = []
        var ready: Bool { decision != nil }
        var following: Bool {
            switch decision { case .inSync?, .becomeSource?: return true; default: return false }
        }
    }

    private struct Write: Sendable {
        var seq: UInt64
        var request: RequestID?
        var isDrain: Bool
        var chunks: Range<Int>
        var extents: [Int]
        var bytes: Int
        var barrier: Bool
        var open: Bool
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
    private struct WriteTable: Sendable {
        private var bySeq: [UInt64: Write] = [:]
        /// Writes a client still waits for.
        private(set) var openRequests = 0
        /// Bytes written here that the peer has not yet confirmed written.
        private(set) var unconfirmedBytes: UInt64 = 0

        subscript(seq: UInt64) -> Write? {
            get { bySeq[seq] }
            set {
                if let old = bySeq[seq] { count(old, -1) }
                if let new = newValue { count(new, 1) }
                bySeq[seq] = newValue
            }
        }
        var values: Dictionary<UInt64, Write>.Values { bySeq.values }
        var keys: Dictionary<UInt64, Write>.Keys { bySeq.keys }

        private mutating func count(_ w: Write, _ sign: Int) {
            if w.open && w.request != nil { openRequests += sign }
            if !w.peerLost && w.confirmation < .written {
                unconfirmedBytes = sign > 0 ? unconfirmedBytes + UInt64(w.bytes) : unconfirmedBytes - UInt64(w.bytes)
            }
        }
    }

    private struct ResyncRun: Sendable {
        var cursor: ResyncCursor
        var throttle: ResyncThrottle
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
        var wakeScheduled = false
        var finishing = false
    }

    private struct TargetRun: Sendable {
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
    }

    private struct VerifyRun: Sendable {
        var next = 0
        var inFlight = 0
        var mismatches: [Int] = []
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
        lastDisk = DiskSnapshot(state: header.diskState, generations: header.generations)
    }

    // MARK: entry points

    public mutating func handle(_ event: CoreEvent, now: Instant) -> [CoreAction] {
        out = []
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
        if newGeneration { header.generations.branch(to: freshGeneration()); header.flags.remove(.assumeClean) }
        log(.notice, "primary in epoch \(epoch)\(newGeneration ? ", new generation \(header.generations.current)" : "")")
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
        s.verifyRunning = verify != nil
        s.fresh = header.flags.contains(.fresh)
        s.diskNote = diskNote
        return s
    }

    /// Why this node's disk is not up to date, in words an operator can act on.
    private var diskNote: String? {
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

    private var peerState: PeerReplicationState {
        guard let l = link else { return .disconnected }
        if case .inSync? = l.decision { return .inSync }
        return .behind
    }

    /// The epoch this node's frames carry (its fencing token).
    public var frameEpoch: Epoch { role == .primary ? roleEpoch : max(roleEpoch, promisedEpoch) }

    // MARK: write path

    /// Returns false only for a request taken from the AL queue that still does not fit
    /// (the caller keeps it at the head, so writes enter the disk in submission order).
    @discardableResult
    private mutating func submitWrite(_ req: Held, _ now: Instant, fromQueue: Bool = false) -> Bool {
        let (id, isDrain): (RequestID, Bool)
        switch req {
        case .write(let i, _, _, _, _): (id, isDrain) = (i, false)
        case .flush(let i, let d): (id, isDrain) = (i, d)
        }
        func refuse(_ e: VolumeError) -> Bool { out.append(isDrain ? .drained(id, e) : .complete(id, e)); return true }
        guard !stopped else { return refuse(.shuttingDown) }
        guard role == .primary else { return refuse(.notPrimary(master: nil)) }
        guard isDrain || !suspended else { return refuse(.shuttingDown) }
        if var l = link, !l.ready {
            l.held.append(req)
            link = l
            return true
        }
        let seq = nextSeq
        let following = link?.following ?? false
        let session = following ? link?.session : nil
        switch req {
        case let .flush(id, drain):
            nextSeq += 1
            writes[seq] = Write(seq: seq, request: id, isDrain: drain, chunks: 0..<0, extents: [], bytes: 0, barrier: true, open: true,
                                peerLost: !following, barrierTag: barriersIssued)
            barriersIssued += 1
            var steps: [IOStep] = []
            if let s = session { steps.append(.send(s, .flush(id: seq))) }
            steps.append(.sync)
            out.append(.io(IOBatch(steps: steps, then: .localWrite(seq: seq, queued: session != nil), failure: .localWrite(seq: seq, queued: false))))
        case let .write(id, op, offset, length, fua):
            let extents = ActivityLog.extents(offset: offset, length: length, extentBytes: settings.activityLogExtentBytes)
            if !fromQueue && !alWaiting.isEmpty { alWaiting.append(req); return true }
            var steps: [IOStep] = []
            switch al.begin(extents) {
            case .full:
                if fromQueue { return false }
                alWaiting.append(req)
                return true
            case .hot: break
            case .persist(let hot): steps.append(.writeAL(hot))
            }
            nextSeq += 1
            let cb = UInt64(settings.chunkBytes)
            let chunks = Int(offset / cb)..<(Int((offset + UInt64(length) - 1) / cb) + 1)
            writes[seq] = Write(seq: seq, request: id, isDrain: false, chunks: chunks, extents: extents, bytes: length, barrier: fua, open: true,
                                peerLost: !following, barrierTag: barriersIssued)
            if fua { barriersIssued += 1 }
            if !following { steps += markOutOfSync(chunks) }
            if let s = session {
                var flags: WriteFlags = fua ? [.fua] : []
                var data: ByteBuffer?
                switch op {
                case .data(let d): data = d
                case .zeroes(let dealloc): flags.insert(.zeroes); if dealloc { flags.insert(.mayDeallocate) }
                }
                steps.append(.send(s, .write(seq: seq, offset: offset, flags: flags, length: UInt32(length), data: data)))
            }
            switch op {
            case .data(let d): steps.append(.writeData(offset: offset, data: d))
            case .zeroes(let dealloc): steps.append(.writeZeroes(offset: offset, length: length, mayDeallocate: dealloc))
            }
            if fua { steps.append(.sync) }
            out.append(.io(IOBatch(steps: steps, then: .localWrite(seq: seq, queued: session != nil), failure: .localWrite(seq: seq, queued: false))))
        }
        return true
    }

    /// Admits AL-queued writes in order while they fit (not while a handshake is open:
    /// they would land behind newer held writes).
    private mutating func admitWaiting() {
        guard link?.ready ?? true else { return }
        while let first = alWaiting.first {
            alWaiting.removeFirst()
            if !submitWrite(first, .zero, fromQueue: true) {
                alWaiting.insert(first, at: 0)
                return
            }
        }
    }

    /// Marks chunks the peer will not get. A primary starts a new generation only once it may
    /// acknowledge writes the peer lacks (the arbitrator confirmed the peer outdated, so the
    /// gate no longer requires it): until then its unreplicated writes were never
    /// acknowledged, its data stays in the old generation, and after a failover it is a
    /// plain resync target (its dirty chunks included) instead of a false split brain.
    private mutating func markOutOfSync<C: Sequence>(_ chunks: C) -> [IOStep] where C.Element == Int {
        var steps: [IOStep] = []
        if role == .primary && !gate.peerRequired && header.generations.bitmap.isNone {
            branchForUnreplicatedWrites()
            steps.append(.writeHeader(header))
        }
        let pages = bitmap.mark(chunks)
        if !pages.isEmpty { steps.append(.writeBitmapPages(pages.map { BitmapPage(index: $0, bytes: bitmap.pageBytes($0)) })) }
        return steps
    }

    private mutating func evaluate(_ seq: UInt64, _ now: Instant) {
        guard var w = writes[seq] else { return }
        if w.open {
            let v = AckRule.verdict(localDone: w.localDone, confirmation: w.confirmation, peerLost: w.peerLost, bitmapDurable: w.bitmapDurable,
                                    barrier: w.barrier, protocol: settings.replicationProtocol, gate: gate, now: now)
            switch v {
            case .wait: break
            case .ack: w.open = false; finish(w, nil)
            case .fail(let e): w.open = false; finish(w, e)
            }
            writes[seq] = w
        }
        retireIfDone(seq)
    }

    private mutating func finish(_ w: Write, _ e: VolumeError?) {
        guard let id = w.request else { return }
        out.append(w.isDrain ? .drained(id, e) : .complete(id, e))
    }

    private mutating func evaluateAll(_ now: Instant) {
        for s in writes.keys.sorted() { evaluate(s, now) }
    }

    /// A write leaves the AL only when the peer has it or the bitmap durably records that it lacks it.
    private mutating func retireIfDone(_ seq: UInt64) {
        guard let w = writes[seq], !w.open else { return }
        let settled = w.failedLocally || (w.localDone && (w.confirmation == .written || (w.peerLost && w.bitmapDurable)))
        guard settled else { return }
        if role == .primary, !w.peerLost, !w.failedLocally, w.confirmation == .written {
            if w.barrier {
                unflushedAtPeer = unflushedAtPeer.filter { $0.value > w.barrierTag }
            } else {
                for c in w.chunks { unflushedAtPeer[c] = max(unflushedAtPeer[c] ?? 0, w.barrierTag) }
            }
        }
        writes[seq] = nil
        al.end(w.extents)
        admitWaiting()
        checkDrained()
    }

    private mutating func completed(_ c: IOCompletion, _ now: Instant) {
        switch c {
        case let .localWrite(seq, queued):
            guard var w = writes[seq] else { return }
            w.localDone = true
            w.bitmapDurable = true  // every metadata write issued before it on the queue is synced
            if queued && w.confirmation < .queued { w.confirmation = .queued }
            writes[seq] = w
            evaluate(seq, now)
        case .bitmapDurable(let seqs):
            for s in seqs { writes[s]?.bitmapDurable = true }
            evaluateAll(now)
        case .resyncChunkSent(let n):
            counters.resyncBytesSent += UInt64(n)
        case .targetChunkWritten(let n):
            targetRun?.doneBytes += UInt64(n)
        case .targetSynced(let s):
            targetSynced(s)
        case let .verifyCompared(chunk, match):
            if !match { targetMismatches.append(chunk) }
        }
    }

    private mutating func ioFailed(_ c: IOCompletion?, _ why: String, _ errno: Int32, _ now: Instant) {
        log(.critical, "disk failure: \(why)")
        out.append(.emit(.diskFailure(why)))
        guard case .localWrite(let seq, _)? = c, var w = writes[seq] else { return }
        w.failedLocally = true
        if w.open {
            w.open = false
            finish(w, errno == 28 /* ENOSPC */ ? .noSpace : .io(errno: errno))
        }
        writes[seq] = w
        retireIfDone(seq)
    }

    private mutating func failAllOpen(_ e: VolumeError) {
        for s in writes.keys.sorted() {
            guard var w = writes[s], w.open else { continue }
            w.open = false
            writes[s] = w
            finish(w, e)
            retireIfDone(s)
        }
        let queued = alWaiting
        let held = link?.held ?? []
        alWaiting = []
        link?.held = []
        for h in queued { submitWrite(h, .zero, fromQueue: true) }  // they see the new role / stopped and fail
        for h in held { submitWrite(h, .zero) }
    }

    // MARK: roles

    private mutating func becomeSecondary(_ epoch: Epoch, _ now: Instant) {
        unflushedAtPeer = [:]  // only a primary tracks what its peer has not synced
        roleEpoch = max(roleEpoch, epoch)
        promisedEpoch = max(promisedEpoch, epoch)
        header.epoch = max(header.epoch, epoch)
        if role == .primary { log(.notice, "secondary in epoch \(epoch)") }
        role = .secondary
        suspended = false
        failAllOpen(.notPrimary(master: nil))
        persistHeader()
    }

    private mutating func drain(_ id: RequestID, _ now: Instant) {
        guard role == .primary else { return out.append(.drained(id, .notPrimary(master: nil))) }
        suspended = true
        drainWaiting.append(id)
        checkDrained()
    }

    private mutating func checkDrained() {
        guard !drainWaiting.isEmpty, !writes.values.contains(where: { $0.open && !$0.isDrain }), alWaiting.isEmpty else { return }
        let ids = drainWaiting
        drainWaiting = []
        for id in ids {
            guard let l = link, l.following else {
                out.append(.drained(id, .invalid("peer is not in sync; switchover needs a connected, up-to-date peer")))
                continue
            }
            // A flush round trip proves the peer has every write before it.
            _ = submitWrite(.flush(id, drain: true), .zero)
        }
    }

    private mutating func stop(_ now: Instant) {
        guard !stopped else { return }
        stopped = true
        if let l = link { dropLink(l, reason: "volume stopped"); out.append(.close(l.session)) }
        failAllOpen(.shuttingDown)
        header.flags.insert(.cleanShutdown)
        header.flags.remove(.wasPrimary)
        out.append(.io(IOBatch(steps: [.sync, .writeBitmap(bitmap), .writeAL([]), .writeHeader(header)], then: nil, failure: nil, ack: nil)))
        log(.info, "replicated volume stopped cleanly")
    }

    // MARK: link lifecycle

    private mutating func linkUp(_ session: SessionID, _ node: NodeID) {
        guard !stopped, node == settings.peer else {
            log(.warning, "refused replication session from \(node)")
            return out.append(.close(session))
        }
        if let old = link {
            log(.info, "new replication session replaces the old one")
            dropLink(old, reason: "replaced by a new session")
            out.append(.close(old.session))
        }
        let hs = LinkHandshake(sizeBytes: settings.sizeBytes, chunkBytes: UInt32(settings.chunkBytes), generations: header.generations,
                               diskState: header.diskState, role: role, crashedPrimary: header.flags.contains(.crashRecoveryPending),
                               discardLocal: header.flags.contains(.discardLocal), dirtyRuns: bitmap.runs,
                               fresh: header.flags.contains(.fresh), emptyFresh: emptyFresh && header.flags.contains(.fresh),
                               assumeClean: header.flags.contains(.assumeClean))
        link = Link(session: session, sent: hs)
        counters.linksEstablished += 1
        log(.info, "replication link up with \(node); handshake sent (generation \(hs.generations.current), \(hs.diskState), \(bitmap.setCount) dirty chunks)")
        out.append(.send(session, .handshake(hs)))
    }

    private mutating func linkDown(_ session: SessionID?, _ why: String, _ now: Instant) {
        guard let session else {
            if counters.lastLinkError != why { log(.warning, "replication session failed: \(why)") }
            counters.lastLinkError = why
            return
        }
        guard let l = link, l.session == session else { return }
        log(.warning, "replication link down: \(why)")
        if counters.splitBrain == nil { counters.lastLinkError = why }
        dropLink(l, reason: why)
    }

    /// The peer no longer follows: every write it has not confirmed goes into the bitmap.
    private mutating func dropLink(_ l: Link, reason: String) {
        guard link?.session == l.session else { return }
        let held = link?.held ?? []
        link = nil
        resync = nil
        targetRun = nil
        if verify != nil { log(.warning, "verify aborted: \(reason)"); verify = nil }
        let unconfirmed = writes.values.filter { !$0.peerLost && $0.confirmation < .written && !$0.failedLocally }.map(\.seq).sorted()
        // Written at the peer but not yet synced there: lost if the peer lost power.
        var chunks = Set(unflushedAtPeer.keys)
        unflushedAtPeer = [:]
        if !unconfirmed.isEmpty || !chunks.isEmpty {
            var steps: [IOStep] = []
            for s in unconfirmed {
                writes[s]!.peerLost = true
                writes[s]!.bitmapDurable = false
                chunks.formUnion(writes[s]!.chunks)
            }
            steps += markOutOfSync(chunks.sorted())
            out.append(.io(IOBatch(steps: steps, then: .bitmapDurable(unconfirmed), failure: nil, ack: nil)))
        }
        admitWaiting()
        for h in held { submitWrite(h, .zero) }
    }

    private mutating func refuse(_ l: Link, _ why: String) {
        // A refusal repeats on every redial until something changes: say it once.
        if counters.lastLinkError != why { log(.error, "replication link refused: \(why)") }
        counters.lastLinkError = why
        out.append(.send(l.session, .refuse(why)))
        dropLink(l, reason: why)
        out.append(.close(l.session))
    }

    // MARK: inbound frames

    private mutating func frame(_ session: SessionID, _ kind: UInt8, _ epoch: Epoch, _ payload: ByteBuffer, _ now: Instant) {
        guard let l = link, l.session == session else { return }
        let msg: LinkMessage
        switch LinkMessage.decode(kind: kind, payload: payload) {
        case .success(let m): msg = m
        case .failure(let e): return refuse(l, "\(e)")
        }
        if EpochFence.isFenced(msg.kind), !EpochFence.admits(frameEpoch: epoch, promised: promisedEpoch) {
            counters.fencedFrames += 1
            return refuse(l, "fenced \(msg.kind) frame from epoch \(epoch); this node promised epoch \(promisedEpoch)")
        }
        switch msg {
        case .handshake, .refuse: break
        default: if !l.ready { return refuse(l, "\(msg.kind) frame before the handshake") }
        }
        switch msg {
        case .handshake(let hs): handshake(hs, l, now)
        case .refuse(let why):
            log(.error, "peer refused the link: \(why)")
            counters.lastLinkError = "peer: \(why)"
            dropLink(l, reason: why)
            out.append(.close(l.session))
        case let .write(seq, offset, flags, length, data):
            guard role == .secondary else { return refuse(l, "write frame while this node is primary") }
            if case .becomeSource? = l.decision { return refuse(l, "write frame from the sync target") }
            guard Int(length) <= settings.maximumWriteBytes, offset + UInt64(length) <= settings.sizeBytes else {
                return refuse(l, "write frame outside the volume: \(offset)+\(length)")
            }
            if settings.replicationProtocol == .b { out.append(.send(session, .writeAck(seq: seq, stage: .received, status: 0))) }
            var steps: [IOStep] = []
            if flags.contains(.zeroes) {
                steps.append(.writeZeroes(offset: offset, length: Int(length), mayDeallocate: flags.contains(.mayDeallocate)))
            } else if let data {
                steps.append(.writeData(offset: offset, data: data))
            }
            if flags.contains(.fua) { steps.append(.sync) }
            out.append(.io(IOBatch(steps: steps, then: nil, failure: nil, ack: (session, .write(seq: seq)))))
        case let .writeAck(seq, stage, status):
            if status != 0 { return refuse(l, "peer failed to write (errno \(status))") }
            if var w = writes[seq] {
                let c: PeerConfirmation = stage == .written ? .written : .received
                if c > w.confirmation { w.confirmation = c; writes[seq] = w }
                evaluate(seq, now)
            }
        case .flush(let id):
            guard role == .secondary else { return refuse(l, "flush frame while primary") }
            out.append(.io(IOBatch(steps: [.sync], then: nil, failure: nil, ack: (session, .flush(id: id)))))
        case let .flushAck(id, status):
            if status != 0 { return refuse(l, "peer failed to flush (errno \(status))") }
            if writes[id] != nil { writes[id]!.confirmation = .written; evaluate(id, now) }
        case let .resyncData(chunk, data):
            let c = Int(clamping: chunk)
            guard role == .secondary, c < settings.chunkCount, data.readableBytes == chunkLength(c) else {
                return refuse(l, "bad resync chunk \(chunk) (\(data.readableBytes) bytes)")
            }
            if targetRun == nil { targetRun = TargetRun(totalBytes: 0) }  // an on-demand repair of an in-sync peer
            out.append(.io(IOBatch(steps: [.writeData(offset: UInt64(c) * UInt64(settings.chunkBytes), data: data)],
                                   then: .targetChunkWritten(bytes: data.readableBytes), failure: nil, ack: (session, .resync(chunk: chunk)))))
        case let .resyncAck(chunk, status):
            if status != 0 { return refuse(l, "peer failed to write resync chunk \(chunk) (errno \(status))") }
            resyncAcked(Int(clamping: chunk), now)
        case .resyncDone(let gens):
            guard role == .secondary else { return refuse(l, "resync done while primary") }
            pendingTargetGenerations = gens
            out.append(.io(IOBatch(steps: [.sync], then: .targetSynced(session), failure: nil, ack: nil)))
        case .resyncFinished: sourceFinish(now)
        case let .verifyRequest(chunk, hash):
            let c = Int(clamping: chunk)
            guard c < settings.chunkCount else { return refuse(l, "verify of chunk \(chunk) outside the volume") }
            if c == 0 { targetMismatches = [] }
            out.append(.io(IOBatch(steps: [.compareChunkHash(session, chunk: c, offset: UInt64(c) * UInt64(settings.chunkBytes),
                                                             length: chunkLength(c), sha256: hash)], then: nil, failure: nil, ack: nil)))
        case let .verifyReply(chunk, match): verifyReplied(Int(clamping: chunk), match)
        case .verifyEnd:
            let mm = targetMismatches.sorted()
            counters.lastVerifyMismatches = mm
            log(.info, "verify by peer finished: \(mm.count) mismatched chunks")
            out.append(.emit(.verifyFinished(mismatchedChunks: mm)))
        case .resyncRequest(let runs):
            guard isRepairSource(l) else { return log(.warning, "peer asked for a resync this node cannot source") }
            let pages = bitmap.mark(runs.flatMap { Array($0.chunks) })
            persistPages(pages)
            startResync(now)
        }
    }

    private var pendingTargetGenerations: DataGenerations?

    private mutating func handshake(_ peer: LinkHandshake, _ l0: Link, _ now: Instant) {
        var l = l0
        guard l.peer == nil else { return refuse(l, "second handshake") }
        l.peer = peer
        let mine = l.sent
        let me = SyncSide(node: settings.me, generations: mine.generations, diskState: mine.diskState, role: mine.role,
                          hasDirtyChunks: !mine.dirtyRuns.isEmpty, crashedPrimary: mine.crashedPrimary, discardLocal: mine.discardLocal,
                          sizeBytes: mine.sizeBytes, chunkBytes: Int(mine.chunkBytes), fresh: mine.fresh, emptyFresh: mine.emptyFresh, assumeClean: mine.assumeClean)
        let them = SyncSide(node: settings.peer, generations: peer.generations, diskState: peer.diskState, role: peer.role,
                            hasDirtyChunks: !peer.dirtyRuns.isEmpty, crashedPrimary: peer.crashedPrimary, discardLocal: peer.discardLocal,
                            sizeBytes: peer.sizeBytes, chunkBytes: Int(peer.chunkBytes), fresh: peer.fresh, emptyFresh: peer.emptyFresh, assumeClean: peer.assumeClean)
        var d = SyncDecision.decide(me: me, peer: them)
        counters.peerDiskState = peer.diskState
        log(.info, "sync decision with \(settings.peer): \(d) (mine \(mine.generations.current)/\(mine.generations.bitmap), peer \(peer.generations.current)/\(peer.generations.bitmap))")
        switch d {
        case .splitBrain(let why):
            link = l
            if counters.splitBrain != why {
                log(.critical, "SPLIT BRAIN, link refused, both stores left untouched: \(why)")
                out.append(.emit(.splitBrain(why)))
            }
            counters.splitBrain = why
            dropLink(l, reason: "split brain")
            out.append(.close(l.session))
            return
        case .refuse(let why):
            link = l
            return refuse(l, why)
        case .inSync:
            // Same bytes as the peer: up to date again if the peer is (never from an outdated peer).
            if (header.diskState == .outdated && peer.diskState == .upToDate) || header.flags.contains(.crashRecoveryPending) {
                if peer.diskState == .upToDate { header.diskState = .upToDate }
                header.flags.remove(.crashRecoveryPending)
                persistHeader()
            }
        case .adoptClean(let g):
            if header.generations.current != g { header.generations = DataGenerations(current: g) }
            header.diskState = .upToDate
            header.flags.remove(.fresh)
            header.flags.remove(.assumeClean)
            emptyFresh = false
            persistHeader()
            log(.notice, "no data to move: up to date in generation \(g) together with \(settings.peer)")
            l.peer?.diskState = .upToDate
            counters.peerDiskState = .upToDate
            d = .inSync
        case .becomeSource(let scope):
            var pages = bitmap.mark(peer.dirtyRuns.flatMap { Array($0.chunks) })
            if scope == .full {
                // Record the relation so an interrupted full sync resumes as a bitmap sync.
                if !header.generations.bitmap.isNone { header.generations.pushHistory(header.generations.bitmap) }
                header.generations.bitmap = peer.generations.current
                bitmap.markAll()
                pages = Array(0..<bitmap.pageCount)
            }
            persistHeader()
            persistPages(pages)
        case .becomeTarget(let scope):
            header.diskState = .inconsistent
            header.flags.remove(.fresh)  // the store is about to hold the peer's data
            emptyFresh = false
            syncSourceDisk = peer.diskState
            persistHeader()
            var union = bitmap
            union.mark(peer.dirtyRuns.flatMap { Array($0.chunks) })
            if scope == .full { union.markAll() }
            targetRun = TargetRun(totalBytes: bytes(of: union))
            log(.notice, "resync target: \(targetRun!.totalBytes) bytes to receive from \(settings.peer)")
        }
        counters.splitBrain = nil
        l.decision = d
        let held = l.held
        l.held = []
        link = l
        if case .becomeSource = d { startResync(now) }
        admitWaiting()
        for h in held { submitWrite(h, now) }
        evaluateAll(now)
    }

    // MARK: resync

    private func isRepairSource(_ l: Link) -> Bool {
        guard header.diskState == .upToDate else { return false }
        if role == .primary { return true }
        if l.peer?.role == .primary { return false }
        return settings.me < settings.peer
    }

    private mutating func startResync(_ now: Instant) {
        guard resync == nil else { return pumpResync(now) }
        let total = bytes(of: bitmap)
        resync = ResyncRun(cursor: ResyncCursor(window: settings.windowChunks),
                           throttle: ResyncThrottle(bytesPerSecond: settings.resyncRateBytesPerSecond, chunkBytes: settings.chunkBytes),
                           totalBytes: total)
        log(.notice, "resync source: \(bitmap.setCount) chunks (\(total) bytes) to \(settings.peer) at ≤ \(settings.resyncRateBytesPerSecond) B/s")
        out.append(.emit(.resyncProgress(done: 0, total: total)))
        pumpResync(now)
    }

    private mutating func pumpResync(_ now: Instant) {
        guard var r = resync, let l = link, !r.finishing else { return }
        defer { resync = r }
        while r.cursor.inFlight.count < settings.windowChunks {
            if bitmap.nextSet(from: r.cursor.next) == nil { break }
            if let wait = r.throttle.take(settings.chunkBytes, now: now) {
                if !r.wakeScheduled { r.wakeScheduled = true; out.append(.wakeUp(after: wait)) }
                return
            }
            guard let chunk = r.cursor.take(from: bitmap) else { break }
            let len = chunkLength(chunk)
            // Read on the I/O queue: after every write issued before it, before every later one.
            out.append(.io(IOBatch(steps: [.sendChunk(l.session, chunk: chunk, offset: UInt64(chunk) * UInt64(settings.chunkBytes), length: len)],
                                   then: .resyncChunkSent(bytes: len), failure: nil, ack: nil)))
        }
        if r.cursor.passComplete(bitmap: bitmap) {
            r.finishing = true
            out.append(.io(IOBatch(steps: [.send(l.session, .resyncDone(header.generations))], then: nil, failure: nil, ack: nil)))
        }
    }

    private mutating func resyncAcked(_ chunk: Int, _ now: Instant) {
        guard var r = resync, r.cursor.acked(chunk) else { return }
        bitmap.clear(chunk)
        r.doneBytes += UInt64(chunkLength(chunk))
        resync = r
        out.append(.emit(.resyncProgress(done: r.doneBytes, total: r.totalBytes)))
        pumpResync(now)
    }

    private mutating func sourceFinish(_ now: Instant) {
        guard let r = resync, r.finishing else { return }
        resync = nil
        if !header.generations.bitmap.isNone {
            header.generations.pushHistory(header.generations.bitmap)
            header.generations.bitmap = .none
        }
        header.flags.remove(.crashRecoveryPending)
        link?.decision = .inSync
        counters.peerDiskState = .upToDate
        counters.resyncDoneBytes = r.doneBytes
        counters.resyncTotalBytes = r.totalBytes
        persistHeader(withBitmap: true)
        log(.notice, "resync finished: \(r.doneBytes) bytes; \(settings.peer) is up to date")
    }

    private mutating func targetSynced(_ session: SessionID) {
        guard let l = link, l.session == session, let gens = pendingTargetGenerations else { return }
        pendingTargetGenerations = nil
        if header.generations.current != gens.current { header.generations.pushHistory(header.generations.current) }
        header.generations.current = gens.current
        header.generations.bitmap = .none
        header.diskState = syncSourceDisk == .upToDate ? .upToDate : .outdated
        header.flags.remove(.crashRecoveryPending)
        header.flags.remove(.discardLocal)
        bitmap.clearAll()
        link?.decision = .inSync
        if let t = targetRun {
            counters.resyncDoneBytes = t.doneBytes
            counters.resyncTotalBytes = max(t.totalBytes, t.doneBytes)
        }
        targetRun = nil
        out.append(.io(IOBatch(steps: [.writeBitmap(bitmap), .writeHeader(header), .send(session, .resyncFinished)], then: nil, failure: nil, ack: nil)))
        log(.notice, "resync target finished: up to date in generation \(gens.current)")
    }

    private mutating func requestResync(_ now: Instant) {
        guard let l = link, l.ready else { return log(.warning, "resync needs a connected peer") }
        let mismatches = counters.lastVerifyMismatches ?? []
        if isRepairSource(l) {
            persistPages(bitmap.mark(mismatches))
            startResync(now)
        } else {
            let runs = ChunkRun.runs(of: Array(Set(mismatches + bitmap.setChunks)).sorted())
            out.append(.send(l.session, .resyncRequest(runs)))
        }
    }

    private mutating func resolveSplitBrain(_ discardLocal: Bool) {
        if discardLocal {
            guard role == .secondary else { return log(.error, "a primary cannot discard its data; demote it first") }
            header.flags.insert(.discardLocal)
            persistHeader()
            log(.warning, "split brain: this node's changes will be discarded on the next connect")
        }
        counters.splitBrain = nil
        if let l = link { dropLink(l, reason: "split brain resolution"); out.append(.close(l.session)) }
    }

    // MARK: verify

    private mutating func startVerify(repair: Bool) {
        guard let l = link, case .inSync? = l.decision, verify == nil else {
            return log(.warning, "verify needs a connected peer in sync")
        }
        log(.info, "online verify\(repair ? " with repair" : "") started over \(settings.chunkCount) chunks")
        verify = VerifyRun(repair: repair)
        pumpVerify()
    }

    private mutating func pumpVerify() {
        guard var v = verify, let l = link else { return }
        defer { verify = v }
        while v.inFlight < settings.windowChunks && v.next < settings.chunkCount {
            let c = v.next
            v.next += 1
            v.inFlight += 1
            out.append(.io(IOBatch(steps: [.sendChunkHash(l.session, chunk: c, offset: UInt64(c) * UInt64(settings.chunkBytes), length: chunkLength(c))],
                                   then: nil, failure: nil, ack: nil)))
        }
    }

    private mutating func verifyReplied(_ chunk: Int, _ match: Bool) {
        guard var v = verify else { return }
        v.inFlight -= 1
        if !match { v.mismatches.append(chunk) }
        verify = v
        guard v.next >= settings.chunkCount && v.inFlight == 0 else { return pumpVerify() }
        verify = nil
        let mm = v.mismatches.sorted()
        counters.lastVerifyMismatches = mm
        log(.notice, "verify finished: \(mm.count) of \(settings.chunkCount) chunks differ\(mm.isEmpty ? "" : ": \(mm.prefix(20))")")
        if let l = link { out.append(.send(l.session, .verifyEnd(chunks: UInt64(settings.chunkCount)))) }
        out.append(.emit(.verifyFinished(mismatchedChunks: mm)))
        if v.repair && !mm.isEmpty { requestResync(.zero) }
    }

    // MARK: helpers

    private mutating func persistHeader(withBitmap: Bool = false) {
        var steps: [IOStep] = []
        if withBitmap { steps.append(.writeBitmap(bitmap)) }
        steps.append(.writeHeader(header))
        out.append(.io(IOBatch(steps: steps, then: nil, failure: nil, ack: nil)))
    }

    private mutating func persistPages(_ pages: [Int]) {
        guard !pages.isEmpty else { return }
        out.append(.io(IOBatch(steps: [.writeBitmapPages(pages.map { BitmapPage(index: $0, bytes: bitmap.pageBytes($0)) })], then: nil, failure: nil, ack: nil)))
    }

    private mutating func log(_ level: CoreLogLevel, _ message: String) { out.append(.log(level, message)) }

    /// Bytes of a bitmap's set chunks, in O(1): only the volume's last chunk can be short.
    private func bytes(of map: DirtyBitmap) -> UInt64 {
        let last = settings.chunkCount - 1
        let full = UInt64(map.setCount) * UInt64(settings.chunkBytes)
        guard last >= 0, map.isSet(last) else { return full }
        return full - UInt64(settings.chunkBytes) + UInt64(chunkLength(last))
    }

    private func chunkLength(_ c: Int) -> Int {
        Int(min(UInt64(settings.chunkBytes), settings.sizeBytes - UInt64(c) * UInt64(settings.chunkBytes)))
    }

    private mutating func branchForUnreplicatedWrites() {
        header.generations.branch(to: freshGeneration())
        header.flags.remove(.assumeClean)  // written alone: a fresh peer needs the data now
        log(.notice, "peer not following and outdated: new generation \(header.generations.current) over \(header.generations.bitmap)")
    }

    private mutating func freshGeneration() -> GenerationID {
        var g: UInt64 = 0
        while g == 0 { g = rng.next() }
        return GenerationID(g)
    }

    /// Emits peer / disk events when they changed.
    private mutating func noteChanges() {
        let p = peerState
        if p != lastPeerState { lastPeerState = p; out.append(.emit(.peer(p))) }
        let d = DiskSnapshot(state: header.diskState, generations: header.generations)
        if d != lastDisk { lastDisk = d; out.append(.emit(.disk(d.state, d.generations))) }
    }
}

extension IOBatch {
    public init(steps: [IOStep], then: IOCompletion?, failure: IOCompletion?) {
        self.init(steps: steps, then: then, failure: failure, ack: nil)
    }
}
