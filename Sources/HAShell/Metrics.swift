import Foundation

/// A small, thread-safe metrics registry that renders the Prometheus text exposition
/// format 0.0.4 (served at `/metrics`, checked with `promtool check metrics`).
///
/// A family is a name with its HELP and TYPE; each distinct label set is one series.
/// Asking again for the same name and labels returns the same series, so callers may
/// look series up on the hot path or keep the handle.
public final class MetricsRegistry: @unchecked Sendable {
    public enum Kind: String, Sendable { case counter, gauge, histogram }

    private final class Family {
        let name: String
        let help: String
        let kind: Kind
        let buckets: [Double]
        var series: [[LabelPair]: AnyObject] = [:]
        init(name: String, help: String, kind: Kind, buckets: [Double]) {
            self.name = name; self.help = help; self.kind = kind; self.buckets = buckets
        }
    }

    struct LabelPair: Hashable { var name: String; var value: String }

    private let lock = NSLock()
    private var families: [String: Family] = [:]

    /// The content type of `render()`'s output.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    public init() {}

    /// A counter series. Counter names end in `_total` (appended if missing).
    public func counter(_ name: String, help: String, labels: [String: String] = [:]) -> Counter {
        let full = name.hasSuffix("_total") ? name : name + "_total"
        return series(full, help: help, kind: .counter, buckets: [], labels: labels) { Counter() }
    }

    /// A gauge series.
    public func gauge(_ name: String, help: String, labels: [String: String] = [:]) -> Gauge {
        series(name, help: help, kind: .gauge, buckets: [], labels: labels) { Gauge() }
    }

    /// A histogram series with the given upper bounds (`+Inf` is implied).
    public func histogram(_ name: String, help: String, buckets: [Double] = Histogram.defaultLatencyBuckets,
                          labels: [String: String] = [:]) -> Histogram {
        let bounds = Array(Set(buckets.filter { $0.isFinite })).sorted()
        precondition(!bounds.isEmpty, "histogram \(name) needs at least one finite bucket")
        precondition(labels["le"] == nil, "histogram \(name) must not use the label 'le'")
        return series(name, help: help, kind: .histogram, buckets: bounds, labels: labels) { Histogram(bounds: bounds) }
    }

    private func series<T: AnyObject>(_ name: String, help: String, kind: Kind, buckets: [Double],
                                      labels: [String: String], make: () -> T) -> T {
        precondition(Self.isValidMetricName(name), "invalid metric name '\(name)'")
        for l in labels.keys {
            precondition(Self.isValidLabelName(l), "invalid label name '\(l)' on \(name)")
        }
        let key = labels.map { LabelPair(name: $0.key, value: $0.value) }.sorted { $0.name < $1.name }
        lock.lock(); defer { lock.unlock() }
        let family: Family
        if let f = families[name] {
            precondition(f.kind == kind, "metric \(name) registered as \(f.kind.rawValue), asked for as \(kind.rawValue)")
            precondition(f.buckets == buckets, "histogram \(name) registered with other buckets")
            family = f
        } else {
            family = Family(name: name, help: help, kind: kind, buckets: buckets)
            families[name] = family
        }
        if let existing = family.series[key] { return existing as! T }
        let s = make()
        family.series[key] = s
        return s
    }

    /// Remove one series (e.g. a resource that left the config).
    public func remove(_ name: String, labels: [String: String] = [:]) {
        let key = labels.map { LabelPair(name: $0.key, value: $0.value) }.sorted { $0.name < $1.name }
        lock.lock(); defer { lock.unlock() }
        families[name]?.series[key] = nil
        families[name + "_total"]?.series[key] = nil
    }

