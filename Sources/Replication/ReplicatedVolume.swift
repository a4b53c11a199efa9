@preconcurrency import Crypto
import Foundation
import HACore
import Logging
import NIOCore
import NIOPosix

/// A `BlockVolume` mirrored to the peer node over the replication link (design.md §3).
///
/// Threads: all mutable state lives on `loop` (one event loop of the group). Disk work runs
/// on `io`, one serial queue, so metadata persists, local writes, resync and verify reads
/// and the frames of the data stream leave in exactly one order — the order the peer
/// applies them in. Client reads use a separate concurrent queue.
/// The decisions (sync decision, ack rule, fencing, AL, bitmap, throttle) are the pure
/// types in `Store/` and `Link/`; this file carries them out.
public final class ReplicatedVolume: BlockVolume, @unchecked Sendable {
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
    private let chunkCount: Int
    private let dead = LockedFlag()  // set by a simulated crash: io does nothing more

    // MARK: loop-confined state
    private var header: MetadataHeader
    private var bitmap: DirtyBitmap
    private var al: ActivityLog
    private var role: Role = .secondary
    private var roleEpoch: Epoch
    private var promisedEpoch: Epoch
    private var gate: WriteGate = .closed
    private var gateTimer: Scheduled<Void>?
    private var suspended = false
    private var started = false
    private var stopped = false
    private var dialer: PeerDialer?
    private var watchdog: RepeatedTask?
    private var ticksWithoutLink = 0
    private var link: LinkSession?
    private var writes: [UInt64: PendingWrite] = [:]
    private var nextSeq: UInt64 = 1
    private var alWaiters: [() -> Void] = []
    private var resync: ResyncRun?
    private var targetRun: TargetRun?
    private var verify: VerifyRun?
    private var targetMismatches: [Int] = []
    private var snapshot = ReplicationStatus()
    private let statusLock = NSLock()
    private var lastPeerState: PeerReplicationState = .disconnected
    private var lastDisk: (DiskState, DataGenerations)?
    private var rng = SystemRandomNumberGenerator()

    private final class LinkSession {
        let conn: PeerConnection
        var sent: LinkHandshake?
        var peer: LinkHandshake?
        var decision: SyncDecision?
        /// Writes that arrived while the handshake was open; they wait for the decision.
        var held: [() -> Void] = []
        init(conn: PeerConnection) { self.conn = conn }
        var ready: Bool { decision != nil }
        /// The peer applies this node's writes.
        var following: Bool {
            switch decision { case .inSync?, .becomeSource?: return true; default: return false }
        }
    }

    private final class PendingWrite {
        let seq: UInt64
        let chunks: Range<Int>
        let extents: [Int]
        let bytes: Int
        let barrier: Bool
        var promise: EventLoopPromise<Void>?
        var localDone = false
        var confirmation: PeerConfirmation = .pending
        var peerLost: Bool
        var bitmapDurable = false
        var failedLocally = false
        init(seq: UInt64, chunks: Range<Int>, extents: [Int], bytes: Int, barrier: Bool, promise: EventLoopPromise<Void>?, peerLost: Bool) {
            self.seq = seq; self.chunks = chunks; self.extents = extents; self.bytes = bytes
            self.barrier = barrier; self.promise = promise; self.peerLost = peerLost
        }
    }

    private struct ResyncRun {
        var cursor: ResyncCursor
        var throttle: ResyncThrottle
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
        var pumpScheduled = false
        var finishing = false
    }

    private struct TargetRun {
        var totalBytes: UInt64
        var doneBytes: UInt64 = 0
    }

    private struct VerifyRun {
        var next = 0
        var inFlight = 0
        var mismatches: [Int] = []
    }

    // MARK: init

