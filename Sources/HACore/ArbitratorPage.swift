/// The arbitrator's status page (`GET /` on its `status_address`): one HTML table row per
/// cluster, rendered from the same `ArbitratorStatusDocument` `/status` encodes. Pure: the
/// daemon passes the snapshot, the staleness bound and the wall-clock time as text, so a
/// unit test renders exactly what a browser gets (docs/operator-guide.md, "The arbitrator's status page").
public enum ArbitratorPage {
    /// Seconds between the browser's own reloads (`<meta http-equiv="refresh">`).
    public static let refreshSeconds = 5

    /// One cluster's overall state, worst first.
    public enum State: String, Sendable, Equatable, CaseIterable {
        /// No valid lease granted by this arbitrator: nobody may write (or the master lost
        /// the arbitrator and holds its lease from its peer alone).
        case noMaster = "no master"
        /// A master, but a node is outdated, a node's link to the arbitrator is down, or the
        /// master has not renewed within the bound.
        case degraded
        /// A master that renews, no outdated marks, both nodes linked.
        case healthy

        /// The CSS class (and `data-state` value) of a row in this state.
        public var cssClass: String {
            switch self {
            case .noMaster: return "nomaster"
            case .degraded: return "degraded"
            case .healthy: return "healthy"
            }
        }
    }

    /// `entry`'s state and the reasons it is not healthy (empty when healthy), in node-name order.
    /// Only the master's silence counts: it renews every renew interval, while a backup speaks
    /// only when its link comes up and in elections (docs/quorum-protocol.md), so a backup is
    /// judged by its link (`connected`; not judged when the document lacks it).
    /// - Parameter staleAfterMs: a master last heard longer ago than this is reported (the
    ///   daemon passes `[timeouts] failure_timeout_ms`, after which the nodes act on a loss).
    public static func assess(_ entry: ArbitratorStatusDocument.ClusterEntry, staleAfterMs: Int64) -> (State, [String]) {
        var reasons: [String] = []
        if entry.master == nil { reasons.append("no valid lease granted") }
        for mark in entry.outdated.sorted(by: { $0.node < $1.node }) {
            reasons.append("\(mark.node) outdated at epoch \(mark.epoch)")
        }
        if let connected = entry.connected {
            for node in entry.lastContactMs.keys.sorted() where !connected.contains(node) {
                reasons.append("\(node) has no link to the arbitrator")
            }
        }
        if let master = entry.master, let age = entry.lastContactMs[master] ?? nil, age > staleAfterMs {
            reasons.append("master \(master) not heard for \(seconds(age)) s")
        }
        if entry.master == nil { return (.noMaster, reasons) }
        return (reasons.isEmpty ? .healthy : .degraded, reasons)
    }

    /// The whole page. Clusters appear in name order; every string from the document is
    /// escaped (cluster and node names are restricted by the config, but the page does not
    /// rely on that).
    /// - Parameters:
    ///   - generatedAt: when the snapshot was taken, as the page should print it (UTC text).
    ///   - staleAfterMs: see `assess`.
    public static func render(_ doc: ArbitratorStatusDocument, generatedAt: String, staleAfterMs: Int64) -> String {
        let clusters = doc.clusters.sorted { $0.name < $1.name }
        let assessed = clusters.map { assess($0, staleAfterMs: staleAfterMs) }
        var counts: [State: Int] = [:]
        for (state, _) in assessed { counts[state, default: 0] += 1 }

        var out = ""
        out.reserveCapacity(2048 + clusters.count * 600)
        out += """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta http-equiv="refresh" content="\(refreshSeconds)">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>hamgr arbitrator: \(clusters.count) cluster(s)</title>
        <style>\(style)</style>
        </head>
        <body>
        <h1>hamgr arbitrator</h1>
        <p class="meta">version \(html(doc.version)) &middot; snapshot \(html(generatedAt)) &middot; reloads every \(refreshSeconds) s &middot; a master counts as silent after \(seconds(staleAfterMs)) s</p>
        <p class="summary" id="summary">\(clusters.count) cluster(s):
        """
        out += " " + State.allCases.reversed().map { "<span class=\"\($0.cssClass)\">\(counts[$0, default: 0]) \($0.rawValue)</span>" }
            .joined(separator: " ")
        out += "</p>\n"
        if clusters.isEmpty {
            out += "<p>This arbitrator serves no cluster.</p>\n</body>\n</html>\n"
            return out
        }
        out += """
        <table>
        <thead><tr><th>state</th><th>cluster</th><th>master</th><th>epoch</th><th>lease left</th><th>outdated</th><th>nodes: link, last heard (s ago)</th></tr></thead>
        <tbody>

        """
        for (entry, (state, reasons)) in zip(clusters, assessed) {
            out += "<tr class=\"\(state.cssClass)\" data-cluster=\"\(html(entry.name))\" data-state=\"\(state.cssClass)\">"
            out += "<td class=\"state\"><strong>\(state.rawValue)</strong>"
            if !reasons.isEmpty { out += "<br><small>\(reasons.map(html).joined(separator: "; "))</small>" }
            out += "</td><td class=\"cluster\">\(html(entry.name))</td>"
            out += "<td class=\"master\">\(entry.master.map(html) ?? "<em>none</em>")</td>"
            out += "<td class=\"num\">\(entry.epoch)</td>"
            out += "<td class=\"num\">\(entry.leaseRemainingMs.map { "\(seconds(max(0, $0))) s" } ?? "&ndash;")</td>"
            let marks = entry.outdated.sorted { $0.node < $1.node }
            out += "<td>\(marks.isEmpty ? "none" : marks.map { "\(html($0.node)) (epoch \($0.epoch))" }.joined(separator: ", "))</td>"
            let nodes = entry.lastContactMs.sorted { $0.key < $1.key }.map { node, age in
                let link = entry.connected.map { $0.contains(node) ? "up, " : "<strong>down</strong>, " } ?? ""
                return "\(html(node)): \(link)\(age.map { seconds($0) } ?? "never")"
            }
            out += "<td>\(nodes.joined(separator: "; "))</td></tr>\n"
        }
        out += "</tbody>\n</table>\n</body>\n</html>\n"
        return out
    }

    /// `text` safe inside an element and inside a double- or single-quoted attribute.
    public static func html(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for ch in text.unicodeScalars {
            switch ch {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(ch)
            }
        }
        return out
    }

    /// Milliseconds as seconds with one decimal ("0.1", "12.0").
    static func seconds(_ ms: Int64) -> String { fixedPoint(Double(ms) / 1000, decimals: 1) }

    private static let style = """
    body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
    h1{font-size:1.4em;margin:0 0 .3em}\
    .meta{color:#666;font-size:.85em;margin:.2em 0}\
    .summary{margin:.6em 0 1em;font-weight:600}\
    .summary span{padding:.1em .5em;border-radius:.3em}\
    table{border-collapse:collapse;width:100%;background:#fff}\
    th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}\
    th{background:#eee;font-size:.9em}\
    td.num{text-align:right;font-variant-numeric:tabular-nums}\
    td.cluster,td.master{font-family:ui-monospace,monospace}\
    tr.healthy td.state,.summary .healthy{background:#dff3df;color:#1b5e20}\
    tr.degraded td.state,.summary .degraded{background:#fff4d6;color:#7a4f00}\
    tr.nomaster td.state,.summary .nomaster{background:#fde0e0;color:#8e1111}\
    small{font-weight:normal}
    """
}
