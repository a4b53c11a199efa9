import Crypto
import Foundation
import HAShell
import Logging
import NIOCore
import NIOPosix
import NodeRuntime
import Quorum

/// `hamgr arbitrator`: the third-site witness for many clusters, keyed by cluster name.
/// All decisions are made by one `ArbitratorCore` on one event loop, driven by the shared
/// `ArbitratorRuntime` with this class as its host; its persisted state (promised epoch,
/// votes, outdated marks) is durable before any reply leaves (design.md §2).
final class ArbitratorDaemon: ArbitratorHost, @unchecked Sendable {
    struct ClusterEntry {
        let config: ClusterConfig
        /// `key_file` first, then `accept_key_files` (the arbitrator only listens).
        let keys: [SymmetricKey]
        var connections: [NodeID: PeerConnection] = [:]
    }

    let group: MultiThreadedEventLoopGroup
    let loop: EventLoop
    let logger: Logger
    /// Decision loop only. Set at the end of `init` (it needs `self` as host).
    private var runtime: ArbitratorRuntime<ArbitratorDaemon>!
    private var core: ArbitratorCore { runtime.core }
    private var clusters: [String: ClusterEntry] = [:]
    private var listeners: [PeerListener] = []
    private var statusServers: [StatusServer] = []
    private let logLimiter = RepeatLimiter()
    let notifier = SystemdNotifier()
    let registry = MetricsRegistry()
    /// A master not heard from for longer than this makes its row degraded on the status page:
    /// the failure timeout, after which the nodes act on a loss (one [timeouts] per process).
    private let staleAfterMs: Int64
    private let decisionSeconds: Histogram
    private let messagesTotal: Counter

