import HACore

/// What a data node writes durably (fsync) before relying on it (design.md §1, §2).
/// A restarted node reads it back and rejoins as secondary.
public struct NodePersistentState: Codable, Equatable, Sendable {
    /// Highest epoch this node granted anything in (a vote or a renewal). Never goes back;
    /// renewals and replication frames of older epochs are refused.
    public var promisedEpoch: Epoch
    /// The node this node voted for in `promisedEpoch` (itself when it was a candidate).
    public var votedFor: NodeID?
    /// The master this node knows for `promisedEpoch`.
    public var master: NodeID?
    /// The epoch in which this node last became master (nil: never).
    public var lastMasterEpoch: Epoch?
    /// Role when last written. Informational: a restart always rejoins as secondary.
    public var role: Role
    /// Admin maintenance mode: never a candidate while set.
    public var maintenance: Bool
    /// Set (before the first write acknowledged without the peer) to the epoch in which this
    /// node, as master, had the arbitrator record its peer as outdated; cleared when the peer
    /// is in sync again. While set this node never votes for its peer: a local copy of the
    /// arbitrator's mark that does not depend on the data generations being reported in time.
    public var peerOutdatedAt: Epoch?
    /// The arbitrator incarnation this node trusts (docs/quorum-protocol.md "Arbitrator
    /// continuity"): adopted on first contact, replaced only by `hactl arbitrator-accept`.
    /// Replies stamped with another incarnation never count. nil: no arbitrator reply seen
    /// yet (or a state file written before incarnations existed).
    public var arbitratorIncarnation: UInt64?
    /// The replication fencing token last handed to the volume (`NodeAction.fence`): the
    /// highest epoch this node promised to its peer, followed the peer in, or was master of —
    /// never one it promised only to itself. nil (a file written before it existed): the
    /// promised epoch, the old, more conservative token.
    public var fencedEpoch: Epoch?
    /// The newest data generation a master announced to this node in its renewals (or this
    /// node's own, while master): the same rule the arbitrator applies, on this voter too — a
    /// candidate whose data does not know it is behind the last master's data and gets no
    /// vote, even when this node's own copy is as stale as the candidate's (the master wrote
    /// alone, then its disk was lost). nil: none seen (or a file written before it existed).
    public var masterGeneration: GenerationID?

    public init(promisedEpoch: Epoch = .zero, votedFor: NodeID? = nil, master: NodeID? = nil,
                lastMasterEpoch: Epoch? = nil, role: Role = .secondary, maintenance: Bool = false,
                peerOutdatedAt: Epoch? = nil, arbitratorIncarnation: UInt64? = nil) {
        self.promisedEpoch = promisedEpoch; self.votedFor = votedFor; self.master = master
        self.lastMasterEpoch = lastMasterEpoch; self.role = role; self.maintenance = maintenance
        self.peerOutdatedAt = peerOutdatedAt
        self.arbitratorIncarnation = arbitratorIncarnation
    }

    enum CodingKeys: String, CodingKey {
        case promisedEpoch, votedFor, master, lastMasterEpoch, role, maintenance, peerOutdatedAt
        case arbitratorIncarnation, fencedEpoch, masterGeneration
    }

    /// Files written before the arbitrator incarnation existed still load (none known).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        promisedEpoch = try c.decode(Epoch.self, forKey: .promisedEpoch)
        votedFor = try c.decodeIfPresent(NodeID.self, forKey: .votedFor)
        master = try c.decodeIfPresent(NodeID.self, forKey: .master)
        lastMasterEpoch = try c.decodeIfPresent(Epoch.self, forKey: .lastMasterEpoch)
        role = try c.decode(Role.self, forKey: .role)
        maintenance = try c.decode(Bool.self, forKey: .maintenance)
        peerOutdatedAt = try c.decodeIfPresent(Epoch.self, forKey: .peerOutdatedAt)
        arbitratorIncarnation = try c.decodeIfPresent(UInt64.self, forKey: .arbitratorIncarnation)
        fencedEpoch = try c.decodeIfPresent(Epoch.self, forKey: .fencedEpoch)
        masterGeneration = try c.decodeIfPresent(GenerationID.self, forKey: .masterGeneration)
    }

    public static let initial = NodePersistentState()

    public func encoded() -> [UInt8] { StateCoding.encode(self) }
    public static func decode(_ bytes: [UInt8]) throws -> NodePersistentState { try StateCoding.decode(bytes) }
}

/// A mark the arbitrator keeps: `node` lacks writes the master of `epoch` acknowledged alone.
public struct OutdateMark: Codable, Equatable, Sendable {
    public var node: NodeID
    public var epoch: Epoch
    public var instance: UInt64
    public init(node: NodeID, epoch: Epoch, instance: UInt64) { self.node = node; self.epoch = epoch; self.instance = instance }
    var position: MarkPosition { MarkPosition(epoch: epoch, instance: instance) }
}

