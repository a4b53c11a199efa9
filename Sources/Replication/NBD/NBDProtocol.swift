import NIOCore

// The NBD wire format (NetworkBlockDevice/nbd doc/proto.md), as a pure codec: constants,
// single-step decoders over ByteBuffer and reply encoders. No channel, no I/O, so every
// function here is testable byte for byte and fuzzable (fuzz/Sources/NBDDecoderFuzz).
// All integers on the wire are big-endian, which is ByteBuffer's default.

/// Magic numbers and fixed sizes of the NBD protocol.
public enum NBDMagic {
    /// "NBDMAGIC", first 8 bytes the server sends.
    public static let initial: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": newstyle negotiation, and the prefix of every client option.
    public static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefix of every fixed-newstyle option reply.
    public static let optionReply: UInt64 = 0x0003_E889_0455_65A9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668E_33EF
}

/// Handshake flags (server, 16 bits) and client flags (32 bits).
public enum NBDHandshakeFlags {
    public static let fixedNewstyle: UInt16 = 1 << 0
    public static let noZeroes: UInt16 = 1 << 1
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1
    /// Every client flag this server understands; any other bit closes the connection (spec: MUST).
    public static let clientKnown: UInt32 = clientFixedNewstyle | clientNoZeroes
}

/// Transmission flags sent with the export size.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = Self(rawValue: 1 << 0)
    public static let readOnly = Self(rawValue: 1 << 1)
    public static let sendFlush = Self(rawValue: 1 << 2)
    public static let sendFUA = Self(rawValue: 1 << 3)
    public static let rotational = Self(rawValue: 1 << 4)
    public static let sendTrim = Self(rawValue: 1 << 5)
    public static let sendWriteZeroes = Self(rawValue: 1 << 6)
    public static let sendDF = Self(rawValue: 1 << 7)
    public static let canMultiConn = Self(rawValue: 1 << 8)
    public static let sendCache = Self(rawValue: 1 << 10)
    public static let sendFastZero = Self(rawValue: 1 << 11)

    /// The flags an export over a volume with `caps` advertises: only what the volume honours
    /// (design.md §3). A read-only export advertises no write-side feature.
    public init(capabilities caps: VolumeCapabilities) {
        var f: NBDTransmissionFlags = [.hasFlags]
        if caps.flush { f.insert(.sendFlush) }
        if caps.readOnly {
            f.insert(.readOnly)
        } else {
            if caps.fua { f.insert(.sendFUA) }
            if caps.trim { f.insert(.sendTrim) }
            if caps.writeZeroes { f.insert(.sendWriteZeroes) }
        }
        if caps.multiConn { f.insert(.canMultiConn) }
        self = f
    }
}

/// Option codes of the handshake phase.
public enum NBDOption {
    public static let exportName: UInt32 = 1
    public static let abort: UInt32 = 2
    public static let list: UInt32 = 3
    public static let startTLS: UInt32 = 5
    public static let info: UInt32 = 6
    public static let go: UInt32 = 7
    public static let structuredReply: UInt32 = 8
    public static let listMetaContext: UInt32 = 9
    public static let setMetaContext: UInt32 = 10
    public static let extendedHeaders: UInt32 = 11
}

/// Option reply types; errors have bit 31 set.
public enum NBDOptionReply {
    public static let ack: UInt32 = 1
    public static let server: UInt32 = 2
    public static let info: UInt32 = 3
    public static let metaContext: UInt32 = 4
    public static let errUnsupported: UInt32 = 0x8000_0001
    public static let errPolicy: UInt32 = 0x8000_0002
    public static let errInvalid: UInt32 = 0x8000_0003
    public static let errPlatform: UInt32 = 0x8000_0004
    public static let errTLSRequired: UInt32 = 0x8000_0005
    public static let errUnknown: UInt32 = 0x8000_0006
    public static let errShutdown: UInt32 = 0x8000_0007
    public static let errBlockSizeRequired: UInt32 = 0x8000_0008
    public static let errTooBig: UInt32 = 0x8000_0009
    public static func isError(_ type: UInt32) -> Bool { type & 0x8000_0000 != 0 }
}

