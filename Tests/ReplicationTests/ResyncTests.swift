import Foundation
import HACore
import NIOCore
@testable import Replication
@testable import ReplicationShell
import XCTest

final class ResyncTests: XCTestCase {
    /// A write the backup has written but not yet synced would be lost if the backup lost
    /// power, so when the link drops the master marks it out of sync (a transfer log): the
    /// chunks written after the last flush are resynced; those before it are not.
    func testWritesNotYetSyncedAtTheBackupAreMarkedWhenItVanishes() throws {
        let pair = try VolumePair(test: self)
        try pair.open("b").setPromisedEpoch(Epoch(1))
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("in sync") { a.status.peerState == .inSync }
        let loop = pair.group.next()
        let block = ByteBuffer(bytes: [UInt8](repeating: 0x5A, count: 4096))
        for c in 0..<4 { try a.write(offset: UInt64(c * pair.chunkBytes), data: block, fua: false, on: loop).wait() }
        try a.flush(on: loop).wait()  // chunks 0–3 are durable on the backup now
        for c in 10..<13 { try a.write(offset: UInt64(c * pair.chunkBytes), data: block, fua: false, on: loop).wait() }
        XCTAssertEqual(a.status.outOfSyncBytes, 0)
        pair.b!.simulateCrash()
        waitUntil("link down") { a.status.peerState == .disconnected }
        waitUntil("the three unsynced chunks marked") { a.status.outOfSyncBytes == UInt64(3 * pair.chunkBytes) }
    }

    func testBackupCrashThenResyncSendsOnlyDirtyChunks() throws {
        let pair = try VolumePair(test: self)
        pair.resyncRate = 8 << 20
        try pair.open("b").setPromisedEpoch(Epoch(1))
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("in sync") { a.status.peerState == .inSync }
        let loop = pair.group.next()
        var w = Workload(seed: 21, sizeBytes: pair.sizeBytes)
        XCTAssertEqual(w.submit(a, count: 200, on: loop).waitAll().1, 0)
        // Crash the backup in the middle of a burst.
        let burst = w.submit(a, count: 100, on: loop)
        pair.b!.simulateCrash()
        waitUntil("link down") { a.status.peerState == .disconnected }
        // Peer still required: a write now waits; it is neither acked nor failed.
        let waiting = a.write(offset: 8 << 20, data: ByteBuffer(bytes: [UInt8](repeating: 8, count: 8192)), fua: false, on: loop)
        usleep(300_000)
        XCTAssertGreaterThanOrEqual(a.status.inFlightWrites, 1)
        XCTAssertTrue(a.status.generations.bitmap.isNone,
                      "no new generation while the peer is still required: nothing was acknowledged without it")
        // The arbitrator outdated b: a goes on alone, tracking chunks, in a new generation.
        a.setWriteGate(VolumePair.openGate(Epoch(1), peerRequired: false))
        XCTAssertEqual(burst.waitAll().1, 0)
        try waiting.wait()
        XCTAssertFalse(a.status.generations.bitmap.isNone, "writes acknowledged without the peer start a new generation")
        var w2 = Workload(seed: 22, sizeBytes: 4 << 20)  // confine new writes to the first 4 MiB
        XCTAssertEqual(w2.submit(a, count: 80, on: loop).waitAll().1, 0)
        try a.flush(on: loop).wait()
        let dirtyBytes = a.status.outOfSyncBytes
        let dirtyChunks = Int(dirtyBytes) / pair.chunkBytes
        XCTAssertGreaterThan(dirtyChunks, 0)
        XCTAssertLessThan(dirtyChunks, Int(pair.sizeBytes) / pair.chunkBytes, "not everything is dirty")
        XCTAssertEqual(a.status.resyncBytesSent, 0)
        // Backup returns (reopened from its files, no clean shutdown).
        let started = ContinuousClock.now
        let b = try pair.open("b")
        waitUntil("resync done") { a.status.peerState == .inSync && b.status.diskState == .upToDate }
        let elapsed = ContinuousClock.now - started
        try a.flush(on: loop).wait()
        let sent = a.status.resyncBytesSent
        print("resync: \(dirtyChunks) dirty chunks (\(dirtyBytes) bytes), sent \(sent) bytes in \(elapsed) at ≤ \(pair.resyncRate) B/s")
        XCTAssertEqual(sent, UInt64(dirtyChunks * pair.chunkBytes), "exactly the dirty chunks")
        XCTAssertEqual(a.status.outOfSyncBytes, 0)
        XCTAssertEqual(b.status.generations.current, a.status.generations.current)
        XCTAssertTrue(a.status.generations.bitmap.isNone)
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        // Rate limit: the burst allowance is a twentieth of a second's worth.
        let floor = max(0, Double(sent) - Double(pair.resyncRate) / 20) / Double(pair.resyncRate)
        XCTAssertGreaterThanOrEqual(elapsed.seconds, floor * 0.9, "resync faster than its rate limit")
        let progress = pair.events.all.compactMap { e -> (UInt64, UInt64)? in
            if case let .resyncProgress(d, t) = e.1, e.0 == "a" { return (d, t) }; return nil
        }
        XCTAssertEqual(progress.last?.0, sent)
        XCTAssertEqual(progress.last?.1, sent)
    }

