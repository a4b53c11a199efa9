@preconcurrency import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization

/// Who is at the other end of a session, as its hello claimed and its MAC proved.
public struct PeerHello: Hashable, Sendable {
    public var cluster: String
    public var node: NodeID
    /// The channel's purpose, e.g. "quorum" or "replication".
    public var channel: String
    public init(cluster: String, node: NodeID, channel: String) {
        self.cluster = cluster; self.node = node; self.channel = channel
    }
}

/// What a session reports to its owner. Every call arrives on the connection's event loop.
public struct PeerSessionCallbacks {
    public var established: (PeerConnection) -> Void
    public var frame: (PeerConnection, Frame) -> Void
    public var closed: (PeerConnection?, String) -> Void
    public init(established: @escaping (PeerConnection) -> Void,
                frame: @escaping (PeerConnection, Frame) -> Void,
                closed: @escaping (PeerConnection?, String) -> Void) {
        self.established = established; self.frame = frame; self.closed = closed
    }
}

/// An encrypted, authenticated, replay-protected session over TCP (design.md §3 "Frames").
///
/// Handshake (`PeerSessionHandler`): each side sends a hello frame (sequence 0, HMAC-SHA256
/// with the cluster key; a listener accepts any of the cluster's keys and answers under the
/// one used) with a fresh 16-byte nonce; the listener's also answers the dialer's nonce. Each
/// direction then encrypts with its own AES-256-GCM key,
/// HMAC(clusterKey, "hamgr/3" ‖ sender ‖ senderNonce ‖ receiverNonce), with sequences from 1
/// as nonces, so frames from an earlier session, or echoed back, fail authentication. The
/// dialer's first frame confirms its key; the listener's session exists only after it.
public final class PeerConnection: @unchecked Sendable, CustomStringConvertible {
    public let channel: Channel
    public let local: PeerHello
    public let remote: PeerHello
    public var eventLoop: EventLoop { channel.eventLoop }
    /// Sealed frames waiting for the loop to write them, and the sealer that numbered them
    /// (both guarded by outboxLock): the sequence order is the wire order whichever thread
    /// sent.
    private let outboxLock = NSLock()
    private var sealer: FrameSealer
    private var outbox: [ByteBuffer] = []
    private var outboxBytes = 0
    private var outboxDrainScheduled = false
    /// A flush is queued for the end of this loop turn (event loop only).
    private var flushQueued = false
    /// When the last frame went out (event loop only): keepalives fill only silences.
    var lastSent = NIODeadline.now()
    /// Set by the owner to tag the connection (e.g. the epoch it was opened for).
    public var userInfo: Any?
    /// Which of the cluster's keys opened the session: 0 is `key_file`, i > 0 is
    /// `accept_key_files[i - 1]` (a peer not yet moved to the new key in a rollover).
    public let keyIndex: Int
    /// Bytes of sealed frames handed to the channel since the session opened (with length
    /// prefix, header and tag), and bytes of frames received and opened. Relaxed atomics: one
    /// add per frame on the data path, read by metrics scrapes.
    private let sentCounter = Atomic<UInt64>(0)
    private let receivedCounter = Atomic<UInt64>(0)
    public var bytesSent: UInt64 { sentCounter.load(ordering: .relaxed) }
    public var bytesReceived: UInt64 { receivedCounter.load(ordering: .relaxed) }
    func noteReceived(_ bytes: Int) { receivedCounter.wrappingAdd(UInt64(bytes), ordering: .relaxed) }

    /// Bytes the channel may hold unsent before it reports itself unwritable, and the level
    /// it must drain to before it is writable again (NIO's write-buffer water marks), until
    /// the owner sets its own (`setSendBuffer`).
    public static let defaultSendBufferBytes = 8 << 20
    private let sendBufferLimit = Atomic<Int>(PeerConnection.defaultSendBufferBytes)

    /// The send buffer's high-water mark (the low one is a quarter of it): the replicated
    /// volume's `volume.link_send_buffer`. Any thread.
    public func setSendBuffer(_ bytes: Int) {
        let high = max(64 << 10, bytes)
        sendBufferLimit.store(high, ordering: .relaxed)
        channel.eventLoop.execute { [channel] in
            _ = channel.setOption(ChannelOptions.writeBufferWaterMark, value: .init(low: high / 4, high: high))
        }
    }

    /// The send buffer has room: the channel is under its high-water mark (or drained below
    /// the low one since it crossed it) and the outbox holds less than that. Any thread.
    public var hasRoom: Bool {
        outboxLock.lock()
        let queued = outboxBytes
        outboxLock.unlock()
        return queued < sendBufferLimit.load(ordering: .relaxed) && channel.isWritable
    }

    /// Reading paused by the owner (its apply queue is full): TCP's window then holds the
    /// sender back. The idle timer does not count the pause as the peer's silence.
    private let readsPausedFlag = Atomic<Bool>(false)
    public var readsPaused: Bool { readsPausedFlag.load(ordering: .relaxed) }

