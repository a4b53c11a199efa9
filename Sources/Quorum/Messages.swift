import HACore

/// What a candidate tells the voters about itself (design.md §2 "Election").
public struct VoteRequest: Equatable, Sendable {
    /// The epoch the candidate wants to be master of.
    public var epoch: Epoch
    /// Identifies this attempt; the reply echoes it so the candidate anchors its lease at the
    /// moment this attempt was sent.
    public var round: UInt64
    public var disk: DiskState
    public var generations: DataGenerations
    /// Forced promotion (`hactl promote --force`): voters skip the data checks, never the
    /// lease and epoch checks.
    public var force: Bool

    public init(epoch: Epoch, round: UInt64, disk: DiskState, generations: DataGenerations, force: Bool = false) {
        self.epoch = epoch; self.round = round; self.disk = disk; self.generations = generations; self.force = force
    }
}

/// A secondary's periodic liveness report to its peer (the arbitrator never gets these).
public struct Heartbeat: Equatable, Sendable {
    /// The sender's promised epoch.
    public var epoch: Epoch
    /// The master the sender follows, if any.
    public var master: NodeID?
    public var disk: DiskState
    public var generations: DataGenerations
    public var maintenance: Bool

    public init(epoch: Epoch, master: NodeID?, disk: DiskState, generations: DataGenerations, maintenance: Bool) {
        self.epoch = epoch; self.master = master; self.disk = disk; self.generations = generations; self.maintenance = maintenance
    }
}

/// Why a voter refused a vote. Carried in the reply so `status.whyNotPromoted` can say it.
public enum VoteRefusal: Equatable, Sendable, CustomStringConvertible {
    /// The voter promised a newer epoch (see the reply's `promised`).
    case staleEpoch
    /// The voter already voted for (or follows) another node in this epoch.
    case alreadyVoted(NodeID)
    /// The lease this voter granted to `holder` has not expired on its clock yet.
    case leaseHeld(holder: NodeID, remainingMilliseconds: UInt32)
    /// The voter restarted less than a lease ago and may have granted one it forgot.
    case restartQuarantine(remainingMilliseconds: UInt32)
    /// The voter is the master and its own lease is valid.
    case isMaster
    case notUpToDate(DiskState)
    /// The arbitrator recorded the candidate as outdated by the master of `epoch`.
    case outdated(at: Epoch)
    /// The candidate's data is behind data the voter knows of.
    case dataBehind
    /// Neither side's generations contain the other's: split brain.
    case diverged
    /// The voter is the candidate's peer and is in maintenance... or otherwise unwilling.
    case other(String)

    public var description: String {
        switch self {
        case .staleEpoch: return "it promised a newer epoch"
        case .alreadyVoted(let n): return "it already voted for \(n) in this epoch"
        case .leaseHeld(let h, let ms): return "the lease it granted to \(h) runs \(ms) ms more"
        case .restartQuarantine(let ms): return "it restarted recently (quarantine \(ms) ms more)"
        case .isMaster: return "it is the master and holds a valid lease"
        case .notUpToDate(let d): return "candidate disk is \(d.rawValue)"
        case .outdated(let e): return "candidate is outdated at epoch \(e)"
        case .dataBehind: return "candidate data is behind"
        case .diverged: return "candidate data diverged (split brain)"
        case .other(let s): return s
        }
    }
}

