import Foundation
import HACore
@testable import Replication
@testable import ReplicationShell
import XCTest

final class BitmapTests: XCTestCase {
    func testMarkReportsOnlyNewlyDirtiedPages() {
        var bm = DirtyBitmap(chunkCount: 100_000)
        XCTAssertEqual(bm.mark([5, 6, 7]), [0])
        XCTAssertEqual(bm.mark([5, 6]), [], "already dirty: no metadata write")
        XCTAssertEqual(bm.mark([32768, 70000, 7]), [1, 2])
        XCTAssertEqual(bm.setCount, 5)
        XCTAssertEqual(bm.setChunks, [5, 6, 7, 32768, 70000])
        XCTAssertEqual(bm.runs, [ChunkRun(start: 5, count: 3), ChunkRun(start: 32768, count: 1), ChunkRun(start: 70000, count: 1)])
        XCTAssertTrue(bm.clear(6)); XCTAssertFalse(bm.clear(6))
        XCTAssertEqual(bm.nextSet(from: 6), 7)
        XCTAssertEqual(bm.nextSet(from: 70001), nil)
        XCTAssertEqual(bm.mark([-1, 100_000, 200_000]), [], "out of range ignored")
    }

    func testPageBytesRoundTrip() {
        var bm = DirtyBitmap(chunkCount: 70_001)
        var rng = SplitMix64(seed: 42)
        for _ in 0..<500 { bm.mark([Int(rng.next() % 70_001)]) }
        bm.mark([70_000, 0])
        var bytes: [UInt8] = []
        for p in 0..<bm.pageCount { bytes += bm.pageBytes(p) }
        XCTAssertEqual(bytes.count, MetadataLayout.bitmapBytes(chunkCount: 70_001))
        XCTAssertEqual(DirtyBitmap(chunkCount: 70_001, bytes: bytes), bm)
    }

    func testPagesTravelAndMergeAndBitsPastTheEndAreRefused() {
        var src = DirtyBitmap(chunkCount: 100_001)
        src.mark([3, 32_767, 32_768, 100_000])
        XCTAssertEqual(src.nonEmptyPages, [0, 1, 3])
        var dst = DirtyBitmap(chunkCount: 100_001)
        dst.mark([4, 3])
        for p in src.nonEmptyPages { XCTAssertTrue(dst.merge(page: p, bytes: src.pageBytes(p))) }
        XCTAssertEqual(dst.setChunks, [3, 4, 32_767, 32_768, 100_000])
        XCTAssertEqual(dst.setCount, 5, "a bit set on both sides counts once")
        var other = DirtyBitmap(chunkCount: 100_001)
        other.mark([5, 100_000])
        var merged = dst
        XCTAssertEqual(merged.merge(other), [0])
        XCTAssertEqual(merged.setCount, 6)
        // A page past the map, or a bit past the last chunk, changes nothing.
        var before = dst
        XCTAssertFalse(before.merge(page: 4, bytes: [UInt8](repeating: 1, count: 4096)))
        var tail = [UInt8](repeating: 0, count: 4096)
        tail[(100_001 - 3 * 32_768) / 8] = 0x80  // chunk 100_007: past the end
        XCTAssertFalse(before.merge(page: 3, bytes: tail))
        XCTAssertFalse(before.merge(page: 0, bytes: [UInt8](repeating: 1, count: 100)), "short page")
        XCTAssertEqual(before, dst)
    }

    func testBitmapPersistsAcrossReopen() throws {
        let dir = try makeTempDir(self)
        let path = dir + "/m.meta"
        let h = MetadataHeader(sizeBytes: 1 << 30, chunkBytes: 65536, alExtentBytes: 4 << 20, alSlots: 64, diskState: .upToDate,
                               flags: [], epoch: .zero, generations: DataGenerations(current: GenerationID(1)))
        var bm = DirtyBitmap(chunkCount: 16384)
        XCTAssertEqual(bm.chunkCount, 16384, "1 GiB in 64 KiB chunks")
        do {
            let s = try MetadataStore(path: path, initial: h)
            let pages = bm.mark([0, 1, 9000, 16383])
            try s.writeBitmapPages(pages.map { ($0, bm.pageBytes($0)) })
        }
        let reopened = try MetadataStore(path: path, initial: h).openedBitmap
        XCTAssertEqual(reopened, bm)
        XCTAssertEqual(reopened.setChunks, [0, 1, 9000, 16383])
        do {
            let s = try MetadataStore(path: path, initial: h)
            bm.clear(9000)
            try s.writeBitmap(bm)
        }
        XCTAssertEqual(try MetadataStore(path: path, initial: h).openedBitmap.setChunks, [0, 1, 16383])
    }

    func testResyncCursorWindowAndPasses() {
        var bm = DirtyBitmap(chunkCount: 50)
        bm.mark([3, 10, 11, 40])
        var cur = ResyncCursor(window: 2)
        XCTAssertEqual(cur.take(from: bm), 3)
        XCTAssertEqual(cur.take(from: bm), 10)
        XCTAssertNil(cur.take(from: bm), "window full")
        XCTAssertTrue(cur.acked(3)); bm.clear(3)
        XCTAssertFalse(cur.acked(3))
        XCTAssertEqual(cur.take(from: bm), 11)
        XCTAssertTrue(cur.acked(10)); bm.clear(10)
        XCTAssertEqual(cur.take(from: bm), 40)
        XCTAssertNil(cur.take(from: bm))
        XCTAssertFalse(cur.passComplete(bitmap: bm))
        XCTAssertTrue(cur.acked(11)); bm.clear(11)
        XCTAssertTrue(cur.acked(40)); bm.clear(40)
        XCTAssertTrue(cur.passComplete(bitmap: bm))
    }

    func testThrottleHoldsTheRate() {
        var t = ResyncThrottle(bytesPerSecond: 1_000_000, chunkBytes: 65536)
        var now = Instant.zero
        var sent = 0
        // Simulate 2 s in 1 ms steps.
        while now.nanoseconds < 2_000_000_000 {
            if t.take(65536, now: now) == nil { sent += 65536 } else { now = now + .milliseconds(1) }
        }
        XCTAssertGreaterThan(sent, 1_900_000)
        XCTAssertLessThan(sent, 2_000_000 + 2 * 65536)
    }
}
