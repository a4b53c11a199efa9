import Foundation
import HACore
import NIOCore
@testable import Replication
@testable import ReplicationShell
import XCTest

/// The link at volume sizes where the dirty bitmap no longer fits one frame (issue 13): a
/// fragmented bitmap of a 1 TiB volume in 4 KiB chunks. ≈3 M isolated dirty chunks as a
/// list of runs in the handshake were 36 MB, over the 32 MiB frame limit, and every
/// reconnect failed; the bitmap now follows the handshake in frames of 256 pages.
final class LargeVolumeTests: XCTestCase {
    static let size: UInt64 = 1 << 40
    static let chunk = 4096
    static let chunks = Int(size / UInt64(chunk))
    static func dirty(every stride: Int) -> DirtyBitmap {
        var map = DirtyBitmap(chunkCount: chunks)
        map.mark(Swift.stride(from: 0, to: chunks, by: stride))
        return map
    }

    static func core(_ me: NodeID, _ peer: NodeID, dirty: DirtyBitmap) -> ReplicationCore {
        let s = ReplicationSettings(me: me, peer: peer, sizeBytes: size, chunkBytes: chunk, replicationProtocol: .c,
                                    activityLogExtentBytes: 4 << 20, activityLogExtents: 64, windowChunks: 64, resyncRateBytesPerSecond: 1 << 30)
        let h = MetadataHeader(sizeBytes: size, chunkBytes: UInt32(chunk), alExtentBytes: 4 << 20, alSlots: 64, diskState: .upToDate,
                               flags: [], epoch: .zero, generations: DataGenerations(current: GenerationID(0xC0FFEE)))
        return ReplicationCore(settings: s, header: h, bitmap: dirty, seed: 1)
    }

    /// Pure cores: the secondary's bitmap crosses in frames within the limit, every bit
    /// arrives, and the primary's decision covers all of them.
    func testAFragmentedBitmapOfATebibyteVolumeCrossesTheLinkInFrames() throws {
        // Every 89th chunk: ≈3 M isolated bits, in every page of the bitmap.
        let dirty = Self.dirty(every: 89)
        XCTAssertGreaterThanOrEqual(dirty.setCount, 3_000_000)
        XCTAssertGreaterThan(dirty.runs.count * 12, Frame.maxPayloadBytes, "as runs, this bitmap would not fit one frame")
        var a = Self.core("a", "b", dirty: DirtyBitmap(chunkCount: Self.chunks))
        var b = Self.core("b", "a", dirty: dirty)
        let now = Instant(nanoseconds: 1_000_000_000)
        _ = try a.becomePrimary(epoch: Epoch(1), newGeneration: false, now: now).get()
        _ = a.handle(.linkUp(1, "b"), now: now)
        var frames = 0
        var aActions: [CoreAction] = []
        for action in b.handle(.linkUp(1, "a"), now: now) {
            guard case .send(_, let m) = action else { continue }
            let payload = m.encode()
            XCTAssertLessThanOrEqual(payload.readableBytes, Frame.maxPayloadBytes, "\(m.kind) frame over the limit")
            frames += 1
            aActions += a.handle(.frame(1, kind: m.kind.rawValue, epoch: .zero, payload: payload), now: now)
        }
        XCTAssertGreaterThan(frames, 2, "the bitmap came in pieces")
        let logs = aActions.compactMap { a -> String? in if case .log(_, let m) = a { return m }; return nil }
        XCTAssertTrue(logs.contains { $0.contains("sync source (bitmap)") }, "\(logs)")
        XCTAssertTrue(logs.contains { $0.contains("resync source: \(dirty.setCount) chunks") }, "\(logs)")
        XCTAssertEqual(a.status.peerState, .behind)
    }