    /// The exposition text, families sorted by name, series by labels.
    public func render() -> String {
        lock.lock()
        // Each series' label text is built once, not twice per comparison of the sort.
        let snapshot = families.values.sorted { $0.name < $1.name }.map { f in
            (f, f.series.map { (text: Self.labelText($0.key), key: $0.key, value: $0.value) }
                .sorted { $0.text < $1.text }.map { (key: $0.key, value: $0.value) })
        }
        lock.unlock()

        var out = ""
        for (family, series) in snapshot where !series.isEmpty {
            // A counter's family in 0.0.4 text is named like its samples, `…_total`.
            out += "# HELP \(family.name) \(Self.escapeHelp(family.help))\n"
            out += "# TYPE \(family.name) \(family.kind.rawValue)\n"
            for (labels, object) in series {
                switch family.kind {
                case .counter:
                    out += "\(family.name)\(Self.labelText(labels)) \(Self.format((object as! Counter).value))\n"
                case .gauge:
                    out += "\(family.name)\(Self.labelText(labels)) \(Self.format((object as! Gauge).value))\n"
                case .histogram:
                    let h = (object as! Histogram).snapshot()
                    var cumulative: UInt64 = 0
                    for (i, bound) in family.buckets.enumerated() {
                        cumulative += h.counts[i]
                        let le = labels + [LabelPair(name: "le", value: Self.format(bound))]
                        out += "\(family.name)_bucket\(Self.labelText(le)) \(cumulative)\n"
                    }
                    let inf = labels + [LabelPair(name: "le", value: "+Inf")]
                    out += "\(family.name)_bucket\(Self.labelText(inf)) \(h.count)\n"
                    out += "\(family.name)_sum\(Self.labelText(labels)) \(Self.format(h.sum))\n"
                    out += "\(family.name)_count\(Self.labelText(labels)) \(h.count)\n"
                }
            }
        }
        return out
    }

    // MARK: Text format details

    static func labelText(_ labels: [LabelPair]) -> String {
        guard !labels.isEmpty else { return "" }
        return "{" + labels.map { "\($0.name)=\"\(escapeLabelValue($0.value))\"" }.joined(separator: ",") + "}"
    }

    /// Label values escape backslash, double quote and line feed.
    public static func escapeLabelValue(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for ch in s {
            switch ch {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(ch)
            }
        }
        return out
    }

    /// HELP text escapes backslash and line feed.
    public static func escapeHelp(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\n", with: "\\n")
    }

    /// Go-compatible float text: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
    public static func format(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v == .infinity { return "+Inf" }
        if v == -.infinity { return "-Inf" }
        if v == v.rounded(), abs(v) < 1e15 { return String(Int64(v)) }
        return "\(v)"
    }

    public static func isValidMetricName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first.isASCIILetterOrUnderscore || first == ":" else { return false }
        return s.unicodeScalars.allSatisfy { $0.isASCIILetterOrUnderscore || $0 == ":" || ("0"..."9").contains($0) }
    }

    public static func isValidLabelName(_ s: String) -> Bool {
        guard let first = s.unicodeScalars.first, first.isASCIILetterOrUnderscore, !s.hasPrefix("__") else { return false }
        return s.unicodeScalars.allSatisfy { $0.isASCIILetterOrUnderscore || ("0"..."9").contains($0) }
    }
}

private extension Unicode.Scalar {
    var isASCIILetterOrUnderscore: Bool { ("a"..."z").contains(self) || ("A"..."Z").contains(self) || self == "_" }
}

/// A monotonically increasing count.
public final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var _value: Double = 0
    init() {}
    public func increment(by amount: Double = 1) {
        precondition(amount >= 0, "a counter only goes up (asked to add \(amount))")
        lock.lock(); _value += amount; lock.unlock()
    }
    public var value: Double { lock.lock(); defer { lock.unlock() }; return _value }
}

/// A value that goes up and down.
public final class Gauge: @unchecked Sendable {
    private let lock = NSLock()
    private var _value: Double = 0
    init() {}
    public func set(_ v: Double) { lock.lock(); _value = v; lock.unlock() }
    public func set(_ v: Bool) { set(v ? 1 : 0) }
    public func set<I: BinaryInteger>(_ v: I) { set(Double(v)) }
    public func add(_ d: Double) { lock.lock(); _value += d; lock.unlock() }
    public var value: Double { lock.lock(); defer { lock.unlock() }; return _value }
}