    /// Stops (or resumes) reading from the peer. Safe from any thread.
    public func pauseReading(_ on: Bool) {
        guard readsPausedFlag.exchange(on, ordering: .relaxed) != on else { return }
        channel.eventLoop.execute { [channel] in
            channel.setOption(ChannelOptions.autoRead, value: !on).whenSuccess { if !on { channel.read() } }
        }
    }

    init(channel: Channel, local: PeerHello, remote: PeerHello, sendKey: SymmetricKey, keyIndex: Int = 0) {
        self.channel = channel; self.local = local; self.remote = remote; self.keyIndex = keyIndex
        self.sealer = FrameSealer(key: sendKey)
    }

    public var description: String { "\(remote.channel) link \(local.node)↔\(remote.node) (\(remote.cluster))" }

    /// Seal and write a frame; flush unless the caller batches. Safe from any thread.
    ///
    /// The frame is sealed (numbered and MAC'd) on the calling thread. From another thread
    /// the sealed frame joins an outbox that one loop task writes with a single flush: a burst
    /// costs the loop one wake-up and one writev, not one per frame. On the loop, the flush
    /// waits for the end of the loop turn, so the frames of one turn (a burst of pipelined
    /// writes, or their acks) share one writev too.
    public func send(kind: UInt8, epoch: Epoch, payload: ByteBuffer, more: ByteBuffer? = nil, flush: Bool = true) {
        let onLoop = eventLoop.inEventLoop
        // Encrypted straight into the frame buffer: the cipher's output is the only copy.
        var out = Self.allocator.buffer(capacity: 4 + Frame.headerBytes + payload.readableBytes + (more?.readableBytes ?? 0) + Frame.tagBytes)
        outboxLock.lock()
        sealer.seal(kind: kind, epoch: epoch, payload: payload, more: more, into: &out)
        sentCounter.wrappingAdd(UInt64(out.readableBytes), ordering: .relaxed)
        outbox.append(out)
        outboxBytes += out.readableBytes
        let schedule = !onLoop && !outboxDrainScheduled
        if schedule { outboxDrainScheduled = true }
        outboxLock.unlock()
        if onLoop {
            drainOutbox(flush: false)
            if flush { flushAtEndOfTurn() }
        } else if schedule {
            eventLoop.execute { self.drainOutbox(flush: true) }
        }
    }
    /// Any thread may seal; the channel's own allocator is for its loop.
    private static let allocator = ByteBufferAllocator()

    /// Writes every sealed frame in order (event loop only).
    private func drainOutbox(flush: Bool) {
        outboxLock.lock()
        let buffers = outbox
        outbox = []
        outboxBytes = 0
        outboxDrainScheduled = false
        outboxLock.unlock()
        if !buffers.isEmpty { lastSent = .now() }
        for b in buffers { channel.write(b, promise: nil) }
        if flush { channel.flush() }
    }

    private func flushAtEndOfTurn() {
        guard !flushQueued else { return }
        flushQueued = true
        eventLoop.execute {
            self.flushQueued = false
            self.channel.flush()
        }
    }

    public func flush() {
        if eventLoop.inEventLoop { channel.flush() } else { eventLoop.execute { self.channel.flush() } }
    }

    /// Bytes queued in the socket's outbound buffer are above the high-water mark.
    public var isWritable: Bool { channel.isWritable }

    /// Closes after writing every frame sent before (an unflushed write would fail instead).
    public func close() {
        if eventLoop.inEventLoop {
            channel.flush()
            channel.close(promise: nil)
        } else {
            eventLoop.execute { self.channel.flush(); self.channel.close(promise: nil) }
        }
    }
}

/// Frame kind 0 is the transport's keepalive on every channel; owners never see it.
public let keepaliveFrameKind: UInt8 = 0
/// Frame kind 254 is the dialer's key confirmation, its first session frame (sequence 1);
/// owners never see it.
public let keyConfirmationFrameKind: UInt8 = 254

/// The payload of a hello frame: who sends it and a fresh nonce; a listener's hello also
/// answers the dialer's nonce, so its MAC proves it was made for this connection.
/// Strings are one length byte and at most 255 bytes of UTF-8.
struct HelloMessage: Equatable {
    static let nonceBytes = 16
    /// The largest payload: three strings and two nonces. With header and MAC it must stay
    /// within `Frame.maxHandshakeBodyBytes` (`FrameTests.testLargestHelloFitsTheHandshakeLimit`).
    static let maxEncodedBytes = 3 * (1 + 255) + 2 * nonceBytes

    var hello: PeerHello
    var nonce: [UInt8]
    /// The dialer's nonce, in a listener's hello; nil in a dialer's.
    var answering: [UInt8]?

