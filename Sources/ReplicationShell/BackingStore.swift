import Foundation
import HAShell
import NIOCore
import Replication

/// A failed operation on the backing store or metadata, with the errno it got.
public struct StoreError: Error, CustomStringConvertible {
    public var op: String
    public var path: String
    public var errno: Int32
    public init(op: String, path: String, errno: Int32) { self.op = op; self.path = path; self.errno = errno }
    public var description: String { "\(op) \(path): \(String(cString: strerror(errno)))" }
}

/// The node's local disk for the volume: a regular file or a block device (design.md §3).
/// Thread-safe: positioned I/O only, no shared file offset.
public final class BackingStore: @unchecked Sendable {
    public let path: String
    public let sizeBytes: UInt64
    public let isBlockDevice: Bool
    /// Buffered writes land in the page cache and take microseconds: they may run on the
    /// caller's thread (an event loop) instead of costing two thread hand-offs. Not with
    /// O_DIRECT, where every write waits for the device.
    public let writesInline: Bool
    private let inlineReads: InlineReads
    private let fd: Int32
    /// Test mode: writes not yet synced live only in this process (see `VolatileCache`).
    private let cache: VolatileCache?

    /// How a read may run on the caller's thread: `preadv2(RWF_NOWAIT)`, which fails with
    /// EAGAIN instead of waiting for the device; plainly, on a memory file system (tmpfs
    /// refuses RWF_NOWAIT, and its reads never wait for a device); or not at all.
    private enum InlineReads { case noWait, memory, never }

