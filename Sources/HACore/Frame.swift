@preconcurrency import Crypto
import Foundation
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

/// Seals outgoing and opens incoming frames for one direction of one session.
/// Pure: no I/O, so it is fuzzable and testable byte for byte.
public struct FrameSealer: Sendable {
    /// HMAC state with the key already absorbed (inner and outer pads hashed once per
    /// session, not once per frame); each frame starts from a copy of it.
    private let keyed: HMAC<SHA256>
    public private(set) var nextSequence: UInt64

    public init(key: SymmetricKey, firstSequence: UInt64 = 1) {
        self.keyed = HMAC<SHA256>(key: key)
        self.nextSequence = firstSequence
    }

    /// Append the sealed frame (length prefix included) to `out`.
    public mutating func seal(kind: UInt8, epoch: Epoch, payload: ByteBuffer, into out: inout ByteBuffer) {
        let body = Frame.headerBytes + payload.readableBytes + Frame.macBytes
        out.reserveCapacity(minimumWritableBytes: 4 + body)
        out.writeInteger(UInt32(body))
        let start = out.writerIndex
        out.writeInteger(Frame.version)
        out.writeInteger(kind)
        out.writeInteger(nextSequence)
        out.writeInteger(epoch.value)
        var p = payload
        out.writeBuffer(&p)
        var mac = keyed
        out.withUnsafeReadableBytes { all in
            mac.update(data: UnsafeRawBufferPointer(rebasing: all[(start - out.readerIndex)...]))
        }
        let tag = mac.finalize()
        _ = tag.withUnsafeBytes { out.writeBytes($0) }
        nextSequence &+= 1
    }

    /// Check and decode one frame body (without its length prefix).
    public mutating func open(_ body: ByteBuffer) -> Result<Frame, FrameError> {
        let n = body.readableBytes
        guard n >= Frame.headerBytes + Frame.macBytes else { return .failure(.tooSmall(UInt32(n))) }
        guard n <= Frame.maxBodyBytes else { return .failure(.tooLarge(UInt32(n))) }
        let signedBytes = n - Frame.macBytes
        var mac = keyed
        let ok: Bool = body.withUnsafeReadableBytes { raw in
            mac.update(data: UnsafeRawBufferPointer(rebasing: raw[0..<signedBytes]))
            let tag = UnsafeRawBufferPointer(rebasing: raw[signedBytes...])
            // Constant-time comparison (swift-crypto's MAC == is constant time).
            return mac.finalize() == tag
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

extension SymmetricKey {
    /// Load a cluster key: at least 32 bytes, file mode 0600 (no group/other bits).
    public static func load(clusterKeyFile path: String) throws -> SymmetricKey {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ConfigError(key: "cluster.key_file", message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        if st.st_mode & 0o077 != 0 {
            throw ConfigError(key: "cluster.key_file", message: "\(path) has mode \(String(st.st_mode & 0o777, radix: 8)); it must not be readable by group or others (chmod 600)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(key: "cluster.key_file", message: "cannot read \(path)")
        }
        guard data.count >= 32 else {
            throw ConfigError(key: "cluster.key_file", message: "\(path) holds \(data.count) bytes; at least 32 random bytes are required")
        }
        return SymmetricKey(data: data)
    }
}

/// A configuration problem, naming the key.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public var key: String
    public var message: String
    public init(key: String, message: String) { self.key = key; self.message = message }
    public var description: String { "\(key): \(message)" }
}
