import Crypto
import Foundation
import HAShell
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Quorum
import Replication
import ReplicationShell

/// `hamgr run`: wires one data node together. Owns nothing but wiring (style.md "Shape of
/// the house"): the quorum core decides, the replicated volume moves data, the NBD server
/// serves the export, the status server answers operators. Every core event is handled on
/// `control`, one serial queue, in arrival order; actions run in the order the core gave them,
/// and a `.persist` is durable before the next action runs.
final class NodeDaemon: @unchecked Sendable {
    let config: ClusterConfig
    let me: ClusterConfig.Node
    let peer: ClusterConfig.Node
    let group: MultiThreadedEventLoopGroup
    /// The control queue: every core event and action runs here, in order. It is not an
    /// event loop, so it may call the volume's synchronous control methods (which wait for
    /// the volume's loop); nothing on an event loop ever waits for it.
    let control = DispatchQueue(label: "hamgr.control")
    /// The core's status as of the last event, for status and metrics readers on any thread.
    private let snapshotLock = NIOLock()
    private var coreSnapshot: NodeQuorumStatus
    var logger: Logger
    private let key: SymmetricKey
    private let statePath: String
    private var core: NodeCore
    let volume: ReplicatedVolume
    let nbd: NBDServer
    private var statusServer: StatusServer?
    private var listener: PeerListener?
    private var peerQuorum: PeerConnection?
    private var arbitratorQuorum: PeerConnection? {
        didSet { snapshotLock.withLock { arbitratorLinkUpSnapshot = arbitratorQuorum != nil } }
    }
    private var arbitratorLinkUpSnapshot = false
    /// The quorum link to the arbitrator is established (a secondary talks to it only when
    /// it needs a vote, so link state is what tells an operator it is reachable).
    var arbitratorLinkUp: Bool { snapshotLock.withLock { arbitratorLinkUpSnapshot } }
    private var dialers: [PeerDialer] = []
    private var ticker: DispatchSourceTimer?
    private var resourceRefresh: DispatchSourceTimer?
    private var pendingAdmin: [(command: Quorum.AdminCommand, id: Int, reply: (AdminResponse) -> Void)] = []
    private var nextAdminID = 0
    private var lastPersisted: NodePersistentState
    let metrics = NodeMetrics(writeLatencyBuckets: NBDLatencyHistogram.bucketBounds)
    private let metricsLock = NIOLock()
    private var resyncSentSeen: UInt64 = 0  // under metricsLock
    private(set) var resources: ResourceManager!
    let hooks: HookRunner
    private var resourceSnapshot: [StatusDocument.Resource] = []  // under snapshotLock
    /// Resource starts and stops run one after another, in the order promotions and
    /// demotions happened (control queue only).
    private var resourceChain: Task<Void, Never>?
    /// Set when this node's store failed in an earlier run (the marker file exists): its data
    /// may lack writes the failure dropped from the page cache, so it stays `outdated` (never
    /// promotable) until a full online verify against the peer finds no mismatch.
    private var diskRepair: DiskRepair?
    enum DiskRepair { case waitingForPeer, verifying(round: Int), resyncing(round: Int) }
    private var diskFailedMarker: String { me.metadata + ".disk-failed" }
    private var diskError: String?  // under snapshotLock; set once, on the first failed store operation
    var diskErrorStatus: String? { snapshotLock.withLock { diskError } }
    private var maintenanceApplied = false
    private var nbdSeen = NBDStatistics()
    let notifier = SystemdNotifier()
    private var stopping = false
    private var promotedAt: Instant?

