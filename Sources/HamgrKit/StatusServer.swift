import Foundation
import HAShell
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS

/// One admin request after authentication and parameter parsing.
struct AdminRequest: Sendable {
    var command: AdminCommand
    /// The raw JSON parameters (already checked by `AdminCommand.parse`).
    var params: [String: JSONValue]
    /// Who asked (for the audit log line).
    var remote: String
}

/// The answer to an admin request: the HTTP status and the JSON reply.
struct AdminResponse: Sendable {
    var status: Int
    var reply: AdminReply

    init(status: Int, reply: AdminReply) { self.status = status; self.reply = reply }

    /// 200, the action was carried out (or started, for verify/resync).
    static func ok(_ message: String, fields: [String: JSONValue] = [:]) -> AdminResponse {
        AdminResponse(status: 200, reply: AdminReply(ok: true, message: message, fields: fields))
    }

    /// The action was refused in this state (409 Conflict by default), with the reason.
    static func refused(_ message: String, status: Int = 409, fields: [String: JSONValue] = [:]) -> AdminResponse {
        AdminResponse(status: status, reply: AdminReply(ok: false, message: message, fields: fields))
    }
}

/// What the status server asks the daemon. Each closure is called on the connection's
/// event loop and must not block there: never `wait()` on a future inside one (NIO traps
/// it, and it would stall every connection on that loop). State confined to another loop
/// is reached by returning a future (`daemonLoop.submit { … }.hop(to: callerLoop)`);
/// `MetricsRegistry` is thread-safe and may be rendered directly.
struct StatusHandlers: Sendable {
    /// The `/status` JSON document (already encoded).
    var status: @Sendable (EventLoop) -> EventLoopFuture<Data>
    /// The `/metrics` exposition text.
    var metrics: @Sendable (EventLoop) -> EventLoopFuture<String>
    /// `/healthz`: true → 200 "ok", false → 503.
    var healthy: @Sendable () -> Bool
    /// An authenticated, parsed admin request.
    var admin: @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>
    /// The HTML status page on `GET /` (the arbitrator's, `ArbitratorPage`); nil leaves `/`
    /// a 404, as on the data nodes.
    var page: (@Sendable (EventLoop) -> EventLoopFuture<String>)?

    /// Metrics produced on another loop (or otherwise asynchronously).
    init(status: @escaping @Sendable (EventLoop) -> EventLoopFuture<Data>,
         asyncMetrics: @escaping @Sendable (EventLoop) -> EventLoopFuture<String>,
         healthy: @escaping @Sendable () -> Bool,
         admin: @escaping @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>,
         page: (@Sendable (EventLoop) -> EventLoopFuture<String>)? = nil) {
        self.status = status; self.metrics = asyncMetrics; self.healthy = healthy; self.admin = admin; self.page = page
    }

    /// Metrics rendered synchronously (e.g. `registry.render()`; it is thread-safe).
    init(status: @escaping @Sendable (EventLoop) -> EventLoopFuture<Data>,
         metrics: @escaping @Sendable () -> String,
         healthy: @escaping @Sendable () -> Bool,
         admin: @escaping @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>) {
        self.init(status: status, asyncMetrics: { loop in loop.makeSucceededFuture(metrics()) }, healthy: healthy, admin: admin)
    }

    /// Convenience: a status document produced synchronously and encoded with `JSONEncoder.hamgr`.
    init<Doc: Encodable>(statusDocument: @escaping @Sendable () -> Doc,
                         metrics: @escaping @Sendable () -> String,
                         healthy: @escaping @Sendable () -> Bool,
                         admin: @escaping @Sendable (AdminRequest, EventLoop) -> EventLoopFuture<AdminResponse>) {
        self.init(status: { loop in
            loop.makeCompletedFuture { try JSONEncoder.hamgr.encode(statusDocument()) }
        }, metrics: metrics, healthy: healthy, admin: admin)
    }
}

/// Where a request goes; pure, so routing is testable without a socket.
enum StatusRoute: Equatable {
    case metrics, status, healthz
    /// The HTML status page (`GET /`), only where `servesPage`.
    case page
    case admin(String)
    case notFound
    case methodNotAllowed(allow: String)