/// Observations counted into fixed buckets.
public final class Histogram: @unchecked Sendable {
    /// Write-latency bounds in seconds: 0.5 ms … 2.5 s.
    public static let defaultLatencyBuckets: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]

    struct Snapshot { var counts: [UInt64]; var count: UInt64; var sum: Double }
    private let lock = NSLock()
    private let bounds: [Double]
    private var counts: [UInt64]
    private var count: UInt64 = 0
    private var sum: Double = 0

    init(bounds: [Double]) { self.bounds = bounds; self.counts = Array(repeating: 0, count: bounds.count) }

    public func observe(_ v: Double) {
        // Per-bucket (not cumulative) counts; render() accumulates. Values above the
        // last bound land only in +Inf, which is `count`.
        let i = bounds.firstIndex { v <= $0 }
        lock.lock()
        if let i { counts[i] += 1 }
        count += 1
        sum += v
        lock.unlock()
    }

    public func observe(_ d: Duration) { observe(d.seconds) }

    /// Takes over a histogram kept elsewhere (e.g. the NBD server's lock-free recorder):
    /// `cumulative[i]` counts observations ≤ bound i, as Prometheus exposes them.
    public func replace(cumulative: [UInt64], count: UInt64, sum: Double) {
        precondition(cumulative.count == bounds.count, "histogram has \(bounds.count) buckets, got \(cumulative.count)")
        var perBucket = cumulative
        for i in stride(from: perBucket.count - 1, to: 0, by: -1) { perBucket[i] -= cumulative[i - 1] }
        lock.lock()
        counts = perBucket
        self.count = count
        self.sum = sum
        lock.unlock()
    }

    func snapshot() -> Snapshot {
        lock.lock(); defer { lock.unlock() }
        return Snapshot(counts: counts, count: count, sum: sum)
    }
}

/// The node's metrics, named once here so that docs, dashboards and code agree
/// (docs/operator-guide.md "Metrics" lists them).
public final class NodeMetrics: @unchecked Sendable {
    public let registry: MetricsRegistry
    public let epoch: Gauge
    public let quorum: Gauge
    public let peerUp: Gauge
    public let arbitratorUp: Gauge
    public let leaseRemainingSeconds: Gauge
    public let replicationLagBytes: Gauge
    public let replicationLagSeconds: Gauge
    public let outOfSyncBytes: Gauge
    public let resyncDoneBytes: Gauge
    public let resyncTotalBytes: Gauge
    public let maintenance: Gauge
    public let splitBrain: Gauge
    public let healthy: Gauge
    public let arbitratorRefused: Gauge
    public let livenessMisses: Counter
    public let writeLatencySeconds: Histogram
    public let replicationSentBytes: Counter
    public let replicationReceivedBytes: Counter
    public let resyncSentBytes: Counter
    public let nbdReadBytes: Counter
    public let nbdWrittenBytes: Counter
    public let nbdConnectionsAccepted: Counter
    public let nbdConnections: Gauge
    public let nbdInFlightRequests: Gauge
    public let nbdInFlightBytes: Gauge

