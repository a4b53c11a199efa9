import Foundation
import HACore
import NIOCore
@testable import Replication
@testable import ReplicationShell
import HAShell
import XCTest

final class ReplicatedVolumeTests: XCTestCase {
    /// Connects a fresh pair, a primary in epoch 1 with an open gate.
    func connectedPair(_ proto: ReplicationProtocol = .c, name: String = #function) throws -> VolumePair {
        let pair = try VolumePair(test: self, proto: proto, name: name)
        try pair.connectPrimary()
        return pair
    }

    func mirror(_ proto: ReplicationProtocol, seed: UInt64) throws {
        let pair = try connectedPair(proto, name: "mirror\(proto.rawValue)")
        let a = pair.a!, b = pair.b!
        XCTAssertEqual(a.status.generations, b.status.generations, "a fresh pair starts in the same initial generation")
        var w = Workload(seed: seed, sizeBytes: pair.sizeBytes)
        let loop = pair.group.next()
        let (ok, bad) = w.submit(a, count: 400, on: loop).waitAll()
        XCTAssertEqual(bad, 0)
        XCTAssertEqual(ok, 400)
        try a.flush(on: loop).wait()
        XCTAssertEqual(a.status.outOfSyncBytes, 0)
        XCTAssertEqual(a.status.peerState, .inSync)
        let fa = pair.fileBytes("a"), fb = pair.fileBytes("b")
        XCTAssertEqual(fa.count, Int(pair.sizeBytes))
        XCTAssertNotEqual(sha(fa), sha([UInt8](repeating: 0, count: fa.count)), "the workload wrote something")
        XCTAssertTrue(fa == fb, "backup differs from primary after flush (protocol \(proto))")
        // Reads come back as written.
        let back = try a.read(offset: 0, length: 1 << 20, on: loop).wait()
        XCTAssertEqual(back.getBytes(at: 0, length: 1 << 20)!, Array(fa[0..<(1 << 20)]))
        XCTAssertEqual(a.status.inFlightWrites, 0)
        if proto == .c {
            // Protocol C: an acknowledged write is already in the backup's store.
            var rng = SplitMix64(seed: seed)
            for i in 0..<30 {
                let bytes = (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                let off = UInt64(i) * 300_000
                try a.write(offset: off, data: ByteBuffer(bytes: bytes), fua: false, on: loop).wait()
                XCTAssertEqual(Array(pair.fileBytes("b")[Int(off)..<Int(off) + 4096]), bytes, "acked write \(i) not on the backup")
            }
        }
    }

    func testProtocolAMirrorsByteForByte() throws { try mirror(.a, seed: 1) }
    func testProtocolBMirrorsByteForByte() throws { try mirror(.b, seed: 2) }
    func testProtocolCMirrorsByteForByte() throws { try mirror(.c, seed: 3) }

    func testSecondaryRefusesClientIO() throws {
        let pair = try connectedPair()
        let loop = pair.group.next()
        XCTAssertThrowsError(try pair.b!.write(offset: 0, data: ByteBuffer(bytes: [1, 2, 3]), fua: false, on: loop).wait()) {
            XCTAssertEqual($0 as? VolumeError, .notPrimary(master: nil))
        }
        XCTAssertThrowsError(try pair.a!.write(offset: pair.sizeBytes - 1, data: ByteBuffer(bytes: [1, 2]), fua: false, on: loop).wait()) {
            guard case .invalid = $0 as? VolumeError else { return XCTFail("\($0)") }
        }
        // Demotion: pending and new writes fail with notPrimary.
        pair.a!.becomeSecondary(epoch: Epoch(2))
        XCTAssertThrowsError(try pair.a!.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false, on: loop).wait())
    }

    func testExpiredLeaseNeverAcks() throws {
        let pair = try connectedPair()
        let a = pair.a!
        let loop = pair.group.next()
        XCTAssertTrue(a.mayAnswer(), "a primary inside its lease answers")
        XCTAssertFalse(pair.b!.mayAnswer(), "a secondary never answers")
        a.setWriteGate(WriteGate(epoch: Epoch(1), validUntil: MonotonicClock.now() - .seconds(1), peerRequired: true))
        // Replies decided earlier are not sent either (NBDConnectionHandler checks before writing).
        XCTAssertFalse(a.mayAnswer(), "no reply leaves after the lease lapsed")
        XCTAssertThrowsError(try a.write(offset: 0, data: ByteBuffer(bytes: [9, 9]), fua: false, on: loop).wait()) {
            XCTAssertEqual($0 as? VolumeError, .notPrimary(master: nil))
        }
    }

