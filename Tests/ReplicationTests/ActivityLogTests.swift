import HACore
@testable import Replication
@testable import ReplicationShell
import XCTest

final class ActivityLogTests: XCTestCase {
    func testColdExtentNeedsPersistHotDoesNot() {
        var al = ActivityLog(capacity: 3)
        XCTAssertEqual(al.begin([1], tag: 0), .persist([1]))
        XCTAssertEqual(al.begin([1], tag: 0), .hot)
        XCTAssertEqual(al.begin([1, 2], tag: 0), .persist([1, 2]))
        al.end([1]); al.end([1]); al.end([1, 2])
        XCTAssertEqual(al.busyWrites, 0)
    }

    func testEvictsOnlyIdleLeastRecentlyUsed() {
        var al = ActivityLog(capacity: 2)
        XCTAssertEqual(al.begin([1], tag: 0), .persist([1]))
        XCTAssertEqual(al.begin([2], tag: 0), .persist([1, 2]))
        // Both busy: a third extent cannot come in.
        XCTAssertEqual(al.begin([3], tag: 0), .full)
        XCTAssertEqual(al.hotExtents, [1, 2], "a refused admission changes nothing")
        al.end([1])
        XCTAssertEqual(al.begin([3], tag: 0), .needsBarrier(tag: 0), "idle extent 1 is not yet durable on both nodes")
        al.durable(throughBarrier: 0)
        XCTAssertEqual(al.begin([3], tag: 1), .persist([2, 3]), "idle extent 1 evicted")
        al.end([2]); al.end([3])
        _ = al.begin([2], tag: 1); al.end([2])  // 2 is now most recent
        al.durable(throughBarrier: 1)
        XCTAssertEqual(al.begin([4], tag: 0), .persist([2, 4]), "LRU idle extent 3 evicted")
        XCTAssertEqual(al.begin([5, 6, 7], tag: 0), .full, "more extents than capacity")
    }

    /// Whole-node simulator, primary power loss (seeds 155, 1854 with the old
    /// `--primary-power-loss`): an extent leaves the log only once a barrier after its newest
    /// write completed on both nodes — written at the peer is not durable anywhere.
    func testEvictsOnlyExtentsDurableOnBothNodes() {
        var al = ActivityLog(capacity: 2)
        XCTAssertEqual(al.begin([1], tag: 0), .persist([1]))
        XCTAssertEqual(al.begin([2], tag: 1), .persist([1, 2]))
        al.end([1]); al.end([2])
        XCTAssertEqual(al.begin([3], tag: 1), .needsBarrier(tag: 0), "both idle, neither durable: the LRU one needs barrier 0")
        al.durable(throughBarrier: 0)
        XCTAssertEqual(al.begin([3], tag: 1), .persist([2, 3]), "extent 1 (tag 0) is durable; 2 (tag 1) stays")
        al.end([3])
        XCTAssertEqual(al.begin([4], tag: 2), .needsBarrier(tag: 1))
        al.durable(throughBarrier: 1)
        XCTAssertEqual(al.begin([4], tag: 2), .persist([3, 4]))
        XCTAssertEqual(al.begin([2], tag: 2), .persist([2, 4]), "3 is idle and durable; busy 4 stays")
    }

    func testReopenedHotSetAndExtentMath() {
        let al = ActivityLog(capacity: 4, hot: [9, 3])
        XCTAssertEqual(al.hotExtents, [3, 9])
        XCTAssertEqual(ActivityLog.extents(offset: 4 << 20 - 1, length: 2, extentBytes: 4 << 20), [0, 1])
        XCTAssertEqual(ActivityLog.extents(offset: 0, length: 0, extentBytes: 4 << 20), [])
        XCTAssertEqual(ActivityLog.chunks(ofExtent: 1, extentBytes: 4 << 20, chunkBytes: 65536, chunkCount: 100), 64..<100)
    }

    func testALPersistAndReplayAfterUncleanPrimaryShutdown() throws {
        let dir = try makeTempDir(self)
        let path = dir + "/m.meta"
        var h = MetadataHeader(sizeBytes: 64 << 20, chunkBytes: 65536, alExtentBytes: 4 << 20, alSlots: 8, diskState: .upToDate,
                               flags: [], epoch: Epoch(1), generations: DataGenerations(current: GenerationID(1)))
        do {
            let s = try MetadataStore(path: path, initial: h)
            h.flags = [.wasPrimary]
            try s.writeHeader(h)
            var al = ActivityLog(capacity: 8)
            if case .persist(let hot) = al.begin([0, 3], tag: 0) { try s.writeAL(hot) } else { XCTFail("expected persist") }
            // Crash: nothing else written.
        }
        let s = try MetadataStore(path: path, initial: h)
        let out = CrashRecovery.open(header: s.header, activityLog: s.openedAL, bitmap: s.openedBitmap)
        XCTAssertEqual(out.bitmap.setChunks, Array(0..<64) + Array(192..<256))
        XCTAssertTrue(out.header.flags.contains(.crashRecoveryPending))
    }
}
