import ArgumentParser
import Foundation
import HAShell

/// What one node answered to one admin command (or why it could not be asked).
struct AdminOutcome {
    var node: String?
    var endpoint: String
    var ok: Bool
    var message: String
    var fields: [String: JSONValue] = [:]
    var httpStatus: Int?
    /// The text for stderr when not ok (human output).
    var errorText: String?

    var jsonObject: [String: Any] {
        ["node": node ?? NSNull(), "endpoint": endpoint, "ok": ok, "message": message,
         "fields": jsonValue(fields), "http_status": httpStatus ?? NSNull()]
    }
}

/// Send one admin command: ok when the node carried it out (2xx), else the refusal.
private func send(_ command: AdminCommand, to endpoint: String, node: String?, with client: ClusterClient) -> AdminOutcome {
    let status: Int, reply: AdminReply
    do {
        (status, reply) = try client.admin(command, at: endpoint)
    } catch {
        let text = "\(endpoint): \(error)"
        return AdminOutcome(node: node, endpoint: endpoint, ok: false, message: "\(error)", errorText: text)
    }
    var o = AdminOutcome(node: node, endpoint: endpoint, ok: (200..<300).contains(status), message: reply.message,
                         fields: reply.fields, httpStatus: status)
    switch status {
    case 200..<300:
        break
    case 401:
        o.message = "the admin token was refused (check --token-file)"
        o.errorText = "\(endpoint): \(o.message)"
    case 403:
        o.errorText = "\(endpoint): \(reply.message)"
    default:
        var text = "\(endpoint): \(command.action) refused (HTTP \(status)): \(reply.message)"
        for (k, v) in reply.fields.sorted(by: { $0.key < $1.key }) { text += "\n  \(k): \(v)" }
        o.errorText = text
    }
    return o
}

/// The outcomes of one admin command, printed as they come (human) or as one JSON
/// object at the end (`--json`): {action, node, endpoint, ok, message, fields, results}.
final class AdminResults {
    let action: String
    let json: Bool
    private(set) var outcomes: [AdminOutcome] = []

    init(_ action: String, json: Bool) { self.action = action; self.json = json }

    /// Record an outcome; prints the reply now when human and ok (`nodePrefix`: "b: done").
    func add(_ o: AdminOutcome, nodePrefix: Bool = false) {
        outcomes.append(o)
        guard !json, o.ok else { return }
        print((nodePrefix ? o.node.map { "\($0): " } ?? "" : "") + o.message)
        for (k, v) in o.fields.sorted(by: { $0.key < $1.key }) {
            print("  \(k): \(v.stringValue ?? v.description)")
        }
    }

    /// Add fields to the last outcome (a job's final state).
    func annotate(_ fields: [String: JSONValue]) {
        guard !outcomes.isEmpty else { return }
        outcomes[outcomes.count - 1].fields.merge(fields) { _, new in new }
    }

    /// Print the JSON object (with `json`) and fail (exit 1) if any node refused.
    func finish() throws {
        let failures = outcomes.filter { !$0.ok }
        if json {
            printJSON(Self.object(action: action, results: outcomes))
            if !failures.isEmpty { throw ExitCode(1) }
        } else if !failures.isEmpty {
            throw HactlError(failures.map { $0.errorText ?? "\($0.endpoint): \($0.message)" }.joined(separator: "\n"))
        }
    }

    /// The stable JSON shape of every admin command's result, and of any hactl error
    /// (`error`: ok false, results empty).
    static func object(action: String, results: [AdminOutcome], error: String? = nil) -> [String: Any] {
        let single = results.count == 1 ? results.first : nil
        let message = error ?? single?.message
            ?? results.map { "\($0.node ?? $0.endpoint): \($0.message)" }.joined(separator: "; ")
        return [
            "action": action,
            "node": single?.node ?? NSNull(),
            "endpoint": single?.endpoint ?? NSNull(),
            "ok": error == nil && !results.isEmpty && results.allSatisfy(\.ok),
            "message": message,
            "fields": jsonValue(single?.fields ?? [:]),
            "results": results.map(\.jsonObject),
        ]
    }
}

