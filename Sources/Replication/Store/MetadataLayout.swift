import Crypto
import HACore

/// Flags kept in the metadata header (design.md §1, §3 "Activity log").
public struct MetadataFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// This node served as primary since the flag was last cleared.
    public static let wasPrimary = MetadataFlags(rawValue: 1 << 0)
    /// The volume was stopped cleanly (set by stop(), cleared on open).
    public static let cleanShutdown = MetadataFlags(rawValue: 1 << 1)
    /// A primary crash left activity-log extents out of sync; cleared when a resync completes.
    public static let crashRecoveryPending = MetadataFlags(rawValue: 1 << 2)
    /// The operator chose to discard this node's changes after a split brain.
    public static let discardLocal = MetadataFlags(rawValue: 1 << 3)
    /// Metadata created on this store and no data adopted since: the node has never been a
    /// bootstrap source, a sync target that finished, or in sync with a peer. With a store
    /// that is provably all zeros it may pair with another such node without a sync.
    public static let fresh = MetadataFlags(rawValue: 1 << 4)
    /// Bootstrapped with `--assume-clean`: a fresh peer adopts this generation without a
    /// full sync. Cleared once adopted and whenever the primary writes without its peer.
    public static let assumeClean = MetadataFlags(rawValue: 1 << 5)
    /// This node stepped down from primary and has not been primary since: a crash now is a
    /// secondary's crash. Its activity log is still recovered (its chunks are resynced), but
    /// it does not make this node the sync source as a crashed primary — whoever was master
    /// after it holds newer data.
    public static let steppedDown = MetadataFlags(rawValue: 1 << 6)
    /// Primary under protocol B or C: the peer had every write before this node acknowledged
    /// it (received under B, written under C). After a crash of this primary the peer's copy
    /// of the crash extents holds every acknowledged write; this node's own copy may have lost
    /// the unflushed ones with its power.
    public static let acknowledgedOnPeer = MetadataFlags(rawValue: 1 << 7)
}

/// The durable header of a replicated volume's metadata file.
public struct MetadataHeader: Hashable, Sendable {
    public var sequence: UInt64
    public var sizeBytes: UInt64
    public var chunkBytes: UInt32
    public var alExtentBytes: UInt32
    public var alSlots: UInt32
    public var diskState: DiskState
    public var flags: MetadataFlags
    /// The newest epoch this node served in or promised.
    public var epoch: Epoch
    public var generations: DataGenerations
    /// The identity of the backing store this metadata describes (its `DiskLabel`); 0 in
    /// metadata written before disk identities existed (format 1).
    public var diskID: UInt64
    /// The newest epoch in which this node was primary (zero: never, or format < 3). Between
    /// two secondaries in one generation, the later primary holds the newer writes.
    public var primaryEpoch: Epoch

    public init(sequence: UInt64 = 0, sizeBytes: UInt64, chunkBytes: UInt32, alExtentBytes: UInt32, alSlots: UInt32,
                diskState: DiskState, flags: MetadataFlags, epoch: Epoch, generations: DataGenerations, diskID: UInt64 = 0,
                primaryEpoch: Epoch = .zero) {
        self.sequence = sequence; self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes
        self.alExtentBytes = alExtentBytes; self.alSlots = alSlots; self.diskState = diskState
        self.flags = flags; self.epoch = epoch; self.generations = generations; self.diskID = diskID
        self.primaryEpoch = primaryEpoch
    }
}

/// Byte layout of the metadata file (docs/replication.md "On-disk metadata").
///
/// | offset  | size | content |
/// |---------|------|---------|
/// | 0       | 4096 | header slot 0 |
/// | 4096    | 4096 | header slot 1 |
/// | 8192    | 4096 | activity-log slot 0 |
/// | 12288   | 4096 | activity-log slot 1 |
/// | 16384   | n·4096 | dirty bitmap, one bit per chunk, little-endian 64-bit words |
///
/// Headers and AL records alternate between their two slots by sequence number, each
/// sealed with SHA-256, so a torn write leaves the previous good record readable.
public enum MetadataLayout {
    public static let slotBytes = 4096
    public static let headerSlotOffsets: [UInt64] = [0, 4096]
    public static let alSlotOffsets: [UInt64] = [8192, 12288]
    public static let bitmapOffset: UInt64 = 16384
    public static let bitmapPageBytes = 4096
    public static let checksumOffset = slotBytes - 32
    public static let headerMagic: [UInt8] = Array("HAMGRMD1".utf8)
    public static let alMagic: [UInt8] = Array("HAMGRAL1".utf8)
    /// Format 2 adds the disk identity after the history; format 1 headers still decode
    /// (with diskID 0) so an upgraded node keeps its state and stamps its store once.
    public static let version: UInt32 = 3
    /// AL slot: magic(8) seq(8) count(4) then u32 extents, bounded by the checksum.
    public static let maxALSlots = (checksumOffset - 20) / 4

