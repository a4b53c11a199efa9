import HACore
import NIOCore
@testable import Replication
import XCTest

/// A seeded simulation of two `ReplicationCore`s — no sockets, no threads, no clock —
/// with in-memory disks and metadata, an in-order wire per direction, and injected faults:
/// link cuts, reconnects, backup crashes (its queued I/O and in-flight frames are lost)
/// and restarts, and (in the failover runs) a primary crash with the backup promoted in a new
/// generation and the old primary returning as secondary. After every run the link heals;
/// then the primary's disk must equal the reference (all writes, in submission order; not
/// checked after a failover, where unacknowledged writes may or may not survive), the
/// backup's must equal the primary's, and an online verify must find nothing. A failure
/// names the seed that replays it.
final class LinkCoreSimulationTests: XCTestCase {
    final class SimNode {
        let name: NodeID
        var core: ReplicationCore
        /// What reads see (page cache over the device)…
        var disk: [UInt8]
        /// …and what survives a power loss: the bytes as of the last sync.
        var durable: [UInt8]
        var durableHeader: MetadataHeader
        var durableAL: [Int] = []
        var durableBitmap: DirtyBitmap
        var io: [(IOBatch, Epoch)] = []
        var alive = true
        init(name: NodeID, core: ReplicationCore, size: Int) {
            self.name = name; self.core = core; disk = [UInt8](repeating: 0, count: size); durable = disk
            durableHeader = core.header; durableBitmap = core.bitmap
        }
    }

    struct Sim {
        var rng: SplitMix64
        var now = Instant(nanoseconds: 1_000_000_000)
        let settingsA: ReplicationSettings, settingsB: ReplicationSettings
        var a: SimNode, b: SimNode
        var session: SessionID?
        var nextSession: SessionID = 1
        var wireAB: [(SessionID, UInt8, Epoch, ByteBuffer)] = []
        var wireBA: [(SessionID, UInt8, Epoch, ByteBuffer)] = []
        var timers: [(Instant, NodeID)] = []
        var reference: [UInt8]
        var nextRequest: RequestID = 1
        var pending: Set<RequestID> = []
        var failed: [String] = []
        var trace: [String] = []
        var verifyResult: [Int]?
        var primary: NodeID = "a"
        var referenceValid = true
        var failovers = 0
        var replacedDisks = 0
        var powerLosses = 0
        var withPowerLoss = false
        var invalidations = 0
        var p: SimNode { node(primary) }
        var backup: SimNode { other(primary) }

        init(seed: UInt64, proto: ReplicationProtocol) {
            rng = SplitMix64(seed: seed)
            let size = 256 * 1024
            func settings(_ me: NodeID, _ peer: NodeID) -> ReplicationSettings {
                ReplicationSettings(me: me, peer: peer, sizeBytes: UInt64(size), chunkBytes: 4096, replicationProtocol: proto,
                                    activityLogExtentBytes: 16384, activityLogExtents: 4, windowChunks: 4,
                                    resyncRateBytesPerSecond: 50 << 20)
            }
            settingsA = settings("a", "b"); settingsB = settings("b", "a")
            let h = MetadataHeader(sizeBytes: UInt64(size), chunkBytes: 4096, alExtentBytes: 16384, alSlots: 4, diskState: .upToDate,
                                   flags: [], epoch: .zero, generations: DataGenerations(current: GenerationID(0xC0FFEE)))
            let bm = DirtyBitmap(chunkCount: 64)
            a = SimNode(name: "a", core: ReplicationCore(settings: settingsA, header: h, bitmap: bm, seed: seed &+ 1), size: size)
            b = SimNode(name: "b", core: ReplicationCore(settings: settingsB, header: h, bitmap: bm, seed: seed &+ 2), size: size)
            reference = [UInt8](repeating: 0, count: size)
        }

        func node(_ n: NodeID) -> SimNode { n == "a" ? a : b }
        func other(_ n: NodeID) -> SimNode { n == "a" ? b : a }

        mutating func deliver(_ n: SimNode, _ e: CoreEvent) {
            guard n.alive else { return }
            let actions = n.core.handle(e, now: now)
            perform(n, actions)
        }

