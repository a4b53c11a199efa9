import HACore
import Quorum

/// What the arbitrator's runtime needs from the world: durable per-cluster state, sessions
/// to the data nodes, a log. `hamgr arbitrator` implements it with files and sockets, the
/// whole-node simulator with a simulated disk and network.
public protocol ArbitratorHost: AnyObject, Sendable {
    func now() -> Instant
    /// Durable before returning; a throw stops the arbitrator (`fatal`): it never replies on
    /// the strength of a vote it could not make durable.
    func persist(cluster: String, _ state: ArbitratorPersistentState) throws
    func send(_ message: QuorumMessage, cluster: String, to node: NodeID, epoch: Epoch)
    func log(cluster: String, _ event: QuorumEvent)
    func fatal(_ reason: String)
}

/// The one interpreter of the arbitrator core's actions, shared by the daemon and the simulator.
/// Confined to the host's serial context (the daemon's decision loop, the simulator's loop).
public final class ArbitratorRuntime<Host: ArbitratorHost>: @unchecked Sendable {
    public private(set) var core: ArbitratorCore
    private unowned let host: Host
    private var halted = false

    public init(core: ArbitratorCore, host: Host) {
        self.core = core
        self.host = host
    }

    public func receive(cluster: String, from: NodeID, _ message: QuorumMessage) {
        guard !halted else { return }
        let actions = core.handle(cluster: cluster, from: from, message, at: host.now())
        for action in actions where !halted {
            switch action {
            case .send(let c, let to, let m):
                host.send(m, cluster: c, to: to, epoch: core.epoch(cluster: c))
            case .persist(let c, let state):
                do { try host.persist(cluster: c, state) } catch {
                    halted = true
                    host.fatal("cannot persist arbitrator state for \(c): \(error)")
                }
            case .log(let event):
                host.log(cluster: cluster, event)
            }
        }
    }
}
