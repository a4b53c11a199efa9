import Crypto
import Foundation
import HAShell
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NodeRuntime
import Quorum
import Replication
import ReplicationShell

/// `hamgr run`: wires one data node together. Owns nothing but wiring and I/O (style.md
/// "Shape of the house"): the `NodeRuntime` — the same one the whole-node simulator runs —
/// decides with the quorum core and carries out its actions through this class as its
/// `NodeHost`; the replicated volume moves data, the NBD server serves the export, the status
/// server answers operators. Every runtime call happens on `control`, one serial queue, in
/// arrival order; a `.persist` is durable before the next action runs.
final class NodeDaemon: NodeHost, @unchecked Sendable {
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
    /// `key_file` (dialled with) first, then `accept_key_files` (also accepted).
    private let keys: [SymmetricKey]
    private var key: SymmetricKey { keys[0] }
    private let statePath: String
    /// The runtime (control queue only). Set at the end of `init` (it needs `self` as host).
    private var runtime: NodeRuntime<NodeDaemon>!
    let replicatedVolume: ReplicatedVolume
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
    let metrics: NodeMetrics
    private let metricsLock = NIOLock()
    private var resyncSentSeen: UInt64 = 0  // under metricsLock
    private var linkSeen: (sent: UInt64, received: UInt64) = (0, 0)  // under metricsLock
    private(set) var resources: ResourceManager!
    let hooks: HookRunner
    private var resourceSnapshot: [StatusDocument.Resource] = []  // under snapshotLock
    /// Resource starts and stops run one after another, in the order promotions and
    /// demotions happened (control queue only).
    private var resourceChain: Task<Void, Never>?
    private var fenceChain: Task<Void, Never>?
    /// A frozen process or VM (monotonic clock stood still while the wall clock went on).
    private var clockJumps = ClockJumpDetector(threshold: .milliseconds(100))
    /// Exists while this node's store failed in a run and was not yet verified against the
    /// peer: the runtime keeps the node `outdated` (never promotable) until a full online
    /// verify finds no mismatch, then removes it.
    private var diskFailedMarker: String { me.metadata + ".disk-failed" }
    private var diskError: String?  // under snapshotLock; set once, on the first failed store operation
    var diskErrorStatus: String? { snapshotLock.withLock { diskError } }
    private var nbdSeen = NBDStatistics()
    let notifier = SystemdNotifier()
    private var stopping = false

