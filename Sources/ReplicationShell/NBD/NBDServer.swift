import Foundation
import HAShell
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Replication

/// The NBD export of one volume (design.md §3, docs/nbd.md): fixed newstyle handshake,
/// pipelined transmission, any number of connections. The volume can be swapped or
/// withdrawn at any time (promotion, demotion); connections to a withdrawn volume close.
///
/// It listens on TCP (`start(host:port:)`), where `tls` and `allow` apply, and optionally on
/// a Unix socket (`start(unixSocket:)`) for consumers on the same host, where neither does:
/// the socket file's mode decides who connects. Both serve the same volume.
public final class NBDServer: @unchecked Sendable {
    public let exportName: String
    public let exportDescription: String?
    /// NBD_OPT_STARTTLS on TCP connections; nil: refused as unsupported.
    public let tls: TLS?
    /// Networks a TCP client must come from; empty: any. A change (a reload of
    /// `export.allow`) applies to connections accepted after it.
    public var allow: [ClientNetwork] {
        get { lock.withLock { state.allow } }
        set { lock.withLockVoid { state.allow = newValue } }
    }
    /// What each connection may hold in requests and payload bytes until their replies are
    /// written (`export.max_in_flight_requests`, `export.max_in_flight_bytes`).
    public let inFlightLimits: NBDInFlightBudget.Limits
    /// A connection that has not entered the transmission phase by then is closed, so that
    /// clients stuck in (or abandoning) the handshake hold no connection for ever. Applies
    /// to connections accepted after it is set. Default 30 s.
    public var handshakeTimeout: TimeAmount {
        get { lock.withLock { state.handshakeTimeout } }
        set { lock.withLockVoid { state.handshakeTimeout = newValue } }
    }
    let logger: Logger
    let recorder = NBDStatisticsRecorder()
    private let group: EventLoopGroup

    /// What a connection sees of the export; mutated only under `lock`.
    private struct State {
        var volume: BlockVolume?
        var refusal = "the export is not open yet"
        var listeners: [Channel] = []
        var unixSocket: String?
        var stopped = false
        var handshakeTimeout: TimeAmount = .seconds(30)
        var allow: [ClientNetwork] = []
        /// Every accepted connection, with the volume it is serving (nil during the handshake).
        var connections: [ObjectIdentifier: (channel: Channel, volume: BlockVolume?)] = [:]
    }
    private let lock = NIOLock()
    private var state = State()

    private let childGroup: EventLoopGroup

    /// - Parameter childGroup: where accepted connections live (default: `group`). A node
    ///   passes its volume's loop, so requests reach the replication core without a thread hop.
    public init(group: EventLoopGroup, childGroup: EventLoopGroup? = nil, exportName: String, exportDescription: String? = nil,
                tls: TLS? = nil, allow: [ClientNetwork] = [], inFlightLimits: NBDInFlightBudget.Limits = .defaults, logger: Logger) {
        self.group = group
        self.inFlightLimits = inFlightLimits
        self.childGroup = childGroup ?? group
        self.exportName = exportName
        self.exportDescription = exportDescription
        self.tls = tls
        self.state.allow = allow
        self.logger = logger
    }

    /// How TCP connections treat NBD_OPT_STARTTLS (`export.tls`), with the server's TLS
    /// context (certificate, key and, if clients must present certificates, their CA).
    public struct TLS: @unchecked Sendable {
        public let mode: ExportTLSMode
        let context: NIOSSLContext

        public init(mode: ExportTLSMode, configuration: TLSConfiguration) throws {
            self.mode = mode
            self.context = try NIOSSLContext(configuration: configuration)
        }
    }

    /// Binds the TCP listener. With port 0 the kernel picks one: see `boundPort`.
    public func start(host: String, port: Int) -> EventLoopFuture<Void> {
        bootstrap(tcp: true)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .bind(host: host, port: port)
            .map { [self] channel in listening(channel, tls: tls?.mode ?? .off) }
    }