/// Every message of the quorum protocol (design.md §2). Compact binary, bounded; see
/// docs/quorum-protocol.md for the list and who sends what.
public enum QuorumMessage: Equatable, Sendable {
    /// Master → peer and arbitrator, every renew interval. `generation` is the master's
    /// current data generation, so the arbitrator knows what "not behind" means.
    case renew(epoch: Epoch, seq: UInt64, generation: GenerationID)
    /// Voter → master. `promised` is the voter's promised epoch (tells a deposed master).
    case renewReply(epoch: Epoch, seq: UInt64, granted: Bool, promised: Epoch)
    /// Candidate → peer and arbitrator.
    case voteRequest(VoteRequest)
    /// Voter → candidate; `refusal` is nil when the vote is granted.
    case voteReply(epoch: Epoch, round: UInt64, promised: Epoch, refusal: VoteRefusal?)
    /// Master → arbitrator: record `peer` as outdated before I acknowledge writes without it.
    /// `instance` orders the marks of one epoch so a late message never undoes a newer one.
    case outdate(peer: NodeID, epoch: Epoch, instance: UInt64)
    case outdateReply(peer: NodeID, epoch: Epoch, instance: UInt64, granted: Bool, promised: Epoch)
    /// Master → arbitrator: `peer` is in sync again; clear every mark up to (epoch, instance).
    case clearOutdate(peer: NodeID, epoch: Epoch, instance: UInt64)
    case clearOutdateReply(peer: NodeID, epoch: Epoch, instance: UInt64)
    /// Master → peer and arbitrator after closing its write gate: the lease of `epoch` is given
    /// up. With `handoverTo` (switchover) the sender has also voted for that node in epoch+1.
    case release(epoch: Epoch, handoverTo: NodeID?)
    /// Secondary → peer, every renew interval.
    case heartbeat(Heartbeat)
    /// Node → arbitrator, when its link comes up: "which state are you?", so a node that takes
    /// no part in leases or elections (a backup) knows the arbitrator's incarnation before it
    /// ever needs its vote.
    case identify
    /// Arbitrator → node: the answer to `identify` (the incarnation is in the stamp).
    case identifyReply(promised: Epoch)
    /// Arbitrator → node: every arbitrator reply travels in this wrapper. `incarnation` names
    /// the arbitrator's per-cluster state (random, created with the state file by
    /// `hamgr arbitrator --init`); a node that knows another incarnation does not count the
    /// wrapped grant (docs/quorum-protocol.md "Arbitrator continuity"). Never nested.
    indirect case stamped(incarnation: UInt64, QuorumMessage)
}

extension QuorumMessage {
    /// The message inside an arbitrator's incarnation stamp (itself when not stamped).
    public var unstamped: QuorumMessage {
        if case let .stamped(_, inner) = self { return inner }
        return self
    }
}

/// Garbage on the wire. Never a crash: the shell logs it and drops the message.
public struct QuorumDecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "bad quorum message: \(reason)" }
}

extension QuorumMessage {
    /// No valid message is longer (node names are at most 255 bytes).
    public static let maxEncodedBytes = 1024