    init(config: ClusterConfig, node: String, group: MultiThreadedEventLoopGroup, logger: Logger) throws {
        self.config = config
        self.me = try config.node(named: node)
        self.peer = try config.peer(of: node)
        self.group = group
        var logger = logger
        logger[metadataKey: "cluster"] = .string(config.cluster.name)
        logger[metadataKey: "node"] = .string(node)
        self.logger = logger
        self.key = try config.loadClusterKey()
        self.statePath = me.metadata + ".quorum"

        let persisted: NodePersistentState
        if let bytes = try DurableFile.read(statePath) {
            persisted = try NodePersistentState.decode(bytes)
        } else {
            persisted = .initial
        }
        lastPersisted = persisted

        let peerRepl = try parseHostPort(peer.replicationAddress, key: "node.replication_address")
        volume = try ReplicatedVolume(
            config: ReplicatedVolumeConfig(
                cluster: config.cluster.name, me: me.name, peer: peer.name,
                backingPath: me.backing, metadataPath: me.metadata,
                sizeBytes: config.volume.sizeBytes, chunkBytes: Int(config.volume.chunkSizeBytes),
                replicationProtocol: config.cluster.replicationProtocol,
                peerReplicationAddress: peerRepl, clusterKey: key,
                linkTimeout: config.timeouts.failureTimeout,
                resyncRateBytesPerSecond: Int(config.volume.resyncRateBytesPerSecond),
                createBacking: me.create),
            group: group, logger: logger, clock: { MonotonicClock.now() })
        let st = volume.status
        let repairPending = FileManager.default.fileExists(atPath: me.metadata + ".disk-failed")
        core = NodeCore(cluster: config.cluster.name, me: me.name, peer: peer.name, arbitrator: Self.arbitratorID,
                        settings: QuorumSettings(timings: config.timeouts, splitBrain: config.cluster.splitBrain,
                                                 plantedBugs: Self.plantedBugs()),
                        persisted: persisted,
                        disk: LocalDisk(state: repairPending ? .outdated : st.diskState, generations: st.generations),
                        now: MonotonicClock.now())
        coreSnapshot = core.status
        if repairPending { diskRepair = .waitingForPeer }
        nbd = NBDServer(group: group, childGroup: volume.eventLoop, exportName: me.exportName, exportDescription: "hamgr \(config.cluster.name)", logger: logger)
        hooks = HookRunner(hooks: config.hooks, logger: logger, metrics: metrics)
        resources = ResourceManager(resources: config.resources, logger: logger, metrics: metrics) { [weak self] resource, reason in
            // A resource that keeps failing here may run on the peer: hand over (design.md §4).
            self?.control.async {
                guard let self else { return }
                self.logger.error("resource \(resource) gave up (\(reason)); switching over", metadata: self.eventMetadata("resource_give_up"))
                self.submitAdmin(.switchover) { r in
                    self.logger.notice("switchover after resource failure: \(r.reply.message)", metadata: self.eventMetadata("resource_switchover"))
                }
            }
        }
    }

    static let arbitratorID = NodeID(ClusterConfig.reservedArbitratorName)

    /// Planted bugs exist only in test builds (`-D HAMGR_PLANTED_BUGS`), so a production
    /// binary ignores the variable entirely (issue 5, "the checker can fail").
    static func plantedBugs() -> Set<PlantedBug> {
        #if HAMGR_PLANTED_BUGS
        if let v = ProcessInfo.processInfo.environment["HAMGR_PLANTED_BUG"] {
            return Set(v.split(separator: ",").compactMap { name in
                PlantedBug.allCases.first { $0.rawValue.lowercased() == name.replacingOccurrences(of: "-", with: "").lowercased() }
            })
        }
        #endif
        return []
    }

    // MARK: lifecycle

