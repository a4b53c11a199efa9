#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import Replication

/// Why an `NBDClient` call failed.
public enum NBDClientError: Error, Equatable, CustomStringConvertible {
    /// Connecting, sending or receiving failed (errno text), or the server closed the connection.
    case transport(String)
    /// The server broke the protocol (bad magic, unexpected reply).
    case protocolViolation(String)
    /// The server refused the export during the handshake, with its message.
    case refused(String)
    /// The server answered a request with an error.
    case server(NBDError, message: String?)
    /// The server refuses plaintext (NBD_REP_ERR_TLS_REQD) and no TLS was asked for.
    case tlsRequired
    /// TLS could not be set up: STARTTLS refused, the handshake or certificate verification failed.
    case tls(String)

    public var description: String {
        switch self {
        case .transport(let s): return "NBD transport: \(s)"
        case .protocolViolation(let s): return "NBD protocol violation by the server: \(s)"
        case .refused(let s): return "NBD export refused: \(s)"
        case .server(let e, let m): return "NBD server error \(e.name)" + (m.map { ": \($0)" } ?? "")
        case .tlsRequired: return "NBD export refused: the server requires TLS (NBD_REP_ERR_TLS_REQD): give a CA file (the cluster CA, tls.ca_file) to connect over TLS"
        case .tls(let s): return "NBD TLS: \(s)"
        }
    }
}

/// A small blocking NBD client: fixed newstyle, NBD_OPT_GO (structured replies if asked),
/// READ / WRITE / FLUSH / DISC, FUA. One request at a time. Used by `hactl drill` to write a
/// verifiable pattern and read it back, and by tests. Not thread-safe: one caller at a time.
///
/// With `tls`, NBD_OPT_STARTTLS is the first option; once acknowledged, the TLS handshake
/// runs over the same socket (the server's certificate verified against the CA and the host
/// name or address) and every later option and request goes through TLS.
public final class NBDClient {
    public let sizeBytes: UInt64
    public let transmissionFlags: NBDTransmissionFlags
    public let structuredReplies: Bool
    /// The server's maximum payload (NBD_INFO_BLOCK_SIZE), or the spec's default 32 MiB.
    public let maximumPayloadBytes: UInt32
    /// Whether the connection runs over TLS.
    public let isTLS: Bool
    private var transport: NBDTransport?
    private var nextCookie: UInt64 = 1

