import HACore
import Quorum
import Replication

/// Everything a data node's runtime needs from the world, and nothing it decides. `hamgr run`
/// implements it with files, sockets, the replicated volume, resources and hooks; the
/// whole-node simulator with simulated disks, network and clocks. The runtime calls it only
/// from its own serial context (the daemon's control queue, the simulator's event loop).
public protocol NodeHost: AnyObject, Sendable {
    /// The host's clock (monotonic; the simulator's per-node clock with drift and pauses).
    func now() -> Instant
    /// Makes the quorum state durable before returning. A throw means the vote or epoch
    /// cannot be relied on: the runtime stops acting and calls `fatal`.
    func persist(_ state: NodePersistentState) throws
    /// Sends a quorum message (best effort: a message may be lost, the core retries).
    func send(_ message: QuorumMessage, to node: NodeID, epoch: Epoch)
    /// One structured state-change event (cluster, node and epoch are among its fields).
    func log(_ event: QuorumEvent)
    /// A condition the node cannot continue from (e.g. persisting failed). The daemon exits
    /// (systemd restarts it from its last durable state); the simulator crashes the node.
    func fatal(_ reason: String)

    /// The replication layer's shell (`ReplicatedVolume`, or the simulator's volume).
    var volume: any NodeVolume { get }

    /// Services above the block layer, started after the volume became primary: export the
    /// volume, start resources in order, announce (hooks). `kind` is for metrics.
    func startServices(epoch: Epoch, kind: PromotionKind)
    /// Close the export and stop resources (a demotion; a switchover's drain uses
    /// `suspendServices`). `done` runs on the runtime's context when the stop finished (or
    /// failed: it is logged).
    func stopServices(epoch: Epoch, master: NodeID?, wasPrimary: Bool, then done: @escaping () -> Void)
    /// Before a switchover's drain: stop resources (a filesystem flushes through the export);
    /// the export stays, the volume suspends writes. `done` runs on the runtime's context.
    func suspendServices(then done: @escaping () -> Void)
    /// An abandoned switchover (`NodeAction.cancelDrain`): start the resources `suspendServices` stopped.
    func resumeServices(epoch: Epoch)
    /// Freeze the services above the block layer now, fast and without I/O, so page-cache
    /// reads stop before a new master can exist (`NodeAction.fenceServices`).
    func fenceServices()
    /// Thaw what `fenceServices` froze (a fresh grant moved the lease end past the margin).
    func unfenceServices()
    /// Maintenance mode: resources are not restarted while on.
    func holdServiceRestarts(_ on: Bool)
    /// `resource_cleanup`: forget the failures of resource `name` (every resource when nil)
    /// on this node. `reply` runs on the runtime's context exactly once.
    func cleanupResources(_ name: String?, reply: @escaping (NodeAdminOutcome) -> Void)

    /// Log (critical) and record durably that this node's store failed, so a restart comes back outdated.
    func recordDiskFailure(_ detail: String)
    /// The store was verified against the peer: drop the record.
    func clearDiskFailure()

    /// Runs `work` on the runtime's serial context (any thread may call it).
    func enqueue(_ work: @escaping @Sendable () -> Void)
}

/// How a node became primary (metrics `hamgr_failovers_total{kind}`).
public enum PromotionKind: String, Sendable {
    case failover, switchover, forced
}

/// The replicated volume as the runtime drives it. Calls return at once unless they throw;
/// their effects reach the volume's loop in call order.
public protocol NodeVolume: AnyObject {
    var status: ReplicationStatus { get }
    func setWriteGate(_ gate: WriteGate)
    /// The replication fencing token: frames of older epochs are refused.
    func setPromisedEpoch(_ epoch: Epoch)
    /// Durable (header with the epoch) before it returns; refused unless up to date.
    func becomePrimary(epoch: Epoch, newGeneration: Bool) throws
    func becomeSecondary(epoch: Epoch)
    /// Suspend new writes, drain in-flight ones, confirm the peer has them all. `done` may run
    /// on any thread.
    func drainForSwitchover(_ done: @escaping @Sendable (Result<Void, Error>) -> Void)
    /// Resume writes after an abandoned switchover; a drain still pending fails.
    func cancelDrain()
    func startVerify(repair: Bool)
    func requestResync()
    func bootstrap(assumeClean: Bool) throws
    func invalidate() throws
    func resolveSplitBrain(discardLocal: Bool)
}
