/// The primary's set of "hot" extents: regions with in-flight or recent writes
/// (design.md §3 "Activity log"). Before a write touches a cold extent the new hot set is
/// persisted, so after a primary crash every region that may differ from the peer is known.
/// Pure; the shell persists what `begin` returns before it issues the write.
///
/// An extent leaves the log only once its writes are on stable storage (DRBD's rule) — on
/// this node *and* on the peer: the peer having written a write is not enough, since a power
/// loss of this node may drop its own unsynced copy while the peer keeps the newer one, and
/// a power loss of the peer drops the peer's, while crash recovery resyncs only the extents
/// the persisted log names. Writes carry the barrier tag the core gives them (barriers — a
/// flush or FUA write — issued before them); a barrier that completed here and at the peer
/// makes every write tagged ≤ its number durable on both (`durable(below:)`). Eviction takes
/// idle durable extents only (least recently used first); when an idle extent exists but
/// none is durable, `begin` answers `.needsBarrier`: the caller queues the write and, unless
/// a barrier after that tag is already on its way, issues one. So a full log costs one
/// flush round per log's worth of cold extents, never a sync per write.
public struct ActivityLog: Hashable, Sendable {
    public let capacity: Int
    /// extent → writes in flight in it.
    public private(set) var inFlight: [Int: Int] = [:]
    /// Least recently used first.
    private var order: [Int] = []
    /// Hot extent → barrier tag of its newest admitted write.
    private var newestTag: [Int: UInt64] = [:]
    /// Writes tagged below this are durable here and at the peer.
    public private(set) var durableBelow: UInt64 = 0

    public enum Admission: Hashable, Sendable {
        /// Every extent was already hot: no metadata write needed.
        case hot
        /// New extents became hot: persist this hot set (sorted) before writing.
        case persist([Int])
        /// Not enough extents can be evicted (all busy): retry when writes complete.
        case full
        /// Idle extents could be evicted but their writes are not yet durable on both nodes:
        /// retry once a barrier issued after writes tagged `tag` completed (the caller issues
        /// one if none is on its way).
        case needsBarrier(tag: UInt64)
    }

    public init(capacity: Int, hot: [Int] = []) {
        precondition(capacity > 0 && capacity <= MetadataLayout.maxALSlots, "AL capacity \(capacity) outside 1…\(MetadataLayout.maxALSlots)")
        self.capacity = capacity
        for e in hot.prefix(capacity) where inFlight[e] == nil { inFlight[e] = 0; order.append(e); newestTag[e] = 0 }
    }

    public var hotExtents: [Int] { order.sorted() }

    /// Admits a write touching `extents`, counting it in flight in each.
    /// `tag`: the write's barrier tag (see the type's comment).
    public mutating func begin(_ extents: [Int], tag: UInt64) -> Admission {
        let wanted = Array(Set(extents))
        let cold = wanted.filter { inFlight[$0] == nil }
        if wanted.count > capacity { return .full }
        let free = capacity - order.count
        if cold.count > free {
            let need = cold.count - free
            let idle = order.filter { inFlight[$0] == 0 && !wanted.contains($0) }
            guard idle.count >= need else { return .full }
            let durable = idle.filter { newestTag[$0, default: 0] < durableBelow }
            guard durable.count >= need else {
                return .needsBarrier(tag: idle.prefix(need).map { newestTag[$0, default: 0] }.max() ?? 0)
            }
            for e in durable.prefix(need) {
                inFlight[e] = nil
                newestTag[e] = nil
                order.removeAll { $0 == e }
            }
        }
        for e in wanted {
            inFlight[e, default: 0] += 1
            newestTag[e] = max(newestTag[e] ?? 0, tag)
            order.removeAll { $0 == e }
            order.append(e)
        }
        return cold.isEmpty ? .hot : .persist(hotExtents)
    }

    /// The write that `begin` admitted has completed locally and on the peer (or the peer
    /// was marked out of sync for it), so its extents may be evicted later (once durable).
    public mutating func end(_ extents: [Int]) {
        for e in Set(extents) {
            guard let n = inFlight[e] else { continue }
            precondition(n > 0, "AL end for extent \(e) with nothing in flight")
            inFlight[e] = n - 1
        }
    }

    public var busyWrites: Int { inFlight.values.reduce(0, +) }

    /// A barrier numbered `n` completed here and at the peer (or the peer's lack of its
    /// writes is durably in the bitmap): writes tagged ≤ n are durable.
    public mutating func durable(throughBarrier n: UInt64) { durableBelow = max(durableBelow, n + 1) }
}

extension ActivityLog {
    /// The chunks an AL extent covers.
    public static func chunks(ofExtent extent: Int, extentBytes: Int, chunkBytes: Int, chunkCount: Int) -> Range<Int> {
        let perExtent = max(1, extentBytes / chunkBytes)
        let lo = min(chunkCount, extent * perExtent)
        return lo..<min(chunkCount, lo + perExtent)
    }

    /// The extents a byte range touches.
    public static func extents(offset: UInt64, length: Int, extentBytes: Int) -> [Int] {
        guard length > 0 else { return [] }
        let first = Int(offset / UInt64(extentBytes)), last = Int((offset + UInt64(length) - 1) / UInt64(extentBytes))
        return Array(first...last)
    }
}

/// What opening the metadata implies after a crash (design.md §3 "Activity log"): a node
/// that was primary and did not shut down cleanly treats its AL extents as out of sync.
public enum CrashRecovery {
    public struct Outcome: Hashable, Sendable {
        public var header: MetadataHeader
        public var bitmap: DirtyBitmap
        /// Chunks newly marked from the AL.
        public var recoveredChunks: Int
        /// Bitmap pages to persist (with the header) before the volume is used.
        public var dirtyPages: [Int]
    }

    public static func open(header: MetadataHeader, activityLog: [Int], bitmap: DirtyBitmap) -> Outcome {
        var h = header
        var bm = bitmap
        var pages: [Int] = []
        var recovered = 0
        let crashed = h.flags.contains(.wasPrimary) && !h.flags.contains(.cleanShutdown)
        if crashed {
            for e in activityLog {
                let cs = ActivityLog.chunks(ofExtent: e, extentBytes: Int(h.alExtentBytes), chunkBytes: Int(h.chunkBytes), chunkCount: bm.chunkCount)
                let before = bm.setCount
                pages += bm.mark(cs)
                recovered += bm.setCount - before
            }
            h.flags.insert(.crashRecoveryPending)
        }
        // From here on the node runs; only stop() marks a clean shutdown again.
        h.flags.remove(.cleanShutdown)
        h.flags.remove(.wasPrimary)
        return Outcome(header: h, bitmap: bm, recoveredChunks: recovered, dirtyPages: Array(Set(pages)).sorted())
    }
}