    func start() throws {
        volume.onEvent = { [weak self] ev in self?.control.async { self?.volumeEvent(ev) } }
        let svc = try parseHostPort(me.serviceAddress, key: "node.service_address")
        try nbd.start(host: svc.host, port: svc.port).wait()
        nbd.setVolume(nil, refusal: refusal())
        // The persisted fencing token reaches the volume before any replication session can
        // be routed to it (the listener binds below; the volume runs events in order).
        control.sync {
            for action in core.start(at: MonotonicClock.now()) { perform(action) }
            let st = core.status
            snapshotLock.withLock { coreSnapshot = st }
        }
        let repl = try parseHostPort(me.replicationAddress, key: "node.replication_address")
        let idle = TimeAmount.nanoseconds(config.timeouts.failureTimeout.nanosecondsClamped)
        listener = try PeerListener.bind(
            host: repl.host, port: repl.port, group: group, childGroup: volume.eventLoop, idleTimeout: idle,
            keyForCluster: { [key, config] in $0 == config.cluster.name ? key : nil },
            refused: { [logger] why in logger.warning("\(why)", metadata: ["event": "link_refused"]) },
            route: { [weak self] hello in self?.route(hello) }).wait()
        volume.start()
        // Quorum channels: to the arbitrator always; to the peer only from the node whose
        // name sorts first (the other accepts it on its replication address).
        let arb = try parseHostPort(config.arbitrator.address, key: "arbitrator.address")
        dialers.append(dialer(to: arb, remoteID: Self.arbitratorID, idle: idle))
        if me.name < peer.name {
            let p = try parseHostPort(peer.replicationAddress, key: "node.replication_address")
            dialers.append(dialer(to: p, remoteID: peer.name, idle: idle))
        }
        dialers.forEach { $0.start() }

        let statusAddr = try parseHostPort(me.statusAddress, key: "node.status_address")
        let server = StatusServer(group: group, host: statusAddr.host, port: statusAddr.port,
                                  adminToken: try config.loadAdminToken(), handlers: statusHandlers(), logger: logger)
        try server.start().wait()
        statusServer = server

        let tickNanos = max(5_000_000, Int(config.timeouts.renewInterval.nanosecondsClamped / 8))
        let timer = DispatchSource.makeTimerSource(queue: control)
        timer.schedule(deadline: .now(), repeating: .nanoseconds(tickNanos), leeway: .milliseconds(1))
        timer.setEventHandler { [weak self] in self?.feed(.tick) }
        timer.resume()
        ticker = timer
        let refresh = DispatchSource.makeTimerSource(queue: control)
        refresh.schedule(deadline: .now(), repeating: .milliseconds(500))
        refresh.setEventHandler { [weak self] in
            guard let self else { return }
            Task {
                let snap = await self.resources.snapshot()
                self.snapshotLock.withLock { self.resourceSnapshot = snap }
            }
        }
        refresh.resume()
        resourceRefresh = refresh
        _ = notifier.ready(status: "secondary, joining")
        // The watchdog proves liveness, not health: the control queue and every event loop
        // (NBD, replication, quorum links, status server) must run a no-op within the bound.
        // A failed disk leaves the node up and pinging (it reports `diskless` on /healthz and
        // in metrics); a hung loop stops the pings and systemd restarts the node.
        let probe = LivenessProbe([LivenessProbe.queue(control, name: "control queue")] + LivenessProbe.loops(of: group))
        _ = notifier.startWatchdog { [weak self] bound in
            let stuck = probe.stuck(within: bound)
            if !stuck.isEmpty, let self {
                self.metrics.livenessMisses.increment()
                self.logger.error("watchdog: \(stuck.joined(separator: ", ")) did not answer within \(bound); not pinging",
                                  metadata: self.eventMetadata("watchdog_miss"))
            }
            return stuck.isEmpty
        }
        control.async {
            self.logger.notice("node started", metadata: self.eventMetadata("started"))
            if self.diskRepair != nil {
                self.logger.warning("the backing store failed in an earlier run: this node stays outdated until a full verify against the peer passes",
                                    metadata: self.eventMetadata("disk_repair_pending"))
            }
        }
    }

    /// SIGTERM: a master hands over first when it can, then everything stops.
    func shutdown() {
        let handedOver = DispatchSemaphore(value: 0)
        control.async {
            _ = self.notifier.stopping()
            if self.core.status.role == .primary && self.core.status.peerReachable {
                self.logger.notice("stopping: switching over first", metadata: self.eventMetadata("shutdown_switchover"))
                self.submitAdmin(.switchover) { _ in handedOver.signal() }
            } else {
                handedOver.signal()
            }
        }
        _ = handedOver.wait(timeout: .now() + 5)
        control.sync {
            self.stopping = true
            self.ticker?.cancel()
            self.resourceRefresh?.cancel()
            if self.core.status.role == .primary { self.feed(.admin(.demote)) }
        }
        let resourcesStopped = DispatchSemaphore(value: 0)
        Task { try? await self.resources.stopAll(); resourcesStopped.signal() }
        _ = resourcesStopped.wait(timeout: .now() + 120)
        dialers.forEach { $0.stop() }
        _ = try? nbd.stop().wait()
        volume.stop()
        _ = try? listener?.close().wait()
        _ = try? statusServer?.stop().wait()
        logger.notice("node stopped", metadata: ["event": "stopped"])
    }

