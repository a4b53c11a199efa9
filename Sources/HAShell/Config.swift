@preconcurrency import Crypto
import Foundation
import NIOSSL
import TOMLKit

/// One cluster's configuration: the TOML file of design.md §5, the same on every host.
///
/// `load(path:)` parses and validates; every problem is a `ConfigError` whose key is the
/// path of the offending key (`cluster.protocol`, `node[1].service_address`, `volume.size`).
/// Node and resource indexes count from 0 in the order they appear in the file.
/// Unknown keys are errors: a typo must never silently fall back to a default.
public struct ClusterConfig: Sendable, Equatable {
    public struct Cluster: Sendable, Equatable {
        public var name: String
        /// Absolute path of the cluster key (≥ 32 bytes, mode 0600): links are opened with it.
        public var keyFile: String
        /// Keys also accepted from peers (a key rollover: docs/operator-guide.md, "Security").
        public var acceptKeyFiles: [String]
        /// Absolute path of the admin bearer token (mode 0600); nil refuses all admin actions.
        public var adminTokenFile: String?
        public var replicationProtocol: ReplicationProtocol
        public var splitBrain: SplitBrainPolicy
        public var afterSplitBrain: AfterSplitBrain

        public init(name: String, keyFile: String, acceptKeyFiles: [String] = [], adminTokenFile: String? = nil,
                    replicationProtocol: ReplicationProtocol = .c, splitBrain: SplitBrainPolicy = .prohibit,
                    afterSplitBrain: AfterSplitBrain = .disconnect) {
            self.name = name; self.keyFile = keyFile; self.acceptKeyFiles = acceptKeyFiles; self.adminTokenFile = adminTokenFile
            self.replicationProtocol = replicationProtocol; self.splitBrain = splitBrain
            self.afterSplitBrain = afterSplitBrain
        }
    }

    public struct Volume: Sendable, Equatable {
        public var sizeBytes: UInt64
        /// Granularity of the dirty bitmap and of resync/verify.
        public var chunkSizeBytes: UInt64
        /// Resync bandwidth cap in bytes per second.
        public var resyncRateBytesPerSecond: UInt64
        /// Sealed frames the replication link may hold unsent on the master before writes
        /// stop counting as queued to the peer (protocol A's acknowledgement waits).
        public var linkSendBufferBytes: UInt64 = Volume.defaultLinkSendBufferBytes
        /// Replicated writes queued for the backup's disk beyond which it stops reading the link.
        public var applyQueueBytes: UInt64 = Volume.defaultApplyQueueBytes

        public static let defaultChunkSizeBytes: UInt64 = 64 << 10
        public static let defaultResyncRateBytesPerSecond: UInt64 = 100 << 20
        public static let defaultLinkSendBufferBytes: UInt64 = 8 << 20
        public static let defaultApplyQueueBytes: UInt64 = 64 << 20

        public init(sizeBytes: UInt64, chunkSizeBytes: UInt64 = Volume.defaultChunkSizeBytes,
                    resyncRateBytesPerSecond: UInt64 = Volume.defaultResyncRateBytesPerSecond) {
            self.sizeBytes = sizeBytes; self.chunkSizeBytes = chunkSizeBytes
            self.resyncRateBytesPerSecond = resyncRateBytesPerSecond
        }
    }

    public struct Node: Sendable, Equatable {
        public var name: NodeID
        /// HOST:PORT of the replication link (peer frames).
        public var replicationAddress: String
        /// HOST:PORT of the NBD export; differs per node.
        public var serviceAddress: String
        /// HOST:PORT of /metrics, /status, /healthz and the admin API.
        public var statusAddress: String
        /// Backing file or block device (absolute path).
        public var backing: String
        /// Metadata file (absolute path).
        public var metadata: String
        /// NBD export name; defaults to the cluster name.
        public var exportName: String
        /// A missing backing *file* may be created (sparse). Off by default: a path that does
        /// not exist is an error naming it, and nothing under /dev is ever created.
        public var create: Bool

        public init(name: NodeID, replicationAddress: String, serviceAddress: String, statusAddress: String,
                    backing: String, metadata: String, exportName: String, create: Bool = false) {
            self.name = name; self.replicationAddress = replicationAddress; self.serviceAddress = serviceAddress
            self.statusAddress = statusAddress; self.backing = backing; self.metadata = metadata
            self.exportName = exportName; self.create = create
        }
    }

    public struct Arbitrator: Sendable, Equatable {
        public var address: String
        public var statusAddress: String?
        public var stateDir: String
        public static let defaultStateDir = "/var/lib/hamgr/arbitrator"

        public init(address: String, statusAddress: String? = nil, stateDir: String = Arbitrator.defaultStateDir) {
            self.address = address; self.statusAddress = statusAddress; self.stateDir = stateDir
        }
    }

    /// How a resource is driven (design.md §4).
    public enum ResourceAgent: Sendable, Equatable, CustomStringConvertible {
        /// An OCF resource agent: `$OCF_ROOT/resource.d/PROVIDER/AGENT`.
        case ocf(provider: String, agent: String)
        /// A systemd unit started and stopped over D-Bus.
        case systemd(unit: String)
        /// An executable taking `start|stop|monitor` with OCF-style exit codes.
        case exec(path: String)
        /// `hamgr:nbd-attach`: this node's own export attached as a local block device
        /// (docs/operator-guide.md, "Attaching the export on the master").
        case nbdAttach