    func encode(into b: inout ByteBuffer) {
        PeerSessionHandler.writeString(hello.cluster, to: &b)
        PeerSessionHandler.writeString(hello.node.name, to: &b)
        PeerSessionHandler.writeString(hello.channel, to: &b)
        b.writeBytes(nonce)
        if let answering { b.writeBytes(answering) }
    }

    /// The claimed cluster, read before authentication: the key depends on it.
    static func peekCluster(_ body: ByteBuffer) -> String? {
        var peek = body
        guard peek.readableBytes > Frame.headerBytes else { return nil }
        peek.moveReaderIndex(forwardBy: Frame.headerBytes)
        return PeerSessionHandler.readString(&peek)
    }

    /// Decodes an authenticated payload; nil unless it is exactly a dialer's hello
    /// (`answers` false) or a listener's (`answers` true).
    static func decode(_ payload: ByteBuffer, answers: Bool) -> HelloMessage? {
        var p = payload
        guard let cluster = PeerSessionHandler.readString(&p), let node = PeerSessionHandler.readString(&p),
              let channel = PeerSessionHandler.readString(&p), let nonce = p.readBytes(length: nonceBytes) else { return nil }
        let answering = answers ? p.readBytes(length: nonceBytes) : nil
        guard answers == (answering != nil), p.readableBytes == 0 else { return nil }
        return HelloMessage(hello: PeerHello(cluster: cluster, node: NodeID(node), channel: channel), nonce: nonce, answering: answering)
    }
}