    // MARK: links

    private func dialer(to addr: (host: String, port: Int), remoteID: NodeID, idle: TimeAmount) -> PeerDialer {
        PeerDialer(group: group, host: addr.host, port: addr.port,
                   local: PeerHello(cluster: config.cluster.name, node: me.name, channel: ChannelName.quorum),
                   key: key, idleTimeout: idle, retryDelay: .milliseconds(100),
                   callbacks: quorumCallbacks(expecting: remoteID))
    }

    /// Inbound sessions on the replication address: the peer's quorum channel or its replication link.
    private func route(_ hello: PeerHello) -> (local: PeerHello, callbacks: PeerSessionCallbacks)? {
        guard hello.cluster == config.cluster.name, hello.node == peer.name else { return nil }
        let local = PeerHello(cluster: config.cluster.name, node: me.name, channel: hello.channel)
        switch hello.channel {
        case ChannelName.quorum: return (local, quorumCallbacks(expecting: peer.name))
        case ChannelName.replication: return (local, volume.inboundSession())
        default: return nil
        }
    }

    private func quorumCallbacks(expecting remote: NodeID) -> PeerSessionCallbacks {
        PeerSessionCallbacks(
            established: { [weak self] conn in
                guard let self else { return }
                self.control.async {
                    let who = remote == Self.arbitratorID ? Self.arbitratorID : conn.remote.node
                    if who == Self.arbitratorID { self.arbitratorQuorum = conn } else { self.peerQuorum?.close(); self.peerQuorum = conn }
                    conn.userInfo = who
                    self.feed(.linkUp(who))
                }
            },
            frame: { [weak self] conn, frame in
                guard let self else { return }
                let who = (conn.userInfo as? NodeID) ?? remote
                switch frame.quorumMessage() {
                case .success(let m): self.control.async { self.feed(.received(from: who, m)) }
                case .failure(let e):
                    self.logger.warning("refused quorum frame from \(who): \(e)", metadata: ["event": "frame_refused"])
                    conn.close()
                }
            },
            closed: { [weak self] conn, why in
                guard let self, let conn else { return }
                self.control.async {
                    let who = (conn.userInfo as? NodeID) ?? remote
                    if who == Self.arbitratorID {
                        guard self.arbitratorQuorum === conn else { return }
                        self.arbitratorQuorum = nil
                    } else {
                        guard self.peerQuorum === conn else { return }
                        self.peerQuorum = nil
                    }
                    self.logger.info("quorum link to \(who) down: \(why)", metadata: self.eventMetadata("link_down"))
                    self.feed(.linkDown(who))
                }
            })
    }

    // MARK: the core

    private func feed(_ event: NodeEvent) {
        dispatchPrecondition(condition: .onQueue(control))
        let actions = core.handle(event, at: MonotonicClock.now())
        for action in actions { perform(action) }
        let st = core.status
        snapshotLock.withLock { coreSnapshot = st }
    }

    private func volumeEvent(_ event: ReplicationEvent) {
        switch event {
        case .peer(let state):
            feed(.peerReplication(state))
            if state == .inSync { advanceDiskRepair(mismatches: nil) }
        case .disk(let state, let generations):
            feed(.disk(LocalDisk(state: reportedDiskState(state), generations: generations)))
        case .splitBrain(let detail):
            logger.error("split brain: \(detail)", metadata: eventMetadata("split_brain"))
        case .diskFailure(let detail):
            // A store that failed a write is not trusted again until an operator restarts the
            // node: it reports diskless, never stands for election, and a master steps down so
            // the peer — which holds every acknowledged write — takes over.
            let first = snapshotLock.withLock { () -> Bool in
                defer { diskError = diskError ?? detail }
                return diskError == nil
            }
            logger.critical("backing store failed: \(detail)", metadata: eventMetadata("disk_failure"))
            guard first else { return }
            do { try DurableFile.write(Array("\(detail)\n".utf8), to: diskFailedMarker) } catch {
                logger.critical("cannot record the disk failure in \(diskFailedMarker): \(error); replace the disk and start from an empty store",
                                metadata: eventMetadata("disk_failure_unrecorded"))
            }
            feed(.disk(LocalDisk(state: .diskless, generations: volume.status.generations)))
            if core.status.role == .primary {
                logger.critical("stepping down: the backing store failed", metadata: eventMetadata("disk_failure_step_down"))
                feed(.admin(.demote))
            }
        case .resyncProgress(let done, let total):
            logger.debug("resync \(done)/\(total) bytes", metadata: eventMetadata("resync_progress"))
        case .verifyFinished(let mismatched):
            logger.notice("verify finished: \(mismatched.count) mismatched chunk(s) \(mismatched.prefix(20))",
                          metadata: eventMetadata("verify_finished"))
            advanceDiskRepair(mismatches: mismatched)
        }
    }