/// Information types requested by and answered to NBD_OPT_INFO / NBD_OPT_GO.
public enum NBDInfo {
    public static let export: UInt16 = 0
    public static let name: UInt16 = 1
    public static let description: UInt16 = 2
    public static let blockSize: UInt16 = 3
}

/// Request types of the transmission phase.
public enum NBDCommand {
    public static let read: UInt16 = 0
    public static let write: UInt16 = 1
    public static let disconnect: UInt16 = 2
    public static let flush: UInt16 = 3
    public static let trim: UInt16 = 4
    public static let cache: UInt16 = 5
    public static let writeZeroes: UInt16 = 6
    public static let blockStatus: UInt16 = 7
}

/// Command flags of a request.
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = Self(rawValue: 1 << 0)
    public static let noHole = Self(rawValue: 1 << 1)
    public static let dontFragment = Self(rawValue: 1 << 2)
    public static let reqOne = Self(rawValue: 1 << 3)
    public static let fastZero = Self(rawValue: 1 << 4)
}

/// Structured reply chunk types and flags.
public enum NBDReplyType {
    public static let none: UInt16 = 0
    public static let offsetData: UInt16 = 1
    public static let offsetHole: UInt16 = 2
    public static let error: UInt16 = 0x8001
    public static let errorOffset: UInt16 = 0x8002
    public static let flagDone: UInt16 = 1 << 0
}

/// The error values a reply may carry (spec "Error values"); nothing else goes on the wire.
public enum NBDError: UInt32, Sendable, CaseIterable {
    case ok = 0
    case perm = 1
    case io = 5
    case noMemory = 12
    case invalid = 22
    case noSpace = 28
    case overflow = 75
    case notSupported = 95
    case shutdown = 108

    /// The name used in logs and metrics ("EINVAL"; "ok" for success).
    public var name: String {
        switch self {
        case .ok: return "ok"
        case .perm: return "EPERM"
        case .io: return "EIO"
        case .noMemory: return "ENOMEM"
        case .invalid: return "EINVAL"
        case .noSpace: return "ENOSPC"
        case .overflow: return "EOVERFLOW"
        case .notSupported: return "ENOTSUP"
        case .shutdown: return "ESHUTDOWN"
        }
    }

    /// Maps a system errno to the closest NBD error (spec: EDQUOT and EFBIG → ENOSPC).
    public init(errno e: Int32) {
        switch e {
        case 1, 13, 30: self = .perm            // EPERM, EACCES, EROFS
        case 12: self = .noMemory
        case 22: self = .invalid
        case 28, 122, 27: self = .noSpace       // ENOSPC, EDQUOT, EFBIG
        case 75: self = .overflow
        case 95: self = .notSupported
        case 108: self = .shutdown
        default: self = .io
        }
    }

    /// How a volume's refusal reaches the client (docs/nbd.md "Error mapping").
    /// notPrimary → ESHUTDOWN: the spec makes the client disconnect on ESHUTDOWN, which is
    /// what a client of a demoted node must do (reconnect to the master); EPERM would make
    /// a filesystem remount read-only over a transient role change.
    public init(_ error: VolumeError) {
        switch error {
        case .io(let e): self = NBDError(errno: e)
        case .noSpace: self = .noSpace
        case .notPrimary: self = .shutdown
        case .invalid: self = .invalid
        case .shuttingDown: self = .shutdown
        }
    }
}

/// A protocol violation after which the connection is closed (never answered).
public enum NBDProtocolError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt64)
    case unknownClientFlags(UInt32)
    case optionTooLong(UInt32)
    /// The client sent more before the reply to its NBD_OPT_STARTTLS.
    case bytesAfterStartTLS(Int)

    public var description: String {
        switch self {
        case .badMagic(let m): return "bad magic 0x\(String(m, radix: 16))"
        case .unknownClientFlags(let f): return "unknown client flags 0x\(String(f, radix: 16))"
        case .optionTooLong(let n): return "option data of \(n) bytes exceeds the \(NBDLimits.maxOptionBytes)-byte limit"
        case .bytesAfterStartTLS(let n): return "\(n) bytes after NBD_OPT_STARTTLS, before its reply"
        }
    }
}

