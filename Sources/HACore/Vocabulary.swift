/// Small domain types shared by every module (design.md §1).

/// The version string reported in `/status`, `hamgr_build_info` and `--version`.
public let hamgrVersion = "0.1.0"

/// A data node or the arbitrator, by its configured name.
public struct NodeID: Hashable, Comparable, Codable, Sendable, CustomStringConvertible, ExpressibleByStringLiteral {
    public let name: String
    public init(_ name: String) { self.name = name }
    public init(stringLiteral value: String) { self.name = value }
    public var description: String { name }
    public static func < (a: NodeID, b: NodeID) -> Bool { a.name < b.name }
}

/// Monotonic term. The master of epoch e is unique; every frame carries the sender's epoch
/// and is refused by a node that promised a newer one (epochs as fencing tokens).
public struct Epoch: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public static let zero = Epoch(0)
    public var next: Epoch { Epoch(value + 1) }
    public var description: String { String(value) }
    public static func < (a: Epoch, b: Epoch) -> Bool { a.value < b.value }
}

public enum Role: String, Codable, Sendable, CaseIterable {
    case primary, secondary
}

/// DRBD-style disk state. Only `upToDate` may ever be promoted (without `--force`).
public enum DiskState: String, Codable, Sendable, CaseIterable {
    case upToDate, outdated, inconsistent, diskless
}

public enum ReplicationProtocol: String, Codable, Sendable, CaseIterable {
    /// Ack after the local write and the frame is queued to the peer.
    case a = "A"
    /// Ack after the local write and the peer has received the frame.
    case b = "B"
    /// Ack after the local write and the peer has written it.
    case c = "C"
}

public enum SplitBrainPolicy: String, Codable, Sendable, CaseIterable {
    case prohibit, allow
}

/// How a detected divergence is resolved without an operator (only meaningful with `allow`).
public enum AfterSplitBrain: String, Codable, Sendable, CaseIterable {
    case disconnect
    case discardYoungerPrimary = "discard-younger-primary"
    case discardLeastChanges = "discard-least-changes"
}

/// A data generation identifier (DRBD's UUID). 0 means "none".
public struct GenerationID: Hashable, Codable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public static let none = GenerationID(0)
    public var isNone: Bool { raw == 0 }
    public var description: String { String(raw, radix: 16) }
}

/// The generations a node holds for its data (design.md §1). On reconnect they decide
/// who is resync source and target, and whether the two sides diverged.
public struct DataGenerations: Hashable, Codable, Sendable {
    /// The generation the data currently belongs to.
    public var current: GenerationID
    /// The generation the dirty bitmap is relative to (none when the bitmap is clear).
    public var bitmap: GenerationID
    /// Older generations, newest first (at most `historyLimit`).
    public var history: [GenerationID]
    public static let historyLimit = 4

    public init(current: GenerationID, bitmap: GenerationID = .none, history: [GenerationID] = []) {
        self.current = current
        self.bitmap = bitmap
        self.history = Array(history.prefix(Self.historyLimit))
    }

    /// Start a new generation while the peer is not following (disconnected primary,
    /// promotion, forced promotion): the old current becomes the bitmap base.
    public mutating func branch(to fresh: GenerationID) {
        if bitmap.isNone {
            bitmap = current
        } else {
            // Already tracking: keep the older bitmap base, remember the skipped current.
            pushHistory(current)
        }
        current = fresh
    }

    public mutating func pushHistory(_ id: GenerationID) {
        guard !id.isNone, history.first != id else { return }
        history.insert(id, at: 0)
        if history.count > Self.historyLimit { history.removeLast(history.count - Self.historyLimit) }
    }

    /// True if `id` is our current generation or one we passed through.
    public func knows(_ id: GenerationID) -> Bool {
        !id.isNone && (id == current || id == bitmap || history.contains(id))
    }
}

/// A point on a monotonic clock, in nanoseconds. Cores take `now` as an input so that the
/// simulator can drive them; the daemon reads it from `MonotonicClock`.
public struct Instant: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public var nanoseconds: Int64
    public init(nanoseconds: Int64) { self.nanoseconds = nanoseconds }
    public static let zero = Instant(nanoseconds: 0)
    public static func < (a: Instant, b: Instant) -> Bool { a.nanoseconds < b.nanoseconds }
    public static func + (a: Instant, d: Duration) -> Instant { Instant(nanoseconds: a.nanoseconds + d.nanosecondsClamped) }
    public static func - (a: Instant, d: Duration) -> Instant { Instant(nanoseconds: a.nanoseconds - d.nanosecondsClamped) }
    public static func - (a: Instant, b: Instant) -> Duration { .nanoseconds(a.nanoseconds - b.nanoseconds) }
    public var description: String { fixedPoint(Double(nanoseconds) / 1e9, decimals: 3) + "s" }
}

extension Duration {
    /// Whole nanoseconds, clamped to Int64.
    public var nanosecondsClamped: Int64 {
        let (s, atto) = components
        let (ns, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return s < 0 ? .min : .max }
        return ns &+ atto / 1_000_000_000
    }
    public var milliseconds: Double { Double(nanosecondsClamped) / 1e6 }
    public var seconds: Double { Double(nanosecondsClamped) / 1e9 }
    /// `self * factor`, for lease arithmetic such as `lease * (1 - drift)`.
    public func scaled(by factor: Double) -> Duration { .nanoseconds(Int64(Double(nanosecondsClamped) * factor)) }
}

/// The daemon's monotonic clock (CLOCK_MONOTONIC via ContinuousClock).
public enum MonotonicClock {
    private static let origin = ContinuousClock.now
    public static func now() -> Instant {
        Instant(nanoseconds: (ContinuousClock.now - origin).nanosecondsClamped)
    }
}

/// A tiny seeded generator (SplitMix64) so cores and simulators never touch a global RNG.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