        mutating func perform(_ n: SimNode, _ actions: [CoreAction]) {
            for act in actions {
                switch act {
                case .io(let batch): n.io.append((batch, n.core.frameEpoch))
                case let .send(s, m): send(from: n, s, m, epoch: n.core.frameEpoch)
                case .close(let s): if s == session { cut("closed by \(n.name)") }
                case let .complete(id, e):
                    if pending.remove(id) != nil, let e { failed.append("request \(id): \(e)") }
                case .drained: break
                case .emit(let ev):
                    if case .verifyFinished(let mm) = ev, n.name == primary { verifyResult = mm }
                    if case .splitBrain(let why) = ev { failed.append("unexpected split brain: \(why)") }
                case .log(let level, let msg):
                    trace.append("\(now) \(n.name) \(level): \(msg)")
                case .wakeUp(let d):
                    // The gate's expiry wake-up lies days ahead: firing it would end the lease.
                    if d < .seconds(60) { timers.append((now + d, n.name)) }
                }
            }
        }

        mutating func send(from n: SimNode, _ s: SessionID, _ m: LinkMessage, epoch: Epoch) {
            guard s == session, n.alive else { return }
            let item = (s, m.kind.rawValue, epoch, m.encode())
            if n.name == "a" { wireAB.append(item) } else { wireBA.append(item) }
        }

        mutating func cut(_ why: String) {
            guard let s = session else { return }
            trace.append("\(now) link \(s) cut: \(why)")
            session = nil
            wireAB = []; wireBA = []
            deliver(a, .linkDown(s, why))
            deliver(b, .linkDown(s, why))
        }

        mutating func connect() {
            guard session == nil, a.alive, b.alive else { return }
            let s = nextSession
            nextSession += 1
            session = s
            trace.append("\(now) link \(s) up")
            deliver(a, .linkUp(s, "b"))
            deliver(b, .linkUp(s, "a"))
        }

        /// Runs the next I/O batch of `n` against its in-memory disk and metadata.
        mutating func runIO(_ n: SimNode) {
            guard n.alive, !n.io.isEmpty else { return }
            let (batch, epoch) = n.io.removeFirst()
            var extra: [IOCompletion] = []
            for step in batch.steps {
                switch step {
                case .writeAL(let hot): n.durableAL = hot
                case .writeHeader(let h): n.durableHeader = h
                case .writeBitmapPages(let pages):
                    var bytes: [UInt8] = []
                    for p in 0..<n.durableBitmap.pageCount { bytes += n.durableBitmap.pageBytes(p) }
                    for p in pages { bytes.replaceSubrange(p.index * 4096..<(p.index + 1) * 4096, with: p.bytes) }
                    n.durableBitmap = DirtyBitmap(chunkCount: n.durableBitmap.chunkCount, bytes: bytes)
                case .writeBitmap(let bm): n.durableBitmap = bm
                case let .send(s, m): send(from: n, s, m, epoch: epoch)
                case let .writeData(off, data):
                    n.disk.replaceSubrange(Int(off)..<Int(off) + data.readableBytes, with: data.readableBytesView)
                case let .writeZeroes(off, len, _):
                    n.disk.replaceSubrange(Int(off)..<Int(off) + len, with: repeatElement(0, count: len))
                case .sync: n.durable = n.disk
                case let .sendChunk(s, chunk, off, len):
                    send(from: n, s, .resyncData(chunk: UInt64(chunk), data: ByteBuffer(bytes: n.disk[Int(off)..<Int(off) + len])), epoch: epoch)
                case let .sendChunkHash(s, chunk, off, len):
                    send(from: n, s, .verifyRequest(chunk: UInt64(chunk), sha256: Self.digest(n.disk[Int(off)..<Int(off) + len])), epoch: epoch)
                case let .compareChunkHash(s, chunk, off, len, hash):
                    let match = Self.digest(n.disk[Int(off)..<Int(off) + len]) == hash
                    send(from: n, s, .verifyReply(chunk: UInt64(chunk), match: match), epoch: epoch)
                    extra.append(.verifyCompared(chunk: chunk, match: match))
                }
            }
            if let (s, ack) = batch.ack { send(from: n, s, ack.message(status: 0), epoch: epoch) }
            if let t = batch.then { deliver(n, .io(t)) }
            for e in extra { deliver(n, .io(e)) }
        }

        /// Not a cryptographic hash: the simulation only needs equal ⇔ equal bytes here.
        static func digest(_ s: ArraySlice<UInt8>) -> [UInt8] {
            var h = [UInt8](repeating: 0, count: 32)
            var x: UInt64 = 0xCBF2_9CE4_8422_2325
            for (i, byte) in s.enumerated() { x = (x ^ UInt64(byte)) &* 0x100_0000_01B3; h[i % 32] ^= UInt8(truncatingIfNeeded: x >> 29) }
            withUnsafeBytes(of: x) { for i in 0..<8 { h[i] ^= $0[i] } }
            return h
        }

