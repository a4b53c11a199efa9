import HACore
@testable import Replication
import XCTest

/// The identity label and the start-up decision (docs/replication.md "Disk identity"), row by row.
final class DiskLabelTests: XCTestCase {
    let g1 = GenerationID(0x11), g2 = GenerationID(0x22)

    func header(id: UInt64, current: GenerationID) -> MetadataHeader {
        MetadataHeader(sizeBytes: 1 << 20, chunkBytes: 65536, alExtentBytes: 1 << 20, alSlots: 8, diskState: .upToDate, flags: [],
                       epoch: Epoch(3), generations: DataGenerations(current: current), diskID: id)
    }

    func label(id: UInt64, cluster: String = "web1", node: NodeID = "a", current: GenerationID, previous: GenerationID = .none) -> DiskIdentity.Reading {
        .label(DiskLabel(diskID: id, cluster: cluster, node: node, sizeBytes: 1 << 20, current: current, previous: previous))
    }

    func decide(_ h: MetadataHeader?, _ r: DiskIdentity.Reading) -> DiskIdentity {
        DiskIdentity.decide(header: h, reading: r, path: "/srv/a.img", cluster: "web1", node: "a")
    }

    func testLabelRoundTripsAndDamageIsForeign() {
        let l = DiskLabel(diskID: 0xABCDEF, cluster: "web1", node: "a", sizeBytes: 1 << 30, current: g2, previous: g1)
        var bytes = l.encode()
        XCTAssertEqual(bytes.count, DiskLabel.bytes)
        XCTAssertEqual(DiskLabel.read(bytes), .label(l))
        XCTAssertEqual(DiskLabel.read([UInt8](repeating: 0, count: DiskLabel.bytes)), .blank)
        bytes[40] ^= 1
        XCTAssertEqual(DiskLabel.read(bytes), .foreign, "a damaged label is never trusted")
        XCTAssertEqual(DiskLabel.read((0..<DiskLabel.bytes).map { UInt8(truncatingIfNeeded: $0) }), .foreign)
    }

    func testLabelSitsPastTheVolumeOnA4KiBBoundary() {
        XCTAssertEqual(DiskLabel.offset(forVolumeBytes: 1 << 20), 1 << 20)
        XCTAssertEqual(DiskLabel.offset(forVolumeBytes: (1 << 20) + 512), (1 << 20) + 4096)
        XCTAssertEqual(DiskLabel.storeBytes(forVolumeBytes: 1 << 20), (1 << 20) + 4096)
    }

    func testEveryRowOfTheStartUpTable() {
        XCTAssertEqual(decide(nil, .blank), .new(keepDiskID: nil))
        XCTAssertEqual(decide(nil, label(id: 7, current: g1)), .new(keepDiskID: 7))
        XCTAssertEqual(decide(header(id: 7, current: g1), label(id: 7, current: g1)), .matches)
        guard case .stamp = decide(header(id: 7, current: g1), label(id: 7, current: g2, previous: g1)) else {
            return XCTFail("a label one generation ahead (crash between label and header) is restamped")
        }
        guard case .replaced(let restored) = decide(header(id: 7, current: g2), label(id: 7, current: g1)) else {
            return XCTFail("an image of another generation is a full-sync target")
        }
        XCTAssertTrue(restored.contains("restored"), restored)
        guard case .replaced = decide(header(id: 7, current: g1), label(id: 8, current: g1)) else { return XCTFail("another store of this node") }
        guard case .replaced(let blank) = decide(header(id: 7, current: g1), .blank) else { return XCTFail("a new disk under kept metadata") }
        XCTAssertTrue(blank.contains("/srv/a.img"), blank)
        guard case .stamp = decide(header(id: 0, current: g1), .blank) else { return XCTFail("format-1 metadata is stamped once") }
        guard case .refuse(let other) = decide(header(id: 7, current: g1), label(id: 7, node: "b", current: g1)) else {
            return XCTFail("another node's store is refused")
        }
        XCTAssertTrue(other.contains("/srv/a.img") && other.contains("node b"), other)
        guard case .refuse = decide(nil, label(id: 7, cluster: "web2", current: g1)) else { return XCTFail("another cluster's store is refused") }
        guard case .refuse = decide(nil, .foreign) else { return XCTFail("foreign bytes in the label area are refused") }
    }

    func testFormatOneHeadersStillOpenWithoutADiskID() {
        var h = header(id: 99, current: g1)
        h.sequence = 5
        var slot = MetadataLayout.encode(h)
        // Rewrite it as format 1: version field 1, no disk id, resealed.
        slot.replaceSubrange(8..<12, with: [0, 0, 0, 1])
        slot.replaceSubrange(108..<116, with: [UInt8](repeating: 0, count: 8))
        let resealed = MetadataLayout.seal(Array(slot[0..<MetadataLayout.checksumOffset]))
        let back = MetadataLayout.decodeHeader(resealed)
        XCTAssertEqual(back?.diskID, 0)
        XCTAssertEqual(back?.generations.current, g1)
        XCTAssertEqual(MetadataLayout.decodeHeader(MetadataLayout.encode(h))?.diskID, 99)
    }
}