/// Limits the codec enforces before trusting a length field.
public enum NBDLimits {
    /// Longest option data accepted; longer is treated as denial of service (hard disconnect).
    /// GO/INFO need 4 + name (≤ 4096) + 2 + 2·n bytes.
    public static let maxOptionBytes: UInt32 = 64 * 1024
    /// Longest string (export name, message) the spec allows.
    public static let maxStringBytes = 4096
    public static let requestHeaderBytes = 28
}

// MARK: - Handshake phase

/// One option as the client sent it.
public struct NBDOptionRequest: Equatable, Sendable {
    public var code: UInt32
    public var data: ByteBuffer
    public init(code: UInt32, data: ByteBuffer) { self.code = code; self.data = data }
}

/// Single-step decoders of the handshake phase.
public enum NBDHandshakeDecoder {
    /// The client's 32-bit flags, nil until 4 bytes are there. Unknown bits are a violation.
    public static func nextClientFlags(_ buffer: inout ByteBuffer) throws -> UInt32? {
        guard let flags: UInt32 = buffer.readInteger() else { return nil }
        guard flags & ~NBDHandshakeFlags.clientKnown == 0 else { throw NBDProtocolError.unknownClientFlags(flags) }
        return flags
    }

    /// The next complete option, nil if more bytes are needed. The length is bounded before
    /// anything waits for it.
    public static func nextOption(_ buffer: inout ByteBuffer) throws -> NBDOptionRequest? {
        let start = buffer.readerIndex
        guard let magic: UInt64 = buffer.getInteger(at: start) else { return nil }
        guard magic == NBDMagic.option else { throw NBDProtocolError.badMagic(magic) }
        guard let code: UInt32 = buffer.getInteger(at: start + 8),
              let length: UInt32 = buffer.getInteger(at: start + 12) else { return nil }
        guard length <= NBDLimits.maxOptionBytes else { throw NBDProtocolError.optionTooLong(length) }
        guard buffer.readableBytes >= 16 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 16)
        return NBDOptionRequest(code: code, data: buffer.readSlice(length: Int(length))!)
    }

    /// The payload of NBD_OPT_INFO / NBD_OPT_GO: export name and information requests.
    /// nil when malformed (answered with NBD_REP_ERR_INVALID).
    public static func parseInfoRequest(_ data: ByteBuffer) -> (name: String, requests: [UInt16])? {
        var d = data
        guard let nameLength: UInt32 = d.readInteger(),
              nameLength <= NBDLimits.maxStringBytes,
              Int(nameLength) <= d.readableBytes - 2,
              let name = d.readString(length: Int(nameLength)),
              let count: UInt16 = d.readInteger(),
              d.readableBytes == Int(count) * 2 else { return nil }
        var requests: [UInt16] = []
        requests.reserveCapacity(Int(count))
        for _ in 0..<count { requests.append(d.readInteger()!) }
        return (name, requests)
    }

    /// The payload of NBD_OPT_EXPORT_NAME: the whole data is the name. nil when too long
    /// or not UTF-8.
    public static func parseExportName(_ data: ByteBuffer) -> String? {
        guard data.readableBytes <= NBDLimits.maxStringBytes else { return nil }
        var d = data
        return d.readString(length: d.readableBytes)
    }
}

/// Encoders of the server's handshake messages.
public enum NBDHandshakeEncoder {
    /// NBDMAGIC, IHAVEOPT, handshake flags.
    public static func writeGreeting(flags: UInt16, into out: inout ByteBuffer) {
        out.writeInteger(NBDMagic.initial)
        out.writeInteger(NBDMagic.option)
        out.writeInteger(flags)
    }