/// One side of a session's handshake and then its frames (architecture.md "Security").
///
/// Handshake, each step refused with the reason logged and the connection closed:
/// 1. The dialer sends its hello (its nonce nD), MAC'd under its cluster key.
/// 2. The listener verifies it under each of the cluster's keys, routes it, and answers with
///    its own hello (its nonce nL, and nD), MAC'd under the key that verified. The dialer
///    accepts it only if it answers its own nD: a listener's hello from another connection
///    is refused, so a dialer never takes a replayed listener for a live one.
/// 3. Both derive the session keys (each binds nD and nL). The dialer sends the key
///    confirmation frame, sealed under its send key, and is established. The listener is
///    established only once that frame opens: a replayed dialer hello (valid MAC, old nonce)
///    cannot produce it, so it never reaches the owner and never replaces a live session.
/// Until then a frame may announce at most `Frame.maxHandshakeBodyBytes`, and each step must
/// finish within `max(idleTimeout, handshakeTimeout)` of the one before.
final class PeerSessionHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Side { case dialer, listener }
    private let side: Side
    private let local: PeerHello?  // nil on a listener until the route names it
    private let keysForCluster: (String) -> [SymmetricKey]
    private let route: (PeerHello) -> (local: PeerHello, callbacks: PeerSessionCallbacks)?
    private let idleTimeout: TimeAmount
    private let refused: ((String) -> Void)?
    private var callbacks: PeerSessionCallbacks?
    private var connection: PeerConnection?
    /// A listener's session between its hello and the dialer's key confirmation: what the
    /// route gave and the keys, handed to the owner only once the confirmation opens.
    private var unconfirmed: (local: PeerHello, remote: PeerHello, callbacks: PeerSessionCallbacks, sendKey: SymmetricKey, keyIndex: Int)?
    private var openSealer: FrameSealer?
    private var myNonce = [UInt8](repeating: 0, count: HelloMessage.nonceBytes)
    private var clusterKey: SymmetricKey?
    private var lastReceive = NIODeadline.now()
    /// When the current handshake step began (the connection, then the listener's hello):
    /// a step is bounded from here, not from the last byte, so a peer that trickles bytes
    /// cannot hold an unauthenticated connection open.
    private var handshakeStepStarted = NIODeadline.now()
    /// The splitter in front of this handler: it bounds frames to the handshake size until
    /// the session is established.
    var splitter: FrameSplitter?
    /// Set while the channel is active; the sweeper ticks the session through it.
    private var context: ChannelHandlerContext?
    private var closeReason = "connection closed by peer"
    static let handshakeTimeout = TimeAmount.seconds(5)

    init(side: Side, local: PeerHello?, keysForCluster: @escaping (String) -> [SymmetricKey],
         route: @escaping (PeerHello) -> (local: PeerHello, callbacks: PeerSessionCallbacks)?,
         idleTimeout: TimeAmount, dialerCallbacks: PeerSessionCallbacks? = nil, refused: ((String) -> Void)? = nil) {
        self.side = side; self.local = local; self.keysForCluster = keysForCluster
        self.route = route; self.idleTimeout = idleTimeout
        self.callbacks = dialerCallbacks
        self.refused = refused
        var rng = SystemRandomNumberGenerator()
        for i in 0..<myNonce.count { myNonce[i] = UInt8.random(in: 0...255, using: &rng) }
    }

    func channelActive(context: ChannelHandlerContext) {
        if side == .dialer, let local {
            guard let key = keysForCluster(local.cluster).first else { return fail(context, "no key for cluster \(local.cluster)") }
            clusterKey = key
            sendHello(context, HelloMessage(hello: local, nonce: myNonce, answering: nil), key: key)
        }
        SessionSweeper.register(self, on: context.eventLoop, period: Self.sweepPeriod(idleTimeout))
        self.context = context
        context.fireChannelActive()
    }

    /// Keepalive and silence timing (design.md §3 "Frames"). A session sends a keepalive only
    /// when it has sent nothing for `idleTimeout / 2`, so regular traffic (e.g. 1 Hz lease renewals
    /// under a 2.4 s failure timeout) suppresses keepalives entirely. The sweep that checks this
    /// runs every `idleTimeout / 6`, so on a healthy link the longest gap between two frames is
    /// `idleTimeout / 2 + idleTimeout / 6 = 2/3 · idleTimeout` — the same worst case as the earlier
    /// "keepalive after a third, checked every third" rule — leaving the receiver one third of its
    /// idle timeout as margin for scheduling and network delay before it declares silence.
    /// Silence itself is detected at most `idleTimeout / 6` after the timeout has passed.
    static func keepaliveAfter(_ idleTimeout: TimeAmount) -> TimeAmount { .nanoseconds(idleTimeout.nanoseconds / 2) }
    static func sweepPeriod(_ idleTimeout: TimeAmount) -> TimeAmount { .nanoseconds(max(1_000_000, idleTimeout.nanoseconds / 6)) }

    /// Called by this loop's sweeper every `sweepPeriod` (event loop only). `stalled` is how much
    /// later than planned the sweep runs: while this loop was stalled (CPU starvation, a long
    /// task) it read nothing, so bytes may be waiting unread in the socket; that time is not
    /// counted as the peer's silence. It is bounded by the stall itself, so a loop that keeps up
    /// detects silence on time, and an overloaded one at most that far behind.
    func sweep(now: NIODeadline, stalled: TimeAmount = .zero) {
        guard let ctx = context else { return }
        guard let c = connection else {
            // A handshake step gets longer than the idle timeout: under a connection storm
            // hellos queue, and cutting them at the idle timeout only feeds the storm.
            let limit = max(idleTimeout, Self.handshakeTimeout)
            if now - handshakeStepStarted > limit + stalled {
                let ms = limit.nanoseconds / 1_000_000
                fail(ctx, unconfirmed != nil ? "hello replayed or key not confirmed: no key confirmation within \(ms) ms of our hello"
                                             : "no hello within \(ms) ms")
            }
            return
        }
        if c.readsPaused { lastReceive = now }  // not reading is not the peer's silence
        if now - lastReceive > idleTimeout + stalled {
            fail(ctx, "peer silent for more than \(idleTimeout.nanoseconds / 1_000_000) ms")
        } else if now - c.lastSent >= Self.keepaliveAfter(idleTimeout) {
            c.send(kind: keepaliveFrameKind, epoch: .zero, payload: ByteBuffer())
        }
    }

    private func sendHello(_ context: ChannelHandlerContext, _ hello: HelloMessage, key: SymmetricKey) {
        var p = context.channel.allocator.buffer(capacity: 128)
        hello.encode(into: &p)
        var out = context.channel.allocator.buffer(capacity: 256)
        Frame.sealHello(payload: p, key: key, into: &out)
        context.writeAndFlush(NIOAny(out), promise: nil)
    }

    /// Bytes arrived (event loop only).
    func noteActivity() { lastReceive = .now() }


    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let body = unwrapInboundIn(data)
        if var opener = openSealer, let conn = connection {
            switch opener.open(body, allocator: context.channel.allocator) {
            case .success(let frame):
                openSealer = opener
                conn.noteReceived(4 + body.readableBytes)  // the length prefix and the body
                if frame.kind != keepaliveFrameKind { callbacks?.frame(conn, frame) }
            case .failure(let err):
                fail(context, err.description)
            }
            return
        }
        if unconfirmed != nil { return handleKeyConfirmation(context, body) }
        handleHello(context, body)
    }

    private func handleHello(_ context: ChannelHandlerContext, _ body: ByteBuffer) {
        guard let cluster = HelloMessage.peekCluster(body) else { return fail(context, "malformed hello") }
        // A dialer knows its key; a listener accepts any of the cluster's keys (a rollover
        // has two) and answers under the one the dialer used.
        let candidates = clusterKey.map { [$0] } ?? keysForCluster(cluster)
        guard !candidates.isEmpty else { return fail(context, "hello for unknown cluster \(cluster)") }
        var opened: (index: Int, payload: ByteBuffer)?
        var refusal: FrameError?  // why a hello whose MAC verified was refused (e.g. another version)
        for (i, k) in candidates.enumerated() {
            switch Frame.openHello(body, key: k) {
            case .success(let p): opened = (i, p)
            case .failure(let e): if e != .badMAC, refusal == nil { refusal = e }
            }
            if opened != nil { break }
        }
        guard let (keyIndex, payload) = opened else {
            return fail(context, refusal?.description ?? "hello failed authentication (wrong cluster key?)")
        }
        guard let theirs = HelloMessage.decode(payload, answers: side == .dialer) else { return fail(context, "malformed hello") }
        let key = candidates[keyIndex]
        let remote = theirs.hello
        switch side {
        case .dialer:
            let me = local!
            guard remote.cluster == me.cluster, remote.channel == me.channel else { return fail(context, "peer answered for \(remote)") }
            guard theirs.answering == myNonce else {
                return fail(context, "listener's hello does not answer this connection's nonce (replayed hello?)")
            }
            guard route(remote) != nil else { return fail(context, "unexpected peer \(remote.node)") }
            let (sendKey, recvKey) = sessionKeys(key, me: me, remote: remote, theirNonce: theirs.nonce)
            openSealer = FrameSealer(key: recvKey)
            let conn = PeerConnection(channel: context.channel, local: me, remote: remote, sendKey: sendKey, keyIndex: keyIndex)
            // Sequence 1 of our direction, ahead of anything the owner sends.
            conn.send(kind: keyConfirmationFrameKind, epoch: .zero, payload: ByteBuffer())
            establish(conn)
        case .listener:
            guard let r = route(remote) else { return fail(context, "refused hello from \(remote.node) for \(cluster)/\(remote.channel)") }
            clusterKey = key
            sendHello(context, HelloMessage(hello: r.local, nonce: myNonce, answering: theirs.nonce), key: key)
            let (sendKey, recvKey) = sessionKeys(key, me: r.local, remote: remote, theirNonce: theirs.nonce)
            openSealer = FrameSealer(key: recvKey)
            unconfirmed = (r.local, remote, r.callbacks, sendKey, keyIndex)
            handshakeStepStarted = .now()
        }
    }

    /// The listener's last handshake step: the dialer's first frame must be the key
    /// confirmation, sealed under the session key that binds this connection's nonces.
    private func handleKeyConfirmation(_ context: ChannelHandlerContext, _ body: ByteBuffer) {
        guard let u = unconfirmed, var opener = openSealer else { return }
        switch opener.open(body, allocator: context.channel.allocator) {
        case .success(let frame) where frame.kind == keyConfirmationFrameKind:
            openSealer = opener
            unconfirmed = nil
            callbacks = u.callbacks
            let conn = PeerConnection(channel: context.channel, local: u.local, remote: u.remote, sendKey: u.sendKey, keyIndex: u.keyIndex)
            conn.noteReceived(4 + body.readableBytes)
            establish(conn)
        case .success(let frame):
            fail(context, "hello replayed or key not confirmed: first frame is kind \(frame.kind), not the key confirmation")
        case .failure(let err):
            fail(context, "hello replayed or key not confirmed: \(err.description)")
        }
    }

    private func establish(_ conn: PeerConnection) {
        connection = conn
        splitter?.authenticated = true
        callbacks?.established(conn)
    }

    private func sessionKeys(_ key: SymmetricKey, me: PeerHello, remote: PeerHello, theirNonce: [UInt8]) -> (send: SymmetricKey, receive: SymmetricKey) {
        (Self.sessionKey(key, sender: me.node.name, senderNonce: myNonce, receiverNonce: theirNonce),
         Self.sessionKey(key, sender: remote.node.name, senderNonce: theirNonce, receiverNonce: myNonce))
    }

    static func sessionKey(_ key: SymmetricKey, sender: String, senderNonce: [UInt8], receiverNonce: [UInt8]) -> SymmetricKey {
        var mac = HMAC<SHA256>(key: key)
        mac.update(data: Array("hamgr/3".utf8))
        mac.update(data: Array(sender.utf8))
        mac.update(data: senderNonce)
        mac.update(data: receiverNonce)
        return SymmetricKey(data: Array(mac.finalize()))
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        closeReason = reason
        if connection == nil, side == .listener {
            refused?("refused session from \(context.remoteAddress.map { "\($0)" } ?? "?"): \(reason)")
        }
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A refused frame is the peer's doing and is logged as a refusal; a socket error is not.
        guard let frameError = error as? FrameError else {
            closeReason = "\(error)"
            return context.close(promise: nil)
        }
        fail(context, frameError.description)
    }

    func channelInactive(context: ChannelHandlerContext) {
        SessionSweeper.unregister(self, on: context.eventLoop, period: Self.sweepPeriod(idleTimeout))
        self.context = nil
        callbacks?.closed(connection, closeReason)
        callbacks = nil
        context.fireChannelInactive()
    }

    static func writeString(_ s: String, to b: inout ByteBuffer) {
        let bytes = Array(s.utf8.prefix(255))
        b.writeInteger(UInt8(bytes.count)); b.writeBytes(bytes)
    }
    static func readString(_ b: inout ByteBuffer) -> String? {
        guard let n: UInt8 = b.readInteger(), let s = b.readString(length: Int(n)) else { return nil }
        return s
    }
}

