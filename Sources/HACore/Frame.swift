// @preconcurrency: swift-crypto does not mark `SHA256` Sendable on Linux, and `FrameMAC`
// stores two of them. They are copy-on-write values (the BoringSSL context is copied before
// a shared one is updated), so a `FrameMAC` sent to another thread is as safe as an Array.
@preconcurrency import Crypto
import NIOCore

/// One frame on a peer or arbitrator link (design.md §3 "Frames").
///
/// Wire layout, big-endian:
/// `u32 length` (bytes after this field) · `u8 version` · `u8 kind` · `u64 sequence` ·
/// `u64 epoch` · payload · trailer.
/// Session frames (version 3) carry the payload encrypted with AES-256-GCM under the
/// session key of their direction; the trailer is the 16-byte GCM tag, the header (version…
/// epoch) is authenticated with it, and the nonce is the sequence number. The hello that
/// opens a session (kind 255, sequence 0) is not secret — the receiver must read the claimed
/// cluster to pick the key — so it is authenticated only, with HMAC-SHA256 under the cluster
/// key (32-byte trailer). Until the peer's hello has been verified a frame may announce at
/// most `maxHandshakeBodyBytes`: an unauthenticated connection cannot make the receiver
/// buffer a whole `maxBodyBytes` frame.
/// `kind` belongs to the module that owns the channel (quorum or replication); the sequence
/// starts at 1 after the hello and rises by one per frame, so a replayed or reordered frame
/// fails the check, and a frame of another session fails authentication.
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

    /// 3: the listener's hello answers the dialer's nonce and the dialer confirms the session
    /// key with its first frame (version 2 had neither; the two do not interoperate).
    public static let version: UInt8 = 3
    public static let headerBytes = 1 + 1 + 8 + 8
    /// The GCM tag of a session frame.
    public static let tagBytes = AESGCMKey.tagBytes
    /// The HMAC of a hello frame.
    public static let helloMACBytes = 32
    public static let helloKind: UInt8 = 255
    /// Largest payload accepted: a 32 MiB NBD write plus its replication header.
    public static let maxPayloadBytes = 32 * 1024 * 1024 + 4096
    public static let minBodyBytes = headerBytes + tagBytes
    public static let maxBodyBytes = headerBytes + maxPayloadBytes + helloMACBytes
    /// Largest frame body accepted before the session is authenticated (the hello, and the
    /// dialer's key confirmation that follows it). The largest hello is 18 bytes of header,
    /// three strings of at most 1 + 255 bytes, two 16-byte nonces and the 32-byte MAC: 850
    /// bytes (`HelloMessage.maxEncodedBytes` in the transport).
    public static let maxHandshakeBodyBytes = 4 * 1024

    /// Append a hello frame (length prefix included), authenticated with `key`.
    public static func sealHello(payload: ByteBuffer, key: SymmetricKey, into out: inout ByteBuffer) {
        out.writeInteger(UInt32(headerBytes + payload.readableBytes + helloMACBytes))
        let start = out.writerIndex
        writeHeader(kind: helloKind, sequence: 0, epoch: .zero, into: &out)
        var p = payload
        out.writeBuffer(&p)
        let tag = out.withUnsafeReadableBytes { all in
            FrameMAC(key: key).tag(UnsafeRawBufferPointer(rebasing: all[(start - out.readerIndex)...]))
        }
        _ = tag.withUnsafeBytes { out.writeBytes($0) }
    }

    /// Check a hello frame body (without its length prefix) against `key`; its payload.
    public static func openHello(_ body: ByteBuffer, key: SymmetricKey) -> Result<ByteBuffer, FrameError> {
        let n = body.readableBytes
        guard n >= headerBytes + helloMACBytes else { return .failure(.tooSmall(UInt32(n))) }
        let signed = n - helloMACBytes
        let ok: Bool = body.withUnsafeReadableBytes { raw in
            FrameMAC(key: key).isValid(tag: UnsafeRawBufferPointer(rebasing: raw[signed...]),
                                       for: UnsafeRawBufferPointer(rebasing: raw[0..<signed]))
        }
        guard ok else { return .failure(.badMAC) }
        var b = body
        let version: UInt8 = b.readInteger()!
        guard version == Frame.version else { return .failure(.badVersion(version)) }
        let kind: UInt8 = b.readInteger()!
        let seq: UInt64 = b.readInteger()!
        guard kind == helloKind, seq == 0 else { return .failure(.malformed("not a hello (kind \(kind), sequence \(seq))")) }
        b.moveReaderIndex(forwardBy: 8)
        return .success(b.readSlice(length: b.readableBytes - helloMACBytes)!)
    }

    static func writeHeader(kind: UInt8, sequence: UInt64, epoch: Epoch, into out: inout ByteBuffer) {
        out.writeInteger(version)
        out.writeInteger(kind)
        out.writeInteger(sequence)
        out.writeInteger(epoch.value)
    }
}