    /// - Parameter servesPage: `/` is the status page (the arbitrator); otherwise it is
    ///   unknown like any other path.
    static func route(method: HTTPMethod, uri: String, servesPage: Bool = false) -> StatusRoute {
        let path = Self.path(uri)
        let isGet = method == .GET || method == .HEAD
        switch path {
        case "/" where servesPage: return isGet ? .page : .methodNotAllowed(allow: "GET, HEAD")
        case "/metrics": return isGet ? .metrics : .methodNotAllowed(allow: "GET, HEAD")
        case "/status": return isGet ? .status : .methodNotAllowed(allow: "GET, HEAD")
        case "/healthz": return isGet ? .healthz : .methodNotAllowed(allow: "GET, HEAD")
        default:
            guard path.hasPrefix("/admin/") else { return .notFound }
            let action = String(path.dropFirst("/admin/".count))
            guard AdminCommand.actions.contains(action) else { return .notFound }
            return method == .POST ? .admin(action) : .methodNotAllowed(allow: "POST")
        }
    }

    /// The URI without its query (what the logs show: a query may hold a token).
    static func path(_ uri: String) -> String {
        String(uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? "")
    }

    /// The first value of query parameter `name`, percent-decoded ("+" stays "+"), or nil.
    static func queryValue(_ uri: String, _ name: String) -> String? {
        guard let q = uri.firstIndex(of: "?") else { return nil }
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard kv[0] == name[...] else { continue }
            return kv.count == 2 ? String(kv[1]).removingPercentEncoding : ""
        }
        return nil
    }
}

/// Bearer-token checks: the admin API needs the admin token; with a read token
/// configured, `GET /metrics`, `/status` and the page need it or the admin token.
enum AdminAuth: Equatable {
    case allowed
    /// No token file configured: admin actions are refused outright (403).
    case disabled
    /// Missing or wrong token (401).
    case unauthorized

    static func check(authorization: String?, token: String?) -> AdminAuth {
        guard let token, !token.isEmpty else { return .disabled }
        guard let given = bearer(authorization) else { return .unauthorized }
        return constantTimeEquals(given, token) ? .allowed : .unauthorized
    }

    /// Reads are open without a read token; with one, the read or the admin token opens them.
    /// Both comparisons always run, so the time taken does not tell which token was close.
    static func checkRead(authorization: String?, readToken: String?, adminToken: String?) -> AdminAuth {
        guard let readToken, !readToken.isEmpty else { return .allowed }
        guard let given = bearer(authorization) else { return .unauthorized }
        let isRead = constantTimeEquals(given, readToken)
        let isAdmin = adminToken.map { !$0.isEmpty && constantTimeEquals(given, $0) } ?? false
        return isRead || isAdmin ? .allowed : .unauthorized
    }

    /// The status page (`GET /`): like `checkRead`, or the read token alone as `?token=` (a
    /// browser cannot send a header from a bookmark). The admin token is never taken from a
    /// URL, which lands in browser history and proxy logs.
    static func checkPage(authorization: String?, queryToken: String?, readToken: String?, adminToken: String?) -> AdminAuth {
        let byHeader = checkRead(authorization: authorization, readToken: readToken, adminToken: adminToken)
        guard byHeader != .allowed, let readToken, let queryToken else { return byHeader }
        return constantTimeEquals(queryToken, readToken) ? .allowed : .unauthorized
    }

    /// The token of an `Authorization: Bearer TOKEN` header.
    private static func bearer(_ header: String?) -> String? {
        guard let parts = header?.split(separator: " ", maxSplits: 1),
              parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        return parts[1].trimmingCharacters(in: .whitespaces)
    }

    /// Compares every byte of the expected token whatever the input, so the time taken
    /// does not reveal how long a matching prefix was.
    static func constantTimeEquals(_ given: String, _ expected: String) -> Bool {
        let g = Array(given.utf8), e = Array(expected.utf8)
        var diff: UInt8 = g.count == e.count ? 0 : 1
        for i in 0..<e.count {
            diff |= e[i] ^ (i < g.count ? g[i] : 0)
        }
        return diff == 0
    }
}

/// The HTTP server on `status_address`: `/metrics`, `/status`, `/healthz`, the admin API
/// (design.md §4) and, on the arbitrator, the HTML page on `/`. Malformed requests get 400
/// and lose their connection; oversized headers (over 16 KiB) and bodies (over 64 KiB) are
/// refused; idle connections close after 60 s.
/// With `tls`, every connection starts with a TLS handshake (`status.tls`): a plaintext
/// request fails it and loses its connection, with one log line.
final class StatusServer: @unchecked Sendable {
    static let maxBodyBytes = 64 * 1024
    static let maxHeaderBytes = 16 * 1024
    static let idleTimeout: TimeAmount = .seconds(60)