/// `--json` for the admin commands.
struct JSONOption: ParsableArguments {
    @Flag(name: .long, help: "Print the result as one JSON object {action, node, endpoint, ok, message, fields, results}.")
    var json = false
}

/// Sends `command` to whichever node reports itself master (switchover, demote).
private func sendToMaster(_ command: AdminCommand, hactl: Hactl, json: Bool, nothingTo: String) throws {
    let client = try hactl.client(needsToken: true)
    let views = client.discover()
    guard let master = client.masterEndpoint(in: views) else {
        throw HactlError("no node reports itself master; \(nothingTo)")
    }
    let results = AdminResults(command.action, json: json)
    results.add(send(command, to: master, node: views.first { $0.endpoint == master }?.document?.node, with: client))
    try results.finish()
}

struct SwitchoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "switchover",
        abstract: "Hand the master role to the peer: drain writes, confirm the peer has everything, move the lease.",
        discussion: "Sent to the current master, found through the given endpoints.")

    @ParentCommand var hactl: Hactl
    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "switchover", json: output.json) {
            try sendToMaster(.switchover, hactl: hactl, json: output.json, nothingTo: "nothing to switch over (see `hactl status`)")
        }
    }
}

struct PromoteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "promote",
        abstract: "Promote the node at the (first) endpoint.",
        discussion: """
        Without --force the node still needs quorum and up-to-date data. --force is for \
        disasters (the peer and the arbitrator are lost): it skips those checks and starts \
        a new data generation, so any divergence stays detectable. It asks for confirmation.
        """)

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Promote without quorum and without proof of up-to-date data.")
    var force = false

    @Flag(name: .long, help: "Do not ask for confirmation.")
    var yes = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "promote", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let endpoint = client.endpoints[0]
            let target = client.fetch(endpoint)
            if !yes {
                let who = target.document.map { "node \($0.node) of cluster \($0.cluster) (disk \($0.diskState.rawValue), epoch \($0.epoch))" } ?? endpoint
                if isInteractive {
                    let question = force
                        ? "FORCED promotion of \(who).\nThis skips quorum and data checks; if the other node is still primary somewhere, the data will diverge."
                        : "Promote \(who)?"
                    guard confirm(question, expected: force ? "force" : "yes") else { throw HactlError("not confirmed; nothing done") }
                } else if force {
                    throw HactlError("promote --force needs --yes when not run from a terminal")
                }
            }
            let results = AdminResults("promote", json: output.json)
            results.add(send(.promote(force: force), to: endpoint, node: target.document?.node, with: client))
            try results.finish()
        }
    }
}

struct DemoteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demote",
        abstract: "Demote the master to secondary (stops its resources; no node serves until one is promoted).",
        discussion: "Sent to the current master, found through the given endpoints. For a handover use `switchover`.")

    @ParentCommand var hactl: Hactl
    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "demote", json: output.json) {
            try sendToMaster(.demote, hactl: hactl, json: output.json, nothingTo: "nothing to demote")
        }
    }
}

struct MaintenanceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "maintenance",
        abstract: "Take the node(s) at the given endpoint(s) out of candidacy (on) or put them back (off).",
        discussion: """
        A node in maintenance is never elected, so it can be patched or rebooted without         taking over. On the master it unmanages the resources (no restarts, no switchover for their failures) while the lease and data path go on. Sent only to the endpoints         given, never to a peer found through them.
        """)

    enum Mode: String, ExpressibleByArgument, CaseIterable { case on, off }

    @ParentCommand var hactl: Hactl

    @Argument(help: "on or off.")
    var mode: Mode

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "maintenance", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let results = AdminResults("maintenance", json: output.json)
            for endpoint in client.endpoints {
                let name = client.fetch(endpoint).document?.node
                results.add(send(.maintenance(on: mode == .on), to: endpoint, node: name, with: client), nodePrefix: true)
            }
            try results.finish()
        }
    }
}

