// @preconcurrency: swift-crypto does not mark `SHA256` Sendable on Linux, and `FrameMAC`
// stores two of them. They are copy-on-write values (the BoringSSL context is copied before
// a shared one is updated), so a `FrameMAC` sent to another thread is as safe as an Array.
@preconcurrency import Crypto
import NIOCore

/// One authenticated frame on a peer or arbitrator link (design.md §3 "Frames").
///
/// Wire layout, big-endian:
/// `u32 length` (bytes after this field) · `u8 version` · `u8 kind` · `u64 sequence` ·
/// `u64 epoch` · payload · 32-byte HMAC-SHA256 over version…payload.
/// `kind` belongs to the module that owns the channel (quorum or replication);
/// the sequence starts at 1 after the hello and rises by one per frame, so a replayed or
/// reordered frame fails the check.
public struct Frame: Sendable {
    public var kind: UInt8
    public var sequence: UInt64
    public var epoch: Epoch
    public var payload: ByteBuffer

    public init(kind: UInt8, sequence: UInt64 = 0, epoch: Epoch, payload: ByteBuffer) {
        self.kind = kind
        self.sequence = sequence
        self.epoch = epoch
        self.payload = payload
    }

    public static let version: UInt8 = 1
    public static let headerBytes = 1 + 1 + 8 + 8
    public static let macBytes = 32
    /// Largest payload accepted: a 32 MiB NBD write plus its replication header.
    public static let maxPayloadBytes = 32 * 1024 * 1024 + 4096
    public static let maxBodyBytes = headerBytes + maxPayloadBytes + macBytes
}

/// Why a frame was refused. Refusal closes the link with this reason logged.
public enum FrameError: Error, Equatable, CustomStringConvertible {
    case tooLarge(UInt32)
    case tooSmall(UInt32)
    case badVersion(UInt8)
    case badMAC
    case replayed(expected: UInt64, got: UInt64)
    case malformed(String)

    public var description: String {
        switch self {
        case .tooLarge(let n): return "frame of \(n) bytes exceeds the maximum \(Frame.maxBodyBytes)"
        case .tooSmall(let n): return "frame of \(n) bytes is shorter than a header and MAC"
        case .badVersion(let v): return "unsupported frame version \(v)"
        case .badMAC: return "frame authentication failed (wrong cluster key or tampered frame)"
        case .replayed(let e, let g): return "frame sequence \(g) where \(e) was expected (replayed or reordered)"
        case .malformed(let why): return "malformed frame: \(why)"
        }
    }
}

/// HMAC-SHA256 (RFC 2104) with the key's inner and outer pad blocks hashed once, when the
/// session key is made. Each frame then costs its own blocks plus one outer block, not a
/// fresh key schedule: with a new `HMAC<SHA256>(key:)` per frame, key setup alone was 6 % of
/// a replicating master's CPU under 4 KiB writes.
public struct FrameMAC: Sendable {
    private let inner: SHA256
    private let outer: SHA256
    public static let blockBytes = 64

    public init(key: SymmetricKey) {
        var k = key.withUnsafeBytes { Array($0) }
        if k.count > Self.blockBytes { k = Array(SHA256.hash(data: k)) }
        k += [UInt8](repeating: 0, count: Self.blockBytes - k.count)
        var i = SHA256()
        i.update(data: k.map { $0 ^ 0x36 })
        var o = SHA256()
        o.update(data: k.map { $0 ^ 0x5c })
        inner = i
        outer = o
    }

    /// The 32-byte tag of `data` followed by `more`.
    public func tag(_ data: UnsafeRawBufferPointer, _ more: UnsafeRawBufferPointer? = nil) -> SHA256.Digest {
        var i = inner  // copy-on-write: the precomputed state stays untouched
        i.update(bufferPointer: data)
        if let more { i.update(bufferPointer: more) }
        var o = outer
        i.finalize().withUnsafeBytes { o.update(bufferPointer: $0) }
        return o.finalize()
    }

    /// Whether `tag` authenticates `data`, compared in constant time.
    public func isValid(tag: UnsafeRawBufferPointer, for data: UnsafeRawBufferPointer) -> Bool {
        guard tag.count == Frame.macBytes else { return false }
        return self.tag(data).withUnsafeBytes { mine in
            var diff: UInt8 = 0
            for i in 0..<Frame.macBytes { diff |= mine[i] ^ tag[i] }
            return diff == 0
        }
    }
}