/// One repeating timer per event loop (and sweep period) for all sessions on that loop,
/// instead of one timer per session: with thousands of sessions (an arbitrator serving many
/// clusters) per-session timers cost a scheduled task and often a wake-up each.
/// Everything but the registry runs on the sweeper's own event loop.
final class SessionSweeper: @unchecked Sendable {
    private struct Key: Hashable { var loop: ObjectIdentifier; var periodNanoseconds: Int64 }
    private static let registry = NIOLockedValueBox<[Key: SessionSweeper]>([:])

    private let loop: EventLoop  // held strongly so its identifier is not reused while registered
    private let key: Key
    private var sessions: [ObjectIdentifier: PeerSessionHandler] = [:]
    private var task: RepeatedTask?

    private init(loop: EventLoop, key: Key) { self.loop = loop; self.key = key }

    /// Adds a session to its loop's sweeper (event loop only).
    static func register(_ session: PeerSessionHandler, on loop: EventLoop, period: TimeAmount) {
        loop.preconditionInEventLoop()
        let key = Key(loop: ObjectIdentifier(loop), periodNanoseconds: period.nanoseconds)
        let sweeper = registry.withLockedValue { all in
            if let s = all[key] { return s }
            let s = SessionSweeper(loop: loop, key: key)
            all[key] = s
            return s
        }
        sweeper.sessions[ObjectIdentifier(session)] = session
        if sweeper.task == nil {
            sweeper.task = loop.scheduleRepeatedTask(initialDelay: period, delay: period) { [weak sweeper] _ in sweeper?.sweep() }
        }
    }