    /// One fixed-newstyle option reply.
    public static func writeOptionReply(option: UInt32, type: UInt32, data: ByteBuffer? = nil, into out: inout ByteBuffer) {
        out.writeInteger(NBDMagic.optionReply)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(data?.readableBytes ?? 0))
        if var d = data { out.writeBuffer(&d) }
    }

    /// An error reply whose data is a message for the user (cut to the spec's string limit).
    public static func writeOptionError(option: UInt32, type: UInt32, message: String, into out: inout ByteBuffer) {
        var d = ByteBuffer()
        d.writeString(truncated(message))
        writeOptionReply(option: option, type: type, data: d, into: &out)
    }

    /// NBD_REP_SERVER for NBD_OPT_LIST: name length, name, optional description.
    public static func writeServerReply(name: String, description: String?, into out: inout ByteBuffer) {
        var d = ByteBuffer()
        d.writeInteger(UInt32(name.utf8.count))
        d.writeString(name)
        if let text = description { d.writeString(truncated(text)) }
        writeOptionReply(option: NBDOption.list, type: NBDOptionReply.server, data: d, into: &out)
    }

    public static func writeInfoExport(option: UInt32, size: UInt64, flags: NBDTransmissionFlags, into out: inout ByteBuffer) {
        var d = ByteBuffer()
        d.writeInteger(NBDInfo.export)
        d.writeInteger(size)
        d.writeInteger(flags.rawValue)
        writeOptionReply(option: option, type: NBDOptionReply.info, data: d, into: &out)
    }

    public static func writeInfoString(option: UInt32, info: UInt16, text: String, into out: inout ByteBuffer) {
        var d = ByteBuffer()
        d.writeInteger(info)
        d.writeString(truncated(text))
        writeOptionReply(option: option, type: NBDOptionReply.info, data: d, into: &out)
    }

    public static func writeInfoBlockSize(option: UInt32, minimum: UInt32, preferred: UInt32, maximum: UInt32, into out: inout ByteBuffer) {
        var d = ByteBuffer()
        d.writeInteger(NBDInfo.blockSize)
        d.writeInteger(minimum)
        d.writeInteger(preferred)
        d.writeInteger(maximum)
        writeOptionReply(option: option, type: NBDOptionReply.info, data: d, into: &out)
    }

    /// The answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES was agreed.
    public static func writeExportNameReply(size: UInt64, flags: NBDTransmissionFlags, noZeroes: Bool, into out: inout ByteBuffer) {
        out.writeInteger(size)
        out.writeInteger(flags.rawValue)
        if !noZeroes { out.writeRepeatingByte(0, count: 124) }
    }

    /// Cuts a string to at most `NBDLimits.maxStringBytes` UTF-8 bytes on a character boundary.
    static func truncated(_ s: String) -> String {
        guard s.utf8.count > NBDLimits.maxStringBytes else { return s }
        var out = ""
        for ch in s {
            if out.utf8.count + String(ch).utf8.count > NBDLimits.maxStringBytes { break }
            out.append(ch)
        }
        return out
    }
}

// MARK: - Transmission phase

/// The fixed 28-byte header of a request.
public struct NBDRequestHeader: Equatable, Sendable {
    public var flags: NBDCommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    public init(flags: NBDCommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags; self.type = type; self.cookie = cookie; self.offset = offset; self.length = length
    }

    public func write(into out: inout ByteBuffer) {
        out.writeInteger(NBDMagic.request)
        out.writeInteger(flags.rawValue)
        out.writeInteger(type)
        out.writeInteger(cookie)
        out.writeInteger(offset)
        out.writeInteger(length)
    }
}

/// What the request decoder produced.
public enum NBDRequestEvent: Equatable, Sendable {
    /// A request, with its payload for NBD_CMD_WRITE.
    case request(NBDRequestHeader, payload: ByteBuffer?)
    /// A write longer than the maximum payload: its data was skipped without buffering, and
    /// the request is to be answered with EINVAL (the connection stays usable).
    case oversizedWrite(NBDRequestHeader)
}

/// Single-step request decoder. Stateful only while it skips the data of an oversized
/// write, so that such a write costs no memory however long it claims to be.
public struct NBDRequestDecoder: Sendable {
    public let maximumPayloadBytes: UInt32
    private var skipping: (header: NBDRequestHeader, remaining: Int)?

    public init(maximumPayloadBytes: UInt32) { self.maximumPayloadBytes = maximumPayloadBytes }