        public var description: String {
            switch self {
            case .ocf(let p, let a): return "ocf:\(p):\(a)"
            case .systemd(let u): return "systemd:\(u)"
            case .exec(let p): return "exec:\(p)"
            case .nbdAttach: return "hamgr:nbd-attach"
            }
        }

        /// Parse `ocf:PROVIDER:AGENT`, `systemd:UNIT`, `exec:PATH` or `hamgr:nbd-attach`.
        public static func parse(_ s: String, key: String) throws -> ResourceAgent {
            let parts = s.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            let safe = { (x: String) in !x.isEmpty && !x.contains("/") && x != "." && x != ".." }
            switch parts.first {
            case "ocf" where parts.count == 3 && safe(parts[1]) && safe(parts[2]):
                return .ocf(provider: parts[1], agent: parts[2])
            case "systemd" where parts.count == 2 && safe(parts[1]):
                return .systemd(unit: parts[1].contains(".") ? parts[1] : parts[1] + ".service")
            case "exec" where parts.count >= 2:
                let path = s.dropFirst("exec:".count)
                guard path.hasPrefix("/") else {
                    throw ConfigError(key: key, message: "'\(s)': exec: needs an absolute path")
                }
                return .exec(path: String(path))
            case "hamgr" where parts.count == 2 && parts[1] == "nbd-attach":
                return .nbdAttach
            default:
                throw ConfigError(key: key, message: "'\(s)' is not ocf:PROVIDER:AGENT, systemd:UNIT, exec:/PATH or hamgr:nbd-attach")
            }
        }
    }

    public struct Resource: Sendable, Equatable {
        public var name: String
        public var agent: ResourceAgent
        /// Agent parameters; OCF agents receive them as `OCF_RESKEY_<name>`.
        public var params: [String: String]
        public var monitorInterval: Duration
        /// Restarts after monitor failures before the node gives up and switches over.
        public var maxRestarts: Int
        /// Time limit for one start, stop or monitor action.
        public var timeout: Duration

        public static let defaultMonitorInterval: Duration = .seconds(10)
        public static let defaultMaxRestarts = 3
        public static let defaultTimeout: Duration = .seconds(20)

        public init(name: String, agent: ResourceAgent, params: [String: String] = [:],
                    monitorInterval: Duration = Resource.defaultMonitorInterval,
                    maxRestarts: Int = Resource.defaultMaxRestarts, timeout: Duration = Resource.defaultTimeout) {
            self.name = name; self.agent = agent; self.params = params
            self.monitorInterval = monitorInterval; self.maxRestarts = maxRestarts; self.timeout = timeout
        }
    }

    public struct Hooks: Sendable, Equatable {
        public var onPromote: String?
        public var onDemote: String?
        public var timeout: Duration
        public static let defaultTimeout: Duration = .seconds(30)
        public init(onPromote: String? = nil, onDemote: String? = nil, timeout: Duration = Hooks.defaultTimeout) {
            self.onPromote = onPromote; self.onDemote = onDemote; self.timeout = timeout
        }
    }

    public var cluster: Cluster
    public var timeouts: LeaseTimings
    public var volume: Volume
    /// Exactly two data nodes, in file order.
    public var nodes: [Node]
    public var arbitrator: Arbitrator
    /// Started in this order on promotion, stopped in reverse on demotion.
    public var resources: [Resource]
    public var hooks: Hooks
    /// Certificates (nil: no TLS anywhere).
    public var tls: TLSSettings?
    public var export: ExportSettings
    public var status: StatusSettings
    /// `[log] level`; `--log-level` and `$HAMGR_LOG_LEVEL` override it.
    public var logLevel: String?
    /// The file this was loaded from (nil when built in code).
    public var sourcePath: String?

    public init(cluster: Cluster, timeouts: LeaseTimings = .defaults, volume: Volume, nodes: [Node],
                arbitrator: Arbitrator, resources: [Resource] = [], hooks: Hooks = Hooks(),
                tls: TLSSettings? = nil, export: ExportSettings = ExportSettings(), status: StatusSettings = StatusSettings(),
                sourcePath: String? = nil) {
        self.cluster = cluster; self.timeouts = timeouts; self.volume = volume; self.nodes = nodes
        self.arbitrator = arbitrator; self.resources = resources; self.hooks = hooks
        self.tls = tls; self.export = export; self.status = status; self.sourcePath = sourcePath
    }

    /// The URL of a status listener at `address` (`https://` when `status.tls` is on).
    public func statusURL(_ address: String) -> String { "\(status.tls ? "https" : "http")://\(address)" }

