@preconcurrency import Crypto
import Foundation
import HAShell
import Logging
import NIOCore
import NIOPosix
import Replication

/// A `BlockVolume` mirrored to the peer node over the replication link (design.md §3).
///
/// This is the shell around `ReplicationCore` (the decisions, pure): it owns the files, the
/// sessions and the queues, feeds the core events and carries out its actions.
/// Threads: the core lives on `loop` (one event loop of the group). Disk work runs in the
/// order the core emitted it, and the data-stream frames go to the connection in that same
/// order — so the peer applies writes, resync chunks and verify hashes in exactly the order
/// this disk saw them. A batch that cannot wait for the device (small buffered writes and
/// the frames that carry them: a replicated write on the master, its apply and ack on the
/// backup) runs to completion on the loop when nothing is queued before it; anything else
/// (syncs, metadata, resync reads, large writes), and everything behind it, goes to `io`,
/// one serial queue. Client reads run on the loop when cached, else on a concurrent queue.
public final class ReplicatedVolume: BlockVolume, ReplicationHost, @unchecked Sendable {
    public let config: ReplicatedVolumeConfig
    public var sizeBytes: UInt64 { config.sizeBytes }
    public let capabilities: VolumeCapabilities
    /// Set before `start()`; called on the volume's event loop.
    public var onEvent: (@Sendable (ReplicationEvent) -> Void)?

    private let logger: Logger
    private let clock: @Sendable () -> Instant
    private let group: EventLoopGroup
    private let loop: EventLoop
    private let io = DispatchQueue(label: "hamgr.replication.io")
    private let readQueue = DispatchQueue(label: "hamgr.replication.read", attributes: .concurrent)
    private let backing: BackingStore
    private let meta: MetadataStore  // io queue only
    /// The generation the store's identity label names (io queue only): a header with a new
    /// current generation is preceded by a label write (`DiskLabel`).
    private var labelGeneration: GenerationID
    private let dead = LockedFlag()  // set by a simulated crash: nothing more reaches the disk or the peer

    // loop-confined
    private var core: ReplicationCore
    private var sessions: [SessionID: PeerConnection] = [:]
    private var sessionIDs: [ObjectIdentifier: SessionID] = [:]
    private var nextSession: SessionID = 1
    private var requests: [RequestID: EventLoopPromise<Void>] = [:]
    private var drains: [RequestID: @Sendable (Result<Void, Error>) -> Void] = [:]
    private var nextRequest: RequestID = 1
    private var started = false
    private var halted = false
    private var dialer: PeerDialer?
    private var watchdog: RepeatedTask?
    private var ticksWithoutLink = 0

    private let toIO = HandOff<(IOBatch, Epoch, [SessionID: PeerConnection])>()  // loop → I/O queue
    private let fromIO = HandOff<[CoreEvent]>()  // I/O queue → loop: each batch's outcome
    /// Batches handed to `io` whose outcome the loop has not yet taken in: while any is,
    /// a new batch queues behind it rather than running on the loop (loop only).
    private var ioQueued = 0
    /// Outcomes of batches run on the loop, fed to the core after the action list that
    /// queued them (as an I/O thread's report would be), in order (loop only).
    private var inlineOutcomes: [CoreEvent] = []
    private var feedingInline = false
    /// Backpressure, sender side: writes whose frame went into a link send buffer over its
    /// high-water mark (guarded by `linkHeldLock`; any thread). They are not "queued to the
    /// peer" until it drains (`IOCompletion.queuedToPeer`), so protocol A stops acknowledging
    /// — and the NBD export's per-client budget stops reading from clients — instead of
    /// buffering without bound for a slow backup.
    private let linkHeldLock = NSLock()
    private var linkHeld: [UInt64] = []
    private var linkHeldPoll = false
    /// Backpressure, receiver side (loop only): data bytes of batches handed to `io` and not
    /// yet done, per batch in order. Over `applyQueueBytes` a secondary stops reading the link
    /// (TCP then holds the master back); at half of it, it reads again.
    private var ioQueuedBytes = 0
    private var ioQueuedSizes: [Int] = []
    private var ioQueuedHead = 0
    private var readsPaused = false
    /// Batches at most this large run on the loop: beyond it the copy and the MAC cost more
    /// than a hand-off, and the I/O thread lets the loop keep serving meanwhile.
    static let inlineBatchBytes = 128 * 1024
    private static let readAllocator = ByteBufferAllocator()

    private let statusLock = NSLock()
    private var snapshot = ReplicationStatus()

