import HACore

/// Every knob of the quorum cores (design.md §2), with the defaults of the design notes.
public struct QuorumSettings: Sendable, Equatable {
    /// Renew interval, lease, failure timeout and clock-drift bound (validated by `LeaseTimings.violations()`).
    public var timings: LeaseTimings
    /// `prohibit` (default): never promote without a second vote. `allow`: a backup that hears
    /// nobody for `failureTimeout` promotes alone (availability over consistency).
    public var splitBrain: SplitBrainPolicy
    /// Deliberate protocol bugs, for proving that the simulator catches them. Empty in production.
    public var plantedBugs: Set<PlantedBug>
    /// Seed for election jitter; mixed with the node name so two nodes never share a sequence.
    public var jitterSeed: UInt64
    /// A master emits `.fenceServices` once its lease will lapse within this margin without a
    /// fresh grant (docs/quorum-protocol.md §2c). nil: 2 × renew_interval (400 ms at defaults:
    /// four renewals in a row unanswered). Must exceed the shell's tick interval, and stay below
    /// masterLeaseSpan − renew_interval or healthy masters fence.
    public var serviceFenceMargin: Duration?

    public init(timings: LeaseTimings = .defaults, splitBrain: SplitBrainPolicy = .prohibit,
                plantedBugs: Set<PlantedBug> = [], jitterSeed: UInt64 = 0) {
        self.timings = timings
        self.splitBrain = splitBrain
        self.plantedBugs = plantedBugs
        self.jitterSeed = jitterSeed
    }

    public static let defaults = QuorumSettings()

    /// `serviceFenceMargin` or its default.
    public var servicesMargin: Duration { serviceFenceMargin ?? timings.renewInterval * 2 }

    func has(_ bug: PlantedBug) -> Bool { !plantedBugs.isEmpty && plantedBugs.contains(bug) }
}

/// Test-only faults that break one safety rule each (the simulator must catch every one).
public enum PlantedBug: String, Sendable, CaseIterable {
    /// Voters grant votes without waiting for the lease they granted to expire
    /// (and a restarted voter skips its quarantine).
    case skipLeaseWait
    /// The master drops `peerRequired` without the arbitrator's outdate confirmation.
    case skipOutdate
    /// Votes and the epochs promised by voting are not written before the reply.
    case votesNotPersisted
    /// The master's lease span ignores the drift bound: it equals the voters' lease.
    case noDriftMargin
    /// A granted renewal or vote extends the master's lease from the reply's arrival instead
    /// of the request's send time.
    case leaseAnchoredAtReply
    /// A master keeps its gate open when a voter reports a promised epoch above its own
    /// (the clock-freeze fix skipped; docs/quorum-protocol.md "Clock freeze").
    case gateOpenOnNewerEpoch
}

/// One structured state-change event: a name plus ordered fields (epoch, role, reason…).
public struct QuorumEvent: Equatable, Sendable, CustomStringConvertible {
    public struct Field: Equatable, Sendable {
        public var key: String
        public var value: String
        public init(_ key: String, _ value: String) { self.key = key; self.value = value }
    }
    public var name: String
    public var fields: [Field]
    public init(_ name: String, _ fields: [Field] = []) { self.name = name; self.fields = fields }

    public subscript(key: String) -> String? { fields.first { $0.key == key }?.value }

    public var description: String {
        ([name] + fields.map { "\($0.key)=\($0.value)" }).joined(separator: " ")
    }
}

/// Why an admin command was refused, in words an operator can act on.
public struct AdminRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}