    /// Removes a session; the last one out stops the timer (event loop only; no-op if absent).
    static func unregister(_ session: PeerSessionHandler, on loop: EventLoop, period: TimeAmount) {
        let key = Key(loop: ObjectIdentifier(loop), periodNanoseconds: period.nanoseconds)
        guard let sweeper = registry.withLockedValue({ $0[key] }) else { return }
        sweeper.sessions[ObjectIdentifier(session)] = nil
        if sweeper.sessions.isEmpty {
            sweeper.task?.cancel()
            sweeper.task = nil
            registry.withLockedValue { all in if all[key] === sweeper { all[key] = nil } }
        }
    }

    /// Sessions on this loop now (tests).
    static func count(on loop: EventLoop, period: TimeAmount) -> Int {
        let key = Key(loop: ObjectIdentifier(loop), periodNanoseconds: period.nanoseconds)
        return registry.withLockedValue { $0[key] }.map { s in
            loop.inEventLoop ? s.sessions.count : ((try? loop.submit { s.sessions.count }.wait()) ?? 0)
        } ?? 0
    }

    private var lastSweep: NIODeadline?

    private func sweep() {
        let now = NIODeadline.now()
        let period = TimeAmount.nanoseconds(key.periodNanoseconds)
        // A repeated task's next run is planned `period` after the previous one ran.
        let stalled = lastSweep.map { max(.zero, now - $0 - period) } ?? .zero
        lastSweep = now
        // A session that fails here may leave the dictionary while we iterate: iterate a snapshot.
        for session in Array(sessions.values) { session.sweep(now: now, stalled: stalled) }
    }
}

/// Parses "host:port" (IPv4, hostname, or "[v6]:port").
public func parseHostPort(_ s: String, key: String = "address") throws -> (host: String, port: Int) {
    var host: Substring
    let portPart: Substring
    if s.hasPrefix("["), let close = s.firstIndex(of: "]") {
        host = s[s.index(after: s.startIndex)..<close]
        let rest = s[s.index(after: close)...]
        guard rest.hasPrefix(":") else { throw ConfigError(key: key, message: "'\(s)' is not HOST:PORT") }
        portPart = rest.dropFirst()
    } else {
        guard let colon = s.lastIndex(of: ":") else { throw ConfigError(key: key, message: "'\(s)' is not HOST:PORT") }
        host = s[..<colon]; portPart = s[s.index(after: colon)...]
    }
    guard !host.isEmpty, let port = Int(portPart), (1...65535).contains(port) else {
        throw ConfigError(key: key, message: "'\(s)' is not HOST:PORT with a port in 1…65535")
    }
    return (String(host), port)
}

private func configureTCP(_ channel: Channel, userTimeout: TimeAmount) -> EventLoopFuture<Void> {
    // Silence is detected by our own keepalives within the idle timeout; the kernel's limit
    // only aborts writes stuck for much longer, so a slow but live link (deep queue) survives.
    let ms = Int(userTimeout.nanoseconds / 1_000_000) * 4
    return channel.setOption(ChannelOptions.writeBufferWaterMark,
                             value: .init(low: PeerConnection.defaultSendBufferBytes / 4, high: PeerConnection.defaultSendBufferBytes)).flatMap {
        channel.setOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
    }.flatMap {
        // Without TCP_USER_TIMEOUT a silently dropped link keeps unacknowledged data for minutes.
        channel.setOption(ChannelOptions.Types.SocketOption(level: .tcp, name: .init(rawValue: 18 /* TCP_USER_TIMEOUT */)), value: ms)
    }
}