        mutating func deliverWire(to n: SimNode) {
            if n.name == "b" {
                guard !wireAB.isEmpty else { return }
                let (s, k, e, p) = wireAB.removeFirst()
                deliver(b, .frame(s, kind: k, epoch: e, payload: p))
            } else {
                guard !wireBA.isEmpty else { return }
                let (s, k, e, p) = wireBA.removeFirst()
                deliver(a, .frame(s, kind: k, epoch: e, payload: p))
            }
        }

        mutating func clientWrite() {
            let len = Int(1 + rng.next() % 16) * 512
            let off = Int(rng.next() % UInt64((reference.count - len) / 512)) * 512
            let zero = rng.next() % 10 == 0
            let bytes = zero ? [UInt8](repeating: 0, count: len) : (0..<len).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            reference.replaceSubrange(off..<off + len, with: bytes)
            let id = nextRequest
            nextRequest += 1
            pending.insert(id)
            let fua = rng.next() % 8 == 0
            deliver(p, zero ? .write(id, .zeroes(mayDeallocate: true), offset: UInt64(off), length: len, fua: fua)
                            : .write(id, .data(ByteBuffer(bytes: bytes)), offset: UInt64(off), length: len, fua: fua))
        }

        /// `powerLoss`: the host loses power, not just the process: every write since the
        /// node's last sync is gone (metadata writes are synced by the store as they happen).
        mutating func crash(_ n: SimNode, powerLoss: Bool = false) {
            guard n.alive else { return }
            trace.append("\(now) \(n.name) \(powerLoss ? "loses power" : "crashes") with \(n.io.count) batches queued")
            if powerLoss { n.disk = n.durable; powerLosses += 1 }
            cut("\(n.name) crashed")
            n.alive = false
            n.io = []
            timers.removeAll { $0.1 == n.name }
        }

        mutating func crashBackup() { crash(backup, powerLoss: withPowerLoss && rng.next() % 2 == 0) }

        /// The backup's disk is replaced: it dies, comes back with a store full of someone
        /// else's bytes and new metadata (inconsistent, a random generation of its own). Only
        /// a full sync may make it up to date; the final byte comparison catches any shortcut.
        mutating func replaceBackupDisk() {
            let n = backup
            crash(n)
            n.disk = (0..<n.disk.count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            n.durable = n.disk
            var h = n.durableHeader
            h.diskState = .inconsistent
            h.flags = rng.next() % 2 == 0 ? [.fresh] : []
            h.generations = DataGenerations(current: GenerationID(rng.next() | 1))
            n.durableHeader = h
            n.durableBitmap = DirtyBitmap(chunkCount: n.durableBitmap.chunkCount)
            n.durableAL = []
            replacedDisks += 1
            trace.append("\(now) \(n.name)'s disk replaced (new metadata in \(h.generations.current))")
        }

        /// The operator invalidates the backup (`hactl invalidate`): allowed only when it is
        /// connected to its up-to-date peer; its data is then copied again in full.
        mutating func invalidateBackup() {
            let n = backup
            guard n.alive else { return }
            switch n.core.invalidate(now: now) {
            case .success(let acts):
                trace.append("\(now) \(n.name) invalidated")
                invalidations += 1
                perform(n, acts)
                if let s = session { cut("invalidate closed \(s)") }
            case .failure: break  // refused: not connected, or the peer is not up to date
            }
        }

        mutating func restartBackup() {
            let n = backup
            guard !n.alive else { return }
            let rec = CrashRecovery.open(header: n.durableHeader, activityLog: n.durableAL, bitmap: n.durableBitmap)
            n.durableHeader = rec.header
            n.durableBitmap = rec.bitmap
            n.durableAL = []
            n.core = ReplicationCore(settings: n.name == "a" ? settingsA : settingsB, header: rec.header, bitmap: rec.bitmap, seed: rng.next())
            n.alive = true
            deliver(n, .becomeSecondary(Epoch(UInt64(1 + failovers))))
            trace.append("\(now) \(n.name) restarts (\(rec.header.diskState), \(rec.bitmap.setCount) dirty)")
        }

        /// The primary dies with writes in flight; the backup, if up to date, is promoted in a
        /// new generation (the quorum outdated the old primary), and the old one returns later.
        mutating func failover() {
            let old = p, new = backup
            // Only a backup that was following may be elected: once the primary went on alone,
            // the arbitrator holds the backup's outdate mark (design.md §2) and refuses it.
            guard old.alive, new.alive, session != nil, old.core.status.peerState == .inSync,
                  new.core.status.diskState == .upToDate, failovers < 4 else { return }
            crash(old, powerLoss: withPowerLoss && rng.next() % 2 == 0)
            pending = []  // the clients of the dead primary see their connection drop
            referenceValid = false
            failovers += 1
            let epoch = Epoch(UInt64(1 + failovers))
            switch new.core.becomePrimary(epoch: epoch, newGeneration: true, now: now) {
            case .success(let acts): perform(new, acts)
            case .failure(let e): failed.append("promotion refused: \(e)")
            }
            deliver(new, .gate(WriteGate(epoch: epoch, validUntil: Instant(nanoseconds: 1 << 50), peerRequired: false)))
            primary = new.name
            trace.append("\(now) failover to \(new.name) in epoch \(epoch)")
        }

        mutating func fireTimer() {
            guard let i = timers.indices.min(by: { timers[$0].0 < timers[$1].0 }) else { return }
            let (at, n) = timers.remove(at: i)
            if at > now { now = at }
            deliver(node(n), .tick)
        }

        var quiet: Bool {
            a.io.isEmpty && b.io.isEmpty && wireAB.isEmpty && wireBA.isEmpty && pending.isEmpty
        }

        var withFailover = false
        var withDiskFaults = false

        mutating func step(faults: Bool) {
            now = now + .microseconds(Int64(rng.next() % 500))
            let r = rng.next() % 1000
            switch r {
            case 0..<180: if faults && pending.count < 24 && p.alive { clientWrite() } else { runIO(a) }
            case 180..<400: runIO(a)
            case 400..<620: runIO(b)
            case 620..<780: deliverWire(to: b)
            case 780..<940: deliverWire(to: a)
            case 940..<960: fireTimer()
            case 960..<965: if faults { if withFailover && rng.next() % 2 == 0 { failover() } else { cut("injected") } }
            case 965..<968: if faults { if withFailover && rng.next() % 2 == 0 { failover() } else { crashBackup() } }
            case 968..<985: if !faults || rng.next() % 2 == 0 { connect() }
            case 985..<988: if faults && withDiskFaults { invalidateBackup() } else { restartBackup() }
            default: restartBackup()
            }
        }
    }

