import Foundation
import HACore
import XCTest
@testable import Quorum

/// A datadriven reader for the quorum cores, in the style of etcd-io/raft's `testdata/*.txt`:
/// each block is one command line, a `----` line and the expected output (one action or event
/// per line, prefixed with the node that produced it), ended by a blank line. Lines starting
/// with `#` between blocks are comments. `HAMGR_REWRITE_TRANSCRIPTS=1` rewrites the expected
/// output with what the cores do now (review the diff before committing it).
///
/// Commands (times like `200ms`, `1.5s`; nodes `a`, `b`, arbitrator `w`):
///
///     config [splitBrain=allow] [bugs=gateOpenOnNewerEpoch,…]   fresh cluster (default: defaults)
///     advance 200ms                   the shared clock moves on
///     tick a [+200ms]                 (advance, then) tick a
///     deliver [a->w …]                deliver queued messages (matching ones only), repeatedly
///     drop [a->w …]                   discard queued messages (matching ones only)
///     inject b->a MESSAGE             deliver MESSAGE (syntax as rendered) now
///     admin a switchover|demote|promote|promote-force|maintenance-on|maintenance-off|accept-arbitrator
///     peer a in-sync|behind|disconnected      the replication link as the volume reports it
///     disk a upToDate|outdated|inconsistent|diskless [gen=2] [bitmap=1]
///     drained a                       the shell finished the switchover drain
///     clockjump a 5s                  the shell detected a clock freeze of about 5 s
///     freeze a 3s                     3 s pass for everyone but a, whose monotonic clock stands
///                                     still (a paused VM); a gets no events meanwhile. From then
///                                     on a's clock is 3 s behind (tick/deliver/inject use it;
///                                     run/elect do not)
///     crash a                         a is gone (messages to it are dropped)
///     restart a|w                     restart from the persisted state (prints `start` actions)
///     start a [epoch=5] [voted=b] [master=b] [fenced=4] [peerOutdatedAt=3] [since=5s]
///                                     a new core from this persisted state, created `since` ago
///     elect a                         a wins the next epoch with everyone's vote (prints status)
///     run 1s [cut a-b] [cut a->w] [isolate a]   ticks both nodes every renew/2, delivering
///     status a|b|w                    the core's view
///
/// Rendering is stable: instants are seconds since the cluster was created (`2.000s` is the
/// first instant of a test), no addresses, no dictionary order.
final class Transcript {
    var h: Harness
    var origin: Instant
    /// How far each node's monotonic clock is behind the shared clock (`freeze`).
    var behind: [NodeID: Duration] = [:]
    /// The clock of the node whose output is being rendered.
    private var renderNow: Instant

    init(settings: QuorumSettings = QuorumSettings()) {
        h = Harness(settings: settings)
        origin = h.now - .seconds(2)
        renderNow = h.now
    }

    func local(_ n: NodeID) -> Instant { h.now - (behind[n] ?? .zero) }

    // MARK: - File handling

    struct Block { var comments: [String]; var command: String; var expected: [String]; var line: Int }

    static func parse(_ text: String) -> (blocks: [Block], trailer: [String]) {
        var blocks: [Block] = []
        var comments: [String] = []
        let lines = text.components(separatedBy: "\n")
        var i = 0
        while i < lines.count {
            let line = lines[i]
            if line.trimmingCharacters(in: .whitespaces).isEmpty { i += 1; continue }
            if line.hasPrefix("#") { comments.append(line); i += 1; continue }
            let commandLine = i + 1
            let command = line
            i += 1
            guard i < lines.count, lines[i] == "----" else {
                blocks.append(Block(comments: comments, command: command, expected: ["<missing ---->"], line: commandLine))
                comments = []
                continue
            }
            i += 1
            var expected: [String] = []
            while i < lines.count, !lines[i].isEmpty { expected.append(lines[i]); i += 1 }
            blocks.append(Block(comments: comments, command: command, expected: expected, line: commandLine))
            comments = []
        }
        return (blocks, comments)
    }