    public static func chunkCount(sizeBytes: UInt64, chunkBytes: Int) -> Int {
        Int((sizeBytes + UInt64(chunkBytes) - 1) / UInt64(chunkBytes))
    }

    public static func bitmapBytes(chunkCount: Int) -> Int {
        let raw = (chunkCount + 7) / 8
        return max(bitmapPageBytes, (raw + bitmapPageBytes - 1) / bitmapPageBytes * bitmapPageBytes)
    }

    public static func fileBytes(chunkCount: Int) -> UInt64 {
        bitmapOffset + UInt64(bitmapBytes(chunkCount: chunkCount))
    }

    static func diskCode(_ d: DiskState) -> UInt8 {
        switch d { case .upToDate: return 0; case .outdated: return 1; case .inconsistent: return 2; case .diskless: return 3 }
    }
    static func disk(_ c: UInt8) -> DiskState? {
        switch c { case 0: return .upToDate; case 1: return .outdated; case 2: return .inconsistent; case 3: return .diskless; default: return nil }
    }

    // MARK: header

    public static func encode(_ h: MetadataHeader) -> [UInt8] {
        var w = ByteWriter(capacity: slotBytes)
        w.bytes(headerMagic)
        w.u32(version)
        w.u64(h.sequence)
        w.u64(h.sizeBytes)
        w.u32(h.chunkBytes)
        w.u32(h.alExtentBytes)
        w.u32(h.alSlots)
        w.u8(diskCode(h.diskState)); w.u8(0); w.u8(0); w.u8(0)
        w.u32(h.flags.rawValue)
        w.u64(h.epoch.value)
        w.u64(h.generations.current.raw)
        w.u64(h.generations.bitmap.raw)
        w.u32(UInt32(h.generations.history.count))
        for i in 0..<DataGenerations.historyLimit {
            w.u64(i < h.generations.history.count ? h.generations.history[i].raw : 0)
        }
        w.u64(h.diskID)
        w.u64(h.primaryEpoch.value)
        return seal(w.out)
    }

    /// nil when the slot is empty, torn or not ours.
    public static func decodeHeader(_ slot: [UInt8]) -> MetadataHeader? {
        guard isSealed(slot) else { return nil }
        var r = ByteReader(slot)
        guard r.bytes(8) == headerMagic, let v = r.u32(), (1...version).contains(v),
              let seq = r.u64(), let size = r.u64(), let chunk = r.u32(), let ext = r.u32(), let alSlots = r.u32(),
              let dc = r.u8(), let disk = disk(dc), r.bytes(3) != nil, let flags = r.u32(), let epoch = r.u64(),
              let cur = r.u64(), let bm = r.u64(), let hc = r.u32(), hc <= UInt32(DataGenerations.historyLimit)
        else { return nil }
        var hist: [GenerationID] = []
        for i in 0..<DataGenerations.historyLimit {
            guard let g = r.u64() else { return nil }
            if i < Int(hc) { hist.append(GenerationID(g)) }
        }
        var diskID: UInt64 = 0
        if v >= 2 { guard let d = r.u64() else { return nil }; diskID = d }
        var primaryEpoch: UInt64 = 0
        if v >= 3 { guard let p = r.u64() else { return nil }; primaryEpoch = p }
        guard chunk > 0, ext > 0 else { return nil }
        return MetadataHeader(sequence: seq, sizeBytes: size, chunkBytes: chunk, alExtentBytes: ext, alSlots: alSlots,
                              diskState: disk, flags: MetadataFlags(rawValue: flags), epoch: Epoch(epoch),
                              generations: DataGenerations(current: GenerationID(cur), bitmap: GenerationID(bm), history: hist),
                              diskID: diskID, primaryEpoch: Epoch(primaryEpoch))
    }