    /// The keys whose values differ in `other`, as they are spelled in the file
    /// (`timeouts.lease_ms`, `node[1].service_address`, `resource[0].params`), in file
    /// order: a reload names each one it cannot apply live. A list that grew or shrank
    /// (`[[node]]`, `[[resource]]`) is named by its index past the shorter one.
    public func changedKeys(comparedTo other: ClusterConfig) -> [String] {
        var out: [String] = []
        func diff<T: Equatable>(_ key: String, _ a: T, _ b: T) { if a != b { out.append(key) } }
        diff("cluster.name", cluster.name, other.cluster.name)
        diff("cluster.key_file", cluster.keyFile, other.cluster.keyFile)
        diff("cluster.accept_key_files", cluster.acceptKeyFiles, other.cluster.acceptKeyFiles)
        diff("cluster.admin_token_file", cluster.adminTokenFile, other.cluster.adminTokenFile)
        diff("cluster.protocol", cluster.replicationProtocol, other.cluster.replicationProtocol)
        diff("cluster.split_brain", cluster.splitBrain, other.cluster.splitBrain)
        diff("cluster.after_split_brain", cluster.afterSplitBrain, other.cluster.afterSplitBrain)
        diff("timeouts.renew_interval_ms", timeouts.renewInterval, other.timeouts.renewInterval)
        diff("timeouts.lease_ms", timeouts.lease, other.timeouts.lease)
        diff("timeouts.failure_timeout_ms", timeouts.failureTimeout, other.timeouts.failureTimeout)
        diff("timeouts.drift", timeouts.drift, other.timeouts.drift)
        diff("volume.size", volume.sizeBytes, other.volume.sizeBytes)
        diff("volume.chunk_size", volume.chunkSizeBytes, other.volume.chunkSizeBytes)
        diff("volume.resync_rate", volume.resyncRateBytesPerSecond, other.volume.resyncRateBytesPerSecond)
        diff("volume.link_send_buffer", volume.linkSendBufferBytes, other.volume.linkSendBufferBytes)
        diff("volume.apply_queue", volume.applyQueueBytes, other.volume.applyQueueBytes)
        for i in 0..<max(nodes.count, other.nodes.count) {
            guard i < nodes.count, i < other.nodes.count else { out.append("node[\(i)]"); continue }
            let (a, b) = (nodes[i], other.nodes[i])
            diff("node[\(i)].name", a.name, b.name)
            diff("node[\(i)].replication_address", a.replicationAddress, b.replicationAddress)
            diff("node[\(i)].service_address", a.serviceAddress, b.serviceAddress)
            diff("node[\(i)].status_address", a.statusAddress, b.statusAddress)
            diff("node[\(i)].backing", a.backing, b.backing)
            diff("node[\(i)].metadata", a.metadata, b.metadata)
            diff("node[\(i)].export_name", a.exportName, b.exportName)
            diff("node[\(i)].create", a.create, b.create)
        }
        diff("arbitrator.address", arbitrator.address, other.arbitrator.address)
        diff("arbitrator.status_address", arbitrator.statusAddress, other.arbitrator.statusAddress)
        diff("arbitrator.state_dir", arbitrator.stateDir, other.arbitrator.stateDir)
        for i in 0..<max(resources.count, other.resources.count) {
            guard i < resources.count, i < other.resources.count else { out.append("resource[\(i)]"); continue }
            let (a, b) = (resources[i], other.resources[i])
            diff("resource[\(i)].name", a.name, b.name)
            diff("resource[\(i)].agent", a.agent, b.agent)
            diff("resource[\(i)].params", a.params, b.params)
            diff("resource[\(i)].monitor_interval_ms", a.monitorInterval, b.monitorInterval)
            diff("resource[\(i)].max_restarts", a.maxRestarts, b.maxRestarts)
            diff("resource[\(i)].timeout_ms", a.timeout, b.timeout)
        }
        diff("hooks.on_promote", hooks.onPromote, other.hooks.onPromote)
        diff("hooks.on_demote", hooks.onDemote, other.hooks.onDemote)
        diff("hooks.timeout_ms", hooks.timeout, other.hooks.timeout)
        diff("tls.ca_file", tls?.caFile, other.tls?.caFile)
        diff("tls.cert_file", tls?.certFile, other.tls?.certFile)
        diff("tls.key_file", tls?.keyFile, other.tls?.keyFile)
        diff("export.tls", export.tls, other.export.tls)
        diff("export.client_ca_file", export.clientCAFile, other.export.clientCAFile)
        diff("export.allow", export.allow, other.export.allow)
        diff("export.unix_socket", export.unixSocket, other.export.unixSocket)
        diff("export.max_in_flight_bytes", export.maxInFlightBytes, other.export.maxInFlightBytes)
        diff("export.max_in_flight_requests", export.maxInFlightRequests, other.export.maxInFlightRequests)
        diff("export.max_connections", export.maxConnections, other.export.maxConnections)
        diff("status.tls", status.tls, other.status.tls)
        diff("status.read_token_file", status.readTokenFile, other.status.readTokenFile)
        diff("log.level", logLevel, other.logLevel)
        return out
    }

    // MARK: Lookup

    /// The node called `name`; throws naming the known nodes otherwise.
    public func node(named name: String) throws -> Node {
        guard let n = nodes.first(where: { $0.name.name == name }) else {
            throw ConfigError(key: "node", message: "no node named '\(name)' in cluster \(cluster.name) (nodes: \(nodes.map(\.name.name).joined(separator: ", ")))")
        }
        return n
    }

    /// The other data node.
    public func peer(of name: String) throws -> Node {
        _ = try node(named: name)
        guard let p = nodes.first(where: { $0.name.name != name }) else {
            throw ConfigError(key: "node", message: "node '\(name)' has no peer")
        }
        return p
    }

