import Crypto
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import XCTest
@testable import HACore
@testable import HAShell

/// Keepalives and silence detection of authenticated sessions (design.md §3 "Frames"): one
/// sweeping timer per event loop, a keepalive only after idleTimeout/2 without sending, and a
/// silent peer dropped after its idle timeout.
final class KeepaliveTests: XCTestCase {
    let key = SymmetricKey(data: [UInt8](repeating: 7, count: 32))

    /// The worst gap between two frames of a healthy sender (keepalive threshold + sweep period)
    /// stays at 2/3 of the idle timeout, as with the earlier "after a third, checked every third".
    func testWorstHealthyGapLeavesAThirdOfTheIdleTimeout() {
        for ms in [300, 800, 2400, 10_000] {
            let idle = TimeAmount.milliseconds(Int64(ms))
            let gap = PeerSessionHandler.keepaliveAfter(idle) + PeerSessionHandler.sweepPeriod(idle)
            XCTAssertLessThanOrEqual(gap.nanoseconds, idle.nanoseconds * 2 / 3, "idle \(ms) ms")
            // A sender renewing more often than idle/2 (e.g. 1 Hz at a 2.4 s timeout) sends no keepalive.
            XCTAssertGreaterThan(PeerSessionHandler.keepaliveAfter(idle).nanoseconds, idle.nanoseconds / 3)
        }
    }

    /// Against a listener with a 1.2 s idle timeout, a hand-driven peer: (1) sends a frame every
    /// 150 ms, each echoed, and receives no keepalive; (2) goes quiet and receives keepalives;
    /// (3) stays quiet and is dropped for silence after about the idle timeout.
    func testTrafficSuppressesKeepalivesQuietGetsThemSilenceIsDropped() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let idle = TimeAmount.milliseconds(1200)
        let closed = NIOLockedValueBox<[String]>([])
        let listener = try PeerListener.bind(
            host: "127.0.0.1", port: 0, group: group, idleTimeout: idle,
            keysForCluster: { $0 == "t" ? [self.key] : [] },
            route: { _ in
                (PeerHello(cluster: "t", node: "b", channel: "test"), PeerSessionCallbacks(
                    established: { _ in },
                    frame: { c, f in c.send(kind: 2, epoch: f.epoch, payload: f.payload) },
                    closed: { _, why in closed.withLockedValue { $0.append(why) } }))
            }).wait()
        defer { _ = try? listener.close().wait() }
        let raw = RawPeer(key: key, hello: PeerHello(cluster: "t", node: "a", channel: "test"))
        let channel = try ClientBootstrap(group: group)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(FrameSplitter())
                    try ch.pipeline.syncOperations.addHandler(raw)
                }
            }
            .connect(host: "127.0.0.1", port: try XCTUnwrap(listener.localPort)).wait()
        defer { channel.close(promise: nil) }
        try waitUntil { raw.isEstablished }

        // (1) 150 ms traffic, well inside the 600 ms keepalive threshold: echoes only.
        for i in 0..<10 {
            if i > 0 { usleep(150_000) }
            try channel.eventLoop.submit { raw.send(kind: 1, on: channel) }.wait()
        }
        let quietFrom = Date()  // our last frame
        usleep(100_000)  // its echo
        let busy = raw.kinds.withLockedValue { $0 }
        XCTAssertGreaterThanOrEqual(busy.filter { $0 == 2 }.count, 9, "\(busy)")
        XCTAssertEqual(busy.filter { $0 == keepaliveFrameKind }.count, 0, "keepalives despite regular traffic: \(busy)")

        // (2)+(3) quiet: the listener fills the silence with keepalives, then drops us.
        raw.kinds.withLockedValue { $0.removeAll() }
        try waitUntil(seconds: 10) { !closed.withLockedValue { $0 }.isEmpty }
        let droppedAfter = Date().timeIntervalSince(quietFrom)
        XCTAssertGreaterThanOrEqual(raw.kinds.withLockedValue { $0 }.filter { $0 == keepaliveFrameKind }.count, 1)
        XCTAssertEqual(closed.withLockedValue { $0 }, ["peer silent for more than 1200 ms"])
        XCTAssertGreaterThan(droppedAfter, 1.1, "dropped before the idle timeout")
        XCTAssertLessThan(droppedAfter, 4.0, "silence detected far too late")
    }

    /// All sessions of one event loop share one sweeper; it goes away with the last session.
    func testOneSweeperPerLoopForAllSessions() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let idle = TimeAmount.seconds(2)
        let established = NIOLockedValueBox(0)
        let listener = try PeerListener.bind(
            host: "127.0.0.1", port: 0, group: group, idleTimeout: idle,
            keysForCluster: { _ in [self.key] },
            route: { r in
                (PeerHello(cluster: r.cluster, node: "arb", channel: "test"),
                 PeerSessionCallbacks(established: { _ in }, frame: { _, _ in }, closed: { _, _ in }))
            }).wait()
        defer { _ = try? listener.close().wait() }
        let port = try XCTUnwrap(listener.localPort)
        let dialers = (0..<3).map { i in
            PeerDialer(group: group, host: "127.0.0.1", port: port,
                       local: PeerHello(cluster: "c\(i)", node: "a", channel: "test"), key: key, idleTimeout: idle,
                       callbacks: PeerSessionCallbacks(established: { _ in established.withLockedValue { $0 += 1 } },
                                                       frame: { _, _ in }, closed: { _, _ in }))
        }
        dialers.forEach { $0.start() }
        try waitUntil { established.withLockedValue { $0 } == 3 }
        let period = PeerSessionHandler.sweepPeriod(idle)
        try waitUntil { SessionSweeper.count(on: loop, period: period) == 6 }  // 3 dialer + 3 listener sessions
        dialers.forEach { $0.stop() }
        try waitUntil { SessionSweeper.count(on: loop, period: period) == 0 }
    }

    private func waitUntil(seconds: Double = 5, _ cond: () -> Bool) throws {
        let end = Date().addingTimeInterval(seconds)
        while !cond() {
            guard Date() < end else { return XCTFail("condition not met within \(seconds) s") }
            usleep(10_000)
        }
    }
}

