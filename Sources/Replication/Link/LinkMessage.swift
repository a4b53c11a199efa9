import HACore
import NIOCore

/// Frame kinds on the "replication" channel (kind 0 is the transport's keepalive).
public enum LinkFrameKind: UInt8, CaseIterable, Sendable {
    case handshake = 1
    case write = 2
    case writeAck = 3
    case flush = 4
    case flushAck = 5
    case resyncData = 6
    case resyncAck = 7
    case resyncDone = 8
    case resyncFinished = 9
    case verifyRequest = 10
    case verifyReply = 11
    case verifyEnd = 12
    case resyncRequest = 13
    case refuse = 14
    case dirtyBitmap = 15
    case resyncZeroes = 16
}

/// The handshake: everything the sync decision needs (docs/replication.md "Handshake").
public struct LinkHandshake: Hashable, Sendable {
    /// 2: fresh / assume-clean flags (disk identity and bootstrap). 3: the wasPrimary flag
    /// (a version-2 decoder would refuse the unknown flag bit anyway) and the newest epoch the
    /// side was primary in. 4: the dirty bitmap follows in `dirtyBitmap` frames (it was a
    /// list of runs in the handshake, which a fragmented bitmap could push past the frame
    /// limit); all-zero resync chunks travel as `resyncZeroes`. 5: the crashCopyOnPeer flag
    /// (a crashed primary under protocol B/C takes its crash extents from its peer).
    public static let protocolVersion: UInt16 = 5
    public var sizeBytes: UInt64
    public var chunkBytes: UInt32
    public var generations: DataGenerations
    public var diskState: DiskState
    public var role: Role
    public var crashedPrimary: Bool
    /// A crashed primary whose peer held every write it acknowledged (protocol B or C).
    public var crashCopyOnPeer: Bool
    public var discardLocal: Bool
    /// Chunks this side holds out of sync (bitmap bits ∪ crash AL extents).
    public var dirtyChunks: UInt64
    /// Bitmap pages that follow in `dirtyBitmap` frames (those with a set bit); the sync
    /// decision waits for all of them.
    public var dirtyPages: UInt32
    /// Fresh metadata (no data adopted since it was created).
    public var fresh: Bool
    /// Fresh metadata on a provably all-zero store.
    public var emptyFresh: Bool
    /// Bootstrapped with `--assume-clean`, not written alone since.
    public var assumeClean: Bool
    /// Primary at some point since this process opened the store (the header's wasPrimary).
    public var wasPrimary: Bool
    /// The newest epoch in which this side was primary (zero: never).
    public var primaryEpoch: Epoch

    public init(sizeBytes: UInt64, chunkBytes: UInt32, generations: DataGenerations, diskState: DiskState, role: Role,
                crashedPrimary: Bool, crashCopyOnPeer: Bool = false, discardLocal: Bool, dirtyChunks: UInt64 = 0, dirtyPages: UInt32 = 0, fresh: Bool = false, emptyFresh: Bool = false, assumeClean: Bool = false,
                wasPrimary: Bool = false, primaryEpoch: Epoch = .zero) {
        self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes; self.generations = generations
        self.diskState = diskState; self.role = role; self.crashedPrimary = crashedPrimary; self.crashCopyOnPeer = crashedPrimary && crashCopyOnPeer
        self.discardLocal = discardLocal; self.dirtyChunks = dirtyChunks; self.dirtyPages = dirtyPages; self.fresh = fresh || emptyFresh; self.emptyFresh = emptyFresh; self.assumeClean = assumeClean
        self.wasPrimary = wasPrimary
        self.primaryEpoch = primaryEpoch
    }
}

/// Write frame flags.
public struct WriteFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// Durable on the peer before its "written" ack.
    public static let fua = WriteFlags(rawValue: 1)
    /// No data follows: write `length` zero bytes.
    public static let zeroes = WriteFlags(rawValue: 2)
    /// With `zeroes`: the range may be deallocated (trim, punch hole).
    public static let mayDeallocate = WriteFlags(rawValue: 4)
}

