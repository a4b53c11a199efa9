import Foundation
import NIOCore
import NIOPosix
import NIOSSL
#if canImport(Glibc)
import Glibc
#endif

/// A tiny blocking HTTP/1.1 client for hactl and tests: one request per connection
/// (`Connection: close`), a deadline over the whole exchange, bearer token. `http://` runs
/// over a POSIX socket; `https://` verifies the server's certificate against a CA (and the
/// URL's host name or IP address) and runs the TLS exchange on NIO's shared event loops.
public struct HTTPClient: Sendable {
    public struct Response: Sendable {
        public var status: Int
        public var headers: [(String, String)]
        public var body: Data
        public func header(_ name: String) -> String? {
            headers.first { $0.0.caseInsensitiveCompare(name) == .orderedSame }?.1
        }
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    public enum Failure: Error, CustomStringConvertible {
        case badURL(String)
        case resolve(String, String)
        case connect(String, String)
        case timeout(String)
        case io(String)
        case badResponse(String)
        /// An `https://` URL without a CA to verify the server with.
        case needsCA(String)
        case tls(String, String)
        /// An `https://` URL answered by a plaintext HTTP server.
        case plaintextServer(String)
        /// The connection closed before a byte came back (an `http://` URL of a TLS listener does that).
        case noAnswer(String)

        public var description: String {
            switch self {
            case .badURL(let u): return "'\(u)' is not an http(s)://HOST:PORT[/PATH] URL"
            case .resolve(let h, let why): return "cannot resolve \(h): \(why)"
            case .connect(let a, let why): return "cannot connect to \(a): \(why)"
            case .timeout(let a): return "no answer from \(a) in time"
            case .io(let why): return "connection failed: \(why)"
            case .badResponse(let why): return "malformed HTTP response: \(why)"
            case .needsCA(let u): return "\(u): an https:// endpoint needs a CA file to verify the server (hactl --ca-file or HACTL_CA_FILE)"
            case .tls(let a, let why): return "TLS handshake with \(a) failed: \(why)"
            case .plaintextServer(let a): return "\(a): the server speaks plaintext HTTP, not TLS (use http://, or turn on [status] tls)"
            case .noAnswer(let a): return "\(a) closed the connection without answering (a TLS listener? then use https:// and a CA file)"
            }
        }
    }

    /// The CA (PEM) an `https://` server's certificate must chain to, loaded once.
    public struct TrustedCA: Sendable {
        public let path: String
        let context: NIOSSLContext

        /// Errors name `key` (the option or config key the path came from).
        public init(file path: String, key: String) throws {
            var c = TLSConfiguration.makeClientConfiguration()
            c.trustRoots = .certificates(try TLSFiles.certificates(path, key: key))
            c.minimumTLSVersion = .tlsv12
            self.path = path
            self.context = try NIOSSLContext(configuration: c)
        }
    }

    /// `http://HOST:PORT` or `https://HOST:PORT` (a path, if any, is a prefix for requests).
    public var endpoint: String
    public var bearerToken: String?
    public var timeout: Duration
    /// Needed for `https://` endpoints.
    public var trust: TrustedCA?

    public init(endpoint: String, bearerToken: String? = nil, timeout: Duration = .seconds(5), trust: TrustedCA? = nil) {
        self.endpoint = endpoint; self.bearerToken = bearerToken; self.timeout = timeout; self.trust = trust
    }

    public func get(_ path: String) throws -> Response {
        try request(method: "GET", path: path, body: nil)
    }

    public func post(_ path: String, json: Data) throws -> Response {
        try request(method: "POST", path: path, body: json, contentType: "application/json")
    }

    public func request(method: String, path: String, body: Data?, contentType: String? = nil,
                        extraHeaders: [(String, String)] = []) throws -> Response {
        let (host, port, prefix, secure) = try Self.split(endpoint)
        if secure && trust == nil { throw Failure.needsCA(endpoint) }
        let deadline = ContinuousClock.now + timeout
        let what = "\(host.contains(":") ? "[\(host)]" : host):\(port)"
        let fd = try Self.connect(host: host, port: port, deadline: deadline)

        var head = "\(method) \(prefix)\(path) HTTP/1.1\r\nHost: \(host.contains(":") ? "[\(host)]" : host):\(port)\r\nConnection: close\r\nUser-Agent: hamgr/\(hamgrVersion)\r\n"
        if let t = bearerToken { head += "Authorization: Bearer \(t)\r\n" }
        if let ct = contentType { head += "Content-Type: \(ct)\r\n" }
        for (k, v) in extraHeaders { head += "\(k): \(v)\r\n" }
        if let body { head += "Content-Length: \(body.count)\r\n" } else if method == "POST" { head += "Content-Length: 0\r\n" }
        head += "\r\n"
        var out = Data(head.utf8)
        if let body { out.append(body) }
        if let trust, secure {
            let raw = try TLSExchange.run(fd: fd, host: host, what: what, trust: trust, request: out, deadline: deadline)
            return try Self.parse(raw)
        }
        defer { close(fd) }
        try Self.sendAll(fd, out, deadline: deadline, what: what)
        let raw = try Self.readAll(fd, deadline: deadline, what: what)
        if raw.isEmpty { throw Failure.noAnswer(what) }
        return try Self.parse(raw)
    }

    // MARK: Internals

    /// Host, port, path prefix, and whether the URL is `https://`.
    static func split(_ url: String) throws -> (String, Int, String, Bool) {
        let secure = url.hasPrefix("https://")
        guard secure || url.hasPrefix("http://") else { throw Failure.badURL(url) }
        let rest = url.dropFirst(secure ? "https://".count : "http://".count)
        let authority = rest.prefix { $0 != "/" }
        var prefix = String(rest.dropFirst(authority.count))
        while prefix.hasSuffix("/") { prefix.removeLast() }
        guard let (host, port) = try? parseHostPort(String(authority)) else { throw Failure.badURL(url) }
        return (host, port, prefix, secure)
    }