    func testSwitchoverDrainsAndPeerHasEverything() throws {
        let pair = try connectedPair()
        let a = pair.a!, b = pair.b!
        let loop = pair.group.next()
        var w = Workload(seed: 11, sizeBytes: pair.sizeBytes)
        let futs = w.submit(a, count: 100, on: loop)
        let done = loop.makePromise(of: Void.self)
        a.drainForSwitchover { r in done.completeWith(r) }
        try done.futureResult.wait()
        XCTAssertEqual(futs.waitAll().1, 0, "writes submitted before the drain complete")
        XCTAssertThrowsError(try a.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false, on: loop).wait(), "suspended")
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        // Hand over without a new generation: b primary, a follows over the same link.
        a.becomeSecondary(epoch: Epoch(2))
        try b.becomePrimary(epoch: Epoch(2), newGeneration: false)
        b.setWriteGate(VolumePair.openGate(Epoch(2)))
        XCTAssertEqual(w.submit(b, count: 50, on: loop).waitAll().1, 0)
        try b.flush(on: loop).wait()
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
    }

    /// An abandoned switchover (`NodeAction.cancelDrain`): the drained, suspended primary
    /// takes writes again without a new promotion.
    func testCancelledDrainResumesWrites() throws {
        let pair = try connectedPair()
        let a = pair.a!
        let loop = pair.group.next()
        let done = loop.makePromise(of: Void.self)
        a.drainForSwitchover { r in done.completeWith(r) }
        try done.futureResult.wait()
        XCTAssertThrowsError(try a.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false, on: loop).wait(), "suspended")
        a.cancelDrain()
        XCTAssertNoThrow(try a.write(offset: 0, data: ByteBuffer(bytes: [2]), fua: false, on: loop).wait())
        XCTAssertEqual(a.status.role, .primary)
    }

    func testSplitBrainRefusedAndStoresUntouchedThenResolved() throws {
        let pair = try connectedPair()
        let loop = pair.group.next()
        XCTAssertEqual(Workload(seed: 4, sizeBytes: pair.sizeBytes).submitCopy(pair.a!, 50, loop).waitAll().1, 0)
        pair.a!.stop(); pair.b!.stop()
        // Partition: each side promoted without the other, new generations, different writes.
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(3), newGeneration: true)
        a.setWriteGate(VolumePair.openGate(Epoch(3), peerRequired: false))
        XCTAssertEqual(Workload(seed: 5, sizeBytes: pair.sizeBytes).submitCopy(a, 60, loop).waitAll().1, 0)
        try a.flush(on: loop).wait()
        let b = try pair.open("b", start: false)
        try b.becomePrimary(epoch: Epoch(2), newGeneration: true)
        b.setWriteGate(VolumePair.openGate(Epoch(2), peerRequired: false))
        XCTAssertEqual(Workload(seed: 6, sizeBytes: pair.sizeBytes).submitCopy(b, 60, loop).waitAll().1, 0)
        try b.flush(on: loop).wait()
        b.becomeSecondary(epoch: Epoch(3))  // the quorum made a the master of epoch 3
        XCTAssertNotEqual(a.status.generations.current, b.status.generations.current)
        XCTAssertEqual(a.status.generations.bitmap, b.status.generations.bitmap)
        let ha = sha(pair.fileBytes("a")), hb = sha(pair.fileBytes("b"))
        XCTAssertNotEqual(ha, hb)
        b.start(); a.start()
        waitUntil("split brain reported on both") { a.status.splitBrain != nil && b.status.splitBrain != nil }
        XCTAssertTrue(pair.events.all.contains { if case .splitBrain = $0.1 { return $0.0 == "a" }; return false })
        XCTAssertTrue(pair.logs.contains("SPLIT BRAIN"))
        usleep(300_000)  // redials keep finding it; nothing may be written meanwhile
        XCTAssertEqual(sha(pair.fileBytes("a")), ha, "a's store changed")
        XCTAssertEqual(sha(pair.fileBytes("b")), hb, "b's store changed")
        XCTAssertEqual(a.status.resyncBytesSent + b.status.resyncBytesSent, 0)
        XCTAssertNotEqual(a.status.peerState, .inSync)
        // The operator discards b's changes: b becomes sync target, resync makes it equal to a.
        let aDirty = a.status.outOfSyncBytes, bDirty = b.status.outOfSyncBytes
        b.resolveSplitBrain(discardLocal: true)
        waitUntil("resolved") { a.status.peerState == .inSync && b.status.diskState == .upToDate && b.status.generations.current == a.status.generations.current }
        try a.flush(on: loop).wait()
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        XCTAssertLessThanOrEqual(a.status.resyncBytesSent, aDirty + bDirty, "resync sent only the union of both bitmaps")
    }

    func testWrongClusterKeyIsRefused() throws {
        let pair = try VolumePair(test: self, listenerKey: .init(data: [UInt8](repeating: 0x11, count: 32)))
        let b = try pair.open("b")
        let a = try pair.open("a", start: false)
        try a.bootstrap(assumeClean: false)  // a new pair that can never connect: the operator picks a
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("a notices the failed session") { a.status.lastLinkError != nil }
        usleep(300_000)
        XCTAssertEqual(a.status.linksEstablished, 0)
        XCTAssertEqual(b.status.linksEstablished, 0)
        XCTAssertEqual(a.status.peerState, .disconnected)
        XCTAssertTrue(pair.logs.contains("replication session failed") || pair.logs.contains("no replication session"),
                      pair.logs.all.joined(separator: "\n"))
        // With the peer required, a write waits instead of being acknowledged.
        let f = a.write(offset: 0, data: ByteBuffer(bytes: [1, 2, 3, 4]), fua: false, on: pair.group.next())
        usleep(200_000)
        XCTAssertEqual(a.status.inFlightWrites, 1, "write must wait for the peer")
        a.becomeSecondary(epoch: Epoch(2))
        XCTAssertThrowsError(try f.wait())
    }

    func testFramesFromOlderEpochAreFenced() throws {
        let pair = try connectedPair()
        let a = pair.a!, b = pair.b!
        let loop = pair.group.next()
        try a.write(offset: 0, data: ByteBuffer(bytes: [UInt8](repeating: 1, count: 4096)), fua: false, on: loop).wait()
        // b learns of epoch 5 (another node was elected); a is a stale primary of epoch 1.
        b.setPromisedEpoch(Epoch(5))
        let f = a.write(offset: 65536, data: ByteBuffer(bytes: [UInt8](repeating: 7, count: 4096)), fua: false, on: loop)
        waitUntil("b fences a frame") { b.status.fencedFrames >= 1 }
        XCTAssertTrue(pair.logs.contains("fenced"), "refusal logged")
        XCTAssertTrue(b.status.lastLinkError?.contains("epoch 1") ?? false, "\(String(describing: b.status.lastLinkError))")
        usleep(300_000)
        XCTAssertEqual(a.status.inFlightWrites, 1, "never acked without the peer")
        XCTAssertEqual(Array(pair.fileBytes("b")[65536..<65536 + 4096]), [UInt8](repeating: 0, count: 4096), "fenced data never reached b's store")
        XCTAssertEqual(Array(pair.fileBytes("b")[0..<4096]), [UInt8](repeating: 1, count: 4096))
        a.becomeSecondary(epoch: Epoch(5))
        XCTAssertThrowsError(try f.wait())
    }
}

