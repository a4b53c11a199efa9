import HACore
import NIOCore
import Quorum
import Replication

/// The quorum connections between a, b and w (indexes 0, 1, 2). Each direction of each pair
/// can be cut on its own; messages may be lost, duplicated, delayed and so reordered (the
/// cores resend everything that matters). Every delivered message goes through the real
/// wire codec.
final class QuorumNet {
    unowned let sim: Simulator
    /// cut[from][to]: that direction delivers nothing.
    var cut = [[Bool]](repeating: [Bool](repeating: false, count: 3), count: 3)
    var loss = 0.0
    var duplicate = 0.0
    var slow = 0.0
    /// Per receiver: every message to it takes this long (a congested or distant inbound path).
    var lagTo: [Int64?] = [nil, nil, nil]
    var sent = 0

    init(sim: Simulator) { self.sim = sim }

    func send(from: Int, to: Int, _ m: QuorumMessage) {
        sent += 1
        guard !cut[from][to], !sim.chance(loss) else {
            sim.trace("\(Simulator.names[from]) -> \(Simulator.names[to]) LOST \(m)")
            return
        }
        let copies = sim.chance(duplicate) ? 2 : 1
        let bytes = m.encoded()
        for _ in 0..<copies {
            var delay = sim.chance(slow) ? sim.uniform(50_000_000, 900_000_000) : sim.uniform(300_000, 8_000_000)
            if let lag = lagTo[to] { delay += lag }
            sim.at(sim.now + delay) { [sim] in sim.deliverQuorum(from: from, to: to, bytes) }
        }
    }
}

/// The replication connection between a and b: numbered sessions with TCP's guarantees
/// (in order, no loss or duplication within a session) and its failure modes: a direction
/// cut silently holds frames (retransmission) until it heals or the link timeout closes the
/// session on both sides; a crashed host's peer notices at once (reset) or only after the
/// timeout (power loss); delay spikes. Frames are encoded and decoded with the real
/// `LinkMessage` codec, and a garbled frame can be injected (malformed-frame path).
final class ReplicationLink {
    unowned let sim: Simulator

    final class Session {
        let id: SessionID
        /// Side i has not seen its end yet.
        var open = [true, true]
        var alive = true
        /// Per receiving side: what is on its way, delivered strictly in order.
        var inbox: [[Delivery]] = [[], []]
        var heads = [0, 0]
        var lastDelivery: [Int64] = [0, 0]
        /// Frames held by a cut direction (indexed by receiver).
        var held: [[Delivery]] = [[], []]
        init(id: SessionID) { self.id = id }
    }

    enum Delivery {
        case up(NodeID)
        /// `message`: what the sender meant (the model's view; nil when garbled).
        case frame(kind: UInt8, epoch: Epoch, payload: ByteBuffer, message: LinkMessage?)
    }

    var session: Session?
    var nextID: SessionID = 1
    /// cut[from][to] for the replication network only.
    var cut = [[false, false], [false, false]]
    var latency: (Int64, Int64) = (200_000, 3_000_000)
    var spike = 0.0
    var garble = 0.0
    var linkTimeout: Int64 = 800_000_000
    var redial: Int64 = 200_000_000
    var frames = 0
    var sessions = 0

    init(sim: Simulator) { self.sim = sim }

    /// Dials when there is no session (node a dials b, every redial delay).
    func dialLoop() {
        sim.at(sim.now + redial) { [self] in
            dialIfPossible()
            dialLoop()
        }
    }

    private func dialIfPossible() {
        guard session == nil else { return }
        let a = sim.nodes[0], b = sim.nodes[1]
        guard a.up, b.up, a.vol != nil, b.vol != nil, a.suspendedUntil == nil, b.suspendedUntil == nil,
              !cut[0][1], !cut[1][0] else { return }
        let s = Session(id: nextID)
        nextID += 1
        sessions += 1
        session = s
        sim.trace("replication session \(s.id) established")
        enqueue(s, to: 0, .up(Simulator.names[1]))
        enqueue(s, to: 1, .up(Simulator.names[0]))
    }

    func send(from: Int, session id: SessionID, _ m: LinkMessage, epoch: Epoch) {
        guard let s = session, s.id == id, s.alive, s.open[from] else { return }
        frames += 1
        var payload = m.encode()
        var message: LinkMessage? = m
        if garble > 0, sim.chance(garble), payload.readableBytes > 2 {
            message = nil
            // A frame that passed the transport but is not what the core expects (a peer bug).
            payload = payload.getSlice(at: payload.readerIndex, length: payload.readableBytes / 2) ?? payload
            sim.trace("\(Simulator.names[from]) -> \(Simulator.names[1 - from]) GARBLED \(m.kind) frame")
        }
        let d = Delivery.frame(kind: m.kind.rawValue, epoch: epoch, payload: payload, message: message)
        let to = 1 - from
        if cut[from][to] { s.held[to].append(d); return }
        enqueue(s, to: to, d)
    }