/// verify and resync: start the job, then follow `/status` with a progress bar.
private func runJob(_ command: AdminCommand, hactl: Hactl, wait: Bool, json: Bool) throws {
    let client = try hactl.client(needsToken: true)
    let views = client.discover()
    let endpoint = client.masterEndpoint(in: views) ?? client.endpoints[0]
    let results = AdminResults(command.action, json: json)
    results.add(send(command, to: endpoint, node: views.first { $0.endpoint == endpoint }?.document?.node, with: client))
    guard wait, results.outcomes.allSatisfy(\.ok) else { return try results.finish() }
    let watched = views.filter { $0.document != nil }.map(\.endpoint)
    let bar = ProgressBar(label: command.action, interactive: isatty(1) == 1, quiet: json)
    var sawJob = false
    var quietPolls = 0
    while true {
        usleep(500_000)
        let docs = watched.compactMap { client.fetch($0).document }
        guard !docs.isEmpty else { throw HactlError("lost contact with the cluster while waiting; the \(command.action) continues on the nodes") }
        if let job = docs.compactMap(\.resync).first {
            sawJob = true
            bar.update(done: job.doneBytes, total: job.totalBytes)
            continue
        }
        // No job shown: finished (or finished before the first poll); a start that has
        // not shown up yet gets two more polls.
        quietPolls += 1
        if sawJob || quietPolls >= 3 {
            bar.finish()
            let oos = docs.map(\.outOfSyncBytes).max() ?? 0
            if json {
                results.annotate(["finished": .bool(true), "out_of_sync_bytes": .number(Double(oos))])
                return try results.finish()
            }
            print("\(command.action) finished; out of sync: \(ByteSize.format(oos))")
            return
        }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Compare chunk hashes between the nodes; mismatches are reported (and with --repair resynced from the master).")

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Start and return; do not follow progress.")
    var noWait = false

    @Flag(name: .long, help: "When the pass ends, resync exactly the mismatched chunks from the up-to-date side.")
    var repair = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "verify", json: output.json) { try runJob(.verify(repair: repair), hactl: hactl, wait: !noWait, json: output.json) }
    }
}

/// The endpoint whose node is `name`, among the given endpoints and their peers.
private func endpoint(ofNode name: String, client: ClusterClient) throws -> (String, StatusDocument) {
    let views = client.discover()
    guard let v = views.first(where: { $0.document?.node == name }), let d = v.document else {
        let known = views.compactMap { $0.document?.node }
        throw HactlError("no endpoint answers for node \(name)" + (known.isEmpty ? "" : " (found: \(known.joined(separator: ", ")))"))
    }
    return (v.endpoint, d)
}

struct BootstrapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bootstrap",
        abstract: "Start a new pair: make NODE's data the cluster's; the peer gets a full sync.",
        discussion: """
        For a new pair (both nodes report new metadata, disk inconsistent) whose stores are \
        not provably empty. NODE becomes up to date in a new data generation and is then \
        electable; its peer joins as a full-sync target and stays inconsistent (never \
        promotable) until the sync completes. --assume-clean skips that sync: the operator \
        declares both stores identical (e.g. both zeroed block devices) and the peer adopts \
        the generation as it is. Two sparse files that provably hold only zeroes need no \
        bootstrap at all. Refused when the peer is up to date. Asks for confirmation.
        """)

    @ParentCommand var hactl: Hactl

    @Option(name: .long, help: "The node whose data is kept.")
    var source: String

    @Flag(name: .long, help: "Declare both stores identical: no initial sync.")
    var assumeClean = false

    @Flag(name: .long, help: "Do not ask for confirmation.")
    var yes = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "bootstrap", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let (ep, doc) = try endpoint(ofNode: source, client: client)
            if !yes {
                try requireConfirmation("bootstrap decides whose data survives") {
                    (assumeClean ? "Declare the stores of \(source) and \(doc.peer.node) identical, with no sync between them?"
                                 : "Keep \(source)'s data and overwrite \(doc.peer.node)'s whole store with it?", source)
                }
            }
            let results = AdminResults("bootstrap", json: output.json)
            results.add(send(.bootstrap(assumeClean: assumeClean), to: ep, node: source, with: client), nodePrefix: true)
            try results.finish()
        }
    }
}