    /// Opens (or creates) the backing store and metadata.
    ///
    /// A missing metadata file is initialised with the pair's *initial generation*, derived
    /// from cluster name, size and chunk size, and disk state upToDate: two new (zero)
    /// stores are then identical and need no initial full sync. Creating metadata next to a
    /// backing store that already holds different data on the two nodes is the operator's
    /// error; `startVerify()` finds it and `requestResync()` repairs it.
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
        chunkCount = MetadataLayout.chunkCount(sizeBytes: config.sizeBytes, chunkBytes: config.chunkBytes)
        backing = try BackingStore(path: config.backingPath, createSize: config.sizeBytes)
        guard backing.sizeBytes >= config.sizeBytes else {
            throw ConfigError(key: "node.backing", message: "\(config.backingPath) holds \(backing.sizeBytes) bytes, the volume needs \(config.sizeBytes)")
        }
        let initial = MetadataHeader(sizeBytes: config.sizeBytes, chunkBytes: UInt32(config.chunkBytes),
                                     alExtentBytes: UInt32(config.activityLogExtentBytes), alSlots: UInt32(config.activityLogExtents),
                                     diskState: .upToDate, flags: [], epoch: .zero,
                                     generations: DataGenerations(current: Self.initialGeneration(config)))
        meta = try MetadataStore(path: config.metadataPath, initial: initial)
        if meta.created { log.info("created metadata \(config.metadataPath) with initial generation \(initial.generations.current)") }
        let rec = CrashRecovery.open(header: meta.header, activityLog: meta.openedAL, bitmap: meta.openedBitmap)
        if rec.recoveredChunks > 0 {
            log.warning("primary crash detected: \(meta.openedAL.count) activity-log extents (\(rec.recoveredChunks) chunks) marked out of sync")
        }
        try meta.writeBitmapPages(rec.dirtyPages.map { ($0, rec.bitmap.pageBytes($0)) })
        try meta.writeAL([])
        try meta.writeHeader(rec.header)
        header = meta.header
        bitmap = rec.bitmap
        al = ActivityLog(capacity: config.activityLogExtents)
        roleEpoch = header.epoch
        promisedEpoch = header.epoch
        publish()
    }

    /// The generation both nodes of a new pair start in.
    public static func initialGeneration(_ c: ReplicatedVolumeConfig) -> GenerationID {
        let d = Array(SHA256.hash(data: Array("hamgr-initial-generation/\(c.cluster)/\(c.sizeBytes)/\(c.chunkBytes)".utf8)))
        let raw = d.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return GenerationID(raw == 0 ? 1 : raw)
    }

    // MARK: control API

    /// Dial the peer (when this node's name sorts first) or wait for its session.
    public func start() {
        onLoop {
            guard !self.started, !self.stopped else { return }
            self.started = true
            if self.config.me < self.config.peer {
                let d = PeerDialer(group: self.group, host: self.config.peerReplicationAddress.host, port: self.config.peerReplicationAddress.port,
                                   local: PeerHello(cluster: self.config.cluster, node: self.config.me, channel: ReplicatedVolumeConfig.channel),
                                   key: self.config.clusterKey, idleTimeout: .nanoseconds(self.config.linkTimeout.nanosecondsClamped),
                                   retryDelay: .nanoseconds(self.config.redialDelay.nanosecondsClamped), callbacks: self.inboundSession())
                self.dialer = d
                d.start()
                self.watchdog = self.loop.scheduleRepeatedTask(initialDelay: .nanoseconds(self.config.linkTimeout.nanosecondsClamped),
                                                               delay: .nanoseconds(self.config.linkTimeout.nanosecondsClamped)) { _ in
                    self.checkDialer()
                }
            }
        }
    }

    /// A hello refused by the peer (wrong cluster key, not routed) closes the socket without
    /// telling the dialer, which then never redials; after two link timeouts without a
    /// session, say so and start a fresh dialer.
    private func checkDialer() {
        guard !stopped, dialer != nil else { return }
        guard link == nil else { ticksWithoutLink = 0; return }
        ticksWithoutLink += 1
        guard ticksWithoutLink >= 2 else { return }
        ticksWithoutLink = 0
        let why = "no replication session with \(config.peer) at \(config.peerReplicationAddress.host):\(config.peerReplicationAddress.port) for \(config.linkTimeout * 2): peer down, refusing the hello, or using another cluster key"
        if snapshot.lastLinkError != why { logger.warning("\(why)") }
        snapshot.lastLinkError = why
        publish()
        dialer?.stop()
        let d = PeerDialer(group: group, host: config.peerReplicationAddress.host, port: config.peerReplicationAddress.port,
                           local: PeerHello(cluster: config.cluster, node: config.me, channel: ReplicatedVolumeConfig.channel),
                           key: config.clusterKey, idleTimeout: .nanoseconds(config.linkTimeout.nanosecondsClamped),
                           retryDelay: .nanoseconds(config.redialDelay.nanosecondsClamped), callbacks: inboundSession())
        dialer = d
        d.start()
    }

    /// Clean shutdown: fail what is pending, make everything durable, mark clean.
    public func stop() {
        onLoop {
            guard !self.stopped else { return }
            self.stopped = true
            self.dialer?.stop()
            self.watchdog?.cancel()
            if let l = self.link { self.linkDown(l, reason: "volume stopped"); l.conn.close() }
            self.failAllPending(.shuttingDown)
        }
        let (h, bm): (MetadataHeader, DirtyBitmap) = onLoop {
            var h = self.header
            h.flags.insert(.cleanShutdown)
            h.flags.remove(.wasPrimary)
            self.header = h
            return (h, self.bitmap)
        }
        io.sync {
            guard !dead.value else { return }
            do {
                try backing.sync()
                try meta.writeBitmap(bm)
                try meta.writeAL([])
                try meta.writeHeader(h)
            } catch {
                logger.error("clean shutdown failed: \(error)")
            }
        }
        logger.info("replicated volume stopped cleanly")
    }

    /// Callbacks for a session the daemon's PeerListener routed here (channel "replication").
    public func inboundSession() -> PeerSessionCallbacks {
        PeerSessionCallbacks(
            established: { [weak self] conn in self?.loop.execute { self?.adopt(conn) } },
            frame: { [weak self] conn, frame in self?.loop.execute { self?.received(frame, on: conn) } },
            closed: { [weak self] conn, why in self?.loop.execute { self?.closed(conn, why) } })
    }

    public func setWriteGate(_ gate: WriteGate) {
        onLoop {
            self.gate = gate
            self.gateTimer?.cancel()
            let wait = gate.validUntil - self.clock()
            if wait > .zero {
                self.gateTimer = self.loop.scheduleTask(in: .nanoseconds(wait.nanosecondsClamped + 1_000)) { self.evaluateAll() }
            }
            self.evaluateAll()
        }
    }

    /// Accept writes in `epoch`. `newGeneration` starts a new data generation (failover,
    /// forced promotion) so a later reconnect can tell who changed what.
    public func becomePrimary(epoch: Epoch, newGeneration: Bool) throws {
        let h: MetadataHeader = try onLoopThrowing {
            guard !self.stopped else { throw VolumeError.shuttingDown }
            guard self.header.diskState == .upToDate else {
                throw VolumeError.invalid("disk is \(self.header.diskState); only an upToDate disk may be promoted")
            }
            if self.role == .primary && self.roleEpoch == epoch && !newGeneration { return self.header }
            self.role = .primary
            self.suspended = false
            self.roleEpoch = max(self.roleEpoch, epoch)
            self.promisedEpoch = max(self.promisedEpoch, epoch)
            self.header.epoch = max(self.header.epoch, epoch)
            self.header.flags.insert(.wasPrimary)
            if newGeneration { self.header.generations.branch(to: self.freshGeneration()) }
            self.logger.notice("primary in epoch \(epoch)\(newGeneration ? ", new generation \(self.header.generations.current)" : "")")
            self.publish()
            return self.header
        }
        // Durable before the first write is accepted.
        try io.sync { try meta.writeHeader(h) }
    }

    /// Stop accepting writes (pending ones fail with notPrimary) and follow the peer.
    public func becomeSecondary(epoch: Epoch) {
        onLoop {
            self.roleEpoch = max(self.roleEpoch, epoch)
            self.promisedEpoch = max(self.promisedEpoch, epoch)
            self.header.epoch = max(self.header.epoch, epoch)
            if self.role == .primary { self.logger.notice("secondary in epoch \(epoch)") }
            self.role = .secondary
            self.suspended = false
            self.failAllPending(.notPrimary(master: nil))
            self.persistHeader()
            self.publish()
        }
    }

    /// Fencing: refuse data frames from epochs older than `epoch`.
    public func setPromisedEpoch(_ epoch: Epoch) {
        onLoop {
            guard epoch > self.promisedEpoch else { return }
            self.promisedEpoch = epoch
            self.header.epoch = max(self.header.epoch, epoch)
            self.persistHeader()
            self.publish()
        }
    }

    /// Switchover: refuse new writes, wait for in-flight ones, then a flush round trip
    /// proves the peer has everything.
    public func drainForSwitchover(_ done: @escaping @Sendable (Result<Void, Error>) -> Void) {
        onLoop {
            guard self.role == .primary else { return done(.failure(VolumeError.notPrimary(master: nil))) }
            self.suspended = true
            self.waitDrained {
                guard let l = self.link, l.following else {
                    return done(.failure(VolumeError.invalid("peer is not in sync; switchover needs a connected, up-to-date peer")))
                }
                let p = self.loop.makePromise(of: Void.self)
                self.submitFlush(promise: p, isInternal: true)
                p.futureResult.whenComplete { r in done(r.mapError { $0 }) }
            }
        }
    }

    /// Hash every chunk on both sides; mismatches are reported and marked for `requestResync()`.
    public func startVerify() {
        onLoop {
            guard let l = self.link, l.ready, self.verify == nil, case .inSync? = l.decision else {
                self.logger.warning("verify needs a connected peer in sync")
                return
            }
            self.logger.info("online verify started over \(self.chunkCount) chunks")
            self.verify = VerifyRun()
            self.pumpVerify()
            self.publish()
        }
    }

    /// Resync the chunks known out of sync (bitmap, last verify's mismatches) from the
    /// source side; on the other side this asks the peer to do it.
    public func requestResync() {
        onLoop {
            guard let l = self.link, l.ready else { return self.logger.warning("resync needs a connected peer") }
            let mismatches = self.snapshot.lastVerifyMismatches ?? []
            if self.isRepairSource(l) {
                let pages = self.bitmap.mark(mismatches)
                self.persistPages(pages)
                self.startResync(l)
            } else {
                let runs = ChunkRun.runs(of: Array(Set(mismatches + self.bitmap.setChunks)).sorted())
                self.send(.resyncRequest(runs), on: l)
            }
        }
    }

    /// After a split brain: `discardLocal` makes this node the sync target of the peer on the
    /// next connect (its changes since the divergence are overwritten).
    public func resolveSplitBrain(discardLocal: Bool) {
        onLoop {
            if discardLocal {
                guard self.role == .secondary else { return self.logger.error("a primary cannot discard its data; demote it first") }
                self.header.flags.insert(.discardLocal)
                self.persistHeader()
                self.logger.warning("split brain: this node's changes will be discarded on the next connect")
            }
            self.snapshot.splitBrain = nil
            self.publish()
            if let l = self.link { l.conn.close() }  // reconnect and decide again
        }
    }

    public var status: ReplicationStatus {
        statusLock.lock(); defer { statusLock.unlock() }
        return snapshot
    }

    // MARK: BlockVolume

    public func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> {
        if let e = checkRange(offset, length) { return loop.makeFailedFuture(e) }
        let p = loop.makePromise(of: ByteBuffer.self)
        self.loop.execute {
            guard self.role == .primary, !self.stopped else { return p.fail(VolumeError.notPrimary(master: nil)) }
            self.readQueue.async {
                do { p.succeed(try self.backing.read(offset: offset, length: length)) } catch { p.fail(Self.volumeError(error)) }
            }
        }
        return p.futureResult
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = checkRange(offset, data.readableBytes) { return loop.makeFailedFuture(e) }
        if data.readableBytes == 0 { return loop.makeSucceededVoidFuture() }
        let p = loop.makePromise(of: Void.self)
        self.loop.execute { self.submitWrite(.data(data), offset: offset, length: data.readableBytes, fua: fua, promise: p) }
        return p.futureResult
    }

    public func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        let p = loop.makePromise(of: Void.self)
        self.loop.execute { self.submitFlush(promise: p, isInternal: false) }
        return p.futureResult
    }

    /// Trim zeroes the range on both nodes (deallocating where possible), so the replicas
    /// stay byte-identical.
    public func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, fua: fua, mayDeallocate: true, on: loop)
    }

    public func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = checkRange(offset, length) { return loop.makeFailedFuture(e) }
        if length == 0 { return loop.makeSucceededVoidFuture() }
        let p = loop.makePromise(of: Void.self)
        self.loop.execute { self.submitWrite(.zeroes(mayDeallocate: mayDeallocate), offset: offset, length: length, fua: fua, promise: p) }
        return p.futureResult
    }

    private func checkRange(_ offset: UInt64, _ length: Int) -> VolumeError? {
        guard length >= 0, length <= Int(capabilities.maximumBlockSize) else { return .invalid("length \(length) exceeds \(capabilities.maximumBlockSize)") }
        let (end, o) = offset.addingReportingOverflow(UInt64(length))
        guard !o, end <= config.sizeBytes else { return .invalid("range \(offset)+\(length) beyond the volume's \(config.sizeBytes) bytes") }
        return nil
    }

    // MARK: write path (primary)

    private enum WriteOp { case data(ByteBuffer), zeroes(mayDeallocate: Bool) }

    private func submitWrite(_ op: WriteOp, offset: UInt64, length: Int, fua: Bool, promise: EventLoopPromise<Void>) {
        guard !stopped else { return promise.fail(VolumeError.shuttingDown) }
        guard role == .primary else { return promise.fail(VolumeError.notPrimary(master: nil)) }
        guard !suspended else { return promise.fail(VolumeError.shuttingDown) }
        if let l = link, !l.ready {
            l.held.append { self.submitWrite(op, offset: offset, length: length, fua: fua, promise: promise) }
            return
        }
        let extents = ActivityLog.extents(offset: offset, length: length, extentBytes: config.activityLogExtentBytes)
        let alPersist: [Int]?
        switch al.begin(extents) {
        case .full:
            alWaiters.append { self.submitWrite(op, offset: offset, length: length, fua: fua, promise: promise) }
            return
        case .hot: alPersist = nil
        case .persist(let hot): alPersist = hot
        }
        let seq = nextSeq
        nextSeq += 1
        let first = Int(offset / UInt64(config.chunkBytes)), last = Int((offset + UInt64(length) - 1) / UInt64(config.chunkBytes))
        let chunks = first..<(last + 1)
        let following = link?.following ?? false
        let w = PendingWrite(seq: seq, chunks: chunks, extents: extents, bytes: length, barrier: fua, promise: promise, peerLost: !following)
        writes[seq] = w
        let (headerWrite, pages) = following ? (nil, []) : markOutOfSync(chunks)
        var framed: (PeerConnection, ByteBuffer)?
        if following, let l = link {
            var flags: WriteFlags = fua ? [.fua] : []
            var data: ByteBuffer?
            switch op {
            case .data(let d): data = d
            case .zeroes(let dealloc): flags.insert(.zeroes); if dealloc { flags.insert(.mayDeallocate) }
            }
            framed = (l.conn, LinkMessage.write(seq: seq, offset: offset, flags: flags, length: UInt32(length), data: data).encode())
        }
        let epoch = frameEpoch
        let frame = framed
        io.async {
            guard !self.dead.value else { return }
            do {
                if let hot = alPersist { try self.meta.writeAL(hot) }
                if let h = headerWrite { try self.meta.writeHeader(h) }
                try self.meta.writeBitmapPages(pages)
                // Sent from the I/O queue so the peer sees the same order as this disk.
                if let (c, f) = frame { c.send(kind: LinkFrameKind.write.rawValue, epoch: epoch, payload: f) }
                switch op {
                case .data(let d): try self.backing.write(offset: offset, buffer: d)
                case .zeroes(let dealloc): try self.backing.writeZeroes(offset: offset, length: length, mayDeallocate: dealloc)
                }
                if fua { try self.backing.sync() }
                self.loop.execute { self.localDone(seq, queued: frame != nil) }
            } catch {
                self.loop.execute { self.localFailed(seq, error) }
            }
        }
        publish()
    }

    private func submitFlush(promise: EventLoopPromise<Void>, isInternal: Bool) {
        guard !stopped else { return promise.fail(VolumeError.shuttingDown) }
        guard role == .primary else { return promise.fail(VolumeError.notPrimary(master: nil)) }
        guard isInternal || !suspended else { return promise.fail(VolumeError.shuttingDown) }
        if let l = link, !l.ready {
            l.held.append { self.submitFlush(promise: promise, isInternal: isInternal) }
            return
        }
        let seq = nextSeq
        nextSeq += 1
        let following = link?.following ?? false
        let w = PendingWrite(seq: seq, chunks: 0..<0, extents: [], bytes: 0, barrier: true, promise: promise, peerLost: !following)
        writes[seq] = w
        let conn = following ? link?.conn : nil
        let epoch = frameEpoch
        io.async {
            guard !self.dead.value else { return }
            do {
                conn?.send(kind: LinkFrameKind.flush.rawValue, epoch: epoch, payload: LinkMessage.flush(id: seq).encode())
                try self.backing.sync()
                self.loop.execute { self.localDone(seq, queued: conn != nil) }
            } catch {
                self.loop.execute { self.localFailed(seq, error) }
            }
        }
    }

    /// Marks chunks the peer will not get; branches the generation the first time.
    private func markOutOfSync(_ chunks: Range<Int>) -> (MetadataHeader?, [(Int, [UInt8])]) {
        var h: MetadataHeader?
        if role == .primary && header.generations.bitmap.isNone {
            header.generations.branch(to: freshGeneration())
            logger.notice("peer not following: new generation \(header.generations.current) over \(header.generations.bitmap)")
            h = header
        }
        let pages = bitmap.mark(chunks)
        return (h, pages.map { ($0, bitmap.pageBytes($0)) })
    }

    private func localDone(_ seq: UInt64, queued: Bool) {
        guard let w = writes[seq] else { return }
        w.localDone = true
        w.bitmapDurable = true  // every metadata write issued before it on the queue is synced
        if queued && w.confirmation < .queued { w.confirmation = .queued }
        evaluate(w)
        publish()
    }

    private func localFailed(_ seq: UInt64, _ error: Error) {
        logger.error("local write failed: \(error)")
        onEvent?(.diskFailure("\(error)"))
        guard let w = writes[seq] else { return }
        w.promise?.fail(Self.volumeError(error))
        w.promise = nil
        w.failedLocally = true
        retireIfDone(w)
        publish()
    }

    private func evaluate(_ w: PendingWrite) {
        if let p = w.promise {
            switch AckRule.verdict(localDone: w.localDone, confirmation: w.confirmation, peerLost: w.peerLost, bitmapDurable: w.bitmapDurable,
                                   barrier: w.barrier, protocol: config.replicationProtocol, gate: gate, now: clock()) {
            case .wait: break
            case .ack: w.promise = nil; p.succeed(())
            case .fail(let e): w.promise = nil; p.fail(e)
            }
        }
        retireIfDone(w)
    }

    private func evaluateAll() {
        for w in writes.values.sorted(by: { $0.seq < $1.seq }) { evaluate(w) }
        publish()
    }

    /// A write leaves the AL only when the peer has it or the bitmap records that it lacks it.
    private func retireIfDone(_ w: PendingWrite) {
        guard w.promise == nil else { return }
        let settled = w.failedLocally || (w.localDone && (w.confirmation == .written || (w.peerLost && w.bitmapDurable)))
        guard settled, writes.removeValue(forKey: w.seq) != nil else { return }
        al.end(w.extents)
        if !alWaiters.isEmpty {
            let waiting = alWaiters
            alWaiters = []
            for f in waiting { f() }
        }
        checkDrained()
    }

    private var drainWaiters: [() -> Void] = []
    private func waitDrained(_ f: @escaping () -> Void) { drainWaiters.append(f); checkDrained() }
    private func checkDrained() {
        guard !drainWaiters.isEmpty, !writes.values.contains(where: { $0.promise != nil }), alWaiters.isEmpty else { return }
        let ws = drainWaiters
        drainWaiters = []
        for f in ws { f() }
    }

    private func failAllPending(_ e: VolumeError) {
        for w in writes.values where w.promise != nil { w.promise!.fail(e); w.promise = nil; retireIfDone(w) }
        let waiting = alWaiters + (link?.held ?? [])
        alWaiters = []
        link?.held = []
        for f in waiting { f() }  // they see the new role / stopped and fail
    }

    // MARK: link lifecycle

    private var frameEpoch: Epoch { role == .primary ? roleEpoch : max(roleEpoch, promisedEpoch) }

    private func adopt(_ conn: PeerConnection) {
        guard started, !stopped, conn.remote.node == config.peer else {
            logger.warning("refused replication session from \(conn.remote.node)")
            return conn.close()
        }
        if let old = link {
            logger.info("new replication session replaces the old one")
            linkDown(old, reason: "replaced by a new session")
            old.conn.close()
        }
        let l = LinkSession(conn: conn)
        link = l
        snapshot.linksEstablished += 1
        let hs = LinkHandshake(sizeBytes: config.sizeBytes, chunkBytes: UInt32(config.chunkBytes), generations: header.generations,
                               diskState: header.diskState, role: role, crashedPrimary: header.flags.contains(.crashRecoveryPending),
                               discardLocal: header.flags.contains(.discardLocal), dirtyRuns: bitmap.runs)
        l.sent = hs
        logger.info("replication link up with \(conn.remote.node); handshake sent (generation \(hs.generations.current), \(hs.diskState), \(bitmap.setCount) dirty chunks)")
        send(.handshake(hs), on: l)
        publish()
    }

    private func closed(_ conn: PeerConnection?, _ why: String) {
        guard let conn else {
            // The hello never completed (refused, wrong key, unreachable).
            if snapshot.lastLinkError != why { logger.warning("replication session failed: \(why)") }
            snapshot.lastLinkError = why
            return publish()
        }
        guard let l = link, l.conn === conn else { return }
        logger.warning("replication link down: \(why)")
        if snapshot.splitBrain == nil { snapshot.lastLinkError = why }
        linkDown(l, reason: why)
    }

    /// The peer no longer follows: every write it has not confirmed goes into the bitmap.
    private func linkDown(_ l: LinkSession, reason: String) {
        guard link === l else { return }
        link = nil
        resync = nil
        targetRun = nil
        if verify != nil { logger.warning("verify aborted: \(reason)"); verify = nil }
        let unconfirmed = writes.values.filter { !$0.peerLost && $0.confirmation < .written && !$0.failedLocally }.sorted { $0.seq < $1.seq }
        if !unconfirmed.isEmpty {
            var headerWrite: MetadataHeader?
            var pages = Set<Int>()
            for w in unconfirmed {
                w.peerLost = true
                w.bitmapDurable = false
                let (h, ps) = markOutOfSync(w.chunks)
                if let h { headerWrite = h }
                for (p, _) in ps { pages.insert(p) }
            }
            let seqs = unconfirmed.map(\.seq)
            let newHeader = headerWrite
            let pageList = pages.sorted().map { ($0, bitmap.pageBytes($0)) }
            io.async {
                guard !self.dead.value else { return }
                do {
                    if let h = newHeader { try self.meta.writeHeader(h) }
                    try self.meta.writeBitmapPages(pageList)
                    self.loop.execute {
                        for s in seqs { self.writes[s]?.bitmapDurable = true }
                        self.evaluateAll()
                    }
                } catch {
                    self.loop.execute { self.metadataFailed(error) }
                }
            }
        }
        let held = l.held
        l.held = []
        for f in held { f() }
        evaluateAll()
        publish()
    }

    private func refuse(_ l: LinkSession, _ why: String) {
        logger.error("replication link refused: \(why)")
        snapshot.lastLinkError = why
        send(.refuse(why), on: l)
        linkDown(l, reason: why)
        l.conn.close()
    }

    private func send(_ m: LinkMessage, on l: LinkSession) {
        l.conn.send(kind: m.kind.rawValue, epoch: frameEpoch, payload: m.encode(allocator: l.conn.channel.allocator))
    }

    // MARK: inbound frames

    private func received(_ frame: Frame, on conn: PeerConnection) {
        guard let l = link, l.conn === conn else { return }
        let msg: LinkMessage
        switch LinkMessage.decode(kind: frame.kind, payload: frame.payload) {
        case .success(let m): msg = m
        case .failure(let e): return refuse(l, "\(e)")
        }
        if EpochFence.isFenced(msg.kind), !EpochFence.admits(frameEpoch: frame.epoch, promised: promisedEpoch) {
            snapshot.fencedFrames += 1
            return refuse(l, "fenced \(msg.kind) frame from epoch \(frame.epoch); this node promised epoch \(promisedEpoch)")
        }
        if case .handshake = msg {} else if case .refuse = msg {} else if !l.ready {
            return refuse(l, "\(msg.kind) frame before the handshake")
        }
        switch msg {
        case .handshake(let hs): handshake(hs, on: l)
        case .refuse(let why):
            logger.error("peer refused the link: \(why)")
            snapshot.lastLinkError = "peer: \(why)"
            linkDown(l, reason: why)
            l.conn.close()
        case let .write(seq, offset, flags, length, data): applyWrite(seq: seq, offset: offset, flags: flags, length: length, data: data, on: l)
        case let .writeAck(seq, stage, status):
            if status != 0 { return refuse(l, "peer failed to write (errno \(status))") }
            if let w = writes[seq] {
                let c: PeerConfirmation = stage == .written ? .written : .received
                if c > w.confirmation { w.confirmation = c }
                evaluate(w)
            }
        case .flush(let id):
            guard role == .secondary else { return refuse(l, "flush frame while primary") }
            let epoch = frameEpoch
            io.async {
                guard !self.dead.value else { return }
                var st: Int32 = 0
                do { try self.backing.sync() } catch { st = (error as? StoreError)?.errno ?? EIO; self.loop.execute { self.metadataFailed(error) } }
                conn.send(kind: LinkFrameKind.flushAck.rawValue, epoch: epoch, payload: LinkMessage.flushAck(id: id, status: st).encode())
            }
        case let .flushAck(id, status):
            if status != 0 { return refuse(l, "peer failed to flush (errno \(status))") }
            if let w = writes[id] { w.confirmation = .written; evaluate(w) }
        case let .resyncData(chunk, data): applyResyncChunk(Int(chunk), data, on: l)
        case let .resyncAck(chunk, status):
            if status != 0 { return refuse(l, "peer failed to write resync chunk \(chunk) (errno \(status))") }
            resyncAcked(Int(chunk), on: l)
        case .resyncDone(let gens): targetFinish(gens, on: l)
        case .resyncFinished: sourceFinish(on: l)
        case let .verifyRequest(chunk, hash): verifyChunk(Int(chunk), hash, on: l)
        case let .verifyReply(chunk, match): verifyReplied(Int(chunk), match)
        case .verifyEnd:
            snapshot.lastVerifyMismatches = targetMismatches.sorted()
            logger.info("verify by peer finished: \(targetMismatches.count) mismatched chunks")
            onEvent?(.verifyFinished(mismatchedChunks: targetMismatches.sorted()))
        case .resyncRequest(let runs):
            guard isRepairSource(l) else { return logger.warning("peer asked for a resync this node cannot source") }
            let pages = bitmap.mark(runs.flatMap { Array($0.chunks) })
            persistPages(pages)
            startResync(l)
        }
        publish()
    }

    private func handshake(_ peer: LinkHandshake, on l: LinkSession) {
        guard l.peer == nil, let mine = l.sent else { return refuse(l, "second handshake") }
        l.peer = peer
        let me = SyncSide(node: config.me, generations: mine.generations, diskState: mine.diskState, role: mine.role,
                          hasDirtyChunks: !mine.dirtyRuns.isEmpty, crashedPrimary: mine.crashedPrimary, discardLocal: mine.discardLocal,
                          sizeBytes: mine.sizeBytes, chunkBytes: Int(mine.chunkBytes))
        let them = SyncSide(node: config.peer, generations: peer.generations, diskState: peer.diskState, role: peer.role,
                            hasDirtyChunks: !peer.dirtyRuns.isEmpty, crashedPrimary: peer.crashedPrimary, discardLocal: peer.discardLocal,
                            sizeBytes: peer.sizeBytes, chunkBytes: Int(peer.chunkBytes))
        let d = SyncDecision.decide(me: me, peer: them)
        snapshot.peerDiskState = peer.diskState
        logger.info("sync decision with \(config.peer): \(d) (mine \(mine.generations.current)/\(mine.generations.bitmap), peer \(peer.generations.current)/\(peer.generations.bitmap))")
        switch d {
        case .splitBrain(let why):
            if snapshot.splitBrain != why {
                logger.critical("SPLIT BRAIN, link refused, both stores left untouched: \(why)")
                onEvent?(.splitBrain(why))
            }
            snapshot.splitBrain = why
            linkDown(l, reason: "split brain")
            l.conn.close()
            return
        case .refuse(let why):
            return refuse(l, why)
        case .inSync:
            snapshot.splitBrain = nil
            l.decision = d
            if header.diskState == .outdated || header.flags.contains(.crashRecoveryPending) {
                header.diskState = .upToDate
                header.flags.remove(.crashRecoveryPending)
                persistHeader()
            }
        case .becomeSource(let scope):
            snapshot.splitBrain = nil
            l.decision = d
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
            startResync(l)
        case .becomeTarget(let scope):
            snapshot.splitBrain = nil
            l.decision = d
            header.diskState = .inconsistent
            persistHeader()
            var union = bitmap
            union.mark(peer.dirtyRuns.flatMap { Array($0.chunks) })
            if scope == .full { union.markAll() }
            targetRun = TargetRun(totalBytes: bytes(ofChunks: union.setChunks))
            logger.notice("resync target: \(targetRun!.totalBytes) bytes to receive from \(config.peer)")
        }
        let held = l.held
        l.held = []
        for f in held { f() }
        evaluateAll()
    }

    private func bytes(ofChunks chunks: [Int]) -> UInt64 {
        chunks.reduce(UInt64(0)) { $0 + UInt64(chunkLength($1)) }
    }

    private func chunkLength(_ c: Int) -> Int {
        Int(min(UInt64(config.chunkBytes), config.sizeBytes - UInt64(c) * UInt64(config.chunkBytes)))
    }

    private func applyWrite(seq: UInt64, offset: UInt64, flags: WriteFlags, length: UInt32, data: ByteBuffer?, on l: LinkSession) {
        guard role == .secondary else { return refuse(l, "write frame while this node is primary") }
        if case .becomeSource? = l.decision { return refuse(l, "write frame from the sync target") }
        guard checkRange(offset, Int(length)) == nil else { return refuse(l, "write frame outside the volume: \(offset)+\(length)") }
        let epoch = frameEpoch
        if config.replicationProtocol == .b {
            send(.writeAck(seq: seq, stage: .received, status: 0), on: l)
        }
        let conn = l.conn
        io.async {
            guard !self.dead.value else { return }
            var st: Int32 = 0
            do {
                if flags.contains(.zeroes) {
                    try self.backing.writeZeroes(offset: offset, length: Int(length), mayDeallocate: flags.contains(.mayDeallocate))
                } else if let data {
                    try self.backing.write(offset: offset, buffer: data)
                }
                if flags.contains(.fua) { try self.backing.sync() }
            } catch {
                st = (error as? StoreError)?.errno ?? EIO
                self.loop.execute { self.metadataFailed(error) }
            }
            conn.send(kind: LinkFrameKind.writeAck.rawValue, epoch: epoch, payload: LinkMessage.writeAck(seq: seq, stage: .written, status: st).encode())
        }
    }

    // MARK: resync

    private func isRepairSource(_ l: LinkSession) -> Bool {
        guard header.diskState == .upToDate else { return false }
        if role == .primary { return true }
        if l.peer?.role == .primary { return false }
        return config.me < config.peer
    }

    private func startResync(_ l: LinkSession) {
        guard resync == nil else { return pumpResync() }
        let total = bytes(ofChunks: bitmap.setChunks)
        resync = ResyncRun(cursor: ResyncCursor(window: config.resyncWindowChunks),
                           throttle: ResyncThrottle(bytesPerSecond: config.resyncRateBytesPerSecond, chunkBytes: config.chunkBytes),
                           totalBytes: total)
        logger.notice("resync source: \(bitmap.setCount) chunks (\(total) bytes) to \(config.peer) at ≤ \(config.resyncRateBytesPerSecond) B/s")
        onEvent?(.resyncProgress(done: 0, total: total))
        pumpResync()
    }

    private func pumpResync() {
        guard var r = resync, let l = link, !r.finishing else { return }
        defer { resync = r }
        while r.cursor.inFlight.count < config.resyncWindowChunks {
            if bitmap.nextSet(from: r.cursor.next) == nil { break }
            if let wait = r.throttle.take(config.chunkBytes, now: clock()) {
                if !r.pumpScheduled {
                    r.pumpScheduled = true
                    loop.scheduleTask(in: .nanoseconds(wait.nanosecondsClamped)) {
                        self.resync?.pumpScheduled = false
                        self.pumpResync()
                    }
                }
                return
            }
            guard let chunk = r.cursor.take(from: bitmap) else { break }
            let offset = UInt64(chunk) * UInt64(config.chunkBytes)
            let len = chunkLength(chunk)
            let conn = l.conn
            let epoch = frameEpoch
            // Read on the I/O queue: after every write issued before it, before every later one.
            io.async {
                guard !self.dead.value else { return }
                do {
                    let data = try self.backing.read(offset: offset, length: len)
                    conn.send(kind: LinkFrameKind.resyncData.rawValue, epoch: epoch, payload: LinkMessage.resyncData(chunk: UInt64(chunk), data: data).encode())
                    self.loop.execute { self.snapshot.resyncBytesSent += UInt64(len); self.publish() }
                } catch {
                    self.loop.execute { self.metadataFailed(error) }
                }
            }
        }
        if r.cursor.passComplete(bitmap: bitmap) {
            r.finishing = true
            let gens = header.generations
            let conn = l.conn
            let epoch = frameEpoch
            io.async {
                guard !self.dead.value else { return }
                conn.send(kind: LinkFrameKind.resyncDone.rawValue, epoch: epoch, payload: LinkMessage.resyncDone(gens).encode())
            }
        }
    }

    private func resyncAcked(_ chunk: Int, on l: LinkSession) {
        guard var r = resync, r.cursor.acked(chunk) else { return }
        bitmap.clear(chunk)
        r.doneBytes += UInt64(chunkLength(chunk))
        resync = r
        onEvent?(.resyncProgress(done: r.doneBytes, total: r.totalBytes))
        pumpResync()
    }

    private func sourceFinish(on l: LinkSession) {
        guard let r = resync, r.finishing else { return }
        resync = nil
        if !header.generations.bitmap.isNone {
            header.generations.pushHistory(header.generations.bitmap)
            header.generations.bitmap = .none
        }
        header.flags.remove(.crashRecoveryPending)
        l.decision = .inSync
        snapshot.peerDiskState = .upToDate
        snapshot.resyncDoneBytes = r.doneBytes
        snapshot.resyncTotalBytes = r.totalBytes
        persistHeader(withBitmap: true)
        logger.notice("resync finished: \(r.doneBytes) bytes; \(config.peer) is up to date")
        publish()
    }

    private func applyResyncChunk(_ chunk: Int, _ data: ByteBuffer, on l: LinkSession) {
        guard role == .secondary, chunk >= 0, chunk < chunkCount, data.readableBytes == chunkLength(chunk) else {
            return refuse(l, "bad resync chunk \(chunk) (\(data.readableBytes) bytes)")
        }
        if targetRun == nil {  // an on-demand repair of an in-sync peer
            targetRun = TargetRun(totalBytes: 0)
        }
        let conn = l.conn, epoch = frameEpoch
        io.async {
            guard !self.dead.value else { return }
            var st: Int32 = 0
            do { try self.backing.write(offset: UInt64(chunk) * UInt64(self.config.chunkBytes), buffer: data) } catch {
                st = (error as? StoreError)?.errno ?? EIO
                self.loop.execute { self.metadataFailed(error) }
            }
            conn.send(kind: LinkFrameKind.resyncAck.rawValue, epoch: epoch, payload: LinkMessage.resyncAck(chunk: UInt64(chunk), status: st).encode())
            self.loop.execute {
                self.targetRun?.doneBytes += UInt64(data.readableBytes)
                self.publish()
            }
        }
    }

    private func targetFinish(_ gens: DataGenerations, on l: LinkSession) {
        guard role == .secondary else { return refuse(l, "resync done while primary") }
        let conn = l.conn, epoch = frameEpoch
        io.async {
            guard !self.dead.value else { return }
            do { try self.backing.sync() } catch { self.loop.execute { self.metadataFailed(error) }; return }
            self.loop.execute {
                guard self.link === l else { return }
                if self.header.generations.current != gens.current { self.header.generations.pushHistory(self.header.generations.current) }
                self.header.generations.current = gens.current
                self.header.generations.bitmap = .none
                self.header.diskState = .upToDate
                self.header.flags.remove(.crashRecoveryPending)
                self.header.flags.remove(.discardLocal)
                self.bitmap.clearAll()
                l.decision = .inSync
                if let t = self.targetRun {
                    self.snapshot.resyncDoneBytes = t.doneBytes
                    self.snapshot.resyncTotalBytes = max(t.totalBytes, t.doneBytes)
                }
                self.targetRun = nil
                self.persistHeader(withBitmap: true)
                self.logger.notice("resync target finished: up to date in generation \(gens.current)")
                self.io.async {
                    guard !self.dead.value else { return }
                    conn.send(kind: LinkFrameKind.resyncFinished.rawValue, epoch: epoch, payload: LinkMessage.resyncFinished.encode())
                }
                self.publish()
            }
        }
    }

    // MARK: verify

    private func pumpVerify() {
        guard var v = verify, let l = link else { return }
        defer { verify = v }
        while v.inFlight < config.resyncWindowChunks && v.next < chunkCount {
            let chunk = v.next
            v.next += 1
            v.inFlight += 1
            let conn = l.conn, epoch = frameEpoch, len = chunkLength(chunk)
            io.async {
                guard !self.dead.value else { return }
                do {
                    let data = try self.backing.read(offset: UInt64(chunk) * UInt64(self.config.chunkBytes), length: len)
                    let hash = data.withUnsafeReadableBytes { Array(SHA256.hash(data: $0)) }
                    conn.send(kind: LinkFrameKind.verifyRequest.rawValue, epoch: epoch, payload: LinkMessage.verifyRequest(chunk: UInt64(chunk), sha256: hash).encode())
                } catch {
                    self.loop.execute { self.metadataFailed(error) }
                }
            }
        }
    }

    private func verifyReplied(_ chunk: Int, _ match: Bool) {
        guard var v = verify else { return }
        v.inFlight -= 1
        if !match { v.mismatches.append(chunk) }
        verify = v
        if v.next >= chunkCount && v.inFlight == 0 {
            verify = nil
            let mm = v.mismatches.sorted()
            snapshot.lastVerifyMismatches = mm
            logger.notice("verify finished: \(mm.count) of \(chunkCount) chunks differ\(mm.isEmpty ? "" : ": \(mm.prefix(20))")")
            if let l = link { send(.verifyEnd(chunks: UInt64(chunkCount)), on: l) }
            onEvent?(.verifyFinished(mismatchedChunks: mm))
        } else {
            pumpVerify()
        }
    }

    private func verifyChunk(_ chunk: Int, _ hash: [UInt8], on l: LinkSession) {
        guard chunk >= 0, chunk < chunkCount else { return refuse(l, "verify of chunk \(chunk) outside the volume") }
        if chunk == 0 { targetMismatches = [] }
        let conn = l.conn, len = chunkLength(chunk), epoch = frameEpoch
        io.async {
            guard !self.dead.value else { return }
            var match = false
            if let data = try? self.backing.read(offset: UInt64(chunk) * UInt64(self.config.chunkBytes), length: len) {
                match = data.withUnsafeReadableBytes { Array(SHA256.hash(data: $0)) } == hash
            }
            conn.send(kind: LinkFrameKind.verifyReply.rawValue, epoch: epoch, payload: LinkMessage.verifyReply(chunk: UInt64(chunk), match: match).encode())
            if !match { self.loop.execute { self.targetMismatches.append(chunk) } }
        }
    }

    // MARK: persistence helpers

    private func persistHeader(withBitmap: Bool = false) {
        let h = header
        let bm: DirtyBitmap? = withBitmap ? bitmap : nil
        io.async {
            guard !self.dead.value else { return }
            do {
                if let bm { try self.meta.writeBitmap(bm) }
                try self.meta.writeHeader(h)
            } catch { self.loop.execute { self.metadataFailed(error) } }
        }
        publish()
    }

    private func persistPages(_ pages: [Int]) {
        guard !pages.isEmpty else { return }
        let list = pages.map { ($0, bitmap.pageBytes($0)) }
        io.async {
            guard !self.dead.value else { return }
            do { try self.meta.writeBitmapPages(list) } catch { self.loop.execute { self.metadataFailed(error) } }
        }
    }

    private func metadataFailed(_ error: Error) {
        logger.critical("disk failure: \(error)")
        onEvent?(.diskFailure("\(error)"))
    }

    private func freshGeneration() -> GenerationID {
        var g: UInt64 = 0
        while g == 0 { g = rng.next() }
        return GenerationID(g)
    }

    static func volumeError(_ e: Error) -> VolumeError {
        if let v = e as? VolumeError { return v }
        if let s = e as? StoreError { return s.errno == ENOSPC ? .noSpace : .io(errno: s.errno) }
        return .io(errno: EIO)
    }

    // MARK: status

    private func publish() {
        var s = snapshot
        s.role = role
        s.epoch = roleEpoch
        s.promisedEpoch = promisedEpoch
        s.diskState = header.diskState
        s.generations = header.generations
        let peerState: PeerReplicationState
        if let l = link {
            switch l.decision { case .inSync?: peerState = .inSync; default: peerState = .behind }
        } else { peerState = .disconnected }
        s.peerState = peerState
        if link == nil { s.peerDiskState = nil }
        s.outOfSyncBytes = bytes(ofChunks: bitmap.setChunks)
        if let r = resync { s.resyncDoneBytes = r.doneBytes; s.resyncTotalBytes = r.totalBytes }
        if let t = targetRun { s.resyncDoneBytes = t.doneBytes; s.resyncTotalBytes = max(t.totalBytes, t.doneBytes) }
        s.inFlightWrites = writes.values.filter { $0.promise != nil }.count
        s.replicationLagBytes = writes.values.filter { !$0.peerLost && $0.confirmation < .written }.reduce(UInt64(0)) { $0 + UInt64($1.bytes) }
        s.verifyRunning = verify != nil
        statusLock.lock()
        snapshot = s
        statusLock.unlock()
        if peerState != lastPeerState {
            lastPeerState = peerState
            onEvent?(.peer(peerState))
        }
        if lastDisk == nil || lastDisk!.0 != header.diskState || lastDisk!.1 != header.generations {
            lastDisk = (header.diskState, header.generations)
            onEvent?(.disk(header.diskState, header.generations))
        }
    }

    // MARK: crash simulation (tests)

    /// Drops the volume as a crash would: no flush, no metadata update, link cut.
    func simulateCrash() {
        dead.set()
        onLoop {
            self.stopped = true
            self.dialer?.stop()
            self.watchdog?.cancel()
            self.link?.conn.close()
            self.link = nil
            for w in self.writes.values { w.promise?.fail(VolumeError.shuttingDown); w.promise = nil }
            self.writes = [:]
            self.alWaiters = []
        }
    }

    // MARK: loop helpers

    /// Runs `f` on the volume's loop and waits for it (control-plane calls only).
    @discardableResult
    private func onLoop<T>(_ f: @escaping () -> T) -> T {
        if loop.inEventLoop { return f() }
        return try! loop.submit(f).wait()
    }

    private func onLoopThrowing<T>(_ f: @escaping () throws -> T) throws -> T {
        if loop.inEventLoop { return try f() }
        return try loop.submit(f).wait()
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
    public var activityLogExtents: Int = 64
    /// Resync / verify chunks in flight on the link.
    public var resyncWindowChunks: Int = 16
    /// Delay between dial attempts.
    public var redialDelay: Duration = .milliseconds(200)

    public init(cluster: String, me: NodeID, peer: NodeID, backingPath: String, metadataPath: String,
                sizeBytes: UInt64, chunkBytes: Int = 64 << 10, replicationProtocol: ReplicationProtocol = .c,
                peerReplicationAddress: (host: String, port: Int), clusterKey: SymmetricKey,
                linkTimeout: Duration = .seconds(3), resyncRateBytesPerSecond: Int = 100 << 20) {
        self.cluster = cluster; self.me = me; self.peer = peer
        self.backingPath = backingPath; self.metadataPath = metadataPath
        self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes; self.replicationProtocol = replicationProtocol
        self.peerReplicationAddress = peerReplicationAddress; self.clusterKey = clusterKey
        self.linkTimeout = linkTimeout; self.resyncRateBytesPerSecond = resyncRateBytesPerSecond
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

/// What the volume reports to the daemon (metrics, hooks, quorum core).
public enum ReplicationEvent: Sendable {
    case peer(PeerReplicationState)
    case disk(DiskState, DataGenerations)
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
    public var lastVerifyMismatches: [Int]?
    public var verifyRunning = false
    public var splitBrain: String?
    /// Why the link was last refused or closed.
    public var lastLinkError: String?
    /// Sessions that completed the authenticated hello.
    public var linksEstablished: Int = 0
    /// Frames refused by epoch fencing.
    public var fencedFrames: Int = 0
    public init() {}
}
