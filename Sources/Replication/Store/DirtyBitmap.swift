/// One bit per chunk: set while the peer does not have the chunk's current contents
/// (design.md §3 "Bitmap"). Pure; `MetadataStore` persists the pages it reports.
public struct DirtyBitmap: Hashable, Sendable {
    public let chunkCount: Int
    private var words: [UInt64]
    public private(set) var setCount: Int = 0
    /// Chunks covered by one 4 KiB page of the on-disk bitmap.
    public static let chunksPerPage = MetadataLayout.bitmapPageBytes * 8
    static let wordsPerPage = MetadataLayout.bitmapPageBytes / 8

    public init(chunkCount: Int) {
        precondition(chunkCount >= 0, "negative chunk count \(chunkCount)")
        self.chunkCount = chunkCount
        words = [UInt64](repeating: 0, count: (chunkCount + 63) / 64)
    }

    public var isEmpty: Bool { setCount == 0 }
    public var pageCount: Int { (words.count + Self.wordsPerPage - 1) / Self.wordsPerPage }

    public func isSet(_ chunk: Int) -> Bool {
        guard chunk >= 0, chunk < chunkCount else { return false }
        return words[chunk >> 6] & (1 << UInt64(chunk & 63)) != 0
    }

    /// Sets the chunks; returns the pages whose contents changed (to persist before the ack).
    @discardableResult
    public mutating func mark<S: Sequence>(_ chunks: S) -> [Int] where S.Element == Int {
        var pages: [Int] = []
        for c in chunks where c >= 0 && c < chunkCount {
            let bit: UInt64 = 1 << UInt64(c & 63)
            if words[c >> 6] & bit == 0 {
                words[c >> 6] |= bit
                setCount += 1
                let p = c / Self.chunksPerPage
                if pages.last != p { pages.append(p) }
            }
        }
        return Array(Set(pages)).sorted()
    }

    /// Clears one chunk; true if it was set.
    @discardableResult
    public mutating func clear(_ chunk: Int) -> Bool {
        guard isSet(chunk) else { return false }
        words[chunk >> 6] &= ~(1 << UInt64(chunk & 63))
        setCount -= 1
        return true
    }

    public mutating func clearAll() {
        for i in words.indices { words[i] = 0 }
        setCount = 0
    }

    public mutating func markAll() { mark(0..<chunkCount) }

    /// The first set chunk at or after `chunk`.
    public func nextSet(from chunk: Int) -> Int? {
        var c = max(0, chunk)
        while c < chunkCount {
            let w = words[c >> 6] >> UInt64(c & 63)
            if w != 0 {
                let found = c + w.trailingZeroBitCount
                return found < chunkCount ? found : nil
            }
            c = (c | 63) + 1
        }
        return nil
    }

    public var setChunks: [Int] {
        var out: [Int] = []
        out.reserveCapacity(setCount)
        var c = nextSet(from: 0)
        while let x = c { out.append(x); c = nextSet(from: x + 1) }
        return out
    }

    /// Set chunks as (start, count) runs.
    public var runs: [ChunkRun] { ChunkRun.runs(of: setChunks) }

    /// The pages holding at least one set bit, in order (what the link sends of a bitmap).
    public var nonEmptyPages: [Int] {
        var out: [Int] = []
        var p = 0
        while p < pageCount {
            let first = p * Self.wordsPerPage
            let last = min(first + Self.wordsPerPage, words.count)
            if words[first..<last].contains(where: { $0 != 0 }) { out.append(p) }
            p += 1
        }
        return out
    }

    /// Sets every bit set in `bytes`, a page in the on-disk form (`pageBytes`); bits past
    /// `chunkCount` are refused. Returns false, changing nothing, for a page outside the map
    /// or bits past its end.
    public mutating func merge(page: Int, bytes: some Collection<UInt8>) -> Bool {
        guard page >= 0, page < pageCount, bytes.count == MetadataLayout.bitmapPageBytes else { return false }
        let first = page * Self.wordsPerPage
        var incoming = [UInt64](repeating: 0, count: Self.wordsPerPage)
        var i = 0, j = 0
        for byte in bytes {
            incoming[i] |= UInt64(byte) << UInt64(8 * j)
            j += 1
            if j == 8 { j = 0; i += 1 }
        }
        for k in 0..<Self.wordsPerPage where incoming[k] != 0 {
            let w = first + k
            guard w < words.count else { return false }
            if w == words.count - 1, chunkCount & 63 != 0, incoming[k] & ~((1 << UInt64(chunkCount & 63)) - 1) != 0 { return false }
        }
        for k in 0..<Self.wordsPerPage where incoming[k] != 0 {
            let w = first + k
            setCount += (incoming[k] & ~words[w]).nonzeroBitCount
            words[w] |= incoming[k]
        }
        return true
    }

    /// Sets every bit set in `other` (same chunk count); returns the pages that changed.
    @discardableResult
    public mutating func merge(_ other: DirtyBitmap) -> [Int] {
        precondition(other.chunkCount == chunkCount, "bitmaps of \(other.chunkCount) and \(chunkCount) chunks")
        var pages: [Int] = []
        for w in words.indices where other.words[w] & ~words[w] != 0 {
            setCount += (other.words[w] & ~words[w]).nonzeroBitCount
            words[w] |= other.words[w]
            let p = w / Self.wordsPerPage
            if pages.last != p { pages.append(p) }
        }
        return pages
    }

    /// The page's on-disk bytes (little-endian words, zero-padded to a full page).
    public func pageBytes(_ page: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: MetadataLayout.bitmapPageBytes)
        let first = page * Self.wordsPerPage
        let n = max(0, min(Self.wordsPerPage, words.count - first))
        guard n > 0 else { return out }
        out.withUnsafeMutableBytes { raw in
            for i in 0..<n { raw.storeBytes(of: words[first + i].littleEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
        return out
    }

    /// Rebuilds from the on-disk bitmap area; bits past `chunkCount` are ignored.
    public init(chunkCount: Int, bytes: [UInt8]) {
        self.init(chunkCount: chunkCount)
        let whole = min(words.count, bytes.count / 8)
        bytes.withUnsafeBytes { raw in
            for i in 0..<whole { words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        }
        if whole < words.count {
            for i in whole..<words.count {
                var w: UInt64 = 0
                for j in 0..<8 where i * 8 + j < bytes.count { w |= UInt64(bytes[i * 8 + j]) << UInt64(8 * j) }
                words[i] = w
            }
        }
        if chunkCount & 63 != 0, let last = words.indices.last { words[last] &= (1 << UInt64(chunkCount & 63)) - 1 }
        setCount = words.reduce(0) { $0 + $1.nonzeroBitCount }
    }
}

/// A run of consecutive chunks.
public struct ChunkRun: Hashable, Sendable {
    public var start: Int
    public var count: Int
    public init(start: Int, count: Int) { self.start = start; self.count = count }
    public var chunks: Range<Int> { start..<start + count }

    public static func runs(of sortedChunks: [Int]) -> [ChunkRun] {
        var out: [ChunkRun] = []
        for c in sortedChunks {
            if let last = out.last, last.start + last.count == c { out[out.count - 1].count += 1 } else { out.append(ChunkRun(start: c, count: 1)) }
        }
        return out
    }
}
