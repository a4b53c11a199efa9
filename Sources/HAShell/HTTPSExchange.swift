import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

/// One `https://` request of `HTTPClient`: the connected socket is handed to NIO (on its
/// shared event loops, started on first use), wrapped in TLS that verifies the server's
/// certificate and name, and the response bytes come back to the blocked caller.
enum TLSExchange {
    /// Send `request` over TLS on the connected socket `fd` (NIO takes it over and closes it)
    /// and return every byte of the response. The certificate must name `host`: its DNS name,
    /// or for an IP address the address connected to.
    static func run(fd: Int32, host: String, what: String, trust: HTTPClient.TrustedCA,
                    request: Data, deadline: ContinuousClock.Instant) throws -> Data {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let done = loop.makePromise(of: Data.self)
        let sniffer = FirstBytes()
        let collector = ResponseCollector(done: done, sniffer: sniffer, what: what, caPath: trust.path, host: host)
        let serverName = HTTPClient.isIPAddress(host) ? nil : host
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: loop)
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        let tls = try NIOSSLClientHandler(context: trust.context, serverHostname: serverName)
                        try ch.pipeline.syncOperations.addHandlers([sniffer, tls, collector])
                    }
                }
                .withConnectedSocket(fd).wait()
        } catch {
            throw HTTPClient.Failure.io("\(what): \(error)")
        }
        let left = deadline - ContinuousClock.now
        let timer = loop.scheduleTask(in: .nanoseconds(max(0, left.nanosecondsClamped))) {
            collector.finish(.failure(HTTPClient.Failure.timeout(what)))
        }
        defer {
            timer.cancel()
            channel.close(promise: nil)
        }
        channel.writeAndFlush(ByteBuffer(bytes: request)).whenFailure { error in
            collector.finish(.failure(collector.explain(error)))
        }
        return try done.futureResult.wait()
    }

    /// Remembers the first bytes the server sent, before TLS: "HTTP/" means a plaintext server.
    private final class FirstBytes: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer

        private(set) var prefix: [UInt8] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if prefix.count < 5 {
                let buf = unwrapInboundIn(data)
                prefix += buf.readableBytesView.prefix(5 - prefix.count)
            }
            context.fireChannelRead(data)
        }
    }

    /// Gathers the decrypted response until it is complete (by its length, or the close)
    /// and completes `done` once, with the bytes or a failure that says what went wrong.
    /// Touched only on the channel's loop.
    private final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer

        private let done: EventLoopPromise<Data>
        private let sniffer: FirstBytes
        private let what: String
        private let caPath: String
        private let host: String
        private var bytes = Data()
        private var finished = false
        private var handshakeDone = false

        init(done: EventLoopPromise<Data>, sniffer: FirstBytes, what: String, caPath: String, host: String) {
            self.done = done; self.sniffer = sniffer; self.what = what; self.caPath = caPath; self.host = host
        }

        func finish(_ result: Result<Data, Error>) {
            guard !finished else { return }
            finished = true
            done.completeWith(result)
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .handshakeCompleted? = event as? TLSUserEvent { handshakeDone = true }
            context.fireUserInboundEventTriggered(event)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            bytes.append(contentsOf: unwrapInboundIn(data).readableBytesView)
            if bytes.count > 64 << 20 {
                finish(.failure(HTTPClient.Failure.badResponse("response larger than 64 MiB")))
                context.close(promise: nil)
            } else if (try? HTTPClient.parse(bytes, complete: false)) != nil {
                finish(.success(bytes))
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            finish(handshakeDone ? .success(bytes) : .failure(explain(HTTPClient.Failure.io("the server closed the connection"))))
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            // A close without close_notify after a whole response loses nothing.
            if let e = error as? NIOSSLError, case .uncleanShutdown = e, handshakeDone {
                finish(.success(bytes))
            } else {
                finish(.failure(explain(error)))
            }
            context.close(promise: nil)
        }

        /// The failure to report for a TLS or connection error.
        func explain(_ error: Error) -> Error {
            if sniffer.prefix.starts(with: Array("HTTP/".utf8)) { return HTTPClient.Failure.plaintextServer(what) }
            if handshakeDone { return error is HTTPClient.Failure ? error : HTTPClient.Failure.io("\(error)") }
            if let e = error as? NIOSSLExtraError, e == .failedToValidateHostname {
                return HTTPClient.Failure.tls(what, "certificate verify failed: the server's certificate is not issued for \(host) (hamgr certs names each host's addresses)")
            }
            if "\(error)".contains("CERTIFICATE_VERIFY_FAILED") {
                return HTTPClient.Failure.tls(what, "certificate verify failed: the server's certificate is not signed by the CA in \(caPath)")
            }
            if case .io(let why)? = error as? HTTPClient.Failure { return HTTPClient.Failure.tls(what, why) }
            return HTTPClient.Failure.tls(what, "\(error)")
        }
    }
}