public enum AckStage: UInt8, Sendable {
    /// The peer has the frame (protocol B).
    case received = 1
    /// The peer wrote it (protocol C; always sent, it ends AL tracking).
    case written = 2
}

/// One decoded replication message. Decoding never trusts a length before bounding it,
/// and refuses trailing bytes.
public enum LinkMessage: Hashable, Sendable {
    case handshake(LinkHandshake)
    case write(seq: UInt64, offset: UInt64, flags: WriteFlags, length: UInt32, data: ByteBuffer?)
    /// status 0 = ok, otherwise the peer's errno.
    case writeAck(seq: UInt64, stage: AckStage, status: Int32)
    case flush(id: UInt64)
    case flushAck(id: UInt64, status: Int32)
    case resyncData(chunk: UInt64, data: ByteBuffer)
    case resyncAck(chunk: UInt64, status: Int32)
    /// All dirty chunks are on the target: it takes these generations.
    case resyncDone(DataGenerations)
    case resyncFinished
    case verifyRequest(chunk: UInt64, sha256: [UInt8])
    case verifyReply(chunk: UInt64, match: Bool)
    case verifyEnd(chunks: UInt64)
    /// Ask the peer (the source) to resync these chunks to us.
    case resyncRequest([ChunkRun])
    case refuse(String)
    /// Pages of the sender's dirty bitmap (on-disk form, `MetadataLayout.bitmapPageBytes`
    /// each), after its handshake, at most `bitmapPagesPerFrame` per frame.
    case dirtyBitmap([BitmapPage])
    /// A resync chunk whose bytes are all zero: the target writes zeroes and may deallocate.
    case resyncZeroes(chunk: UInt64)

    public static let bitmapPagesPerFrame = 256

    /// The message that carries a resync chunk: `resyncZeroes` when every byte is zero, so a
    /// thin store stays thin and a sparse volume's resync moves no zero bytes.
    public static func resyncChunk(_ chunk: UInt64, _ data: ByteBuffer) -> LinkMessage {
        let zero = data.withUnsafeReadableBytes { raw -> Bool in
            var words = raw.count / 8, i = 0
            while words > 0 {
                if raw.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
                i += 8; words -= 1
            }
            while i < raw.count { if raw[i] != 0 { return false }; i += 1 }
            return true
        }
        return zero ? .resyncZeroes(chunk: chunk) : .resyncData(chunk: chunk, data: data)
    }

    /// The `dirtyBitmap` frames that carry every page of `bitmap` with a set bit.
    public static func dirtyBitmapFrames(_ bitmap: DirtyBitmap) -> [LinkMessage] {
        let pages = bitmap.nonEmptyPages
        return stride(from: 0, to: pages.count, by: bitmapPagesPerFrame).map { start in
            .dirtyBitmap(pages[start..<min(start + bitmapPagesPerFrame, pages.count)].map {
                BitmapPage(index: $0, bytes: bitmap.pageBytes($0))
            })
        }
    }

    public var kind: LinkFrameKind {
        switch self {
        case .handshake: return .handshake
        case .write: return .write
        case .writeAck: return .writeAck
        case .flush: return .flush
        case .flushAck: return .flushAck
        case .resyncData: return .resyncData
        case .resyncAck: return .resyncAck
        case .resyncDone: return .resyncDone
        case .resyncFinished: return .resyncFinished
        case .verifyRequest: return .verifyRequest
        case .verifyReply: return .verifyReply
        case .verifyEnd: return .verifyEnd
        case .resyncRequest: return .resyncRequest
        case .refuse: return .refuse
        case .dirtyBitmap: return .dirtyBitmap
        case .resyncZeroes: return .resyncZeroes
        }
    }