    static func isIPAddress(_ host: String) -> Bool {
        (try? SocketAddress(ipAddress: host, port: 0)) != nil
    }

    private static func remainingMs(_ deadline: ContinuousClock.Instant) -> Int32 {
        let left = deadline - ContinuousClock.now
        return left <= .zero ? 0 : Int32(min(Int64(Int32.max), max(1, Int64(left.milliseconds.rounded(.up)))))
    }

    private static func connect(host: String, port: Int, deadline: ContinuousClock.Instant) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let first = res else { throw Failure.resolve(host, String(cString: gai_strerror(rc))) }
        defer { freeaddrinfo(res) }
        var lastError = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            if fd < 0 { lastError = String(cString: strerror(errno)); continue }
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 { return fd }
            if errno != EINPROGRESS { lastError = String(cString: strerror(errno)); close(fd); continue }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let n = poll(&p, 1, remainingMs(deadline))
            if n == 0 { close(fd); throw Failure.timeout("\(host):\(port)") }
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            if n > 0 && err == 0 { return fd }
            lastError = String(cString: strerror(err != 0 ? err : errno))
            close(fd)
        }
        throw Failure.connect("\(host):\(port)", lastError)
    }

    private static func sendAll(_ fd: Int32, _ data: Data, deadline: ContinuousClock.Instant, what: String) throws {
        var offset = 0
        while offset < data.count {
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ms = remainingMs(deadline)
            if ms == 0 || poll(&p, 1, ms) == 0 { throw Failure.timeout(what) }
            let n = data.withUnsafeBytes { raw in
                send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                throw Failure.io(String(cString: strerror(errno)))
            }
            offset += n
        }
    }

    /// Read until EOF (the server closes after the response), bounded at 64 MiB.
    private static func readAll(_ fd: Int32, deadline: ContinuousClock.Instant, what: String) throws -> Data {
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ms = remainingMs(deadline)
            if ms == 0 || poll(&p, 1, ms) == 0 { throw Failure.timeout(what) }
            let n = recv(fd, &buf, buf.count, 0)
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                // A reset after a complete response (server closed with unread input) is fine.
                if errno == ECONNRESET, (try? parse(out)) != nil { return out }
                throw Failure.io(String(cString: strerror(errno)))
            }
            if n == 0 { return out }
            out.append(contentsOf: buf[0..<n])
            if out.count > 64 << 20 { throw Failure.badResponse("response larger than 64 MiB") }
            // Stop early once a Content-Length response is complete (keep-alive servers).
            if (try? parse(out, complete: false)) != nil { return out }
        }
    }

    static func parse(_ raw: Data) throws -> Response {
        guard let r = try parse(raw, complete: true) else { throw Failure.badResponse("truncated") }
        return r
    }

    /// nil if more bytes are needed; with `complete`, EOF marks the body's end when no
    /// length is given.
    static func parse(_ raw: Data, complete: Bool) throws -> Response? {
        let bytes = [UInt8](raw)
        guard let headEnd = findCRLFCRLF(bytes) else {
            if complete { throw Failure.badResponse("no header end") }
            return nil
        }
        let headText = String(decoding: bytes[0..<headEnd], as: UTF8.self)
        var lines = headText.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst()
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else {
            throw Failure.badResponse("status line '\(statusLine)'")
        }
        var headers: [(String, String)] = []
        for l in lines where !l.isEmpty {
            guard let colon = l.firstIndex(of: ":") else { throw Failure.badResponse("header '\(l)'") }
            headers.append((String(l[..<colon]), l[l.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
        }
        let response = Response(status: status, headers: headers, body: Data())
        let bodyStart = headEnd + 4
        let rest = Array(bytes[bodyStart...])
        if let te = response.header("Transfer-Encoding"), te.lowercased().contains("chunked") {
            guard let body = try dechunk(rest) else {
                if complete { throw Failure.badResponse("truncated chunked body") }
                return nil
            }
            return Response(status: status, headers: headers, body: Data(body))
        }
        if let cl = response.header("Content-Length") {
            guard let n = Int(cl), n >= 0 else { throw Failure.badResponse("Content-Length '\(cl)'") }
            if rest.count < n {
                if complete { throw Failure.badResponse("body shorter than Content-Length") }
                return nil
            }
            return Response(status: status, headers: headers, body: Data(rest[0..<n]))
        }
        if !complete { return nil }
        return Response(status: status, headers: headers, body: Data(rest))
    }

    private static func findCRLFCRLF(_ b: [UInt8]) -> Int? {
        guard b.count >= 4 else { return nil }
        for i in 0...(b.count - 4) where b[i] == 13 && b[i + 1] == 10 && b[i + 2] == 13 && b[i + 3] == 10 { return i }
        return nil
    }

    private static func dechunk(_ b: [UInt8]) throws -> [UInt8]? {
        var out: [UInt8] = []
        var i = 0
        while true {
            guard let lineEnd = (i..<max(i, b.count - 1)).first(where: { b[$0] == 13 && b[$0 + 1] == 10 }) else { return nil }
            let sizeText = String(decoding: b[i..<lineEnd], as: UTF8.self).split(separator: ";").first.map(String.init) ?? ""
            guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else {
                throw Failure.badResponse("chunk size '\(sizeText)'")
            }
            i = lineEnd + 2
            if size == 0 { return out }
            guard b.count >= i + size + 2 else { return nil }
            out.append(contentsOf: b[i..<(i + size)])
            i += size + 2
        }
    }
}
