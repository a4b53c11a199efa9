import HACore
import NIOCore

/// Why the volume refused or failed a request; the NBD server maps it to an errno reply.
public enum VolumeError: Error, Equatable, CustomStringConvertible {
    /// The backing store failed (errno from the system call).
    case io(errno: Int32)
    case noSpace
    /// This node is not primary (or lost its lease); `master` is the current master's service address if known.
    case notPrimary(master: String?)
    /// The request is outside the volume or malformed.
    case invalid(String)
    /// Writes are suspended (switchover, demotion, shutdown).
    case shuttingDown

    public var description: String {
        switch self {
        case .io(let e): return "I/O error (errno \(e))"
        case .noSpace: return "no space left on the backing store"
        case .notPrimary(let m): return m.map { "not primary; the master serves at \($0)" } ?? "not primary; no master is known"
        case .invalid(let why): return "invalid request: \(why)"
        case .shuttingDown: return "writes are suspended"
        }
    }
}

/// What an export may advertise. Only flags the volume honours are set (design.md §3).
public struct VolumeCapabilities: Sendable, Equatable {
    public var flush = true
    public var fua = true
    public var trim = true
    public var writeZeroes = true
    /// Several connections see one consistent view, and a flush on one covers writes acked on all.
    public var multiConn = true
    public var readOnly = false
    public var minimumBlockSize: UInt32 = 1
    public var preferredBlockSize: UInt32 = 4096
    public var maximumBlockSize: UInt32 = 32 * 1024 * 1024
    public init() {}
}

/// The block device an NBD export serves. Every call returns a future on `loop` (the
/// caller's event loop); implementations may complete it from any thread.
/// A write future succeeds only once the write is acknowledged under the volume's rules
/// (lease held, replication protocol satisfied); FUA and flush make data durable.
public protocol BlockVolume: AnyObject, Sendable {
    var sizeBytes: UInt64 { get }
    var capabilities: VolumeCapabilities { get }
    func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer>
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
    func flush(on loop: EventLoop) -> EventLoopFuture<Void>
    func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
    func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
}