    /// Bytes of framing a data-carrying message adds to its payload (for resync accounting).
    public static let resyncDataOverhead = 8

    /// The encoding as a head and, for messages that carry a block (writes, resync chunks),
    /// the block itself, untouched: `head + data == encode()`. A sender that can send two
    /// buffers as one message (the link's frame sealer) avoids copying the block.
    public func encodeParts(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> (head: ByteBuffer, data: ByteBuffer?) {
        switch self {
        case let .write(seq, offset, flags, length, data?):
            return (LinkMessage.write(seq: seq, offset: offset, flags: flags, length: length, data: nil).encode(allocator: allocator), data)
        case let .resyncData(chunk, data):
            var b = allocator.buffer(capacity: 8)
            b.writeInteger(chunk)
            return (b, data)
        default:
            return (encode(allocator: allocator), nil)
        }
    }

    public func encode(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        var b = allocator.buffer(capacity: 64)
        switch self {
        case .handshake(let h):
            b.writeInteger(LinkHandshake.protocolVersion)
            b.writeInteger(h.sizeBytes)
            b.writeInteger(h.chunkBytes)
            Self.writeGenerations(h.generations, &b)
            b.writeInteger(MetadataLayout.diskCode(h.diskState))
            b.writeInteger(UInt8(h.role == .primary ? 1 : 0))
            let bits: [(Bool, UInt8)] = [(h.crashedPrimary, 1), (h.discardLocal, 2), (h.emptyFresh, 4), (h.assumeClean, 8),
                                         (h.fresh, 16), (h.wasPrimary, 32), (h.crashCopyOnPeer, 64)]
            b.writeInteger(bits.reduce(UInt8(0)) { $1.0 ? $0 | $1.1 : $0 })
            b.writeInteger(h.dirtyChunks)
            b.writeInteger(h.dirtyPages)
            b.writeInteger(h.primaryEpoch.value)
        case let .write(seq, offset, flags, length, data):
            b.writeInteger(seq); b.writeInteger(offset); b.writeInteger(flags.rawValue); b.writeInteger(length)
            if var d = data { b.writeBuffer(&d) }
        case let .writeAck(seq, stage, status):
            b.writeInteger(seq); b.writeInteger(stage.rawValue); b.writeInteger(status)
        case .flush(let id):
            b.writeInteger(id)
        case let .flushAck(id, status):
            b.writeInteger(id); b.writeInteger(status)
        case let .resyncData(chunk, data):
            b.writeInteger(chunk); var d = data; b.writeBuffer(&d)
        case let .resyncAck(chunk, status):
            b.writeInteger(chunk); b.writeInteger(status)
        case .resyncDone(let g):
            Self.writeGenerations(g, &b)
        case .resyncFinished:
            break
        case let .verifyRequest(chunk, hash):
            b.writeInteger(chunk); b.writeBytes(hash)
        case let .verifyReply(chunk, match):
            b.writeInteger(chunk); b.writeInteger(UInt8(match ? 1 : 0))
        case .verifyEnd(let n):
            b.writeInteger(n)
        case .resyncRequest(let runs):
            Self.writeRuns(runs, &b)
        case .refuse(let why):
            let bytes = Array(why.utf8.prefix(1024))
            b.writeInteger(UInt16(bytes.count)); b.writeBytes(bytes)
        case .dirtyBitmap(let pages):
            b.reserveCapacity(2 + pages.count * (4 + MetadataLayout.bitmapPageBytes))
            b.writeInteger(UInt16(pages.count))
            for p in pages { b.writeInteger(UInt32(p.index)); b.writeBytes(p.bytes) }
        case .resyncZeroes(let chunk):
            b.writeInteger(chunk)
        }
        return b
    }

    public static func decode(kind rawKind: UInt8, payload: ByteBuffer) -> Result<LinkMessage, LinkCodecError> {
        guard let kind = LinkFrameKind(rawValue: rawKind) else { return .failure(.unknownKind(rawKind)) }
        var b = payload
        func fail(_ what: String) -> Result<LinkMessage, LinkCodecError> { .failure(.malformed(kind, what)) }
        let msg: LinkMessage
        switch kind {
        case .handshake:
            guard let v: UInt16 = b.readInteger() else { return fail("short") }
            guard v == LinkHandshake.protocolVersion else { return .failure(.version(v)) }
            guard let size: UInt64 = b.readInteger(), let chunk: UInt32 = b.readInteger(),
                  let gens = readGenerations(&b), let dc: UInt8 = b.readInteger(), let disk = MetadataLayout.disk(dc),
                  let role: UInt8 = b.readInteger(), role <= 1, let fl: UInt8 = b.readInteger(), fl <= 127,
                  let dirtyChunks: UInt64 = b.readInteger(), let dirtyPages: UInt32 = b.readInteger(),
                  let pe: UInt64 = b.readInteger() else { return fail("bad handshake fields") }
            msg = .handshake(LinkHandshake(sizeBytes: size, chunkBytes: chunk, generations: gens, diskState: disk,
                                           role: role == 1 ? .primary : .secondary, crashedPrimary: fl & 1 != 0, crashCopyOnPeer: fl & 64 != 0,
                                           discardLocal: fl & 2 != 0, dirtyChunks: dirtyChunks, dirtyPages: dirtyPages, fresh: fl & 16 != 0, emptyFresh: fl & 4 != 0, assumeClean: fl & 8 != 0,
                                           wasPrimary: fl & 32 != 0, primaryEpoch: Epoch(pe)))
        case .write:
            guard let seq: UInt64 = b.readInteger(), let off: UInt64 = b.readInteger(), let fl: UInt8 = b.readInteger(),
                  let len: UInt32 = b.readInteger() else { return fail("short header") }
            let flags = WriteFlags(rawValue: fl)
            guard fl & ~7 == 0 else { return fail("unknown flags \(fl)") }
            guard Int(len) <= Frame.maxPayloadBytes else { return fail("length \(len) too large") }
            guard off.addingReportingOverflow(UInt64(len)).overflow == false else { return fail("offset overflow") }
            if flags.contains(.zeroes) {
                msg = .write(seq: seq, offset: off, flags: flags, length: len, data: nil)
            } else {
                guard b.readableBytes == Int(len), let d = b.readSlice(length: Int(len)) else { return fail("data length \(b.readableBytes) ≠ \(len)") }
                msg = .write(seq: seq, offset: off, flags: flags, length: len, data: d)
            }
        case .writeAck:
            guard let seq: UInt64 = b.readInteger(), let st: UInt8 = b.readInteger(), let stage = AckStage(rawValue: st),
                  let status: Int32 = b.readInteger() else { return fail("bad ack") }
            msg = .writeAck(seq: seq, stage: stage, status: status)
        case .flush:
            guard let id: UInt64 = b.readInteger() else { return fail("short") }
            msg = .flush(id: id)
        case .flushAck:
            guard let id: UInt64 = b.readInteger(), let st: Int32 = b.readInteger() else { return fail("short") }
            msg = .flushAck(id: id, status: st)
        case .resyncData:
            guard let c: UInt64 = b.readInteger(), b.readableBytes > 0, let d = b.readSlice(length: b.readableBytes) else { return fail("short") }
            msg = .resyncData(chunk: c, data: d)
        case .resyncAck:
            guard let c: UInt64 = b.readInteger(), let st: Int32 = b.readInteger() else { return fail("short") }
            msg = .resyncAck(chunk: c, status: st)
        case .resyncDone:
            guard let g = readGenerations(&b) else { return fail("bad generations") }
            msg = .resyncDone(g)
        case .resyncFinished:
            msg = .resyncFinished
        case .verifyRequest:
            guard let c: UInt64 = b.readInteger(), let h = b.readBytes(length: 32) else { return fail("short") }
            msg = .verifyRequest(chunk: c, sha256: h)
        case .verifyReply:
            guard let c: UInt64 = b.readInteger(), let m: UInt8 = b.readInteger(), m <= 1 else { return fail("bad reply") }
            msg = .verifyReply(chunk: c, match: m == 1)
        case .verifyEnd:
            guard let n: UInt64 = b.readInteger() else { return fail("short") }
            msg = .verifyEnd(chunks: n)
        case .resyncRequest:
            guard let runs = readRuns(&b) else { return fail("bad runs") }
            msg = .resyncRequest(runs)
        case .refuse:
            guard let n: UInt16 = b.readInteger(), let s = b.readString(length: Int(n)) else { return fail("bad reason") }
            msg = .refuse(s)
        case .dirtyBitmap:
            let pageBytes = MetadataLayout.bitmapPageBytes
            guard let n: UInt16 = b.readInteger(), n > 0, Int(n) <= bitmapPagesPerFrame,
                  b.readableBytes == Int(n) * (4 + pageBytes) else { return fail("bad page count or length") }
            var pages: [BitmapPage] = []
            pages.reserveCapacity(Int(n))
            for _ in 0..<n {
                let index: UInt32 = b.readInteger()!
                pages.append(BitmapPage(index: Int(index), bytes: b.readBytes(length: pageBytes)!))
            }
            msg = .dirtyBitmap(pages)
        case .resyncZeroes:
            guard let c: UInt64 = b.readInteger() else { return fail("short") }
            msg = .resyncZeroes(chunk: c)
        }
        guard b.readableBytes == 0 else { return fail("\(b.readableBytes) trailing bytes") }
        return .success(msg)
    }

    static func writeGenerations(_ g: DataGenerations, _ b: inout ByteBuffer) {
        b.writeInteger(g.current.raw); b.writeInteger(g.bitmap.raw)
        b.writeInteger(UInt8(g.history.count))
        for h in g.history { b.writeInteger(h.raw) }
    }

    static func readGenerations(_ b: inout ByteBuffer) -> DataGenerations? {
        guard let c: UInt64 = b.readInteger(), let bm: UInt64 = b.readInteger(), let n: UInt8 = b.readInteger(),
              Int(n) <= DataGenerations.historyLimit else { return nil }
        var hist: [GenerationID] = []
        for _ in 0..<n { guard let h: UInt64 = b.readInteger() else { return nil }; hist.append(GenerationID(h)) }
        return DataGenerations(current: GenerationID(c), bitmap: GenerationID(bm), history: hist)
    }

    static func writeRuns(_ runs: [ChunkRun], _ b: inout ByteBuffer) {
        b.writeInteger(UInt32(runs.count))
        for r in runs { b.writeInteger(UInt64(r.start)); b.writeInteger(UInt32(r.count)) }
    }

    static func readRuns(_ b: inout ByteBuffer) -> [ChunkRun]? {
        guard let n: UInt32 = b.readInteger(), Int(n) <= b.readableBytes / 12 else { return nil }
        var out: [ChunkRun] = []
        out.reserveCapacity(Int(n))
        for _ in 0..<n {
            guard let s: UInt64 = b.readInteger(), let c: UInt32 = b.readInteger(), s <= UInt64(Int32.max), c > 0 else { return nil }
            out.append(ChunkRun(start: Int(s), count: Int(c)))
        }
        return out
    }
}

public enum LinkCodecError: Error, Hashable, CustomStringConvertible {
    case unknownKind(UInt8)
    case version(UInt16)
    case malformed(LinkFrameKind, String)
    public var description: String {
        switch self {
        case .unknownKind(let k): return "unknown replication frame kind \(k)"
        case .version(let v): return "replication protocol version \(v) (want \(LinkHandshake.protocolVersion))"
        case let .malformed(k, why): return "malformed \(k) frame: \(why)"
        }
    }
}