    /// Connects and negotiates. `timeoutSeconds` bounds every send and receive (and the TLS
    /// handshake). With `tls`, the connection is upgraded with NBD_OPT_STARTTLS before any
    /// other option; a server that does not offer TLS is an error, never a plaintext fallback.
    public init(host: String, port: Int, exportName: String = "", structuredReplies: Bool = true, timeoutSeconds: Int = 30,
                tls: NBDClientTLS? = nil) throws {
        let plain = PlainNBDTransport(fd: try Self.connect(host: host, port: port, timeoutSeconds: timeoutSeconds),
                                      timeoutSeconds: timeoutSeconds)
        var link: NBDTransport = plain
        do {
            var greeting = try link.receive(18)
            guard greeting.readInteger(as: UInt64.self) == NBDMagic.initial,
                  greeting.readInteger(as: UInt64.self) == NBDMagic.option else {
                throw NBDClientError.protocolViolation("not an NBD newstyle server")
            }
            let serverFlags = greeting.readInteger(as: UInt16.self)!
            guard serverFlags & NBDHandshakeFlags.fixedNewstyle != 0 else {
                throw NBDClientError.protocolViolation("server does not speak fixed newstyle")
            }
            var clientFlags = NBDHandshakeFlags.clientFixedNewstyle
            if serverFlags & NBDHandshakeFlags.noZeroes != 0 { clientFlags |= NBDHandshakeFlags.clientNoZeroes }
            var out = ByteBuffer()
            out.writeInteger(clientFlags)
            try link.send(out)

            if let tls {
                try Self.sendOption(link, NBDOption.startTLS, ByteBuffer())
                var (type, data) = try Self.receiveOptionReply(link, option: NBDOption.startTLS)
                guard type == NBDOptionReply.ack else {
                    let text = data.readString(length: data.readableBytes) ?? ""
                    let why = type == NBDOptionReply.errUnsupported ? "NBD_REP_ERR_UNSUPPORTED: the export does not offer TLS (export.tls = off?)"
                        : "option reply 0x\(String(type, radix: 16))"
                    throw NBDClientError.tls("\(host):\(port) refused NBD_OPT_STARTTLS (\(why))" + (text.isEmpty ? "" : ": \(text)"))
                }
                link = try TLSNBDTransport(connectedSocket: plain.release(), host: host, port: port, tls: tls, timeoutSeconds: timeoutSeconds)
            }

            var structured = false
            if structuredReplies {
                try Self.sendOption(link, NBDOption.structuredReply, ByteBuffer())
                let (type, _) = try Self.receiveOptionReply(link, option: NBDOption.structuredReply)
                structured = type == NBDOptionReply.ack
            }
            var go = ByteBuffer()
            go.writeInteger(UInt32(exportName.utf8.count))
            go.writeString(exportName)
            go.writeInteger(UInt16(1))
            go.writeInteger(NBDInfo.blockSize)
            try Self.sendOption(link, NBDOption.go, go)
            var size: UInt64?
            var flags = NBDTransmissionFlags()
            var maxPayload: UInt32 = 32 * 1024 * 1024
            while true {
                var (type, data) = try Self.receiveOptionReply(link, option: NBDOption.go)
                if type == NBDOptionReply.ack { break }
                if NBDOptionReply.isError(type) {
                    let text = data.readString(length: data.readableBytes) ?? ""
                    throw NBDClientError.refused(text.isEmpty ? "option reply 0x\(String(type, radix: 16))" : text)
                }
                guard type == NBDOptionReply.info, let info: UInt16 = data.readInteger() else { continue }
                if info == NBDInfo.export, let s: UInt64 = data.readInteger(), let f: UInt16 = data.readInteger() {
                    size = s
                    flags = NBDTransmissionFlags(rawValue: f)
                } else if info == NBDInfo.blockSize, data.readableBytes == 12 {
                    _ = data.readInteger(as: UInt32.self)
                    _ = data.readInteger(as: UInt32.self)
                    maxPayload = data.readInteger()!
                }
            }
            guard let s = size else { throw NBDClientError.protocolViolation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT") }
            self.sizeBytes = s
            self.transmissionFlags = flags
            self.structuredReplies = structured
            self.maximumPayloadBytes = maxPayload
            self.isTLS = tls != nil
            self.transport = link
        } catch {
            link.close(wait: false)
            throw error
        }
    }

    deinit { transport?.close(wait: false) }

    public func read(offset: UInt64, length: Int) throws -> [UInt8] {
        let cookie = try request(NBDCommand.read, offset: offset, length: length)
        return try receiveReply(cookie: cookie, readOffset: offset, readLength: length)
    }

    public func write(offset: UInt64, bytes: [UInt8], fua: Bool = false) throws {
        let cookie = try request(NBDCommand.write, flags: fua ? .fua : [], offset: offset, length: bytes.count, payload: bytes)
        _ = try receiveReply(cookie: cookie, readOffset: nil, readLength: 0)
    }

    public func flush() throws {
        let cookie = try request(NBDCommand.flush, offset: 0, length: 0)
        _ = try receiveReply(cookie: cookie, readOffset: nil, readLength: 0)
    }

    /// Sends NBD_CMD_DISC and closes the connection (TLS: close_notify, waited for at most a
    /// couple of seconds; the socket is closed on return). Further calls fail.
    public func disconnect() {
        guard let t = transport else { return }
        _ = try? request(NBDCommand.disconnect, offset: 0, length: 0)
        t.close(wait: true)
        transport = nil
    }

    // MARK: requests

    private func request(_ type: UInt16, flags: NBDCommandFlags = [], offset: UInt64, length: Int, payload: [UInt8]? = nil) throws -> UInt64 {
        guard let link = transport else { throw NBDClientError.transport("disconnected") }
        guard length >= 0, length <= Int(UInt32.max) else { throw NBDClientError.transport("length \(length) out of range") }
        let cookie = nextCookie
        nextCookie &+= 1
        var out = ByteBuffer()
        out.reserveCapacity(28 + (payload?.count ?? 0))
        NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: UInt32(length)).write(into: &out)
        if let p = payload { out.writeBytes(p) }
        try link.send(out)
        return cookie
    }