    func testPrimaryCrashFailoverThenOldPrimaryResyncsAsTarget() throws {
        let pair = try VolumePair(test: self)
        try pair.open("b").setPromisedEpoch(Epoch(1))
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("in sync") { a.status.peerState == .inSync }
        let loop = pair.group.next()
        var w = Workload(seed: 31, sizeBytes: pair.sizeBytes)
        XCTAssertEqual(w.submit(a, count: 150, on: loop).waitAll().1, 0)
        // Primary dies with writes in flight.
        _ = w.submit(a, count: 60, on: loop)
        a.simulateCrash()
        let b = pair.b!
        waitUntil("b sees the link go") { b.status.peerState == .disconnected }
        // Failover: b promoted in epoch 2 with a new generation; the quorum outdated a.
        try b.becomePrimary(epoch: Epoch(2), newGeneration: true)
        b.setWriteGate(VolumePair.openGate(Epoch(2), peerRequired: false))
        var w2 = Workload(seed: 32, sizeBytes: pair.sizeBytes)
        XCTAssertEqual(w2.submit(b, count: 80, on: loop).waitAll().1, 0)
        try b.flush(on: loop).wait()
        let bDirty = b.status.outOfSyncBytes
        // The old primary returns as secondary: its AL extents are out of sync.
        let a2 = try pair.open("a", start: false)
        XCTAssertGreaterThan(a2.status.outOfSyncBytes, 0, "AL extents of the crashed primary marked")
        XCTAssertTrue(pair.logs.contains("primary crash detected"))
        let aDirty = a2.status.outOfSyncBytes
        a2.becomeSecondary(epoch: Epoch(2))
        a2.start()
        waitUntil("old primary resynced") { b.status.peerState == .inSync && a2.status.diskState == .upToDate }
        try b.flush(on: loop).wait()
        print("failover resync: b bitmap \(bDirty) bytes, a AL \(aDirty) bytes, sent \(b.status.resyncBytesSent)")
        XCTAssertLessThanOrEqual(b.status.resyncBytesSent, bDirty + aDirty)
        XCTAssertGreaterThanOrEqual(b.status.resyncBytesSent, max(bDirty, aDirty))
        XCTAssertEqual(a2.status.generations.current, b.status.generations.current)
        XCTAssertEqual(a2.status.outOfSyncBytes, 0)
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        // And b goes on mirroring to a.
        b.setWriteGate(VolumePair.openGate(Epoch(2)))
        XCTAssertEqual(w2.submit(b, count: 50, on: loop).waitAll().1, 0)
        try b.flush(on: loop).wait()
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
    }

