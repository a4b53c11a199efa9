import Foundation
import Crypto
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import XCTest
@testable import HACore
@testable import HAShell

/// Frames and authenticated sessions (design.md §3 "Frames"), byte for byte.
final class FrameTests: XCTestCase {
    let key = SymmetricKey(data: [UInt8](repeating: 7, count: 32))

    private func sealed(_ payload: [UInt8], kind: UInt8 = 3, epoch: UInt64 = 9, sealer: inout FrameSealer) -> ByteBuffer {
        var out = ByteBuffer()
        sealer.seal(kind: kind, epoch: Epoch(epoch), payload: ByteBuffer(bytes: payload), into: &out)
        return out
    }

    func testRoundTripFedOneByteAtATime() throws {
        var tx = FrameSealer(key: key)
        var rx = FrameSealer(key: key)
        var wire = ByteBuffer()
        for i in 0..<3 {
            var one = sealed([UInt8](repeating: UInt8(i), count: 100 * i), sealer: &tx)
            wire.writeBuffer(&one)
        }
        var pending = ByteBuffer()
        var frames: [Frame] = []
        while let byte = wire.readBytes(length: 1) {
            pending.writeBytes(byte)
            while let body = try FrameBodyDecoder.nextBody(&pending) {
                frames.append(try rx.open(body).get())
            }
        }
        XCTAssertEqual(frames.map(\.sequence), [1, 2, 3])
        XCTAssertEqual(frames.map(\.payload.readableBytes), [0, 100, 200])
        XCTAssertEqual(frames[2].epoch, Epoch(9))
        XCTAssertEqual(frames[2].kind, 3)
    }

