#if canImport(Glibc)
import Glibc
#endif
import Foundation
import HAShell
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

/// TLS for `NBDClient` (NBD_OPT_STARTTLS): the CA the server's certificate must chain to
/// (its name, or for an IP address the address connected to, must be in the certificate),
/// and optionally a client certificate for servers that require one (`export.client_ca_file`).
/// Loaded once; every connection made with it shares the context.
public struct NBDClientTLS: @unchecked Sendable {
    public let caFile: String
    public let clientCertificateFile: String?
    let context: NIOSSLContext

    /// Errors name the option a path came from (`caOption`, `certOption`, `keyOption`).
    public init(caFile: String, clientCertificateFile: String? = nil, clientKeyFile: String? = nil,
                caOption: String = "CA file", certOption: String = "client certificate", keyOption: String = "client key") throws {
        var c = TLSConfiguration.makeClientConfiguration()
        c.minimumTLSVersion = .tlsv12
        c.trustRoots = .certificates(try TLSFiles.certificates(caFile, key: caOption))
        switch (clientCertificateFile, clientKeyFile) {
        case (nil, nil):
            break
        case (let cert?, let key?):
            let identity = try TLSFiles.identity(certFile: cert, certKey: certOption, keyFile: key, keyKey: keyOption)
            c.certificateChain = identity.chain.map { .certificate($0) }
            c.privateKey = .privateKey(identity.privateKey)
        case (_?, nil):
            throw NBDClientError.tls("\(certOption) given without its key (\(keyOption))")
        case (nil, _?):
            throw NBDClientError.tls("\(keyOption) given without its certificate (\(certOption))")
        }
        // disconnect() waits for the close_notify exchange at most this long.
        c.shutdownTimeout = .seconds(2)
        self.caFile = caFile
        self.clientCertificateFile = clientCertificateFile
        self.context = try NIOSSLContext(configuration: c)
    }
}

/// The byte stream under `NBDClient`: blocking, whole-count sends and receives, each bounded
/// by the client's timeout.
protocol NBDTransport: AnyObject {
    func send(_ buffer: ByteBuffer) throws
    /// Exactly `count` bytes.
    func receive(_ count: Int) throws -> ByteBuffer
    /// Idempotent. `wait`: until the connection is closed (TLS: close_notify sent, bounded).
    func close(wait: Bool)
}

/// A connected TCP socket, with SO_RCVTIMEO / SO_SNDTIMEO set to the timeout.
final class PlainNBDTransport: NBDTransport {
    private var fd: Int32
    private let timeoutSeconds: Int

    init(fd: Int32, timeoutSeconds: Int) {
        self.fd = fd
        self.timeoutSeconds = timeoutSeconds
    }

    deinit { close(wait: false) }

    /// Hands the socket over (to TLS): this transport no longer uses or closes it.
    func release() -> Int32 {
        let f = fd
        fd = -1
        return f
    }

    func close(wait: Bool) {
        guard fd >= 0 else { return }
        Glibc.close(fd)
        fd = -1
    }

    func send(_ buffer: ByteBuffer) throws {
        guard fd >= 0 else { throw NBDClientError.transport("disconnected") }
        try buffer.withUnsafeReadableBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK {
                        throw NBDClientError.transport("send: no progress within \(timeoutSeconds) s")
                    }
                    throw NBDClientError.transport("send: \(String(cString: strerror(errno)))")
                }
                done += n
            }
        }
    }

    func receive(_ count: Int) throws -> ByteBuffer {
        guard fd >= 0 else { throw NBDClientError.transport("disconnected") }
        var buffer = ByteBuffer()
        guard count > 0 else { return buffer }
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            var done = 0
            while done < count {
                let n = recv(fd, raw.baseAddress! + done, count - done, 0)
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK {
                        throw NBDClientError.transport("receive: no answer within \(timeoutSeconds) s")
                    }
                    throw NBDClientError.transport("receive: \(String(cString: strerror(errno)))")
                }
                if n == 0 { throw NBDClientError.transport("the server closed the connection") }
                done += n
            }
            return count
        }
        return buffer
    }
}