    func testBitmapAndCleanFlagSurviveRestart() throws {
        let pair = try VolumePair(test: self)
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1), peerRequired: false))
        let loop = pair.group.next()
        // No peer: each write dirties its chunks before it is acked.
        try a.write(offset: 0, data: ByteBuffer(bytes: [UInt8](repeating: 3, count: 100)), fua: false, on: loop).wait()
        try a.write(offset: 5 * 65536 + 10, data: ByteBuffer(bytes: [UInt8](repeating: 3, count: 65536)), fua: false, on: loop).wait()
        XCTAssertEqual(a.status.outOfSyncBytes, 3 * 65536)
        let gens = a.status.generations
        a.stop()
        let again = try pair.open("a", start: false)
        XCTAssertEqual(again.status.outOfSyncBytes, 3 * 65536)
        XCTAssertEqual(again.status.generations, gens)
        XCTAssertFalse(pair.logs.contains("primary crash detected"), "a clean stop is not a crash")
    }
}

final class ResyncInterruptionTests: XCTestCase {
    /// A resync target crashes mid-resync: it stays inconsistent (never promotable) across the
    /// restart, the resync resumes from the bits left, and writes mirrored during both resync
    /// runs keep their order against the resync reads.
    func testInterruptedResyncResumesWithConcurrentWrites() throws {
        let pair = try VolumePair(test: self)
        pair.resyncRate = 4 << 20
        try pair.open("b").setPromisedEpoch(Epoch(1))
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1), peerRequired: false))
        a.start()
        waitUntil("in sync") { a.status.peerState == .inSync }
        let loop = pair.group.next()
        pair.b!.simulateCrash()
        waitUntil("link down") { a.status.peerState == .disconnected }
        var w = Workload(seed: 51, sizeBytes: pair.sizeBytes)
        XCTAssertEqual(w.submit(a, count: 120, on: loop).waitAll().1, 0)
        let dirty1 = a.status.outOfSyncBytes
        XCTAssertGreaterThan(dirty1, 4 << 20)

        // First resync run, with writes going on, cut after about a megabyte.
        let b2 = try pair.open("b")
        waitUntil("resync under way") { a.status.resyncDoneBytes >= 1 << 20 }
        XCTAssertEqual(b2.status.diskState, .inconsistent)
        XCTAssertThrowsError(try b2.becomePrimary(epoch: Epoch(2), newGeneration: true), "an inconsistent target is never promotable")
        let during1 = w.submit(a, count: 40, on: loop)
        b2.simulateCrash()
        XCTAssertEqual(during1.waitAll().1, 0)
        waitUntil("link down again") { a.status.peerState == .disconnected }
        XCTAssertEqual(w.submit(a, count: 20, on: loop).waitAll().1, 0)
        try a.flush(on: loop).wait()
        let dirty2 = a.status.outOfSyncBytes
        let sentBefore = a.status.resyncBytesSent
        XCTAssertGreaterThan(sentBefore, 0)

        // The target comes back still inconsistent; the resync resumes.
        let b3 = try pair.open("b", start: false)
        XCTAssertEqual(b3.status.diskState, .inconsistent, "inconsistent survives the crash")
        XCTAssertThrowsError(try b3.becomePrimary(epoch: Epoch(2), newGeneration: true))
        b3.start()
        waitUntil("second run started") { a.status.peerState == .behind || a.status.peerState == .inSync }
        let during2 = w.submit(a, count: 60, on: loop)
        waitUntil("resync finished") { a.status.peerState == .inSync && b3.status.diskState == .upToDate }
        XCTAssertEqual(during2.waitAll().1, 0)
        try a.flush(on: loop).wait()
        let sent2 = a.status.resyncBytesSent - sentBefore
        print("interrupted resync: first run \(sentBefore) bytes of \(dirty1) dirty; second run \(sent2) bytes of \(dirty2) dirty")
        XCTAssertLessThanOrEqual(sent2, dirty2, "the second run sends only what is still dirty")
        XCTAssertLessThan(dirty2, dirty1 + UInt64(60 * 128 * 1024), "the first run's acked chunks stayed clean")
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        XCTAssertEqual(b3.status.generations.current, a.status.generations.current)
    }
}