    static func render(_ blocks: [Block], trailer: [String]) -> String {
        var out: [String] = []
        for b in blocks {
            out.append(contentsOf: b.comments)
            out.append(b.command)
            out.append("----")
            out.append(contentsOf: b.expected)
            out.append("")
        }
        out.append(contentsOf: trailer)
        var text = out.joined(separator: "\n")
        while text.hasSuffix("\n\n") { text.removeLast() }
        if !text.hasSuffix("\n") { text += "\n" }
        return text
    }

    static var testdata: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("testdata") }

    /// Runs one file; reports every mismatching block (or rewrites the file).
    static func run(_ name: String, file: StaticString = #filePath, line: UInt = #line) {
        let url = testdata.appendingPathComponent(name)
        guard let text = try? String(contentsOf: url, encoding: .utf8) else {
            return XCTFail("cannot read \(url.path)", file: file, line: line)
        }
        var (blocks, trailer) = parse(text)
        let rewrite = ProcessInfo.processInfo.environment["HAMGR_REWRITE_TRANSCRIPTS"] == "1"
        let t = Transcript()
        for i in blocks.indices {
            let got = t.execute(blocks[i].command)
            if rewrite {
                blocks[i].expected = got
            } else if got != blocks[i].expected {
                XCTFail("""
                    \(name):\(blocks[i].line): \(blocks[i].command)
                    --- expected
                    \(blocks[i].expected.joined(separator: "\n"))
                    --- got
                    \(got.joined(separator: "\n"))
                    (HAMGR_REWRITE_TRANSCRIPTS=1 rewrites the file)
                    """, file: file, line: line)
            }
        }
        if rewrite { try? render(blocks, trailer: trailer).write(to: url, atomically: true, encoding: .utf8) }
    }

    // MARK: - Commands

    private var output: [String] = []

    func execute(_ command: String) -> [String] {
        output = []
        let words = command.split(separator: " ").map(String.init)
        guard let verb = words.first else { return [] }
        let args = Array(words.dropFirst())
        do {
            try perform(verb, args)
        } catch {
            output.append("error: \(error)")
        }
        return output
    }

    struct Bad: Error, CustomStringConvertible { var description: String; init(_ s: String) { description = s } }

    private func node(_ s: String?) throws -> NodeID {
        guard let s, ["a", "b"].contains(s) else { throw Bad("expected a node (a or b), got \(s ?? "nothing")") }
        return NodeID(s)
    }

    private func keyValues(_ args: ArraySlice<String>) -> [String: String] {
        var kv: [String: String] = [:]
        for a in args { let p = a.split(separator: "=", maxSplits: 1).map(String.init); if p.count == 2 { kv[p[0]] = p[1] } }
        return kv
    }

    private func perform(_ verb: String, _ args: [String]) throws {
        switch verb {
        case "config":
            let kv = keyValues(args[...])
            var s = QuorumSettings()
            if kv["splitBrain"] == "allow" { s.splitBrain = .allow }
            if let bugs = kv["bugs"] {
                for b in bugs.split(separator: ",") {
                    guard let bug = PlantedBug(rawValue: String(b)) else { throw Bad("unknown bug \(b)") }
                    s.plantedBugs.insert(bug)
                }
            }
            h = Harness(settings: s)
            origin = h.now - .seconds(2)
            behind = [:]
        case "advance":
            h.advance(try Self.duration(args.first))
        case "tick":
            let n = try node(args.first)
            if let d = args.dropFirst().first { h.advance(try Self.duration(String(d.dropFirst(d.hasPrefix("+") ? 1 : 0)))) }
            feed(n, .tick)
        case "deliver":
            let filters = try args.map(Self.route)
            var guardCount = 0
            while let i = h.inbox.firstIndex(where: { m in filters.isEmpty || filters.contains { $0(m.from, m.to) } }), guardCount < 1000 {
                guardCount += 1
                let (from, to, m) = h.inbox.remove(at: i)
                deliver(from, to, m)
            }
        case "drop":
            let filters = try args.map(Self.route)
            let before = h.inbox.count
            h.inbox.removeAll { m in filters.isEmpty || filters.contains { $0(m.from, m.to) } }
            output.append("dropped \(before - h.inbox.count)")
        case "inject":
            guard let r = args.first, let arrow = r.range(of: "->") else { throw Bad("inject FROM->TO MESSAGE") }
            let from = NodeID(String(r[..<arrow.lowerBound])), to = NodeID(String(r[arrow.upperBound...]))
            let m = try Self.message(Array(args.dropFirst()))
            deliver(from, to, from == Harness.w ? .stamped(incarnation: h.arbitratorPersisted.incarnation, m) : m)
        case "admin":
            let n = try node(args.first)
            let c: Quorum.AdminCommand
            switch args.dropFirst().first {
            case "switchover": c = .switchover
            case "demote": c = .demote
            case "promote": c = .promote(force: false)
            case "promote-force": c = .promote(force: true)
            case "maintenance-on": c = .maintenance(true)
            case "maintenance-off": c = .maintenance(false)
            case "accept-arbitrator": c = .acceptArbitrator
            default: throw Bad("unknown admin command")
            }
            feed(n, .admin(c))
        case "peer":
            let n = try node(args.first)
            let s: PeerReplicationState
            switch args.dropFirst().first {
            case "in-sync": s = .inSync
            case "behind": s = .behind
            case "disconnected": s = .disconnected
            default: throw Bad("peer a in-sync|behind|disconnected")
            }
            feed(n, .peerReplication(s))
        case "disk":
            let n = try node(args.first)
            guard let st = args.dropFirst().first.flatMap(DiskState.init(rawValue:)) else { throw Bad("disk a STATE") }
            let kv = keyValues(args.dropFirst(2))
            var g = h.disks[n]!.generations
            if let v = kv["gen"].flatMap({ UInt64($0, radix: 16) }) { g.current = GenerationID(v) }
            if let v = kv["bitmap"].flatMap({ UInt64($0, radix: 16) }) { g.bitmap = GenerationID(v) }
            h.disks[n] = LocalDisk(state: st, generations: g)
            feed(n, .disk(h.disks[n]!))
        case "drained":
            feed(try node(args.first), .switchoverDrained)
        case "clockjump":
            let n = try node(args.first)
            feed(n, .clockJump(try Self.duration(args.dropFirst().first)))
        case "freeze":
            let n = try node(args.first)
            let d = try Self.duration(args.dropFirst().first)
            h.advance(d)
            behind[n, default: .zero] += d
        case "crash":
            let n = try node(args.first)
            h.nodes[n] = nil
            h.inbox.removeAll { $0.to == n }
        case "restart":
            if args.first == "w" {
                h.restartArbitrator()
            } else {
                let n = try node(args.first)
                h.restartNode(n)
                started(n)
            }
        case "start":
            let n = try node(args.first)
            let kv = keyValues(args.dropFirst())
            func epoch(_ k: String) -> Epoch? { kv[k].flatMap(UInt64.init).map(Epoch.init) }
            func id(_ k: String) -> NodeID? { kv[k].flatMap { $0 == "-" ? nil : NodeID($0) } }
            var p = NodePersistentState(promisedEpoch: epoch("epoch") ?? .zero, votedFor: id("voted"), master: id("master"),
                                        peerOutdatedAt: epoch("peerOutdatedAt"))
            p.fencedEpoch = epoch("fenced")
            h.persisted[n] = p
            let since = try kv["since"].map { try Self.duration($0) } ?? .zero
            h.nodes[n] = NodeCore(cluster: "c", me: n, peer: n == Harness.a ? Harness.b : Harness.a, arbitrator: Harness.w,
                                  settings: h.settings, persisted: p, disk: h.disks[n]!, now: h.now - since)
            started(n)
        case "elect":
            let n = try node(args.first)
            h.handle(n, .admin(.promote(force: false)))
            h.deliverAll()
            h.tick(n)
            h.deliverAll()
            output.append(contentsOf: [Harness.a, Harness.b].map { status($0) })
        case "run":
            let d = try Self.duration(args.first)
            var cuts: [(NodeID, NodeID)] = []
            var i = 1
            while i < args.count {
                switch args[i] {
                case "cut":
                    let r = args[i + 1]
                    if let arrow = r.range(of: "->") {
                        cuts.append((NodeID(String(r[..<arrow.lowerBound])), NodeID(String(r[arrow.upperBound...]))))
                    } else {
                        let p = r.split(separator: "-").map { NodeID(String($0)) }
                        cuts.append((p[0], p[1])); cuts.append((p[1], p[0]))
                    }
                    i += 2
                case "isolate":
                    let n = NodeID(args[i + 1])
                    for o in [Harness.a, Harness.b, Harness.w] where o != n { cuts.append((n, o)); cuts.append((o, n)) }
                    i += 2
                default: throw Bad("run DURATION [cut x-y] [cut x->y] [isolate x]")
                }
            }
            h.run(for: d, drop: { from, to, _ in cuts.contains { $0.0 == from && $0.1 == to } })
            output.append(contentsOf: [Harness.a, Harness.b].map { status($0) } + [arbitratorStatus()])
        case "status":
            if args.first == "w" { output.append(arbitratorStatus()) } else { output.append(status(try node(args.first))) }
        default:
            throw Bad("unknown command \(verb)")
        }
    }

    private func feed(_ n: NodeID, _ e: NodeEvent) {
        renderNow = local(n)
        for a in h.handle(n, e, at: local(n)) { output.append("\(n): \(render(a))") }
        renderNow = h.now
    }

    private func started(_ n: NodeID) {
        guard var core = h.nodes[n] else { return }
        let out = core.start(at: local(n))
        h.nodes[n] = core
        for a in out {
            if case let .persist(p) = a { h.persisted[n] = p }
            output.append("\(n): \(render(a))")
        }
    }

    private func deliver(_ from: NodeID, _ to: NodeID, _ m: QuorumMessage) {
        if to == Harness.w {
            let out = h.arbitrator.handle(cluster: "c", from: from, m, at: h.now)
            h.arbitratorActions.append(contentsOf: out)
            for a in out {
                switch a {
                case let .send(_, t, msg): h.inbox.append((Harness.w, t, msg))
                case let .persist(_, p): h.arbitratorPersisted = p
                case .log: break
                }
                output.append("w: \(render(a))")
            }
        } else if h.nodes[to] != nil {
            feed(to, .received(from: from, m))
        }
    }

    // MARK: - Parsing

    static func duration(_ s: String?) throws -> Duration {
        guard let s else { throw Bad("expected a duration") }
        if s.hasSuffix("ms"), let v = Double(s.dropLast(2)) { return .nanoseconds(Int64(v * 1e6)) }
        if s.hasSuffix("s"), let v = Double(s.dropLast()) { return .nanoseconds(Int64(v * 1e9)) }
        throw Bad("bad duration \(s)")
    }

    static func route(_ s: String) throws -> (NodeID, NodeID) -> Bool {
        guard let arrow = s.range(of: "->") else { throw Bad("expected FROM->TO, got \(s)") }
        let from = String(s[..<arrow.lowerBound]), to = String(s[arrow.upperBound...])
        return { f, t in (from.isEmpty || from == "*" || f.name == from) && (to.isEmpty || to == "*" || t.name == to) }
    }

    static func message(_ words: [String]) throws -> QuorumMessage {
        guard let kind = words.first else { throw Bad("expected a message") }
        var kv: [String: String] = [:]
        for a in words.dropFirst() { let p = a.split(separator: "=", maxSplits: 1).map(String.init); if p.count == 2 { kv[p[0]] = p[1] } }
        func e(_ k: String) throws -> Epoch { guard let v = kv[k].flatMap(UInt64.init) else { throw Bad("\(kind): missing \(k)=") }; return Epoch(v) }
        func u(_ k: String) throws -> UInt64 { guard let v = kv[k].flatMap(UInt64.init) else { throw Bad("\(kind): missing \(k)=") }; return v }
        func b(_ k: String) throws -> Bool { guard let v = kv[k].flatMap(Bool.init) else { throw Bad("\(kind): missing \(k)=") }; return v }
        func n(_ k: String) throws -> NodeID { guard let v = kv[k] else { throw Bad("\(kind): missing \(k)=") }; return NodeID(v) }
        let gen = GenerationID(kv["gen"].flatMap { UInt64($0, radix: 16) } ?? 1)
        switch kind {
        case "renew": return .renew(epoch: try e("e"), seq: try u("seq"), generation: gen)
        case "renewReply": return .renewReply(epoch: try e("e"), seq: try u("seq"), granted: try b("granted"), promised: try e("promised"))
        case "voteRequest":
            return .voteRequest(VoteRequest(epoch: try e("e"), round: try u("round"), disk: kv["disk"].flatMap(DiskState.init(rawValue:)) ?? .upToDate,
                                            generations: DataGenerations(current: gen), force: kv["force"] == "true"))
        case "voteReply":
            let refusal: VoteRefusal? = kv["refusal"].map { $0 == "staleEpoch" ? .staleEpoch : .other($0) }
            return .voteReply(epoch: try e("e"), round: try u("round"), promised: try e("promised"), refusal: refusal)
        case "outdate": return .outdate(peer: try n("peer"), epoch: try e("e"), instance: try u("i"))
        case "outdateReply": return .outdateReply(peer: try n("peer"), epoch: try e("e"), instance: try u("i"), granted: try b("granted"), promised: try e("promised"))
        case "clearOutdate": return .clearOutdate(peer: try n("peer"), epoch: try e("e"), instance: try u("i"))
        case "clearOutdateReply": return .clearOutdateReply(peer: try n("peer"), epoch: try e("e"), instance: try u("i"))
        case "release": return .release(epoch: try e("e"), handoverTo: kv["to"].flatMap { $0 == "-" ? nil : NodeID($0) })
        case "heartbeat":
            return .heartbeat(Heartbeat(epoch: try e("e"), master: kv["master"].flatMap { $0 == "-" ? nil : NodeID($0) },
                                        disk: kv["disk"].flatMap(DiskState.init(rawValue:)) ?? .upToDate,
                                        generations: DataGenerations(current: gen), maintenance: kv["maintenance"] == "true"))
        case "identify": return .identify
        case "identifyReply": return .identifyReply(promised: try e("promised"))
        default: throw Bad("unknown message \(kind)")
        }
    }

    // MARK: - Rendering

    func time(_ i: Instant) -> String {
        if i == .zero { return "0" }
        let ms = (i - origin).milliseconds
        return String(format: "%.3fs", ms / 1000)
    }

    static func opt(_ n: NodeID?) -> String { n?.name ?? "-" }
    static func opt(_ e: Epoch?) -> String { e?.description ?? "-" }
    static func gens(_ g: DataGenerations) -> String { g.bitmap.isNone ? "\(g.current)" : "\(g.current) bitmap=\(g.bitmap)" }

    static func render(_ m: QuorumMessage) -> String {
        switch m {
        case let .renew(e, seq, g): return "renew e=\(e) seq=\(seq) gen=\(g)"
        case let .renewReply(e, seq, granted, promised): return "renewReply e=\(e) seq=\(seq) granted=\(granted) promised=\(promised)"
        case let .voteRequest(r): return "voteRequest e=\(r.epoch) round=\(r.round) disk=\(r.disk.rawValue) gen=\(gens(r.generations)) force=\(r.force)"
        case let .voteReply(e, round, promised, refusal):
            return "voteReply e=\(e) round=\(round) promised=\(promised) " + (refusal.map { "refused: \($0)" } ?? "granted")
        case let .outdate(p, e, i): return "outdate peer=\(p) e=\(e) i=\(i)"
        case let .outdateReply(p, e, i, granted, promised): return "outdateReply peer=\(p) e=\(e) i=\(i) granted=\(granted) promised=\(promised)"
        case let .clearOutdate(p, e, i): return "clearOutdate peer=\(p) e=\(e) i=\(i)"
        case let .clearOutdateReply(p, e, i): return "clearOutdateReply peer=\(p) e=\(e) i=\(i)"
        case let .release(e, to): return "release e=\(e) to=\(opt(to))"
        case let .heartbeat(hb):
            return "heartbeat e=\(hb.epoch) master=\(opt(hb.master)) disk=\(hb.disk.rawValue) gen=\(gens(hb.generations))\(hb.maintenance ? " maintenance" : "")"
        case .identify: return "identify"
        case let .identifyReply(p): return "identifyReply promised=\(p)"
        case let .stamped(inc, inner): return render(inner) + (inc == 0 ? "" : " [incarnation \(String(inc, radix: 16))]")
        }
    }

    /// A log event without the fields the prefix already says (`cluster`; `node` on a node).
    static func render(_ e: QuorumEvent, dropNode: Bool = true) -> String {
        (["log", e.name] + e.fields.filter { $0.key != "cluster" && !(dropNode && $0.key == "node") }.map { "\($0.key)=\($0.value)" }).joined(separator: " ")
    }

    func render(_ a: NodeAction) -> String {
        switch a {
        case let .send(to, m): return "send \(to) \(Self.render(m))"
        case let .persist(p):
            var s = "persist epoch=\(p.promisedEpoch) voted=\(Self.opt(p.votedFor)) master=\(Self.opt(p.master)) lastMaster=\(Self.opt(p.lastMasterEpoch)) role=\(p.role.rawValue)"
            if p.maintenance { s += " maintenance" }
            if let o = p.peerOutdatedAt { s += " peerOutdatedAt=\(o)" }
            if let f = p.fencedEpoch { s += " fenced=\(f)" }
            if let g = p.masterGeneration { s += " masterGen=\(g.raw)" }
            if let i = p.arbitratorIncarnation { s += " incarnation=\(String(i, radix: 16))" }
            return s
        case let .writeGate(g): return gate(g)
        case let .becomePrimary(e, g): return "becomePrimary e=\(e) newGeneration=\(g)"
        case let .becomeSecondary(e, m): return "becomeSecondary e=\(e) master=\(Self.opt(m))"
        case .drainForSwitchover: return "drainForSwitchover"
        case .cancelDrain: return "cancelDrain"
        case let .fence(e): return "fence e=\(e)"
        case .fenceServices: return "fenceServices"
        case .unfenceServices: return "unfenceServices"
        case let .adminResult(c, r):
            switch r {
            case .success(let s): return "adminResult \(c) ok: \(s)"
            case .failure(let f): return "adminResult \(c) refused: \(f.reason)"
            }
        case let .log(e): return Self.render(e)
        }
    }

    func gate(_ g: WriteGate) -> String {
        g.validUntil <= renderNow
            ? "gate e=\(g.epoch) closed"
            : "gate e=\(g.epoch) until=\(time(g.validUntil)) peer=\(g.peerRequired ? "required" : "outdated")"
    }

    func render(_ a: ArbitratorAction) -> String {
        switch a {
        case let .send(_, to, m): return "send \(to) \(Self.render(m))"
        case let .persist(_, p):
            return "persist epoch=\(p.promisedEpoch) voted=\(Self.opt(p.votedFor)) master=\(Self.opt(p.master)) gen=\(p.masterGeneration)"
                + " outdated=[\(p.outdated.map { "\($0.node)@\($0.epoch).\($0.instance)" }.joined(separator: ","))]"
                + " cleared=[\(p.cleared.map { "\($0.node)@\($0.epoch).\($0.instance)" }.joined(separator: ","))]"
        case let .log(e): return Self.render(e, dropNode: false)
        }
    }

    func status(_ n: NodeID) -> String {
        guard let core = h.nodes[n] else { return "\(n): down" }
        renderNow = local(n)
        defer { renderNow = h.now }
        let s = core.status
        var line = "\(n): \(s.role.rawValue) epoch=\(s.epoch) master=\(Self.opt(s.master)) \(gate(s.gate))"
        if let f = h.persisted[n]?.fencedEpoch { line += " fenced=\(f)" }
        if s.peerOutdated { line += " peerOutdated" }
        if let p = h.persisted[n], let o = p.peerOutdatedAt { line += " peerOutdatedAt=\(o)" }
        if let w = s.whyNotPromoted { line += " why=\"\(w)\"" }
        return line
    }

    func arbitratorStatus() -> String {
        guard let s = h.arbitrator.status(cluster: "c") else { return "w: no state" }
        return "w: epoch=\(s.epoch) master=\(Self.opt(s.master)) voted=\(Self.opt(s.votedFor)) outdated=[\(s.outdated.map { "\($0.node)@\($0.epoch).\($0.instance)" }.joined(separator: ","))]"
    }
}
