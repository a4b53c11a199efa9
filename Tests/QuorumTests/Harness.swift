import HACore
@testable import Quorum

/// Drives a, b and w by hand for the rule tests: every message is queued and delivered only
/// when the test says so, at the harness's current time (one shared clock unless a test
/// passes its own instants).
final class Harness {
    static let a: NodeID = "a", b: NodeID = "b", w: NodeID = "w"
    var settings: QuorumSettings
    var nodes: [NodeID: NodeCore] = [:]
    var arbitrator: ArbitratorCore
    var arbitratorPersisted = ArbitratorPersistentState.initial
    var persisted: [NodeID: NodePersistentState] = [:]
    var now: Instant
    var inbox: [(from: NodeID, to: NodeID, message: QuorumMessage)] = []
    /// Every action each node produced, in order.
    var actions: [NodeID: [NodeAction]] = [:]
    var arbitratorActions: [ArbitratorAction] = []
    var disks: [NodeID: LocalDisk] = [:]


    var t: LeaseTimings { settings.timings }

    /// Cores are created at `start`; by `now` (start + 2 s) every restart quarantine is over.
    init(settings: QuorumSettings = QuorumSettings(), disks: [NodeID: LocalDisk] = [:]) {
        self.settings = settings
        let start = Instant(nanoseconds: 100_000_000_000)
        now = start + .seconds(2)
        arbitrator = ArbitratorCore(settings: settings, persisted: [:])
        _ = arbitrator.handle(cluster: "c", from: "x", .heartbeat(Heartbeat(epoch: .zero, master: nil, disk: .upToDate, generations: DataGenerations(current: GenerationID(1)), maintenance: false)), at: start)
        for (me, peer) in [(Self.a, Self.b), (Self.b, Self.a)] {
            let d = disks[me] ?? LocalDisk(state: .upToDate, generations: DataGenerations(current: GenerationID(1)))
            self.disks[me] = d
            nodes[me] = NodeCore(cluster: "c", me: me, peer: peer, arbitrator: Self.w, settings: settings,
                                 persisted: .initial, disk: d, now: start)
            persisted[me] = .initial
        }
    }

    func advance(_ d: Duration) { now = now + d }

    @discardableResult
    func handle(_ id: NodeID, _ event: NodeEvent, at instant: Instant? = nil) -> [NodeAction] {
        guard var core = nodes[id] else { return [] }
        let out = core.handle(event, at: instant ?? now)
        nodes[id] = core
        actions[id, default: []].append(contentsOf: out)
        for a in out {
            switch a {
            case let .send(to, m): inbox.append((id, to, m))
            case let .persist(p): persisted[id] = p
            default: break
            }
        }
        return out
    }

    @discardableResult
    func arbitrate(from: NodeID, _ m: QuorumMessage, at instant: Instant? = nil) -> [ArbitratorAction] {
        let out = arbitrator.handle(cluster: "c", from: from, m, at: instant ?? now)
        arbitratorActions.append(contentsOf: out)
        for a in out {
            switch a {
            case let .send(_, to, m): inbox.append((Self.w, to, m))
            case let .persist(_, p): arbitratorPersisted = p
            case .log: break
            }
        }
        // Nodes get the stamped replies (above); assertions look at what is inside the stamp.
        return out.map { if case let .send(c, to, m) = $0 { return .send(cluster: c, to: to, m.unstamped) }; return $0 }
    }

    /// Delivers queued messages (and whatever they cause) until none is left; `drop` models
    /// a partition or loss.
    func deliverAll(drop: (NodeID, NodeID, QuorumMessage) -> Bool = { _, _, _ in false }) {
        var guardCount = 0
        while !inbox.isEmpty, guardCount < 1000 {
            guardCount += 1
            let (from, to, m) = inbox.removeFirst()
            if drop(from, to, m.unstamped) { continue }
            if to == Self.w { arbitrate(from: from, m) } else { handle(to, .received(from: from, m)) }
        }
    }

    func status(_ id: NodeID) -> NodeQuorumStatus { nodes[id]!.status }

    /// a wins epoch 1 with everyone's vote and b follows it; returns once a's gate is open.
    func electA() {
        handle(Self.a, .admin(.promote(force: false)))
        deliverAll()
        tick(Self.a)
        deliverAll()
    }

    func tick(_ id: NodeID) { handle(id, .tick) }

    /// Time passes in renew-interval steps with ticks on both nodes, delivering as it goes.
    func run(for d: Duration, drop: (NodeID, NodeID, QuorumMessage) -> Bool = { _, _, _ in false }) {
        let end = now + d
        while now < end {
            advance(t.renewInterval / 2)
            tick(Self.a); tick(Self.b)
            deliverAll(drop: drop)
        }
    }

    func restartNode(_ id: NodeID) {
        let peer = id == Self.a ? Self.b : Self.a
        nodes[id] = NodeCore(cluster: "c", me: id, peer: peer, arbitrator: Self.w, settings: settings,
                             persisted: try! NodePersistentState.decode(persisted[id]!.encoded()), disk: disks[id]!, now: now)
    }

    /// The arbitrator comes back with another state (wiped and re-created, or rolled back).
    func replaceArbitrator(with state: ArbitratorPersistentState) {
        arbitratorPersisted = state
        arbitrator = ArbitratorCore(settings: settings, persisted: ["c": state])
    }

    func restartArbitrator() {
        arbitrator = ArbitratorCore(settings: settings, persisted: ["c": try! ArbitratorPersistentState.decode(arbitratorPersisted.encoded())])
    }
}

extension Array where Element == NodeAction {
    var sent: [(to: NodeID, message: QuorumMessage)] {
        compactMap { if case let .send(to, m) = $0 { return (to, m) }; return nil }
    }
    var gates: [WriteGate] { compactMap { if case let .writeGate(g) = $0 { return g }; return nil } }
    var logNames: [String] { compactMap { if case let .log(e) = $0 { return e.name }; return nil } }
    func index(where p: (NodeAction) -> Bool) -> Int? { firstIndex(where: p) }
    var becamePrimary: (epoch: Epoch, newGeneration: Bool)? {
        for a in self { if case let .becomePrimary(e, g) = a { return (e, g) } }
        return nil
    }
}

func voteRefusals(_ out: [NodeAction]) -> [VoteRefusal] {
    out.sent.compactMap { if case let .voteReply(_, _, _, r) = $0.message { return r }; return nil }
}
