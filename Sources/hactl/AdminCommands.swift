import ArgumentParser
import Foundation
import HAShell

/// Send one admin command and report the reply: the message on stdout and exit 0 when
/// the node carried it out, the message on stderr and exit 1 when it refused.
private func send(_ command: AdminCommand, to endpoint: String, with client: ClusterClient) throws -> AdminReply {
    let (status, reply) = try client.admin(command, at: endpoint)
    switch status {
    case 200..<300:
        return reply
    case 401:
        throw HactlError("\(endpoint): the admin token was refused (check --token-file)")
    case 403:
        throw HactlError("\(endpoint): \(reply.message)")
    default:
        var text = "\(endpoint): \(command.action) refused (HTTP \(status)): \(reply.message)"
        for (k, v) in reply.fields.sorted(by: { $0.key < $1.key }) { text += "\n  \(k): \(v)" }
        throw HactlError(text)
    }
}

private func printReply(_ reply: AdminReply, node: String? = nil) {
    print((node.map { "\($0): " } ?? "") + reply.message)
    for (k, v) in reply.fields.sorted(by: { $0.key < $1.key }) {
        print("  \(k): \(v.stringValue ?? v.description)")
    }
}

/// Sends `command` to whichever node reports itself master (switchover, demote).
private func sendToMaster(_ command: AdminCommand, hactl: Hactl, nothingTo: String) throws {
    let client = try hactl.client(needsToken: true)
    guard let master = client.masterEndpoint(in: client.discover()) else {
        throw HactlError("no node reports itself master; \(nothingTo)")
    }
    printReply(try send(command, to: master, with: client))
}

struct SwitchoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "switchover",
        abstract: "Hand the master role to the peer: drain writes, confirm the peer has everything, move the lease.",
        discussion: "Sent to the current master, found through the given endpoints.")

    @ParentCommand var hactl: Hactl

    func run() throws {
        try reporting {
            try sendToMaster(.switchover, hactl: hactl, nothingTo: "nothing to switch over (see `hactl status`)")
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

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            let endpoint = client.endpoints[0]
            if !yes {
                let target = client.fetch(endpoint)
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
            printReply(try send(.promote(force: force), to: endpoint, with: client))
        }
    }
}

struct DemoteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demote",
        abstract: "Demote the master to secondary (stops its resources; no node serves until one is promoted).",
        discussion: "Sent to the current master, found through the given endpoints. For a handover use `switchover`.")

    @ParentCommand var hactl: Hactl

    func run() throws {
        try reporting {
            try sendToMaster(.demote, hactl: hactl, nothingTo: "nothing to demote")
        }
    }
}

struct MaintenanceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "maintenance",
        abstract: "Take the node(s) at the given endpoint(s) out of candidacy (on) or put them back (off).",
        discussion: """
        A node in maintenance is never elected, so it can be patched or rebooted without         taking over. The master refuses: switch over first. Sent only to the endpoints         given, never to a peer found through them.
        """)

    enum Mode: String, ExpressibleByArgument, CaseIterable { case on, off }

    @ParentCommand var hactl: Hactl

    @Argument(help: "on or off.")
    var mode: Mode

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            var failures: [String] = []
            for endpoint in client.endpoints {
                let name = client.fetch(endpoint).document?.node
                do {
                    printReply(try send(.maintenance(on: mode == .on), to: endpoint, with: client), node: name)
                } catch let e as HactlError {
                    failures.append(e.description)
                } catch let e as HTTPClient.Failure {
                    failures.append("\(endpoint): \(e)")
                }
            }
            if !failures.isEmpty { throw HactlError(failures.joined(separator: "\n")) }
        }
    }
}

/// verify and resync: start the job, then follow `/status` with a progress bar.
private func runJob(_ command: AdminCommand, hactl: Hactl, wait: Bool) throws {
    let client = try hactl.client(needsToken: true)
    let views = client.discover()
    let endpoint = client.masterEndpoint(in: views) ?? client.endpoints[0]
    printReply(try send(command, to: endpoint, with: client))
    guard wait else { return }
    let watched = views.filter { $0.document != nil }.map(\.endpoint)
    let bar = ProgressBar(label: command.action, interactive: isatty(1) == 1)
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

    func run() throws { try reporting { try runJob(.verify(repair: repair), hactl: hactl, wait: !noWait) } }
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

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            let (ep, doc) = try endpoint(ofNode: source, client: client)
            if !yes {
                try requireConfirmation("bootstrap decides whose data survives") {
                    (assumeClean ? "Declare the stores of \(source) and \(doc.peer.node) identical, with no sync between them?"
                                 : "Keep \(source)'s data and overwrite \(doc.peer.node)'s whole store with it?", source)
                }
            }
            printReply(try send(.bootstrap(assumeClean: assumeClean), to: ep, with: client), node: source)
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

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            let ep = client.endpoints[0]
            if !yes {
                try requireConfirmation("invalidate discards data") {
                    let node = client.fetch(ep).document?.node ?? ep
                    return ("Discard every byte of \(node)'s store and copy it again from its peer?", node)
                }
            }
            printReply(try send(.invalidate, to: ep, with: client))
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

    func run() throws { try reporting { try runJob(.resync, hactl: hactl, wait: !noWait) } }
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

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            let endpoint = client.endpoints[0]
            if !yes {
                try requireConfirmation("resolve discards data") {
                    let doc = client.fetch(endpoint).document
                    let loser = discard == .local ? doc?.node ?? endpoint : doc?.peer.node ?? "the peer"
                    return ("Discard every change on \(loser) since the split brain\(doc?.splitBrain.map { " (\($0))" } ?? "")?", loser)
                }
            }
            printReply(try send(.resolve(discard: discard), to: endpoint, with: client))
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

    func run() throws {
        try reporting {
            let client = try hactl.client(needsToken: true)
            for ep in client.endpoints {
                let doc = client.fetch(ep).document
                let node = doc?.node ?? ep
                if !yes {
                    try requireConfirmation("arbitrator-accept can let an outdated node be elected") {
                        ("Count the new arbitrator state on \(node)\(doc?.arbitrator.refused.map { " (\($0))" } ?? "")? Only if \(node) holds the newest data.", node)
                    }
                }
                printReply(try send(.acceptArbitrator, to: ep, with: client), node: node)
            }
        }
    }
}

/// A progress bar on a terminal; on a pipe, a line at every 10 %.
final class ProgressBar {
    let label: String
    let interactive: Bool
    private var lastDecile = -1
    private var started = Date()
    private var drawn = false

    init(label: String, interactive: Bool) { self.label = label; self.interactive = interactive }

    func update(done: UInt64, total: UInt64) {
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
