/// The quorum core's instruction to the data path: when may a write be acknowledged.
/// The data path checks it at the moment of every acknowledgement, against its own clock,
/// so a late tick can never stretch a lease (design.md §2 "Lease").
public struct WriteGate: Hashable, Sendable, CustomStringConvertible {
    /// The epoch writes are accepted in; replication frames carry it as their fencing token.
    public var epoch: Epoch
    /// Writes may be acknowledged only while `now < validUntil` (local monotonic clock).
    public var validUntil: Instant
    /// The peer must also confirm each write (per the link protocol). False only after the
    /// arbitrator has recorded the peer as outdated (outdate before continuing).
    public var peerRequired: Bool

    public init(epoch: Epoch, validUntil: Instant, peerRequired: Bool) {
        self.epoch = epoch; self.validUntil = validUntil; self.peerRequired = peerRequired
    }

    /// No write may be acknowledged.
    public static let closed = WriteGate(epoch: .zero, validUntil: .zero, peerRequired: true)

    public func allowsAck(at now: Instant) -> Bool { now < validUntil }

    public var description: String { "gate(epoch \(epoch), until \(validUntil), peer \(peerRequired ? "required" : "outdated"))" }
}

/// How the peer follows the primary's writes, as the replication link reports it.
public enum PeerReplicationState: String, Hashable, Sendable, Codable {
    /// Connected, up to date, every write mirrored.
    case inSync
    /// Connected but behind: resyncing, or not yet handshaken.
    case behind
    /// No replication link.
    case disconnected
}