    /// The newer of two slots that verify; nil if neither does.
    public static func newestHeader(_ a: [UInt8], _ b: [UInt8]) -> (slot: Int, header: MetadataHeader)? {
        let ha = decodeHeader(a), hb = decodeHeader(b)
        switch (ha, hb) {
        case let (x?, y?): return x.sequence >= y.sequence ? (0, x) : (1, y)
        case let (x?, nil): return (0, x)
        case let (nil, y?): return (1, y)
        default: return nil
        }
    }

    // MARK: activity log

    public struct ALRecord: Hashable, Sendable {
        public var sequence: UInt64
        public var extents: [UInt32]
        public init(sequence: UInt64, extents: [UInt32]) { self.sequence = sequence; self.extents = extents }
    }

    public static func encode(_ al: ALRecord) -> [UInt8] {
        precondition(al.extents.count <= maxALSlots, "AL record of \(al.extents.count) extents exceeds \(maxALSlots)")
        var w = ByteWriter(capacity: slotBytes)
        w.bytes(alMagic)
        w.u64(al.sequence)
        w.u32(UInt32(al.extents.count))
        for e in al.extents { w.u32(e) }
        return seal(w.out)
    }

    public static func decodeAL(_ slot: [UInt8]) -> ALRecord? {
        guard isSealed(slot) else { return nil }
        var r = ByteReader(slot)
        guard r.bytes(8) == alMagic, let seq = r.u64(), let n = r.u32(), Int(n) <= maxALSlots else { return nil }
        var ext: [UInt32] = []
        ext.reserveCapacity(Int(n))
        for _ in 0..<n { guard let e = r.u32() else { return nil }; ext.append(e) }
        return ALRecord(sequence: seq, extents: ext)
    }

    public static func newestAL(_ a: [UInt8], _ b: [UInt8]) -> (slot: Int, record: ALRecord)? {
        let ra = decodeAL(a), rb = decodeAL(b)
        switch (ra, rb) {
        case let (x?, y?): return x.sequence >= y.sequence ? (0, x) : (1, y)
        case let (x?, nil): return (0, x)
        case let (nil, y?): return (1, y)
        default: return nil
        }
    }

    // MARK: sealing

    static func seal(_ body: [UInt8]) -> [UInt8] {
        precondition(body.count <= checksumOffset, "metadata record of \(body.count) bytes overflows its slot")
        var slot = body + [UInt8](repeating: 0, count: checksumOffset - body.count)
        slot += Array(SHA256.hash(data: slot))
        return slot
    }

    static func isSealed(_ slot: [UInt8]) -> Bool {
        guard slot.count == slotBytes else { return false }
        let digest = Array(SHA256.hash(data: slot[0..<checksumOffset]))
        return digest == Array(slot[checksumOffset...])
    }
}

/// Big-endian writer for fixed records.
struct ByteWriter {
    var out: [UInt8]
    init(capacity: Int) { out = []; out.reserveCapacity(capacity) }
    mutating func u8(_ v: UInt8) { out.append(v) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) } }
    mutating func bytes(_ b: [UInt8]) { out.append(contentsOf: b) }
}

/// Bounds-checked big-endian reader: every accessor returns nil past the end.
struct ByteReader {
    let data: [UInt8]
    var index = 0
    init(_ data: [UInt8]) { self.data = data }
    mutating func bytes(_ n: Int) -> [UInt8]? {
        guard n >= 0, index + n <= data.count else { return nil }
        defer { index += n }
        return Array(data[index..<index + n])
    }
    mutating func u8() -> UInt8? { bytes(1).map { $0[0] } }
    mutating func u32() -> UInt32? { bytes(4).map { $0.reduce(0) { $0 << 8 | UInt32($1) } } }
    mutating func u64() -> UInt64? { bytes(8).map { $0.reduce(0) { $0 << 8 | UInt64($1) } } }
}
