import Foundation
import HACore
@testable import Replication
@testable import ReplicationShell
import XCTest

final class MetadataTests: XCTestCase {
    func header(_ seq: UInt64 = 0) -> MetadataHeader {
        MetadataHeader(sequence: seq, sizeBytes: 1 << 30, chunkBytes: 65536, alExtentBytes: 4 << 20, alSlots: 64,
                       diskState: .upToDate, flags: [.wasPrimary],
                       epoch: Epoch(7), generations: DataGenerations(current: GenerationID(0xAB), bitmap: GenerationID(0x12), history: [GenerationID(3), GenerationID(4)]))
    }

    func testHeaderRoundTrip() {
        let h = header(5)
        let bytes = MetadataLayout.encode(h)
        XCTAssertEqual(bytes.count, 4096)
        XCTAssertEqual(MetadataLayout.decodeHeader(bytes), h)
    }

    /// Format 3 carries the newest epoch the node was primary in; a format-2 header (written
    /// by the previous release) still decodes, with none.
    func testHeaderFormat3PrimaryEpochAndFormat2StillDecodes() {
        var h = header(6)
        h.primaryEpoch = Epoch(9)
        h.flags.insert(.steppedDown)
        XCTAssertEqual(MetadataLayout.decodeHeader(MetadataLayout.encode(h)), h)
        // The same header as format 2 wrote it: version 2, nothing after the disk id.
        var body = Array(MetadataLayout.encode(h)[0..<MetadataLayout.checksumOffset])
        body.replaceSubrange(8..<12, with: [0, 0, 0, 2])
        let end = body.count - body.reversed().prefix { $0 == 0 }.count  // the primary epoch is the last field
        body.replaceSubrange(end - 8..<end, with: [UInt8](repeating: 0, count: 8))
        let v2 = MetadataLayout.decodeHeader(MetadataLayout.seal(body))
        XCTAssertNotNil(v2)
        XCTAssertEqual(v2?.primaryEpoch, .zero)
        XCTAssertEqual(v2?.generations, h.generations)
    }

    func testHeaderRefusesEveryFlippedByte() {
        let bytes = MetadataLayout.encode(header(1))
        for i in stride(from: 0, to: bytes.count, by: 97) {
            var b = bytes
            b[i] ^= 0x40
            XCTAssertNil(MetadataLayout.decodeHeader(b), "flipped byte \(i) accepted")
        }
        XCTAssertNil(MetadataLayout.decodeHeader([UInt8](repeating: 0, count: 4096)))
        XCTAssertNil(MetadataLayout.decodeHeader(Array(bytes.prefix(100))))
    }

    func testNewestSlotWinsAndTornSlotFallsBack() {
        var a = header(); a.sequence = 8
        var b = header(); b.sequence = 9; b.diskState = .inconsistent
        let ea = MetadataLayout.encode(a), eb = MetadataLayout.encode(b)
        XCTAssertEqual(MetadataLayout.newestHeader(ea, eb)?.header, b)
        var torn = eb
        for i in 2048..<4096 { torn[i] = 0 }  // second half never reached the disk
        XCTAssertEqual(MetadataLayout.newestHeader(ea, torn)?.header, a)
        XCTAssertNil(MetadataLayout.newestHeader(torn, torn))
    }

    func testStoreRecoversFromTornHeaderWriteOnDisk() throws {
        let dir = try makeTempDir(self)
        let path = dir + "/m.meta"
        var h = header()
        do {
            let s = try MetadataStore(path: path, initial: h)
            h.epoch = Epoch(8)
            try s.writeHeader(h)  // slot 1, seq 2
            h.epoch = Epoch(9)
            try s.writeHeader(h)  // slot 0, seq 3
        }
        // Tear the newest slot (0): half of it is garbage.
        let fd = open(path, O_RDWR)
        var junk = [UInt8](repeating: 0xEE, count: 1000)
        XCTAssertEqual(pwrite(fd, &junk, 1000, 1500), 1000)
        close(fd)
        let s2 = try MetadataStore(path: path, initial: header())
        XCTAssertEqual(s2.header.epoch, Epoch(8), "fell back to the previous good slot")
        XCTAssertEqual(s2.header.sequence, 2)
        // The next write goes to the torn slot and wins again.
        var h3 = s2.header; h3.epoch = Epoch(10)
        try s2.writeHeader(h3)
        XCTAssertEqual(try MetadataStore(path: path, initial: header()).header.epoch, Epoch(10))
    }