    /// Opens the backing store and its metadata, and checks that one describes the other.
    ///
    /// Fresh metadata is never up to date: it starts `inconsistent` in a random generation of
    /// its own, flagged `fresh`. Such a node is never promoted and never a sync source; it
    /// becomes up to date only as the full-sync target of an up-to-date peer, by an operator's
    /// `bootstrap`, or — when both stores of a new pair provably hold only zeroes — by pairing
    /// with an equally fresh peer (docs/replication.md "Disk identity and bootstrap").
    /// The store's identity label (`DiskLabel`) is checked against the metadata at every start:
    /// another store at the path makes this node a full-sync target, another node's store is
    /// refused.
    public init(config: ReplicatedVolumeConfig, group: EventLoopGroup, logger: Logger, clock: @escaping @Sendable () -> Instant) throws {
        try config.validate()
        self.config = config
        self.group = group
        self.loop = group.next()
        self.clock = clock
        var log = logger
        log[metadataKey: "replication"] = "\(config.me)"
        self.logger = log
        var caps = VolumeCapabilities()
        caps.multiConn = true  // one store, one write order; a flush covers every acked write
        self.capabilities = caps
        let storeBytes = DiskLabel.storeBytes(forVolumeBytes: config.sizeBytes)
        let path = config.backingPath
        if !FileManager.default.fileExists(atPath: path) {
            guard config.createBacking, !BackingStore.isDevicePath(path) else {
                throw ConfigError(key: "node.backing", message: BackingStore.isDevicePath(path)
                    ? "\(path) does not exist (a device is never created: attach or activate it first)"
                    : "\(path) does not exist (set create = true on the node or [volume] to let hamgr create a sparse file)")
            }
        }
        backing = try BackingStore(path: path, createSize: storeBytes, volatileCache: config.volatileCacheForTests)  // existing files are only extended (room for the label)
        guard backing.sizeBytes >= storeBytes else {
            throw ConfigError(key: "node.backing", message: "\(path) holds \(backing.sizeBytes) bytes; the volume needs \(storeBytes) (\(config.sizeBytes) + the 4 KiB identity label)")
        }
        let labelAt = DiskLabel.offset(forVolumeBytes: config.sizeBytes)
        let reading = DiskLabel.read(Array(try backing.read(offset: labelAt, length: DiskLabel.bytes).readableBytesView))
        let existing: MetadataHeader? = FileManager.default.fileExists(atPath: config.metadataPath)
            ? try MetadataStore.peekHeader(path: config.metadataPath) : nil
        let identity = DiskIdentity.decide(header: existing, reading: reading, path: path, cluster: config.cluster, node: config.me)
        if case .refuse(let why) = identity { throw ConfigError(key: "node.backing", message: why) }
        var rng = SystemRandomNumberGenerator()
        func freshGeneration() -> GenerationID { var g: UInt64 = 0; while g == 0 { g = rng.next() }; return GenerationID(g) }
        func freshID() -> UInt64 { var g: UInt64 = 0; while g == 0 { g = rng.next() }; return g }
        let keptID: UInt64? = { if case .new(let k) = identity { return k }; return nil }()
        let initial = MetadataHeader(sizeBytes: config.sizeBytes, chunkBytes: UInt32(config.chunkBytes),
                                     alExtentBytes: UInt32(config.activityLogExtentBytes), alSlots: UInt32(config.activityLogExtents),
                                     diskState: .inconsistent, flags: [.fresh], epoch: .zero,
                                     generations: DataGenerations(current: freshGeneration()), diskID: keptID ?? freshID())
        meta = try MetadataStore(path: config.metadataPath, initial: initial)
        if meta.created {
            log.notice("created metadata \(config.metadataPath): inconsistent in generation \(initial.generations.current) until a full sync from an up-to-date peer or a bootstrap",
                       metadata: ["event": "metadata_created"])
        }
        var opened = meta.header
        var bitmap = meta.openedBitmap
        var openedAL = meta.openedAL
        switch identity {
        case .replaced(let why):
            log.warning("\(why): this node discards its metadata's claim and joins as a full-sync target", metadata: ["event": "disk_replaced"])
            opened.diskState = .inconsistent
            opened.generations = DataGenerations(current: freshGeneration())
            opened.flags = []  // not `fresh`: no pairing shortcut or clean declaration covers this store
            opened.diskID = freshID()
            bitmap.clearAll()
            openedAL = []
            try meta.writeBitmap(bitmap)
        case .stamp(let why):
            log.notice("\(why)", metadata: ["event": "disk_label_stamped"])
            if opened.diskID == 0 {
                if case .label(let l) = reading { opened.diskID = l.diskID } else { opened.diskID = freshID() }
            }
        case .matches, .new, .refuse: break
        }
        let label = DiskLabel(diskID: opened.diskID, cluster: config.cluster, node: config.me, sizeBytes: config.sizeBytes,
                              current: opened.generations.current)
        if reading != .label(label) {
            try backing.write(offset: labelAt, array: label.encode())
            try backing.sync()
        }
        labelGeneration = label.current
        let rec = CrashRecovery.open(header: opened, activityLog: openedAL, bitmap: bitmap)
        if rec.recoveredChunks > 0 {
            log.warning("primary crash detected: \(openedAL.count) activity-log extents (\(rec.recoveredChunks) chunks) marked out of sync")
        }
        // Bits first, then the empty AL, then the header: a crash in between loses nothing.
        try meta.writeBitmapPages(rec.dirtyPages.map { ($0, rec.bitmap.pageBytes($0)) })
        try meta.writeAL([])
        try meta.writeHeader(rec.header)
        let settings = ReplicationSettings(me: config.me, peer: config.peer, sizeBytes: config.sizeBytes, chunkBytes: config.chunkBytes,
                                           replicationProtocol: config.replicationProtocol, activityLogExtentBytes: config.activityLogExtentBytes,
                                           activityLogExtents: config.activityLogExtents, windowChunks: config.resyncWindowChunks,
                                           resyncRateBytesPerSecond: config.resyncRateBytesPerSecond,
                                           maximumWriteBytes: Int(caps.maximumBlockSize))
        // A fresh store that provably reads as zeroes may pair with an equally fresh peer.
        let emptyFresh = meta.header.flags.contains(.fresh) && backing.provablyZero(length: config.sizeBytes)
        core = ReplicationCore(settings: settings, header: meta.header, bitmap: rec.bitmap, seed: rng.next(), emptyFresh: emptyFresh)
        snapshot = core.status
    }

    // MARK: control API