    init(config: ClusterConfig, node: String, group: MultiThreadedEventLoopGroup, logger: Logger) throws {
        self.config = config
        self.me = try config.node(named: node)
        self.peer = try config.peer(of: node)
        self.group = group
        var logger = logger
        logger[metadataKey: "cluster"] = .string(config.cluster.name)
        logger[metadataKey: "node"] = .string(node)
        self.logger = logger
        self.keys = try config.loadClusterKeys()
        self.statePath = me.metadata + ".quorum"
        metrics = NodeMetrics(cluster: config.cluster.name, node: node, writeLatencyBuckets: NBDLatencyHistogram.bucketBounds)
        metrics.precreate(resources: config.resources.map(\.name), hooks: HookKind.allCases.map(\.rawValue))

        let persisted: NodePersistentState
        if let bytes = try DurableFile.read(statePath) {
            persisted = try NodePersistentState.decode(bytes)
        } else {
            persisted = .initial
        }

        let peerRepl = try parseHostPort(peer.replicationAddress, key: "node.replication_address")
        var volumeConfig = ReplicatedVolumeConfig(
            cluster: config.cluster.name, me: me.name, peer: peer.name,
            backingPath: me.backing, metadataPath: me.metadata,
            sizeBytes: config.volume.sizeBytes, chunkBytes: Int(config.volume.chunkSizeBytes),
            replicationProtocol: config.cluster.replicationProtocol,
            peerReplicationAddress: peerRepl, clusterKey: keys[0],
            linkTimeout: config.timeouts.failureTimeout,
            resyncRateBytesPerSecond: Int(config.volume.resyncRateBytesPerSecond),
            createBacking: me.create)
        volumeConfig.linkSendBufferBytes = Int(config.volume.linkSendBufferBytes)
        volumeConfig.applyQueueBytes = Int(config.volume.applyQueueBytes)
        volumeConfig.volatileCacheForTests = Self.volatileCacheForTests(logger)
        replicatedVolume = try ReplicatedVolume(config: volumeConfig, group: group, logger: logger, clock: { MonotonicClock.now() })
        let st = replicatedVolume.status
        let repairPending = FileManager.default.fileExists(atPath: me.metadata + ".disk-failed")
        let core = NodeCore(cluster: config.cluster.name, me: me.name, peer: peer.name, arbitrator: Self.arbitratorID,
                        settings: QuorumSettings(timings: config.timeouts, splitBrain: config.cluster.splitBrain,
                                                 plantedBugs: Self.plantedBugs()),
                        persisted: persisted,
                        disk: LocalDisk(state: repairPending ? .outdated : st.diskState, generations: st.generations, crashCopyOnPeer: st.crashCopyOnPeer),
                        now: MonotonicClock.now())
        coreSnapshot = core.status
        nbd = NBDServer(group: group, childGroup: replicatedVolume.eventLoop, exportName: me.exportName, exportDescription: "hamgr \(config.cluster.name)",
                        tls: try Self.exportTLS(config, host: me.name.name), allow: config.export.allow,
                        inFlightLimits: .init(maxRequests: config.export.maxInFlightRequests, maxBytes: config.export.maxInFlightBytes,
                                              maxConnections: config.export.maxConnections),
                        logger: logger)
        hooks = HookRunner(hooks: config.hooks, logger: logger, metrics: metrics)
        let resourceContext = ResourceContext(cluster: config.cluster.name, node: me.name.name, export: try NBDAttachTarget.own(config, node: me))
        resources = ResourceManager(resources: config.resources, logger: logger, metrics: metrics, context: resourceContext) { [weak self] resource, reason in
            // A resource that keeps failing here may run on the peer: hand over (design.md §4).
            self?.control.async {
                guard let self else { return }
                self.logger.error("resource \(resource) gave up (\(reason)); switching over", metadata: self.eventMetadata("resource_give_up"))
                self.runtime.admin(.switchover) { r in
                    self.logger.notice("switchover after resource failure: \(r.message)", metadata: self.eventMetadata("resource_switchover"))
                }
            }
        }
        runtime = NodeRuntime(core: core, host: self, repairPending: repairPending)
    }

    static let arbitratorID = NodeID(ClusterConfig.reservedArbitratorName)

    /// STARTTLS on the NBD export (`export.tls`): this host's certificate, and the CA client
    /// certificates must chain to if `export.client_ca_file` is set. nil when TLS is off.
    static func exportTLS(_ config: ClusterConfig, host: String) throws -> NBDServer.TLS? {
        guard config.export.tls != .off else { return nil }
        guard let identity = try config.loadTLSIdentity(host: host) else {
            throw ConfigError(key: "export.tls", message: "\"\(config.export.tls.rawValue)\" needs a [tls] section")
        }
        let configuration = identity.serverConfiguration(clientCA: try config.loadExportClientCA())
        do {
            return try NBDServer.TLS(mode: config.export.tls, configuration: configuration)
        } catch {
            throw ConfigError(key: "export.tls", message: "cannot make a TLS context from this host's certificate (\(error))")
        }
    }

