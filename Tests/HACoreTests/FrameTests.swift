import Foundation
import Crypto
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
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

    /// A payload sealed in two parts (a message head and its block, never joined) is the
    /// same frame as the parts joined: same bytes on the wire, same plaintext out.
    func testTwoPartSealEqualsJoinedSeal() throws {
        var a = FrameSealer(key: key)
        var b = FrameSealer(key: key)
        var rx = FrameSealer(key: key)
        for (h, n) in [(0, 0), (0, 5), (25, 0), (25, 4096), (8, 64 * 1024 + 3), (1, 1 << 20)] {
            let head = ByteBuffer(bytes: (0..<h).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) })
            let data = ByteBuffer(bytes: (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            var joined = head
            var d = data
            joined.writeBuffer(&d)
            var whole = ByteBuffer()
            a.seal(kind: 5, epoch: Epoch(3), payload: joined, into: &whole)
            var parts = ByteBuffer()
            b.seal(kind: 5, epoch: Epoch(3), payload: head, more: data, into: &parts)
            XCTAssertEqual(whole, parts, "\(h)+\(n) bytes")
            let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&parts))
            XCTAssertEqual(try rx.open(body).get().payload, joined)
        }
    }

    /// The payload is encrypted: a recognisable block does not appear on the wire, and the
    /// same payload sealed twice (two sequence numbers, two nonces) gives two ciphertexts.
    func testPayloadIsEncrypted() throws {
        var tx = FrameSealer(key: key)
        let block = [UInt8](repeating: 0xA5, count: 4096)
        let one = sealed(block, sealer: &tx), two = sealed(block, sealer: &tx)
        for wire in [one, two] {
            let bytes = Array(wire.readableBytesView)
            XCTAssertFalse((0..<(bytes.count - 64)).contains { i in bytes[i..<(i + 64)].allSatisfy { $0 == 0xA5 } })
        }
        XCTAssertNotEqual(Array(one.readableBytesView.dropFirst(4 + Frame.headerBytes)),
                          Array(two.readableBytesView.dropFirst(4 + Frame.headerBytes)))
    }

    /// AES-256-GCM as this build's BoringSSL computes it, checked against a vector computed
    /// independently (NIST SP 800-38D test case 14: 256-bit zero key, zero IV, one zero block).
    func testAESGCMKnownAnswer() {
        let gcm = AESGCMKey(key: SymmetricKey(data: [UInt8](repeating: 0, count: 32)))
        let nonce = [UInt8](repeating: 0, count: 12), plain = [UInt8](repeating: 0, count: 16)
        var out = [UInt8](repeating: 0, count: 32)
        nonce.withUnsafeBytes { n in
            plain.withUnsafeBytes { p in
                out.withUnsafeMutableBytes { o in
                    gcm.seal(nonce: n, aad: UnsafeRawBufferPointer(start: nil, count: 0), p, UnsafeRawBufferPointer(start: nil, count: 0), into: o.baseAddress!)
                }
            }
        }
        XCTAssertEqual(out.map { String(format: "%02x", $0) }.joined(),
                       "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919")
        var back = [UInt8](repeating: 1, count: 16)
        var tampered = out
        tampered[3] ^= 0x10
        nonce.withUnsafeBytes { n in
            out.withUnsafeBytes { o in back.withUnsafeMutableBytes { XCTAssertTrue(gcm.open(nonce: n, aad: UnsafeRawBufferPointer(start: nil, count: 0), o, into: $0.baseAddress!)) } }
            tampered.withUnsafeBytes { o in back.withUnsafeMutableBytes { XCTAssertFalse(gcm.open(nonce: n, aad: UnsafeRawBufferPointer(start: nil, count: 0), o, into: $0.baseAddress!)) } }
        }
    }

    /// A hello is authenticated with the cluster key, readable without it, and refused under
    /// another key or when altered.
    func testHelloIsAuthenticatedWithTheClusterKey() throws {
        var wire = ByteBuffer()
        Frame.sealHello(payload: ByteBuffer(string: "cluster a"), key: key, into: &wire)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        XCTAssertEqual(String(buffer: try Frame.openHello(body, key: key).get()), "cluster a")
        XCTAssertEqual(Frame.openHello(body, key: SymmetricKey(data: [UInt8](repeating: 8, count: 32))).failure, .badMAC)
        var bent = body
        bent.setInteger(UInt8(ascii: "b"), at: bent.readerIndex + Frame.headerBytes + 8)
        XCTAssertEqual(Frame.openHello(bent, key: key).failure, .badMAC)
        var tx = FrameSealer(key: key, firstSequence: 0)
        var sessionFrame = sealed([1], kind: Frame.helloKind, epoch: 0, sealer: &tx)
        let sb = try XCTUnwrap(try FrameBodyDecoder.nextBody(&sessionFrame))
        XCTAssertNotNil(Frame.openHello(sb, key: key).failure, "a session frame is not a hello")
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

    /// A flipped bit anywhere — header (epoch, kind), payload or tag — fails authentication.
    func testTamperedFrameIsRefused() throws {
        var tx = FrameSealer(key: key)
        var wire = sealed([1, 2, 3, 4], sealer: &tx)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        var fresh = FrameSealer(key: key)
        XCTAssertNotNil(try? fresh.open(body).get())
        for at in [1, Frame.headerBytes - 1, Frame.headerBytes + 1, body.readableBytes - 1] {
            var bent = body
            bent.setInteger(bent.getInteger(at: bent.readerIndex + at, as: UInt8.self)! ^ 0x04, at: bent.readerIndex + at)
            var rx = FrameSealer(key: key)
            XCTAssertEqual(rx.open(bent).failure, .badMAC, "bit flipped at byte \(at)")
        }
    }

    /// A frame of another session (other keys) is refused, even with the expected sequence.
    func testFrameOfAnotherSessionIsRefused() throws {
        let k1 = PeerSessionHandler.sessionKey(key, sender: "a", senderNonce: [1], receiverNonce: [2])
        let k2 = PeerSessionHandler.sessionKey(key, sender: "a", senderNonce: [3], receiverNonce: [2])
        var old = FrameSealer(key: k1)
        var wire = sealed([9, 9], sealer: &old)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire))
        var rx = FrameSealer(key: k2)
        XCTAssertEqual(rx.open(body).failure, .badMAC)
    }

    /// The transport's splitter yields exactly the bodies of the framing rule, whatever the
    /// read sizes: frames from empty to 1 MiB, cut at random points, several per read.
    func testSplitterYieldsTheFramingRulesBodies() throws {
        var rng = SplitMix64(seed: 7)
        var tx = FrameSealer(key: key)
        var wire = ByteBuffer()
        for n in [0, 1, 3, 4096, 17, 1 << 20, 0, 65 * 1024, 5] {
            var f = sealed((0..<n).map { UInt8(truncatingIfNeeded: $0 &+ n) }, sealer: &tx)
            wire.writeBuffer(&f)
        }
        var reference = wire
        var expected: [ByteBuffer] = []
        while let b = try FrameBodyDecoder.nextBody(&reference) { expected.append(b) }
        XCTAssertEqual(expected.count, 9)
        for round in 0..<20 {
            let channel = EmbeddedChannel(handler: FrameSplitter())
            var stream = wire
            while stream.readableBytes > 0 {
                let cut = round == 0 ? 1 : Int(rng.next() % 300_000) + 1
                try channel.writeInbound(stream.readSlice(length: min(cut, stream.readableBytes))!)
                if round == 0 && stream.readableBytes > 200_000 { try channel.writeInbound(stream.readSlice(length: stream.readableBytes - 200_000)!) }
            }
            var got: [ByteBuffer] = []
            while let b = try channel.readInbound(as: ByteBuffer.self) { got.append(b) }
            XCTAssertEqual(got, expected, "round \(round)")
            _ = try channel.finish()
        }
        let channel = EmbeddedChannel(handler: FrameSplitter())
        var bad = ByteBuffer()
        bad.writeInteger(UInt32(Frame.maxBodyBytes + 1))
        XCTAssertThrowsError(try channel.writeInbound(bad)) { XCTAssertEqual($0 as? FrameError, .tooLarge(UInt32(Frame.maxBodyBytes + 1))) }
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

    /// The largest hello there can be (three 255-byte strings, both nonces) fits the limit on
    /// frames before authentication, and is accepted under it.
    func testLargestHelloFitsTheHandshakeLimit() throws {
        let long = String(repeating: "x", count: 300)  // cut to 255 bytes on the wire
        let message = HelloMessage(hello: PeerHello(cluster: long, node: NodeID(long), channel: long),
                                   nonce: [UInt8](repeating: 1, count: 16), answering: [UInt8](repeating: 2, count: 16))
        var payload = ByteBuffer()
        message.encode(into: &payload)
        XCTAssertEqual(payload.readableBytes, HelloMessage.maxEncodedBytes)
        var wire = ByteBuffer()
        Frame.sealHello(payload: payload, key: key, into: &wire)
        XCTAssertEqual(wire.readableBytes - 4, Frame.headerBytes + HelloMessage.maxEncodedBytes + Frame.helloMACBytes)
        XCTAssertLessThanOrEqual(wire.readableBytes - 4, Frame.maxHandshakeBodyBytes)
        let body = try XCTUnwrap(try FrameBodyDecoder.nextBody(&wire, authenticated: false))
        XCTAssertEqual(HelloMessage.decode(try Frame.openHello(body, key: key).get(), answers: true)?.answering, message.answering)
    }

    /// A dialer's hello (no answered nonce) and a listener's (one) are told apart exactly: one
    /// is never read as the other, and trailing bytes are refused.
    func testHelloMessagesDecodeStrictly() {
        let dialer = HelloMessage(hello: PeerHello(cluster: "t", node: "a", channel: "test"), nonce: [UInt8](repeating: 3, count: 16), answering: nil)
        var listener = dialer
        listener.answering = [UInt8](repeating: 4, count: 16)
        var d = ByteBuffer(), l = ByteBuffer()
        dialer.encode(into: &d)
        listener.encode(into: &l)
        XCTAssertEqual(HelloMessage.decode(d, answers: false), dialer)
        XCTAssertEqual(HelloMessage.decode(l, answers: true), listener)
        XCTAssertNil(HelloMessage.decode(d, answers: true), "a dialer's hello is not a listener's")
        XCTAssertNil(HelloMessage.decode(l, answers: false), "a listener's hello is not a dialer's")
        var trailing = d
        trailing.writeInteger(UInt8(0))
        XCTAssertNil(HelloMessage.decode(trailing, answers: false))
        XCTAssertNil(HelloMessage.decode(d.getSlice(at: d.readerIndex, length: d.readableBytes - 1)!, answers: false))
    }

    /// Before authentication a length above `maxHandshakeBodyBytes` is refused on the prefix
    /// alone; after it, the session limit applies — from the very next frame of the same read.
    func testHandshakeLimitBeforeAuthentication() throws {
        var huge = ByteBuffer()
        huge.writeInteger(UInt32(32 << 20))
        var h2 = huge
        XCTAssertThrowsError(try FrameBodyDecoder.nextBody(&huge, authenticated: false)) {
            XCTAssertEqual($0 as? FrameError, .tooLargeBeforeAuthentication(32 << 20))
        }
        XCTAssertNil(try FrameBodyDecoder.nextBody(&h2), "after authentication 32 MiB is a length to wait for")
        var edge = ByteBuffer()
        edge.writeInteger(UInt32(Frame.maxHandshakeBodyBytes))
        XCTAssertNil(try FrameBodyDecoder.nextBody(&edge, authenticated: false), "the limit itself is allowed")
        edge.clear()
        edge.writeInteger(UInt32(Frame.maxHandshakeBodyBytes + 1))
        XCTAssertThrowsError(try FrameBodyDecoder.nextBody(&edge, authenticated: false))

        // One read: a small frame, then a 64 KiB one. The handler after the splitter marks the
        // session authenticated on the first, so the second passes.
        var tx = FrameSealer(key: key)
        var wire = sealed([1], sealer: &tx)
        var big = sealed([UInt8](repeating: 9, count: 64 * 1024), sealer: &tx)
        wire.writeBuffer(&big)
        for lift in [true, false] {
            let splitter = FrameSplitter(authenticated: false)
            let bodies = NIOLockedValueBox(0)
            let channel = EmbeddedChannel(handlers: [splitter, AuthenticateOnFirstBody(splitter: splitter, lift: lift, bodies: bodies)])
            if lift {
                XCTAssertNoThrow(try channel.writeInbound(wire))
                XCTAssertEqual(bodies.withLockedValue { $0 }, 2)
            } else {
                XCTAssertThrowsError(try channel.writeInbound(wire)) {
                    XCTAssertEqual($0 as? FrameError, .tooLargeBeforeAuthentication(UInt32(Frame.minBodyBytes + 64 * 1024)))
                }
                XCTAssertEqual(bodies.withLockedValue { $0 }, 1)
            }
            _ = try? channel.finish()
        }
        XCTAssertEqual(keyConfirmationFrameKind, 254)  // PeerHandshakeTests spells it out
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
            keysForCluster: { $0 == "t" ? [self.key] : [] },
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

    /// A key rollover (operator guide, "Security"): a listener holding the new key and the
    /// old one accepts dialers on either and says which opened the session; a dialer on a key
    /// it does not hold is refused.
    func testListenerAcceptsEveryKeyOfARollover() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let newKey = SymmetricKey(data: [UInt8](repeating: 0x4E, count: 32))
        let opened = NIOLockedValueBox<[Int]>([])
        let refused = NIOLockedValueBox<[String]>([])
        let listener = try PeerListener.bind(
            host: "127.0.0.1", port: 0, group: group, idleTimeout: .seconds(2),
            keysForCluster: { $0 == "t" ? [newKey, self.key] : [] },
            refused: { why in refused.withLockedValue { $0.append(why) } },
            route: { _ in
                (PeerHello(cluster: "t", node: "b", channel: "test"), PeerSessionCallbacks(
                    established: { c in opened.withLockedValue { $0.append(c.keyIndex) } },
                    frame: { c, f in c.send(kind: 2, epoch: f.epoch, payload: f.payload) },
                    closed: { _, _ in }))
            }).wait()
        defer { _ = try? listener.close().wait() }
        let port = try XCTUnwrap(listener.localPort)

        func dial(_ key: SymmetricKey) throws -> (echoed: Bool, dialerKeyIndex: Int?) {
            let echoed = NIOLockedValueBox(false), ended = NIOLockedValueBox(false)
            let index = NIOLockedValueBox<Int?>(nil)
            let d = PeerDialer(group: group, host: "127.0.0.1", port: port,
                               local: PeerHello(cluster: "t", node: "a", channel: "test"), key: key,
                               idleTimeout: .seconds(2), retryDelay: .seconds(10),
                               callbacks: PeerSessionCallbacks(
                                established: { c in
                                    index.withLockedValue { $0 = c.keyIndex }
                                    c.send(kind: 1, epoch: Epoch(1), payload: ByteBuffer(string: "x"))
                                },
                                frame: { _, f in echoed.withLockedValue { $0 = String(buffer: f.payload) == "x" } },
                                closed: { _, _ in ended.withLockedValue { $0 = true } }))
            d.start()
            defer { d.stop() }
            try waitUntil { echoed.withLockedValue { $0 } || ended.withLockedValue { $0 } }
            return (echoed.withLockedValue { $0 }, index.withLockedValue { $0 })
        }

        let old = try dial(key)
        XCTAssertTrue(old.echoed, "a peer still on the old key is served during the rollover")
        XCTAssertEqual(old.dialerKeyIndex, 0, "the dialer always uses its own key_file")
        XCTAssertTrue(try dial(newKey).echoed, "a peer on the new key is served")
        try waitUntil { opened.withLockedValue { $0.count } == 2 }
        XCTAssertEqual(opened.withLockedValue { $0 }, [1, 0], "the listener says which key opened each session")
        XCTAssertFalse(try dial(SymmetricKey(data: [UInt8](repeating: 0x77, count: 32))).echoed, "a key outside the rollover is refused")
        try waitUntil { !refused.withLockedValue { $0 }.isEmpty }
        XCTAssertTrue(refused.withLockedValue { $0 }.contains { $0.contains("authentication") }, "\(refused.withLockedValue { $0 })")
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

/// Counts bodies and, when `lift`, marks the splitter authenticated on the first, as the
/// session handler does on a verified hello.
private final class AuthenticateOnFirstBody: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let splitter: FrameSplitter
    let lift: Bool
    let bodies: NIOLockedValueBox<Int>
    init(splitter: FrameSplitter, lift: Bool, bodies: NIOLockedValueBox<Int>) { self.splitter = splitter; self.lift = lift; self.bodies = bodies }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        bodies.withLockedValue { $0 += 1 }
        if lift { splitter.authenticated = true }
    }
}
