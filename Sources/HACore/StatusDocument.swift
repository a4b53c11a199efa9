/// The `/status` document of a data node (design.md §5), shared by `hamgr` (which
/// serves it) and `hactl` (which reads it). JSON keys are snake_case and stable;
/// docs/operator-guide.md "The /status document" describes every field.
public struct StatusDocument: Codable, Sendable, Equatable {
    public struct Master: Codable, Sendable, Equatable {
        public var node: String
        public var serviceAddress: String
        public init(node: String, serviceAddress: String) { self.node = node; self.serviceAddress = serviceAddress }
        enum CodingKeys: String, CodingKey { case node, serviceAddress = "service_address" }
    }

    public struct Peer: Codable, Sendable, Equatable {
        public var node: String
        /// The peer's status endpoint (`http://HOST:PORT`), so a client can ask it too.
        public var statusURL: String?
        public var reachable: Bool
        public var replication: PeerReplicationState
        /// The peer's disk state as last reported over the link (nil if never heard).
        public var diskState: DiskState?
        public init(node: String, statusURL: String? = nil, reachable: Bool, replication: PeerReplicationState, diskState: DiskState?) {
            self.node = node; self.statusURL = statusURL; self.reachable = reachable
            self.replication = replication; self.diskState = diskState
        }
        enum CodingKeys: String, CodingKey {
            case node, reachable, replication
            case statusURL = "status_url", diskState = "disk_state"
        }
    }