    private func perform(_ action: NodeAction) {
        switch action {
        case .send(let to, let message):
            let conn = to == Self.arbitratorID ? arbitratorQuorum : peerQuorum
            conn?.send(message, epoch: core.status.epoch)
        case .persist(let state):
            do {
                try DurableFile.write(state.encoded(), to: statePath)
                lastPersisted = state
            } catch {
                // A vote or epoch that cannot be made durable must not be acted on: stop here,
                // systemd restarts us from the last durable state.
                logger.critical("cannot persist quorum state: \(error); exiting", metadata: eventMetadata("persist_failed"))
                exit(70)
            }
        case .writeGate(let gate):
            volume.setWriteGate(gate)
        case .becomePrimary(let epoch, let newGeneration):
            promote(epoch: epoch, newGeneration: newGeneration)
        case .becomeSecondary(let epoch, let master):
            demote(epoch: epoch, master: master)
        case .drainForSwitchover:
            // Planned handover: services stop first (a filesystem flushes through the export),
            // then the volume drains and confirms the peer has every write.
            let volume = self.volume
            inResourceOrder { [weak self] in
                guard let self else { return }
                do { try await self.resources.stopAll() } catch {
                    self.logger.error("stopping resources for switchover: \(error)", metadata: self.eventMetadata("resource_stop_failed"))
                }
                volume.drainForSwitchover { [weak self] result in
                self?.control.async {
                    switch result {
                    case .success: self?.feed(.switchoverDrained)
                    case .failure(let e): self?.logger.error("switchover drain failed: \(e)", metadata: self?.eventMetadata("switchover_failed") ?? [:])
                    }
                }
                }
            }
        case .cancelDrain:
            // An abandoned switchover: this node stays master. Queued behind the stop-and-drain
            // of `.drainForSwitchover`, so the cancel reaches the volume after the drain request.
            let volume = self.volume
            inResourceOrder { [weak self] in
                volume.cancelDrain()
                guard let self else { return }
                do { try await self.resources.startAll() } catch {
                    self.control.async {
                        self.logger.error("restarting resources after an abandoned switchover: \(error)", metadata: self.eventMetadata("resource_start_failed"))
                    }
                }
            }
        case .adminResult(let command, let result):
            completeAdmin(command, result)
        case .fence(let epoch):
            // The replication fencing token, an explicit core output: never raised by this
            // node's own candidacy (a failed one must not refuse the live master's frames).
            volume.setPromisedEpoch(epoch)
        case .fenceServices:
            // Contract: freeze the services above the block layer now (no I/O), so page-cache
            // reads stop before a new master can exist. Writes already fail at the closed gate.
            // No freezer is wired to the resource agents yet: say so, the window stays open
            // until the resource stop of `.becomeSecondary` completes.
            logger.warning("services should be frozen now (lease about to lapse or gate closed); no freezer is configured, they stop only with the demotion",
                           metadata: eventMetadata("services_fence"))
        case .unfenceServices:
            logger.notice("services may serve again (fresh lease grant)", metadata: eventMetadata("services_unfence"))
        case .log(let event):
            var md = eventMetadata(event.name)
            for f in event.fields { md[f.key] = .string(f.value) }
            logger.notice("\(event.name)", metadata: md)
        }
        if core.status.maintenance != maintenanceApplied {
            maintenanceApplied = core.status.maintenance
            let on = maintenanceApplied
            Task { await self.resources.holdRestarts(on) }
        }
    }

