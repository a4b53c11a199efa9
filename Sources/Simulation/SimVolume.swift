import HACore
import NIOCore
import NodeRuntime
import Replication

/// One node's replicated volume in the simulator: the real `ReplicationCore`, carried out
/// through the shared `perform(_:on:)` against a simulated disk, I/O queue and link. It is the
/// `NodeVolume` the node's `NodeRuntime` drives, exactly as the daemon drives
/// `ReplicatedVolume`.
final class SimVolume: NodeVolume, ReplicationHost {
    unowned let node: SimNode
    private(set) var core: ReplicationCore
    private var sim: Simulator { node.sim }
    private var disk: SimDisk { node.disk }

    /// The serial I/O queue: batches with the frame epoch they were queued under.
    private var io: [(batch: IOBatch, epoch: Epoch)] = []
    private var ioHead = 0
    private var ioScheduled = false
    private var drains: [RequestID: @Sendable (Result<Void, Error>) -> Void] = [:]
    private var nextRequest: RequestID = 1
    /// Client requests in flight (what the model needs to know when they complete).
    var requests: [RequestID: ClientOp] = [:]
    /// When each request was submitted (real time) and the node's suspension count then.
    var asked: [RequestID: (Int64, Int)] = [:]
    private(set) var halted = false

    /// Opens the metadata as `ReplicatedVolume.init` does: create it fresh (inconsistent, a
    /// random generation, flagged fresh) when there is none, otherwise read it back and apply
    /// crash recovery (AL extents of an unclean primary become dirty), then persist that.
    init(node: SimNode, settings: ReplicationSettings, seed: UInt64) {
        self.node = node
        var rng = SplitMix64(seed: seed)
        func nonzero() -> UInt64 { var g: UInt64 = 0; while g == 0 { g = rng.next() }; return g }
        let chunks = settings.chunkCount
        let disk = node.disk
        if !disk.hasMetadata {
            let initial = MetadataHeader(sizeBytes: settings.sizeBytes, chunkBytes: UInt32(settings.chunkBytes),
                                         alExtentBytes: UInt32(settings.activityLogExtentBytes), alSlots: UInt32(settings.activityLogExtents),
                                         diskState: .inconsistent, flags: [.fresh], epoch: .zero,
                                         generations: DataGenerations(current: GenerationID(nonzero())), diskID: nonzero())
            disk.createMetadata(initial, chunkCount: chunks)
        }
        guard let opened = disk.openMetadata(chunkCount: chunks) else {
            preconditionFailure("simulated metadata of \(node.name) unreadable")
        }
        let rec = CrashRecovery.open(header: opened.header, activityLog: opened.al, bitmap: opened.bitmap)
        // Bits first, then the empty AL, then the header (as ReplicatedVolume.init).
        try? disk.writeBitmapPages(rec.dirtyPages.map { ($0, rec.bitmap.pageBytes($0)) })
        try? disk.writeAL([])
        try? disk.writeHeader(rec.header)
        let emptyFresh = rec.header.flags.contains(.fresh) && !disk.everWritten
        core = ReplicationCore(settings: settings, header: rec.header, bitmap: rec.bitmap, seed: rng.next(), emptyFresh: emptyFresh)
        if rec.recoveredChunks > 0 { sim.trace("\(node.name) crash recovery: \(rec.recoveredChunks) AL chunks marked out of sync") }
    }

    var status: ReplicationStatus { core.status }
    /// Nothing queued for the disk.
    var ioIdle: Bool { ioHead >= io.count }

    /// Feeds one event to the core and carries out its actions.
    func run(_ event: CoreEvent) {
        guard !halted else { return }
        let actions = core.handle(event, now: node.localNow())
        perform(actions, on: self)
    }

    // MARK: NodeVolume (what the runtime calls)

    func setWriteGate(_ gate: WriteGate) { run(.gate(gate)) }
    func setPromisedEpoch(_ epoch: Epoch) { run(.promise(epoch)) }

    func becomePrimary(epoch: Epoch, newGeneration: Bool) throws {
        guard !halted else { throw VolumeError.shuttingDown }
        switch core.becomePrimary(epoch: epoch, newGeneration: newGeneration, now: node.localNow()) {
        case .failure(let e):
            sim.trace("\(node.name) volume refuses promotion: \(e)")
            throw e
        case .success(let actions):
            perform(actions, on: self)
            drainIO()  // the daemon waits for the I/O queue: the header naming the epoch is durable
            sim.promoted(node, epoch: epoch, newGeneration: newGeneration)
        }
    }

    func becomeSecondary(epoch: Epoch) { run(.becomeSecondary(epoch)) }

    func drainForSwitchover(_ done: @escaping @Sendable (Result<Void, Error>) -> Void) {
        guard !halted else { return done(.failure(VolumeError.shuttingDown)) }
        let id = nextRequest
        nextRequest += 1
        drains[id] = done
        run(.drain(id))
    }