    /// - Parameter writeLatencyBuckets: the bounds of whatever records write latency (the NBD
    ///   server keeps its own histogram; the daemon copies it in with `replace`).
    /// - Parameters cluster, node: the identity `hamgr_build_info` carries, so a query joins
    ///   any series to its cluster and node without relabelling in the scrape config.
    public init(registry: MetricsRegistry = MetricsRegistry(), version: String = hamgrVersion,
                cluster: String = "", node: String = "",
                writeLatencyBuckets: [Double] = Histogram.defaultLatencyBuckets) {
        self.registry = registry
        registry.gauge("hamgr_build_info", help: Self.buildInfoHelp,
                       labels: ["version": version, "cluster": cluster, "node": node].filter { !$0.value.isEmpty }).set(1)
        epoch = registry.gauge("hamgr_epoch", help: "Current epoch (term) known to this node.")
        quorum = registry.gauge("hamgr_quorum", help: "1 if this node is in a quorum (2 of node, peer, arbitrator).")
        peerUp = registry.gauge("hamgr_peer_up", help: "1 if the replication link to the peer is connected.")
        arbitratorUp = registry.gauge("hamgr_arbitrator_up", help: "1 if the arbitrator answered recently.")
        leaseRemainingSeconds = registry.gauge("hamgr_lease_remaining_seconds", help: "Time left on the master lease as this node counts it (0 when not master).")
        replicationLagBytes = registry.gauge("hamgr_replication_lag_bytes", help: "Bytes written locally and not yet confirmed by the peer.")
        replicationLagSeconds = registry.gauge("hamgr_replication_lag_seconds", help: "Age of the oldest write (or flush) the peer has not confirmed; 0 when none.")
        outOfSyncBytes = registry.gauge("hamgr_out_of_sync_bytes", help: "Bytes marked out of sync in the dirty bitmap.")
        resyncDoneBytes = registry.gauge("hamgr_resync_done_bytes", help: "Bytes copied by the running resync (0 when none runs).")
        resyncTotalBytes = registry.gauge("hamgr_resync_total_bytes", help: "Bytes the running resync has to copy (0 when none runs).")
        maintenance = registry.gauge("hamgr_maintenance", help: "1 while this node is in maintenance (never a candidate).")
        splitBrain = registry.gauge("hamgr_split_brain", help: "1 while a detected split brain awaits resolution.")
        arbitratorRefused = registry.gauge("hamgr_arbitrator_refused", help: "1 while the arbitrator's answers are not counted: its state is another incarnation than this node knows (hactl arbitrator-accept).")
        healthy = registry.gauge("hamgr_healthy", help: "1 while the node can serve its role: a working store, not stopping (what /healthz answers).")
        livenessMisses = registry.counter("hamgr_watchdog_misses_total", help: "Watchdog checks in which a loop or the control queue did not answer in time (no ping sent).")
        writeLatencySeconds = registry.histogram("hamgr_write_latency_seconds", help: "Time from receiving an NBD write to acknowledging it.",
                                                 buckets: writeLatencyBuckets)
        replicationSentBytes = registry.counter("hamgr_replication_sent_bytes_total", help: "Bytes this node wrote to the replication link (frames as sent: writes, resync data, acks, keepalives, framing and MAC).")
        replicationReceivedBytes = registry.counter("hamgr_replication_received_bytes_total", help: "Bytes this node read from the replication link (authenticated frames, with framing and MAC).")
        resyncSentBytes = registry.counter("hamgr_resync_sent_bytes_total", help: "Bytes of chunk data this node sent as resync source.")
        nbdReadBytes = registry.counter("hamgr_nbd_read_bytes_total", help: "Bytes returned to NBD clients by successful reads.")
        nbdWrittenBytes = registry.counter("hamgr_nbd_written_bytes_total", help: "Bytes accepted from NBD clients by successful writes.")
        nbdConnectionsAccepted = registry.counter("hamgr_nbd_connections_accepted_total", help: "NBD client connections accepted.")
        nbdConnections = registry.gauge("hamgr_nbd_connections", help: "NBD client connections open now.")
        nbdInFlightRequests = registry.gauge("hamgr_nbd_in_flight_requests", help: "NBD requests accepted whose replies are not yet written to the socket, all connections.")
        nbdInFlightBytes = registry.gauge("hamgr_nbd_in_flight_bytes", help: "Payload bytes of those requests (write data received, read data to send); each connection holds at most export.max_in_flight_bytes, or one larger request.")
        setRole(.secondary)
        setDiskState(.upToDate)
        for kind in Self.failoverKinds { failoverCounter(kind) }
        for op in Self.nbdOperations { for result in Self.nbdResults { nbdRequestCounter(op: op, result: result) } }
    }

    public static let buildInfoHelp = "Always 1; labels name the running build (version) and, to join other series on instance, the cluster and node."

    /// Every `kind` of `hamgr_failovers_total` (NodeRuntime's PromotionKind).
    public static let failoverKinds = ["failover", "switchover", "forced"]
    /// Every `op` of `hamgr_nbd_requests_total` (the NBD server's operation names).
    public static let nbdOperations = ["read", "write", "flush", "trim", "write_zeroes", "disconnect", "unknown"]
    /// Every `result` of `hamgr_nbd_requests_total` (`ok` and the NBD errno names).
    public static let nbdResults = ["ok", "EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN"]
    /// Every `result` of `hamgr_hook_runs_total`.
    public static let hookResults = ["ok", "failed", "timeout", "none"]

    /// Creates at 0 the series whose label values come from the configuration (resources,
    /// hooks), so `increase()` and `rate()` see their first event: a series that appears
    /// with the value 1 has no earlier sample to increase from.
    public func precreate(resources: [String], hooks: [String]) {
        for r in resources {
            _ = registry.counter("hamgr_resource_restarts_total", help: Self.resourceRestartsHelp, labels: ["resource": r])
            resourceUp(r, false)
        }
        for h in hooks { for result in Self.hookResults { hookCounter(h, result: result) } }
    }

    @discardableResult
    private func failoverCounter(_ kind: String) -> Counter {
        registry.counter("hamgr_failovers_total", help: "Promotions of this node, by kind (switchover, failover, forced).", labels: ["kind": kind])
    }

    @discardableResult
    public func nbdRequestCounter(op: String, result: String) -> Counter {
        registry.counter("hamgr_nbd_requests_total", help: "NBD requests served, by command and result.", labels: ["op": op, "result": result])
    }

