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
    private let fd: Int32

    /// Opens `path`. With `createSize`, a missing regular file is created sparse with that many
    /// bytes and a smaller existing one is extended; without it a missing path is an error.
    /// Nothing is ever created under /dev: a device that is not there is the operator's to
    /// attach. Block devices report their size.
    public init(path: String, createSize: UInt64? = nil, directIO: Bool = false) throws {
        self.path = path
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
    }

    /// True for paths a device node lives at, which hamgr never creates.
    public static func isDevicePath(_ path: String) -> Bool { HACore.isDevicePath(path) }

    /// True if `[0, length)` provably reads as zeroes without reading it: a regular file with
    /// no allocated data there (SEEK_DATA finds none). Block devices and file systems without
    /// SEEK_DATA are never provably zero.
    public func provablyZero(length: UInt64) -> Bool {
        guard !isBlockDevice else { return false }
        let SEEK_DATA: Int32 = 3
        errno = 0
        let at = lseek(fd, 0, SEEK_DATA)
        if at < 0 { return errno == ENXIO }  // no data at all past offset 0
        return UInt64(at) >= length
    }

    deinit { close(fd) }

    public func read(offset: UInt64, into pointer: UnsafeMutableRawBufferPointer) throws {
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
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw StoreError(op: "pwrite", path: path, errno: errno) }
            done += n
        }
    }

    public func write(offset: UInt64, array: [UInt8]) throws {
        try array.withUnsafeBytes { try write(offset: offset, bytes: $0) }
    }

    public func write(offset: UInt64, buffer: ByteBuffer) throws {
        try buffer.withUnsafeReadableBytes { try write(offset: offset, bytes: $0) }
    }

    /// Makes every completed write durable (fdatasync).
    public func sync() throws {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw StoreError(op: "fdatasync", path: path, errno: errno)
        }
    }

    /// Writes zeroes over the range, deallocating it where the store can (punch hole on files).
    public func writeZeroes(offset: UInt64, length: Int, mayDeallocate: Bool) throws {
        guard length > 0 else { return }
        if !isBlockDevice {
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

/// fallocate(2) is declared only under _GNU_SOURCE; bind the symbol directly (off_t is 64-bit).
@_silgen_name("fallocate")
private func linuxFallocate(_ fd: Int32, _ mode: Int32, _ offset: Int64, _ length: Int64) -> Int32