    /// The cluster key (checked: exists, ≥ 32 bytes, mode 0600).
    public func loadClusterKey() throws -> SymmetricKey {
        try SymmetricKey.load(clusterKeyFile: cluster.keyFile, key: "cluster.key_file")
    }

    /// The keys a peer may open a session with: `key_file` first (the one this host
    /// dials with), then `accept_key_files`.
    public func loadClusterKeys() throws -> [SymmetricKey] {
        var keys = [try loadClusterKey()]
        for (i, path) in cluster.acceptKeyFiles.enumerated() {
            keys.append(try SymmetricKey.load(clusterKeyFile: path, key: "cluster.accept_key_files[\(i)]"))
        }
        return keys
    }

    /// The read-only bearer token, or nil when `status.read_token_file` is not set.
    public func loadReadToken() throws -> String? {
        guard let path = status.readTokenFile else { return nil }
        return try Self.readSecretFile(path, key: "status.read_token_file")
    }

    /// Host `host`'s TLS identity (a node's name, or `arbitrator`), or nil without `[tls]`.
    public func loadTLSIdentity(host: String) throws -> TLSIdentity? {
        guard let tls else { return nil }
        return try TLSFiles.identity(tls, host: host)
    }

    /// The CA NBD clients' certificates must chain to, or nil when not required.
    public func loadExportClientCA() throws -> [NIOSSLCertificate]? {
        guard let path = export.clientCAFile else { return nil }
        return try TLSFiles.certificates(path, key: "export.client_ca_file")
    }

    /// The admin bearer token, or nil when `cluster.admin_token_file` is not set.
    public func loadAdminToken() throws -> String? {
        guard let path = cluster.adminTokenFile else { return nil }
        return try Self.readSecretFile(path, key: "cluster.admin_token_file")
    }