struct InvalidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "invalidate",
        abstract: "Discard the data of the node at the (first) endpoint: it becomes a full-sync target of its up-to-date peer.",
        discussion: """
        For a store that is known bad (wrong disk, damaged data). The node must be secondary \
        and connected to an up-to-date peer; it is inconsistent (never promotable) until the \
        full sync completes. Asks for confirmation.
        """)

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Do not ask for confirmation.")
    var yes = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "invalidate", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let ep = client.endpoints[0]
            let name = client.fetch(ep).document?.node
            if !yes {
                try requireConfirmation("invalidate discards data") {
                    let node = name ?? ep
                    return ("Discard every byte of \(node)'s store and copy it again from its peer?", node)
                }
            }
            let results = AdminResults("invalidate", json: output.json)
            results.add(send(.invalidate, to: ep, node: name, with: client))
            try results.finish()
        }
    }
}

struct ResyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resync",
        abstract: "Copy the chunks marked out of sync from the master to the peer.")

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Start and return; do not follow progress.")
    var noWait = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "resync", json: output.json) { try runJob(.resync, hactl: hactl, wait: !noWait, json: output.json) }
    }
}

struct ResolveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resolve",
        abstract: "Resolve a split brain by discarding one side's changes since the divergence.",
        discussion: """
        Sent to the node at the (first) endpoint. --discard local throws away THIS node's \
        changes and resyncs it from the peer; --discard peer keeps this node's data and \
        resyncs the peer from it. Asks for confirmation.
        """)

    @ParentCommand var hactl: Hactl

    @Option(name: .long, help: "Whose changes to discard: local (the endpoint's node) or peer.")
    var discard: AdminCommand.DiscardSide

    @Flag(name: .long, help: "Do not ask for confirmation.")
    var yes = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "resolve", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let endpoint = client.endpoints[0]
            let target = client.fetch(endpoint).document
            if !yes {
                try requireConfirmation("resolve discards data") {
                    let doc = target
                    let loser = discard == .local ? doc?.node ?? endpoint : doc?.peer.node ?? "the peer"
                    return ("Discard every change on \(loser) since the split brain\(doc?.splitBrain.map { " (\($0))" } ?? "")?", loser)
                }
            }
            let results = AdminResults("resolve", json: output.json)
            results.add(send(.resolve(discard: discard), to: endpoint, node: target?.node, with: client))
            try results.finish()
        }
    }
}

extension AdminCommand.DiscardSide: ExpressibleByArgument {}

struct ArbitratorAcceptCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "arbitrator-accept",
        abstract: "Count the arbitrator again after its state was rebuilt, wiped or rolled back (a new incarnation).",
        discussion: """
        Sent to the node(s) at the given endpoint(s). A node refuses the votes and grants of an \
        arbitrator whose state is another incarnation than the one it knows, because the new \
        state may have lost the mark that says which node is outdated. Accept only on nodes \
        you know hold the newest data (the last master, or both nodes while they are connected \
        and in sync): accepting on an outdated node lets the arbitrator elect it. Asks for \
        confirmation (docs/operator-guide.md, Arbitrator rebuild).
        """)

    @ParentCommand var hactl: Hactl

    @Flag(name: .long, help: "Do not ask for confirmation.")
    var yes = false

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "arbitrator-accept", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let results = AdminResults("arbitrator-accept", json: output.json)
            for ep in client.endpoints {
                let doc = client.fetch(ep).document
                let node = doc?.node ?? ep
                if !yes {
                    try requireConfirmation("arbitrator-accept can let an outdated node be elected") {
                        ("Count the new arbitrator state on \(node)\(doc?.arbitrator.refused.map { " (\($0))" } ?? "")? Only if \(node) holds the newest data.", node)
                    }
                }
                results.add(send(.acceptArbitrator, to: ep, node: doc?.node, with: client), nodePrefix: true)
                if results.outcomes.last?.ok != true { break }   // stop at the first refusal, as before --json
            }
            try results.finish()
        }
    }
}

