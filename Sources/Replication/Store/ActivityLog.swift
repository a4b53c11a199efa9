/// The primary's set of "hot" extents: regions with in-flight or recent writes
/// (design.md §3 "Activity log"). Before a write touches a cold extent the new hot set is
/// persisted, so after a primary crash every region that may differ from the peer is known.
/// Pure; the shell persists what `begin` returns before it issues the write.
public struct ActivityLog: Hashable, Sendable {
    public let capacity: Int
    /// extent → writes in flight in it.
    public private(set) var inFlight: [Int: Int] = [:]
    /// Least recently used first.
    private var order: [Int] = []

    public enum Admission: Hashable, Sendable {
        /// Every extent was already hot: no metadata write needed.
        case hot
        /// New extents became hot: persist this hot set (sorted) before writing.
        case persist([Int])
        /// Not enough extents can be evicted (all busy): retry when writes complete.
        case full
    }

    public init(capacity: Int, hot: [Int] = []) {
        precondition(capacity > 0 && capacity <= MetadataLayout.maxALSlots, "AL capacity \(capacity) outside 1…\(MetadataLayout.maxALSlots)")
        self.capacity = capacity
        for e in hot.prefix(capacity) where inFlight[e] == nil { inFlight[e] = 0; order.append(e) }
    }

    public var hotExtents: [Int] { order.sorted() }

    /// Admits a write touching `extents`, counting it in flight in each.
    public mutating func begin(_ extents: [Int]) -> Admission {
        let wanted = Array(Set(extents))
        let cold = wanted.filter { inFlight[$0] == nil }
        if wanted.count > capacity { return .full }
        let free = capacity - order.count
        if cold.count > free {
            let evictable = order.filter { inFlight[$0] == 0 && !wanted.contains($0) }
            guard evictable.count >= cold.count - free else { return .full }
            for e in evictable.prefix(cold.count - free) {
                inFlight[e] = nil
                order.removeAll { $0 == e }
            }
        }
        for e in wanted {
            inFlight[e, default: 0] += 1
            order.removeAll { $0 == e }
            order.append(e)
        }
        return cold.isEmpty ? .hot : .persist(hotExtents)
    }

    /// The write that `begin` admitted has completed locally and on the peer (or the peer
    /// was marked out of sync for it), so its extents may be evicted later.
    public mutating func end(_ extents: [Int]) {
        for e in Set(extents) {
            guard let n = inFlight[e] else { continue }
            precondition(n > 0, "AL end for extent \(e) with nothing in flight")
            inFlight[e] = n - 1
        }
    }

    public var busyWrites: Int { inFlight.values.reduce(0, +) }
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
