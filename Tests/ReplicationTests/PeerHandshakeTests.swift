@preconcurrency import Crypto
import Foundation
import HACore
@testable import HAShell
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import XCTest

/// Issue 13: what a connection that has not authenticated can make a peer do
/// (architecture.md "Security"). The other end is a plain TCP client speaking bytes by
/// hand: an oversized or trickled frame, silence, a replayed dialer hello; or a hand-made
/// listener whose hello answers another connection. Every case is closed and logged, and the
/// listener goes on serving a real dialer.
final class PeerHandshakeTests: XCTestCase {
    let key = SymmetricKey(data: [UInt8](repeating: 7, count: 32))
    /// `keyConfirmationFrameKind`, spelled out so these tests also build against the
    /// transport before issue 13 (to see them fail there).
    static let keyConfirmationKind: UInt8 = 254

    /// An echoing listener ("b" of cluster "t", channel "test") and what happened to it.
    final class EchoListener: @unchecked Sendable {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var listener: PeerListener!
        let established = NIOLockedValueBox(0)
        let refused = NIOLockedValueBox<[String]>([])
        let closed = NIOLockedValueBox<[String]>([])
        var port: Int { listener.localPort! }

        init(key: SymmetricKey, idleTimeout: TimeAmount) throws {
            let (established, refused, closed) = (self.established, self.refused, self.closed)
            listener = try PeerListener.bind(
                host: "127.0.0.1", port: 0, group: group, idleTimeout: idleTimeout,
                keysForCluster: { $0 == "t" ? [key] : [] },
                refused: { why in refused.withLockedValue { $0.append(why) } },
                route: { remote in
                    guard remote.node == "a", remote.channel == "test" else { return nil }
                    return (PeerHello(cluster: "t", node: "b", channel: "test"), PeerSessionCallbacks(
                        established: { _ in established.withLockedValue { $0 += 1 } },
                        frame: { c, f in c.send(kind: 2, epoch: f.epoch, payload: f.payload) },
                        closed: { _, why in closed.withLockedValue { $0.append(why) } }))
                }).wait()
        }

        func refusals(containing s: String) -> [String] { refused.withLockedValue { $0 }.filter { $0.contains(s) } }

        func shutdown() {
            _ = try? listener.close().wait()
            try? group.syncShutdownGracefully()
        }
    }

    func echoListener(idleTimeout: TimeAmount = .seconds(2)) throws -> EchoListener {
        let l = try EchoListener(key: key, idleTimeout: idleTimeout)
        addTeardownBlock { l.shutdown() }
        return l
    }

    /// A real dialer ("a") opens a session, sends a frame and gets it echoed; then stops.
    func assertServesARealDialer(_ l: EchoListener, file: StaticString = #filePath, line: UInt = #line) throws {
        let echoed = NIOLockedValueBox(false)
        let d = PeerDialer(group: l.group, host: "127.0.0.1", port: l.port,
                           local: PeerHello(cluster: "t", node: "a", channel: "test"), key: key, idleTimeout: .seconds(2),
                           callbacks: PeerSessionCallbacks(
                            established: { c in c.send(kind: 1, epoch: Epoch(1), payload: ByteBuffer(string: "ping")) },
                            frame: { _, f in if String(buffer: f.payload) == "ping" { echoed.withLockedValue { $0 = true } } },
                            closed: { _, _ in }))
        d.start()
        defer { d.stop() }
        waitUntil("a real dialer's frame to be echoed", timeout: .seconds(10), file: file, line: line) { echoed.withLockedValue { $0 } }
    }

    static func lengthPrefix(_ n: Int) -> [UInt8] { withUnsafeBytes(of: UInt32(n).bigEndian) { Array($0) } }

    /// A dialer's hello as `PeerDialer` sends it (length prefix included), with `nonce`.
    func dialerHello(nonce: [UInt8], node: String = "a") -> [UInt8] {
        var p = ByteBuffer()
        PeerSessionHandler.writeString("t", to: &p)
        PeerSessionHandler.writeString(node, to: &p)
        PeerSessionHandler.writeString("test", to: &p)
        p.writeBytes(nonce)
        var out = ByteBuffer()
        Frame.sealHello(payload: p, key: key, into: &out)
        return Array(out.readableBytesView)
    }

    /// Waits at most `seconds` for the listener to close `c`; how long it took, or nil.
    func closedWithin(_ seconds: Double, _ c: RawClient, from start: Date, trickle: [UInt8]? = nil) -> TimeInterval? {
        var next = 0
        repeat {  // at least one look, however late
            if let t = trickle, next < t.count {
                // One byte every 20 ms: each is "activity", none completes a frame.
                guard c.send([t[next]]) else { return Date().timeIntervalSince(start) }
                next += 1
            }
            if c.isClosedByPeer(waitingMilliseconds: 20) { return Date().timeIntervalSince(start) }
        } while Date().timeIntervalSince(start) < seconds
        return nil
    }