    /// Read a secret that must be mode 0600 (no group/other bits) and non-empty;
    /// surrounding whitespace (a trailing newline from `echo`) is dropped. The path may begin
    /// with `${CREDENTIALS_DIRECTORY}` (`SystemdCredentials`).
    public static func readSecretFile(_ configuredPath: String, key: String) throws -> String {
        let path = try SystemdCredentials.expand(configuredPath, key: key)
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ConfigError(key: key, message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw ConfigError(key: key, message: "\(path) has mode \(String(st.st_mode & 0o777, radix: 8)); it must not be readable by group or others (chmod 600)")
        }
        guard let data = FileManager.default.contents(atPath: path),
              let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(key: key, message: "cannot read \(path) as UTF-8 text")
        }
        let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.count >= 16 else {
            throw ConfigError(key: key, message: "\(path) holds \(token.count) characters; use at least 16 random characters")
        }
        return token
    }

    // MARK: Loading

    /// Read, parse and validate the file at `path` (including the key and token files).
    public static func load(path: String) throws -> ClusterConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(key: "config", message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(key: "config", message: "\(path) is not UTF-8 text")
        }
        let dir = (URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent().path)
        var config = try parse(toml: text, relativeTo: dir)
        config.sourcePath = path
        try config.validate()
        return config
    }

    /// Parse TOML text. Relative file paths are resolved against `relativeTo`
    /// (the config file's directory). Checks types, required and unknown keys; call
    /// `validate()` for the cross-key rules and the key files.
    public static func parse(toml text: String, relativeTo dir: String = FileManager.default.currentDirectoryPath) throws -> ClusterConfig {
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw ConfigError(key: "config", message: "TOML syntax error at line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        }
        let top = TableReader(root, path: "")
        try top.allow(["cluster", "timeouts", "volume", "node", "arbitrator", "resource", "hooks", "tls", "export", "status", "log"])
        let resolve = { (p: String) -> String in
            p.hasPrefix("/") ? p : URL(fileURLWithPath: dir).appendingPathComponent(p).standardizedFileURL.path
        }
        // Secret files may be systemd credentials: `${CREDENTIALS_DIRECTORY}/…` is kept as
        // written and expanded when the file is read (SystemdCredentials).
        let resolveSecret = { (p: String) -> String in SystemdCredentials.names(p) ? p : resolve(p) }

        // [cluster]
        let c = try top.requiredTable("cluster")
        try c.allow(["name", "key_file", "accept_key_files", "admin_token_file", "protocol", "split_brain", "after_split_brain"])
        let name = try c.requiredString("name")
        guard !name.isEmpty, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }) else {
            throw ConfigError(key: "cluster.name", message: "'\(name)' must be non-empty and use only letters, digits, '-', '_' and '.'")
        }
        let cluster = Cluster(
            name: name,
            keyFile: resolveSecret(try c.requiredString("key_file")),
            acceptKeyFiles: (try c.stringArray("accept_key_files") ?? []).map(resolveSecret),
            adminTokenFile: try c.string("admin_token_file").map(resolveSecret),
            replicationProtocol: try c.enumValue("protocol", default: .c),
            splitBrain: try c.enumValue("split_brain", default: .prohibit),
            afterSplitBrain: try c.enumValue("after_split_brain", default: .disconnect))

        // [timeouts]
        var timeouts = LeaseTimings.defaults
        if let t = try top.table("timeouts") {
            try t.allow(["renew_interval_ms", "lease_ms", "failure_timeout_ms", "drift"])
            if let v = try t.positiveInt("renew_interval_ms") { timeouts.renewInterval = .milliseconds(v) }
            if let v = try t.positiveInt("lease_ms") { timeouts.lease = .milliseconds(v) }
            if let v = try t.positiveInt("failure_timeout_ms") { timeouts.failureTimeout = .milliseconds(v) }
            if let v = try t.double("drift") { timeouts.drift = v }
        }

        // [volume]
        let v = try top.requiredTable("volume")
        try v.allow(["size", "chunk_size", "resync_rate", "create", "link_send_buffer", "apply_queue"])
        let createAll = try v.bool("create") ?? false
        var volume = Volume(
            sizeBytes: try v.size("size", required: true)!,
            chunkSizeBytes: try v.size("chunk_size") ?? Volume.defaultChunkSizeBytes,
            resyncRateBytesPerSecond: try v.size("resync_rate") ?? Volume.defaultResyncRateBytesPerSecond)
        volume.linkSendBufferBytes = try v.size("link_send_buffer", in: (1 << 20)...(1 << 30)) ?? Volume.defaultLinkSendBufferBytes
        volume.applyQueueBytes = try v.size("apply_queue", in: (4 << 20)...(4 << 30)) ?? Volume.defaultApplyQueueBytes

        // [[node]]
        let nodeTables = try top.requiredArrayOfTables("node")
        var nodes: [Node] = []
        for (i, nt) in nodeTables.enumerated() {
            let n = TableReader(nt, path: "node[\(i)]")
            try n.allow(["name", "replication_address", "service_address", "status_address", "backing", "metadata", "export_name", "create"])
            let nodeName = try n.requiredString("name")
            guard !nodeName.isEmpty, nodeName.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) else {
                throw ConfigError(key: "node[\(i)].name", message: "'\(nodeName)' must be non-empty and use only letters, digits, '-' and '_'")
            }
            nodes.append(Node(
                name: NodeID(nodeName),
                replicationAddress: try n.requiredString("replication_address"),
                serviceAddress: try n.requiredString("service_address"),
                statusAddress: try n.requiredString("status_address"),
                backing: resolve(try n.requiredString("backing")),
                metadata: resolve(try n.requiredString("metadata")),
                exportName: try n.string("export_name") ?? name,
                create: try n.bool("create") ?? createAll))
        }

        // [arbitrator]
        let a = try top.requiredTable("arbitrator")
        try a.allow(["address", "status_address", "state_dir"])
        let arbitrator = Arbitrator(
            address: try a.requiredString("address"),
            statusAddress: try a.string("status_address"),
            stateDir: resolve(try a.string("state_dir") ?? Arbitrator.defaultStateDir))

        // [[resource]]
        var resources: [Resource] = []
        for (i, rt) in (try top.arrayOfTables("resource") ?? []).enumerated() {
            let r = TableReader(rt, path: "resource[\(i)]")
            try r.allow(["name", "agent", "params", "monitor_interval_ms", "max_restarts", "timeout_ms"])
            let rname = try r.requiredString("name")
            var params: [String: String] = [:]
            if let pt = try r.table("params") {
                for key in pt.table.keys.sorted() {
                    guard !key.isEmpty, key.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }) else {
                        throw ConfigError(key: "resource[\(i)].params.\(key)", message: "parameter names may use only letters, digits and '_' (they become OCF_RESKEY_<name>)")
                    }
                    params[key] = try pt.scalarAsString(key)
                }
            }
            resources.append(Resource(
                name: rname,
                agent: try ResourceAgent.parse(try r.requiredString("agent"), key: "resource[\(i)].agent"),
                params: params,
                monitorInterval: try r.positiveInt("monitor_interval_ms").map { .milliseconds($0) } ?? Resource.defaultMonitorInterval,
                maxRestarts: try r.nonNegativeInt("max_restarts") ?? Resource.defaultMaxRestarts,
                timeout: try r.positiveInt("timeout_ms").map { .milliseconds($0) } ?? Resource.defaultTimeout))
        }

        // [hooks]
        var hooks = Hooks()
        if let h = try top.table("hooks") {
            try h.allow(["on_promote", "on_demote", "timeout_ms"])
            hooks.onPromote = try h.string("on_promote").map(resolve)
            hooks.onDemote = try h.string("on_demote").map(resolve)
            if let ms = try h.positiveInt("timeout_ms") { hooks.timeout = .milliseconds(ms) }
        }

        // [tls]
        var tls: TLSSettings?
        if let t = try top.table("tls") {
            try t.allow(["ca_file", "cert_file", "key_file"])
            tls = TLSSettings(caFile: resolve(try t.requiredString("ca_file")),
                              certFile: resolve(try t.requiredString("cert_file")),
                              keyFile: resolve(try t.requiredString("key_file")))
        }

        // [export]: TLS required by default once certificates are configured.
        var export = ExportSettings(tls: tls == nil ? .off : .require)
        if let e = try top.table("export") {
            try e.allow(["tls", "client_ca_file", "allow", "unix_socket", "max_in_flight_bytes", "max_in_flight_requests", "max_connections"])
            export.tls = try e.enumValue("tls", default: export.tls)
            export.clientCAFile = try e.string("client_ca_file").map(resolve)
            for (i, text) in (try e.stringArray("allow") ?? []).enumerated() {
                guard let net = ClientNetwork(text) else {
                    throw ConfigError(key: "export.allow[\(i)]", message: "'\(text)' is not an address or a network (e.g. 10.1.0.0/16, 2001:db8::/32, 192.0.2.7)")
                }
                export.allow.append(net)
            }
            export.unixSocket = try e.string("unix_socket").map(resolve)
            if let b = try e.size("max_in_flight_bytes", in: UInt64(ExportSettings.minInFlightBytes)...(2 << 30)) { export.maxInFlightBytes = Int(b) }
            if let n = try e.int("max_in_flight_requests", in: 1...ExportSettings.maxInFlightRequestsLimit) { export.maxInFlightRequests = n }
            if let n = try e.int("max_connections", in: 1...ExportSettings.maxConnectionsLimit) { export.maxConnections = n }
        }

        // [status]: HTTPS by default once certificates are configured.
        var status = StatusSettings(tls: tls != nil)
        if let st = try top.table("status") {
            try st.allow(["tls", "read_token_file"])
            status.tls = try st.bool("tls") ?? status.tls
            status.readTokenFile = try st.string("read_token_file").map(resolveSecret)
        }

        // [log]
        var logLevel: String?
        if let l = try top.table("log") {
            try l.allow(["level"])
            logLevel = try l.string("level")
            if let v = logLevel, HamgrLogging.level(v) == nil {
                throw ConfigError(key: "log.level", message: "unknown level '\(v)'; expected one of \(HamgrLogging.levelNames)")
            }
        }

        var config = ClusterConfig(cluster: cluster, timeouts: timeouts, volume: volume, nodes: nodes,
                                   arbitrator: arbitrator, resources: resources, hooks: hooks,
                                   tls: tls, export: export, status: status)
        config.logLevel = logLevel
        return config
    }

    // MARK: Validation

    /// The name the arbitrator's vote goes by on the quorum channel.
    public static let reservedArbitratorName = "arbitrator"

    /// The cross-key rules, and the key and token files. Throws the first problem found.
    public func validate() throws {
        guard nodes.count == 2 else {
            throw ConfigError(key: "node", message: "exactly two [[node]] entries are required, found \(nodes.count)")
        }
        if nodes[0].name == nodes[1].name {
            throw ConfigError(key: "node[1].name", message: "'\(nodes[1].name)' is also the name of node[0]; node names must differ")
        }
        // The quorum channel names the third voter "arbitrator": a data node of that name
        // would be taken for it.
        for (i, n) in nodes.enumerated() where n.name.name == Self.reservedArbitratorName {
            throw ConfigError(key: "node[\(i)].name", message: "'\(Self.reservedArbitratorName)' is reserved for the arbitrator's vote")
        }

        // Every listening address must parse, and no two may collide.
        var seen: [String: String] = [:]
        func address(_ value: String, key: String) throws {
            let (host, port) = try parseHostPort(value, key: key)
            let canonical = "\(host.lowercased()):\(port)"
            if let other = seen[canonical] {
                throw ConfigError(key: key, message: "'\(value)' is also used by \(other); every address must be distinct")
            }
            seen[canonical] = key
        }
        for (i, n) in nodes.enumerated() {
            try address(n.replicationAddress, key: "node[\(i)].replication_address")
            try address(n.serviceAddress, key: "node[\(i)].service_address")
            try address(n.statusAddress, key: "node[\(i)].status_address")
            if n.exportName.isEmpty || n.exportName.utf8.count > 4096 {
                throw ConfigError(key: "node[\(i)].export_name", message: "must be 1…4096 bytes")
            }
        }
        try address(arbitrator.address, key: "arbitrator.address")
        if let s = arbitrator.statusAddress { try address(s, key: "arbitrator.status_address") }
        for (i, n) in nodes.enumerated() {
            if n.backing == n.metadata {
                throw ConfigError(key: "node[\(i)].metadata", message: "must differ from backing (\(n.backing))")
            }
            if n.create && isDevicePath(n.backing) {
                throw ConfigError(key: "node[\(i)].create", message: "\(n.backing) is a device path: hamgr never creates devices")
            }
        }

        // Volume geometry.
        let chunk = volume.chunkSizeBytes
        if chunk < 4096 || chunk & (chunk - 1) != 0 {
            throw ConfigError(key: "volume.chunk_size", message: "\(chunk) bytes; must be a power of two of at least 4KiB")
        }
        if volume.sizeBytes == 0 || volume.sizeBytes % chunk != 0 {
            throw ConfigError(key: "volume.size", message: "\(volume.sizeBytes) bytes is not a positive multiple of chunk_size (\(ByteSize.format(chunk)))")
        }
        if volume.resyncRateBytesPerSecond < 1 << 20 {
            throw ConfigError(key: "volume.resync_rate", message: "\(volume.resyncRateBytesPerSecond) bytes/s; must be at least 1MiB (per second)")
        }

        // The lease rule (design.md §2): one inequality, checked at start.
        if let first = timeouts.violations().first {
            if let sep = first.range(of: ": ") {
                throw ConfigError(key: String(first[..<sep.lowerBound]), message: String(first[sep.upperBound...]))
            }
            throw ConfigError(key: "timeouts", message: first)
        }

        if cluster.splitBrain == .prohibit && cluster.afterSplitBrain != .disconnect {
            throw ConfigError(key: "cluster.after_split_brain", message: "'\(cluster.afterSplitBrain.rawValue)' only applies with split_brain = \"allow\"; with \"prohibit\" divergence cannot arise")
        }

        // Resources.
        var names = Set<String>()
        for (i, r) in resources.enumerated() {
            if r.name.isEmpty || !r.name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) {
                throw ConfigError(key: "resource[\(i)].name", message: "'\(r.name)' must be non-empty and use only letters, digits, '-' and '_'")
            }
            if !names.insert(r.name).inserted {
                throw ConfigError(key: "resource[\(i)].name", message: "'\(r.name)' is used by an earlier resource; names must differ")
            }
            if r.agent == .nbdAttach { try NBDAttachSettings.validate(r.params, key: "resource[\(i)].params") }
        }

        // TLS modes need certificates; a client CA only means something with TLS.
        if tls == nil {
            if export.tls != .off {
                throw ConfigError(key: "export.tls", message: "\"\(export.tls.rawValue)\" needs a [tls] section (ca_file, cert_file, key_file); hamgr certs makes them")
            }
            if status.tls {
                throw ConfigError(key: "status.tls", message: "needs a [tls] section (ca_file, cert_file, key_file); hamgr certs makes them")
            }
        }
        if export.clientCAFile != nil && export.tls == .off {
            throw ConfigError(key: "export.client_ca_file", message: "client certificates need export.tls = \"allow\" or \"require\"")
        }
        for n in nodes {
            if let sock = export.unixSocket(for: n.name.name), !sock.hasPrefix("/") || sock.utf8.count > 107 {
                throw ConfigError(key: "export.unix_socket", message: "\(sock): must be an absolute path of at most 107 bytes")
            }
        }
        _ = try loadClusterKeys()
    }

    /// Checks only a data node needs: its admin and read tokens, its TLS identity, its
    /// backing store, and that its hooks and exec: resources are executable.
    public func validateNodeHost(_ name: String) throws {
        try validateNodeCredentials(name)
        try validateBacking(name)
        for (key, path) in [("hooks.on_promote", hooks.onPromote), ("hooks.on_demote", hooks.onDemote)] {
            if let path, access(path, X_OK) != 0 {
                throw ConfigError(key: key, message: "\(path) is not an executable file")
            }
        }
        for (i, r) in resources.enumerated() {
            if case .exec(let path) = r.agent, access(path, X_OK) != 0 {
                throw ConfigError(key: "resource[\(i)].agent", message: "\(path) is not an executable file")
            }
        }
    }

    /// The secrets and certificates node `name` serves with: admin and read tokens, its TLS
    /// identity (when the export or the status listener uses TLS), the export's client CA.
    public func validateNodeCredentials(_ name: String) throws {
        _ = try node(named: name)
        _ = try loadAdminToken()
        _ = try loadReadToken()
        if export.tls != .off || status.tls { _ = try loadTLSIdentity(host: name) }
        _ = try loadExportClientCA()
    }

    /// Checks only the arbitrator host needs: its TLS identity when it serves status over
    /// HTTPS, and the read token its status listener checks.
    public func validateArbitratorHost() throws {
        guard arbitrator.statusAddress != nil else { return }
        if status.tls { _ = try loadTLSIdentity(host: Self.reservedArbitratorName) }
        _ = try loadReadToken()
    }

    /// Node `name`'s backing store exists, or may be created (a file, with `create = true`).
    public func validateBacking(_ name: String) throws {
        let me = try node(named: name)
        let i = nodes.firstIndex(of: me) ?? 0
        if !FileManager.default.fileExists(atPath: me.backing) {
            if isDevicePath(me.backing) {
                throw ConfigError(key: "node[\(i)].backing", message: "\(me.backing) does not exist (a device is never created: attach or activate it first)")
            }
            if !me.create {
                throw ConfigError(key: "node[\(i)].backing", message: "\(me.backing) does not exist (set create = true to let hamgr create a sparse file)")
            }
        }
    }
}