    private enum Tag: UInt8 {
        case renew = 1, renewReply, voteRequest, voteReply, outdate, outdateReply, clearOutdate, clearOutdateReply, release, heartbeat,
             stamped, identify, identifyReply
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case let .renew(e, seq, g):
            w.u8(Tag.renew.rawValue); w.epoch(e); w.u64(seq); w.u64(g.raw)
        case let .renewReply(e, seq, granted, promised):
            w.u8(Tag.renewReply.rawValue); w.epoch(e); w.u64(seq); w.bool(granted); w.epoch(promised)
        case let .voteRequest(r):
            w.u8(Tag.voteRequest.rawValue); w.epoch(r.epoch); w.u64(r.round); w.disk(r.disk); w.generations(r.generations); w.bool(r.force)
        case let .voteReply(e, round, promised, refusal):
            w.u8(Tag.voteReply.rawValue); w.epoch(e); w.u64(round); w.epoch(promised); w.refusal(refusal)
        case let .outdate(p, e, i):
            w.u8(Tag.outdate.rawValue); w.node(p); w.epoch(e); w.u64(i)
        case let .outdateReply(p, e, i, granted, promised):
            w.u8(Tag.outdateReply.rawValue); w.node(p); w.epoch(e); w.u64(i); w.bool(granted); w.epoch(promised)
        case let .clearOutdate(p, e, i):
            w.u8(Tag.clearOutdate.rawValue); w.node(p); w.epoch(e); w.u64(i)
        case let .clearOutdateReply(p, e, i):
            w.u8(Tag.clearOutdateReply.rawValue); w.node(p); w.epoch(e); w.u64(i)
        case let .release(e, to):
            w.u8(Tag.release.rawValue); w.epoch(e); w.optionalNode(to)
        case let .heartbeat(h):
            w.u8(Tag.heartbeat.rawValue); w.epoch(h.epoch); w.optionalNode(h.master); w.disk(h.disk); w.generations(h.generations); w.bool(h.maintenance)
        case .identify:
            w.u8(Tag.identify.rawValue)
        case let .identifyReply(promised):
            w.u8(Tag.identifyReply.rawValue); w.epoch(promised)
        case let .stamped(incarnation, inner):
            w.u8(Tag.stamped.rawValue); w.u64(incarnation)
            // Only a plain message is wrapped (the arbitrator stamps each reply once); a
            // nested wrapper would not decode, so it is flattened here rather than sent.
            var inner = inner
            while case let .stamped(_, m) = inner { inner = m }
            w.bytes.append(contentsOf: inner.encoded())
        }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> QuorumMessage {
        guard bytes.count <= maxEncodedBytes else { throw QuorumDecodeError("\(bytes.count) bytes exceeds \(maxEncodedBytes)") }
        var r = ByteReader(bytes)
        let raw = try r.u8()
        guard let tag = Tag(rawValue: raw) else { throw QuorumDecodeError("unknown message type \(raw)") }
        let m: QuorumMessage
        switch tag {
        case .renew: m = .renew(epoch: try r.epoch(), seq: try r.u64(), generation: GenerationID(try r.u64()))
        case .renewReply: m = .renewReply(epoch: try r.epoch(), seq: try r.u64(), granted: try r.bool(), promised: try r.epoch())
        case .voteRequest:
            m = .voteRequest(VoteRequest(epoch: try r.epoch(), round: try r.u64(), disk: try r.disk(),
                                         generations: try r.generations(), force: try r.bool()))
        case .voteReply: m = .voteReply(epoch: try r.epoch(), round: try r.u64(), promised: try r.epoch(), refusal: try r.refusal())
        case .outdate: m = .outdate(peer: try r.node(), epoch: try r.epoch(), instance: try r.u64())
        case .outdateReply:
            m = .outdateReply(peer: try r.node(), epoch: try r.epoch(), instance: try r.u64(), granted: try r.bool(), promised: try r.epoch())
        case .clearOutdate: m = .clearOutdate(peer: try r.node(), epoch: try r.epoch(), instance: try r.u64())
        case .clearOutdateReply: m = .clearOutdateReply(peer: try r.node(), epoch: try r.epoch(), instance: try r.u64())
        case .release: m = .release(epoch: try r.epoch(), handoverTo: try r.optionalNode())
        case .heartbeat:
            m = .heartbeat(Heartbeat(epoch: try r.epoch(), master: try r.optionalNode(), disk: try r.disk(),
                                     generations: try r.generations(), maintenance: try r.bool()))
        case .identify: m = .identify
        case .identifyReply: m = .identifyReply(promised: try r.epoch())
        case .stamped:
            let incarnation = try r.u64()
            let rest = Array(bytes[r.index...])
            guard let first = rest.first, first != Tag.stamped.rawValue else { throw QuorumDecodeError("nested or empty stamped message") }
            m = .stamped(incarnation: incarnation, try decode(rest))
            r.index = bytes.count
        }
        guard r.atEnd else { throw QuorumDecodeError("\(r.remaining) trailing bytes after \(tag)") }
        return m
    }
}

// MARK: - Byte-level helpers (big-endian, every length bounded before use)

