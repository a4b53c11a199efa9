import HACore

/// The identity stamp kept on the backing store itself, in a reserved 4 KiB area just past
/// the volume (DRBD keeps its internal metadata at the end of the device for the same reason):
/// metadata describes *one* store, and the label proves at every start that the store at the
/// path is still that store (docs/replication.md "Disk identity").
///
/// | field | size |
/// |-------|------|
/// | magic `HAMGRLB1` | 8 |
/// | format | 4 |
/// | disk id | 8 |
/// | volume size | 8 |
/// | current generation, previous generation | 8 + 8 |
/// | cluster name, node name | 2 + n each |
///
/// sealed with SHA-256 like the metadata slots. Clients never reach it: the volume ends
/// before `offset(forVolumeBytes:)`.
public struct DiskLabel: Hashable, Sendable {
    public var diskID: UInt64
    public var cluster: String
    public var node: NodeID
    public var sizeBytes: UInt64
    /// The generation the store held when the label was last written, and the one before:
    /// the label is rewritten *before* a header with a new current generation, so a crash in
    /// between leaves the header's generation as `previous`.
    public var current: GenerationID
    public var previous: GenerationID

    public init(diskID: UInt64, cluster: String, node: NodeID, sizeBytes: UInt64, current: GenerationID, previous: GenerationID = .none) {
        self.diskID = diskID; self.cluster = cluster; self.node = node; self.sizeBytes = sizeBytes
        self.current = current; self.previous = previous
    }

    public static let bytes = 4096
    static let magic: [UInt8] = Array("HAMGRLB1".utf8)
    static let format: UInt32 = 1

    /// Where the label lives: the first 4 KiB boundary at or after the volume's end.
    public static func offset(forVolumeBytes size: UInt64) -> UInt64 { (size + 4095) / 4096 * 4096 }
    /// The store size a volume of `size` bytes needs, label included.
    public static func storeBytes(forVolumeBytes size: UInt64) -> UInt64 { offset(forVolumeBytes: size) + UInt64(bytes) }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: Self.bytes)
        w.bytes(Self.magic)
        w.u32(Self.format)
        w.u64(diskID)
        w.u64(sizeBytes)
        w.u64(current.raw)
        w.u64(previous.raw)
        for s in [cluster, node.name] {
            let b = Array(s.utf8.prefix(1024))
            w.u32(UInt32(b.count)); w.bytes(b)
        }
        return MetadataLayout.seal(w.out)
    }

    /// What the label area of a store holds.
    public enum Reading: Hashable, Sendable {
        /// Every byte zero: no label was ever written (a new disk, a new sparse file).
        case blank
        case label(DiskLabel)
        /// Bytes that are not a hamgr label: another device's data, or a damaged label.
        case foreign
    }

    public static func read(_ area: [UInt8]) -> Reading {
        if area.allSatisfy({ $0 == 0 }) { return .blank }
        guard MetadataLayout.isSealed(area) else { return .foreign }
        var r = ByteReader(area)
        guard r.bytes(8) == magic, r.u32() == format, let id = r.u64(), let size = r.u64(), let cur = r.u64(), let prev = r.u64(),
              let cl = r.u32(), cl <= 1024, let cb = r.bytes(Int(cl)), let nl = r.u32(), nl <= 1024, let nb = r.bytes(Int(nl)),
              let cluster = strictUTF8String(cb), let nodeName = strictUTF8String(nb)
        else { return .foreign }
        return .label(DiskLabel(diskID: id, cluster: cluster, node: NodeID(nodeName), sizeBytes: size, current: GenerationID(cur), previous: GenerationID(prev)))
    }
}

/// What a node does with its store at start, from its metadata (if any) and the label found
/// on the store. Pure: `ReplicatedVolume` reads, decides here, then acts.
public enum DiskIdentity: Hashable, Sendable {
    /// The store is the one the metadata describes.
    case matches
    /// The metadata is kept and the label (re)written with the metadata's identity: format-1
    /// metadata seen for the first time, or a label one generation behind (a crash between
    /// the label and the header write).
    case stamp(String)
    /// Another store than the metadata describes (replaced or recreated disk, restored image):
    /// new identity, `inconsistent`, a full-sync target.
    case replaced(String)
    /// No metadata yet: create it (inconsistent, fresh generation), keeping the label's
    /// identity if the store already carries one of this node.
    case new(keepDiskID: UInt64?)
    /// Never touch this store: it carries another node's label or data that is not ours.
    case refuse(String)

    public static func decide(header: MetadataHeader?, reading: Reading, path: String, cluster: String, node: NodeID) -> DiskIdentity {
        switch reading {
        case .foreign:
            return .refuse("\(path): the identity area at the end of the store holds data that is not a hamgr label (wrong device?); "
                           + "if this store is meant for this node, zero its last 4 KiB and start again: it then joins as a full-sync target")
        case .label(let l) where l.cluster != cluster || l.node != node:
            return .refuse("\(path) belongs to node \(l.node) of cluster \(l.cluster) (its identity label says so); refusing to use it as \(node) of \(cluster)")
        case .blank:
            guard let h = header else { return .new(keepDiskID: nil) }
            if h.diskID == 0 { return .stamp("metadata format 1 has no disk identity: stamping \(path) with one") }
            return .replaced("\(path) carries no identity label: a new, replaced or recreated store")
        case .label(let l):
            guard let h = header else { return .new(keepDiskID: l.diskID) }
            if h.diskID == 0 { return .stamp("metadata format 1 has no disk identity: adopting the label on \(path)") }
            guard l.diskID == h.diskID else {
                return .replaced("\(path) is another store (label \(hex(l.diskID)), the metadata describes \(hex(h.diskID)))")
            }
            if l.current == h.generations.current { return .matches }
            if l.previous == h.generations.current || l.current.isNone {
                return .stamp("\(path): label one generation ahead of the metadata (interrupted update)")
            }
            return .replaced("\(path) holds generation \(l.current), the metadata \(h.generations.current): a restored or rolled-back image")
        }
    }

    public typealias Reading = DiskLabel.Reading

    static func hex(_ v: UInt64) -> String { String(v, radix: 16) }
}