    @discardableResult
    func simulate(seed: UInt64, proto: ReplicationProtocol, failover: Bool = false, diskFaults: Bool = false, powerLoss: Bool = false,
                  steps: Int = 4000) -> Int {
        var sim = Sim(seed: seed, proto: proto)
        sim.withPowerLoss = powerLoss
        sim.withFailover = failover
        sim.withDiskFaults = diskFaults
        _ = sim.a.core.becomePrimary(epoch: Epoch(1), newGeneration: false, now: sim.now).map { sim.perform(sim.a, $0) }
        sim.deliver(sim.a, .gate(WriteGate(epoch: Epoch(1), validUntil: Instant(nanoseconds: 1 << 50), peerRequired: false)))
        sim.deliver(sim.b, .promise(Epoch(1)))
        sim.connect()
        // With disk faults: a first faulty phase, settle, the backup's disk replaced on the
        // settled pair (its primary's bitmap empty, so only a full copy can repair it), then a
        // second faulty phase, settle and check again.
        for phase in 0..<(diskFaults ? 2 : 1) {
            if phase == 1 {
                sim.replaceBackupDisk()
                settleAndCheck(&sim, seed: seed, proto: proto, failover: failover)  // back at once: nothing else to resync
            }
            for _ in 0..<steps { sim.step(faults: true) }
            settleAndCheck(&sim, seed: seed, proto: proto, failover: failover)
        }
        if diskFaults { diskFaultsSeen += sim.replacedDisks + sim.invalidations }
        return sim.failovers
    }

    var diskFaultsSeen = 0