// MARK: - A TOML table reader that remembers which keys were read

/// Reads typed values from one TOML table, naming the full key path in every error;
/// `allow(_:)` rejects unknown keys before any value is read, so a typo is reported as
/// itself rather than as the missing key it was meant to be.
private final class TableReader {
    let table: TOMLTable
    let path: String

    init(_ table: TOMLTable, path: String) { self.table = table; self.path = path }

    func key(_ k: String) -> String { path.isEmpty ? k : "\(path).\(k)" }

    private func value(_ k: String) -> TOMLValueConvertible? {
        table[k]
    }

    private func typeError(_ k: String, _ want: String, _ got: TOMLValueConvertible) -> ConfigError {
        ConfigError(key: key(k), message: "expected \(want), found \(got.type) \(got.debugDescription)")
    }

    func string(_ k: String) throws -> String? {
        guard let v = value(k) else { return nil }
        guard let s = v.string else { throw typeError(k, "a string", v) }
        return s
    }

    func bool(_ k: String) throws -> Bool? {
        guard let v = value(k) else { return nil }
        guard let b = v.bool else { throw typeError(k, "true or false", v) }
        return b
    }

    func stringArray(_ k: String) throws -> [String]? {
        guard let v = value(k) else { return nil }
        guard let a = v.array else { throw typeError(k, "an array of strings", v) }
        var out: [String] = []
        for (i, e) in a.enumerated() {
            guard let s = e.string else {
                throw ConfigError(key: "\(key(k))[\(i)]", message: "expected a string, found \(e.type)")
            }
            out.append(s)
        }
        return out
    }

