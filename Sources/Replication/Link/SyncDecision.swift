import HACore

/// What one side tells the other in the handshake, as far as the sync decision needs it.
public struct SyncSide: Hashable, Sendable {
    public var node: NodeID
    public var generations: DataGenerations
    public var diskState: DiskState
    public var role: Role
    /// The side has out-of-sync chunks of its own (bitmap bits or crash AL extents).
    public var hasDirtyChunks: Bool
    /// The side was primary and crashed; its AL extents are in its dirty set.
    public var crashedPrimary: Bool
    /// A crashed primary whose peer held every write it acknowledged (protocol B or C): the
    /// peer's copy of its crash extents is the one to keep.
    public var crashCopyOnPeer: Bool
    /// The operator chose to discard this side's changes after a split brain.
    public var discardLocal: Bool
    public var sizeBytes: UInt64
    public var chunkBytes: Int
    /// Fresh metadata: created on this store, no data adopted since.
    public var fresh: Bool
    /// Fresh metadata on a store that provably reads as zeroes (sparse file, nothing written).
    public var emptyFresh: Bool
    /// Bootstrapped with `--assume-clean` and not written alone since: a fresh peer may adopt
    /// this generation without a sync.
    public var assumeClean: Bool
    /// Primary since its process opened the store (demoted without a crash): with the same
    /// generation its dirty chunks hold writes it acknowledged (protocol A: possibly only
    /// queued to the peer), newer than anything the other side holds there.
    public var wasPrimary: Bool
    /// The newest epoch this side was primary in (zero: never, or unknown).
    public var primaryEpoch: Epoch

    public init(node: NodeID, generations: DataGenerations, diskState: DiskState, role: Role,
                hasDirtyChunks: Bool = false, crashedPrimary: Bool = false, crashCopyOnPeer: Bool = false, discardLocal: Bool = false,
                sizeBytes: UInt64, chunkBytes: Int, fresh: Bool = false, emptyFresh: Bool = false, assumeClean: Bool = false,
                wasPrimary: Bool = false, primaryEpoch: Epoch = .zero) {
        self.node = node; self.generations = generations; self.diskState = diskState; self.role = role
        self.hasDirtyChunks = hasDirtyChunks; self.crashedPrimary = crashedPrimary; self.crashCopyOnPeer = crashedPrimary && crashCopyOnPeer; self.discardLocal = discardLocal
        self.sizeBytes = sizeBytes; self.chunkBytes = chunkBytes; self.fresh = fresh || emptyFresh; self.emptyFresh = emptyFresh; self.assumeClean = assumeClean
        self.wasPrimary = wasPrimary
        self.primaryEpoch = primaryEpoch
    }
}

/// How much a resync sends.
public enum SyncScope: Hashable, Sendable {
    /// The source's bitmap ∪ the target's dirty chunks.
    case bitmap
    /// Every chunk (no usable bitmap relation).
    case full
}

/// The outcome of comparing generations on connect (design.md §1, §3; DRBD's UUID rules).
/// Computed independently on both sides; `decide(me:peer:)` and `decide(peer, me)` always
/// mirror each other, so no decision message is needed.
public enum SyncDecision: Hashable, Sendable, CustomStringConvertible {
    case inSync
    /// No data moves and both sides end up to date in this generation: two fresh, provably
    /// empty stores, or a fresh empty store joining a peer bootstrapped with `--assume-clean`.
    case adoptClean(GenerationID)
    case becomeSource(SyncScope)
    case becomeTarget(SyncScope)
    /// Both sides changed data since they parted: refuse, touch nothing, report.
    case splitBrain(String)
    /// The link cannot be used (mismatched volume, no consistent side, both primary …).
    case refuse(String)

    public var description: String {
        switch self {
        case .inSync: return "in sync"
        case .adoptClean(let g): return "both clean: up to date in generation \(g) without a sync"
        case .becomeSource(let s): return "sync source (\(s))"
        case .becomeTarget(let s): return "sync target (\(s))"
        case .splitBrain(let why): return "split brain: \(why)"
        case .refuse(let why): return "refused: \(why)"
        }
    }

    public var mirrored: SyncDecision {
        switch self {
        case .becomeSource(let s): return .becomeTarget(s)
        case .becomeTarget(let s): return .becomeSource(s)
        default: return self
        }
    }

    /// Pure and total: every pair of sides gets exactly one answer.
    public static func decide(me: SyncSide, peer: SyncSide) -> SyncDecision {
        // Evaluate from the side whose name sorts first so both ends run the same code path.
        if peer.node < me.node { return decideOrdered(peer, me).mirrored }
        return decideOrdered(me, peer)
    }