    /// A 4-byte length of 32 MiB, and a 1 MiB one whose body then trickles in, are refused
    /// on the length alone: closed at once, the reason logged, nothing waiting for the body.
    func testOversizedFrameBeforeTheHelloIsRefusedAtOnce() throws {
        let l = try echoListener()
        let start = Date()
        let huge = try RawClient(port: l.port)
        defer { huge.close() }
        let trickler = try RawClient(port: l.port)
        defer { trickler.close() }
        XCTAssertTrue(huge.send(Self.lengthPrefix(32 << 20)))
        XCTAssertTrue(trickler.send(Self.lengthPrefix(1 << 20)))
        let hugeClosed = closedWithin(3, huge, from: start)
        let trickleClosed = closedWithin(3, trickler, from: start, trickle: [UInt8](repeating: 0x41, count: 1000))
        XCTAssertLessThan(try XCTUnwrap(hugeClosed, "32 MiB length left open"), 1.5)
        XCTAssertLessThan(try XCTUnwrap(trickleClosed, "trickled 1 MiB frame left open"), 1.5)
        waitUntil("both refusals logged") { l.refusals(containing: "exceeds the handshake limit").count == 2 }
        XCTAssertEqual(l.refusals(containing: "before the session is authenticated").count, 2, "\(l.refused.withLockedValue { $0 })")
        XCTAssertEqual(l.established.withLockedValue { $0 }, 0)
        try assertServesARealDialer(l)
        XCTAssertEqual(l.established.withLockedValue { $0 }, 1)
    }

    /// A connection that sends nothing, and one that trickles a frame small enough for a
    /// hello one byte at a time (every byte is activity), are both closed at the handshake
    /// timeout, counted from the connection and not from the last byte.
    func testSilentOrTricklingConnectionIsClosedAtTheHandshakeTimeout() throws {
        let l = try echoListener(idleTimeout: .milliseconds(600))
        let limit = PeerSessionHandler.handshakeTimeout.nanoseconds / 1_000_000_000
        let start = Date()
        let silent = try RawClient(port: l.port)
        defer { silent.close() }
        let trickler = try RawClient(port: l.port)
        defer { trickler.close() }
        XCTAssertTrue(trickler.send(Self.lengthPrefix(2000)))
        let trickleClosed = closedWithin(Double(limit) + 4, trickler, from: start, trickle: [UInt8](repeating: 0x41, count: 2000))
        let silentClosed = closedWithin(Double(limit) + 4, silent, from: start)
        for (what, t) in [("silent", silentClosed), ("trickling", trickleClosed)] {
            let after = try XCTUnwrap(t, "\(what) connection left open")
            XCTAssertGreaterThan(after, Double(limit) - 0.5, "\(what) connection closed before the handshake timeout")
            XCTAssertLessThan(after, Double(limit) + 2, "\(what) connection closed long after the handshake timeout")
        }
        waitUntil("both refusals logged") { l.refusals(containing: "no hello within \(limit * 1000) ms").count == 2 }
        try assertServesARealDialer(l)
    }

    /// A dialer's hello replayed on fresh connections — alone, and followed by the key
    /// confirmation of the session it opened — never becomes a session: the owner is told of
    /// the genuine session only. (That a live link survives is `LinkSecurityTests`.)
    func testReplayedDialerHelloIsNeverEstablished() throws {
        let l = try echoListener()
        let nonce = (0..<16).map { UInt8($0 * 11) }
        let hello = dialerHello(nonce: nonce)

        // The genuine session: the hello, then the confirmation under the key that binds the
        // listener's answer. A capture of it is what the replays send.
        let genuine = try RawClient(port: l.port)
        defer { genuine.close() }
        XCTAssertTrue(genuine.send(hello))
        let answer = try XCTUnwrap(genuine.readFrame(seconds: 3), "no answer to the genuine hello")
        var answerBody = ByteBuffer(bytes: answer.dropFirst(4))
        XCTAssertNoThrow(try Frame.openHello(answerBody, key: key).get(), "the listener's hello is authenticated")
        answerBody.moveReaderIndex(forwardBy: Frame.headerBytes)
        _ = PeerSessionHandler.readString(&answerBody); _ = PeerSessionHandler.readString(&answerBody); _ = PeerSessionHandler.readString(&answerBody)
        let theirs = try XCTUnwrap(answerBody.readBytes(length: 16))
        XCTAssertEqual(answerBody.readBytes(length: 16), nonce, "the listener's hello answers the dialer's nonce")
        var tx = FrameSealer(key: PeerSessionHandler.sessionKey(key, sender: "a", senderNonce: nonce, receiverNonce: theirs))
        var confirmation = ByteBuffer()
        tx.seal(kind: Self.keyConfirmationKind, epoch: .zero, payload: ByteBuffer(), into: &confirmation)
        var ping = ByteBuffer()
        tx.seal(kind: 1, epoch: Epoch(1), payload: ByteBuffer(string: "ping"), into: &ping)
        XCTAssertTrue(genuine.send(Array(confirmation.readableBytesView) + Array(ping.readableBytesView)))
        XCTAssertNotNil(genuine.readFrame(seconds: 3), "the genuine session echoes")
        XCTAssertEqual(l.established.withLockedValue { $0 }, 1)

        let start = Date()
        let withConfirmation = try RawClient(port: l.port)
        defer { withConfirmation.close() }
        let helloOnly = try RawClient(port: l.port)
        defer { helloOnly.close() }
        XCTAssertTrue(withConfirmation.send(hello + Array(confirmation.readableBytesView)))
        XCTAssertTrue(helloOnly.send(hello))
        let limit = Double(PeerSessionHandler.handshakeTimeout.nanoseconds) / 1e9
        XCTAssertLessThan(try XCTUnwrap(closedWithin(2, withConfirmation, from: start), "hello + old confirmation left open"), 2)
        XCTAssertLessThan(try XCTUnwrap(closedWithin(limit + 3, helloOnly, from: start), "replayed hello left open"), limit + 2)
        waitUntil("both replays logged") { l.refusals(containing: "hello replayed or key not confirmed").count == 2 }
        XCTAssertEqual(l.refusals(containing: "frame authentication failed").count, 1, "\(l.refused.withLockedValue { $0 })")
        XCTAssertEqual(l.established.withLockedValue { $0 }, 1, "a replay was handed to the owner as a session")
    }