    private func promote(epoch: Epoch, newGeneration: Bool) {
        do {
            try volume.becomePrimary(epoch: epoch, newGeneration: newGeneration)
        } catch {
            // The volume refused: give the lease back at once so the peer can take over.
            logger.error("cannot become primary: \(error); stepping down", metadata: eventMetadata("promote_failed"))
            control.async {
                self.feed(.disk(LocalDisk(state: .diskless, generations: self.volume.status.generations)))
                if self.core.status.role == .primary { self.feed(.admin(.demote)) }
            }
            return
        }
        // The core starts a mastership assuming nothing of the peer; the volume reports only
        // changes, so tell the core where the link stands now.
        control.async { self.feed(.peerReplication(self.volume.status.peerState)) }
        promotedAt = MonotonicClock.now()
        metrics.failover(kind: newGeneration ? "forced" : (pendingAdmin.isEmpty ? "failover" : "switchover"))
        nbd.setVolume(volume, refusal: "")
        _ = notifier.status("primary, epoch \(epoch), serving \(me.serviceAddress)")
        logger.notice("promoted: serving the export on \(me.serviceAddress)", metadata: eventMetadata("promoted"))
        // Promotion order (design.md §4): lease → volume primary → resources in order → announce.
        let context = hookContext(role: .primary, epoch: epoch, master: me.name)
        inResourceOrder { [weak self] in
            guard let self else { return }
            do {
                try await self.resources.startAll()
            } catch {
                self.control.async {
                    self.logger.error("resources failed to start: \(error); switching over", metadata: self.eventMetadata("resource_start_failed"))
                    self.submitAdmin(.switchover) { _ in }
                }
                return
            }
            _ = await self.hooks.run(.onPromote, context: context)
        }
    }

    private func demote(epoch: Epoch, master: NodeID?) {
        let wasPrimary = volume.status.role == .primary
        nbd.setVolume(nil, refusal: refusal(master: master))
        volume.becomeSecondary(epoch: epoch)
        _ = notifier.status("secondary, epoch \(epoch), master \(master?.name ?? "unknown")")
        if wasPrimary {
            logger.notice("demoted: export closed", metadata: eventMetadata("demoted"))
            let context = hookContext(role: .secondary, epoch: epoch, master: master)
            inResourceOrder { [weak self] in
                guard let self else { return }
                try? await self.resources.stopAll()
                _ = await self.hooks.run(.onDemote, context: context)
            }
        }
    }

    private func refusal(master: NodeID? = nil) -> String {
        let m = master ?? core.status.master
        if let m, m != me.name, let node = try? config.node(named: m.name) {
            return "not primary; the master \(m) serves at \(node.serviceAddress)"
        }
        return "not primary; no master is known" + (core.status.whyNotPromoted.map { " (\($0))" } ?? "")
    }

    /// The disk state the core may rely on: diskless after a failure in this run, outdated
    /// while a failure of an earlier run is not yet verified away.
    private func reportedDiskState(_ state: DiskState) -> DiskState {
        if diskErrorStatus != nil { return .diskless }
        if diskRepair != nil, state == .upToDate { return .outdated }
        return state
    }

    /// Verify → resync mismatches → verify again, until a verify finds nothing (bounded).
    /// `mismatches` is nil for "the link is in sync now". Control queue only.
    private func advanceDiskRepair(mismatches: [Int]?) {
        guard let phase = diskRepair, diskErrorStatus == nil else { return }
        switch (phase, mismatches) {
        case (.waitingForPeer, nil), (.resyncing, nil):
            let round: Int
            if case .resyncing(let r) = phase { round = r + 1 } else { round = 1 }
            guard round <= 5 else {
                return logger.error("disk repair: still mismatching after 4 resyncs; this node stays outdated", metadata: eventMetadata("disk_repair_failed"))
            }
            diskRepair = .verifying(round: round)
            logger.notice("disk repair: full verify against the peer (round \(round))", metadata: eventMetadata("disk_repair_verify"))
            volume.startVerify()
        case (.verifying(let round), let found?):
            if found.isEmpty {
                diskRepair = nil
                try? FileManager.default.removeItem(atPath: diskFailedMarker)
                logger.notice("disk repair: verify found no mismatch; the store is trusted again", metadata: eventMetadata("disk_repaired"))
                let v = volume.status
                feed(.disk(LocalDisk(state: v.diskState, generations: v.generations)))
            } else {
                diskRepair = .resyncing(round: round)
                logger.notice("disk repair: resyncing \(found.count) mismatched chunk(s) from the peer", metadata: eventMetadata("disk_repair_resync"))
                volume.requestResync()
                pollRepairResync(round: round, checks: 0)
            }
        default:
            break
        }
    }