struct ByteWriter {
    var bytes: [UInt8] = []
    init() { bytes.reserveCapacity(64) }
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(s))) } }
    mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(s))) } }
    mutating func epoch(_ e: Epoch) { u64(e.value) }
    mutating func node(_ n: NodeID) {
        // Names are validated by config to be short; a longer one is cut rather than sent unbounded.
        let utf8 = Array(n.name.utf8.prefix(255))
        u8(UInt8(utf8.count)); bytes.append(contentsOf: utf8)
    }
    mutating func optionalNode(_ n: NodeID?) {
        if let n { bool(true); node(n) } else { bool(false) }
    }
    mutating func disk(_ d: DiskState) { u8(ByteReader.diskCodes.firstIndex(of: d).map(UInt8.init) ?? 0) }
    mutating func generations(_ g: DataGenerations) {
        u64(g.current.raw); u64(g.bitmap.raw)
        let h = g.history.prefix(DataGenerations.historyLimit)
        u8(UInt8(h.count)); for id in h { u64(id.raw) }
    }
    mutating func refusal(_ r: VoteRefusal?) {
        guard let r else { u8(0); return }
        switch r {
        case .staleEpoch: u8(1)
        case .alreadyVoted(let n): u8(2); node(n)
        case let .leaseHeld(h, ms): u8(3); node(h); u32(ms)
        case .restartQuarantine(let ms): u8(4); u32(ms)
        case .isMaster: u8(5)
        case .notUpToDate(let d): u8(6); disk(d)
        case .outdated(let e): u8(7); epoch(e)
        case .dataBehind: u8(8)
        case .diverged: u8(9)
        case .other(let s):
            u8(10); let utf8 = Array(s.utf8.prefix(255)); u8(UInt8(utf8.count)); bytes.append(contentsOf: utf8)
        }
    }
}

struct ByteReader {
    static let diskCodes: [DiskState] = [.upToDate, .outdated, .inconsistent, .diskless]
    let bytes: [UInt8]
    var index = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var atEnd: Bool { index == bytes.count }
    var remaining: Int { bytes.count - index }

    mutating func u8() throws -> UInt8 {
        guard index < bytes.count else { throw QuorumDecodeError("truncated at byte \(index)") }
        defer { index += 1 }
        return bytes[index]
    }
    mutating func bool() throws -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        case let v: throw QuorumDecodeError("boolean byte \(v) at \(index - 1)")
        }
    }
    mutating func u32() throws -> UInt32 {
        guard remaining >= 4 else { throw QuorumDecodeError("truncated at byte \(index)") }
        var v: UInt32 = 0
        for _ in 0..<4 { v = v << 8 | UInt32(bytes[index]); index += 1 }
        return v
    }
    mutating func u64() throws -> UInt64 {
        guard remaining >= 8 else { throw QuorumDecodeError("truncated at byte \(index)") }
        var v: UInt64 = 0
        for _ in 0..<8 { v = v << 8 | UInt64(bytes[index]); index += 1 }
        return v
    }
    mutating func epoch() throws -> Epoch { Epoch(try u64()) }
    mutating func string() throws -> String {
        let n = Int(try u8())
        guard remaining >= n else { throw QuorumDecodeError("string of \(n) bytes truncated at \(index)") }
        let slice = bytes[index..<index + n]
        index += n
        guard let s = String(validating: slice, as: UTF8.self) else { throw QuorumDecodeError("string is not UTF-8") }
        return s
    }
    mutating func node() throws -> NodeID {
        let s = try string()
        guard !s.isEmpty else { throw QuorumDecodeError("empty node name") }
        return NodeID(s)
    }
    mutating func optionalNode() throws -> NodeID? { try bool() ? try node() : nil }
    mutating func disk() throws -> DiskState {
        let v = Int(try u8())
        guard v < Self.diskCodes.count else { throw QuorumDecodeError("disk state \(v)") }
        return Self.diskCodes[v]
    }
    mutating func generations() throws -> DataGenerations {
        let current = GenerationID(try u64()), bitmap = GenerationID(try u64())
        let n = Int(try u8())
        guard n <= DataGenerations.historyLimit else { throw QuorumDecodeError("history of \(n) generations") }
        var h: [GenerationID] = []
        for _ in 0..<n { h.append(GenerationID(try u64())) }
        return DataGenerations(current: current, bitmap: bitmap, history: h)
    }
    mutating func refusal() throws -> VoteRefusal? {
        switch try u8() {
        case 0: return nil
        case 1: return .staleEpoch
        case 2: return .alreadyVoted(try node())
        case 3: return .leaseHeld(holder: try node(), remainingMilliseconds: try u32())
        case 4: return .restartQuarantine(remainingMilliseconds: try u32())
        case 5: return .isMaster
        case 6: return .notUpToDate(try disk())
        case 7: return .outdated(at: try epoch())
        case 8: return .dataBehind
        case 9: return .diverged
        case 10: return .other(try string())
        case let v: throw QuorumDecodeError("refusal code \(v)")
        }
    }
}