    /// A piece of a bitmap after the decision, a page past the volume, or pages that do not
    /// add up to the handshake's count: the link is refused, nothing is merged.
    func testBitmapPiecesOutsideTheHandshakeAreRefused() throws {
        let now = Instant(nanoseconds: 1_000_000_000)
        func handshake(dirtyChunks: UInt64, dirtyPages: UInt32) -> LinkMessage {
            .handshake(LinkHandshake(sizeBytes: 1 << 30, chunkBytes: 4096, generations: DataGenerations(current: GenerationID(0xC0FFEE)),
                                     diskState: .upToDate, role: .secondary, crashedPrimary: false, discardLocal: false,
                                     dirtyChunks: dirtyChunks, dirtyPages: dirtyPages))
        }
        func fresh() -> ReplicationCore {
            let s = ReplicationSettings(me: "a", peer: "b", sizeBytes: 1 << 30, chunkBytes: 4096, replicationProtocol: .c,
                                        activityLogExtentBytes: 4 << 20, activityLogExtents: 8, windowChunks: 8, resyncRateBytesPerSecond: 1 << 20)
            let h = MetadataHeader(sizeBytes: 1 << 30, chunkBytes: 4096, alExtentBytes: 4 << 20, alSlots: 8, diskState: .upToDate,
                                   flags: [], epoch: .zero, generations: DataGenerations(current: GenerationID(0xC0FFEE)))
            var c = ReplicationCore(settings: s, header: h, bitmap: DirtyBitmap(chunkCount: 1 << 18), seed: 1)
            _ = c.handle(.linkUp(1, "b"), now: now)
            return c
        }
        func send(_ c: inout ReplicationCore, _ m: LinkMessage) -> [CoreAction] {
            c.handle(.frame(1, kind: m.kind.rawValue, epoch: .zero, payload: m.encode()), now: now)
        }
        func refused(_ acts: [CoreAction]) -> String? {
            acts.lazy.compactMap { a -> String? in if case .send(_, .refuse(let why)) = a { return why }; return nil }.first
        }
        let page = BitmapPage(index: 0, bytes: [1] + [UInt8](repeating: 0, count: 4095))
        // Before any handshake.
        var c = fresh()
        XCTAssertNotNil(refused(send(&c, .dirtyBitmap([page]))))
        // After a handshake that announced none.
        c = fresh()
        XCTAssertNil(refused(send(&c, handshake(dirtyChunks: 0, dirtyPages: 0))))
        XCTAssertNotNil(refused(send(&c, .dirtyBitmap([page]))))
        // A page past the volume (1 GiB in 4 KiB chunks: 8 pages).
        c = fresh()
        _ = send(&c, handshake(dirtyChunks: 1, dirtyPages: 1))
        XCTAssertEqual(refused(send(&c, .dirtyBitmap([BitmapPage(index: 8, bytes: page.bytes)]))), "dirty bitmap page 8 outside the volume's 8 pages")
        // More pages than announced.
        c = fresh()
        _ = send(&c, handshake(dirtyChunks: 2, dirtyPages: 1))
        XCTAssertNotNil(refused(send(&c, .dirtyBitmap([page, BitmapPage(index: 1, bytes: page.bytes)]))))
        // Pages whose bits do not add up to the announced count.
        c = fresh()
        _ = send(&c, handshake(dirtyChunks: 2, dirtyPages: 1))
        XCTAssertEqual(refused(send(&c, .dirtyBitmap([page]))), "the peer's dirty bitmap holds 1 chunks; its handshake said 2")
        // Dirty chunks announced without pages.
        c = fresh()
        XCTAssertNotNil(refused(send(&c, handshake(dirtyChunks: 5, dirtyPages: 0))))
        // Other frames wait for the decision, as before.
        c = fresh()
        _ = send(&c, handshake(dirtyChunks: 1, dirtyPages: 1))
        XCTAssertNotNil(refused(send(&c, .flush(id: 1))))
    }

    /// Real volumes on two 1 TiB sparse files: the secondary comes back with 1 M isolated
    /// dirty chunks (its bitmap written as a crash would leave it); the link comes up, the
    /// primary resyncs every one, and both stores stay sparse (zero chunks travel as
    /// `resyncZeroes`). A sample of the chunks carries data on the primary.
    func testATebibyteVolumeWithAFragmentedBitmapReconnectsAndResyncs() throws {
        let pair = try VolumePair(test: self, fresh: true)
        pair.sizeBytes = Self.size
        pair.chunkBytes = Self.chunk
        pair.resyncRate = 1 << 40
        try pair.pairUp()
        // b's bitmap: every 89th chunk, as a secondary that crashed while its peer wrote
        // would hold them (the bitmap area is little-endian 64-bit words).
        // Every 268th chunk: 1.0 M isolated bits (a debug build resyncs them in ≈3 min).
        let stride = 268
        let dirty = Self.dirty(every: stride)
        XCTAssertGreaterThanOrEqual(dirty.setCount, 1_000_000)
        let meta = try XCTUnwrap(FileHandle(forWritingAtPath: pair.path("b", "meta")))
        try meta.seek(toOffset: MetadataLayout.bitmapOffset)
        for p in 0..<dirty.pageCount { try meta.write(contentsOf: dirty.pageBytes(p)) }
        try meta.synchronize()
        try meta.close()
        // A sample of those chunks holds data on a only.
        let sample = Swift.stride(from: 0, to: Self.chunks, by: stride * 997).prefix(1000).map { $0 }
        let img = try XCTUnwrap(FileHandle(forWritingAtPath: pair.path("a", "img")))
        for c in sample {
            try img.seek(toOffset: UInt64(c) * UInt64(Self.chunk))
            try img.write(contentsOf: Data((0..<Self.chunk).map { UInt8(truncatingIfNeeded: $0 &+ c) }))
        }
        try img.synchronize()
        try img.close()

        let started = ContinuousClock.now
        try pair.connectPrimary(timeout: .seconds(600))
        let took = ContinuousClock.now - started
        let a = try XCTUnwrap(pair.a), b = try XCTUnwrap(pair.b)
        XCTAssertEqual(b.status.diskState, .upToDate)
        XCTAssertTrue(pair.logs.contains("resync source: \(dirty.setCount) chunks"), "a resynced every dirty chunk of b")
        XCTAssertEqual(a.status.resyncDoneBytes, UInt64(dirty.setCount * Self.chunk))
        let bImg = try XCTUnwrap(FileHandle(forReadingAtPath: pair.path("b", "img")))
        defer { try? bImg.close() }
        var wrong: [Int] = []
        for c in sample {
            try bImg.seek(toOffset: UInt64(c) * UInt64(Self.chunk))
            let got = try XCTUnwrap(bImg.read(upToCount: Self.chunk))
            if Array(got) != (0..<Self.chunk).map({ UInt8(truncatingIfNeeded: $0 &+ c) }) { wrong.append(c) }
        }
        XCTAssertEqual(wrong.count, 0, "chunks without a's data on b: \(wrong.prefix(5))…")
        var st = stat()
        XCTAssertEqual(stat(pair.path("b", "img"), &st), 0)
        XCTAssertLessThan(Int(st.st_blocks) * 512, 64 << 20, "the target stayed sparse")
        print("1 TiB, \(dirty.setCount) dirty chunks: link up and resynced in \(took)")
    }
}