    func cancelDrain() { run(.cancelDrain) }
    func startVerify(repair: Bool) { run(.startVerify(repair: repair)) }
    func requestResync() { run(.requestResync) }

    func bootstrap(assumeClean: Bool) throws {
        guard !halted else { throw VolumeError.shuttingDown }
        switch core.bootstrap(assumeClean: assumeClean, now: node.localNow()) {
        case .failure(let e): throw e
        case .success(let actions):
            perform(actions, on: self)
            drainIO()
            sim.bootstrapped(node)
        }
    }

    func invalidate() throws {
        guard !halted else { throw VolumeError.shuttingDown }
        switch core.invalidate(now: node.localNow()) {
        case .failure(let e): throw e
        case .success(let actions):
            perform(actions, on: self)
            drainIO()
        }
    }

    func resolveSplitBrain(discardLocal: Bool) { run(.resolveSplitBrain(discardLocal: discardLocal)) }

    /// Clean stop (an operator's restart): fail what is pending, make everything durable.
    func stop() {
        run(.stop)
        drainIO()
        halted = true
    }

    // MARK: client requests

    func submit(_ op: ClientOp) {
        guard !halted else { return }
        let id = nextRequest
        nextRequest += 1
        requests[id] = op
        asked[id] = (sim.now, node.suspensions)
        switch op {
        case let .write(chunk, tag, _, fua):
            let offset = UInt64(chunk * disk.chunkBytes)
            if tag == 0 {
                run(.write(id, .zeroes(mayDeallocate: true), offset: offset, length: disk.chunkBytes, fua: fua))
            } else {
                run(.write(id, .data(Pattern.buffer(tag: tag, bytes: disk.chunkBytes)), offset: offset, length: disk.chunkBytes, fua: fua))
            }
        case .flush:
            run(.flush(id))
        }
    }

    /// A read as `ReplicatedVolume.read` serves it: primary with a lease valid now.
    func read(chunk: Int) -> [UInt8]? {
        guard !halted, core.role == .primary, core.gate.allowsAck(at: node.localNow()) else { return nil }
        return disk.read(offset: chunk * disk.chunkBytes, length: disk.chunkBytes)
    }

    // MARK: the link (from the simulated network)

    func linkUp(_ session: SessionID, peer: NodeID) { run(.linkUp(session, peer)) }
    func linkDown(_ session: SessionID, _ why: String) { run(.linkDown(session, why)) }
    func frame(_ session: SessionID, kind: UInt8, epoch: Epoch, payload: ByteBuffer) {
        run(.frame(session, kind: kind, epoch: epoch, payload: payload))
    }

    // MARK: ReplicationHost

    var frameEpoch: Epoch { core.frameEpoch }

    func runIO(_ batch: IOBatch, epoch: Epoch) {
        io.append((batch, epoch))
        scheduleIO()
    }

    func sendControl(_ message: LinkMessage, on session: SessionID, epoch: Epoch) {
        sim.link.send(from: node.index, session: session, message, epoch: epoch)
    }

    func closeSession(_ session: SessionID) { sim.link.close(session, by: node.index) }

    func complete(_ request: RequestID, _ error: VolumeError?) {
        guard let op = requests.removeValue(forKey: request) else { return }
        if let (since, suspensions) = asked.removeValue(forKey: request) {
            sim.answered(node, op, since: since, suspensions: suspensions, error: error)
        }
        sim.completed(node, op, error: error, epoch: core.gate.epoch)
    }

    func drained(_ request: RequestID, _ error: VolumeError?) {
        guard let done = drains.removeValue(forKey: request) else { return }
        if let error { done(.failure(error)) } else { done(.success(())) }
    }

    func emit(_ event: ReplicationEvent) {
        // The daemon hands volume events to the control queue (a hop, never a nested call).
        let n = node
        sim.onNode(n, after: 0) { n.runtime?.volumeEvent(event) }
        if case .splitBrain(let why) = event { sim.trace("\(n.name) SPLIT BRAIN: \(why)") }
    }

    func log(_ level: CoreLogLevel, _ message: String) {
        sim.trace("\(node.name) repl \(level): \(message)")
    }

    func wakeUp(after delay: Duration) {
        let n = node
        sim.onNode(n, afterLocal: delay.nanosecondsClamped) { [weak self] in
            guard let self, n.vol === self else { return }
            self.run(.tick)
        }
    }

    // MARK: the I/O queue

    private func scheduleIO() {
        guard !ioScheduled, ioHead < io.count, !halted else { return }
        ioScheduled = true
        let n = node
        let hasSync = io[ioHead].batch.steps.contains { if case .sync = $0 { return true }; return false }
        let latency = sim.ioLatency(sync: hasSync)
        sim.onNode(n, after: latency) { [weak self] in
            guard let self, n.vol === self else { return }
            self.ioScheduled = false
            self.runNextBatch()
            self.scheduleIO()
        }
    }