/// A progress bar on a terminal; on a pipe, a line at every 10 %.
final class ProgressBar {
    let label: String
    let interactive: Bool
    /// Draw nothing (`--json`).
    let quiet: Bool
    private var lastDecile = -1
    private var started = Date()
    private var drawn = false

    init(label: String, interactive: Bool, quiet: Bool = false) { self.label = label; self.interactive = interactive; self.quiet = quiet }

    func update(done: UInt64, total: UInt64) {
        guard !quiet else { return }
        let f = total == 0 ? 1 : min(1, Double(done) / Double(total))
        let elapsed = Date().timeIntervalSince(started)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let eta = rate > 0 && f < 1 ? " ETA \(Int((Double(total - min(done, total)) / rate).rounded()))s" : ""
        let text = "\(label) \(Self.bar(f, width: 30)) \(Self.percent(f)) \(ByteSize.format(done)) / \(ByteSize.format(total)) \(ByteSize.format(UInt64(rate)))/s\(eta)"
        if interactive {
            print("\r\u{1B}[K" + text, terminator: "")
            fflush(stdout)
            drawn = true
        } else if Int(f * 10) > lastDecile {
            lastDecile = Int(f * 10)
            print(text)
        }
    }

    func finish() {
        if interactive && drawn { print("") }
    }

    static func bar(_ f: Double, width: Int) -> String {
        let filled = Int((f * Double(width)).rounded(.down))
        return "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]"
    }

    static func percent(_ f: Double) -> String { "\(Int((f * 100).rounded(.down)))%" }
}

struct ResourceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resource",
        abstract: "Act on the resources of the nodes (the [[resource]] list).",
        subcommands: [ResourceCleanupCommand.self])
}

struct ResourceCleanupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cleanup",
        abstract: "Forget a resource's failures (all resources without NAME), as `pcs resource cleanup`.",
        discussion: """
        On each node asked: the restart count goes back to 0, the resource is probed and its \
        state (failed, stopped, running) replaced by what the probe finds, and a monitor that \
        gave up runs again. On a master that manages its resources (not in maintenance) a \
        resource found stopped is started. Sent to every node found through the endpoints, \
        or only to --node.
        """)

    @ParentCommand var hactl: Hactl

    @Argument(help: "The resource's name (default: every resource).")
    var name: String?

    @Option(name: .long, help: "Only on this node.")
    var node: String?

    @OptionGroup var output: JSONOption

    func run() throws {
        try reporting(action: "resource-cleanup", json: output.json) {
            let client = try hactl.client(needsToken: true)
            let views = client.discover().filter { $0.document != nil }
            let targets = node.map { n in views.filter { $0.document?.node == n } } ?? views
            guard !targets.isEmpty else {
                let known = views.compactMap { $0.document?.node }
                throw HactlError(node.map { "no endpoint answers for node \($0)" + (known.isEmpty ? "" : " (found: \(known.joined(separator: ", ")))") }
                                 ?? "no node answered (see `hactl status`)")
            }
            let results = AdminResults("resource-cleanup", json: output.json)
            for v in targets {
                results.add(send(.resourceCleanup(name: name), to: v.endpoint, node: v.document?.node, with: client), nodePrefix: true)
            }
            try results.finish()
        }
    }
}