/// Why a frame was refused. Refusal closes the link with this reason logged.
public enum FrameError: Error, Equatable, CustomStringConvertible {
    case tooLarge(UInt32)
    /// A length above `Frame.maxHandshakeBodyBytes` before the peer's hello was verified.
    case tooLargeBeforeAuthentication(UInt32)
    case tooSmall(UInt32)
    case badVersion(UInt8)
    case badMAC
    case replayed(expected: UInt64, got: UInt64)
    case malformed(String)

    public var description: String {
        switch self {
        case .tooLarge(let n): return "frame of \(n) bytes exceeds the maximum \(Frame.maxBodyBytes)"
        case .tooLargeBeforeAuthentication(let n):
            return "frame of \(n) bytes before the session is authenticated exceeds the handshake limit \(Frame.maxHandshakeBodyBytes) (not a hamgr peer, or an attempt to make this node buffer unauthenticated data)"
        case .tooSmall(let n): return "frame of \(n) bytes is shorter than a header and tag"
        case .badVersion(let v): return "unsupported frame version \(v) (this node speaks \(Frame.version); upgrade both nodes)"
        case .badMAC: return "frame authentication failed (wrong cluster key, tampered frame, or a frame of another session)"
        case .replayed(let e, let g): return "frame sequence \(g) where \(e) was expected (replayed or reordered)"
        case .malformed(let why): return "malformed frame: \(why)"
        }
    }
}

/// HMAC-SHA256 (RFC 2104) with the key's inner and outer pad blocks hashed once, when the
/// key is made. Authenticates hellos, which are rare; session frames use AES-GCM.
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
        guard tag.count == Frame.helloMACBytes else { return false }
        return self.tag(data).withUnsafeBytes { mine in
            var diff: UInt8 = 0
            for i in 0..<Frame.helloMACBytes { diff |= mine[i] ^ tag[i] }
            return diff == 0
        }
    }
}

/// Seals outgoing and opens incoming session frames for one direction of one session
/// (AES-256-GCM under that direction's session key, nonce = sequence number).
/// Pure: no I/O, so it is fuzzable and testable byte for byte.
public struct FrameSealer: Sendable {
    private let aead: AESGCMKey
    public private(set) var nextSequence: UInt64

    public init(key: SymmetricKey, firstSequence: UInt64 = 1) {
        self.aead = AESGCMKey(key: key)
        self.nextSequence = firstSequence
    }