    /// Planted bugs exist only in test builds (`-D HAMGR_PLANTED_BUGS`), so a production
    /// binary ignores the variable entirely (issue 5, "the checker can fail").
    /// Debug builds only (the process tests' power cuts): `HAMGR_TEST_VOLATILE_CACHE=1`
    /// keeps unsynced writes in process memory, so SIGKILL loses them as a power cut would.
    static func volatileCacheForTests(_ logger: Logger) -> Bool {
        #if DEBUG
        if ProcessInfo.processInfo.environment["HAMGR_TEST_VOLATILE_CACHE"] == "1" {
            logger.warning("HAMGR_TEST_VOLATILE_CACHE=1: unsynced writes live in process memory (test mode; a kill loses them)")
            return true
        }
        #endif
        return false
    }

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
        replicatedVolume.onEvent = { [weak self] ev in self?.control.async { self?.volumeEvent(ev) } }
        let svc = try parseHostPort(me.serviceAddress, key: "node.service_address")
        try nbd.start(host: svc.host, port: svc.port).wait()
        if let path = config.export.unixSocket(for: me.name.name) { try nbd.start(unixSocket: path).wait() }
        nbd.setVolume(nil, refusal: refusal())
        // The persisted fencing token reaches the volume before any replication session can
        // be routed to it (the listener binds below; the volume runs events in order).
        control.sync {
            // Resources a crashed former master left running are stopped before this node
            // may start them again: first in the resource order (control queue only), which
            // a promotion's start queues behind.
            inResourceOrder { [weak self] in
                guard let self else { return }
                for line in await self.resources.stopStrays() {
                    self.logger.warning("resource \(line)", metadata: self.eventMetadata("resource_stray"))
                }
            }
            runtime.start()
            publish()
        }
        let repl = try parseHostPort(me.replicationAddress, key: "node.replication_address")
        let idle = TimeAmount.nanoseconds(config.timeouts.failureTimeout.nanosecondsClamped)
        listener = try PeerListener.bind(
            host: repl.host, port: repl.port, group: group, childGroup: replicatedVolume.eventLoop, idleTimeout: idle, reads: .bulk,
            keysForCluster: { [keys, config] in $0 == config.cluster.name ? keys : [] },
            refused: { [logger] why in logger.warning("\(why)", metadata: ["event": "link_refused"]) },
            route: { [weak self] hello in self?.route(hello) }).wait()
        replicatedVolume.start()
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
        let statusTLS = config.status.tls ? try config.loadTLSIdentity(host: me.name.name)?.serverConfiguration() : nil
        if config.export.tls != .off || config.status.tls, let identity = try config.loadTLSIdentity(host: me.name.name) {
            metrics.registry.gauge(TLSIdentity.expiryMetric, help: TLSIdentity.expiryHelp).set(identity.notValidAfter.timeIntervalSince1970)
        }
        let server = StatusServer(group: group, host: statusAddr.host, port: statusAddr.port,
                                  adminToken: try config.loadAdminToken(), readToken: try config.loadReadToken(),
                                  tls: statusTLS, handlers: statusHandlers(), logger: logger)
        try server.start().wait()
        statusServer = server

