import HACore
import NIOCore
@testable import Replication
import XCTest

final class LinkCodecTests: XCTestCase {
    func samples() -> [LinkMessage] {
        var data = ByteBuffer(); data.writeBytes((0..<1000).map { UInt8($0 & 0xFF) })
        let gens = DataGenerations(current: GenerationID(5), bitmap: GenerationID(4), history: [GenerationID(3), GenerationID(2)])
        return [
            .handshake(LinkHandshake(sizeBytes: 1 << 30, chunkBytes: 65536, generations: gens, diskState: .outdated, role: .primary,
                                     crashedPrimary: true, crashCopyOnPeer: true, discardLocal: false, dirtyChunks: 3, dirtyPages: 1,
                                     wasPrimary: true)),
            .dirtyBitmap([BitmapPage(index: 0, bytes: [UInt8](repeating: 0x81, count: 4096)),
                          BitmapPage(index: 7, bytes: [UInt8](repeating: 0, count: 4095) + [1])]),
            .resyncZeroes(chunk: 78),
            .write(seq: 9, offset: 4096, flags: [.fua], length: 1000, data: data),
            .write(seq: 10, offset: 8192, flags: [.zeroes, .mayDeallocate], length: 1 << 20, data: nil),
            .writeAck(seq: 9, stage: .received, status: 0),
            .writeAck(seq: 9, stage: .written, status: 5),
            .flush(id: 3), .flushAck(id: 3, status: 0),
            .resyncData(chunk: 77, data: data), .resyncAck(chunk: 77, status: 0),
            .resyncDone(gens), .resyncFinished,
            .verifyRequest(chunk: 8, sha256: [UInt8](repeating: 0xAA, count: 32)), .verifyReply(chunk: 8, match: false),
            .verifyEnd(chunks: 1000), .resyncRequest([ChunkRun(start: 0, count: 16384)]), .refuse("split brain: x"),
        ]
    }

    func testRoundTrip() {
        for m in samples() {
            let decoded = LinkMessage.decode(kind: m.kind.rawValue, payload: m.encode())
            XCTAssertEqual(try decoded.get(), m)
        }
    }

    func testRefusesGarbageWithoutCrashing() {
        var rng = SplitMix64(seed: 99)
        for m in samples() {
            let enc = m.encode()
            let bytes = enc.getBytes(at: 0, length: enc.readableBytes)!
            // Every truncation (except a complete frame) is refused or decodes to something else valid.
            for cut in 0..<bytes.count where cut < 64 || cut % 97 == 0 {
                var b = ByteBuffer(); b.writeBytes(bytes.prefix(cut))
                if case .success(let x) = LinkMessage.decode(kind: m.kind.rawValue, payload: b) {
                    // Only variable-length bodies may legitimately decode shorter.
                    switch m { case .write, .resyncData: XCTAssertNotEqual(x, m); default: XCTFail("truncated \(m.kind) accepted") }
                }
            }
            // Trailing bytes are refused.
            var t = enc; t.writeInteger(UInt8(1))
            switch m {
            case .write(_, _, let f, _, _) where !f.contains(.zeroes): break
            case .resyncData: break
            default: XCTAssertThrowsError(try LinkMessage.decode(kind: m.kind.rawValue, payload: t).get(), "\(m.kind)")
            }
        }
        // Random bytes under every kind, including unknown ones.
        for _ in 0..<20_000 {
            let kind = UInt8(truncatingIfNeeded: rng.next())
            var b = ByteBuffer()
            let n = Int(rng.next() % 80)
            for _ in 0..<n { b.writeInteger(UInt8(truncatingIfNeeded: rng.next())) }
            _ = LinkMessage.decode(kind: kind, payload: b)
        }
        XCTAssertEqual(LinkMessage.decode(kind: 200, payload: ByteBuffer()), .failure(.unknownKind(200)))
        // A run count far beyond the payload is refused before allocating.
        var huge = ByteBuffer(); huge.writeInteger(UInt32.max)
        XCTAssertThrowsError(try LinkMessage.decode(kind: LinkFrameKind.resyncRequest.rawValue, payload: huge).get())
        // A write whose declared length disagrees with its data.
        var w = ByteBuffer(); w.writeInteger(UInt64(1)); w.writeInteger(UInt64(0)); w.writeInteger(UInt8(0)); w.writeInteger(UInt32(10)); w.writeBytes([1, 2, 3])
        XCTAssertThrowsError(try LinkMessage.decode(kind: LinkFrameKind.write.rawValue, payload: w).get())
    }

    func testAckRule() {
        let gate = WriteGate(epoch: Epoch(1), validUntil: Instant(nanoseconds: 1000), peerRequired: true)
        let now = Instant(nanoseconds: 500)
        func v(_ conf: PeerConfirmation, lost: Bool = false, durable: Bool = false, barrier: Bool = false, _ p: ReplicationProtocol,
               gate g: WriteGate? = nil, local: Bool = true, at t: Instant? = nil) -> AckVerdict {
            AckRule.verdict(localDone: local, confirmation: conf, peerLost: lost, bitmapDurable: durable, barrier: barrier,
                            protocol: p, gate: g ?? gate, now: t ?? now)
        }
        XCTAssertEqual(v(.queued, .a), .ack)
        XCTAssertEqual(v(.queued, .b), .wait)
        XCTAssertEqual(v(.received, .b), .ack)
        XCTAssertEqual(v(.received, .c), .wait)
        XCTAssertEqual(v(.written, .c), .ack)
        XCTAssertEqual(v(.queued, barrier: true, .a), .wait, "FUA waits for the peer's durable write")
        XCTAssertEqual(v(.written, .c, local: false), .wait)
        XCTAssertEqual(v(.pending, lost: true, durable: true, .c), .wait, "peer lost and still required: wait")
        var outdated = gate; outdated.peerRequired = false
        XCTAssertEqual(v(.pending, lost: true, durable: false, .c, gate: outdated), .wait, "bitmap not yet durable")
        XCTAssertEqual(v(.pending, lost: true, durable: true, .c, gate: outdated), .ack)
        XCTAssertEqual(v(.written, .c, at: Instant(nanoseconds: 1000)), .fail(.notPrimary(master: nil)), "lease ran out: never ack")
        XCTAssertTrue(EpochFence.admits(frameEpoch: Epoch(3), promised: Epoch(3)))
        XCTAssertFalse(EpochFence.admits(frameEpoch: Epoch(2), promised: Epoch(3)))
    }
}