    private func receiveReply(cookie: UInt64, readOffset: UInt64?, readLength: Int) throws -> [UInt8] {
        guard let link = transport else { throw NBDClientError.transport("disconnected") }
        var head = try link.receive(4)
        let magic: UInt32 = head.readInteger()!
        if magic == NBDMagic.simpleReply {
            var rest = try link.receive(12)
            let error: UInt32 = rest.readInteger()!
            let got: UInt64 = rest.readInteger()!
            guard got == cookie else { throw NBDClientError.protocolViolation("reply for cookie \(got), expected \(cookie)") }
            guard error == 0 else { throw NBDClientError.server(NBDError(rawValue: error) ?? .invalid, message: nil) }
            guard readOffset != nil, readLength > 0 else { return [] }
            var data = try link.receive(readLength)
            return data.readBytes(length: readLength)!
        }
        guard magic == NBDMagic.structuredReply else { throw NBDClientError.protocolViolation("reply magic 0x\(String(magic, radix: 16))") }
        guard structuredReplies else { throw NBDClientError.protocolViolation("structured reply that was not negotiated") }
        var result = [UInt8](repeating: 0, count: readLength)
        var firstError: NBDClientError?
        var first = true
        while true {
            if !first {
                var m = try link.receive(4)
                guard m.readInteger(as: UInt32.self) == NBDMagic.structuredReply else { throw NBDClientError.protocolViolation("bad chunk magic") }
            }
            first = false
            var h = try link.receive(16)
            let flags: UInt16 = h.readInteger()!
            let type: UInt16 = h.readInteger()!
            let got: UInt64 = h.readInteger()!
            let length: UInt32 = h.readInteger()!
            guard got == cookie else { throw NBDClientError.protocolViolation("chunk for cookie \(got), expected \(cookie)") }
            guard Int(length) <= readLength + 4096 + 64 else { throw NBDClientError.protocolViolation("chunk of \(length) bytes") }
            var payload = try link.receive(Int(length))
            switch type {
            case NBDReplyType.none:
                break
            case NBDReplyType.offsetData, NBDReplyType.offsetHole:
                guard let base = readOffset, let at: UInt64 = payload.readInteger(), at >= base else {
                    throw NBDClientError.protocolViolation("content chunk outside the request")
                }
                let count = type == NBDReplyType.offsetData ? payload.readableBytes : Int(payload.readInteger(as: UInt32.self) ?? 0)
                guard Int(at - base) + count <= readLength else { throw NBDClientError.protocolViolation("content chunk outside the request") }
                if type == NBDReplyType.offsetData {
                    payload.withUnsafeReadableBytes { src in
                        result.withUnsafeMutableBytes { dst in
                            dst.baseAddress!.advanced(by: Int(at - base)).copyMemory(from: src.baseAddress!, byteCount: count)
                        }
                    }
                } else {
                    for i in Int(at - base)..<(Int(at - base) + count) { result[i] = 0 }
                }
            default:
                if type & 0x8000 != 0, let e: UInt32 = payload.readInteger(), let n: UInt16 = payload.readInteger() {
                    let message = payload.readString(length: min(Int(n), payload.readableBytes))
                    firstError = firstError ?? .server(NBDError(rawValue: e) ?? .invalid, message: message)
                } else {
                    throw NBDClientError.protocolViolation("unknown chunk type \(type)")
                }
            }
            if flags & NBDReplyType.flagDone != 0 { break }
        }
        if let e = firstError { throw e }
        return result
    }

    // MARK: socket plumbing

    private static func sendOption(_ link: NBDTransport, _ code: UInt32, _ data: ByteBuffer) throws {
        var out = ByteBuffer()
        out.writeInteger(NBDMagic.option)
        out.writeInteger(code)
        out.writeInteger(UInt32(data.readableBytes))
        var d = data
        out.writeBuffer(&d)
        try link.send(out)
    }

    /// The next reply to `option`; NBD_REP_ERR_TLS_REQD is thrown as `.tlsRequired`.
    private static func receiveOptionReply(_ link: NBDTransport, option: UInt32) throws -> (UInt32, ByteBuffer) {
        var h = try link.receive(20)
        guard h.readInteger(as: UInt64.self) == NBDMagic.optionReply, h.readInteger(as: UInt32.self) == option else {
            throw NBDClientError.protocolViolation("bad option reply")
        }
        let type: UInt32 = h.readInteger()!
        let length: UInt32 = h.readInteger()!
        guard length <= 64 * 1024 else { throw NBDClientError.protocolViolation("option reply of \(length) bytes") }
        let data = try link.receive(Int(length))
        if type == NBDOptionReply.errTLSRequired { throw NBDClientError.tlsRequired }
        return (type, data)
    }

    private static func connect(host: String, port: Int, timeoutSeconds: Int) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #else
        hints.ai_socktype = SOCK_STREAM
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else { throw NBDClientError.transport("resolve \(host): \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(list) }
        var lastError = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype, a.pointee.ai_protocol)
            if fd < 0 { lastError = String(cString: strerror(errno)); continue }
            var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 { return fd }
            lastError = String(cString: strerror(errno))
            close(fd)
        }
        throw NBDClientError.transport("connect \(host):\(port): \(lastError)")
    }
}