/// TLS over a socket that has already negotiated NBD_OPT_STARTTLS: NIO takes the socket
/// over (on its shared event loops), `NIOSSLClientHandler` encrypts, and `Inbound` hands
/// the decrypted bytes to the blocked caller.
final class TLSNBDTransport: NBDTransport {
    private let channel: Channel
    private let inbound: Inbound
    private let timeoutSeconds: Int
    private let explainer: Explainer
    private var closed = false

    /// Runs the TLS handshake on `fd` (owned from here on, closed on failure) and verifies
    /// the server's certificate against `tls` and `host`.
    init(connectedSocket fd: Int32, host: String, port: Int, tls: NBDClientTLS, timeoutSeconds: Int) throws {
        let inbound = Inbound()
        let explainer = Explainer(host: host, peer: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)", caFile: tls.caFile,
                                  clientCertificate: tls.clientCertificateFile != nil)
        // An IP address is no SNI name: NIOSSL then checks the certificate's IP SANs against
        // the address connected to.
        let serverName = (try? SocketAddress(ipAddress: host, port: 0)) != nil ? nil : host
        let context = tls.context
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        let handler = try NIOSSLClientHandler(context: context, serverHostname: serverName)
                        try ch.pipeline.syncOperations.addHandlers([handler, inbound])
                    }
                }
                .withConnectedSocket(fd).wait()
        } catch {
            throw NBDClientError.tls("cannot start TLS with \(explainer.peer): \(error)")
        }
        self.channel = channel
        self.inbound = inbound
        self.timeoutSeconds = timeoutSeconds
        self.explainer = explainer
        switch inbound.waitForHandshake(until: Date().addingTimeInterval(TimeInterval(timeoutSeconds))) {
        case .done:
            return
        case .failed(let error):
            close(wait: false)
            throw explainer.explain(error, handshakeDone: false)
        case .closed:
            close(wait: false)
            throw NBDClientError.tls("\(explainer.peer) closed the connection during the TLS handshake")
        case .timedOut:
            close(wait: false)
            throw NBDClientError.tls("no TLS handshake with \(explainer.peer) within \(timeoutSeconds) s")
        }
    }

    deinit { close(wait: false) }

    func close(wait: Bool) {
        guard !closed else { return }
        closed = true
        let future = channel.close()
        if wait { _ = try? future.wait() }
    }

    func send(_ buffer: ByteBuffer) throws {
        guard !closed else { throw NBDClientError.transport("disconnected") }
        let timedOut = NIOLockedValueBox(false)
        let channel = self.channel
        let timer = channel.eventLoop.scheduleTask(in: .seconds(Int64(timeoutSeconds))) {
            timedOut.withLockedValue { $0 = true }
            channel.close(promise: nil)
        }
        defer { timer.cancel() }
        do {
            try channel.writeAndFlush(buffer).wait()
        } catch {
            if timedOut.withLockedValue({ $0 }) { throw NBDClientError.transport("send: no progress within \(timeoutSeconds) s") }
            throw explainer.explain(inbound.failure ?? error, handshakeDone: true)
        }
    }

    func receive(_ count: Int) throws -> ByteBuffer {
        guard !closed else { throw NBDClientError.transport("disconnected") }
        switch inbound.take(count, until: Date().addingTimeInterval(TimeInterval(timeoutSeconds))) {
        case .bytes(let b):
            return b
        case .failed(let error):
            throw explainer.explain(error, handshakeDone: true)
        case .closed:
            throw NBDClientError.transport("the server closed the connection")
        case .timedOut:
            throw NBDClientError.transport("receive: no answer within \(timeoutSeconds) s")
        }
    }

    /// Turns TLS failures into errors that name the server and say what failed.
    struct Explainer {
        let host: String
        let peer: String
        let caFile: String
        let clientCertificate: Bool

        func explain(_ error: Error, handshakeDone: Bool) -> NBDClientError {
            if let e = error as? NBDClientError { return e }
            let text = "\(error)"
            // Alerts from the server about our (missing) certificate: TLS 1.3 servers send
            // them after the client considers the handshake done.
            if text.contains("ALERT_CERTIFICATE_REQUIRED") || (!clientCertificate && text.contains("ALERT_HANDSHAKE_FAILURE")) {
                return .tls("\(peer) requires a client certificate (TLS alert: certificate required); give a client certificate and key")
            }
            if text.contains("ALERT_UNKNOWN_CA") || text.contains("ALERT_BAD_CERTIFICATE") || text.contains("ALERT_CERTIFICATE_UNKNOWN") {
                return .tls("\(peer) refused our client certificate (TLS alert \(Self.alert(in: text) ?? text)): "
                            + (clientCertificate ? "it is not signed by the CA the server trusts for clients" : "none was given"))
            }
            if let e = error as? NIOSSLExtraError, e == .failedToValidateHostname {
                return .tls("certificate verification of \(peer) failed: its certificate is not issued for \(host) (no subject alternative name matches; hamgr certs names each host and its addresses)")
            }
            if text.contains("CERTIFICATE_VERIFY_FAILED") {
                return .tls("certificate verification of \(peer) failed: its certificate does not chain to the CA in \(caFile) (or is expired or not yet valid)")
            }
            if case NIOSSLError.uncleanShutdown? = error as? NIOSSLError {
                return .transport("the server closed the connection (without a TLS close_notify)")
            }
            if !handshakeDone { return .tls("TLS handshake with \(peer) failed: \(text)") }
            if error is ChannelError { return .transport("the connection to \(peer) is closed (\(text))") }
            return .transport("TLS connection to \(peer): \(text)")
        }

        /// The BoringSSL alert name in an error's text (`TLSV1_ALERT_UNKNOWN_CA`).
        static func alert(in text: String) -> String? {
            guard let r = text.range(of: #"(TLSV1|SSLV3)_ALERT_[A-Z_]+"#, options: .regularExpression) else { return nil }
            return String(text[r])
        }
    }

    /// Collects the decrypted bytes and the connection's fate for the blocked caller.
    /// Written on the channel's loop, read by the caller, under `condition`.
    final class Inbound: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer

        enum Handshake { case done, failed(Error), closed, timedOut }
        enum Take { case bytes(ByteBuffer), failed(Error), closed, timedOut }

        private let condition = NSCondition()
        private var buffer = ByteBuffer()
        private var handshakeDone = false
        private var error: Error?
        private var inactive = false

        var failure: Error? {
            condition.lock(); defer { condition.unlock() }
            return error
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = unwrapInboundIn(data)
            condition.lock()
            buffer.writeBuffer(&bytes)
            condition.broadcast()
            condition.unlock()
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .handshakeCompleted? = event as? TLSUserEvent {
                condition.lock()
                handshakeDone = true
                condition.broadcast()
                condition.unlock()
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            condition.lock()
            if self.error == nil { self.error = error }
            condition.broadcast()
            condition.unlock()
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            condition.lock()
            inactive = true
            condition.broadcast()
            condition.unlock()
            context.fireChannelInactive()
        }

        func waitForHandshake(until deadline: Date) -> Handshake {
            condition.lock(); defer { condition.unlock() }
            while true {
                if let e = error { return .failed(e) }
                if handshakeDone { return .done }
                if inactive { return .closed }
                if !condition.wait(until: deadline) && !handshakeDone && error == nil && !inactive { return .timedOut }
            }
        }

        /// Exactly `count` bytes once they are there; bytes already received are handed out
        /// even if the connection failed after them.
        func take(_ count: Int, until deadline: Date) -> Take {
            condition.lock(); defer { condition.unlock() }
            while buffer.readableBytes < count {
                if let e = error { return .failed(e) }
                if inactive { return .closed }
                if !condition.wait(until: deadline) && buffer.readableBytes < count && error == nil && !inactive { return .timedOut }
            }
            let out = buffer.readSlice(length: count)!
            if buffer.readableBytes == 0 {
                buffer = ByteBuffer()
            } else if buffer.readerIndex > 1 << 20 {
                buffer.discardReadBytes()
            }
            return .bytes(out)
        }
    }
}