/// The dialer side of the session protocol driven by hand (hello, session keys, key
/// confirmation, frames), so a test can make it fall silent and see every frame the other
/// side sends, keepalives included.
final class RawPeer: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let key: SymmetricKey
    let hello: PeerHello
    let kinds = NIOLockedValueBox<[UInt8]>([])
    private let established = NIOLockedValueBox(false)
    private let nonce = (0..<16).map { _ in UInt8.random(in: 0...255) }
    private var sendSealer: FrameSealer?  // event loop only
    private var openSealer: FrameSealer?

    init(key: SymmetricKey, hello: PeerHello) { self.key = key; self.hello = hello }
    var isEstablished: Bool { established.withLockedValue { $0 } }

    func channelActive(context: ChannelHandlerContext) {
        var p = ByteBuffer()
        PeerSessionHandler.writeString(hello.cluster, to: &p)
        PeerSessionHandler.writeString(hello.node.name, to: &p)
        PeerSessionHandler.writeString(hello.channel, to: &p)
        p.writeBytes(nonce)
        var out = ByteBuffer()
        Frame.sealHello(payload: p, key: key, into: &out)
        context.writeAndFlush(NIOAny(out), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let body = unwrapInboundIn(data)
        if var opener = openSealer {
            guard case .success(let f) = opener.open(body) else { return context.close(promise: nil) }
            openSealer = opener
            kinds.withLockedValue { $0.append(f.kind) }
            return
        }
        var peek = body
        peek.moveReaderIndex(forwardBy: Frame.headerBytes)
        guard PeerSessionHandler.readString(&peek) != nil, let node = PeerSessionHandler.readString(&peek),
              PeerSessionHandler.readString(&peek) != nil, let theirs = peek.readBytes(length: 16) else {
            return context.close(promise: nil)
        }
        sendSealer = FrameSealer(key: PeerSessionHandler.sessionKey(key, sender: hello.node.name, senderNonce: nonce, receiverNonce: theirs))
        openSealer = FrameSealer(key: PeerSessionHandler.sessionKey(key, sender: node, senderNonce: theirs, receiverNonce: nonce))
        // The listener opens the session only on the dialer's key confirmation (sequence 1).
        var confirmation = ByteBuffer()
        sendSealer!.seal(kind: keyConfirmationFrameKind, epoch: .zero, payload: ByteBuffer(), into: &confirmation)
        context.writeAndFlush(NIOAny(confirmation), promise: nil)
        established.withLockedValue { $0 = true }
    }

    /// On the channel's event loop.
    func send(kind: UInt8, on channel: Channel) {
        guard var s = sendSealer else { return }
        var out = ByteBuffer()
        s.seal(kind: kind, epoch: Epoch(1), payload: ByteBuffer(string: "x"), into: &out)
        sendSealer = s
        channel.writeAndFlush(out, promise: nil)
    }
}