        let tickNanos = max(5_000_000, Int(config.timeouts.renewInterval.nanosecondsClamped / 8))
        let timer = DispatchSource.makeTimerSource(queue: control)
        timer.schedule(deadline: .now(), repeating: .nanoseconds(tickNanos), leeway: .milliseconds(1))
        timer.setEventHandler { [weak self] in
            guard let self else { return }
            var wall = timespec()
            clock_gettime(CLOCK_REALTIME, &wall)
            let reference = Instant(nanoseconds: Int64(wall.tv_sec) * 1_000_000_000 + Int64(wall.tv_nsec))
            if let gap = self.clockJumps.observe(monotonic: MonotonicClock.now(), reference: reference) {
                self.logger.warning("clock jump: the wall clock moved \(gap) more than the monotonic clock (frozen process or VM)",
                                    metadata: self.eventMetadata("clock_jump"))
                self.feed(.clockJump(gap))
            }
            self.feed(.tick)
        }
        timer.resume()
        ticker = timer
        let refresh = DispatchSource.makeTimerSource(queue: control)
        refresh.schedule(deadline: .now(), repeating: .milliseconds(500))
        refresh.setEventHandler { [weak self] in
            guard let self else { return }
            self.runtime.pollRepair()
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
            if FileManager.default.fileExists(atPath: self.diskFailedMarker) {
                self.logger.warning("the backing store failed in an earlier run: this node stays outdated until a full verify against the peer passes",
                                    metadata: self.eventMetadata("disk_repair_pending"))
            }
        }
    }

    /// SIGTERM: a master hands over first when it can, else stops its resources while its
    /// export still serves; then everything stops.
    func shutdown() {
        let handedOver = DispatchSemaphore(value: 0)
        let resourcesDown = DispatchSemaphore(value: 0)
        var stopsResourcesFirst = false
        control.sync {
            _ = self.notifier.stopping()
            let st = self.runtime.core.status
            if st.role == .primary && st.peerReachable {
                self.logger.notice("stopping: switching over first", metadata: self.eventMetadata("shutdown_switchover"))
                self.runtime.admin(.switchover) { _ in handedOver.signal() }
            } else if st.role == .primary {
                // Nobody to hand over to: the resources stop while the export still serves
                // (a filesystem on it flushes as it unmounts), then the node steps down. A
                // lease lost meanwhile closes the export as always.
                stopsResourcesFirst = true
                self.logger.notice("stopping: no peer to hand over to; stopping resources before stepping down",
                                   metadata: self.eventMetadata("shutdown_resources_first"))
                let resources = self.resources!
                self.inResourceOrder { try? await resources.stopAll(); resourcesDown.signal() }
                handedOver.signal()
            } else {
                handedOver.signal()
            }
        }
        _ = handedOver.wait(timeout: .now() + 5)
        if stopsResourcesFirst { _ = resourcesDown.wait(timeout: .now() + 120) }
        control.sync {
            self.stopping = true
            self.ticker?.cancel()
            self.resourceRefresh?.cancel()
            if self.runtime.core.status.role == .primary { self.feed(.admin(.demote)) }
        }
        // Behind any start or stop already queued (a promotion's start may still run):
        // a stop beside it could finish first and leave what the start brings up running.
        let resourcesStopped = DispatchSemaphore(value: 0)
        let resources = self.resources!
        control.sync { inResourceOrder { try? await resources.stopAll(); resourcesStopped.signal() } }
        _ = resourcesStopped.wait(timeout: .now() + 120)
        dialers.forEach { $0.stop() }
        _ = try? nbd.stop().wait()
        replicatedVolume.stop()
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
        case ChannelName.replication: return (local, replicatedVolume.inboundSession())
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

    // MARK: the runtime

    private func feed(_ event: NodeEvent) {
        dispatchPrecondition(condition: .onQueue(control))
        runtime.feed(event)
        publish()
    }

    /// The last tenth of a resync logged (control queue only).
    private var lastProgressTenth = -1

    private func volumeEvent(_ event: ReplicationEvent) {
        if case .resyncProgress(let done, let total) = event, total > 0 {
            // One line per tenth, not per chunk: a full sync of 64 MiB was 1,024 lines, which
            // buried the sync decision (/status and the metrics carry the exact progress).
            let tenth = Int(done * 10 / total)
            if tenth != lastProgressTenth {
                lastProgressTenth = tenth
                logger.debug("resync \(done)/\(total) bytes (\(tenth * 10) %)", metadata: eventMetadata("resync_progress"))
            }
        }
        runtime.volumeEvent(event)
        publish()
    }

    private func publish() {
        let st = runtime.core.status
        snapshotLock.withLock { coreSnapshot = st }
    }

    // MARK: NodeHost (the runtime's I/O; control queue only)

    func now() -> Instant { MonotonicClock.now() }

    var volume: any NodeVolume { replicatedVolume }

    func persist(_ state: NodePersistentState) throws {
        try DurableFile.write(state.encoded(), to: statePath)
    }

    func send(_ message: QuorumMessage, to node: NodeID, epoch: Epoch) {
        let conn = node == Self.arbitratorID ? arbitratorQuorum : peerQuorum
        conn?.send(message, epoch: epoch)
    }

    func log(_ event: QuorumEvent) {
        var md = eventMetadata(event.name)
        for f in event.fields { md[f.key] = .string(f.value) }
        logger.notice("\(event.name)", metadata: md)
    }

    func fatal(_ reason: String) {
        // A vote or epoch that cannot be made durable must not be acted on: stop here,
        // systemd restarts us from the last durable state.
        logger.critical("\(reason); exiting", metadata: eventMetadata("fatal"))
        exit(70)
    }

    func enqueue(_ work: @escaping @Sendable () -> Void) {
        control.async { work(); self.publish() }
    }

    func holdServiceRestarts(_ on: Bool) {
        Task { await self.resources.holdRestarts(on) }
    }

    func cleanupResources(_ name: String?, reply: @escaping (NodeAdminOutcome) -> Void) {
        let (resources, logger) = (self.resources!, self.logger)
        let answer: @Sendable (NodeAdminOutcome) -> Void = { [weak self] outcome in self?.enqueue { reply(outcome) } }
        // In the resource order: a cleanup never runs into a start or stop half done.
        inResourceOrder {
            do {
                let lines = try await resources.cleanup(name)
                for line in lines { logger.notice("resource \(line)", metadata: ["event": "resource_cleanup_done"]) }
                answer(.ok(lines.isEmpty ? "no resources configured" : "cleaned up: " + lines.joined(separator: "; ")))
            } catch {
                answer(.refused("\(error)", status: 404))
            }
        }
    }

    func recordDiskFailure(_ detail: String) {
        snapshotLock.withLock { diskError = diskError ?? detail }
        logger.critical("backing store failed: \(detail)", metadata: eventMetadata("disk_failure"))
        do { try DurableFile.write(Array("\(detail)\n".utf8), to: diskFailedMarker) } catch {
            logger.critical("cannot record the disk failure in \(diskFailedMarker): \(error); replace the disk and start from an empty store",
                            metadata: eventMetadata("disk_failure_unrecorded"))
        }
    }

    func clearDiskFailure() {
        try? FileManager.default.removeItem(atPath: diskFailedMarker)
    }

    func startServices(epoch: Epoch, kind: PromotionKind) {
        metrics.failover(kind: kind.rawValue)
        nbd.setVolume(replicatedVolume, refusal: "")
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
                    self.runtime.admin(.switchover) { _ in }
                }
                return
            }
            _ = await self.hooks.run(.onPromote, context: context)
        }
    }

    func stopServices(epoch: Epoch, master: NodeID?, wasPrimary: Bool, then done: @escaping () -> Void) {
        nbd.setVolume(nil, refusal: refusal(master: master))
        _ = notifier.status("secondary, epoch \(epoch), master \(master?.name ?? "unknown")")
        guard wasPrimary else { return done() }
        logger.notice("export closed; stopping resources", metadata: eventMetadata("services_stopping"))
        let context = hookContext(role: .secondary, epoch: epoch, master: master)
        let finished: @Sendable () -> Void = { [weak self] in self?.enqueue(done) }
        inResourceOrder { [weak self] in
            guard let self else { return }
            do { try await self.resources.stopAll() } catch {
                self.logger.error("stopping resources: \(error)", metadata: self.eventMetadata("resource_stop_failed"))
            }
            _ = await self.hooks.run(.onDemote, context: context)
            finished()
        }
    }

    func suspendServices(then done: @escaping () -> Void) {
        let finished: @Sendable () -> Void = { [weak self] in self?.enqueue(done) }
        inResourceOrder { [weak self] in
            guard let self else { return }
            do { try await self.resources.stopAll() } catch {
                self.logger.error("stopping resources for switchover: \(error)", metadata: self.eventMetadata("resource_stop_failed"))
            }
            finished()
        }
    }

    func fenceServices() {
        // Not on the resource queue: a freeze must not wait behind a slow start or stop.
        logger.warning("fencing services: lease about to lapse or gate closed", metadata: eventMetadata("services_fence"))
        let (resources, logger, md) = (self.resources!, self.logger, eventMetadata("services_fenced"))
        inFenceOrder {
            let lines = await resources.freezeAll(true)
            if !lines.isEmpty { logger.warning("services fenced: \(lines.joined(separator: "; "))", metadata: md) }
        }
    }

    /// Freezes and thaws run one after another in the order the core asked (control queue only).
    private func inFenceOrder(_ op: @escaping @Sendable () async -> Void) {
        let previous = fenceChain
        fenceChain = Task { await previous?.value; await op() }
    }

    func unfenceServices() {
        logger.notice("unfencing services: fresh lease grant", metadata: eventMetadata("services_unfence"))
        let resources = self.resources!
        inFenceOrder { _ = await resources.freezeAll(false) }
    }

    func resumeServices(epoch: Epoch) {
        logger.notice("switchover abandoned: restarting resources", metadata: eventMetadata("services_resumed"))
        inResourceOrder { [weak self] in
            guard let self else { return }
            do { try await self.resources.startAll() } catch {
                self.logger.error("restarting resources after an abandoned switchover: \(error)", metadata: self.eventMetadata("resource_start_failed"))
            }
        }
    }

    private func refusal(master: NodeID? = nil) -> String {
        let st = runtime.core.status
        let m = master ?? st.master
        if let m, m != me.name, let node = try? config.node(named: m.name) {
            return "not primary; the master \(m) serves at \(node.serviceAddress)"
        }
        return "not primary; no master is known" + (st.whyNotPromoted.map { " (\($0))" } ?? "")
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
        ["event": .string(event), "epoch": .string((runtime?.core.status.epoch ?? .zero).description)]
    }

    var isHealthy: Bool { !stopping && replicatedVolume.status.diskState != .diskless && diskErrorStatus == nil }

    /// The core's view as of its last event; any thread.
    var coreStatus: NodeQuorumStatus { snapshotLock.withLock { coreSnapshot } }

    /// The NBD server's and the volume's figures are cumulative snapshots; the registry's
    /// counters take the increase since the last scrape (any thread).
    func recordCumulativeFigures(nbd now: NBDStatistics, resyncBytesSent: UInt64, link: (sent: UInt64, received: UInt64)) {
        metricsLock.withLock {
            for (key, count) in now.operations where count > (nbdSeen.operations[key] ?? 0) {
                metrics.nbdRequestCounter(op: key.operation, result: key.result)
                    .increment(by: Double(count - (nbdSeen.operations[key] ?? 0)))
            }
            if now.bytesRead > nbdSeen.bytesRead { metrics.nbdReadBytes.increment(by: Double(now.bytesRead - nbdSeen.bytesRead)) }
            if now.bytesWritten > nbdSeen.bytesWritten { metrics.nbdWrittenBytes.increment(by: Double(now.bytesWritten - nbdSeen.bytesWritten)) }
            if now.connectionsAccepted > nbdSeen.connectionsAccepted {
                metrics.nbdConnectionsAccepted.increment(by: Double(now.connectionsAccepted - nbdSeen.connectionsAccepted))
            }
            metrics.nbdConnections.set(now.connectionsOpen)
            metrics.nbdInFlightRequests.set(now.inFlightRequests)
            metrics.nbdInFlightBytes.set(now.inFlightBytes)
            if link.sent > linkSeen.sent { metrics.replicationSentBytes.increment(by: Double(link.sent - linkSeen.sent)) }
            if link.received > linkSeen.received { metrics.replicationReceivedBytes.increment(by: Double(link.received - linkSeen.received)) }
            linkSeen = (max(link.sent, linkSeen.sent), max(link.received, linkSeen.received))
            nbdSeen = now
            metrics.writeLatencySeconds.replace(cumulative: now.writeLatency.cumulativeCounts,
                                                count: now.writeLatency.count, sum: now.writeLatency.sumSeconds)
            if resyncBytesSent > resyncSentSeen {
                metrics.resyncSentBytes.increment(by: Double(resyncBytesSent - resyncSentSeen))
                resyncSentSeen = resyncBytesSent
            }
        }
    }

    // MARK: admin

    /// An authenticated admin request (StatusServer already checked the token and params).
    func admin(_ request: AdminRequest, on callerLoop: EventLoop) -> EventLoopFuture<AdminResponse> {
        let promise = callerLoop.makePromise(of: AdminResponse.self)
        control.async {
            self.logger.notice("admin \(request.command) from \(request.remote)", metadata: self.eventMetadata("admin"))
            self.runtime.admin(request.command) { outcome in
                promise.succeed(outcome.ok ? .ok(outcome.message) : .refused(outcome.message, status: outcome.status))
            }
            self.publish()
        }
        return promise.futureResult
    }
}