    /// Dial the peer (when this node's name sorts first) or wait for its session.
    public func start() {
        onLoop {
            guard !self.started, !self.halted else { return }
            self.started = true
            guard self.config.me < self.config.peer else { return }
            self.startDialer()
            let every = TimeAmount.nanoseconds(self.config.linkTimeout.nanosecondsClamped)
            self.watchdog = self.loop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in self.checkDialer() }
        }
    }

    /// Clean shutdown: fail what is pending, make everything durable, mark clean.
    public func stop() {
        onLoop {
            guard !self.halted else { return }
            self.run(.stop)
            self.halt()
        }
        io.sync {}  // the final batch (sync, bitmap, empty AL, clean header) is on disk
    }

    /// Callbacks for a session the daemon's PeerListener routed here (channel "replication").
    public func inboundSession() -> PeerSessionCallbacks {
        // The dialing node's session lives on the volume's own loop (see startDialer): its
        // frames reach the core without a thread hop. Closing is always deferred, so a close
        // caused by a write inside the core's actions never re-enters the core.
        PeerSessionCallbacks(
            established: { [weak self] conn in self?.onLoopSoon { self?.established(conn) } },
            frame: { [weak self] conn, frame in self?.onLoopSoon { self?.received(frame, on: conn) } },
            closed: { [weak self] conn, why in self?.loop.execute { self?.closed(conn, why) } })
    }

    /// The loop the core runs on. NBD connections and replication sessions placed on it
    /// (`NBDServer`/`PeerListener` childGroup) reach the core without a thread hop.
    public var eventLoop: EventLoop { loop }

    public func setWriteGate(_ gate: WriteGate) { onLoop { self.run(.gate(gate)) } }

    /// Accept writes in `epoch`. `newGeneration` starts a new data generation (failover,
    /// forced promotion) so a later reconnect can tell who changed what. Throws unless the
    /// disk is upToDate; returns after the header is durable.
    public func becomePrimary(epoch: Epoch, newGeneration: Bool) throws {
        try command { core, now in core.becomePrimary(epoch: epoch, newGeneration: newGeneration, now: now) }
    }

    /// Runs a core command that may refuse, carries out its actions, and returns once its
    /// header (and whatever else it queued) is durable.
    private func command(_ body: @escaping (inout ReplicationCore, Instant) -> Result<[CoreAction], VolumeError>) throws {
        try onLoopThrowing {
            guard !self.halted else { throw VolumeError.shuttingDown }
            switch body(&self.core, self.clock()) {
            case .failure(let e): throw e
            case .success(let actions): self.perform(actions); self.publish()
            }
        }
        io.sync {}
    }

    /// `hactl bootstrap` on this node (see `ReplicationCore.bootstrap`); returns once durable.
    public func bootstrap(assumeClean: Bool) throws {
        try command { core, now in core.bootstrap(assumeClean: assumeClean, now: now) }
    }

    /// `hactl invalidate` on this node (see `ReplicationCore.invalidate`); returns once durable.
    public func invalidate() throws {
        try command { core, now in core.invalidate(now: now) }
    }

    /// Stop accepting writes (pending ones fail with notPrimary) and follow the peer.
    public func becomeSecondary(epoch: Epoch) { onLoop { self.run(.becomeSecondary(epoch)) } }

    /// Fencing: refuse data frames from epochs older than `epoch`.
    public func setPromisedEpoch(_ epoch: Epoch) { onLoop { self.run(.promise(epoch)) } }

    /// Switchover: refuse new writes, wait for in-flight ones, then a flush round trip
    /// proves the peer has everything.
    public func drainForSwitchover(_ done: @escaping @Sendable (Result<Void, Error>) -> Void) {
        onLoop {
            let id = self.nextRequest
            self.nextRequest += 1
            self.drains[id] = done
            self.run(.drain(id))
        }
    }

    /// The switchover was abandoned (`NodeAction.cancelDrain`): resume writes, fail a drain
    /// still waiting. Call it after the `drainForSwitchover` it cancels.
    public func cancelDrain() { onLoop { self.run(.cancelDrain) } }

    /// Hash every chunk on both sides; mismatches are reported (`status.lastVerifyMismatches`,
    /// `.verifyFinished`) and repaired by `requestResync()`.
    public func startVerify(repair: Bool = false) { onLoop { self.run(.startVerify(repair: repair)) } }

    /// Resync the chunks known out of sync (bitmap, last verify's mismatches) from the source
    /// side; on the other side this asks the peer to do it.
    public func requestResync() { onLoop { self.run(.requestResync) } }

    /// A new resync bandwidth cap in bytes per second (a reload of `volume.resync_rate`);
    /// a running resync continues at it.
    public func setResyncRate(_ bytesPerSecond: Int) {
        onLoop {
            guard !self.halted else { return }
            self.perform(self.core.setResyncRate(bytesPerSecond, now: self.clock()))
            self.publish()
        }
    }

    /// After a split brain: `discardLocal` makes this node the sync target of the peer on the
    /// next connect (its changes since the divergence are overwritten).
    public func resolveSplitBrain(discardLocal: Bool) { onLoop { self.run(.resolveSplitBrain(discardLocal: discardLocal)) } }

    public var status: ReplicationStatus {
        statusLock.lock(); defer { statusLock.unlock() }
        return snapshot
    }

    /// Sessions open now and the bytes of those already closed (statusLock): the link's
    /// byte counts live in each `PeerConnection` (one atomic add per frame); this sums them.
    private var linkConnections: [ObjectIdentifier: PeerConnection] = [:]
    private var closedLinkBytes: (sent: UInt64, received: UInt64) = (0, 0)

    /// Cumulative bytes this node wrote to and read from the replication link, over every
    /// session since it started (framing and MAC included; keepalives too). Any thread.
    public var linkBytes: (sent: UInt64, received: UInt64) {
        statusLock.lock(); defer { statusLock.unlock() }
        var total = closedLinkBytes
        for c in linkConnections.values { total.sent &+= c.bytesSent; total.received &+= c.bytesReceived }
        return total
    }

    // MARK: BlockVolume

    public func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> {
        if let e = checkRange(offset, length) { return loop.makeFailedFuture(e) }
        let p = loop.makePromise(of: ByteBuffer.self)
        onLoopSoon {
            // Reads need the lease as much as writes do: a deposed master that has not yet
            // noticed must not answer with data a newer master has already overwritten.
            guard self.core.role == .primary, !self.halted, self.core.gate.allowsAck(at: self.clock()) else {
                return p.fail(VolumeError.notPrimary(master: nil))
            }
            let epoch = self.core.gate.epoch
            if length <= Self.inlineBatchBytes {
                do {
                    if let data = try self.backing.readIfCached(offset: offset, length: length, allocator: Self.readAllocator) {
                        // As below: the read counts only if the lease still held after the pread.
                        guard self.core.gate.allowsAck(at: self.clock()) else { return p.fail(VolumeError.notPrimary(master: nil)) }
                        return p.succeed(data)
                    }
                } catch { return p.fail(Self.volumeError(error)) }
            }
            self.readQueue.async {
                do {
                    let data = try self.backing.read(offset: offset, length: length)
                    // The read linearizes at the pread only if the lease still held after it.
                    self.loop.execute {
                        guard self.core.role == .primary, self.core.gate.epoch == epoch,
                              self.core.gate.allowsAck(at: self.clock()) else { return p.fail(VolumeError.notPrimary(master: nil)) }
                        p.succeed(data)
                    }
                } catch { p.fail(Self.volumeError(error)) }
            }
        }
        return p.futureResult
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = checkRange(offset, data.readableBytes) { return loop.makeFailedFuture(e) }
        if data.readableBytes == 0 { return loop.makeSucceededVoidFuture() }
        return submit(on: loop) { .write($0, .data(data), offset: offset, length: data.readableBytes, fua: fua) }
    }

    public func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        submit(on: loop) { .flush($0) }
    }

    /// Trim zeroes the range on both nodes (deallocating where possible), so the replicas
    /// stay byte-identical.
    public func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, fua: fua, mayDeallocate: true, on: loop)
    }

    public func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = checkRange(offset, length) { return loop.makeFailedFuture(e) }
        if length == 0 { return loop.makeSucceededVoidFuture() }
        return submit(on: loop) { .write($0, .zeroes(mayDeallocate: mayDeallocate), offset: offset, length: length, fua: fua) }
    }

    private func submit(on caller: EventLoop, _ event: @escaping (RequestID) -> CoreEvent) -> EventLoopFuture<Void> {
        let p = caller.makePromise(of: Void.self)
        onLoopSoon {
            guard !self.halted else { return p.fail(VolumeError.shuttingDown) }
            let id = self.nextRequest
            self.nextRequest += 1
            self.requests[id] = p
            self.run(event(id))
        }
        return p.futureResult
    }

    private func checkRange(_ offset: UInt64, _ length: Int) -> VolumeError? {
        guard length >= 0, length <= Int(capabilities.maximumBlockSize) else { return .invalid("length \(length) exceeds \(capabilities.maximumBlockSize)") }
        let (end, o) = offset.addingReportingOverflow(UInt64(length))
        guard !o, end <= config.sizeBytes else { return .invalid("range \(offset)+\(length) beyond the volume's \(config.sizeBytes) bytes") }
        return nil
    }

    // MARK: running the core

    /// Completions gathered while an action list runs (`didPerform` runs them; loop only).
    private var finished: [() -> Void] = []

    private func run(_ event: CoreEvent, publishing: Bool = true) {
        guard !halted else { return }
        perform(core.handle(event, now: clock()))
        if publishing { publish() }
    }

    private func perform(_ actions: [CoreAction]) {
        Replication.perform(actions, on: self)
        feedInlineOutcomes()
    }

    /// Feeds the outcomes of batches run on the loop to the core, oldest first. Re-entry
    /// (a completion callback submitting the next request) appends to the same queue.
    private func feedInlineOutcomes() {
        guard !feedingInline else { return }
        feedingInline = true
        defer { feedingInline = false }
        while !inlineOutcomes.isEmpty, !halted {
            let e = inlineOutcomes.removeFirst()
            Replication.perform(core.handle(e, now: clock()), on: self)
        }
        inlineOutcomes = []
    }

    // MARK: ReplicationHost (the volume's loop only)

    public var frameEpoch: Epoch { core.frameEpoch }

    public func runIO(_ batch: IOBatch, epoch: Epoch) {
        if ioQueued == 0, runsInline(batch) {
            inlineOutcomes += execute(batch, epoch: epoch, conns: sessions)
        } else {
            ioQueued += 1
            let bytes = Self.dataBytes(batch)
            ioQueuedBytes += bytes
            ioQueuedSizes.append(bytes)
            if !readsPaused, core.role == .secondary, ioQueuedBytes > config.applyQueueBytes {
                readsPaused = true
                for c in sessions.values { c.pauseReading(true) }
                logger.debug("apply queue at \(ioQueuedBytes) bytes: reading from the link paused")
            }
            queueIO(batch, epoch: epoch, conns: sessions)
        }
    }

    private static func dataBytes(_ batch: IOBatch) -> Int {
        var bytes = 0
        for step in batch.steps {
            switch step {
            case .writeData(_, let data): bytes += data.readableBytes
            case .send(_, let m): if case .write(_, _, _, _, let data?) = m { bytes += data.readableBytes }
            default: break
            }
        }
        return bytes
    }

    /// One batch handed to `io` is done (loop only).
    private func ioBatchDone() {
        ioQueued -= 1
        if ioQueuedHead < ioQueuedSizes.count {
            ioQueuedBytes -= ioQueuedSizes[ioQueuedHead]
            ioQueuedHead += 1
            if ioQueuedHead > 1024, ioQueuedHead * 2 > ioQueuedSizes.count {
                ioQueuedSizes.removeFirst(ioQueuedHead)
                ioQueuedHead = 0
            }
        }
        if readsPaused, ioQueuedBytes <= config.applyQueueBytes / 2 {
            readsPaused = false
            for c in sessions.values { c.pauseReading(false) }
            logger.debug("apply queue at \(ioQueuedBytes) bytes: reading from the link again")
        }
    }

    /// While writes are held, every 2 ms: once the session's send buffer has room again
    /// (NIO's writability drops below the low-water mark), they count as queued (loop only).
    private func pollLinkHeld(_ conn: PeerConnection) {
        guard !halted, sessionIDs[ObjectIdentifier(conn)] != nil else {
            linkHeldLock.lock(); linkHeldPoll = false; linkHeldLock.unlock()
            return
        }
        guard conn.hasRoom else {
            loop.scheduleTask(in: .milliseconds(2)) { self.pollLinkHeld(conn) }
            return
        }
        linkHeldLock.lock()
        let held = linkHeld
        linkHeld = []
        linkHeldPoll = false
        linkHeldLock.unlock()
        if !held.isEmpty { run(.io(.queuedToPeer(held))) }
    }

    /// After a batch ran: a write whose frame went into a full send buffer is not queued to
    /// the peer yet (any thread).
    private func holdIfLinkFull(_ then: IOCompletion?, _ b: IOBatch, conns: [SessionID: PeerConnection]) -> IOCompletion? {
        guard case let .localWrite(seq, true)? = then else { return then }
        var conn: PeerConnection?
        for step in b.steps { if case let .send(s, .write) = step { conn = conns[s] } }
        guard let c = conn, !c.hasRoom else { return then }
        linkHeldLock.lock()
        linkHeld.append(seq)
        let startPoll = !linkHeldPoll
        linkHeldPoll = true
        linkHeldLock.unlock()
        // A task of its own, also on the loop: the core is never re-entered from a batch.
        if startPoll { loop.scheduleTask(in: .milliseconds(2)) { self.pollLinkHeld(c) } }
        return .localWrite(seq: seq, queued: false)
    }

    /// Whether `batch` cannot wait for the device: buffered data writes below
    /// `inlineBatchBytes` and the frames that go with them, nothing else.
    private func runsInline(_ batch: IOBatch) -> Bool {
        guard backing.writesInline else { return false }
        var bytes = 0
        for step in batch.steps {
            switch step {
            case .writeData(_, let data): bytes += data.readableBytes
            case .send(_, let m): if case .write(_, _, _, _, let data?) = m { bytes += data.readableBytes }
            default: return false
            }
        }
        return bytes <= Self.inlineBatchBytes
    }

    public func sendControl(_ message: LinkMessage, on session: SessionID, epoch: Epoch) {
        guard let c = sessions[session] else { return }
        c.send(message, epoch: epoch)
    }

    public func closeSession(_ session: SessionID) { sessions[session]?.close() }

    public func complete(_ request: RequestID, _ error: VolumeError?) {
        guard let p = requests.removeValue(forKey: request) else { return }
        finished.append { if let error { p.fail(error) } else { p.succeed(()) } }
    }

    public func drained(_ request: RequestID, _ error: VolumeError?) {
        guard let f = drains.removeValue(forKey: request) else { return }
        finished.append { if let error { f(.failure(error)) } else { f(.success(())) } }
    }

    public func emit(_ event: ReplicationEvent) { onEvent?(event) }

    public func log(_ level: CoreLogLevel, _ message: String) {
        switch level {
        case .info: logger.info("\(message)")
        case .notice: logger.notice("\(message)")
        case .warning: logger.warning("\(message)")
        case .error: logger.error("\(message)")
        case .critical: logger.critical("\(message)")
        }
    }

    public func wakeUp(after delay: Duration) {
        loop.scheduleTask(in: .nanoseconds(max(0, delay.nanosecondsClamped))) { self.run(.tick) }
    }

    /// Client completions run last: a completion callback may submit the next request (same
    /// loop, no hop), and that request's I/O must queue behind this action list's.
    public func didPerform() {
        guard !finished.isEmpty else { return }
        let done = finished
        finished = []
        for f in done { f() }
    }

    /// Hands a batch to the I/O queue. Batches gather in a mailbox that one queue task runs
    /// in order, so a burst of client requests wakes the I/O thread once.
    private func queueIO(_ batch: IOBatch, epoch: Epoch, conns: [SessionID: PeerConnection]) {
        guard toIO.post([(batch, epoch, conns)]) else { return }
        io.async {
            let burst = self.toIO.take()
            // Resync chunks must be durable before their ack; in a burst of them, the last
            // sync covers the earlier ones, whose acks wait for it (in order).
            var lastSync = -1
            for (i, w) in burst.enumerated() where w.0.steps.contains(where: { if case .sync = $0 { return true }; return false }) { lastSync = i }
            for (i, w) in burst.enumerated() {
                self.report(self.execute(w.0, epoch: w.1, conns: w.2, deferSync: i < lastSync && w.0.isResyncChunk))
            }
        }
    }

    /// Resync-chunk batches whose sync was merged into a later one of the same burst: their
    /// acks and completions go out once that sync succeeded (io queue only).
    private var syncDeferred: [(batch: IOBatch, epoch: Epoch, conns: [SessionID: PeerConnection])] = []

    /// Runs one batch (on the I/O queue, or on the loop when `runsInline`); returns the
    /// outcome for the core.
    private func execute(_ b: IOBatch, epoch: Epoch, conns: [SessionID: PeerConnection], deferSync: Bool = false) -> [CoreEvent] {
        guard !dead.value else { return [] }
        if deferSync {
            // Only the data write; the sync, the ack and the completion wait for a later sync.
            do {
                for step in b.steps { if case let .writeData(offset, data) = step { try backing.write(offset: offset, buffer: data) } }
                syncDeferred.append((b, epoch, conns))
            } catch {
                let errno = (error as? StoreError)?.errno ?? EIO
                if let (s, ack) = b.ack { conns[s]?.send(ack.message(status: errno), epoch: epoch) }
                return [.ioFailed(b.failure, "\(error)", errno: errno)]
            }
            return []
        }
        var released: [CoreEvent] = []
        var failure: (String, Int32)?
        var extra: [IOCompletion] = []
        func send(_ s: SessionID, _ m: LinkMessage) {
            conns[s]?.send(m, epoch: epoch)
        }
        for step in b.steps {
            do {
                switch step {
                case .writeAL(let hot): try meta.writeAL(hot)
                case .writeHeader(let h):
                    if h.generations.current != labelGeneration { try stampLabel(h) }
                    try meta.writeHeader(h)
                case .writeBitmapPages(let pages): try meta.writeBitmapPages(pages.map { ($0.index, $0.bytes) })
                case .writeBitmap(let bm): try meta.writeBitmap(bm)
                case let .send(s, m): send(s, m)
                case let .writeData(offset, data): try backing.write(offset: offset, buffer: data)
                case let .writeZeroes(offset, length, dealloc): try backing.writeZeroes(offset: offset, length: length, mayDeallocate: dealloc)
                case .sync:
                    try backing.sync()
                    released += releaseSyncDeferred(status: 0)
                case let .sendChunk(s, chunk, offset, length):
                    send(s, LinkMessage.resyncChunk(UInt64(chunk), try backing.read(offset: offset, length: length)))
                case let .sendChunkHash(s, chunk, offset, length):
                    let data = try backing.read(offset: offset, length: length)
                    send(s, .verifyRequest(chunk: UInt64(chunk), sha256: data.withUnsafeReadableBytes { Array(SHA256.hash(data: $0)) }))
                case let .compareChunkHash(s, chunk, offset, length, hash):
                    let data = try backing.read(offset: offset, length: length)
                    let match = data.withUnsafeReadableBytes { Array(SHA256.hash(data: $0)) } == hash
                    send(s, .verifyReply(chunk: UInt64(chunk), match: match))
                    extra.append(.verifyCompared(chunk: chunk, match: match))
                }
            } catch {
                failure = ("\(error)", (error as? StoreError)?.errno ?? EIO)
                break
            }
        }
        if let (_, errno) = failure { released += releaseSyncDeferred(status: errno) }
        if let (s, ack) = b.ack { send(s, ack.message(status: failure?.1 ?? 0)) }
        if let (why, errno) = failure {
            return released + [.ioFailed(b.failure, why, errno: errno)]
        }
        return released + (holdIfLinkFull(b.then, b, conns: conns).map { [CoreEvent.io($0)] } ?? []) + extra.map { .io($0) }
    }

    /// Acks and completes the resync chunks whose sync was merged into the one just done
    /// (status 0), or fails them with the errno that sync got; returns their outcomes.
    private func releaseSyncDeferred(status: Int32) -> [CoreEvent] {
        guard !syncDeferred.isEmpty else { return [] }
        let done = syncDeferred
        syncDeferred = []
        var events: [CoreEvent] = []
        for d in done {
            if let (s, ack) = d.batch.ack { d.conns[s]?.send(ack.message(status: status), epoch: d.epoch) }
            if status == 0 { events += d.batch.then.map { [CoreEvent.io($0)] } ?? [] } else { events.append(.ioFailed(d.batch.failure, "sync failed", errno: status)) }
        }
        return events
    }

    /// Rewrites the store's identity label for the header about to be written (io queue).
    private func stampLabel(_ h: MetadataHeader) throws {
        let label = DiskLabel(diskID: h.diskID, cluster: config.cluster, node: config.me, sizeBytes: config.sizeBytes,
                              current: h.generations.current, previous: labelGeneration)
        try backing.write(offset: DiskLabel.offset(forVolumeBytes: config.sizeBytes), array: label.encode())
        try backing.sync()
        labelGeneration = h.generations.current
    }

    /// Hands one batch's outcome to the core, in the order the I/O queue produced them. One
    /// loop task drains everything reported meanwhile: under load a burst of completed writes
    /// costs the loop one wake-up, not one per write.
    private func report(_ events: [CoreEvent]) {
        guard fromIO.post([events]) else { return }
        loop.execute {
            for batch in self.fromIO.take() {
                self.ioBatchDone()
                for e in batch { self.run(e, publishing: false) }
            }
            self.publish()
        }
    }

    private func publish() {
        let s = core.status
        let until = core.role == .primary && !halted ? core.gate.validUntil : nil
        statusLock.lock()
        snapshot = s
        answersUntil = until
        statusLock.unlock()
    }

    /// The write gate's lease end while primary (statusLock): replies go out only before it.
    private var answersUntil: Instant?

    public func mayAnswer() -> Bool {
        statusLock.lock()
        let until = answersUntil
        statusLock.unlock()
        guard let until else { return false }
        return clock() < until
    }

    // MARK: sessions

    private func established(_ conn: PeerConnection) {
        guard started, !halted else { return conn.close() }
        let id = nextSession
        nextSession += 1
        sessions[id] = conn
        sessionIDs[ObjectIdentifier(conn)] = id
        conn.setSendBuffer(config.linkSendBufferBytes)
        if readsPaused { conn.pauseReading(true) }
        statusLock.lock(); linkConnections[ObjectIdentifier(conn)] = conn; statusLock.unlock()
        ticksWithoutLink = 0
        run(.linkUp(id, conn.remote.node))
    }

    private func received(_ frame: Frame, on conn: PeerConnection) {
        guard let id = sessionIDs[ObjectIdentifier(conn)] else { return }
        run(.frame(id, kind: frame.kind, epoch: frame.epoch, payload: frame.payload))
    }

    private func closed(_ conn: PeerConnection?, _ why: String) {
        guard let conn else { return run(.linkDown(nil, why)) }
        guard let id = sessionIDs.removeValue(forKey: ObjectIdentifier(conn)) else { return }
        sessions[id] = nil
        linkHeldLock.lock(); linkHeld = []; linkHeldLock.unlock()  // the core marks them with the link's loss
        statusLock.lock()
        if linkConnections.removeValue(forKey: ObjectIdentifier(conn)) != nil {
            closedLinkBytes.sent &+= conn.bytesSent
            closedLinkBytes.received &+= conn.bytesReceived
        }
        statusLock.unlock()
        run(.linkDown(id, why))
    }

    private func startDialer() {
        let d = PeerDialer(group: loop, host: config.peerReplicationAddress.host, port: config.peerReplicationAddress.port,
                           local: PeerHello(cluster: config.cluster, node: config.me, channel: ReplicatedVolumeConfig.channel),
                           key: config.clusterKey, idleTimeout: .nanoseconds(config.linkTimeout.nanosecondsClamped),
                           retryDelay: .nanoseconds(config.redialDelay.nanosecondsClamped), reads: .bulk, callbacks: inboundSession())
        dialer = d
        d.start()
    }

    /// Belt and braces over `PeerDialer`'s own redial: after two link timeouts without a
    /// session, say why in `status.lastLinkError` and start a fresh dialer.
    private func checkDialer() {
        guard !halted, dialer != nil else { return }
        guard sessions.isEmpty else { ticksWithoutLink = 0; return }
        ticksWithoutLink += 1
        guard ticksWithoutLink >= 2 else { return }
        ticksWithoutLink = 0
        let why = "no replication session with \(config.peer) at \(config.peerReplicationAddress.host):\(config.peerReplicationAddress.port) for \(config.linkTimeout * 2): peer down, refusing the hello, or using another cluster key"
        run(.linkDown(nil, why))
        dialer?.stop()
        startDialer()
    }

    private func halt() {
        halted = true
        dialer?.stop()
        dialer = nil
        watchdog?.cancel()
        for c in sessions.values { c.close() }
        sessions = [:]
        sessionIDs = [:]
        for p in requests.values { p.fail(VolumeError.shuttingDown) }
        requests = [:]
        for f in drains.values { f(.failure(VolumeError.shuttingDown)) }
        drains = [:]
    }

    static func volumeError(_ e: Error) -> VolumeError {
        if let v = e as? VolumeError { return v }
        if let s = e as? StoreError { return s.errno == ENOSPC ? .noSpace : .io(errno: s.errno) }
        return .io(errno: EIO)
    }

    // MARK: crash simulation (tests)

    /// Drops the volume as a crash would: no flush, no metadata update, link cut.
    func simulateCrash() {
        dead.set()
        onLoop { self.halt() }
    }

    /// Tests: a backup that stops reading its link (as a full apply queue makes it), and
    /// what waits at the master for the link to drain.
    func pauseLinkReadingForTests(_ on: Bool) { onLoop { for c in self.sessions.values { c.pauseReading(on) } } }
    var writesHeldForLink: Int { linkHeldLock.lock(); defer { linkHeldLock.unlock() }; return linkHeld.count }

    /// A crash of the whole host: as `simulateCrash`, and every write the store had not
    /// synced is lost (needs `volatileCacheForTests`).
    func simulatePowerCut() {
        dead.set()
        precondition(backing.powerCut(), "simulatePowerCut needs volatileCacheForTests")
        onLoop { self.halt() }
    }

    // MARK: loop helpers

    /// Runs `f` now when already on the volume's loop, else as a task there (never waits).
    private func onLoopSoon(_ f: @escaping () -> Void) {
        if loop.inEventLoop { f() } else { loop.execute(f) }
    }

    /// Runs `f` on the volume's loop and waits for it (control-plane calls only).
    private func onLoop(_ f: @escaping () -> Void) {
        if loop.inEventLoop { return f() }
        try? loop.submit(f).wait()
    }

    private func onLoopThrowing(_ f: @escaping () throws -> Void) throws {
        if loop.inEventLoop { return try f() }
        try loop.submit(f).wait()
    }
}