    /// Binds a Unix-socket listener at `path` (an existing socket file there is replaced),
    /// mode 0660. No TLS and no allow-list: the file mode decides who may connect. `stop()`
    /// removes the file.
    public func start(unixSocket path: String) -> EventLoopFuture<Void> {
        bootstrap(tcp: false)
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true)
            .flatMapThrowing { [self] channel in
                // Until this chmod the file has the umask's mode; connecting needs write
                // permission, which the usual umask (022) gives only the owner.
                guard chmod(path, 0o660) == 0 else {
                    let code = errno
                    channel.close(promise: nil)
                    throw IOError(errnoCode: code, reason: "chmod 0660 \(path)")
                }
                lock.withLockVoid { state.unixSocket = path }
                listening(channel, tls: .off)
            }
    }

    private func bootstrap(tcp: Bool) -> ServerBootstrap {
        ServerBootstrap(group: group, childGroup: childGroup)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .childChannelOption(ChannelOptions.recvAllocator,
                                value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 64 * 1024, maximum: 1024 * 1024))
            // Replies queued in NIO past the byte budget make the channel unwritable, and the
            // connection stops reading until they drain (NBDConnectionHandler).
            .childChannelOption(ChannelOptions.writeBufferWaterMark,
                                value: .init(low: max(inFlightLimits.maxBytes / 2, 1), high: max(inFlightLimits.maxBytes, 2)))
            .childChannelInitializer { [self] channel in
                if tcp, !allows(channel.remoteAddress) {
                    logger.notice("NBD client not in export.allow; closing before the greeting",
                                  metadata: ["event": "nbd_client_refused", "peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
                    return channel.close()
                }
                guard register(channel) else { return channel.close() }
                channel.closeFuture.whenComplete { [self] _ in unregister(channel) }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NBDConnectionHandler(server: self, tls: tcp ? tls : nil))
                }
            }
    }

    /// Whether a TCP client at `peer` may connect (`allow` empty, or a network holds it).
    private func allows(_ peer: SocketAddress?) -> Bool {
        let allow = self.allow
        guard !allow.isEmpty else { return true }
        guard let peer else { return false }
        return allow.contains { $0.contains(peer) }
    }

    private func listening(_ channel: Channel, tls: ExportTLSMode) {
        lock.withLockVoid { state.listeners.append(channel) }
        logger.info("NBD export listening", metadata: ["event": "nbd_listening", "export": "\(exportName)", "tls": "\(tls.rawValue)",
                                                       "address": "\(channel.localAddress.map { "\($0)" } ?? "?")"])
    }

    /// The TCP listener's port.
    public var boundPort: Int? { lock.withLock { state.listeners.lazy.compactMap { $0.localAddress?.port }.first } }

    /// Opens the export with `volume`, or refuses it with `refusal` as the message clients
    /// get (NBD_REP_ERR_UNKNOWN to GO/INFO; a close after EXPORT_NAME). Connections serving
    /// another volume are closed: after a demotion no client may keep writing here.
    public func setVolume(_ volume: BlockVolume?, refusal: String) {
        let toClose: [Channel] = lock.withLock {
            state.volume = volume
            state.refusal = refusal
            var closing: [Channel] = []
            for (id, entry) in state.connections {
                if let served = entry.volume, served !== volume {
                    closing.append(entry.channel)
                    state.connections[id] = (entry.channel, nil)
                }
            }
            return closing
        }
        if !toClose.isEmpty {
            logger.notice("NBD export volume changed; closing connections", metadata: ["connections": "\(toClose.count)"])
        }
        for channel in toClose { channel.close(promise: nil) }
    }

    /// Closes the listener and every connection. In-flight requests finish in the volume but
    /// their replies are dropped.
    public func stop() -> EventLoopFuture<Void> {
        let (listeners, unixSocket, channels): ([Channel], String?, [Channel]) = lock.withLock {
            state.stopped = true
            defer { state.listeners = []; state.unixSocket = nil }
            return (state.listeners, state.unixSocket, state.connections.values.map { $0.channel })
        }
        let loop = group.next()
        let closedListeners = EventLoopFuture.andAllComplete(listeners.map { $0.close().recover { _ in } }, on: loop)
            .map { if let path = unixSocket { unlink(path) } }
        let closedConnections = channels.map { $0.close().recover { _ in } }
        return EventLoopFuture.andAllComplete([closedListeners] + closedConnections, on: loop)
    }

    public var statistics: NBDStatistics { recorder.snapshot() }

    // MARK: connection registry (called by NBDConnectionHandler)

    private func register(_ channel: Channel) -> Bool {
        enum Outcome { case registered, stopped, full(Int) }
        let outcome = lock.withLock { () -> Outcome in
            guard !state.stopped else { return .stopped }
            guard state.connections.count < inFlightLimits.maxConnections else { return .full(state.connections.count) }
            state.connections[ObjectIdentifier(channel)] = (channel, nil)
            return .registered
        }
        switch outcome {
        case .registered:
            recorder.connectionOpened()
            return true
        case .stopped:
            return false
        case .full(let open):
            logger.warning("NBD client refused: \(open) connections open, export.max_connections is \(inFlightLimits.maxConnections); closing before the greeting",
                           metadata: ["event": "nbd_connection_limit", "peer": "\(channel.remoteAddress.map { "\($0)" } ?? "unix socket")"])
            return false
        }
    }

    private func unregister(_ channel: Channel) {
        let removed = lock.withLock { state.connections.removeValue(forKey: ObjectIdentifier(channel)) != nil }
        if removed { recorder.connectionClosed() }
    }

    /// The volume a GO/INFO would get now, or the refusal text.
    func currentExport() -> Result<BlockVolume, ExportRefused> {
        lock.withLock { state.volume.map { .success($0) } ?? .failure(ExportRefused(message: state.refusal)) }
    }

    /// Atomically takes the current volume for `channel` entering transmission, so that a
    /// concurrent `setVolume` either sees this connection or this connection sees its volume.
    func openVolume(for channel: Channel) -> Result<BlockVolume, ExportRefused> {
        lock.withLock {
            guard let v = state.volume else { return .failure(ExportRefused(message: state.refusal)) }
            guard state.connections[ObjectIdentifier(channel)] != nil else {
                return .failure(ExportRefused(message: "the server is stopping"))
            }
            state.connections[ObjectIdentifier(channel)] = (channel, v)
            return .success(v)
        }
    }

    struct ExportRefused: Error { var message: String }

    /// Whether a client's export name selects this export ("" is the default export).
    func matches(exportName name: String) -> Bool { name.isEmpty || name == exportName }
}

/// A volume that can take a write's payload in the pieces it arrived in. The NBD server uses
/// it for writes that span several network reads, so that it never copies their data on
/// the event loop. Same semantics as `BlockVolume.write` with the pieces concatenated.
public protocol ScatterWriteVolume: BlockVolume {
    func write(offset: UInt64, chunks: [ByteBuffer], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
}
