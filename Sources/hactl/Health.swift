import Foundation
import HAShell

/// The verdict of `hactl status` and its exit status (docs/operator-guide.md, "hactl exit
/// status"): the worst condition found wins.
struct ClusterHealth: Equatable {
    enum Verdict: Int32, Comparable {
        /// A master with quorum and a valid lease, the peer connected and in sync, both
        /// disks up to date, no split brain, nothing in maintenance or resyncing.
        case healthy = 0
        /// A master serves, but something is not healthy.
        case degraded = 1
        /// Nobody is primary with a valid lease.
        case noMaster = 2
        /// A node reports a split brain, or two nodes both claim a valid lease.
        case splitBrain = 3
        /// No data node's /status could be read.
        case unknown = 4

        static func < (a: Verdict, b: Verdict) -> Bool { a.rawValue < b.rawValue }

        /// The JSON spelling.
        var key: String { ["healthy", "degraded", "no_master", "split_brain", "unknown"][Int(rawValue)] }
        /// The words of the verdict line.
        var words: String { ["healthy", "degraded", "no master", "split brain", "unknown"][Int(rawValue)] }
    }

    var verdict: Verdict
    /// Every condition found, the worst first.
    var reasons: [String]
    /// The node holding a valid master lease, if any.
    var master: StatusDocument?

    /// "healthy", "degraded: peer b behind by 12 MiB", …
    var line: String { reasons.isEmpty ? verdict.words : verdict.words + ": " + reasons.joined(separator: "; ") }

    /// Judge the cluster from the data nodes' views (arbitrator views are ignored).
    static func assess(_ views: [NodeView]) -> ClusterHealth {
        let nodes = views.filter { $0.arbitrator == nil }
        let docs = nodes.compactMap(\.document).sorted { $0.node < $1.node }
        guard !docs.isEmpty else {
            let why = nodes.map { "\($0.name): \($0.error ?? "no answer")" }
            return ClusterHealth(verdict: .unknown, reasons: why.isEmpty ? ["no data node was asked"] : ["no node answered (" + why.joined(separator: "; ") + ")"])
        }
        var found: [(Verdict, String)] = []
        func note(_ v: Verdict, _ s: String) { if !found.contains(where: { $0.1 == s }) { found.append((v, s)) } }

        // Split brain: reported by a node, or two valid leases at once.
        for d in docs { if let sb = d.splitBrain { note(.splitBrain, "\(d.node) reports \(sb)") } }
        let leased = docs.filter { $0.role == .primary && $0.leaseValidMs > 0 && $0.quorum }
        if leased.count > 1 { note(.splitBrain, "\(leased.map(\.node).joined(separator: " and ")) all hold a valid master lease") }
        let master = leased.max { $0.epoch < $1.epoch }
        let unreachable = nodes.filter { $0.document == nil }

        if let m = master {
            // The master's own state.
            if m.diskState != .upToDate { note(.degraded, "master \(m.node) disk \(m.diskState.rawValue)") }
            // The peer, as the master sees it and as it reports itself.
            let p = m.peer.node
            let peerDoc = docs.first { $0.node == p }
            if let v = unreachable.first(where: { $0.name == p }) {
                note(.degraded, "peer \(p) unreachable from here (\(v.error ?? "no answer"))")
            }
            if !m.peer.reachable || m.peer.replication == .disconnected {
                note(.degraded, "peer \(p) disconnected")
            } else if m.peer.replication == .behind || m.outOfSyncBytes > 0 {
                note(.degraded, "peer \(p) behind by \(ByteSize.format(m.outOfSyncBytes))")
            }
            let peerDisk = peerDoc?.diskState ?? m.peer.diskState
            if let disk = peerDisk, disk != .upToDate { note(.degraded, "peer \(p) disk \(disk.rawValue)") }
            if peerDisk == nil && m.peer.reachable { note(.degraded, "peer \(p) disk state unknown") }
        } else if let claimed = docs.compactMap(\.master).first, !docs.contains(where: { $0.node == claimed.node }) {
            // A secondary names a master whose own status could not be read: it may serve.
            let seen = docs.filter { $0.master?.node == claimed.node }.map(\.node).joined(separator: ", ")
            note(.degraded, "master \(claimed.node) unreachable from here (\(seen) reports it master)")
        } else {
            for d in docs where d.role == .primary {
                note(.noMaster, "\(d.node) is primary without " + (d.quorum ? "a valid lease" : "quorum"))
            }
            for d in docs { if let why = d.whyNotPromoted { note(.noMaster, "\(d.node) not promoted: \(why)") } }
            if found.allSatisfy({ $0.0 != .noMaster }) { note(.noMaster, "no node is primary with a valid lease") }
        }
        for v in unreachable where v.name != master?.peer.node { note(.degraded, "\(v.name) unreachable from here") }

        // What any node reports.
        for d in docs {
            if let r = d.resync { note(.degraded, "\(r.kind) running (\(ProgressBar.percent(r.fraction)) of \(ByteSize.format(r.totalBytes)))") }
            if !d.arbitrator.reachable { note(.degraded, "arbitrator unreachable from \(d.node)") }
            if d.arbitrator.refused != nil { note(.degraded, "arbitrator not counted by \(d.node)") }
            if d.maintenance { note(.degraded, "\(d.node) in maintenance") }
            if let e = d.diskError { note(.degraded, "\(d.node) disk failed: \(e)") }
            if d.role == .primary, d.node != master?.node, master != nil { note(.degraded, "\(d.node) also reports primary (no valid lease)") }
            for r in d.resources where r.state == "failed" { note(.degraded, "resource \(r.name) failed on \(d.node)") }
        }

        let verdict = found.map(\.0).max() ?? .healthy
        let ordered = found.enumerated().sorted { ($0.element.0, -$0.offset) > ($1.element.0, -$1.offset) }.map(\.element.1)
        return ClusterHealth(verdict: verdict, reasons: ordered, master: master)
    }
}
