import Foundation
import HAShell
import NIOCore
import Quorum
import Replication
import ReplicationShell

/// What a node tells operators and monitoring: `/status`, `/metrics`, `/healthz`.
extension NodeDaemon {
    func statusHandlers() -> StatusHandlers {
        StatusHandlers(
            status: { [weak self] callerLoop in
                guard let self else { return callerLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
                return callerLoop.makeCompletedFuture { try JSONEncoder.hamgr.encode(self.statusDocument()) }
            },
            metrics: { [weak self] in self?.metricsText() ?? "" },
            healthy: { [weak self] in self?.isHealthy ?? false },
            admin: { [weak self] request, callerLoop in
                guard let self else { return callerLoop.makeSucceededFuture(.refused("shutting down", status: 503)) }
                return self.admin(request, on: callerLoop)
            })
    }

    /// Built from the core's and the volume's latest snapshots; any thread, never waits.
    /// The role is derived here, from the lease expiry against the clock read after the
    /// snapshot: a node whose lease has lapsed never reads as primary, even before its
    /// ticker has fed the core the event that demotes it (`NodeQuorumStatus.announced`).
    func statusDocument() -> StatusDocument {
        let (q, now) = announcedCoreStatus()
        let v = replicatedVolume.status
        let masterDoc: StatusDocument.Master? = q.master.flatMap { m in
            (try? config.node(named: m.name)).map { StatusDocument.Master(node: m.name, serviceAddress: $0.serviceAddress) }
        }
        let leaseMs: Int64 = q.leaseRemaining(at: now).nanosecondsClamped / 1_000_000
        // Progress is shown while a copy runs, not after it finished.
        let copying = v.verifyRunning || v.peerState == .behind || v.diskState == .inconsistent
        let resync: StatusDocument.Resync? = copying && v.resyncTotalBytes > 0
            ? StatusDocument.Resync(doneBytes: v.resyncDoneBytes, totalBytes: v.resyncTotalBytes, kind: v.verifyRunning ? "verify" : "resync")
            : nil
        return StatusDocument(
            cluster: config.cluster.name, node: me.name.name, role: q.role, epoch: q.epoch.value, master: masterDoc,
            diskState: q.disk,
            peer: StatusDocument.Peer(node: peer.name.name, statusURL: config.statusURL(peer.statusAddress) + "/status",
                                      reachable: q.peerReachable, replication: v.peerState, diskState: v.peerDiskState),
            arbitrator: StatusDocument.Arbitrator(reachable: q.arbitratorReachable ?? arbitratorLinkUp, refused: q.arbitratorRefused),
            quorum: q.hasQuorum, leaseValidMs: leaseMs, outOfSyncBytes: v.outOfSyncBytes, resync: resync,
            splitBrain: v.splitBrain,
            // "local disk is inconsistent" alone does not say what to do: add the volume's note.
            whyNotPromoted: q.whyNotPromoted.map { why in v.diskNote.map { "\(why) (\($0))" } ?? why },
            maintenance: q.maintenance,
            serviceAddress: me.serviceAddress, generation: v.generations.current.description, resources: resourcesStatus,
            diskError: diskErrorStatus, diskNote: v.diskNote)
    }

    /// Refreshes the gauges from the cores and renders the exposition text.
    func metricsText() -> String {
        let (q, now) = announcedCoreStatus()
        let v = replicatedVolume.status
        metrics.setRole(q.role)
        metrics.setDiskState(q.disk)
        metrics.epoch.set(q.epoch.value)
        metrics.quorum.set(q.hasQuorum)
        metrics.peerUp.set(v.peerState != .disconnected)
        metrics.arbitratorUp.set(q.arbitratorReachable ?? arbitratorLinkUp)
        metrics.leaseRemainingSeconds.set(q.leaseRemaining(at: now).seconds)
        metrics.replicationLagBytes.set(v.replicationLagBytes)
        metrics.replicationLagSeconds.set(v.oldestUnconfirmedWrite.map { max(0, (now - $0).seconds) } ?? 0)
        metrics.outOfSyncBytes.set(v.outOfSyncBytes)
        metrics.resyncDoneBytes.set(v.resyncDoneBytes)
        metrics.resyncTotalBytes.set(v.resyncTotalBytes)
        metrics.maintenance.set(q.maintenance)
        metrics.healthy.set(isHealthy)
        metrics.arbitratorRefused.set(q.arbitratorRefused != nil)
        metrics.splitBrain.set(v.splitBrain != nil)
        recordCumulativeFigures(nbd: nbd.statistics, resyncBytesSent: v.resyncBytesSent, link: replicatedVolume.linkBytes)
        return metrics.registry.render() + ProcessMetrics.render()
    }

    /// The core's latest snapshot as it may be announced now: the clock is read after the
    /// snapshot, so a lease that lapsed since the core's last event counts as lapsed.
    func announcedCoreStatus() -> (NodeQuorumStatus, Instant) {
        let snapshot = coreStatus
        let now = MonotonicClock.now()
        return (snapshot.announced(at: now), now)
    }
}
