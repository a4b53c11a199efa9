import HACore
import NIOCore
@testable import Replication
import XCTest

/// Races inside one `ReplicationCore` found by the whole-node simulator, driven directly.
final class CoreRaceTests: XCTestCase {
    static let gen = DataGenerations(current: GenerationID(0xC0FFEE))

    static func core(_ me: NodeID, _ peer: NodeID, chunks: Int = 4) -> ReplicationCore {
        let s = ReplicationSettings(me: me, peer: peer, sizeBytes: UInt64(chunks * 4096), chunkBytes: 4096, replicationProtocol: .c,
                                    activityLogExtentBytes: 4096, activityLogExtents: 4, windowChunks: 4, resyncRateBytesPerSecond: 1 << 20)
        let h = MetadataHeader(sizeBytes: UInt64(chunks * 4096), chunkBytes: 4096, alExtentBytes: 4096, alSlots: 4, diskState: .upToDate,
                               flags: [], epoch: .zero, generations: gen)
        return ReplicationCore(settings: s, header: h, bitmap: DirtyBitmap(chunkCount: chunks), seed: 1)
    }

    static func frame(_ s: SessionID, _ m: LinkMessage, epoch: Epoch = .zero) -> CoreEvent {
        .frame(s, kind: m.kind.rawValue, epoch: epoch, payload: m.encode())
    }

    static func handshake(role: Role, crashedPrimary: Bool = false) -> LinkMessage {
        .handshake(LinkHandshake(sizeBytes: 4 * 4096, chunkBytes: 4096, generations: gen, diskState: .upToDate, role: role,
                                 crashedPrimary: crashedPrimary, discardLocal: false))
    }

    /// A peer's handshake announcing `dirty` chunks, then the bitmap frames that carry them;
    /// returns the core's actions for all of them.
    static func greet(_ core: inout ReplicationCore, session: SessionID, role: Role, crashedPrimary: Bool, dirty: [Int], chunks: Int = 4,
                      now: Instant) -> [CoreAction] {
        var map = DirtyBitmap(chunkCount: chunks)
        map.mark(dirty)
        let frames = LinkMessage.dirtyBitmapFrames(map)
        let hs = LinkMessage.handshake(LinkHandshake(sizeBytes: UInt64(chunks * 4096), chunkBytes: 4096, generations: gen, diskState: .upToDate, role: role,
                                                     crashedPrimary: crashedPrimary, discardLocal: false,
                                                     dirtyChunks: UInt64(map.setCount), dirtyPages: UInt32(frames.count)))
        return ([hs] + frames).flatMap { core.handle(frame(session, $0), now: now) }
    }

    static func hashRequests(_ actions: [CoreAction]) -> [Int] {
        actions.flatMap { a -> [Int] in
            guard case .io(let b) = a else { return [] }
            return b.steps.compactMap { if case let .sendChunkHash(_, c, _, _) = $0 { return c }; return nil }
        }
    }

    /// Seeds 782, 1477: a secondary sends its handshake, is promoted, then receives the peer's
    /// (a crashed ex-primary with dirty AL extents). Deciding on the handshake it sent (role
    /// secondary) would make the new primary a sync target. The promotion closes the open
    /// handshake instead; the redial handshakes with the role it has now.
    func testPromotionDuringTheHandshakeRestartsIt() throws {
        var a = Self.core("a", "b")
        let now = Instant(nanoseconds: 1_000_000_000)
        _ = a.handle(.linkUp(1, "b"), now: now)
        let promoted = try a.becomePrimary(epoch: Epoch(2), newGeneration: false, now: now).get()
        XCTAssertTrue(promoted.contains { if case .close(1) = $0 { return true }; return false }, "the open handshake is closed")
        _ = Self.greet(&a, session: 1, role: .secondary, crashedPrimary: true, dirty: [0, 1, 2, 3], now: now)
        XCTAssertEqual(a.status.diskState, .upToDate, "the primary never becomes a sync target")
        // The next session decides on the current role: this primary is the source.
        _ = a.handle(.linkUp(2, "b"), now: now)
        let acts = Self.greet(&a, session: 2, role: .secondary, crashedPrimary: true, dirty: [0, 1, 2, 3], now: now)
        XCTAssertEqual(a.status.diskState, .upToDate)
        XCTAssertTrue(acts.contains { if case .log(_, let m) = $0 { return m.contains("sync source") }; return false })
    }

