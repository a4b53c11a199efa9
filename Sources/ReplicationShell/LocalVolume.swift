import HAShell
import NIOCore
import NIOPosix
import Replication
import Synchronization

/// An unreplicated volume over one local `BackingStore` ("hamgr unreplicated", `hamgr export`).
/// Small buffered writes and cached reads run on the connection's event loop (they cost
/// microseconds and cannot wait for the device); everything that can wait — fdatasync, a
/// read that misses the page cache, large requests, hole punching — runs on a small thread
/// pool. FUA writes and flushes end with fdatasync; trim and write-zeroes use the store's
/// hole punching.
/// Capabilities are honest: one store and one page cache serve every connection, and a
/// flush syncs all of it, so CAN_MULTI_CONN holds.
public final class LocalVolume: BlockVolume, ScatterWriteVolume, @unchecked Sendable {
    public let store: BackingStore
    public let capabilities: VolumeCapabilities
    public var sizeBytes: UInt64 { store.sizeBytes }
    private let pool: NIOThreadPool
    /// Set by `shutdown()`: the loop's own fast paths refuse from then on, as the pool does.
    private let stopped = Atomic<Bool>(false)

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
        stopped.store(true, ordering: .releasing)
        try? pool.syncShutdownGracefully()
    }

    public func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> {
        if let e = check(offset: offset, length: length, write: false) { return loop.makeFailedFuture(e) }
        let store = self.store
        if length < Self.unbatchedBytes, !stopped.load(ordering: .acquiring) {
            do {
                if let data = try store.readIfCached(offset: offset, length: length, allocator: Self.allocator) {
                    return loop.makeSucceededFuture(data)
                }
            } catch { return loop.makeFailedFuture(Self.volumeError(error)) }
        }
        return run(on: loop, bytes: length) { try store.read(offset: offset, length: length) }
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        write(offset: offset, chunks: [data], fua: fua, on: loop)
    }

    /// The write's payload in pieces as it came off the network: one pwritev, no join.
    /// A small write without FUA goes to the page cache on the caller's loop (run to
    /// completion: at queue depth 1 the two thread hand-offs cost several times the write).
    public func write(offset: UInt64, chunks: [ByteBuffer], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        var total = 0
        for c in chunks { total += c.readableBytes }
        if let e = check(offset: offset, length: total, write: true) { return loop.makeFailedFuture(e) }
        let store = self.store
        if !fua, total < Self.unbatchedBytes, store.writesInline, !stopped.load(ordering: .acquiring) {
            do { try store.write(offset: offset, buffers: chunks) } catch { return loop.makeFailedFuture(Self.volumeError(error)) }
            return loop.makeSucceededVoidFuture()
        }
        return run(on: loop, bytes: total) {
            try store.write(offset: offset, buffers: chunks)
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

    private static func volumeError(_ error: Error) -> Error {
        guard let e = error as? StoreError else { return error }
        return e.errno == ENOSPC || e.errno == EDQUOT || e.errno == EFBIG ? VolumeError.noSpace : VolumeError.io(errno: e.errno)
    }

    private static let allocator = ByteBufferAllocator()

    // MARK: batched submission

    /// One queued operation: runs on an I/O thread (or, with `false`, is refused without
    /// running) and returns what completes it on its loop.
    private typealias Job = (_ active: Bool) -> () -> Void

    /// Operations queued during the current event-loop turn. Handing each request to a
    /// thread on its own cost a condition-variable wake-up and a loop wake-up per request,
    /// which dominated small I/O (perf: ~45% of samples in futex wait/wake at 4 KiB qd32);
    /// a turn's requests now travel together: one wake-up there, one back.
    private let queue = HandOff<(EventLoop, Job)>()

    /// Requests at least this large go to a thread of their own: their copy costs more than
    /// a wake-up, and several of them should run in parallel rather than one after another.
    static let unbatchedBytes = 128 * 1024

    private func run<T>(on loop: EventLoop, bytes: Int = 0, _ work: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        let promise = loop.makePromise(of: T.self)
        let job: Job = { active in
            guard active else { return { promise.fail(VolumeError.shuttingDown) } }
            let result: Result<T, Error>
            do { result = .success(try work()) } catch { result = .failure(Self.volumeError(error)) }
            return { promise.completeWith(result) }
        }
        if bytes >= Self.unbatchedBytes {
            pool.submit { state in
                let complete = job(state == .active)
                loop.execute { complete() }
            }
            return promise.futureResult
        }
        // Submit at the end of this loop turn, after every request of this read was decoded.
        if queue.post([(loop, job)]) { loop.execute { self.submitQueued() } }
        return promise.futureResult
    }

    private func submitQueued() {
        let jobs = queue.take()
        guard !jobs.isEmpty else { return }
        pool.submit { state in
            let active = state == .active
            var completions: [(EventLoop, () -> Void)] = []
            completions.reserveCapacity(jobs.count)
            for (loop, job) in jobs { completions.append((loop, job(active))) }
            // One hop back per loop involved (usually one).
            var remaining = completions[...]
            while let first = remaining.first {
                let loop = first.0
                let mine = remaining.filter { $0.0 === loop }.map { $0.1 }
                remaining = remaining.filter { $0.0 !== loop }[...]
                loop.execute { for c in mine { c() } }
            }
        }
    }
}