    /// A requested resync of a few chunks may finish without the link ever leaving inSync;
    /// poll for its end (bounded) and verify again.
    private func pollRepairResync(round: Int, checks: Int) {
        control.asyncAfter(deadline: .now() + .milliseconds(500)) {
            guard case .resyncing(round)? = self.diskRepair else { return }
            let v = self.volume.status
            if v.peerState == .inSync && v.resyncDoneBytes >= v.resyncTotalBytes && checks >= 1 {
                self.advanceDiskRepair(mismatches: nil)
            } else if checks < 1200 {
                self.pollRepairResync(round: round, checks: checks + 1)
            }
        }
    }

    private func hookContext(role: Role, epoch: Epoch, master: NodeID?) -> HookContext {
        let masterNode = master.flatMap { try? config.node(named: $0.name) }
        return HookContext(cluster: config.cluster.name, node: me.name.name, role: role, epoch: epoch.value,
                           serviceAddress: me.serviceAddress, masterNode: master?.name,
                           masterServiceAddress: masterNode?.serviceAddress, peerNode: peer.name.name)
    }

    /// Runs `op` after every resource operation queued before it (control queue only).
    private func inResourceOrder(_ op: @escaping @Sendable () async -> Void) {
        let previous = resourceChain
        resourceChain = Task { await previous?.value; await op() }
    }

    var resourcesStatus: [StatusDocument.Resource] { snapshotLock.withLock { resourceSnapshot } }

    func eventMetadata(_ event: String) -> Logger.Metadata {
        ["event": .string(event), "epoch": .string(core.status.epoch.description)]
    }

    var isHealthy: Bool { !stopping && volume.status.diskState != .diskless && diskErrorStatus == nil }

    /// The core's view as of its last event; any thread.
    var coreStatus: NodeQuorumStatus { snapshotLock.withLock { coreSnapshot } }

    /// The NBD server's and the volume's figures are cumulative snapshots; the registry's
    /// counters take the increase since the last scrape (any thread).
    func recordCumulativeFigures(nbd now: NBDStatistics, resyncBytesSent: UInt64) {
        metricsLock.withLock {
            for (key, count) in now.operations where count > (nbdSeen.operations[key] ?? 0) {
                metrics.registry.counter("hamgr_nbd_requests_total", help: "NBD requests served, by command and result.",
                                         labels: ["op": key.operation, "result": key.result])
                    .increment(by: Double(count - (nbdSeen.operations[key] ?? 0)))
            }
            nbdSeen = now
            metrics.writeLatencySeconds.replace(cumulative: now.writeLatency.cumulativeCounts,
                                                count: now.writeLatency.count, sum: now.writeLatency.sumSeconds)
            if resyncBytesSent > resyncSentSeen {
                metrics.registry.counter("hamgr_resync_sent_bytes_total", help: "Bytes of chunk data this node sent as resync source.")
                    .increment(by: Double(resyncBytesSent - resyncSentSeen))
                resyncSentSeen = resyncBytesSent
            }
        }
    }

    // MARK: admin

    private func completeAdmin(_ command: Quorum.AdminCommand, _ result: Result<String, AdminRefusal>) {
        guard let i = pendingAdmin.firstIndex(where: { $0.command == command }) else { return }
        let pending = pendingAdmin.remove(at: i)
        switch result {
        case .success(let msg): pending.reply(.ok(msg))
        case .failure(let refusal): pending.reply(.refused(refusal.reason))
        }
    }