    @discardableResult
    private func hookCounter(_ hook: String, result: String) -> Counter {
        registry.counter("hamgr_hook_runs_total", help: "Hook runs by hook and result (ok, failed, timeout; none when not configured).", labels: ["hook": hook, "result": result])
    }

    private static let resourceRestartsHelp = "Restarts of a resource after a failed monitor."

    /// One-hot `hamgr_role{role=...}`.
    public func setRole(_ role: Role) {
        for r in Role.allCases {
            registry.gauge("hamgr_role", help: "1 for the role this node holds now.", labels: ["role": r.rawValue]).set(r == role)
        }
    }

    /// One-hot `hamgr_disk_state{state=...}`.
    public func setDiskState(_ state: DiskState) {
        for s in DiskState.allCases {
            registry.gauge("hamgr_disk_state", help: "1 for the disk state this node holds now.", labels: ["state": s.rawValue]).set(s == state)
        }
    }

    /// `hamgr_nbd_requests_total{op, result}`; op is read/write/flush/trim/write_zeroes/disc,
    /// result is ok or an errno name (EIO, EINVAL, ENOSPC, EPERM…).
    public func nbdRequest(op: String, result: String) {
        nbdRequestCounter(op: op, result: result).increment()
    }

    /// `hamgr_failovers_total{kind}`: kind is switchover, failover or forced.
    public func failover(kind: String) {
        failoverCounter(kind).increment()
    }

    /// `hamgr_resource_up{resource}`.
    public func resourceUp(_ name: String, _ up: Bool) {
        registry.gauge("hamgr_resource_up", help: "1 while the resource's last monitor succeeded.", labels: ["resource": name]).set(up)
    }

    /// `hamgr_resource_restarts_total{resource}`.
    public func resourceRestarted(_ name: String) {
        registry.counter("hamgr_resource_restarts_total", help: Self.resourceRestartsHelp, labels: ["resource": name]).increment()
    }

    /// `hamgr_hook_runs_total{hook, result}`: result is ok, failed or timeout.
    public func hookRun(_ hook: String, result: String) {
        hookCounter(hook, result: result).increment()
    }
}

/// The standard `process_*` metrics of Prometheus client libraries, read from /proc at
/// scrape time (Linux; nothing elsewhere): CPU seconds, resident and virtual memory, open and
/// maximum file descriptors, start time.
public enum ProcessMetrics {
    /// The exposition text of the process families ("" where /proc/self/stat is unreadable).
    public static func render() -> String {
        guard let s = sample() else { return "" }
        var out = ""
        func family(_ name: String, _ kind: String, _ help: String, _ value: Double) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(kind)\n\(name) \(MetricsRegistry.format(value))\n"
        }
        family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", s.cpuSeconds)
        family("process_max_fds", "gauge", "Maximum number of open file descriptors.", s.maxFDs)
        family("process_open_fds", "gauge", "Number of open file descriptors.", s.openFDs)
        family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", s.residentBytes)
        family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", s.startTimeSeconds)
        family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", s.virtualBytes)
        return out
    }

    public struct Sample: Sendable, Equatable {
        public var cpuSeconds: Double
        public var residentBytes: Double
        public var virtualBytes: Double
        public var openFDs: Double
        public var maxFDs: Double
        public var startTimeSeconds: Double
    }

    /// The boot time never changes while we run: read /proc/stat once.
    private static let bootTime: Double? = {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }()

    public static func sample() -> Sample? {
        #if os(Linux)
        guard let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after "pid (comm)": state is field 3, so index i here is field i + 3.
        let f = stat[stat.index(after: close)...].split(separator: " ")
        guard f.count > 21, let utime = Double(f[11]), let stime = Double(f[12]), let start = Double(f[19]),
              let vsize = Double(f[20]), let rssPages = Double(f[21]) else { return nil }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = Double(sysconf(Int32(_SC_PAGESIZE)))
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count).map(Double.init) ?? 0
        var limit = rlimit()
        let maxFDs = getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 ? Double(limit.rlim_cur) : 0
        return Sample(cpuSeconds: (utime + stime) / ticks, residentBytes: rssPages * page, virtualBytes: vsize,
                      // contentsOfDirectory holds one descriptor of its own while it lists.
                      openFDs: max(0, open - 1), maxFDs: maxFDs,
                      startTimeSeconds: (bootTime ?? 0) + start / ticks)
        #else
        return nil
        #endif
    }
}