    public struct Arbitrator: Codable, Sendable, Equatable {
        public var reachable: Bool
        /// Why the arbitrator's answers are not counted (its state is another incarnation than
        /// the one this node knows; `hactl arbitrator-accept`), or null.
        public var refused: String?
        public init(reachable: Bool, refused: String? = nil) { self.reachable = reachable; self.refused = refused }
        enum CodingKeys: String, CodingKey { case reachable, refused }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(reachable, forKey: .reachable)
            try c.encode(refused, forKey: .refused)
        }
    }

    public struct Resync: Codable, Sendable, Equatable {
        public var doneBytes: UInt64
        public var totalBytes: UInt64
        /// "resync" or "verify".
        public var kind: String
        public init(doneBytes: UInt64, totalBytes: UInt64, kind: String = "resync") {
            self.doneBytes = doneBytes; self.totalBytes = totalBytes; self.kind = kind
        }
        enum CodingKeys: String, CodingKey { case doneBytes = "done_bytes", totalBytes = "total_bytes", kind }
        public var fraction: Double { totalBytes == 0 ? 1 : min(1, Double(doneBytes) / Double(totalBytes)) }
    }

    public struct Resource: Codable, Sendable, Equatable {
        public var name: String
        /// stopped, starting, running, failed, stopping.
        public var state: String
        public var restarts: Int
        public init(name: String, state: String, restarts: Int) { self.name = name; self.state = state; self.restarts = restarts }
    }

    public var cluster: String
    public var node: String
    public var role: Role
    public var epoch: UInt64
    public var master: Master?
    public var diskState: DiskState
    public var peer: Peer
    public var arbitrator: Arbitrator
    public var quorum: Bool
    /// Remaining master lease as this node counts it (0 unless master).
    public var leaseValidMs: Int64
    public var outOfSyncBytes: UInt64
    public var resync: Resync?
    /// Set while a detected divergence awaits resolution (a human-readable description).
    public var splitBrain: String?
    /// Why this node is secondary when no master exists (nil otherwise).
    public var whyNotPromoted: String?
    public var maintenance: Bool
    /// This node's NBD service address.
    public var serviceAddress: String
    /// The current data generation, hex.
    public var generation: String
    public var resources: [Resource]
    public var version: String
    /// Why the backing store was declared failed (the node then reports `diskless`), or nil.
    public var diskError: String?
    /// Why the local disk is not up to date, in words an operator can act on (nil when it is):
    /// new metadata waiting for a sync or a bootstrap, sync progress, outdated.
    public var diskNote: String?

    public init(cluster: String, node: String, role: Role, epoch: UInt64, master: Master?, diskState: DiskState,
                peer: Peer, arbitrator: Arbitrator, quorum: Bool, leaseValidMs: Int64 = 0, outOfSyncBytes: UInt64 = 0,
                resync: Resync? = nil, splitBrain: String? = nil, whyNotPromoted: String? = nil, maintenance: Bool = false,
                serviceAddress: String, generation: String, resources: [Resource] = [], version: String = hamgrVersion,
                diskError: String? = nil, diskNote: String? = nil) {
        self.cluster = cluster; self.node = node; self.role = role; self.epoch = epoch; self.master = master
        self.diskState = diskState; self.peer = peer; self.arbitrator = arbitrator; self.quorum = quorum
        self.leaseValidMs = leaseValidMs; self.outOfSyncBytes = outOfSyncBytes; self.resync = resync
        self.splitBrain = splitBrain; self.whyNotPromoted = whyNotPromoted; self.maintenance = maintenance
        self.serviceAddress = serviceAddress; self.generation = generation; self.resources = resources
        self.version = version
        self.diskError = diskError
        self.diskNote = diskNote
    }

    enum CodingKeys: String, CodingKey {
        case cluster, node, role, epoch, master, peer, arbitrator, quorum, resync, maintenance, generation, resources, version
        case diskError = "disk_error", diskNote = "disk_note"
        case diskState = "disk_state", leaseValidMs = "lease_valid_ms", outOfSyncBytes = "out_of_sync_bytes"
        case splitBrain = "split_brain", whyNotPromoted = "why_not_promoted", serviceAddress = "service_address"
    }

    /// Encode with explicit nulls for absent optionals: scripts test `.master == null`
    /// and a missing key would read the same in jq but not in stricter consumers.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(cluster, forKey: .cluster)
        try c.encode(node, forKey: .node)
        try c.encode(role, forKey: .role)
        try c.encode(epoch, forKey: .epoch)
        try c.encode(master, forKey: .master)
        try c.encode(diskState, forKey: .diskState)
        try c.encode(peer, forKey: .peer)
        try c.encode(arbitrator, forKey: .arbitrator)
        try c.encode(quorum, forKey: .quorum)
        try c.encode(leaseValidMs, forKey: .leaseValidMs)
        try c.encode(outOfSyncBytes, forKey: .outOfSyncBytes)
        try c.encode(resync, forKey: .resync)
        try c.encode(splitBrain, forKey: .splitBrain)
        try c.encode(whyNotPromoted, forKey: .whyNotPromoted)
        try c.encode(maintenance, forKey: .maintenance)
        try c.encode(serviceAddress, forKey: .serviceAddress)
        try c.encode(generation, forKey: .generation)
        try c.encode(resources, forKey: .resources)
        try c.encode(version, forKey: .version)
        try c.encode(diskError, forKey: .diskError)
        try c.encode(diskNote, forKey: .diskNote)
    }
}

/// The arbitrator's `/status`: what it knows of every cluster it serves.
public struct ArbitratorStatusDocument: Codable, Sendable, Equatable {
    public struct ClusterEntry: Codable, Sendable, Equatable {
        public var name: String
        /// The node holding the lease this arbitrator granted, if it is still valid.
        public var master: String?
        /// Highest epoch promised.
        public var epoch: UInt64
        /// Nodes recorded as outdated, with the epoch of the mark.
        public var outdated: [OutdatedMark]
        /// Milliseconds since each node was last heard from (nil: never since start).
        public var lastContactMs: [String: Int64?]
        /// Milliseconds left of the lease this arbitrator granted `master` (nil with no master).
        /// Optional when decoding: documents from before it was added lack the key.
        public var leaseRemainingMs: Int64?
        /// The nodes with an open quorum link to this arbitrator, in name order (nil: not
        /// reported, a document from before the key was added). A backup speaks only when its
        /// link comes up and in elections, so its `lastContactMs` grows while all is well: the
        /// link says whether it could ask for a vote now.
        public var connected: [String]?
        public init(name: String, master: String?, epoch: UInt64, outdated: [OutdatedMark], lastContactMs: [String: Int64?],
                    leaseRemainingMs: Int64? = nil, connected: [String]? = nil) {
            self.name = name; self.master = master; self.epoch = epoch; self.outdated = outdated; self.lastContactMs = lastContactMs
            self.leaseRemainingMs = leaseRemainingMs; self.connected = connected
        }
        enum CodingKeys: String, CodingKey {
            case name, master, epoch, outdated, connected
            case lastContactMs = "last_contact_ms", leaseRemainingMs = "lease_remaining_ms"
        }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(master, forKey: .master)
            try c.encode(epoch, forKey: .epoch)
            try c.encode(leaseRemainingMs, forKey: .leaseRemainingMs)
            try c.encode(outdated, forKey: .outdated)
            try c.encode(lastContactMs, forKey: .lastContactMs)
            try c.encode(connected, forKey: .connected)
        }
    }

    public struct OutdatedMark: Codable, Sendable, Equatable {
        public var node: String
        public var epoch: UInt64
        public init(node: String, epoch: UInt64) { self.node = node; self.epoch = epoch }
    }

    public var role: String
    public var clusters: [ClusterEntry]
    public var version: String

    public init(clusters: [ClusterEntry], version: String = hamgrVersion) {
        self.role = "arbitrator"; self.clusters = clusters; self.version = version
    }
}