    /// Hands a command to the core; `reply` gets its answer, or a timeout after 30 s
    /// (a switchover answers only after the drain). Control queue only.
    private func submitAdmin(_ command: Quorum.AdminCommand, reply: @escaping (AdminResponse) -> Void) {
        nextAdminID += 1
        let id = nextAdminID
        pendingAdmin.append((command, id, reply))
        feed(.admin(command))
        control.asyncAfter(deadline: .now() + 30) {
            if let i = self.pendingAdmin.firstIndex(where: { $0.id == id }) {
                self.pendingAdmin.remove(at: i).reply(.refused("\(command) did not complete within 30 s", status: 504))
            }
        }
    }

    /// Polls the core until this node is master (success) or `deadline` (refused, with the
    /// core's reason). Control queue only.
    private func awaitPromotion(until deadline: DispatchTime, reply: @escaping (AdminResponse) -> Void) {
        let st = core.status.announced(at: MonotonicClock.now())
        if st.role == .primary {
            return reply(.ok("promoted: master in epoch \(st.epoch), serving at \(me.serviceAddress)"))
        }
        if DispatchTime.now() >= deadline {
            return reply(.refused("not promoted: \(st.whyNotPromoted ?? "no quorum within the election timeout")"))
        }
        control.asyncAfter(deadline: .now() + .milliseconds(50)) { self.awaitPromotion(until: deadline, reply: reply) }
    }

    /// An authenticated admin request (StatusServer already checked the token and params).
    func admin(_ request: AdminRequest, on callerLoop: EventLoop) -> EventLoopFuture<AdminResponse> {
        let promise = callerLoop.makePromise(of: AdminResponse.self)
        control.async {
            self.logger.notice("admin \(request.command) from \(request.remote)", metadata: self.eventMetadata("admin"))
            switch request.command {
            case .switchover: self.submitAdmin(.switchover, reply: promise.succeed)
            case .promote(let force):
                // Answer with the election's outcome, not just its start.
                self.submitAdmin(.promote(force: force)) { started in
                    guard started.status == 200 else { return promise.succeed(started) }
                    self.awaitPromotion(until: .now() + .milliseconds(Int(self.config.timeouts.failureTimeout.milliseconds * 2 + 500)),
                                        reply: promise.succeed)
                }
            case .demote: self.submitAdmin(.demote, reply: promise.succeed)
            case .maintenance(let on): self.submitAdmin(.maintenance(on), reply: promise.succeed)
            case .acceptArbitrator: self.submitAdmin(.acceptArbitrator, reply: promise.succeed)
            case .verify(let repair):
                self.volume.startVerify(repair: repair)
                promise.succeed(.ok(repair ? "verify started; mismatched chunks are resynced when it ends; watch /status"
                                           : "verify started; watch /status"))
            case .bootstrap(let clean):
                do {
                    try self.volume.bootstrap(assumeClean: clean)
                    self.logger.notice("bootstrap: this node's data is the pair's\(clean ? " (declared clean)" : "")",
                                       metadata: self.eventMetadata("bootstrap"))
                    promise.succeed(.ok(clean ? "bootstrapped as clean: a fresh peer adopts this generation without a sync"
                                              : "bootstrapped: this node is up to date; the peer gets a full sync (watch /status)"))
                } catch {
                    promise.succeed(.refused("bootstrap refused: \(error)", status: 409))
                }
            case .invalidate:
                do {
                    try self.volume.invalidate()
                    self.logger.warning("invalidate: local data discarded, full sync from the peer follows", metadata: self.eventMetadata("invalidate"))
                    promise.succeed(.ok("invalidated: this node is inconsistent until the full sync from its peer completes (watch /status)"))
                } catch {
                    promise.succeed(.refused("invalidate refused: \(error)", status: 409))
                }
            case .resync:
                self.volume.requestResync()
                promise.succeed(.ok("resync requested; watch /status"))
            case .resolve(let side):
                self.volume.resolveSplitBrain(discardLocal: side == .local)
                promise.succeed(.ok("split brain resolved by discarding the \(side.rawValue) side's changes; resync follows"))
            }
        }
        return promise.futureResult
    }
}