/// Seals outgoing and opens incoming frames for one direction of one session.
/// Pure: no I/O, so it is fuzzable and testable byte for byte.
public struct FrameSealer: Sendable {
    private let mac: FrameMAC
    public private(set) var nextSequence: UInt64

    public init(key: SymmetricKey, firstSequence: UInt64 = 1) {
        self.mac = FrameMAC(key: key)
        self.nextSequence = firstSequence
    }

    /// Append the sealed frame (length prefix included) to `out`.
    public mutating func seal(kind: UInt8, epoch: Epoch, payload: ByteBuffer, into out: inout ByteBuffer) {
        out.reserveCapacity(minimumWritableBytes: 4 + Frame.headerBytes + payload.readableBytes + Frame.macBytes)
        var trailer = ByteBuffer()
        seal(kind: kind, epoch: epoch, payload: payload, header: &out, trailer: &trailer)
        var p = payload
        out.writeBuffer(&p)
        out.writeBuffer(&trailer)
    }

    /// Seal without copying the payload: the frame on the wire is `header` (length prefix
    /// and frame header, appended here), the payload unchanged, then `trailer` (the MAC).
    /// Large replication writes go out this way as three buffers in one writev.
    public mutating func seal(kind: UInt8, epoch: Epoch, payload: ByteBuffer, header: inout ByteBuffer, trailer: inout ByteBuffer) {
        header.writeInteger(UInt32(Frame.headerBytes + payload.readableBytes + Frame.macBytes))
        let start = header.writerIndex
        header.writeInteger(Frame.version)
        header.writeInteger(kind)
        header.writeInteger(nextSequence)
        header.writeInteger(epoch.value)
        let tag = header.withUnsafeReadableBytes { h in
            payload.withUnsafeReadableBytes { p in
                mac.tag(UnsafeRawBufferPointer(rebasing: h[(start - header.readerIndex)...]), p)
            }
        }
        _ = tag.withUnsafeBytes { trailer.writeBytes($0) }
        nextSequence &+= 1
    }

    /// Check and decode one frame body (without its length prefix).
    public mutating func open(_ body: ByteBuffer) -> Result<Frame, FrameError> {
        let n = body.readableBytes
        guard n >= Frame.headerBytes + Frame.macBytes else { return .failure(.tooSmall(UInt32(n))) }
        guard n <= Frame.maxBodyBytes else { return .failure(.tooLarge(UInt32(n))) }
        let signedBytes = n - Frame.macBytes
        let ok: Bool = body.withUnsafeReadableBytes { raw in
            mac.isValid(tag: UnsafeRawBufferPointer(rebasing: raw[signedBytes...]),
                        for: UnsafeRawBufferPointer(rebasing: raw[0..<signedBytes]))
        }
        guard ok else { return .failure(.badMAC) }
        var b = body
        let version: UInt8 = b.readInteger()!
        guard version == Frame.version else { return .failure(.badVersion(version)) }
        let kind: UInt8 = b.readInteger()!
        let seq: UInt64 = b.readInteger()!
        let epoch: UInt64 = b.readInteger()!
        guard seq == nextSequence else { return .failure(.replayed(expected: nextSequence, got: seq)) }
        nextSequence &+= 1
        let payload = b.readSlice(length: b.readableBytes - Frame.macBytes)!
        return .success(Frame(kind: kind, sequence: seq, epoch: Epoch(epoch), payload: payload))
    }
}

/// Splits a byte stream into frame bodies, bounding the length field before trusting it.
public struct FrameBodyDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer
    public init() {}
    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let body = try Self.nextBody(&buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(body))
        return .continue
    }
    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }

    /// Single-step, channel-free: the next complete body, nil if more bytes are needed.
    public static func nextBody(_ buffer: inout ByteBuffer) throws -> ByteBuffer? {
        guard let length: UInt32 = buffer.getInteger(at: buffer.readerIndex) else { return nil }
        guard length <= Frame.maxBodyBytes else { throw FrameError.tooLarge(length) }
        guard length >= Frame.headerBytes + Frame.macBytes else { throw FrameError.tooSmall(length) }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        return buffer.readSlice(length: Int(length))
    }
}

/// A configuration problem, naming the key.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public var key: String
    public var message: String
    public init(key: String, message: String) { self.key = key; self.message = message }
    public var description: String { "\(key): \(message)" }
}