    func requiredString(_ k: String) throws -> String {
        guard let s = try string(k) else { throw ConfigError(key: key(k), message: "required key is missing") }
        return s
    }

    func int(_ k: String) throws -> Int? {
        guard let v = value(k) else { return nil }
        guard let i = v.int else { throw typeError(k, "an integer", v) }
        return i
    }

    /// An integer within `range` (nil when absent); outside it, an error naming the range.
    func int(_ k: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let i = try int(k) else { return nil }
        guard range.contains(i) else { throw ConfigError(key: key(k), message: "must be from \(range.lowerBound) to \(range.upperBound), got \(i)") }
        return i
    }

    func positiveInt(_ k: String) throws -> Int? {
        guard let i = try int(k) else { return nil }
        guard i > 0 else { throw ConfigError(key: key(k), message: "must be positive, got \(i)") }
        return i
    }

    func nonNegativeInt(_ k: String) throws -> Int? {
        guard let i = try int(k) else { return nil }
        guard i >= 0 else { throw ConfigError(key: key(k), message: "must not be negative, got \(i)") }
        return i
    }

    func double(_ k: String) throws -> Double? {
        guard let v = value(k) else { return nil }
        if let d = v.double { return d }
        if let i = v.int { return Double(i) }
        throw typeError(k, "a number", v)
    }