    /// Opens `path`. With `createSize`, a missing regular file is created sparse with that many
    /// bytes and a smaller existing one is extended; without it a missing path is an error.
    /// Nothing is ever created under /dev: a device that is not there is the operator's to
    /// attach. Block devices report their size.
    ///
    /// `volatileCache` (tests only): every write stays in this process's memory until the
    /// next `sync`, so killing the process, or `powerCut()`, loses exactly the writes a
    /// power cut loses on a disk with a volatile cache — all of them since the last sync.
    public init(path: String, createSize: UInt64? = nil, directIO: Bool = false, volatileCache: Bool = false) throws {
        self.path = path
        self.cache = volatileCache ? VolatileCache() : nil
        var flags = O_RDWR | O_CLOEXEC
        if createSize != nil && !Self.isDevicePath(path) { flags |= O_CREAT }
        if directIO { flags |= 0o40000 /* O_DIRECT, hidden behind _GNU_SOURCE in Glibc */ }
        let fd = open(path, flags, 0o600)
        guard fd >= 0 else { throw StoreError(op: "open", path: path, errno: errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { let e = errno; close(fd); throw StoreError(op: "fstat", path: path, errno: e) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var bytes: UInt64 = 0
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            guard ioctl(fd, 0x8008_1272, &bytes) == 0 else { let e = errno; close(fd); throw StoreError(op: "BLKGETSIZE64", path: path, errno: e) }
            self.sizeBytes = bytes
            self.isBlockDevice = true
        } else {
            var size = UInt64(st.st_size)
            if let want = createSize, size < want {
                guard ftruncate(fd, off_t(want)) == 0 else { let e = errno; close(fd); throw StoreError(op: "ftruncate", path: path, errno: e) }
                size = want
            }
            self.sizeBytes = size
            self.isBlockDevice = false
        }
        self.fd = fd
        self.writesInline = !directIO
        var probe: UInt8 = 0
        var iov = iovec(iov_base: &probe, iov_len: 1)
        if directIO {
            self.inlineReads = .never
        } else if linuxPreadv2(fd, &iov, 1, 0, Self.RWF_NOWAIT) >= 0 || errno == EAGAIN {
            self.inlineReads = .noWait
        } else {
            self.inlineReads = [0x0102_1994 /* TMPFS_MAGIC */, 0x8584_58f6 /* RAMFS_MAGIC */].contains(fileSystemType(fd)) ? .memory : .never
        }
    }

    static let RWF_NOWAIT: Int32 = 0x08

    /// Reads `length` bytes now if that cannot wait for the device (the data is in the page
    /// cache, or the store is memory); nil if the read must go to an I/O thread.
    public func readIfCached(offset: UInt64, length: Int, allocator: ByteBufferAllocator) throws -> ByteBuffer? {
        if cache != nil { return try read(offset: offset, length: length, allocator: allocator) }
        switch inlineReads {
        case .never: return nil
        case .memory: return try read(offset: offset, length: length, allocator: allocator)
        case .noWait: break
        }
        var buf = allocator.buffer(capacity: length)
        var wouldBlock = false
        let done = try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr -> Int in
            var iov = iovec(iov_base: ptr.baseAddress, iov_len: length)
            while true {
                let n = linuxPreadv2(fd, &iov, 1, off_t(offset), Self.RWF_NOWAIT)
                if n >= 0 { return n }
                if errno == EINTR { continue }
                if errno == EAGAIN { wouldBlock = true; return 0 }
                throw StoreError(op: "preadv2", path: path, errno: errno)
            }
        }
        if wouldBlock { return nil }
        // A short read is EOF (zeroes) or a partly cached range: the I/O thread finishes it.
        return done == length ? buf : nil
    }

    /// True for paths a device node lives at, which hamgr never creates.
    public static func isDevicePath(_ path: String) -> Bool { HACore.isDevicePath(path) }

    /// True if `[0, length)` provably reads as zeroes without reading it: a regular file with
    /// no allocated data there (SEEK_DATA finds none). Block devices and file systems without
    /// SEEK_DATA are never provably zero.
    public func provablyZero(length: UInt64) -> Bool {
        guard !isBlockDevice, cache?.isEmpty ?? true else { return false }
        let SEEK_DATA: Int32 = 3
        errno = 0
        let at = lseek(fd, 0, SEEK_DATA)
        if at < 0 { return errno == ENXIO }  // no data at all past offset 0
        return UInt64(at) >= length
    }

    deinit { close(fd) }

    public func read(offset: UInt64, into pointer: UnsafeMutableRawBufferPointer) throws {
        try readFile(offset: offset, into: pointer)
        cache?.overlay(offset: offset, into: pointer)
    }

    private func readFile(offset: UInt64, into pointer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < pointer.count {
            let n = pread(fd, pointer.baseAddress! + done, pointer.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw StoreError(op: "pread", path: path, errno: errno) }
            if n == 0 {  // past EOF of a short file: reads as zeroes
                (pointer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: pointer.count - done)
                return
            }
            done += n
        }
    }

    /// Reads `length` bytes into a new buffer.
    public func read(offset: UInt64, length: Int, allocator: ByteBufferAllocator = ByteBufferAllocator()) throws -> ByteBuffer {
        var buf = allocator.buffer(capacity: length)
        try buf.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
            try read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: ptr[0..<length]))
            return length
        }
        return buf
    }

    public func write(offset: UInt64, bytes: UnsafeRawBufferPointer) throws {
        if let cache {
            return try cache.write(offset: offset, bytes: bytes) { page, into in try readFile(offset: page, into: into) }
        }
        try writeFile(offset: offset, bytes: bytes)
    }

    private func writeFile(offset: UInt64, bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw StoreError(op: "pwrite", path: path, errno: errno) }
            done += n
        }
    }

    /// Writes the buffers back to back from `offset`, with one pwritev per 64 buffers.
    public func write(offset: UInt64, buffers: [ByteBuffer]) throws {
        if buffers.count == 1 || cache != nil {
            var at = offset
            for b in buffers { try write(offset: at, buffer: b); at += UInt64(b.readableBytes) }
            return
        }
        var at = offset
        var i = 0
        while i < buffers.count {
            let group = buffers[i..<min(i + 64, buffers.count)]
            at += UInt64(try writev(offset: at, group))
            i += group.count
        }
    }

    /// One pwritev of `group` (finishing a short write piecewise); returns the bytes written.
    private func writev(offset: UInt64, _ group: ArraySlice<ByteBuffer>) throws -> Int {
        var vecs: [iovec] = []
        vecs.reserveCapacity(group.count)
        var total = 0
        var keep: [ByteBuffer] = []  // the pointers below stay valid while these are held
        keep.reserveCapacity(group.count)
        for b in group {
            keep.append(b)
            let n = b.readableBytes
            guard n > 0 else { continue }
            b.withUnsafeReadableBytes { vecs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: n)) }
            total += n
        }
        let n = withExtendedLifetime(keep) { pwritev(fd, vecs, Int32(vecs.count), off_t(offset)) }
        if n == total { return total }
        if n < 0 && errno != EINTR { throw StoreError(op: "pwritev", path: path, errno: errno) }
        // Interrupted or short: write the rest one buffer at a time.
        var done = max(n, 0), at = offset + UInt64(max(n, 0))
        for b in group {
            let len = b.readableBytes
            if done >= len { done -= len; continue }
            try write(offset: at, buffer: b.getSlice(at: b.readerIndex + done, length: len - done)!)
            at += UInt64(len - done)
            done = 0
        }
        return total
    }

    public func write(offset: UInt64, array: [UInt8]) throws {
        try array.withUnsafeBytes { try write(offset: offset, bytes: $0) }
    }

    public func write(offset: UInt64, buffer: ByteBuffer) throws {
        try buffer.withUnsafeReadableBytes { try write(offset: offset, bytes: $0) }
    }

    /// Makes every completed write durable (fdatasync).
    public func sync() throws {
        if let cache {
            // To the file first, out of the cache after: a concurrent read sees the page in
            // one or the other. (Writes and syncs never run concurrently: one I/O order.)
            let all = cache.all()
            for (page, bytes) in all { try bytes.withUnsafeBytes { try writeFile(offset: page, bytes: $0) } }
            cache.remove(all.map(\.0))
        }
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw StoreError(op: "fdatasync", path: path, errno: errno)
        }
    }

    /// Writes zeroes over the range, deallocating it where the store can (punch hole on files).
    public func writeZeroes(offset: UInt64, length: Int, mayDeallocate: Bool) throws {
        guard length > 0 else { return }
        if !isBlockDevice && cache == nil {
            // FALLOC_FL_PUNCH_HOLE|KEEP_SIZE = 0x03, FALLOC_FL_ZERO_RANGE = 0x10
            let mode: Int32 = mayDeallocate ? 0x03 : 0x10
            if linuxFallocate(fd, mode, Int64(offset), Int64(length)) == 0 { return }
        }
        var zero = [UInt8](repeating: 0, count: min(length, 1 << 20))
        var done = 0
        while done < length {
            let n = min(zero.count, length - done)
            try zero.withUnsafeMutableBytes { try write(offset: offset + UInt64(done), bytes: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            done += n
        }
        _ = zero.count
    }
}

extension BackingStore {
    /// Tests only (`volatileCache`): drops every write since the last sync, as a power cut
    /// does. False if the store has no volatile cache.
    @discardableResult
    public func powerCut() -> Bool {
        guard let cache else { return false }
        cache.dropAll()
        return true
    }
}

/// Unsynced writes of a `volatileCache` store, in 4 KiB pages (tests only). Reads see them
/// over the file; `sync` writes them to the file before its fdatasync; a power cut drops them.
final class VolatileCache: @unchecked Sendable {
    static let pageBytes = 4096
    private let lock = NSLock()
    private var pages: [UInt64: [UInt8]] = [:]

    var isEmpty: Bool { lock.lock(); defer { lock.unlock() }; return pages.isEmpty }

    /// Writes into whole pages; a partly written page starts from the current contents
    /// (`readPage` reads the file's).
    func write(offset: UInt64, bytes: UnsafeRawBufferPointer, readPage: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        lock.lock(); defer { lock.unlock() }
        let pb = UInt64(Self.pageBytes)
        var at = offset
        let end = offset + UInt64(bytes.count)
        while at < end {
            let page = at / pb * pb
            let from = Int(at - page), to = Int(min(end, page + pb) - page)
            var contents: [UInt8]
            if let p = pages[page] {
                contents = p
            } else {
                contents = [UInt8](repeating: 0, count: Self.pageBytes)
                if from != 0 || to != Self.pageBytes { try contents.withUnsafeMutableBytes { try readPage(page, $0) } }
            }
            contents.withUnsafeMutableBytes { dst in
                (dst.baseAddress! + from).copyMemory(from: bytes.baseAddress! + Int(at - offset), byteCount: to - from)
            }
            pages[page] = contents
            at = page + UInt64(to)
        }
    }

    /// Copies the cached pages that meet `[offset, offset + count)` over `into`.
    func overlay(offset: UInt64, into: UnsafeMutableRawBufferPointer) {
        lock.lock(); defer { lock.unlock() }
        guard !pages.isEmpty, into.count > 0 else { return }
        let pb = UInt64(Self.pageBytes)
        let end = offset + UInt64(into.count)
        var page = offset / pb * pb
        while page < end {
            if let p = pages[page] {
                let from = max(offset, page), to = min(end, page + pb)
                p.withUnsafeBytes { src in
                    (into.baseAddress! + Int(from - offset)).copyMemory(from: src.baseAddress! + Int(from - page), byteCount: Int(to - from))
                }
            }
            page += pb
        }
    }

    func all() -> [(UInt64, [UInt8])] {
        lock.lock(); defer { lock.unlock() }
        return pages.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    func remove(_ keys: [UInt64]) {
        lock.lock(); defer { lock.unlock() }
        for k in keys { pages[k] = nil }
    }

    func dropAll() {
        lock.lock(); defer { lock.unlock() }
        pages = [:]
    }
}

/// The file system's magic number (`statfs.f_type`, the struct's first word on Linux), or 0.
private func fileSystemType(_ fd: Int32) -> Int {
    var raw = [Int](repeating: 0, count: 32)  // struct statfs is 120 bytes on 64-bit Linux
    return raw.withUnsafeMutableBytes { linuxFstatfs(fd, $0.baseAddress!) } == 0 ? raw[0] : 0
}

@_silgen_name("fstatfs")
private func linuxFstatfs(_ fd: Int32, _ buf: UnsafeMutableRawPointer) -> Int32

/// preadv2(2), likewise (glibc ≥ 2.26).
@_silgen_name("preadv2")
private func linuxPreadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ iovcnt: Int32, _ offset: off_t, _ flags: Int32) -> Int

/// fallocate(2) is declared only under _GNU_SOURCE; bind the symbol directly (off_t is 64-bit).
@_silgen_name("fallocate")
private func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32