    private func enqueue(_ s: Session, to: Int, _ d: Delivery) {
        let delay = sim.chance(spike) ? sim.uniform(30_000_000, 300_000_000) : sim.uniform(latency.0, latency.1)
        let at = max(sim.now + delay, s.lastDelivery[to])
        s.lastDelivery[to] = at
        s.inbox[to].append(d)
        let node = sim.nodes[to]
        sim.at(at) { [self] in
            sim.onNode(node, after: 0) { [self] in deliverHead(s, to: to) }
        }
    }

    private func deliverHead(_ s: Session, to: Int) {
        guard s.heads[to] < s.inbox[to].count else { return }
        let d = s.inbox[to][s.heads[to]]
        s.heads[to] += 1
        guard s.alive, s.open[to], let v = sim.nodes[to].vol else { return }
        switch d {
        case .up(let peer): v.linkUp(s.id, peer: peer)
        case let .frame(kind, epoch, payload, message):
            v.frame(s.id, kind: kind, epoch: epoch, payload: payload)
            // The receiver's core took the frame (it did not refuse it and close the session).
            if let message, s.alive, s.open[to] { sim.peerReceived(to, message) }
        }
    }

    /// A core closed the session: the closer's end is gone now; the peer sees the close after
    /// what the closer had already sent.
    func close(_ id: SessionID, by side: Int) {
        guard let s = session, s.id == id, s.alive else { return }
        s.alive = false
        session = nil
        sim.noteLinkLoss()
        sim.trace("replication session \(id) closed by \(Simulator.names[side])")
        end(s, side: side, after: 0, "closed")
        let peerAt = max(sim.now + latency.0, s.lastDelivery[1 - side]) - sim.now
        end(s, side: 1 - side, after: peerAt, "closed by peer")
    }

    /// Host i went down: the peer notices at once (process crash: reset) or after the link
    /// timeout (power loss, frozen host: silence).
    func nodeDown(_ i: Int, abrupt: Bool) {
        guard let s = session, s.alive else { return }
        s.alive = false
        session = nil
        sim.noteLinkLoss()
        s.open[i] = false
        end(s, side: 1 - i, after: abrupt ? linkTimeout : latency.1, abrupt ? "link timeout" : "connection reset")
    }

    /// The connection is reset (a middlebox, an interface flap): both sides see it close.
    func reset(_ why: String) {
        guard let s = session, s.alive else { return }
        s.alive = false
        session = nil
        sim.noteLinkLoss()
        sim.trace("replication session \(s.id) reset")
        end(s, side: 0, after: sim.uniform(latency.0, latency.1), why)
        end(s, side: 1, after: sim.uniform(latency.0, latency.1), why)
    }

    /// A silent peer (stopped or frozen past the link timeout): the other side gives up.
    func timeout(by side: Int, _ why: String) {
        guard let s = session, s.alive else { return }
        s.alive = false
        session = nil
        sim.noteLinkLoss()
        sim.trace("replication session \(s.id) timed out at \(Simulator.names[side]) (\(why))")
        end(s, side: side, after: 0, "link timeout")
        end(s, side: 1 - side, after: latency.1, "connection reset")
    }

    private func end(_ s: Session, side: Int, after delay: Int64, _ why: String) {
        let node = sim.nodes[side]
        sim.at(sim.now + delay) { [self] in
            sim.onNode(node, after: 0) { [self] in
                guard s.open[side] else { return }
                s.open[side] = false
                _ = self
                node.vol?.linkDown(s.id, why)
            }
        }
    }

    func setCut(from: Int, to: Int, _ on: Bool) {
        guard cut[from][to] != on else { return }
        cut[from][to] = on
        cutChanges[from][to] += 1
        guard let s = session else { return }
        if on {
            let serial = cutChanges[from][to]
            sim.at(sim.now + linkTimeout) { [self] in
                guard let cur = session, cur === s, cut[from][to], cutChanges[from][to] == serial else { return }
                timeout(by: to, "direction \(Simulator.names[from])→\(Simulator.names[to]) cut")
            }
        } else {
            let held = s.held[to]
            s.held[to] = []
            for d in held { enqueue(s, to: to, d) }
        }
    }
    private var cutChanges = [[0, 0], [0, 0]]
}