    private let group: EventLoopGroup
    private let host: String
    private let port: Int
    private let tokens: StatusTokens
    private let tls: TLSConfiguration?
    private let handlers: StatusHandlers
    private let logger: Logger
    private let lock = NSLock()
    private var channel: Channel?

    /// `adminToken` nil refuses every admin action with 403; `readToken` nil leaves
    /// `/metrics` and `/status` open; `tls` nil serves plaintext HTTP.
    init(group: EventLoopGroup, host: String, port: Int, adminToken: String?, readToken: String? = nil,
         tls: TLSConfiguration? = nil, handlers: StatusHandlers, logger: Logger) {
        self.group = group; self.host = host; self.port = port
        self.tokens = StatusTokens(admin: adminToken, read: readToken)
        self.tls = tls; self.handlers = handlers; self.logger = logger
    }

    /// Bind and serve. Port 0 picks a free port (see `boundPort`).
    func start() -> EventLoopFuture<Void> {
        let handlers = self.handlers, tokens = self.tokens, logger = self.logger
        let sslContext: NIOSSLContext?
        do {
            sslContext = try tls.map { try NIOSSLContext(configuration: $0) }
        } catch {
            return group.next().makeFailedFuture(error)
        }
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = Self.maxHeaderBytes
        limits.maxHeaderFieldSize = Self.maxHeaderBytes
        limits.maxHeaderFieldCount = 100
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let sslContext {
                        try sync.addHandler(NIOSSLServerHandler(context: sslContext))
                        try sync.addHandler(TLSHandshakeLog(logger: logger))
                    }
                    try sync.configureHTTPServerPipeline(
                        withPipeliningAssistance: true, withErrorHandling: true,
                        withEncoderConfiguration: .init(), withDecoderLimitConfiguration: limits)
                    try sync.addHandler(IdleStateHandler(allTimeout: Self.idleTimeout))
                    try sync.addHandler(StatusHTTPHandler(handlers: handlers, tokens: tokens, logger: logger))
                }
            }
        return bootstrap.bind(host: host, port: port).map { ch in
            self.lock.lock(); self.channel = ch; self.lock.unlock()
            logger.info("status server listening", metadata: [
                "event": "status_listen", "address": "\(ch.localAddress.map { "\($0)" } ?? "?")",
                "tls": "\(sslContext != nil)", "read_token": "\(tokens.read != nil)",
            ])
        }
    }

    /// The port actually bound (after `start()` succeeded).
    var boundPort: Int? {
        lock.lock(); defer { lock.unlock() }
        return channel?.localAddress?.port
    }

    /// Stop listening; open connections are closed with the server channel's children.
    func stop() -> EventLoopFuture<Void> {
        lock.lock(); let ch = channel; channel = nil; lock.unlock()
        guard let ch else { return group.next().makeSucceededVoidFuture() }
        return ch.close()
    }
}

/// The bearer tokens a status server checks.
private struct StatusTokens: Sendable {
    var admin: String?
    var read: String?
}

/// Logs a connection whose TLS handshake failed (a plaintext request, an untrusted or
/// misconfigured client), once, and closes it; it leaves the pipeline once the handshake
/// is done, so later errors take the usual path.
private final class TLSHandshakeLog: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let logger: Logger
    private var reported = false

    init(logger: Logger) { self.logger = logger }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted? = event as? TLSUserEvent {
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !reported {
            reported = true
            let plaintext = "\(error)".contains("HTTP_REQUEST")  // BoringSSL's name for a plaintext request
            logger.warning(plaintext ? "status connection refused: plaintext HTTP on the HTTPS listener"
                                     : "status connection refused: TLS handshake failed", metadata: [
                "event": "status_tls_refused", "remote": "\(context.remoteAddress.map { "\($0)" } ?? "?")",
                "error": "\(error)",
            ])
        }
        context.close(promise: nil)
    }
}

