import HACore
import Replication

/// A simulated store with real bytes and a volatile write cache, plus the metadata area
/// (header slots, activity-log slots, bitmap) kept the way `MetadataStore` keeps it.
///
/// Data: `current` is what reads see (page cache over the device), `durable` what survives a
/// power loss. Every write goes to `current` and is remembered as pending until a sync; at a
/// power loss each pending write is independently kept or lost (in order), as a real disk
/// with a volatile cache may do; at a process crash the page cache survives (all kept).
/// Metadata: `MetadataStore` writes each record with pwrite + fdatasync, so a record is
/// durable once its step completed; the slot alternation and the sealed encodings are the
/// real ones (`MetadataLayout`), decoded again at every start.
final class SimDisk {
    let sizeBytes: Int
    let chunkBytes: Int
    private(set) var current: [UInt8]
    private var durable: [UInt8]
    private var pending: [(offset: Int, bytes: [UInt8])] = []
    /// Anything was ever written: a regular file with no allocated data is "provably zero".
    private(set) var everWritten = false
    /// Armed fault: the next `failCount` operations fail with `failErrno`.
    var failCount = 0
    var failErrno: Int32 = 5
    /// Counts data changes (cheap change detection for the sync-point comparison).
    private(set) var version: UInt64 = 0

    var headerSlots: [[UInt8]] = [[], []]
    var alSlots: [[UInt8]] = [[], []]
    var bitmapArea: [UInt8] = []
    private var headerSlot = 0
    private var headerSequence: UInt64 = 0
    private var alSlot = 0
    private var alSequence: UInt64 = 0

    struct IOError: Error, CustomStringConvertible {
        var op: String
        var errno: Int32
        var description: String { "simulated \(op) failed: errno \(errno)" }
    }

    init(sizeBytes: Int, chunkBytes: Int) {
        self.sizeBytes = sizeBytes
        self.chunkBytes = chunkBytes
        current = [UInt8](repeating: 0, count: sizeBytes)
        durable = current
    }

    private func fault(_ op: String) throws {
        guard failCount > 0 else { return }
        failCount -= 1
        throw IOError(op: op, errno: failErrno)
    }

    // MARK: data

    func write(offset: Int, bytes: [UInt8]) throws {
        try fault("pwrite")
        precondition(offset >= 0 && offset + bytes.count <= sizeBytes, "write \(offset)+\(bytes.count) outside \(sizeBytes)")
        current.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        pending.append((offset, bytes))
        everWritten = true
        version &+= 1
    }

    func sync() throws {
        try fault("fdatasync")
        for p in pending { durable.replaceSubrange(p.offset..<p.offset + p.bytes.count, with: p.bytes) }
        pending.removeAll(keepingCapacity: true)
    }

    func read(offset: Int, length: Int) -> [UInt8] { Array(current[offset..<offset + length]) }

    /// The process died. `powerLoss`: the host lost power too, and each unsynced write is kept
    /// or lost at random (in order); otherwise the page cache survives.
    func crash(powerLoss: Bool, rng: inout SplitMix64) -> (kept: Int, lost: Int) {
        var kept = 0, lost = 0
        for p in pending {
            if !powerLoss || rng.next() & 1 == 0 {
                durable.replaceSubrange(p.offset..<p.offset + p.bytes.count, with: p.bytes)
                kept += 1
            } else {
                lost += 1
            }
        }
        pending.removeAll()
        current = durable
        failCount = 0
        version &+= 1
        return (kept, lost)
    }

    var unsyncedWrites: Int { pending.count }

    // MARK: metadata (MetadataStore's rules)

    var hasMetadata: Bool { !headerSlots[0].isEmpty || !headerSlots[1].isEmpty }

    /// A new metadata area holding `initial` (sequence 1 in slot 0) and an empty AL.
    func createMetadata(_ initial: MetadataHeader, chunkCount: Int) {
        var h = initial
        h.sequence = 1
        headerSlots = [MetadataLayout.encode(h), []]
        headerSlot = 0
        headerSequence = 1
        alSlots = [MetadataLayout.encode(MetadataLayout.ALRecord(sequence: 0, extents: [])), []]
        alSlot = 0
        alSequence = 0
        bitmapArea = [UInt8](repeating: 0, count: MetadataLayout.bitmapBytes(chunkCount: chunkCount))
    }

    /// What `MetadataStore.init` reads back: newest valid header, newest AL, the bitmap.
    func openMetadata(chunkCount: Int) -> (header: MetadataHeader, al: [Int], bitmap: DirtyBitmap)? {
        let s0 = headerSlots[0].isEmpty ? [UInt8](repeating: 0, count: MetadataLayout.slotBytes) : headerSlots[0]
        let s1 = headerSlots[1].isEmpty ? [UInt8](repeating: 0, count: MetadataLayout.slotBytes) : headerSlots[1]
        guard let (slot, h) = MetadataLayout.newestHeader(s0, s1) else { return nil }
        headerSlot = slot
        headerSequence = h.sequence
        let a0 = alSlots[0].isEmpty ? [UInt8](repeating: 0, count: MetadataLayout.slotBytes) : alSlots[0]
        let a1 = alSlots[1].isEmpty ? [UInt8](repeating: 0, count: MetadataLayout.slotBytes) : alSlots[1]
        var al: [Int] = []
        if let (aslot, rec) = MetadataLayout.newestAL(a0, a1) {
            alSequence = rec.sequence; alSlot = aslot; al = rec.extents.map(Int.init)
        } else {
            alSequence = 0; alSlot = 1
        }
        return (h, al, DirtyBitmap(chunkCount: chunkCount, bytes: bitmapArea))
    }

    func writeHeader(_ h: MetadataHeader) throws {
        try fault("header write")
        var next = h
        next.sequence = headerSequence + 1
        let slot = 1 - headerSlot
        headerSlots[slot] = MetadataLayout.encode(next)
        headerSequence = next.sequence
        headerSlot = slot
    }

    func writeAL(_ hot: [Int]) throws {
        try fault("AL write")
        alSequence += 1
        let slot = 1 - alSlot
        alSlots[slot] = MetadataLayout.encode(MetadataLayout.ALRecord(sequence: alSequence, extents: hot.map { UInt32($0) }))
        alSlot = slot
    }

    func writeBitmapPages(_ pages: [(Int, [UInt8])]) throws {
        guard !pages.isEmpty else { return }
        try fault("bitmap write")
        for (p, bytes) in pages {
            let at = p * MetadataLayout.bitmapPageBytes
            guard at + bytes.count <= bitmapArea.count else { continue }
            bitmapArea.replaceSubrange(at..<at + bytes.count, with: bytes)
        }
    }
}

/// A 32-byte content digest for verify (the simulator's stand-in for SHA-256: both sides use
/// the same function, and the core only compares digests).
enum SimDigest {
    static func of(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        var h: (UInt64, UInt64, UInt64, UInt64) = (0xcbf2_9ce4_8422_2325, 0x9E37_79B9_7F4A_7C15, 0x1234_5678_9abc_def1, 0x0fed_cba9_8765_4321)
        for b in bytes {
            h.0 = (h.0 ^ UInt64(b)) &* 0x100_0000_01b3
            h.1 = (h.1 ^ UInt64(b)) &* 0xff51_afd7_ed55_8ccd
        }
        h.2 ^= h.0 &* 31; h.3 ^= h.1 &* 131
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for v in [h.0, h.1, h.2, h.3] { for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
        return out
    }
}