    /// Append the sealed frame (length prefix included) to `out`. The plaintext is `payload`
    /// followed by `more` (when given): a message header and its data are encrypted straight
    /// from where they are, never joined.
    public mutating func seal(kind: UInt8, epoch: Epoch, payload: ByteBuffer, more: ByteBuffer? = nil, into out: inout ByteBuffer) {
        let n1 = payload.readableBytes, n2 = more?.readableBytes ?? 0
        out.reserveCapacity(minimumWritableBytes: 4 + Frame.headerBytes + n1 + n2 + Frame.tagBytes)
        out.writeInteger(UInt32(Frame.headerBytes + n1 + n2 + Frame.tagBytes))
        Frame.writeHeader(kind: kind, sequence: nextSequence, epoch: epoch, into: &out)
        let nonce = Self.nonce(nextSequence)
        let sealedBytes = n1 + n2 + Frame.tagBytes
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: sealedBytes) { dst in
            // The header just written sits right before `dst`; it is the associated data.
            let aad = UnsafeRawBufferPointer(start: dst.baseAddress! - Frame.headerBytes, count: Frame.headerBytes)
            nonce.withUnsafeBytes { nb in
                payload.withUnsafeReadableBytes { p in
                    if let more {
                        more.withUnsafeReadableBytes { m in aead.seal(nonce: nb, aad: aad, p, m, into: dst.baseAddress!) }
                    } else {
                        aead.seal(nonce: nb, aad: aad, p, UnsafeRawBufferPointer(start: nil, count: 0), into: dst.baseAddress!)
                    }
                }
            }
            return sealedBytes
        }
        nextSequence &+= 1
    }

    /// Check and decrypt one frame body (without its length prefix). The payload is
    /// decrypted into a new buffer from `allocator`.
    public mutating func open(_ body: ByteBuffer, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Result<Frame, FrameError> {
        let n = body.readableBytes
        guard n >= Frame.minBodyBytes else { return .failure(.tooSmall(UInt32(n))) }
        guard n <= Frame.maxBodyBytes else { return .failure(.tooLarge(UInt32(n))) }
        var b = body
        let version: UInt8 = b.readInteger()!
        guard version == Frame.version else { return .failure(.badVersion(version)) }
        let kind: UInt8 = b.readInteger()!
        let seq: UInt64 = b.readInteger()!
        let epoch: UInt64 = b.readInteger()!
        guard seq == nextSequence else { return .failure(.replayed(expected: nextSequence, got: seq)) }
        let plainBytes = n - Frame.headerBytes - Frame.tagBytes
        var payload = allocator.buffer(capacity: plainBytes)
        let nonce = Self.nonce(seq)
        let ok: Bool = body.withUnsafeReadableBytes { raw in
            let aad = UnsafeRawBufferPointer(rebasing: raw[0..<Frame.headerBytes])
            let sealed = UnsafeRawBufferPointer(rebasing: raw[Frame.headerBytes...])
            var ok = false
            payload.writeWithUnsafeMutableBytes(minimumWritableBytes: max(plainBytes, 1)) { dst in
                ok = nonce.withUnsafeBytes { aead.open(nonce: $0, aad: aad, sealed, into: dst.baseAddress!) }
                return ok ? plainBytes : 0
            }
            return ok
        }
        guard ok else { return .failure(.badMAC) }
        nextSequence &+= 1
        return .success(Frame(kind: kind, sequence: seq, epoch: Epoch(epoch), payload: payload))
    }

    /// The 96-bit GCM nonce of a sequence number: four zero bytes, then the number. Each
    /// direction of each session has its own key, so no (key, nonce) pair ever repeats.
    static func nonce(_ sequence: UInt64) -> [UInt8] {
        var n = [UInt8](repeating: 0, count: AESGCMKey.nonceBytes)
        for i in 0..<8 { n[4 + i] = UInt8(truncatingIfNeeded: sequence >> (56 - 8 * UInt64(i))) }
        return n
    }
}

/// The framing rule: a body of `length` bytes follows its length prefix, and the length is
/// bounded before it is trusted. (The transport's `FrameSplitter` applies it to a socket.)
public enum FrameBodyDecoder {
    /// The length prefix, if it may be trusted. Before the session is `authenticated` only a
    /// handshake frame's length is (`Frame.maxHandshakeBodyBytes`).
    public static func checkedLength(_ length: UInt32, authenticated: Bool = true) throws -> UInt32 {
        guard authenticated || length <= Frame.maxHandshakeBodyBytes else { throw FrameError.tooLargeBeforeAuthentication(length) }
        guard length <= Frame.maxBodyBytes else { throw FrameError.tooLarge(length) }
        guard length >= Frame.minBodyBytes else { throw FrameError.tooSmall(length) }
        return length
    }

    /// The next complete body in `buffer`, nil if more bytes are needed.
    public static func nextBody(_ buffer: inout ByteBuffer, authenticated: Bool = true) throws -> ByteBuffer? {
        guard let length: UInt32 = buffer.getInteger(at: buffer.readerIndex) else { return nil }
        _ = try checkedLength(length, authenticated: authenticated)
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