extension PeerConnection {
    /// Sends a link message as one frame; a block it carries is encrypted from where it is.
    func send(_ m: LinkMessage, epoch: Epoch) {
        let (head, data) = m.encodeParts()
        send(kind: m.kind.rawValue, epoch: epoch, payload: head, more: data)
    }
}

/// A flag set once, read from any thread.
final class LockedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var v = false
    var value: Bool { lock.lock(); defer { lock.unlock() }; return v }
    func set() { lock.lock(); v = true; lock.unlock() }
}

/// Everything one node's replicated volume needs (design.md §3, §5 `[volume]`, `[[node]]`).
public struct ReplicatedVolumeConfig: Sendable {
    public var cluster: String
    public var me: NodeID
    public var peer: NodeID
    public var backingPath: String
    public var metadataPath: String
    public var sizeBytes: UInt64
    public var chunkBytes: Int
    public var replicationProtocol: ReplicationProtocol
    /// The peer's replication address; dialled only when `me` sorts before `peer`.
    public var peerReplicationAddress: (host: String, port: Int)
    public var clusterKey: SymmetricKey
    /// A link silent this long is declared down (keepalives run at a third of it).
    public var linkTimeout: Duration
    public var resyncRateBytesPerSecond: Int
    /// Activity-log extent size (default 4 MiB) and how many may be hot (default 64).
    public var activityLogExtentBytes: Int = 4 << 20
    /// Hot extents (DRBD: al-extents, default 1237). 1000 × 4 MiB ≈ 3.9 GiB: random writes
    /// over most volumes pay the AL sync only on an extent's first touch; a primary crash
    /// resyncs at most that much. The AL slot holds up to `MetadataLayout.maxALSlots` (1011).
    public var activityLogExtents: Int = 1000
    /// Resync / verify bytes in flight on the link: 16 chunks of the default 64 KiB, and
    /// as many bytes in more chunks when chunks are smaller (a 4 KiB-chunk volume would
    /// otherwise wait one round trip and one target fsync per 64 KiB).
    public var resyncWindowBytes: Int = 1 << 20
    var resyncWindowChunks: Int { max(16, resyncWindowBytes / max(1, chunkBytes)) }
    /// Delay between dial attempts.
    public var redialDelay: Duration = .milliseconds(200)
    /// A missing backing *file* may be created (sparse); never a path under /dev.
    public var createBacking = false
    /// Tests only: the store keeps every unsynced write in this process's memory, so a kill
    /// (or `simulatePowerCut()`) loses what a power cut would (`BackingStore(volatileCache:)`).
    /// The daemon sets it when `HAMGR_TEST_VOLATILE_CACHE=1`.
    public var volatileCacheForTests = false
    /// Backpressure on the backup: data bytes of replicated writes queued for its disk
    /// beyond which it stops reading the link until half of it is written
    /// (`volume.apply_queue`).
    public var applyQueueBytes = 64 << 20
    /// Backpressure on the master: sealed frames the link may hold unsent; a write whose
    /// frame finds it full does not count as queued to the peer until it drains
    /// (`volume.link_send_buffer`).
    public var linkSendBufferBytes = PeerConnection.defaultSendBufferBytes