    /// A dialer refuses a listener's hello that answers another connection's nonce (a
    /// replayed listener), and establishes with one that answers its own.
    func testDialerRefusesAListenerHelloThatAnswersAnotherConnection() throws {
        for replayed in [true, false] {
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            defer { try? group.syncShutdownGracefully() }
            let fake = FakeListener(key: key, answerWithStaleNonce: replayed)
            let server = try ServerBootstrap(group: group)
                .childChannelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(FrameSplitter())
                        try ch.pipeline.syncOperations.addHandler(fake)
                    }
                }
                .bind(host: "127.0.0.1", port: 0).wait()
            defer { server.close(promise: nil) }
            let established = NIOLockedValueBox(false), closed = NIOLockedValueBox<String?>(nil)
            let d = PeerDialer(group: group, host: "127.0.0.1", port: server.localAddress!.port!,
                               local: PeerHello(cluster: "t", node: "a", channel: "test"), key: key,
                               idleTimeout: .seconds(2), retryDelay: .seconds(30),
                               callbacks: PeerSessionCallbacks(established: { _ in established.withLockedValue { $0 = true } },
                                                               frame: { _, _ in }, closed: { _, why in closed.withLockedValue { $0 = why } }))
            d.start()
            defer { d.stop() }
            if replayed {
                waitUntil("the dialer to drop the replayed listener") { closed.withLockedValue { $0 } != nil }
                XCTAssertFalse(established.withLockedValue { $0 }, "a replayed listener hello was taken for a session")
                XCTAssertTrue(closed.withLockedValue { $0 }?.contains("does not answer this connection's nonce") ?? false,
                              "\(closed.withLockedValue { $0 } ?? "")")
            } else {
                waitUntil("the dialer to establish with a live listener") { established.withLockedValue { $0 } }
                waitUntil("its key confirmation to open") { fake.confirmed.withLockedValue { $0 } }
            }
        }
    }
}

/// A listener made by hand: answers a dialer's hello with a listener hello whose answered
/// nonce is the dialer's own, or a stale one (as a replay from another connection would
/// carry), and checks the dialer's first frame is the key confirmation.
final class FakeListener: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let key: SymmetricKey
    let answerWithStaleNonce: Bool
    let confirmed = NIOLockedValueBox(false)
    private let nonce = (0..<16).map { _ in UInt8.random(in: 0...255) }
    private var opener: FrameSealer?  // event loop only

    init(key: SymmetricKey, answerWithStaleNonce: Bool) { self.key = key; self.answerWithStaleNonce = answerWithStaleNonce }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var body = unwrapInboundIn(data)
        if var o = opener {
            if case .success(let f) = o.open(body), f.kind == PeerHandshakeTests.keyConfirmationKind, f.sequence == 1 {
                confirmed.withLockedValue { $0 = true }
            }
            opener = o
            return
        }
        body.moveReaderIndex(forwardBy: Frame.headerBytes)
        guard PeerSessionHandler.readString(&body) != nil, let node = PeerSessionHandler.readString(&body),
              PeerSessionHandler.readString(&body) != nil, let theirs = body.readBytes(length: 16) else { return }
        var p = ByteBuffer()
        PeerSessionHandler.writeString("t", to: &p)
        PeerSessionHandler.writeString("b", to: &p)
        PeerSessionHandler.writeString("test", to: &p)
        p.writeBytes(nonce)
        p.writeBytes(answerWithStaleNonce ? theirs.map { $0 ^ 0xFF } : theirs)
        var out = ByteBuffer()
        Frame.sealHello(payload: p, key: key, into: &out)
        context.writeAndFlush(NIOAny(out), promise: nil)
        opener = FrameSealer(key: PeerSessionHandler.sessionKey(key, sender: node, senderNonce: theirs, receiverNonce: nonce))
    }
}
