import Foundation
import HAShell
import Replication

/// The metadata file: header slots, activity-log slots and the bitmap (layout in
/// `MetadataLayout`). Every write here is followed by fdatasync before it is relied on.
/// Not thread-safe: the volume calls it from its serial I/O queue only.
public final class MetadataStore: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    public private(set) var header: MetadataHeader
    private var headerSlot: Int
    private var alSequence: UInt64
    private var alSlot: Int
    /// The AL record found on open (the hot extents at the last persist).
    public let openedAL: [Int]
    /// The bitmap as found on open.
    public let openedBitmap: DirtyBitmap
    public let created: Bool

    /// Opens `path`, or creates and initialises it from `initial` when it does not exist.
    public init(path: String, initial: MetadataHeader) throws {
        self.path = path
        let exists = FileManager.default.fileExists(atPath: path)
        let fd = open(path, O_RDWR | O_CLOEXEC | (exists ? 0 : O_CREAT), 0o600)
        guard fd >= 0 else { throw StoreError(op: "open", path: path, errno: errno) }
        self.fd = fd
        let chunks = MetadataLayout.chunkCount(sizeBytes: initial.sizeBytes, chunkBytes: Int(initial.chunkBytes))
        if !exists {
            created = true
            guard ftruncate(fd, off_t(MetadataLayout.fileBytes(chunkCount: chunks))) == 0 else {
                let e = errno; close(fd); throw StoreError(op: "ftruncate", path: path, errno: e)
            }
            header = initial
            header.sequence = 1
            headerSlot = 0
            alSequence = 0
            alSlot = 0
            openedAL = []
            openedBitmap = DirtyBitmap(chunkCount: chunks)
            try Self.pwriteAll(fd, MetadataLayout.encode(header), at: MetadataLayout.headerSlotOffsets[0], path: path)
            try Self.pwriteAll(fd, MetadataLayout.encode(.init(sequence: 0, extents: [])), at: MetadataLayout.alSlotOffsets[0], path: path)
            try Self.syncFD(fd, path: path)
            // A new file's directory entry must survive a crash too.
            let dir = (path as NSString).deletingLastPathComponent
            let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if dfd >= 0 { _ = fsync(dfd); close(dfd) }
            return
        }
        created = false
        do {
            let s0 = try Self.preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.headerSlotOffsets[0], path: path)
            let s1 = try Self.preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.headerSlotOffsets[1], path: path)
            guard let (slot, h) = MetadataLayout.newestHeader(s0, s1) else {
                throw MetadataError.unreadable(path: path, why: "neither header slot verifies (not a hamgr metadata file, or both slots damaged)")
            }
            guard h.sizeBytes == initial.sizeBytes, h.chunkBytes == initial.chunkBytes else {
                throw MetadataError.unreadable(path: path, why: "metadata describes \(h.sizeBytes) bytes in \(h.chunkBytes)-byte chunks, config says \(initial.sizeBytes) in \(initial.chunkBytes)")
            }
            header = h
            headerSlot = slot
            let a0 = try Self.preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.alSlotOffsets[0], path: path)
            let a1 = try Self.preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.alSlotOffsets[1], path: path)
            if let (aslot, rec) = MetadataLayout.newestAL(a0, a1) {
                alSequence = rec.sequence; alSlot = aslot; openedAL = rec.extents.map(Int.init)
            } else {
                alSequence = 0; alSlot = 1; openedAL = []
            }
            let bm = try Self.preadAll(fd, MetadataLayout.bitmapBytes(chunkCount: chunks), at: MetadataLayout.bitmapOffset, path: path)
            openedBitmap = DirtyBitmap(chunkCount: chunks, bytes: bm)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// The newest valid header of an existing metadata file, without opening it for writing.
    public static func peekHeader(path: String) throws -> MetadataHeader {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError(op: "open", path: path, errno: errno) }
        defer { close(fd) }
        let s0 = try preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.headerSlotOffsets[0], path: path)
        let s1 = try preadAll(fd, MetadataLayout.slotBytes, at: MetadataLayout.headerSlotOffsets[1], path: path)
        guard let (_, h) = MetadataLayout.newestHeader(s0, s1) else {
            throw MetadataError.unreadable(path: path, why: "neither header slot verifies (not a hamgr metadata file, or both slots damaged)")
        }
        return h
    }

    /// Writes the header into the other slot and syncs; the previous slot stays valid until then.
    public func writeHeader(_ h: MetadataHeader) throws {
        var next = h
        next.sequence = header.sequence + 1
        let slot = 1 - headerSlot
        try Self.pwriteAll(fd, MetadataLayout.encode(next), at: MetadataLayout.headerSlotOffsets[slot], path: path)
        try Self.syncFD(fd, path: path)
        header = next
        headerSlot = slot
    }

    public func writeAL(_ hot: [Int]) throws {
        alSequence += 1
        let slot = 1 - alSlot
        let rec = MetadataLayout.ALRecord(sequence: alSequence, extents: hot.map { UInt32($0) })
        try Self.pwriteAll(fd, MetadataLayout.encode(rec), at: MetadataLayout.alSlotOffsets[slot], path: path)
        try Self.syncFD(fd, path: path)
        alSlot = slot
    }

    /// Writes bitmap pages (page index, page bytes); syncs if asked.
    public func writeBitmapPages(_ pages: [(Int, [UInt8])], sync: Bool = true) throws {
        for (p, bytes) in pages {
            try Self.pwriteAll(fd, bytes, at: MetadataLayout.bitmapOffset + UInt64(p * MetadataLayout.bitmapPageBytes), path: path)
        }
        if sync && !pages.isEmpty { try Self.syncFD(fd, path: path) }
    }

    public func writeBitmap(_ bitmap: DirtyBitmap) throws {
        try writeBitmapPages((0..<bitmap.pageCount).map { ($0, bitmap.pageBytes($0)) })
    }

    static func pwriteAll(_ fd: Int32, _ bytes: [UInt8], at offset: UInt64, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done)) }
            if n < 0 { if errno == EINTR { continue }; throw StoreError(op: "pwrite", path: path, errno: errno) }
            done += n
        }
    }

    static func preadAll(_ fd: Int32, _ count: Int, at offset: UInt64, path: String) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            if n < 0 { if errno == EINTR { continue }; throw StoreError(op: "pread", path: path, errno: errno) }
            if n == 0 { break }  // short file: the rest reads as zero
            done += n
        }
        return out
    }

    static func syncFD(_ fd: Int32, path: String) throws {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw StoreError(op: "fdatasync", path: path, errno: errno)
        }
    }
}

public enum MetadataError: Error, CustomStringConvertible {
    case unreadable(path: String, why: String)
    public var description: String {
        switch self { case let .unreadable(p, why): return "metadata \(p): \(why)" }
    }
}