/// (epoch, instance), ordered: marks and clears of one node are applied only in this order.
public struct MarkPosition: Codable, Equatable, Comparable, Sendable {
    public var epoch: Epoch
    public var instance: UInt64
    public init(epoch: Epoch, instance: UInt64) { self.epoch = epoch; self.instance = instance }
    public static func < (a: MarkPosition, b: MarkPosition) -> Bool { (a.epoch, a.instance) < (b.epoch, b.instance) }
    public static let zero = MarkPosition(epoch: .zero, instance: 0)
}

/// What the arbitrator writes durably per cluster before replying, so that a restarted
/// arbitrator never grants twice (design.md §2 "The arbitrator persists").
public struct ArbitratorPersistentState: Codable, Equatable, Sendable {
    /// Highest epoch the arbitrator granted anything in.
    public var promisedEpoch: Epoch
    /// Its vote in `promisedEpoch`, if any.
    public var votedFor: NodeID?
    /// The master it knows for `promisedEpoch` (from its vote or the master's renewals).
    public var master: NodeID?
    /// The data generation the master last announced; a candidate that does not know it is behind.
    public var masterGeneration: GenerationID
    /// Active outdated marks (at most one per node).
    public var outdated: [OutdateMark]
    /// Per node, the newest (epoch, instance) a master cleared up to; older marks are stale.
    public var cleared: [OutdateMark]
    /// Random id of this state, created with it (`hamgr arbitrator --init`) and never changed.
    /// Every reply carries it; a node that knows another one does not count the reply. A lost
    /// or re-created state therefore gets a new incarnation and is not mistaken for the old
    /// one. 0: not assigned (pure-core tests; the daemon assigns one to an old state file).
    public var incarnation: UInt64

    public init(promisedEpoch: Epoch = .zero, votedFor: NodeID? = nil, master: NodeID? = nil,
                masterGeneration: GenerationID = .none, outdated: [OutdateMark] = [], cleared: [OutdateMark] = [],
                incarnation: UInt64 = 0) {
        self.promisedEpoch = promisedEpoch; self.votedFor = votedFor; self.master = master
        self.masterGeneration = masterGeneration; self.outdated = outdated; self.cleared = cleared
        self.incarnation = incarnation
    }

    /// A fresh state for `hamgr arbitrator --init`: nothing promised, a new random incarnation.
    public static func fresh<R: RandomNumberGenerator>(using rng: inout R) -> ArbitratorPersistentState {
        var id: UInt64 = 0
        while id == 0 { id = rng.next() }
        return ArbitratorPersistentState(incarnation: id)
    }

    enum CodingKeys: String, CodingKey {
        case promisedEpoch, votedFor, master, masterGeneration, outdated, cleared, incarnation
    }

    /// A file written before incarnations existed loads with incarnation 0.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        promisedEpoch = try c.decode(Epoch.self, forKey: .promisedEpoch)
        votedFor = try c.decodeIfPresent(NodeID.self, forKey: .votedFor)
        master = try c.decodeIfPresent(NodeID.self, forKey: .master)
        masterGeneration = try c.decode(GenerationID.self, forKey: .masterGeneration)
        outdated = try c.decode([OutdateMark].self, forKey: .outdated)
        cleared = try c.decode([OutdateMark].self, forKey: .cleared)
        incarnation = try c.decodeIfPresent(UInt64.self, forKey: .incarnation) ?? 0
    }

    public static let initial = ArbitratorPersistentState()

    public func mark(of node: NodeID) -> OutdateMark? { outdated.first { $0.node == node } }
    func clearedPosition(of node: NodeID) -> MarkPosition { cleared.first { $0.node == node }?.position ?? .zero }

    public func encoded() -> [UInt8] { StateCoding.encode(self) }
    public static func decode(_ bytes: [UInt8]) throws -> ArbitratorPersistentState { try StateCoding.decode(bytes) }
}

/// Persisted state is small and written rarely (on epoch, vote and mark changes), so JSON:
/// readable in an incident, versioned by its keys.
/// `PureJSON` (HACore) writes the layout `JSONEncoder` with `.sortedKeys` wrote, and reads
/// files written by either, without Foundation.
enum StateCoding {
    static func encode<T: Encodable>(_ value: T) -> [UInt8] {
        // Encoding these plain structs cannot fail; a failure would be a programming error.
        guard let bytes = try? PureJSON.encode(value) else { preconditionFailure("cannot encode \(T.self)") }
        return bytes
    }
    static func decode<T: Decodable>(_ bytes: [UInt8]) throws -> T {
        try PureJSON.decode(T.self, from: bytes)
    }
}