/// A JSON value, for admin request parameters and response fields.
public enum JSONValue: Codable, Sendable, Equatable, CustomStringConvertible {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let n):
            if n == n.rounded(), abs(n) < 1e15 { try c.encode(Int64(n)) } else { try c.encode(n) }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    public var boolValue: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }
    public var numberValue: Double? { if case .number(let n) = self { return n }; return nil }

    /// Compact JSON text, keys sorted (HACore/JSON.swift).
    public var description: String { PureJSON.text(self) }
}

/// The JSON body of every admin response: `{"ok": …, "message": …, …fields}`.
public struct AdminReply: Codable, Sendable, Equatable {
    public var ok: Bool
    public var message: String
    public var fields: [String: JSONValue]

    public init(ok: Bool, message: String, fields: [String: JSONValue] = [:]) {
        self.ok = ok; self.message = message; self.fields = fields
    }

    private struct Key: CodingKey {
        var stringValue: String; var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        ok = try c.decodeIfPresent(Bool.self, forKey: Key(stringValue: "ok")) ?? false
        message = try c.decodeIfPresent(String.self, forKey: Key(stringValue: "message")) ?? ""
        var f: [String: JSONValue] = [:]
        for k in c.allKeys where k.stringValue != "ok" && k.stringValue != "message" {
            f[k.stringValue] = try c.decode(JSONValue.self, forKey: k)
        }
        fields = f
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        for (k, v) in fields where k != "ok" && k != "message" { try c.encode(v, forKey: Key(stringValue: k)) }
        try c.encode(ok, forKey: Key(stringValue: "ok"))
        try c.encode(message, forKey: Key(stringValue: "message"))
    }
}

/// An operator command on the admin API: `POST /admin/<action>` with a JSON object body.
/// Parsed strictly (unknown parameters are refused) so a typo in a script fails loudly.
public enum AdminCommand: Sendable, Equatable, CustomStringConvertible {
    /// Planned handover to the peer (design.md §2 "Switchover"); zero loss.
    case switchover
    /// Promote this node; `force` skips the quorum and up-to-date checks (disasters only).
    case promote(force: Bool)
    /// Demote this node to secondary.
    case demote
    /// Take this node out of candidacy (on: it is never elected) or put it back (off).
    case maintenance(on: Bool)
    /// Compare chunk hashes with the peer; `repair` then resyncs exactly the mismatched chunks.
    case verify(repair: Bool)
    /// Make this (inconsistent) node's data the pair's in a new generation; the peer gets a
    /// full sync, or with `assumeClean` a fresh peer adopts the generation without one.
    case bootstrap(assumeClean: Bool)
    /// Discard this node's data: it becomes a full-sync target of its up-to-date peer.
    case invalidate
    /// Count the arbitrator's answers again after its state was rebuilt (a new incarnation).
    case acceptArbitrator
    /// Resync chunks found out of sync (by verify or the bitmap).
    case resync
    /// Resolve a split brain by discarding one side's changes since divergence.
    case resolve(discard: DiscardSide)
    /// Forget a resource's failures on this node (all resources when nil): restart count
    /// back to 0, a failed state re-probed (`crm_resource --cleanup`).
    case resourceCleanup(name: String?)