    public init(cluster: String, me: NodeID, peer: NodeID, backingPath: String, metadataPath: String,
                sizeBytes: UInt64, chunkBytes: Int = 64 << 10, replicationProtocol: ReplicationProtocol = .c,
                peerReplicationAddress: (host: String, port: Int), clusterKey: SymmetricKey,
                linkTimeout: Duration = .seconds(3), resyncRateBytesPerSecond: Int = 100 << 20, createBacking: Bool = false) {
        self.cluster = cluster; self.me = me; self.peer = peer
        self.backingPath = backingPath; self.metadataPath = metadataPath
        self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes; self.replicationProtocol = replicationProtocol
        self.peerReplicationAddress = peerReplicationAddress; self.clusterKey = clusterKey
        self.linkTimeout = linkTimeout; self.resyncRateBytesPerSecond = resyncRateBytesPerSecond
        self.createBacking = createBacking
    }

    /// The channel name the daemon's PeerListener routes to the volume.
    public static let channel = "replication"

    func validate() throws {
        guard chunkBytes >= 4096, chunkBytes.nonzeroBitCount == 1, chunkBytes <= 16 << 20 else {
            throw ConfigError(key: "volume.chunk_size", message: "\(chunkBytes) must be a power of two in 4 KiB…16 MiB")
        }
        guard sizeBytes > 0, sizeBytes % 512 == 0 else {
            throw ConfigError(key: "volume.size", message: "\(sizeBytes) must be a positive multiple of 512")
        }
        guard activityLogExtentBytes >= chunkBytes, activityLogExtentBytes % chunkBytes == 0 else {
            throw ConfigError(key: "volume.activity_log_extent", message: "\(activityLogExtentBytes) must be a multiple of the chunk size \(chunkBytes)")
        }
        guard (1...MetadataLayout.maxALSlots).contains(activityLogExtents) else {
            throw ConfigError(key: "volume.activity_log_extents", message: "\(activityLogExtents) outside 1…\(MetadataLayout.maxALSlots)")
        }
        guard resyncRateBytesPerSecond > 0 else {
            throw ConfigError(key: "volume.resync_rate", message: "must be positive")
        }
        guard me != peer else { throw ConfigError(key: "node", message: "the peer must differ from this node (\(me))") }
    }
}

extension IOBatch {
    /// A resync target's chunk: write, sync, ack (see `ReplicationCore`'s frame handling).
    var isResyncChunk: Bool {
        guard case (_, .resync)? = ack, steps.count == 2, case .writeData = steps[0], case .sync = steps[1] else { return false }
        return true
    }
}
