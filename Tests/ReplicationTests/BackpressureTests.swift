import Foundation
import HACore
import HAShell
import NIOCore
@testable import Replication
@testable import ReplicationShell
import XCTest

/// Bounded queues on the replication link (issue 13): a master under protocol A stops
/// taking requests while the link's send buffer is full, and a backup whose apply queue is
/// full stops reading the link.
final class BackpressureTests: XCTestCase {
    static func block(_ i: Int, _ bytes: Int) -> ByteBuffer {
        ByteBuffer(bytes: [UInt8](repeating: UInt8(truncatingIfNeeded: i &* 7 &+ 1), count: bytes))
    }

    /// Protocol A acknowledges a write once it is queued to the peer: with a backup that reads
    /// nothing, that queue was the master's memory. Now a write whose frame went into a send
    /// buffer over its high-water mark counts as queued only once the buffer drains, so
    /// acknowledgements stop (and an NBD client's budget stops its reads); the pause, longer
    /// than the link timeout, does not end the session; once the backup reads again, every
    /// write completes and the stores are identical.
    func testProtocolAMasterStopsAcknowledgingWhileTheBackupDoesNotRead() throws {
        let small = try acknowledgedWhileTheBackupDoesNotRead(sendBuffer: PeerConnection.defaultSendBufferBytes)
        // `volume.link_send_buffer`: four times the buffer holds more writes before the hold.
        let large = try acknowledgedWhileTheBackupDoesNotRead(sendBuffer: 4 * PeerConnection.defaultSendBufferBytes, name: "large")
        XCTAssertGreaterThan(large, small, "a larger send buffer lets more writes through before the hold")
    }

    func acknowledgedWhileTheBackupDoesNotRead(sendBuffer: Int, name: String = #function) throws -> Int {
        let pair = try VolumePair(test: self, proto: .a, fresh: true, name: name)
        pair.linkSendBufferBytes = sendBuffer
        pair.sizeBytes = 256 << 20
        pair.activityLogExtents = 256  // no activity-log barrier (which waits for the peer) in the way
        try pair.pairUp()
        try pair.connectPrimary()
        let a = try XCTUnwrap(pair.a), b = try XCTUnwrap(pair.b)
        let loop = pair.group.next()
        let linkDowns = { pair.logs.all.filter { $0.contains("link down") }.count }
        let downsBefore = linkDowns()
        b.pauseLinkReadingForTests(true)
        let count = 200, size = 1 << 20
        let acked = ManagedAtomicCounter()
        let futures = (0..<count).map { i in
            a.write(offset: UInt64(i * size), data: Self.block(i, size), fua: false, on: loop).map { acked.add() }
        }
        waitUntil("writes held for the link") { a.writesHeldForLink > 0 }
        usleep(2_500_000)  // longer than the 2 s link timeout (TCP_USER_TIMEOUT is four of them)
        let ackedWhilePaused = acked.value
        XCTAssertLessThan(ackedWhilePaused, count, "not everything was acknowledged into an unbounded queue")
        XCTAssertGreaterThan(a.writesHeldForLink, 0)
        XCTAssertEqual(a.status.peerState, .inSync, "a backup that pauses reading is not a silent one")
        XCTAssertEqual(linkDowns(), downsBefore, "the session survived the pause")
        b.pauseLinkReadingForTests(false)
        for f in futures { try f.wait() }
        try a.flush(on: loop).wait()
        XCTAssertEqual(a.writesHeldForLink, 0)
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        print("protocol A, backup not reading, \(sendBuffer >> 20) MiB send buffer: \(ackedWhilePaused) of \(count) 1 MiB writes acknowledged while paused")
        return ackedWhilePaused
    }

    /// A backup whose disk falls behind stops reading the link at `applyQueueBytes` of queued
    /// writes and reads again at half of it; nothing is lost and the link stays up.
    func testBackupPausesReadingWhileItsApplyQueueIsFull() throws {
        let pair = try VolumePair(test: self, proto: .a, fresh: true)
        pair.sizeBytes = 128 << 20
        try pair.pairUp()
        pair.applyQueueBytes = 2 << 20
        try pair.connectPrimary()
        let a = try XCTUnwrap(pair.a)
        let loop = pair.group.next()
        let size = 1 << 20
        let futures = (0..<128).map { i in a.write(offset: UInt64(i * size), data: Self.block(i, size), fua: false, on: loop) }
        for f in futures { try f.wait() }
        try a.flush(on: loop).wait()
        XCTAssertTrue(pair.logs.contains("reading from the link paused"), "the apply queue filled")
        XCTAssertTrue(pair.logs.contains("reading from the link again"))
        XCTAssertEqual(a.status.peerState, .inSync)
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
    }
}

final class ManagedAtomicCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}