    private func runNextBatch() {
        guard ioHead < io.count, !halted else { return }
        let (batch, epoch) = io[ioHead]
        ioHead += 1
        if ioHead > 64 { io.removeFirst(ioHead); ioHead = 0 }
        execute(batch, epoch: epoch)
    }

    /// Runs every queued batch now (the daemon's `io.sync {}` after a control command).
    private func drainIO() {
        while ioHead < io.count, !halted { runNextBatch() }
    }

    /// One batch on the I/O queue: steps in order, stop at the first failure; then the ack
    /// (status 0 or the errno), then the completions back to the core.
    private func execute(_ b: IOBatch, epoch: Epoch) {
        var failure: (String, Int32)?
        var extra: [IOCompletion] = []
        let link: ReplicationLink = sim.link
        let me = node.index
        for step in b.steps {
            do {
                switch step {
                case .writeAL(let hot): try disk.writeAL(hot)
                case .writeHeader(let h): try disk.writeHeader(h)
                case .writeBitmapPages(let pages): try disk.writeBitmapPages(pages.map { ($0.index, $0.bytes) })
                case .writeBitmap(let bm): try disk.writeBitmapPages((0..<bm.pageCount).map { ($0, bm.pageBytes($0)) })
                case let .send(s, m):
                    if case .write = m { sim.writeQueued(me, m) }
                    link.send(from: me, session: s, m, epoch: epoch)
                case let .writeData(offset, data): try disk.write(offset: Int(offset), bytes: Array(data.readableBytesView))
                case let .writeZeroes(offset, length, _): try disk.write(offset: Int(offset), bytes: [UInt8](repeating: 0, count: length))
                case .sync: try disk.sync()
                case let .sendChunk(s, chunk, offset, length):
                    let bytes = disk.read(offset: Int(offset), length: length)
                    link.send(from: me, session: s, LinkMessage.resyncChunk(UInt64(chunk), ByteBuffer(bytes: bytes)), epoch: epoch)
                case let .sendChunkHash(s, chunk, offset, length):
                    let d = SimDigest.of(disk.current[Int(offset)..<Int(offset) + length])
                    link.send(from: me, session: s, .verifyRequest(chunk: UInt64(chunk), sha256: d), epoch: epoch)
                case let .compareChunkHash(s, chunk, offset, length, hash):
                    let match = SimDigest.of(disk.current[Int(offset)..<Int(offset) + length]) == hash
                    link.send(from: me, session: s, .verifyReply(chunk: UInt64(chunk), match: match), epoch: epoch)
                    extra.append(.verifyCompared(chunk: chunk, match: match))
                }
            } catch {
                failure = ("\(error)", (error as? SimDisk.IOError)?.errno ?? 5)
                break
            }
        }
        if let (s, ack) = b.ack { link.send(from: me, session: s, ack.message(status: failure?.1 ?? 0), epoch: epoch) }
        if let (why, errno) = failure {
            sim.trace("\(node.name) I/O FAILED: \(why)")
            run(.ioFailed(b.failure, why, errno: errno))
        } else {
            if let t = b.then { run(.io(t)) }
            for e in extra { run(.io(e)) }
        }
    }
}

/// What a client asked for (the model's view of a request).
enum ClientOp {
    /// Tag 0 = write zeroes (trim); otherwise the chunk is filled with the tag's pattern.
    case write(chunk: Int, tag: UInt64, index: Int, fua: Bool)
    case flush(submittedAt: Int64)
}

/// Chunk contents: the tag repeated as little-endian u64s, so one chunk's bytes name the
/// write that produced them and a comparison is cheap.
enum Pattern {
    static func bytes(tag: UInt64, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        guard tag != 0 else { return out }
        out.withUnsafeMutableBytes { raw in
            for i in 0..<(count / 8) { raw.storeBytes(of: tag.littleEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
        return out
    }

    static func buffer(tag: UInt64, bytes count: Int) -> ByteBuffer { ByteBuffer(bytes: bytes(tag: tag, count: count)) }

    /// The tag a chunk holds, or nil when its bytes are no single write's pattern (torn, mixed).
    static func tag(of chunk: ArraySlice<UInt8>) -> UInt64? {
        guard chunk.count >= 8 else { return nil }
        var first: UInt64 = 0
        chunk.withUnsafeBytes { first = UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        var ok = true
        chunk.withUnsafeBytes { raw in
            var i = 8
            while i + 8 <= raw.count {
                if UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != first { ok = false; return }
                i += 8
            }
        }
        return ok ? first : nil
    }
}