/// Marks the session alive on every byte that arrives, not only on complete frames: a large
/// frame on a slow link is progress, not silence.
final class LinkActivityHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    private let session: PeerSessionHandler
    init(_ session: PeerSessionHandler) { self.session = session }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.noteActivity()
        context.fireChannelRead(data)
    }
}

/// Splits the byte stream into frame bodies (`FrameBodyDecoder.nextBody` rules) with at most
/// one copy of any byte: bodies that arrived whole are passed on as slices of the read
/// buffer; a body still arriving is gathered into one buffer of exactly its size. (NIO's
/// `ByteToMessageHandler` appends every read to a growing buffer: a 1 MiB replicated write
/// was copied about twice over on the backup.)
final class FrameSplitter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    /// The start of a frame too short to know its length, or a small frame's first bytes.
    private var head: ByteBuffer?
    /// A body being gathered, and how many of its bytes are still to come.
    private var gathering: (body: ByteBuffer, missing: Int)?
    private var failed = false
    /// False until the session handler has verified the peer: until then a frame may announce
    /// at most `Frame.maxHandshakeBodyBytes`, so nothing big is allocated for a stranger.
    /// Set synchronously from the handler's `channelRead`, so the next frame of the same read
    /// is already judged by the session limit.
    var authenticated: Bool

    init(authenticated: Bool = true) { self.authenticated = authenticated }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        var input = unwrapInboundIn(data)
        do {
            while input.readableBytes > 0, !failed {
                if var g = gathering {
                    gathering = nil  // `g` must own the body alone, or the append copies it
                    let n = min(g.missing, input.readableBytes)
                    var part = input.readSlice(length: n)!
                    g.body.writeBuffer(&part)
                    g.missing -= n
                    if g.missing > 0 { gathering = g; return }
                    context.fireChannelRead(wrapInboundOut(g.body))
                } else if var h = head {
                    head = nil
                    // Complete the length prefix, then the body, from the new bytes.
                    if h.readableBytes < 4 {
                        var part = input.readSlice(length: min(4 - h.readableBytes, input.readableBytes))!
                        h.writeBuffer(&part)
                        if h.readableBytes < 4 { head = h; return }
                    }
                    let length = try FrameBodyDecoder.checkedLength(h.getInteger(at: h.readerIndex)!, authenticated: authenticated)
                    h.moveReaderIndex(forwardBy: 4)
                    startBody(length: length, have: &h, context)
                } else if let length = input.getInteger(at: input.readerIndex, as: UInt32.self) {
                    let body = Int(try FrameBodyDecoder.checkedLength(length, authenticated: authenticated))
                    guard input.readableBytes >= 4 + body else {
                        input.moveReaderIndex(forwardBy: 4)
                        startBody(length: UInt32(body), have: &input, context)
                        continue
                    }
                    input.moveReaderIndex(forwardBy: 4)
                    context.fireChannelRead(wrapInboundOut(input.readSlice(length: body)!))
                } else {
                    // Fewer than 4 bytes: keep them (a copy of at most 3 bytes).
                    var h = context.channel.allocator.buffer(capacity: 4)
                    h.writeBuffer(&input)
                    head = h
                }
            }
        } catch {
            failed = true
            context.fireErrorCaught(error)
        }
    }

    /// Begins gathering a body of `length` bytes from the ones in `have` (all of them are
    /// consumed; a complete body is passed on at once).
    private func startBody(length: UInt32, have: inout ByteBuffer, _ context: ChannelHandlerContext) {
        let length = Int(length)
        if have.readableBytes >= length {
            context.fireChannelRead(wrapInboundOut(have.readSlice(length: length)!))
            return
        }
        var body = context.channel.allocator.buffer(capacity: length)
        body.writeBuffer(&have)
        gathering = (body, length - body.readableBytes)
    }
}

/// How a session reads. `bulk`: the replication link, which carries blocks — reads start at
/// 64 KiB and grow to 1 MiB (a replicated 1 MiB write arrives in a few reads, not 16+, and a
/// burst of 4 KiB writes in one). `small`: NIO's default (2 KiB, up to 64 KiB), for links
/// that carry only small frames — an arbitrator's thousands of sessions would otherwise hold
/// 64 KiB read buffers (RSS 818 MiB at 10,000 clusters).
public enum PeerReads: Sendable { case small, bulk }