/// One connection. Requests arrive whole (head, body ≤ 64 KiB, end) thanks to the
/// pipelining handler, which also holds back the next request until this one is answered.
private final class StatusHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let handlers: StatusHandlers
    private let tokens: StatusTokens
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()
    private var tooLarge = false

    init(handlers: StatusHandlers, tokens: StatusTokens, logger: Logger) {
        self.handlers = handlers; self.tokens = tokens; self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h; body.clear(); tooLarge = false
            if let cl = h.headers.first(name: "content-length").flatMap(Int.init), cl > StatusServer.maxBodyBytes {
                tooLarge = true
            }
        case .body(var chunk):
            if tooLarge { return }
            if body.readableBytes + chunk.readableBytes > StatusServer.maxBodyBytes {
                tooLarge = true; body.clear()
            } else {
                body.writeBuffer(&chunk)
            }
        case .end:
            guard let h = head else { return }
            head = nil
            if tooLarge {
                respond(context: context, head: h, status: .payloadTooLarge, contentType: "text/plain; charset=utf-8",
                        body: "request body larger than \(StatusServer.maxBodyBytes) bytes\n", close: true)
                return
            }
            handle(context: context, head: h, body: body)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("status connection error", metadata: ["event": "status_conn_error", "error": "\(error)"])
        context.close(promise: nil)
    }

    private func handle(context: ChannelHandlerContext, head: HTTPRequestHead, body: ByteBuffer) {
        let loop = context.eventLoop
        let route = StatusRoute.route(method: head.method, uri: head.uri, servesPage: handlers.page != nil)
        let authorization = head.headers.first(name: "authorization")
        let auth: AdminAuth
        switch route {
        case .metrics, .status:
            auth = AdminAuth.checkRead(authorization: authorization, readToken: tokens.read, adminToken: tokens.admin)
        case .page:
            auth = AdminAuth.checkPage(authorization: authorization, queryToken: StatusRoute.queryValue(head.uri, "token"),
                                       readToken: tokens.read, adminToken: tokens.admin)
        default:
            auth = .allowed
        }
        if auth != .allowed {
            logger.warning("read refused: bad or missing bearer token", metadata: [
                "event": "read_unauthorized", "path": "\(StatusRoute.path(head.uri).prefix(100))",
                "remote": "\(context.remoteAddress.map { "\($0)" } ?? "?")",
            ])
            respond(context: context, head: head, status: .unauthorized, contentType: "text/plain; charset=utf-8",
                    body: route == .page
                        ? "this page needs the read token: open /?token=READ_TOKEN, or send it (or the admin token) as a bearer token\n"
                        : "this endpoint needs the read token (or the admin token) as a bearer token\n",
                    extraHeaders: [("WWW-Authenticate", "Bearer realm=\"hamgr\"")])
            return
        }
        switch route {
        case .page:
            guard let page = handlers.page else { preconditionFailure("routed to the page without a page handler") }
            page(loop).hop(to: loop).whenComplete { result in
                switch result {
                case .success(let text):
                    // No script, no external asset: the policy lets nothing but the inline style run.
                    self.respond(context: context, head: head, status: .ok, contentType: "text/html; charset=utf-8", body: text,
                                 extraHeaders: [("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
                                                ("Referrer-Policy", "no-referrer"), ("X-Content-Type-Options", "nosniff")])
                case .failure(let error):
                    self.respond(context: context, head: head, status: .internalServerError,
                                 contentType: "text/plain; charset=utf-8", body: "page unavailable: \(error)\n")
                }
            }
        case .metrics:
            handlers.metrics(loop).hop(to: loop).whenComplete { result in
                switch result {
                case .success(let text):
                    self.respond(context: context, head: head, status: .ok, contentType: MetricsRegistry.contentType, body: text)
                case .failure(let error):
                    self.respond(context: context, head: head, status: .internalServerError,
                                 contentType: "text/plain; charset=utf-8", body: "metrics unavailable: \(error)\n")
                }
            }
        case .healthz:
            let ok = handlers.healthy()
            respond(context: context, head: head, status: ok ? .ok : .serviceUnavailable,
                    contentType: "text/plain; charset=utf-8", body: ok ? "ok\n" : "unhealthy\n")
        case .status:
            handlers.status(loop).hop(to: loop).whenComplete { result in
                switch result {
                case .success(let data):
                    self.respond(context: context, head: head, status: .ok, contentType: "application/json",
                                 bodyBytes: ByteBuffer(bytes: data))
                case .failure(let error):
                    self.respond(context: context, head: head, status: .internalServerError,
                                 contentType: "text/plain; charset=utf-8", body: "status unavailable: \(error)\n")
                }
            }
        case .notFound:
            respond(context: context, head: head, status: .notFound, contentType: "text/plain; charset=utf-8",
                    body: "not found; try /status, /metrics, /healthz or POST /admin/{\(AdminCommand.actions.joined(separator: ","))}\n")
        case .methodNotAllowed(let allow):
            respond(context: context, head: head, status: .methodNotAllowed, contentType: "text/plain; charset=utf-8",
                    body: "method \(head.method) not allowed here\n", extraHeaders: [("Allow", allow)])
        case .admin(let action):
            admin(context: context, head: head, action: action, body: body)
        }
    }

    private func admin(context: ChannelHandlerContext, head: HTTPRequestHead, action: String, body: ByteBuffer) {
        let remote = context.remoteAddress.map { "\($0)" } ?? "?"
        func reply(_ status: HTTPResponseStatus, _ r: AdminReply) {
            let data = (try? JSONEncoder.hamgr.encode(r)) ?? Data("{}".utf8)
            respond(context: context, head: head, status: status, contentType: "application/json", bodyBytes: ByteBuffer(bytes: data))
        }
        switch AdminAuth.check(authorization: head.headers.first(name: "authorization"), token: tokens.admin) {
        case .disabled:
            logger.warning("admin request refused: no admin token configured", metadata: ["event": "admin_refused", "action": "\(action)", "remote": "\(remote)"])
            reply(.forbidden, AdminReply(ok: false, message: "admin actions are disabled: set cluster.admin_token_file (a mode 0600 file) and restart"))
            return
        case .unauthorized:
            logger.warning("admin request refused: bad or missing bearer token", metadata: ["event": "admin_unauthorized", "action": "\(action)", "remote": "\(remote)"])
            reply(.unauthorized, AdminReply(ok: false, message: "missing or wrong bearer token"))
            return
        case .allowed:
            break
        }
        guard let params = JSONValue.parseObject(Data(body.readableBytesView)) else {
            reply(.badRequest, AdminReply(ok: false, message: "the request body must be a JSON object"))
            return
        }
        let command: AdminCommand
        do {
            command = try AdminCommand.parse(action: action, params: params)
        } catch {
            reply(.badRequest, AdminReply(ok: false, message: "\(error)"))
            return
        }
        logger.notice("admin request", metadata: ["event": "admin_request", "action": "\(command)", "remote": "\(remote)"])
        let loop = context.eventLoop
        let logger = self.logger
        handlers.admin(AdminRequest(command: command, params: params, remote: remote), loop).hop(to: loop).whenComplete { result in
            switch result {
            case .success(let r):
                logger.notice("admin request done", metadata: ["event": "admin_result", "action": "\(command)", "status": "\(r.status)", "message": "\(r.reply.message)"])
                reply(HTTPResponseStatus(statusCode: r.status), r.reply)
            case .failure(let error):
                logger.error("admin request failed", metadata: ["event": "admin_result", "action": "\(command)", "error": "\(error)"])
                reply(.internalServerError, AdminReply(ok: false, message: "\(error)"))
            }
        }
    }

    private func respond(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus,
                         contentType: String, body: String, close: Bool = false, extraHeaders: [(String, String)] = []) {
        respond(context: context, head: head, status: status, contentType: contentType,
                bodyBytes: ByteBuffer(string: body), close: close, extraHeaders: extraHeaders)
    }

    private func respond(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus,
                         contentType: String, bodyBytes: ByteBuffer, close: Bool = false, extraHeaders: [(String, String)] = []) {
        guard context.channel.isActive else { return }
        let keepAlive = head.isKeepAlive && !close
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(bodyBytes.readableBytes))
        headers.add(name: "Cache-Control", value: "no-store")
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        for (k, v) in extraHeaders { headers.add(name: k, value: v) }
        let response = HTTPResponseHead(version: head.version, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(response)), promise: nil)
        if head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(bodyBytes))), promise: nil)
        }
        let done = context.writeAndFlushPromise()
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: done)
        if !keepAlive {
            done.futureResult.whenComplete { _ in context.close(promise: nil) }
        }
    }
}

private extension ChannelHandlerContext {
    func writeAndFlushPromise() -> EventLoopPromise<Void> { eventLoop.makePromise() }
}