    /// The precomputed-pad MAC equals swift-crypto's HMAC-SHA256 for keys shorter than, equal
    /// to and longer than a block, and an RFC 4231 test vector (case 2).
    func testFrameMACMatchesHMACSHA256() {
        var rng = SplitMix64(seed: 42)
        for keyBytes in [1, 32, 48, 64, 65, 131] {
            for length in [0, 1, 55, 56, 63, 64, 65, 4096 + 18] {
                let k = SymmetricKey(data: (0..<keyBytes).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
                let data = (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                let mine = data.withUnsafeBytes { Array(FrameMAC(key: k).tag($0)) }
                XCTAssertEqual(mine, Array(HMAC<SHA256>.authenticationCode(for: data, using: k)), "key \(keyBytes) B, data \(length) B")
                var bad = mine
                bad[length % 32] ^= 1
                data.withUnsafeBytes { d in
                    mine.withUnsafeBytes { XCTAssertTrue(FrameMAC(key: k).isValid(tag: $0, for: d)) }
                    bad.withUnsafeBytes { XCTAssertFalse(FrameMAC(key: k).isValid(tag: $0, for: d)) }
                }
            }
        }
        let jefe = SymmetricKey(data: Array("Jefe".utf8))
        let tag = Array("what do ya want for nothing?".utf8).withUnsafeBytes { Array(FrameMAC(key: jefe).tag($0)) }
        XCTAssertEqual(tag.map { String(format: "%02x", $0) }.joined(),
                       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }

    /// Sealing without copying the payload puts the same bytes on the wire as sealing into one buffer.
    func testSplitSealEqualsContiguousSeal() throws {
        var a = FrameSealer(key: key)
        var b = FrameSealer(key: key)
        var rx = FrameSealer(key: key)
        for n in [0, 1, 4096, 64 * 1024 + 3] {
            let payload = ByteBuffer(bytes: (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            var whole = ByteBuffer()
            a.seal(kind: 5, epoch: Epoch(3), payload: payload, into: &whole)
            var header = ByteBuffer(), trailer = ByteBuffer()
            b.seal(kind: 5, epoch: Epoch(3), payload: payload, header: &header, trailer: &trailer)
            var p = payload
            header.writeBuffer(&p)
            header.writeBuffer(&trailer)
            XCTAssertEqual(whole, header, "\(n) bytes")
            let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&header))
            XCTAssertEqual(try rx.open(body).get().payload, payload)
        }
    }

    func testWrongKeyIsRefused() throws {
        var tx = FrameSealer(key: key)
        var rx = FrameSealer(key: SymmetricKey(data: [UInt8](repeating: 8, count: 32)))
        var wire = sealed([1, 2, 3], sealer: &tx)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        XCTAssertEqual(rx.open(body).failure, .badMAC)
    }

    func testReplayedFrameIsRefused() throws {
        var tx = FrameSealer(key: key)
        var rx = FrameSealer(key: key)
        var wire = sealed([1], sealer: &tx)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        XCTAssertNotNil(try? rx.open(body).get())
        XCTAssertEqual(rx.open(body).failure, .replayed(expected: 2, got: 1))
    }

    func testTamperedPayloadIsRefused() throws {
        var tx = FrameSealer(key: key)
        var rx = FrameSealer(key: key)
        var wire = sealed([1, 2, 3, 4], sealer: &tx)
        var body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        body.setInteger(UInt8(0xFF), at: body.readerIndex + Frame.headerBytes + 1)
        XCTAssertEqual(rx.open(body).failure, .badMAC)
    }

    func testLengthIsBoundedBeforeItIsTrusted() {
        var huge = ByteBuffer()
        huge.writeInteger(UInt32.max)
        XCTAssertThrowsError(try FrameBodyDecoder.nextBody(&huge)) { XCTAssertEqual($0 as? FrameError, .tooLarge(UInt32.max)) }
        var tiny = ByteBuffer()
        tiny.writeInteger(UInt32(3))
        tiny.writeBytes([0, 0, 0])
        XCTAssertThrowsError(try FrameBodyDecoder.nextBody(&tiny)) { XCTAssertEqual($0 as? FrameError, .tooSmall(3)) }
    }

    /// Two real sessions over loopback: frames flow both ways; a dialer with the wrong key is
    /// refused and the listener keeps serving the next, correct dialer.
    func testSessionsOverLoopback() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let got = NIOLockedValueBox<[String]>([])
        let closed = NIOLockedValueBox<[String]>([])
        let listenerHello = PeerHello(cluster: "t", node: "b", channel: "test")
        let listener = try PeerListener.bind(
            host: "127.0.0.1", port: 0, group: group, idleTimeout: .seconds(2),
            keyForCluster: { $0 == "t" ? self.key : nil },
            refused: { why in closed.withLockedValue { $0.append(why) } },
            route: { remote in
                guard remote.channel == "test" else { return nil }
                return (listenerHello, PeerSessionCallbacks(
                    established: { _ in },
                    frame: { c, f in
                        got.withLockedValue { $0.append(String(buffer: f.payload)) }
                        c.send(kind: 2, epoch: f.epoch, payload: ByteBuffer(string: "echo:" + String(buffer: f.payload)))
                    },
                    closed: { _, why in closed.withLockedValue { $0.append(why) } }))
            }).wait()
        defer { _ = try? listener.close().wait() }
        let port = try XCTUnwrap(listener.localPort)

        let badDone = NIOLockedValueBox(false)
        let bad = PeerDialer(group: group, host: "127.0.0.1", port: port,
                             local: PeerHello(cluster: "t", node: "a", channel: "test"),
                             key: SymmetricKey(data: [UInt8](repeating: 1, count: 32)), idleTimeout: .seconds(2),
                             retryDelay: .seconds(10),
                             callbacks: PeerSessionCallbacks(established: { _ in XCTFail("wrong key established") },
                                                             frame: { _, _ in }, closed: { _, _ in badDone.withLockedValue { $0 = true } }))
        bad.start()
        try waitUntil { badDone.withLockedValue { $0 } }
        bad.stop()

        let replies = NIOLockedValueBox<[String]>([])
        let good = PeerDialer(group: group, host: "127.0.0.1", port: port,
                              local: PeerHello(cluster: "t", node: "a", channel: "test"), key: key, idleTimeout: .seconds(2),
                              callbacks: PeerSessionCallbacks(
                                established: { c in c.send(kind: 1, epoch: Epoch(4), payload: ByteBuffer(string: "hello")) },
                                frame: { _, f in replies.withLockedValue { $0.append(String(buffer: f.payload)) } },
                                closed: { _, _ in }))
        good.start()
        defer { good.stop() }
        try waitUntil { replies.withLockedValue { $0 } == ["echo:hello"] }
        XCTAssertEqual(got.withLockedValue { $0 }, ["hello"])
        XCTAssertTrue(closed.withLockedValue { $0 }.contains { $0.contains("authentication") }, "\(closed.withLockedValue { $0 })")
    }

    private func waitUntil(_ cond: () -> Bool, seconds: Double = 5) throws {
        let end = Date().addingTimeInterval(seconds)
        while !cond() {
            guard Date() < end else { return XCTFail("condition not met within \(seconds) s") }
            usleep(10_000)
        }
    }
}

extension Result {
    var failure: Failure? { if case .failure(let e) = self { return e }; return nil }
}