    /// Heals, runs to quiescence and checks: no lost or reordered write on the primary, the
    /// backup byte-identical, nothing out of sync, one generation, an online verify clean.
    func settleAndCheck(_ sim: inout Sim, seed: UInt64, proto: ReplicationProtocol, failover: Bool) {
        sim.restartBackup()
        var settle = 0
        while settle < 200_000 {
            sim.step(faults: false)
            settle += 1
            if sim.session == nil { sim.connect() }
            if sim.quiet && sim.session != nil && sim.p.core.status.peerState == .inSync && sim.backup.core.status.diskState == .upToDate
                && sim.timers.allSatisfy({ $0.0 <= sim.now }) { break }
        }
        let context = "seed \(seed), protocol \(proto)\(failover ? ", failover" : "")\n" + sim.trace.suffix(40).joined(separator: "\n")
        let cuts = sim.trace.filter { $0.contains("cut:") }.count, crashes = sim.trace.filter { $0.contains(" crashes with") }.count
        let sent = sim.a.core.status.resyncBytesSent + sim.b.core.status.resyncBytesSent
        print("sim seed \(seed) (\(proto)): \(sim.nextRequest - 1) writes, \(sim.nextSession - 1) sessions, \(cuts) cuts, \(crashes) crashes, \(sim.failovers) failovers, \(sim.replacedDisks) replaced disks, \(sim.invalidations) invalidations, \(sim.powerLosses) power losses, resync sent \(sent) bytes")
        XCTAssertGreaterThan(sim.nextSession, 3, "faults were injected")
        XCTAssertLessThan(settle, 200_000, "did not settle; \(context)")
        XCTAssertEqual(sim.failed, [], context)
        if sim.referenceValid { XCTAssertTrue(sim.a.disk == sim.reference, "primary lost or reordered writes; \(context)") }
        XCTAssertTrue(sim.b.disk == sim.a.disk, "backup differs after resync; \(context)")
        XCTAssertEqual(sim.p.core.status.outOfSyncBytes, 0, context)
        XCTAssertEqual(sim.b.core.header.generations.current, sim.a.core.header.generations.current, context)
        // An online verify over the settled pair finds nothing.
        sim.verifyResult = nil
        sim.deliver(sim.p, .startVerify(repair: false))
        var n = 0
        while sim.verifyResult == nil && n < 100_000 { sim.step(faults: false); n += 1 }
        XCTAssertEqual(sim.verifyResult, [], context)
    }

    var seeds: [UInt64] { ProcessInfo.processInfo.environment["HAMGR_SIM_SEED"].flatMap { UInt64($0) }.map { [$0] } ?? Array(1...24) }

    func testSeededFaultSimulation() {
        for seed in seeds { simulate(seed: seed, proto: ReplicationProtocol.allCases[Int(seed % 3)]) }
    }

    func testSeededFailoverSimulation() {
        var failovers = 0
        for seed in seeds { failovers += simulate(seed: seed + 1000, proto: ReplicationProtocol.allCases[Int(seed % 3)], failover: true) }
        if seeds.count > 1 { XCTAssertGreaterThanOrEqual(failovers, 5, "the failover runs must actually fail over") }
    }

    /// A replaced backup disk (foreign bytes, new metadata) on a settled pair, then link faults,
    /// crashes, failovers and invalidations: the comparison of both disks byte for byte (and an
    /// online verify) fails if any shortcut called a disk up to date without a full copy.
    func testSeededDiskReplacementSimulation() {
        for seed in seeds { simulate(seed: seed + 2000, proto: ReplicationProtocol.allCases[Int(seed % 3)], failover: seed % 2 == 0, diskFaults: true) }
        if seeds.count > 1 { XCTAssertGreaterThanOrEqual(diskFaultsSeen, 10, "disks must actually be replaced or invalidated") }
    }

    /// Backup hosts that lose power (every write since their last sync gone), mid-resync
    /// included: acknowledged writes and resync chunks must have been durable, or marked.
    func testSeededBackupPowerLossSimulation() {
        for seed in seeds { simulate(seed: seed + 3000, proto: ReplicationProtocol.allCases[Int(seed % 3)], powerLoss: true) }
    }

    /// Primary hosts that lose power at a failover: the returning node resyncs everything
    /// it may lack (activity log) and everything the new primary changed (bitmap).
    func testSeededPrimaryPowerLossSimulation() {
        for seed in seeds { simulate(seed: seed + 4000, proto: ReplicationProtocol.allCases[Int(seed % 3)], failover: true, powerLoss: true) }
    }

    /// The backup fences a primary whose epoch is older than the one it promised, in the core.
    func testCoreFencesOlderEpoch() {
        var sim = Sim(seed: 99, proto: .c)
        _ = sim.a.core.becomePrimary(epoch: Epoch(1), newGeneration: false, now: sim.now).map { sim.perform(sim.a, $0) }
        sim.deliver(sim.a, .gate(WriteGate(epoch: Epoch(1), validUntil: Instant(nanoseconds: 1 << 50), peerRequired: true)))
        sim.deliver(sim.b, .promise(Epoch(4)))
        sim.connect()
        for _ in 0..<50 { sim.step(faults: false) }
        XCTAssertEqual(sim.a.core.status.peerState, .inSync, "handshakes are not fenced")
        sim.clientWrite()
        for _ in 0..<400 { sim.step(faults: false) }
        XCTAssertGreaterThanOrEqual(sim.b.core.status.fencedFrames, 1)
        XCTAssertEqual(sim.pending.count, 1, "never acked: the peer is required and refused it")
        XCTAssertTrue(sim.b.disk.allSatisfy { $0 == 0 }, "nothing from the old epoch reached b")
    }
}
