import ArgumentParser
import Foundation
import HAShell

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the cluster: who is master and at which service address, states, epochs.",
        discussion: "Exit status 0 when the first endpoint answered, 1 otherwise.")

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Print the /status JSON document (an array when several --endpoint are given).")
    var json = false

    @Flag(name: .long, help: "Do not follow the peer's status URL named in the document.")
    var noPeer = false

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: false)
            if json {
                let views = client.discover(followPeers: false)
                if let bad = views.first(where: { $0.raw == nil }) {
                    throw HactlError("\(bad.endpoint): \(bad.error ?? "no answer")")
                }
                // Documents as served (node or arbitrator), one object or an array.
                let raws = views.compactMap(\.raw).map { String(decoding: $0, as: UTF8.self) }
                print(raws.count == 1 ? raws[0] : "[\n" + raws.joined(separator: ",\n") + "\n]")
                return
            }
            let views = client.discover(followPeers: !noPeer)
            let nodes = views.filter { $0.arbitrator == nil }
            if !nodes.isEmpty { print(StatusTable.render(nodes), terminator: "") }
            for w in views.compactMap(\.arbitrator) { print(StatusTable.render(arbitrator: w), terminator: "") }
            if views.first?.raw == nil { throw ExitCode(1) }
        }
    }
}

/// The human view of `hactl status`: a headline naming the master and its service
/// address, one row per node (master marked `*`), then anything needing attention.
enum StatusTable {
    static func render(_ unsorted: [NodeView]) -> String {
        let views = unsorted.sorted { $0.name < $1.name }
        let docs = views.compactMap(\.document)
        var out = ""
        if let first = docs.first {
            let master = docs.compactMap(\.master).first ?? first.master
            let epoch = docs.map(\.epoch).max() ?? first.epoch
            if let master {
                out += "cluster \(first.cluster): master \(master.node) at \(master.serviceAddress), epoch \(epoch)\n"
            } else {
                out += "cluster \(first.cluster): NO MASTER, epoch \(epoch)\n"
            }
        } else {
            out += "cluster unknown: no node answered\n"
        }

        let header = ["", "NODE", "ROLE", "DISK", "LINK", "OUT-OF-SYNC", "LEASE", "QUORUM", "ARBITRATOR", "SERVICE", "EPOCH", "GEN"]
        var rows: [[String]] = [header]
        for v in views {
            guard let d = v.document else {
                rows.append(["", v.name, "unreachable", "-", "-", "-", "-", "-", "-", "-", "-", "-"])
                continue
            }
            rows.append([
                d.role == .primary ? "*" : "",
                d.node,
                d.role.rawValue + (d.maintenance ? " (maint)" : ""),
                d.diskState.rawValue,
                d.peer.replication.rawValue,
                ByteSize.format(d.outOfSyncBytes),
                d.role == .primary ? "\(d.leaseValidMs) ms" : "-",
                d.quorum ? "yes" : "NO",
                d.arbitrator.reachable ? "up" : "DOWN",
                d.serviceAddress,
                String(d.epoch),
                d.generation,
            ])
        }
        out += table(rows)

        var notes: [String] = []
        for v in views {
            guard let d = v.document else {
                notes.append("\(v.name): \(v.endpoint) did not answer: \(v.error ?? "?")")
                continue
            }
            if let sb = d.splitBrain { notes.append("\(d.node): SPLIT BRAIN: \(sb) — see `hactl resolve`") }
            if let why = d.whyNotPromoted { notes.append("\(d.node): not promoted: \(why)") }
            if let refused = d.arbitrator.refused { notes.append("\(d.node): ARBITRATOR NOT COUNTED: \(refused)") }
            if let note = d.diskNote { notes.append("\(d.node): disk \(d.diskState.rawValue): \(note)") }
            if let r = d.resync {
                notes.append("\(d.node): \(r.kind) \(ProgressBar.bar(r.fraction, width: 20)) \(ProgressBar.percent(r.fraction)) \(ByteSize.format(r.doneBytes)) / \(ByteSize.format(r.totalBytes))")
            }
            if d.maintenance { notes.append("\(d.node): in maintenance: never a candidate (`hactl --endpoint … maintenance off` to end)") }
            for r in d.resources where r.state != "running" && r.state != "stopped" || r.restarts > 0 {
                notes.append("\(d.node): resource \(r.name) \(r.state), \(r.restarts) restart(s)")
            }
            if d.role == .primary && !d.resources.isEmpty {
                notes.append("\(d.node): resources " + d.resources.map { "\($0.name) \($0.state)" }.joined(separator: ", "))
            }
        }
        let primaries = views.compactMap(\.document).filter { $0.role == .primary }
        if primaries.count > 1 {
            notes.append("WARNING: \(primaries.count) nodes report primary (\(primaries.map(\.node).joined(separator: ", "))); the highest epoch holds the lease")
        }
        for n in notes { out += "  " + n + "\n" }
        return out
    }

    /// The arbitrator's view: one row per cluster it serves.
    static func render(arbitrator w: ArbitratorStatusDocument) -> String {
        var rows: [[String]] = [["CLUSTER", "MASTER", "EPOCH", "OUTDATED", "LAST CONTACT"]]
        for c in w.clusters.sorted(by: { $0.name < $1.name }) {
            let outdated = c.outdated.map { "\($0.node)@\($0.epoch)" }.joined(separator: ",")
            let contact = c.lastContactMs.keys.sorted().map { node in
                "\(node) " + (c.lastContactMs[node].flatMap { $0 }.map { "\($0) ms" } ?? "never")
            }.joined(separator: ", ")
            rows.append([c.name, c.master ?? "none", String(c.epoch), outdated.isEmpty ? "-" : outdated, contact])
        }
        return "arbitrator (version \(w.version)): \(w.clusters.count) cluster(s)\n" + table(rows)
    }

    /// Left-aligned columns separated by two spaces.
    static func table(_ rows: [[String]]) -> String {
        let cols = rows.map(\.count).max() ?? 0
        var widths = Array(repeating: 0, count: cols)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        return rows.map { r in
            r.enumerated().map { i, c in c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").replacingOccurrences(of: "\\s+$", with: "", options: .regularExpression)
        }.joined(separator: "\n") + "\n"
    }
}