    /// The header at the buffer's reader index without consuming it; nil until 28 bytes are
    /// there. Throws on a bad magic as soon as the magic is visible.
    public static func peekHeader(_ buffer: ByteBuffer) throws -> NBDRequestHeader? {
        let start = buffer.readerIndex
        guard buffer.readableBytes >= NBDLimits.requestHeaderBytes else {
            if let magic: UInt32 = buffer.getInteger(at: start), magic != NBDMagic.request {
                throw NBDProtocolError.badMagic(UInt64(magic))
            }
            return nil
        }
        let magic: UInt32 = buffer.getInteger(at: start)!
        guard magic == NBDMagic.request else { throw NBDProtocolError.badMagic(UInt64(magic)) }
        return NBDRequestHeader(
            flags: NBDCommandFlags(rawValue: buffer.getInteger(at: start + 4)!),
            type: buffer.getInteger(at: start + 6)!,
            cookie: buffer.getInteger(at: start + 8)!,
            offset: buffer.getInteger(at: start + 16)!,
            length: buffer.getInteger(at: start + 24)!)
    }

    /// The total size of the request starting at the buffer's reader index, once its header
    /// is visible (28 bytes, plus the payload of a write that will be buffered); lets the
    /// caller size its buffer once instead of growing it while a large write streams in.
    public func bytesNeeded(_ buffer: ByteBuffer) -> Int? {
        guard skipping == nil, buffer.readableBytes >= NBDLimits.requestHeaderBytes,
              let type: UInt16 = buffer.getInteger(at: buffer.readerIndex + 6),
              let length: UInt32 = buffer.getInteger(at: buffer.readerIndex + 24) else { return nil }
        guard type == NBDCommand.write, length <= maximumPayloadBytes else { return NBDLimits.requestHeaderBytes }
        return NBDLimits.requestHeaderBytes + Int(length)
    }

    /// True while part of an oversized write's data is still to be skipped.
    public var isSkippingPayload: Bool { skipping != nil }

    /// The next event, nil if more bytes are needed. Throws on bad magic (close).
    public mutating func next(_ buffer: inout ByteBuffer) throws -> NBDRequestEvent? {
        if let s = skipping {
            let n = min(s.remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            if n < s.remaining { skipping = (s.header, s.remaining - n); return nil }
            skipping = nil
            return .oversizedWrite(s.header)
        }
        guard let header = try Self.peekHeader(buffer) else { return nil }
        guard header.type == NBDCommand.write else {
            buffer.moveReaderIndex(forwardBy: NBDLimits.requestHeaderBytes)
            return .request(header, payload: nil)
        }
        if header.length > maximumPayloadBytes {
            buffer.moveReaderIndex(forwardBy: NBDLimits.requestHeaderBytes)
            skipping = (header, Int(header.length))
            return try next(&buffer)
        }
        let length = Int(header.length)
        guard buffer.readableBytes >= NBDLimits.requestHeaderBytes + length else { return nil }
        buffer.moveReaderIndex(forwardBy: NBDLimits.requestHeaderBytes)
        return .request(header, payload: buffer.readSlice(length: length)!)
    }
}

/// Encoders of transmission replies.
public enum NBDReplyEncoder {
    public static let simpleHeaderBytes = 16
    public static let chunkHeaderBytes = 20

    /// A simple reply header; for a successful read, the data follows it.
    public static func writeSimpleReply(cookie: UInt64, error: NBDError, into out: inout ByteBuffer) {
        out.writeInteger(NBDMagic.simpleReply)
        out.writeInteger(error.rawValue)
        out.writeInteger(cookie)
    }

    /// A structured chunk header; `length` bytes of payload must follow.
    public static func writeChunkHeader(cookie: UInt64, type: UInt16, flags: UInt16, length: UInt32, into out: inout ByteBuffer) {
        out.writeInteger(NBDMagic.structuredReply)
        out.writeInteger(flags)
        out.writeInteger(type)
        out.writeInteger(cookie)
        out.writeInteger(length)
    }

    /// Header and offset of a final NBD_REPLY_TYPE_OFFSET_DATA chunk; `dataBytes` of data follow.
    public static func writeOffsetDataHeader(cookie: UInt64, offset: UInt64, dataBytes: Int, into out: inout ByteBuffer) {
        writeChunkHeader(cookie: cookie, type: NBDReplyType.offsetData, flags: NBDReplyType.flagDone,
                         length: UInt32(8 + dataBytes), into: &out)
        out.writeInteger(offset)
    }

