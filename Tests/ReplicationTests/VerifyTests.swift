import Foundation
import HACore
import NIOCore
@testable import Replication
import XCTest

final class VerifyTests: XCTestCase {
    func testVerifyNamesTheCorruptChunkAndResyncRepairsIt() throws {
        let pair = try VolumePair(test: self)
        try pair.open("b").setPromisedEpoch(Epoch(1))
        let a = try pair.open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("in sync") { a.status.peerState == .inSync }
        let loop = pair.group.next()
        var w = Workload(seed: 41, sizeBytes: pair.sizeBytes)
        XCTAssertEqual(w.submit(a, count: 200, on: loop).waitAll().1, 0)
        try a.flush(on: loop).wait()
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        // Silent corruption on the backup's disk, inside chunk 37.
        let fd = open(pair.path("b", "img"), O_RDWR)
        var junk = [UInt8](repeating: 0xE5, count: 300)
        XCTAssertEqual(pwrite(fd, &junk, 300, off_t(37 * 65536 + 1234)), 300)
        close(fd)
        a.startVerify()
        waitUntil("verify finished") { a.status.lastVerifyMismatches != nil && pair.b!.status.lastVerifyMismatches != nil }
        XCTAssertEqual(a.status.lastVerifyMismatches, [37])
        XCTAssertEqual(pair.b!.status.lastVerifyMismatches, [37], "the peer knows too")
        XCTAssertTrue(pair.events.all.contains { if case .verifyFinished(let m) = $0.1 { return $0.0 == "a" && m == [37] }; return false })
        let before = a.status.resyncBytesSent
        a.requestResync()
        waitUntil("repaired") { a.status.outOfSyncBytes == 0 && a.status.resyncBytesSent == before + 65536 && a.status.peerState == .inSync }
        try a.flush(on: loop).wait()
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"))
        XCTAssertEqual(a.status.resyncBytesSent - before, 65536, "only the mismatched chunk was sent")
        // A second verify finds nothing; asking from the secondary side works the same.
        pair.b!.startVerify()
        // Each side records the result when its own half finishes: wait for both.
        waitUntil("second verify") { pair.b!.status.lastVerifyMismatches == [] && a.status.lastVerifyMismatches == [] }
    }
}
