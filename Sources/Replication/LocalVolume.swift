import NIOCore
import NIOPosix

/// An unreplicated volume over one local `BackingStore` ("hamgr unreplicated", `hamgr export`).
/// Every system call runs on a small thread pool, never on an event loop. FUA writes and
/// flushes end with fdatasync; trim and write-zeroes use the store's hole punching.
/// Capabilities are honest: one store and one page cache serve every connection, and a
/// flush syncs all of it, so CAN_MULTI_CONN holds.
public final class LocalVolume: BlockVolume, @unchecked Sendable {
    public let store: BackingStore
    public let capabilities: VolumeCapabilities
    public var sizeBytes: UInt64 { store.sizeBytes }
    private let pool: NIOThreadPool

    /// - Parameters:
    ///   - ioThreads: threads doing pread/pwrite/fdatasync; a few suffice for a page-cache
    ///     backed file, more help a deep device queue.
    ///   - readOnly: refuse writes (the export advertises READ_ONLY).
    public init(store: BackingStore, ioThreads: Int = 4, readOnly: Bool = false) {
        self.store = store
        var caps = VolumeCapabilities()
        caps.readOnly = readOnly
        self.capabilities = caps
        self.pool = NIOThreadPool(numberOfThreads: max(1, ioThreads))
        pool.start()
    }

    /// Stops the I/O threads after queued work finished; later calls fail with `.shuttingDown`.
    public func shutdown() {
        try? pool.syncShutdownGracefully()
    }

    public func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> {
        if let e = check(offset: offset, length: length, write: false) { return loop.makeFailedFuture(e) }
        let store = self.store
        return run(on: loop) { try store.read(offset: offset, length: length) }
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = check(offset: offset, length: data.readableBytes, write: true) { return loop.makeFailedFuture(e) }
        let store = self.store
        return run(on: loop) {
            try store.write(offset: offset, buffer: data)
            if fua { try store.sync() }
        }
    }

    public func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        let store = self.store
        return run(on: loop) { try store.sync() }
    }

    public func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, fua: fua, mayDeallocate: true, on: loop)
    }

    public func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        if let e = check(offset: offset, length: length, write: true) { return loop.makeFailedFuture(e) }
        let store = self.store
        return run(on: loop) {
            try store.writeZeroes(offset: offset, length: length, mayDeallocate: mayDeallocate)
            if fua { try store.sync() }
        }
    }

    private func check(offset: UInt64, length: Int, write: Bool) -> VolumeError? {
        if write && capabilities.readOnly { return .invalid("the volume is read-only") }
        guard length >= 0 else { return .invalid("negative length") }
        let end = offset.addingReportingOverflow(UInt64(length))
        guard !end.overflow, end.partialValue <= sizeBytes else {
            return write ? .noSpace : .invalid("range \(offset)+\(length) is beyond the end (\(sizeBytes) bytes)")
        }
        return nil
    }

    private func run<T>(on loop: EventLoop, _ work: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        pool.runIfActive(eventLoop: loop) {
            do { return try work() } catch let e as StoreError {
                throw e.errno == ENOSPC || e.errno == EDQUOT || e.errno == EFBIG ? VolumeError.noSpace : VolumeError.io(errno: e.errno)
            }
        }.flatMapErrorThrowing { error in
            if error is VolumeError { throw error }
            throw VolumeError.shuttingDown  // NIOThreadPoolError.ThreadPoolInactive
        }
    }
}