    public enum DiscardSide: String, Sendable, CaseIterable { case local, peer }

    public static let actions = ["switchover", "promote", "demote", "maintenance", "verify", "resync", "resolve", "bootstrap", "invalidate", "arbitrator_accept", "resource_cleanup"]

    public var action: String {
        switch self {
        case .switchover: return "switchover"
        case .promote: return "promote"
        case .demote: return "demote"
        case .maintenance: return "maintenance"
        case .verify: return "verify"
        case .resync: return "resync"
        case .resolve: return "resolve"
        case .bootstrap: return "bootstrap"
        case .invalidate: return "invalidate"
        case .acceptArbitrator: return "arbitrator_accept"
        case .resourceCleanup: return "resource_cleanup"
        }
    }

    /// The request body for this command.
    public var params: [String: JSONValue] {
        switch self {
        case .promote(let force): return force ? ["force": .bool(true)] : [:]
        case .maintenance(let on): return ["on": .bool(on)]
        case .resolve(let side): return ["discard": .string(side.rawValue)]
        case .verify(let repair): return repair ? ["repair": .bool(true)] : [:]
        case .bootstrap(let clean): return clean ? ["assume_clean": .bool(true)] : [:]
        case .resourceCleanup(let name): return name.map { ["resource": .string($0)] } ?? [:]
        case .switchover, .demote, .resync, .invalidate, .acceptArbitrator: return [:]
        }
    }

    public var description: String {
        params.isEmpty ? action : "\(action) \(JSONValue.object(params))"
    }

    /// Parse an action name and its parameters; the error text is meant for a 400 reply.
    public static func parse(action: String, params: [String: JSONValue]) throws -> AdminCommand {
        func only(_ allowed: Set<String>) throws {
            if let extra = params.keys.sorted().first(where: { !allowed.contains($0) }) {
                throw AdminCommandError("\(action): unknown parameter '\(extra)'" + (allowed.isEmpty ? "; it takes none" : "; allowed: \(allowed.sorted().joined(separator: ", "))"))
            }
        }
        func bool(_ k: String) throws -> Bool? {
            guard let v = params[k] else { return nil }
            guard let b = v.boolValue else { throw AdminCommandError("\(action): '\(k)' must be true or false, got \(v)") }
            return b
        }
        switch action {
        case "switchover": try only([]); return .switchover
        case "promote": try only(["force"]); return .promote(force: try bool("force") ?? false)
        case "demote": try only([]); return .demote
        case "maintenance":
            try only(["on"])
            guard let on = try bool("on") else { throw AdminCommandError("maintenance: 'on' (true or false) is required") }
            return .maintenance(on: on)
        case "verify": try only(["repair"]); return .verify(repair: try bool("repair") ?? false)
        case "bootstrap": try only(["assume_clean"]); return .bootstrap(assumeClean: try bool("assume_clean") ?? false)
        case "invalidate": try only([]); return .invalidate
        case "arbitrator_accept": try only([]); return .acceptArbitrator
        case "resync": try only([]); return .resync
        case "resource_cleanup":
            try only(["resource"])
            guard let v = params["resource"] else { return .resourceCleanup(name: nil) }
            guard let name = v.stringValue, !name.isEmpty else { throw AdminCommandError("resource_cleanup: 'resource' must be a resource's name, got \(v)") }
            return .resourceCleanup(name: name)
        case "resolve":
            try only(["discard"])
            guard let s = params["discard"]?.stringValue, let side = DiscardSide(rawValue: s) else {
                throw AdminCommandError("resolve: 'discard' must be \"local\" or \"peer\"")
            }
            return .resolve(discard: side)
        default:
            throw AdminCommandError("unknown admin action '\(action)'")
        }
    }
}

public struct AdminCommandError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}