    /// - Parameter initialize: create the state of a configured cluster whose state file is
    ///   missing (`hamgr arbitrator --init`). Without it a missing file is an error: a lost
    ///   state must not pass for a fresh cluster (docs/quorum-protocol.md, Arbitrator continuity).
    init(configs: [ClusterConfig], group: MultiThreadedEventLoopGroup, logger: Logger, initialize: Bool = false) throws {
        self.group = group
        self.loop = group.next()
        self.logger = logger
        var persisted: [String: ArbitratorPersistentState] = [:]
        for c in configs {
            guard clusters[c.cluster.name] == nil else {
                throw ConfigError(key: "cluster.name", message: "cluster \(c.cluster.name) is configured twice")
            }
            clusters[c.cluster.name] = ClusterEntry(config: c, keys: try c.loadClusterKeys())
            try FileManager.default.createDirectory(atPath: c.arbitrator.stateDir, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
            let path = Self.statePath(c)
            var rng = SystemRandomNumberGenerator()
            if let bytes = try DurableFile.read(path) {
                var state = try ArbitratorPersistentState.decode(bytes)
                if state.incarnation == 0 {  // written before incarnations existed: name it once
                    state.incarnation = ArbitratorPersistentState.fresh(using: &rng).incarnation
                    try DurableFile.write(state.encoded(), to: path)
                    logger.notice("cluster \(c.cluster.name): state \(path) gets incarnation \(String(state.incarnation, radix: 16))",
                                  metadata: ["event": "state_incarnation", "cluster": .string(c.cluster.name)])
                }
                persisted[c.cluster.name] = state
            } else if initialize {
                let state = ArbitratorPersistentState.fresh(using: &rng)
                try DurableFile.write(state.encoded(), to: path)
                persisted[c.cluster.name] = state
                logger.notice("cluster \(c.cluster.name): new state \(path), incarnation \(String(state.incarnation, radix: 16))",
                              metadata: ["event": "state_created", "cluster": .string(c.cluster.name)])
            } else {
                throw ConfigError(key: "arbitrator.state_dir", message: "cluster \(c.cluster.name): state file \(path) is missing; "
                    + "start with --init if this arbitrator is new for the cluster (nodes that knew a previous state refuse the new one until an operator runs hactl arbitrator-accept)")
            }
        }
        let first = configs[0]
        // One core serves every cluster with one set of timings: a cluster with a longer lease
        // than the arbitrator counts would get grants it forgets too early. Refuse the mix.
        if let odd = configs.first(where: { $0.timeouts != first.timeouts }) {
            throw ConfigError(key: "timeouts", message: "cluster \(odd.cluster.name) has timeouts that differ from cluster \(first.cluster.name); one arbitrator process serves clusters with identical [timeouts] only (run another arbitrator for the others)")
        }
        staleAfterMs = first.timeouts.failureTimeout.nanosecondsClamped / 1_000_000
        let core = ArbitratorCore(settings: QuorumSettings(timings: first.timeouts, splitBrain: first.cluster.splitBrain,
                                                       plantedBugs: NodeDaemon.plantedBugs()),
                              persisted: persisted)
        // One identity series, without a cluster label: `* on(instance) group_left(cluster, node)
        // hamgr_build_info` needs exactly one per instance, and an arbitrator serves many
        // clusters (its per-cluster series carry `cluster` themselves).
        registry.gauge("hamgr_build_info", help: NodeMetrics.buildInfoHelp,
                       labels: ["version": hamgrVersion, "node": ClusterConfig.reservedArbitratorName]).set(1)
        decisionSeconds = registry.histogram(
            "hamgr_arbitrator_decision_seconds", help: "Time from receiving a quorum message to having acted on it (persisted, replied).",
            buckets: [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1])
        messagesTotal = registry.counter("hamgr_arbitrator_messages_total", help: "Quorum messages handled.")
        registry.gauge("hamgr_arbitrator_clusters", help: "Clusters this arbitrator serves.").set(clusters.count)
        runtime = ArbitratorRuntime(core: core, host: self)
    }

    /// Each status address with the clusters that name it, in cluster-name order (the first
    /// one's [tls] section gives the listener its certificate).
    static func statusListeners(_ configs: [ClusterConfig]) -> [(String, [ClusterConfig])] {
        let byAddress = Dictionary(grouping: configs.filter { $0.arbitrator.statusAddress != nil }) { $0.arbitrator.statusAddress! }
        return byAddress.keys.sorted().map { addr in (addr, byAddress[addr]!.sorted { $0.cluster.name < $1.cluster.name }) }
    }

    static func statePath(_ c: ClusterConfig) -> String {
        (c.arbitrator.stateDir as NSString).appendingPathComponent("\(c.cluster.name).state")
    }

    func start() throws {
        var bound = Set<String>()
        for entry in clusters.values {
            let addr = entry.config.arbitrator.address
            guard bound.insert(addr).inserted else { continue }
            let hp = try parseHostPort(addr, key: "arbitrator.address")
            let idle = TimeAmount.nanoseconds(entry.config.timeouts.failureTimeout.nanosecondsClamped)
            listeners.append(try PeerListener.bind(
                host: hp.host, port: hp.port, group: group, idleTimeout: idle,
                keysForCluster: { [clusters] name in clusters[name]?.keys ?? [] },
                refused: { [logger] why in logger.warning("\(why)", metadata: ["event": "link_refused"]) },
                route: { [weak self] hello in self?.route(hello) }).wait())
        }
        for (addr, configs) in Self.statusListeners(clusters.values.map(\.config)) {
            let hp = try parseHostPort(addr, key: "arbitrator.status_address")
            let first = configs[0]
            if let odd = configs.first(where: { $0.status != first.status }) {
                throw ConfigError(key: "status", message: "clusters \(first.cluster.name) and \(odd.cluster.name) share arbitrator.status_address \(addr) but not their [status] settings; give them the same tls and read_token_file, or separate status addresses")
            }
            let identity = first.status.tls ? try first.loadTLSIdentity(host: ClusterConfig.reservedArbitratorName) : nil
            if let identity {
                registry.gauge(TLSIdentity.expiryMetric, help: TLSIdentity.expiryHelp).set(identity.notValidAfter.timeIntervalSince1970)
            }
            let tls = identity?.serverConfiguration()
            let server = StatusServer(group: group, host: hp.host, port: hp.port, adminToken: nil,
                                      readToken: try first.loadReadToken(), tls: tls,
                                      handlers: statusHandlers(), logger: logger)
            try server.start().wait()
            statusServers.append(server)
        }
        _ = notifier.ready(status: "serving \(clusters.count) cluster(s)")
        // The watchdog proves the loops answer (every session and decision runs on them).
        let probe = LivenessProbe(LivenessProbe.loops(of: group))
        _ = notifier.startWatchdog { [logger] bound in
            let stuck = probe.stuck(within: bound)
            if !stuck.isEmpty { logger.error("watchdog: \(stuck.joined(separator: ", ")) did not answer within \(bound); not pinging", metadata: ["event": "watchdog_miss"]) }
            return stuck.isEmpty
        }
        logger.notice("arbitrator serving \(clusters.count) cluster(s): \(clusters.keys.sorted().joined(separator: ", "))",
                      metadata: ["event": "started"])
    }

    func shutdown() {
        _ = notifier.stopping()
        for l in listeners { _ = try? l.close().wait() }
        for s in statusServers { _ = try? s.stop().wait() }
        logger.notice("arbitrator stopped", metadata: ["event": "stopped"])
    }

    private func route(_ hello: PeerHello) -> (local: PeerHello, callbacks: PeerSessionCallbacks)? {
        guard hello.channel == "quorum", let entry = clusters[hello.cluster],
              entry.config.nodes.contains(where: { $0.name == hello.node }) else { return nil }
        let cluster = hello.cluster
        let local = PeerHello(cluster: cluster, node: NodeDaemon.arbitratorID, channel: "quorum")
        return (local, PeerSessionCallbacks(
            established: { [weak self] conn in
                self?.onDecisionLoop {
                    self?.clusters[cluster]?.connections[conn.remote.node]?.close()
                    self?.clusters[cluster]?.connections[conn.remote.node] = conn
                }
            },
            frame: { [weak self] conn, frame in
                guard let self else { return }
                switch frame.quorumMessage() {
                case .success(let m):
                    let received = MonotonicClock.now()
                    self.onDecisionLoop { self.handle(cluster: cluster, from: conn.remote.node, m, received: received) }
                case .failure(let e):
                    self.logger.warning("refused frame from \(cluster)/\(conn.remote.node): \(e)", metadata: ["event": "frame_refused"])
                    conn.close()
                }
            },
            closed: { [weak self] conn, _ in
                guard let conn else { return }
                self?.onDecisionLoop {
                    if self?.clusters[cluster]?.connections[conn.remote.node] === conn {
                        self?.clusters[cluster]?.connections[conn.remote.node] = nil
                    }
                }
            }))
    }

    /// Runs `body` on the decision loop: inline when the session already lives there (no task
    /// allocation, no cross-thread wake-up), else as a task on it. Order per session is kept
    /// either way: a session's events all arrive on one loop, in order.
    private func onDecisionLoop(_ body: @escaping () -> Void) {
        if loop.inEventLoop { body() } else { loop.execute(body) }
    }

    private func handle(cluster: String, from: NodeID, _ message: QuorumMessage, received: Instant) {
        runtime.receive(cluster: cluster, from: from, message)
        decisionSeconds.observe(MonotonicClock.now() - received)
        messagesTotal.increment()
    }

    // MARK: ArbitratorHost (decision loop only)

    func now() -> Instant { MonotonicClock.now() }

    func persist(cluster: String, _ state: ArbitratorPersistentState) throws {
        guard let entry = clusters[cluster] else { return }
        try DurableFile.write(state.encoded(), to: Self.statePath(entry.config))
    }

    func send(_ message: QuorumMessage, cluster: String, to node: NodeID, epoch: Epoch) {
        clusters[cluster]?.connections[node]?.send(message, epoch: epoch)
    }

    func log(cluster: String, _ event: QuorumEvent) {
        // At most 20 lines a second per event name: a restart under many clusters refuses
        // every vote for one lease (issue 12: ~10,700 lines at 10,000 clusters).
        guard let held = logLimiter.admit(event.name) else { return }
        var md: Logger.Metadata = ["event": .string(event.name), "cluster": .string(cluster), "node": "arbitrator"]
        for f in event.fields { md[f.key] = .string(f.value) }
        if held > 0 { md["suppressed"] = .string(String(held)) }
        logger.notice("\(event.name)\(held > 0 ? " (\(held) similar lines suppressed before this one)" : "")", metadata: md)
    }

    func fatal(_ reason: String) {
        // Never reply on the strength of a vote we could not make durable.
        logger.critical("\(reason); exiting", metadata: ["event": "persist_failed"])
        exit(70)
    }

    // MARK: status

    /// /status and /metrics take a snapshot on the decision loop (one pass over the clusters)
    /// and encode or render it on a background queue: with 10,000 clusters the text is 40,000
    /// series, and rendering it on the decision loop stalled every session for seconds.
    private func statusHandlers() -> StatusHandlers {
        StatusHandlers(
            status: { [weak self] callerLoop in
                guard let self else { return callerLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
                return self.loop.submit { self.statusDocument() }.hop(to: callerLoop).flatMap { doc in
                    Self.offLoop(callerLoop) {
                        var sorted = doc
                        sorted.clusters.sort { $0.name < $1.name }
                        return try JSONEncoder.hamgr.encode(sorted)
                    }
                }
            },
            asyncMetrics: { [weak self] callerLoop in
                guard let self else { return callerLoop.makeSucceededFuture("") }
                return self.loop.submit { self.metricsSnapshot() }.hop(to: callerLoop).flatMap { rows in
                    Self.offLoop(callerLoop) { self.metricsText(rows) }
                }
            },
            healthy: { true },
            admin: { _, callerLoop in callerLoop.makeSucceededFuture(.refused("the arbitrator has no admin actions", status: 404)) },
            page: { [weak self] callerLoop in
                guard let self else { return callerLoop.makeFailedFuture(ChannelError.ioOnClosedChannel) }
                let staleAfterMs = self.staleAfterMs
                return self.loop.submit { self.statusDocument() }.hop(to: callerLoop).flatMap { doc in
                    let taken = Date()
                    return Self.offLoop(callerLoop) {
                        ArbitratorPage.render(doc, generatedAt: Self.pageTimestamp(taken), staleAfterMs: staleAfterMs)
                    }
                }
            })
    }

    /// "2026-12-06T03:04:05Z".
    private static func pageTimestamp(_ date: Date) -> String { date.formatted(.iso8601) }

    private static let renderQueue = DispatchQueue(label: "hamgr.arbitrator.render", qos: .utility)

    /// Runs `body` on a background queue, completing on `loop`.
    private static func offLoop<T: Sendable>(_ loop: EventLoop, _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        let promise = loop.makePromise(of: T.self)
        renderQueue.async { promise.completeWith(Result { try body() }) }
        return promise.futureResult
    }

    private func statusDocument() -> ArbitratorStatusDocument {
        let now = MonotonicClock.now()
        // Unsorted here (the decision loop); sorted by name where it is encoded.
        return ArbitratorStatusDocument(clusters: clusters.map { name, entry in
            // A configured cluster nobody has contacted yet is listed at epoch 0.
            let st = core.status(cluster: name)
            let leaseValid = st?.leaseExpiry.map { now < $0 } ?? false
            let leaseRemainingMs = leaseValid ? st?.leaseExpiry.map { ($0 - now).nanosecondsClamped / 1_000_000 } : nil
            var contact: [String: Int64?] = [:]
            for n in entry.config.nodes {
                contact[n.name.name] = st?.lastContact[n.name].map { (now - $0).nanosecondsClamped / 1_000_000 }
            }
            return ArbitratorStatusDocument.ClusterEntry(
                name: name, master: leaseValid ? st?.leaseHolder?.name : nil, epoch: st?.epoch.value ?? 0,
                outdated: (st?.outdated ?? []).map { ArbitratorStatusDocument.OutdatedMark(node: $0.node.name, epoch: $0.epoch.value) },
                lastContactMs: contact, leaseRemainingMs: leaseRemainingMs,
                connected: entry.connections.keys.map(\.name).sorted())
        })
    }

    /// On the decision loop: per-cluster figures, no rendering.
    private func metricsSnapshot() -> [ArbitratorClusterMetrics] {
        var rows = core.metricsRows(at: MonotonicClock.now())
        for i in rows.indices { rows[i].connectedNodes = clusters[rows[i].cluster]?.connections.count ?? 0 }
        return rows
    }

    /// Off the decision loop: the registry's own series plus four per-cluster families,
    /// written directly (a registry series per cluster and figure cost a locked lookup each).
    private func metricsText(_ snapshot: [ArbitratorClusterMetrics]) -> String {
        let rows = snapshot.sorted { $0.cluster < $1.cluster }
        var out = registry.render()
        out.reserveCapacity(out.utf8.count + rows.count * 4 * 64)
        func family(_ name: String, _ help: String, _ value: (ArbitratorClusterMetrics) -> Double) {
            guard !rows.isEmpty else { return }
            out += "# HELP \(name) \(MetricsRegistry.escapeHelp(help))\n# TYPE \(name) gauge\n"
            for r in rows {
                out += "\(name){cluster=\"\(MetricsRegistry.escapeLabelValue(r.cluster))\"} \(MetricsRegistry.format(value(r)))\n"
            }
        }
        family("hamgr_arbitrator_connected_nodes", "Nodes with an open quorum link, per cluster.") { Double($0.connectedNodes) }
        family("hamgr_arbitrator_epoch", "Highest epoch promised, per cluster.") { Double($0.epoch.value) }
        family("hamgr_arbitrator_lease_valid", "1 while a lease granted by this arbitrator is valid, per cluster.") { $0.leaseValid ? 1 : 0 }
        family("hamgr_arbitrator_outdated_nodes", "Nodes recorded as outdated, per cluster.") { Double($0.outdatedNodes) }
        return out + ProcessMetrics.render()
    }

}