    func testStoreRefusesGeometryMismatchAndForeignFile() throws {
        let dir = try makeTempDir(self)
        let path = dir + "/m.meta"
        _ = try MetadataStore(path: path, initial: header())
        var other = header(); other.chunkBytes = 4096
        XCTAssertThrowsError(try MetadataStore(path: path, initial: other))
        let junk = dir + "/junk"
        FileManager.default.createFile(atPath: junk, contents: Data(repeating: 7, count: 20000))
        XCTAssertThrowsError(try MetadataStore(path: junk, initial: header())) { e in
            XCTAssertTrue("\(e)".contains("neither header slot"), "\(e)")
        }
    }

    func testALSlotsAlternateAndSurviveTear() throws {
        let dir = try makeTempDir(self)
        let path = dir + "/m.meta"
        do {
            let s = try MetadataStore(path: path, initial: header())
            try s.writeAL([1, 2, 3])
            try s.writeAL([2, 3, 9])
        }
        XCTAssertEqual(try MetadataStore(path: path, initial: header()).openedAL, [2, 3, 9])
        // Tear the newer AL slot: the older record is used.
        let fd = open(path, O_RDWR)
        var junk = [UInt8](repeating: 1, count: 64)
        // Creation wrote seq 0 to slot 0; seq 1 went to slot 1 (12288), seq 2 to slot 0 (8192).
        XCTAssertEqual(pwrite(fd, &junk, 64, 8192 + 10), 64)
        close(fd)
        XCTAssertEqual(try MetadataStore(path: path, initial: header()).openedAL, [1, 2, 3])
    }

    func testCrashRecoveryMarksALExtentsOnlyAfterUncleanPrimary() {
        var h = header()
        h.generations = DataGenerations(current: GenerationID(1))
        let chunks = MetadataLayout.chunkCount(sizeBytes: h.sizeBytes, chunkBytes: Int(h.chunkBytes))
        let bm = DirtyBitmap(chunkCount: chunks)
        // Unclean primary: extents 2 and 5 (64 chunks each at 4 MiB / 64 KiB).
        let crashed = CrashRecovery.open(header: h, activityLog: [2, 5], bitmap: bm)
        XCTAssertEqual(crashed.recoveredChunks, 128)
        XCTAssertTrue(crashed.bitmap.isSet(128) && crashed.bitmap.isSet(191) && crashed.bitmap.isSet(320) && crashed.bitmap.isSet(383))
        XCTAssertFalse(crashed.bitmap.isSet(127) || crashed.bitmap.isSet(192))
        XCTAssertTrue(crashed.header.flags.contains(.crashRecoveryPending))
        XCTAssertFalse(crashed.header.flags.contains(.wasPrimary))
        XCTAssertEqual(crashed.dirtyPages, [0])
        // Clean shutdown: nothing marked.
        h.flags = [.wasPrimary, .cleanShutdown]
        let clean = CrashRecovery.open(header: h, activityLog: [2, 5], bitmap: bm)
        XCTAssertEqual(clean.recoveredChunks, 0)
        XCTAssertFalse(clean.header.flags.contains(.crashRecoveryPending))
        XCTAssertFalse(clean.header.flags.contains(.cleanShutdown))
        // Never primary: nothing marked.
        h.flags = []
        XCTAssertEqual(CrashRecovery.open(header: h, activityLog: [2, 5], bitmap: bm).recoveredChunks, 0)
    }
}