    /// A size within `range` (nil when absent); outside it, an error naming the range.
    func size(_ k: String, in range: ClosedRange<UInt64>) throws -> UInt64? {
        guard let b = try size(k) else { return nil }
        guard range.contains(b) else {
            throw ConfigError(key: key(k), message: "\(ByteSize.format(b)): must be from \(ByteSize.format(range.lowerBound)) to \(ByteSize.format(range.upperBound))")
        }
        return b
    }

    /// A size: a string such as "64KiB" or a bare integer of bytes.
    func size(_ k: String, required: Bool = false) throws -> UInt64? {
        guard let v = value(k) else {
            if required { throw ConfigError(key: key(k), message: "required key is missing") }
            return nil
        }
        if let i = v.int {
            guard i >= 0 else { throw ConfigError(key: key(k), message: "must not be negative") }
            return UInt64(i)
        }
        guard let s = v.string else { throw typeError(k, "a size such as \"1GiB\"", v) }
        return try ByteSize.parse(s, key: key(k))
    }

    func enumValue<E: RawRepresentable & CaseIterable>(_ k: String, default d: E) throws -> E where E.RawValue == String {
        guard let s = try string(k) else { return d }
        guard let e = E(rawValue: s) else {
            throw ConfigError(key: key(k), message: "unknown value '\(s)'; expected one of \(E.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))")
        }
        return e
    }

    func table(_ k: String) throws -> TableReader? {
        guard let v = value(k) else { return nil }
        guard let t = v.table else { throw typeError(k, "a table", v) }
        return TableReader(t, path: key(k))
    }

    func requiredTable(_ k: String) throws -> TableReader {
        guard let t = try table(k) else { throw ConfigError(key: key(k), message: "required section [\(key(k))] is missing") }
        return t
    }

    func arrayOfTables(_ k: String) throws -> [TOMLTable]? {
        guard let v = value(k) else { return nil }
        guard let a = v.array else { throw typeError(k, "an array of tables ([[\(key(k))]])", v) }
        var out: [TOMLTable] = []
        for (i, e) in a.enumerated() {
            guard let t = e.table else {
                throw ConfigError(key: "\(key(k))[\(i)]", message: "expected a table, found \(e.type)")
            }
            out.append(t)
        }
        return out
    }

    func requiredArrayOfTables(_ k: String) throws -> [TOMLTable] {
        guard let a = try arrayOfTables(k) else {
            throw ConfigError(key: key(k), message: "required [[\(key(k))]] entries are missing")
        }
        return a
    }

    /// A parameter value: strings as they are, numbers and booleans in their TOML spelling.
    func scalarAsString(_ k: String) throws -> String {
        guard let v = value(k) else { throw ConfigError(key: key(k), message: "missing") }
        if let s = v.string { return s }
        if let i = v.int { return String(i) }
        if let b = v.bool { return b ? "true" : "false" }
        if let d = v.double { return String(d) }
        throw typeError(k, "a string, number or boolean", v)
    }

    /// Reject keys outside `known`, suggesting the nearest known one.
    func allow(_ known: [String]) throws {
        for k in table.keys.sorted() where !known.contains(k) {
            var message = "unknown key"
            if let near = known.min(by: { editDistance($0, k) < editDistance($1, k) }), editDistance(near, k) <= 2 {
                message += "; did you mean '\(near)'?"
            }
            throw ConfigError(key: key(k), message: message)
        }
    }
}

private func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var prev = Array(0...b.count)
    for i in 1...a.count {
        var cur = [i] + Array(repeating: 0, count: b.count)
        for j in 1...b.count {
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
        }
        prev = cur
    }
    return prev[b.count]
}