private func sessionPipeline(_ channel: Channel, _ handler: PeerSessionHandler, userTimeout: TimeAmount, reads: PeerReads) -> EventLoopFuture<Void> {
    configureTCP(channel, userTimeout: userTimeout).flatMap {
        channel.pipeline.eventLoop.makeCompletedFuture {
            if reads == .bulk {
                try channel.syncOptions?.setOption(ChannelOptions.recvAllocator,
                                                   value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 * 1024, maximum: 1024 * 1024))
            }
            let splitter = FrameSplitter(authenticated: false)
            handler.splitter = splitter
            try channel.pipeline.syncOperations.addHandler(LinkActivityHandler(handler))
            try channel.pipeline.syncOperations.addHandler(splitter)
            try channel.pipeline.syncOperations.addHandler(handler)
        }
    }
}

/// Accepts sessions on one address and routes each by its authenticated hello.
public final class PeerListener: @unchecked Sendable {
    public let channel: Channel
    private init(channel: Channel) { self.channel = channel }

    /// - Parameter route: given the remote's hello, our own hello and callbacks, or nil to refuse.
    /// - Parameter refused: told why a session was refused before it was established (wrong key,
    ///   unknown cluster or node, garbled hello), for the log.
    /// - Parameter childGroup: where accepted sessions live (default: `group`).
    public static func bind(host: String, port: Int, group: EventLoopGroup, childGroup: EventLoopGroup? = nil, idleTimeout: TimeAmount,
                            reads: PeerReads = .small,
                            keysForCluster: @escaping (String) -> [SymmetricKey],
                            refused: ((String) -> Void)? = nil,
                            route: @escaping (PeerHello) -> (local: PeerHello, callbacks: PeerSessionCallbacks)?) -> EventLoopFuture<PeerListener> {
        ServerBootstrap(group: group, childGroup: childGroup ?? group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                let h = PeerSessionHandler(side: .listener, local: nil, keysForCluster: keysForCluster, route: route,
                                           idleTimeout: idleTimeout, refused: refused)
                return sessionPipeline(ch, h, userTimeout: idleTimeout, reads: reads)
            }
            .bind(host: host, port: port)
            .map { PeerListener(channel: $0) }
    }

    public var localPort: Int? { channel.localAddress?.port }
    public func close() -> EventLoopFuture<Void> { channel.close() }
}

/// Keeps one outbound session up, reconnecting after `retryDelay` whenever it drops.
public final class PeerDialer: @unchecked Sendable {
    private let group: EventLoopGroup
    private let loop: EventLoop
    private let host: String
    private let port: Int
    private let local: PeerHello
    private let key: SymmetricKey
    private let callbacks: PeerSessionCallbacks
    private let idleTimeout: TimeAmount
    private let retryDelay: TimeAmount
    private let sourceHost: String?
    private let reads: PeerReads
    private var stopped = false  // loop only
    private var current: Channel?

    /// - Parameter sourceHost: bind outgoing connections to this local address (the node's own
    ///   address on that network), so the link leaves from the network it belongs to.
    public init(group: EventLoopGroup, host: String, port: Int, local: PeerHello, key: SymmetricKey,
                idleTimeout: TimeAmount, retryDelay: TimeAmount = .milliseconds(100), sourceHost: String? = nil,
                reads: PeerReads = .small, callbacks: PeerSessionCallbacks) {
        self.reads = reads
        self.group = group; self.loop = group.next(); self.host = host; self.port = port
        self.sourceHost = sourceHost
        self.local = local; self.key = key; self.callbacks = callbacks
        self.idleTimeout = idleTimeout; self.retryDelay = retryDelay
    }

    public func start() { loop.execute { self.connect() } }

    public func stop() {
        loop.execute {
            self.stopped = true
            self.current?.close(promise: nil)
        }
    }

    private func connect() {
        guard !stopped else { return }
        let wrapped = PeerSessionCallbacks(
            established: callbacks.established,
            frame: callbacks.frame,
            closed: { [weak self] c, why in
                self?.callbacks.closed(c, why)
                self?.scheduleReconnect()
            })
        let h = PeerSessionHandler(side: .dialer, local: local, keysForCluster: { [key] _ in [key] },
                                   route: { [local] _ in (local, wrapped) }, idleTimeout: idleTimeout, dialerCallbacks: wrapped)
        var bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(idleTimeout)
            .channelInitializer { ch in sessionPipeline(ch, h, userTimeout: self.idleTimeout, reads: self.reads) }
        if let sourceHost, let source = try? SocketAddress(ipAddress: sourceHost, port: 0) {
            bootstrap = bootstrap.bind(to: source)
        }
        bootstrap.connect(host: host, port: port)
            .whenComplete { result in
                self.loop.execute {
                    switch result {
                    case .success(let ch):
                        if self.stopped { ch.close(promise: nil) } else { self.current = ch }
                    case .failure:
                        self.scheduleReconnect()
                    }
                }
            }
    }

    private func scheduleReconnect() {
        loop.execute {
            self.current = nil
            guard !self.stopped else { return }
            self.loop.scheduleTask(in: self.retryDelay) { self.connect() }
        }
    }
}