    /// A final NBD_REPLY_TYPE_NONE chunk: success without data.
    public static func writeDone(cookie: UInt64, into out: inout ByteBuffer) {
        writeChunkHeader(cookie: cookie, type: NBDReplyType.none, flags: NBDReplyType.flagDone, length: 0, into: &out)
    }

    /// A final NBD_REPLY_TYPE_ERROR chunk with a message for the user.
    public static func writeErrorChunk(cookie: UInt64, error: NBDError, message: String, into out: inout ByteBuffer) {
        let text = NBDHandshakeEncoder.truncated(message)
        let bytes = text.utf8.count
        writeChunkHeader(cookie: cookie, type: NBDReplyType.error, flags: NBDReplyType.flagDone,
                         length: UInt32(6 + bytes), into: &out)
        out.writeInteger(error.rawValue)
        out.writeInteger(UInt16(bytes))
        out.writeString(text)
    }
}

/// The verdict on one transmission-phase request, before any I/O (pure: the connection
/// handler only carries it out). The rules follow doc/proto.md: flags a command does not
/// define are refused, commands that were not advertised are refused, a read or trim past the
/// end gets EINVAL and a write past the end ENOSPC, a read larger than the advertised maximum
/// payload is refused, zero-length reads/trims/zero-writes succeed without touching the volume.
public enum NBDRequestVerdict: Equatable, Sendable {
    case serve
    /// Succeeds at once: nothing to do (a zero-length read, trim or write-zeroes).
    case nothingToDo
    case reject(NBDError, String)

    public static func check(_ h: NBDRequestHeader, capabilities caps: VolumeCapabilities, exportSize: UInt64) -> NBDRequestVerdict {
        let end = h.offset.addingReportingOverflow(UInt64(h.length))
        let inBounds = !end.overflow && end.partialValue <= exportSize
        switch h.type {
        case NBDCommand.read:
            guard h.flags.isSubset(of: [.fua]) else { return .reject(.invalid, "unsupported flags for NBD_CMD_READ") }
            guard h.length <= caps.maximumBlockSize else {
                return .reject(.invalid, "read of \(h.length) bytes exceeds the maximum payload of \(caps.maximumBlockSize)")
            }
            guard inBounds else { return .reject(.invalid, "read beyond the end of the export") }
            return h.length == 0 ? .nothingToDo : .serve
        case NBDCommand.write:
            guard !caps.readOnly else { return .reject(.perm, "the export is read-only") }
            guard h.flags.isSubset(of: [.fua]) else { return .reject(.invalid, "unsupported flags for NBD_CMD_WRITE") }
            // Spec: a write beyond the end SHOULD get ENOSPC (reads and trims get EINVAL).
            guard inBounds else { return .reject(.noSpace, "write beyond the end of the export") }
            return .serve
        case NBDCommand.flush:
            guard caps.flush else { return .reject(.invalid, "NBD_CMD_FLUSH was not advertised") }
            guard h.flags.isSubset(of: [.fua]) else { return .reject(.invalid, "unsupported flags for NBD_CMD_FLUSH") }
            return .serve
        case NBDCommand.trim:
            guard !caps.readOnly else { return .reject(.perm, "the export is read-only") }
            guard caps.trim else { return .reject(.invalid, "NBD_CMD_TRIM was not advertised") }
            guard h.flags.isSubset(of: [.fua]) else { return .reject(.invalid, "unsupported flags for NBD_CMD_TRIM") }
            guard inBounds else { return .reject(.invalid, "trim beyond the end of the export") }
            return h.length == 0 ? .nothingToDo : .serve
        case NBDCommand.writeZeroes:
            guard !caps.readOnly else { return .reject(.perm, "the export is read-only") }
            guard caps.writeZeroes else { return .reject(.invalid, "NBD_CMD_WRITE_ZEROES was not advertised") }
            guard h.flags.isSubset(of: [.fua, .noHole]) else { return .reject(.invalid, "unsupported flags for NBD_CMD_WRITE_ZEROES") }
            guard inBounds else { return .reject(.noSpace, "write beyond the end of the export") }
            return h.length == 0 ? .nothingToDo : .serve
        default:
            return .reject(.invalid, "unknown command \(h.type)")
        }
    }
}