extension Workload {
    func submitCopy(_ v: ReplicatedVolume, _ n: Int, _ loop: EventLoop) -> [EventLoopFuture<Void>] {
        var w = self
        return w.submit(v, count: n, on: loop)
    }
}

final class ReplicationLinkBytesTests: XCTestCase {
    /// The volume counts the bytes of its replication sessions: a primary's sent bytes rise
    /// by at least what it writes, the backup receives as much, and once the peer has
    /// confirmed everything no write is left to age (`oldestUnconfirmedWrite` nil).
    func testLinkBytesRiseUnderWritesAndLagClears() throws {
        let pair = try VolumePair(test: self, proto: .c, name: "linkbytes")
        try pair.connectPrimary()
        let a = pair.a!, b = pair.b!
        let before = (a: a.linkBytes, b: b.linkBytes)
        XCTAssertGreaterThan(before.a.sent, 0, "the handshake went over the link")
        let loop = pair.group.next()
        let data = ByteBuffer(bytes: [UInt8](repeating: 0x5a, count: 64 * 1024))
        for i in 0..<16 { try a.write(offset: UInt64(i) * 65536, data: data, fua: false, on: loop).wait() }
        try a.flush(on: loop).wait()
        let after = (a: a.linkBytes, b: b.linkBytes)
        XCTAssertGreaterThanOrEqual(after.a.sent - before.a.sent, 16 * 65536)
        XCTAssertLessThan(after.a.sent - before.a.sent, 16 * 65536 + 16 * 4096, "framing and acks stay small")
        waitUntil("backup read it all") { b.linkBytes.received - before.b.received >= 16 * 65536 }
        XCTAssertGreaterThan(after.a.received, before.a.received, "acks came back")
        // The status is published after the event that completed the flush: wait for it.
        waitUntil("nothing left unconfirmed", timeout: .seconds(5)) { a.status.oldestUnconfirmedWrite == nil }
        XCTAssertEqual(a.status.replicationLagBytes, 0)
    }
}