    /// Seeds 3183, 4667, 5393: a flush sent, the link gone before the peer answered it (the
    /// peer refused its frame's epoch), and the link back at once with nothing dirty on
    /// either side. No resync runs and the arbitrator is never asked to outdate a peer in
    /// sync, so the flush waited for ever; a handshake that finds the peer in sync now
    /// counts it as done there (every write before it that the peer had not synced would
    /// have been marked).
    func testFlushCaughtByALinkDropIsAnsweredWhenTheLinkComesBackInSync() throws {
        var a = Self.core("a", "b")
        let now = Instant(nanoseconds: 1_000_000_000)
        _ = try a.becomePrimary(epoch: Epoch(1), newGeneration: false, now: now).get()
        _ = a.handle(.gate(WriteGate(epoch: Epoch(1), validUntil: now + .seconds(60), peerRequired: true)), now: now)
        _ = a.handle(.linkUp(1, "b"), now: now)
        _ = Self.greet(&a, session: 1, role: .secondary, crashedPrimary: false, dirty: [], now: now)
        XCTAssertEqual(a.status.peerState, .inSync)
        let flushed = a.handle(.flush(7), now: now)
        let local = flushed.compactMap { if case .io(let b) = $0 { return b.then }; return nil }
        XCTAssertFalse(local.isEmpty, "the flush's local sync")
        var acts: [CoreAction] = []
        for c in local { acts += a.handle(.io(c), now: now) }
        acts += a.handle(.linkDown(1, "refused: fenced flush frame"), now: now)
        for c in acts.compactMap({ a in if case .io(let b) = a { return b.then }; return nil }) { acts += a.handle(.io(c), now: now) }
        func answered(_ xs: [CoreAction]) -> Bool { xs.contains { if case .complete(7, nil) = $0 { return true }; return false } }
        XCTAssertFalse(answered(acts), "not before the peer is back or outdated")
        _ = a.handle(.linkUp(2, "b"), now: now)
        let back = Self.greet(&a, session: 2, role: .secondary, crashedPrimary: false, dirty: [], now: now)
        XCTAssertEqual(a.status.peerState, .inSync)
        XCTAssertTrue(answered(back), "answered once the link is back in sync: \(back)")
    }

    /// Seed 693: a secondary verifying against a writing primary. The primary wrote chunk 1
    /// (and sent it) after the secondary had read its hash of chunk 1, so the primary's
    /// compare says "differs". That mismatch is checked again behind the write; it is not reported.
    func testSecondaryVerifyRechecksAChunkWrittenWhileItsHashWasOut() throws {
        var a = Self.core("a", "b")
        let now = Instant(nanoseconds: 1_000_000_000)
        _ = a.handle(.linkUp(1, "b"), now: now)
        _ = a.handle(Self.frame(1, Self.handshake(role: .primary)), now: now)
        XCTAssertEqual(a.status.peerState, .inSync)
        let started = a.handle(.startVerify(repair: false), now: now)
        XCTAssertEqual(Self.hashRequests(started), [0, 1, 2, 3])
        // The primary's write of chunk 1 arrives while the hash of chunk 1 is out.
        _ = a.handle(Self.frame(1, .write(seq: 1, offset: 4096, flags: [], length: 4096, data: ByteBuffer(bytes: [UInt8](repeating: 7, count: 4096)))), now: now)
        _ = a.handle(Self.frame(1, .verifyReply(chunk: 0, match: true)), now: now)
        let raced = a.handle(Self.frame(1, .verifyReply(chunk: 1, match: false)), now: now)
        XCTAssertEqual(Self.hashRequests(raced), [1], "the raced chunk is hashed again")
        _ = a.handle(Self.frame(1, .verifyReply(chunk: 2, match: true)), now: now)
        _ = a.handle(Self.frame(1, .verifyReply(chunk: 3, match: true)), now: now)
        XCTAssertTrue(a.status.verifyRunning, "the verify waits for the second hash of chunk 1")
        let end = a.handle(Self.frame(1, .verifyReply(chunk: 1, match: true)), now: now)
        XCTAssertFalse(a.status.verifyRunning)
        XCTAssertEqual(a.status.lastVerifyMismatches, [])
        XCTAssertTrue(end.contains { if case .emit(.verifyFinished(let mm)) = $0 { return mm.isEmpty }; return false })

        // A mismatch of a chunk nobody wrote meanwhile is still reported.
        _ = a.handle(.startVerify(repair: false), now: now)
        for c in 0..<4 { _ = a.handle(Self.frame(1, .verifyReply(chunk: UInt64(c), match: c != 2)), now: now) }
        XCTAssertEqual(a.status.lastVerifyMismatches, [2])
    }

    /// A reload of `volume.resync_rate` (issue 12): the core takes the new cap at once; a
    /// running resync goes on at it (a fresh throttle) and says so.
    func testResyncRateChangesLive() throws {
        var a = Self.core("a", "b", chunks: 64)
        let now = Instant(nanoseconds: 1_000_000_000)
        XCTAssertTrue(a.setResyncRate(4 << 20, now: now).isEmpty, "nothing to pace yet")
        XCTAssertEqual(a.settings.resyncRateBytesPerSecond, 4 << 20)
        _ = try a.becomePrimary(epoch: Epoch(2), newGeneration: false, now: now).get()
        _ = a.handle(.linkUp(1, "b"), now: now)
        let acts = Self.greet(&a, session: 1, role: .secondary, crashedPrimary: true, dirty: Array(0..<64), chunks: 64, now: now)
        XCTAssertTrue(acts.contains { if case .log(_, let m) = $0 { return m.contains("sync source") && m.contains("4194304 B/s") }; return false }, "\(acts)")
        let changed = a.setResyncRate(8 << 20, now: now + .milliseconds(1))
        XCTAssertEqual(a.settings.resyncRateBytesPerSecond, 8 << 20)
        XCTAssertTrue(changed.contains { if case .log(_, let m) = $0 { return m.contains("resync rate now ≤ 8388608 B/s") }; return false }, "\(changed)")
        XCTAssertTrue(a.setResyncRate(8 << 20, now: now).isEmpty, "the same rate again changes nothing")
    }
}
