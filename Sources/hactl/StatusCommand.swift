import ArgumentParser
import Foundation
import HAShell

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the cluster: who is master and at which service address, states, epochs; exit with its health.",
        discussion: """
        Prints the table and a verdict line. Exit status (the worst condition wins): 0 healthy, \
        1 degraded (a master serves but the peer is down, behind or outdated, a resync or \
        verify runs, the arbitrator is unreachable or not counted, a node is in maintenance…), \
        2 no master (nobody primary with a valid lease), 3 split brain, 4 unknown (no data \
        node's /status could be read, or hactl could not ask: bad CA, token or config file), \
        64 usage error. Asking only an arbitrator exits 0 when it answers.
        """)

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Print one JSON document: the verdict, both nodes' /status documents and the arbitrator's.")
    var json = false

    @Flag(name: .long, help: "Do not follow the peer's status URL named in the document.")
    var noPeer = false

    func run() throws {
        try reporting(action: "status", json: json, failure: ClusterHealth.Verdict.unknown.rawValue) {
            let client = try hactl.client(needsToken: false)
            let views = client.discover(followPeers: !noPeer) + client.arbitratorEndpoints.map(client.fetch)
            let nodes = views.filter { $0.arbitrator == nil && !client.arbitratorEndpoints.contains($0.endpoint) }
            let arbitrators = views.filter { $0.arbitrator != nil || client.arbitratorEndpoints.contains($0.endpoint) }
            // Only arbitrators asked: no verdict, 0 when one answered.
            let health: ClusterHealth? = nodes.isEmpty ? nil : ClusterHealth.assess(nodes)
            let code = health?.verdict.rawValue ?? (arbitrators.contains { $0.arbitrator != nil } ? 0 : ClusterHealth.Verdict.unknown.rawValue)
            if json {
                printJSON(Self.document(nodes: nodes, arbitrators: arbitrators, health: health, code: code))
            } else {
                if !nodes.isEmpty { print(StatusTable.render(nodes), terminator: "") }
                for w in arbitrators {
                    if let doc = w.arbitrator {
                        print(StatusTable.render(arbitrator: doc), terminator: "")
                    } else {
                        print("arbitrator: \(w.endpoint) did not answer: \(w.error ?? "?")")
                    }
                }
                if let health { print(health.line) }
            }
            if code != 0 { throw ExitCode(code) }
        }
    }

    /// `status --json`: {cluster, verdict, exit_code, summary, reasons, master, epoch,
    /// nodes: [{node, endpoint, reachable, error, status}], arbitrator: {endpoint, reachable,
    /// error, status} | null}. `status` is the /status document as the node serves it.
    static func document(nodes: [NodeView], arbitrators: [NodeView], health: ClusterHealth?, code: Int32) -> [String: Any] {
        func raw(_ v: NodeView) -> Any {
            v.raw.flatMap { try? JSONSerialization.jsonObject(with: $0) } ?? NSNull()
        }
        let docs = nodes.compactMap(\.document)
        let master = health?.master?.master ?? docs.compactMap(\.master).first
        let arbitrator: Any = arbitrators.first.map { w -> Any in
            ["endpoint": w.endpoint, "reachable": w.arbitrator != nil, "error": w.error ?? NSNull(), "status": raw(w)]
        } ?? NSNull()
        return [
            "cluster": docs.first?.cluster ?? NSNull(),
            "verdict": health?.verdict.key ?? NSNull(),
            "exit_code": Int(code),
            "summary": health?.line ?? NSNull(),
            "reasons": health?.reasons ?? [],
            "master": master.map { ["node": $0.node, "service_address": $0.serviceAddress] } ?? NSNull(),
            "epoch": docs.map(\.epoch).max().map { NSNumber(value: $0) } ?? NSNull(),
            "nodes": nodes.sorted { $0.name < $1.name }.map { v -> [String: Any] in
                ["node": v.document?.node ?? v.expectedName ?? NSNull(), "endpoint": v.endpoint, "reachable": v.document != nil, "error": v.error ?? NSNull(), "status": raw(v)]
            },
            "arbitrator": arbitrator,
        ]
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
        var rows: [[String]] = [["CLUSTER", "MASTER", "EPOCH", "LEASE LEFT", "LINKED", "OUTDATED", "LAST CONTACT"]]
        for c in w.clusters.sorted(by: { $0.name < $1.name }) {
            let outdated = c.outdated.map { "\($0.node)@\($0.epoch)" }.joined(separator: ",")
            let contact = c.lastContactMs.keys.sorted().map { node in
                "\(node) " + (c.lastContactMs[node].flatMap { $0 }.map { "\($0) ms" } ?? "never")
            }.joined(separator: ", ")
            // Both columns are "?" for an arbitrator too old to report them.
            let lease = c.master == nil ? "-" : c.leaseRemainingMs.map { "\($0) ms" } ?? "?"
            let linked = c.connected.map { $0.isEmpty ? "none" : $0.joined(separator: ",") } ?? "?"
            rows.append([c.name, c.master ?? "none", String(c.epoch), lease, linked, outdated.isEmpty ? "-" : outdated, contact])
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