extension ReplicatedVolume: NodeVolume {}

extension NodeDaemon: ReloadTarget {
    var liveSettings: Set<LiveSetting> { [.resources, .hooks, .resyncRate, .exportAllow] }

    func apply(_ settings: Set<LiveSetting>, from fresh: ClusterConfig) -> [LiveSetting: String] {
        var declined: [LiveSetting: String] = [:]
        // What `hamgr check --node` checks of them on this host, before anything changes.
        for (key, path) in [("hooks.on_promote", fresh.hooks.onPromote), ("hooks.on_demote", fresh.hooks.onDemote)] {
            if settings.contains(.hooks), let path, access(path, X_OK) != 0 { declined[.hooks] = "\(key): \(path) is not an executable file" }
        }
        for (i, r) in fresh.resources.enumerated() {
            if settings.contains(.resources), case .exec(let path) = r.agent, access(path, X_OK) != 0 {
                declined[.resources] = "resource[\(i)].agent: \(path) is not an executable file"
            }
        }
        if settings.contains(.hooks) && declined[.hooks] == nil {
            hooks.hooks = fresh.hooks
            logger.notice("reload: hooks applied (on_promote \(fresh.hooks.onPromote ?? "none"), on_demote \(fresh.hooks.onDemote ?? "none"), timeout_ms \(Int(fresh.hooks.timeout.milliseconds)))",
                          metadata: eventMetadata("reload_applied").merging(["key": "hooks"]) { $1 })
        }
        if settings.contains(.resyncRate) {
            replicatedVolume.setResyncRate(Int(fresh.volume.resyncRateBytesPerSecond))
            logger.notice("reload: volume.resync_rate \(ByteSize.format(fresh.volume.resyncRateBytesPerSecond))/s applied",
                          metadata: eventMetadata("reload_applied").merging(["key": "volume.resync_rate"]) { $1 })
        }
        if settings.contains(.exportAllow) {
            nbd.allow = fresh.export.allow
            let list = fresh.export.allow.isEmpty ? "any client" : fresh.export.allow.map(\.description).joined(separator: ", ")
            logger.notice("reload: export.allow applied to new connections (\(list))",
                          metadata: eventMetadata("reload_applied").merging(["key": "export.allow"]) { $1 })
        }
        if settings.contains(.resources) && declined[.resources] == nil {
            // In the resource order, behind any start or stop queued before; the reload
            // waits (bounded) so that its "reload done" follows the changes.
            let done = DispatchSemaphore(value: 0)
            let (resources, logger) = (self.resources!, self.logger)
            let md = eventMetadata("reload_applied").merging(["key": "resource"]) { $1 }
            control.sync {
                inResourceOrder {
                    for line in await resources.reconfigure(fresh.resources) {
                        logger.notice("reload: resource \(line)", metadata: md)
                    }
                    done.signal()
                }
            }
            if done.wait(timeout: .now() + 180) == .timedOut {
                logger.warning("reload: the resource changes are still being applied", metadata: md)
            }
        }
        return declined
    }
}