    /// `a` is the side whose name sorts first; the answer is from `a`'s point of view.
    private static func decideOrdered(_ a: SyncSide, _ b: SyncSide) -> SyncDecision {
        guard a.sizeBytes == b.sizeBytes, a.chunkBytes == b.chunkBytes else {
            return .refuse("volume geometry differs: \(a.node) has \(a.sizeBytes) bytes in \(a.chunkBytes)-byte chunks, \(b.node) \(b.sizeBytes) in \(b.chunkBytes)")
        }
        if a.diskState == .diskless || b.diskState == .diskless { return .refuse("a side is diskless") }
        let ga = a.generations, gb = b.generations
        let aEmpty = a.diskState == .inconsistent, bEmpty = b.diskState == .inconsistent
        // Neither side holds data anyone may rely on: only two provably empty fresh stores
        // pair up by themselves; anything else waits for the operator's bootstrap.
        if aEmpty && bEmpty {
            if a.emptyFresh && b.emptyFresh && a.role == .secondary && b.role == .secondary && !ga.current.isNone {
                return .adoptClean(ga.current)
            }
            return .refuse("neither side has consistent data (\(a.node) and \(b.node) are inconsistent); "
                           + "choose the node whose data to keep: hactl bootstrap --source NODE")
        }
        if ga.current.isNone || gb.current.isNone { return .refuse("a side has no data generation") }
        // Exactly one side holds consistent data: it is the source whatever the generations
        // say, but only if it is up to date; a resync never makes a disk up to date from an
        // outdated one.
        if aEmpty != bEmpty {
            let (s, t) = aEmpty ? (b, a) : (a, b)
            guard s.diskState == .upToDate else {
                return .refuse("\(t.node) needs a sync but \(s.node), the only side with data, is \(s.diskState)")
            }
            if t.role == .primary { return .refuse("primary \(t.node) is inconsistent") }
            // The operator declared the stores identical (`bootstrap --assume-clean`): a fresh
            // peer takes the generation as it is, as long as the source wrote nothing alone.
            if t.fresh && s.assumeClean && !s.hasDirtyChunks { return .adoptClean(s.generations.current) }
            let related = s.generations.current == t.generations.current || s.generations.bitmap == t.generations.current
            let scope: SyncScope = related ? .bitmap : .full
            return aEmpty ? .becomeTarget(scope) : .becomeSource(scope)
        }

        let result: SyncDecision
        if ga.current == gb.current {
            if a.role == .primary && b.role == .primary { return .refuse("both sides are primary") }
            if !a.hasDirtyChunks && !b.hasDirtyChunks { return .inSync }
            else if a.role != b.role { result = a.role == .primary ? .becomeSource(.bitmap) : .becomeTarget(.bitmap) }
            // Two secondaries, one a crashed primary under protocol B or C: its power cut may
            // have taken acknowledged writes it had not flushed, while the peer received (B) or
            // wrote (C) every one before the acknowledgement. The peer's copy of the crash
            // extents is the one with every acknowledged write; the crashed side's own extra
            // writes there were never acknowledged. (A later primary in this generation would
            // win below anyway: it holds these writes too, and newer ones.)
            else if a.crashCopyOnPeer != b.crashCopyOnPeer, (a.crashCopyOnPeer ? b : a).diskState == .upToDate,
                    !(a.crashCopyOnPeer ? b : a).crashedPrimary {
                result = a.crashCopyOnPeer ? .becomeTarget(.bitmap) : .becomeSource(.bitmap)
            }
            // Two secondaries: the later primary wrote after the earlier one (epochs order the
            // masters), so its copy of any chunk both touched is the newer (simulator seed 2618:
            // a crashed primary of epoch 2 overwrote the writes its successor of epoch 3
            // acknowledged before an operator demoted it).
            else if a.primaryEpoch != b.primaryEpoch { result = a.primaryEpoch > b.primaryEpoch ? .becomeSource(.bitmap) : .becomeTarget(.bitmap) }
            else if a.crashedPrimary != b.crashedPrimary { result = a.crashedPrimary ? .becomeSource(.bitmap) : .becomeTarget(.bitmap) }
            // Two secondaries: the one that was primary (and stepped down without a crash or
            // a takeover that branched) holds the newest writes; the name would pick the
            // other side and overwrite acknowledged writes (simulator seed 1044, protocol A).
            else if a.wasPrimary != b.wasPrimary { result = a.wasPrimary ? .becomeSource(.bitmap) : .becomeTarget(.bitmap) }
            else if a.hasDirtyChunks != b.hasDirtyChunks { result = a.hasDirtyChunks ? .becomeSource(.bitmap) : .becomeTarget(.bitmap) }
            else { result = .becomeSource(.bitmap) }  // a sorts first
        } else if !ga.bitmap.isNone && ga.bitmap == gb.bitmap {
            // Both branched from the same generation and both wrote: divergence.
            switch (a.discardLocal, b.discardLocal) {
            case (true, false): result = .becomeTarget(.bitmap)
            case (false, true): result = .becomeSource(.bitmap)
            default: return .splitBrain("\(a.node) (\(ga.current)) and \(b.node) (\(gb.current)) both changed data since generation \(ga.bitmap)")
            }
        } else if !ga.bitmap.isNone && ga.bitmap == gb.current {
            result = .becomeSource(.bitmap)
        } else if !gb.bitmap.isNone && gb.bitmap == ga.current {
            result = .becomeTarget(.bitmap)
        } else if ga.history.contains(gb.current) {
            result = .becomeSource(.full)
        } else if gb.history.contains(ga.current) {
            result = .becomeTarget(.full)
        } else {
            let shared = [ga.bitmap] + ga.history
            let related = shared.contains { gb.knows($0) }
            switch (a.discardLocal, b.discardLocal) {
            case (true, false): result = .becomeTarget(.full)
            case (false, true): result = .becomeSource(.full)
            default:
                return .splitBrain(related
                    ? "\(a.node) (\(ga.current)) and \(b.node) (\(gb.current)) diverged from a common generation"
                    : "\(a.node) (\(ga.current)) and \(b.node) (\(gb.current)) hold unrelated data")
            }
        }
        // The source must hold consistent data and a primary is never overwritten by resync.
        switch result {
        case .becomeSource:
            if a.diskState == .inconsistent { return .refuse("\(a.node) would be sync source but is inconsistent") }
            if b.role == .primary { return .refuse("primary \(b.node) would become sync target of \(a.node)") }
        case .becomeTarget:
            if b.diskState == .inconsistent { return .refuse("\(b.node) would be sync source but is inconsistent") }
            if a.role == .primary { return .refuse("primary \(a.node) would become sync target of \(b.node)") }
        default: break
        }
        return result
    }
}
