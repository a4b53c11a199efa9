import HACore

/// How far the peer has confirmed one replicated write (or flush).
public enum PeerConfirmation: Int, Comparable, Sendable {
    /// Not yet handed to the link.
    case pending = 0
    /// Queued to the peer (protocol A).
    case queued = 1
    /// The peer has received it (protocol B).
    case received = 2
    /// The peer wrote it, durably if FUA/flush (protocol C).
    case written = 3
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// What to do with one pending write at this moment.
public enum AckVerdict: Equatable, Sendable {
    case wait
    case ack
    case fail(VolumeError)
}

/// The pure acknowledgement rule (design.md §2 "Lease", §3 "Link protocols").
public enum AckRule {
    /// - Parameters:
    ///   - peerLost: the peer will not confirm this write (link down, or it was not
    ///     following when the write was issued).
    ///   - bitmapDurable: the write's chunks are marked in the persisted bitmap.
    ///   - barrier: FUA write or flush: the peer must have written it durably whatever the protocol.
    public static func verdict(localDone: Bool, confirmation: PeerConfirmation, peerLost: Bool, bitmapDurable: Bool,
                               barrier: Bool, protocol proto: ReplicationProtocol, gate: WriteGate, now: Instant) -> AckVerdict {
        // Never ack without a lease; once it has run out the write can only fail.
        guard gate.allowsAck(at: now) else { return .fail(.notPrimary(master: nil)) }
        guard localDone else { return .wait }
        if peerLost {
            // Going on alone needs the arbitrator's outdate mark first (peerRequired false)
            // and the bitmap durable, so a later resync knows the chunk.
            return (!gate.peerRequired && bitmapDurable) ? .ack : .wait
        }
        let needed: PeerConfirmation
        if barrier { needed = .written } else {
            switch proto { case .a: needed = .queued; case .b: needed = .received; case .c: needed = .written }
        }
        return confirmation >= needed ? .ack : .wait
    }
}

/// Epochs as fencing tokens (design.md §2): a frame that changes data is refused when it
/// comes from an epoch older than the one this node promised.
public enum EpochFence {
    public static func admits(frameEpoch: Epoch, promised: Epoch) -> Bool { frameEpoch >= promised }

    /// Frames that write to the receiver's store or claim primary authority.
    public static func isFenced(_ kind: LinkFrameKind) -> Bool {
        switch kind {
        case .write, .flush, .resyncData, .resyncZeroes, .resyncDone, .verifyRequest: return true
        default: return false
        }
    }
}

/// Token bucket for resync traffic (bytes per second), driven by the caller's `now`.
public struct ResyncThrottle: Hashable, Sendable {
    public let bytesPerSecond: Int
    public let burstBytes: Int
    private var tokens: Double
    private var last: Instant?

    public init(bytesPerSecond: Int, chunkBytes: Int) {
        self.bytesPerSecond = max(1, bytesPerSecond)
        burstBytes = max(chunkBytes, self.bytesPerSecond / 20)
        tokens = Double(burstBytes)
    }

    /// nil: send now (tokens taken). Otherwise wait this long and ask again.
    public mutating func take(_ bytes: Int, now: Instant) -> Duration? {
        if let l = last {
            let dt = max(0, Double(now.nanoseconds - l.nanoseconds) / 1e9)
            tokens = min(Double(burstBytes), tokens + dt * Double(bytesPerSecond))
        }
        last = now
        let need = Double(min(bytes, burstBytes))
        if tokens >= need { tokens -= need; return nil }
        let wait = (need - tokens) / Double(bytesPerSecond)
        return .nanoseconds(Int64(wait * 1e9) + 1)
    }
}

/// Which chunk a resync sends next: ascending through the dirty bitmap, bounded in flight.
public struct ResyncCursor: Hashable, Sendable {
    public private(set) var next = 0
    public private(set) var inFlight: Set<Int> = []
    public let window: Int
    public init(window: Int) { self.window = window }

    /// The next chunk to send, or nil if the window is full or the pass reached the end.
    public mutating func take(from bitmap: DirtyBitmap) -> Int? {
        guard inFlight.count < window else { return nil }
        var c = bitmap.nextSet(from: next)
        while let x = c, inFlight.contains(x) { c = bitmap.nextSet(from: x + 1) }
        guard let chunk = c else { next = bitmap.chunkCount; return nil }
        next = chunk + 1
        inFlight.insert(chunk)
        return chunk
    }

    /// A chunk's ack arrived; true if it was in flight.
    public mutating func acked(_ chunk: Int) -> Bool { inFlight.remove(chunk) != nil }

    /// Done when a pass found nothing more and no chunk is in flight; restart a pass if bits remain.
    public mutating func passComplete(bitmap: DirtyBitmap) -> Bool {
        guard inFlight.isEmpty, bitmap.nextSet(from: next) == nil else { return false }
        if bitmap.isEmpty { return true }
        next = 0
        return false
    }
}
