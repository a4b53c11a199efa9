import HAShell
import NIOCore
import Replication

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
    /// Whether replies may go out now. A reply is an acknowledgement only when it reaches
    /// the client: one decided while the lease held but written after it lapsed (the process
    /// was paused in between) would be a deposed master answering. Checked right before
    /// replies are written; false closes the connection with them unsent.
    func mayAnswer() -> Bool
}

extension BlockVolume {
    public func mayAnswer() -> Bool { true }
}
