import CSystemd
import Foundation
import HAShell
import Logging

/// OCF resource agent exit codes (OCF RA API 1.1, "Return codes").
enum OCFStatus: Int32, Sendable {
    case success = 0
    case errGeneric = 1
    case errArgs = 2
    case unimplemented = 3
    case errPerm = 4
    case errInstalled = 5
    case errConfigured = 6
    case notRunning = 7
    case runningPromoted = 8
    case failedPromoted = 9
}

/// The result of one agent action.
struct AgentResult: Sendable, Equatable {
    /// The OCF exit code (unknown codes are kept as they came).
    var code: Int32
    /// Human-readable detail: the agent's last output lines, or why it could not run.
    var detail: String

    var status: OCFStatus? { OCFStatus(rawValue: code) }
    var ok: Bool { code == OCFStatus.success.rawValue }

    static func failure(_ detail: String) -> AgentResult { AgentResult(code: OCFStatus.errGeneric.rawValue, detail: detail) }
}

/// `probe` is a one-off monitor (OCF_RESKEY_CRM_meta_interval=0, as Pacemaker's probes):
/// agents may then answer "not running" where a recurring monitor would report an error.
enum ResourceAction: String, Sendable {
    case start, stop, monitor, probe

    /// The argument the agent receives.
    var agentArgument: String { self == .probe ? "monitor" : rawValue }
}

/// Something that can start, stop and monitor one resource.
protocol ResourceDriver: Sendable {
    func run(_ action: ResourceAction) async -> AgentResult
    /// Freeze (`on`) or thaw the service fast and without I/O; nil: this kind of resource
    /// cannot be frozen (it is only stopped, with the demotion).
    func freeze(_ on: Bool) async -> AgentResult?
}

extension ResourceDriver {
    func freeze(_ on: Bool) async -> AgentResult? { nil }
}

/// `ocf:PROVIDER:AGENT` and `exec:PATH`: run the executable with the action as its only
/// argument and the OCF environment (OCF_ROOT, OCF_RESOURCE_INSTANCE, OCF_RESKEY_<param>).
struct ExecutableAgentDriver: ResourceDriver {
    var path: String
    var environment: [String: String]
    var timeout: Duration
    var monitorInterval: Duration

    init(resource: ClusterConfig.Resource, ocfRoot: String) {
        var env: [String: String] = [
            "OCF_ROOT": ocfRoot,
            "OCF_RA_VERSION_MAJOR": "1",
            "OCF_RA_VERSION_MINOR": "1",
            "OCF_RESOURCE_INSTANCE": resource.name,
            "OCF_RESKEY_CRM_meta_timeout": String(Int(resource.timeout.milliseconds)),
        ]
        for (k, v) in resource.params { env["OCF_RESKEY_\(k)"] = v }
        switch resource.agent {
        case .ocf(let provider, let agent):
            path = "\(ocfRoot)/resource.d/\(provider)/\(agent)"
            env["OCF_RESOURCE_PROVIDER"] = provider
            env["OCF_RESOURCE_TYPE"] = agent
        case .exec(let p):
            path = p
            env["OCF_RESOURCE_TYPE"] = (p as NSString).lastPathComponent
        case .systemd, .nbdAttach:
            preconditionFailure("\(resource.agent): resources have a driver of their own")
        }
        environment = env
        timeout = resource.timeout
        monitorInterval = resource.monitorInterval
    }

    func run(_ action: ResourceAction) async -> AgentResult {
        do {
            var env = environment
            switch action {
            case .monitor: env["OCF_RESKEY_CRM_meta_interval"] = String(Int(monitorInterval.milliseconds))
            case .probe, .start, .stop: env["OCF_RESKEY_CRM_meta_interval"] = "0"
            }
            let r = try await ChildProcess.run(path: path, arguments: [action.agentArgument], environment: env, timeout: timeout)
            if r.timedOut { return .failure("\(action.rawValue) timed out after \(Int(timeout.milliseconds)) ms; killed. \(HookRunner.tail(r.output))") }
            guard let code = r.exitCode else { return .failure("\(action.rawValue) \(r.statusDescription). \(HookRunner.tail(r.output))") }
            return AgentResult(code: code, detail: HookRunner.tail(r.output))
        } catch {
            return .failure("\(error)")
        }
    }
}

/// `systemd:UNIT`: StartUnit/StopUnit on the system bus (sd-bus), then wait for the unit's
/// ActiveState; monitor maps `active` to success and anything else to not-running.
/// Without a system bus (no systemd as PID 1, no D-Bus) every action fails and says so.
struct SystemdUnitDriver: ResourceDriver {
    var unit: String
    var timeout: Duration

    func run(_ action: ResourceAction) async -> AgentResult {
        let unit = self.unit, timeout = self.timeout
        return await withCheckedContinuation { cont in
            let t = Thread { cont.resume(returning: Self.runBlocking(action, unit: unit, timeout: timeout)) }
            t.name = "hamgr-sdbus"
            t.start()
        }
    }

    /// The cgroup freezer (`systemctl freeze` / `thaw`): every process of the unit stops at
    /// once, page-cache reads included; a later StopUnit thaws it first.
    func freeze(_ on: Bool) async -> AgentResult? {
        let unit = self.unit
        return await withCheckedContinuation { cont in
            let t = Thread {
                var bus: OpaquePointer?
                let rc = sd_bus_open_system(&bus)
                guard rc >= 0, let bus else { return cont.resume(returning: .failure("no system D-Bus (sd_bus_open_system: \(String(cString: strerror(-rc))))")) }
                defer { sd_bus_flush_close_unref(bus) }
                do {
                    _ = try Self.call(bus, on ? "FreezeUnit" : "ThawUnit", args: [unit], replyType: nil)
                    cont.resume(returning: AgentResult(code: 0, detail: on ? "frozen" : "thawed"))
                } catch {
                    cont.resume(returning: .failure("systemd:\(unit): \(error)"))
                }
            }
            t.name = "hamgr-sdbus"
            t.start()
        }
    }

    private static let destination = "org.freedesktop.systemd1"
    private static let managerPath = "/org/freedesktop/systemd1"
    private static let managerInterface = "org.freedesktop.systemd1.Manager"

    static func runBlocking(_ action: ResourceAction, unit: String, timeout: Duration) -> AgentResult {
        var bus: OpaquePointer?
        let rc = sd_bus_open_system(&bus)
        guard rc >= 0, let bus else {
            return .failure("systemd:\(unit) needs the system D-Bus, which is not available here (sd_bus_open_system: \(String(cString: strerror(-rc))))")
        }
        defer { sd_bus_flush_close_unref(bus) }
        do {
            let path = try call(bus, "LoadUnit", args: [unit], replyType: "o")
            switch action {
            case .monitor, .probe:
                return try activeState(bus, path) == "active"
                    ? AgentResult(code: 0, detail: "active")
                    : AgentResult(code: OCFStatus.notRunning.rawValue, detail: try activeState(bus, path))
            case .start, .stop:
                _ = try call(bus, action == .start ? "StartUnit" : "StopUnit", args: [unit, "replace"], replyType: "o")
                let want: Set<String> = action == .start ? ["active"] : ["inactive", "failed"]
                let deadline = ContinuousClock.now + timeout
                var state = try activeState(bus, path)
                while !want.contains(state) {
                    if action == .start && state == "failed" { return .failure("\(unit) failed to start") }
                    if ContinuousClock.now > deadline { return .failure("\(unit) still \(state) after \(Int(timeout.milliseconds)) ms") }
                    usleep(100_000)
                    state = try activeState(bus, path)
                }
                return AgentResult(code: 0, detail: state)
            }
        } catch {
            return .failure("systemd:\(unit): \(error)")
        }
    }

    struct BusError: Error, CustomStringConvertible { var description: String }

    private static func activeState(_ bus: OpaquePointer, _ path: String) throws -> String {
        var error = sd_bus_error()
        defer { sd_bus_error_free(&error) }
        var value: UnsafeMutablePointer<CChar>?
        let rc = sd_bus_get_property_string(bus, destination, path, "org.freedesktop.systemd1.Unit", "ActiveState", &error, &value)
        guard rc >= 0, let value else { throw BusError(description: "reading ActiveState: \(describe(error, rc))") }
        defer { free(value) }
        return String(cString: value)
    }

    /// Call a Manager method with string arguments; returns the reply's first value (type `o`
    /// or `s`), or "" when `replyType` is nil (a method without a return value).
    private static func call(_ bus: OpaquePointer, _ member: String, args: [String], replyType: Character?) throws -> String {
        var message: OpaquePointer?
        var rc = sd_bus_message_new_method_call(bus, &message, destination, managerPath, managerInterface, member)
        guard rc >= 0, let message else { throw BusError(description: "\(member): \(String(cString: strerror(-rc)))") }
        defer { sd_bus_message_unref(message) }
        for a in args {
            rc = a.withCString { sd_bus_message_append_basic(message, CChar(UInt8(ascii: "s")), $0) }
            guard rc >= 0 else { throw BusError(description: "\(member): \(String(cString: strerror(-rc)))") }
        }
        var error = sd_bus_error()
        defer { sd_bus_error_free(&error) }
        var reply: OpaquePointer?
        rc = sd_bus_call(bus, message, 25_000_000, &error, &reply)
        guard rc >= 0, let reply else { throw BusError(description: "\(member) \(args.first ?? ""): \(describe(error, rc))") }
        defer { sd_bus_message_unref(reply) }
        guard let replyType else { return "" }
        var out: UnsafePointer<CChar>?
        rc = sd_bus_message_read_basic(reply, CChar(replyType.asciiValue!), &out)
        guard rc > 0, let out else { throw BusError(description: "\(member): unexpected reply") }
        return String(cString: out)
    }

    private static func describe(_ e: sd_bus_error, _ rc: Int32) -> String {
        if let m = e.message { return String(cString: m) }
        if let n = e.name { return String(cString: n) }
        return String(cString: strerror(-rc))
    }
}

/// What the built-in resources need to know of the node they run on.
struct ResourceContext: Sendable {
    var cluster: String
    /// This node's name: `{name}` in a parameter value stands for it (the config file is
    /// the same on both nodes; tls.cert_file and export.unix_socket use the same placeholder).
    var node: String = ""
    var ocfRoot: String = "/usr/lib/ocf"
    /// This node's own export, for `hamgr:nbd-attach` (nil: not known, e.g. in tests that
    /// use no attach resource).
    var export: NBDAttachTarget?

    /// The driver for `resource` (agents by name in `overrides` win: tests).
    func driver(for configured: ClusterConfig.Resource, overrides: [String: ResourceDriver] = [:]) -> ResourceDriver {
        if let d = overrides[configured.name] { return d }
        var resource = configured
        resource.params = configured.params.mapValues { $0.replacingOccurrences(of: TLSSettings.hostPlaceholder, with: node) }
        switch resource.agent {
        case .systemd(let unit):
            return SystemdUnitDriver(unit: unit, timeout: resource.timeout)
        case .ocf, .exec:
            return ExecutableAgentDriver(resource: resource, ocfRoot: ocfRoot)
        case .nbdAttach:
            return NBDAttachDriver(resource: resource, cluster: cluster, target: export)
        }
    }
}

/// Runs the `[[resource]]` list of design.md §4: started in order after promotion,
/// stopped in reverse before demotion, each monitored at its interval; a failed monitor
/// restarts the resource (and, around it, the running resources after it) up to
/// `max_restarts` times, then `onGiveUp` asks the daemon to switch over. Restart counts start from zero at every `startAll()` and at a `cleanup`.
/// Entries are found by name, never by a remembered index: a reload may change the list
/// while monitors run (`reconfigure`).
actor ResourceManager {
    enum State: String, Sendable { case stopped, starting, running, failed, stopping }

    struct ResourceError: Error, CustomStringConvertible {
        var resource: String
        var action: ResourceAction
        var detail: String
        var description: String { "resource \(resource): \(action.rawValue) failed: \(detail)" }
    }

    struct UnknownResource: Error, CustomStringConvertible {
        var name: String
        var known: [String]
        var description: String {
            "no resource named '\(name)' on this node" + (known.isEmpty ? " (none configured)" : " (resources: \(known.joined(separator: ", ")))")
        }
    }

    private struct Entry {
        var config: ClusterConfig.Resource
        var driver: ResourceDriver
        var state: State = .stopped
        var restarts = 0
        var monitor: Task<Void, Never>?
    }

    private var entries: [Entry]
    private let logger: Logger
    private let metrics: NodeMetrics?
    private let context: ResourceContext
    private let overrides: [String: ResourceDriver]
    private let onGiveUp: @Sendable (_ resource: String, _ reason: String) async -> Void
    private var restartsHeld = false
    /// Between a successful `startAll` and the next `stopAll`: this node runs its resources
    /// (it is master). A reload starts added resources only then.
    private var active = false

    /// `drivers` replaces the agents by name (tests); everything else is built from the config.
    init(resources: [ClusterConfig.Resource], logger: Logger, metrics: NodeMetrics? = nil,
         context: ResourceContext = ResourceContext(cluster: ""), drivers: [String: ResourceDriver] = [:],
         onGiveUp: @escaping @Sendable (_ resource: String, _ reason: String) async -> Void) {
        entries = resources.map { Entry(config: $0, driver: context.driver(for: $0, overrides: drivers)) }
        self.logger = logger; self.metrics = metrics; self.context = context; self.overrides = drivers; self.onGiveUp = onGiveUp
    }

    /// Start every resource in order, then begin monitoring. If one fails to start, those
    /// already started are stopped again (in reverse) and the error names the resource.
    func startAll() async throws {
        await cancelMonitors()
        for i in entries.indices { entries[i].restarts = 0 }
        let names = entries.map(\.config.name)
        for (k, name) in names.enumerated() {
            let result = await perform(.start, name)
            guard result.ok else {
                if let i = index(name) { entries[i].state = .failed }
                for earlier in names[..<k].reversed() { _ = await perform(.stop, earlier) }
                throw ResourceError(resource: name, action: .start, detail: Self.explain(result))
            }
        }
        active = true
        for name in names { startMonitor(name) }
    }

    /// Stop monitoring, then stop every resource in reverse order. Keeps going past a
    /// failed stop (the rest must still come down) and throws the first failure after.
    func stopAll() async throws {
        active = false
        await cancelMonitors()
        var firstFailure: ResourceError?
        for name in entries.map(\.config.name).reversed() {
            if let failure = await stop(name) { firstFailure = firstFailure ?? failure }
        }
        if let firstFailure { throw firstFailure }
    }

    /// Stops one resource; the error if it did not stop.
    private func stop(_ name: String) async -> ResourceError? {
        let result = await perform(.stop, name)
        guard !result.ok && result.status != .notRunning else { return nil }
        if let i = index(name) { entries[i].state = .failed }
        return ResourceError(resource: name, action: .stop, detail: Self.explain(result))
    }

    /// A reloaded `[[resource]]` list (docs/operator-guide.md, "Reload"). The longest prefix
    /// of the list whose resources keep their name, position, agent and params stays as it
    /// is (a new `monitor_interval_ms`, `max_restarts` or `timeout_ms` applies in place);
    /// from the first resource added, removed, moved or changed on, the old resources are
    /// stopped in reverse order and the new ones started in order — a resource may depend on
    /// those before it (a filesystem on an attached device). Nothing starts or stops unless
    /// this node runs its resources (master). One line per change, for the log.
    func reconfigure(_ new: [ClusterConfig.Resource]) async -> [String] {
        let old = entries.map(\.config)
        var keep = 0
        while keep < old.count, keep < new.count, old[keep].name == new[keep].name,
              old[keep].agent == new[keep].agent, old[keep].params == new[keep].params {
            keep += 1
        }
        var lines: [String] = []
        let wasActive = active
        // Stop the old tail, last first.
        for r in old[keep...].reversed() {
            await cancelMonitor(r.name)
            let gone = !new.contains { $0.name == r.name }
            if wasActive {
                let failure = await stop(r.name)
                lines.append("\(r.name): " + (gone ? "removed" : "changed") + (failure.map { "; stop failed: \($0.detail)" } ?? "; stopped"))
            } else {
                lines.append("\(r.name): " + (gone ? "removed" : "changed"))
            }
        }
        // The prefix keeps its state; a new timing applies now (the monitor restarts with it).
        for i in 0..<keep where old[i] != new[i] {
            let name = new[i].name
            let hadMonitor = entries[i].monitor != nil
            await cancelMonitor(name)
            entries[i].config = new[i]
            entries[i].driver = context.driver(for: new[i], overrides: overrides)
            if hadMonitor { startMonitor(name) }
            lines.append("\(name): monitor_interval_ms \(Int(new[i].monitorInterval.milliseconds)), max_restarts \(new[i].maxRestarts), timeout_ms \(Int(new[i].timeout.milliseconds)) in force")
        }
        entries = Array(entries[..<keep]) + new[keep...].map { Entry(config: $0, driver: context.driver(for: $0, overrides: overrides)) }
        for r in new[keep...] where !old.contains(where: { $0.name == r.name }) {
            metrics?.precreate(resources: [r.name], hooks: [])
        }
        // Start the new tail in order. A failed start is left to the monitor, which counts
        // it against max_restarts and, past them, switches over (as a failed restart does).
        for r in new[keep...] {
            let verb = old.contains { $0.name == r.name } ? "restarted" : "added"
            guard wasActive, active else { lines.append("\(r.name): \(verb == "added" ? "added" : "changed") (starts with the next promotion)"); continue }
            let result = await perform(.start, r.name)
            startMonitor(r.name)
            lines.append("\(r.name): \(verb)" + (result.ok ? "; started" : "; start failed: \(Self.explain(result))"))
        }
        return lines
    }

    /// `hactl resource cleanup [NAME]` (as `crm_resource --cleanup`): forget the failures of
    /// one resource (or all): restarts back to 0, a failed state replaced by what a probe
    /// finds now, a monitor that gave up running again. On a master that manages its
    /// resources (no maintenance) a resource found stopped is started. One line per resource.
    func cleanup(_ name: String?) async throws -> [String] {
        if let name, index(name) == nil { throw UnknownResource(name: name, known: entries.map(\.config.name)) }
        var lines: [String] = []
        for n in name.map({ [$0] }) ?? entries.map(\.config.name) {
            guard let i = index(n) else { continue }
            let before = (state: entries[i].state, restarts: entries[i].restarts)
            let probe = await entries[i].driver.run(.probe)
            guard let j = index(n) else { continue }
            entries[j].restarts = 0
            entries[j].state = probe.ok ? .running : probe.status == .notRunning ? .stopped : .failed
            var line = "\(n): restarts \(before.restarts) → 0, \(before.state.rawValue) → \(entries[j].state.rawValue)"
            if active && !restartsHeld && entries[j].state != .running {
                let result = await perform(.start, n)
                line += result.ok ? "; started" : "; start failed: \(Self.explain(result))"
            }
            if active, let k = index(n), entries[k].monitor == nil { startMonitor(n) }
            metrics?.resourceUp(n, index(n).map { entries[$0].state == .running } ?? false)
            logger.notice("resource cleanup", metadata: ["event": "resource_cleanup", "resource": "\(n)", "detail": "\(line)"])
            lines.append(line)
        }
        return lines
    }

    /// Freeze (or thaw) every resource that can be frozen (systemd units: the cgroup
    /// freezer), all at once rather than in order: this must be fast. Returns one line per
    /// resource for the log, naming those that cannot be frozen.
    func freezeAll(_ on: Bool) async -> [String] {
        await withTaskGroup(of: String.self) { group in
            for e in entries {
                group.addTask {
                    guard let r = await e.driver.freeze(on) else { return "\(e.config.name): cannot be frozen (stops with the demotion)" }
                    return "\(e.config.name): \(r.ok ? (on ? "frozen" : "thawed") : r.detail)"
                }
            }
            var lines: [String] = []
            for await l in group { lines.append(l) }
            return lines.sorted()
        }
    }

    /// Hold restarts and give-ups (e.g. while an operator works on a service by hand):
    /// failures are logged and shown, nothing acts.
    func holdRestarts(_ on: Bool) { restartsHeld = on }

    /// Run every monitor once (e.g. on a secondary at startup, to find strays).
    func probeAll() async -> [String: AgentResult] {
        var out: [String: AgentResult] = [:]
        for e in entries { out[e.config.name] = await e.driver.run(.probe) }
        return out
    }

    /// At start, before this node can be master: probe every resource and stop, in reverse
    /// order, those found running — left by a crash of this node as a former master, or
    /// started by hand. Only a master runs resources. One line per resource not found
    /// stopped, for the log.
    func stopStrays() async -> [String] {
        var lines: [String] = []
        for e in entries.reversed() {
            let name = e.config.name
            let probe = await e.driver.run(.probe)
            if probe.status == .notRunning { continue }
            guard probe.ok else {
                lines.append("\(name): probe at start failed (\(Self.explain(probe))); left as it is")
                continue
            }
            let stop = await perform(.stop, name)
            lines.append("\(name): found running at start; " + (stop.ok ? "stopped" : "stop failed: \(Self.explain(stop))"))
        }
        return lines
    }

    /// For `/status`.
    func snapshot() -> [StatusDocument.Resource] {
        entries.map { StatusDocument.Resource(name: $0.config.name, state: $0.state.rawValue, restarts: $0.restarts) }
    }

    // MARK: Internals

    private func index(_ name: String) -> Int? { entries.firstIndex { $0.config.name == name } }

    private func perform(_ action: ResourceAction, _ name: String) async -> AgentResult {
        guard let i = index(name) else { return .failure("resource \(name) is no longer configured") }
        let agent = entries[i].config.agent.description
        let driver = entries[i].driver
        switch action {
        case .start: entries[i].state = .starting
        case .stop: entries[i].state = .stopping
        case .monitor, .probe: break
        }
        let result = await driver.run(action)
        let ok = result.ok || (action == .stop && result.status == .notRunning)
        if let i = index(name) {
            switch action {
            case .start: entries[i].state = ok ? .running : .failed
            case .stop: entries[i].state = ok ? .stopped : .failed
            case .monitor, .probe: break
            }
            if action == .start || action == .stop { metrics?.resourceUp(name, entries[i].state == .running) }
        }
        let meta: Logger.Metadata = ["event": "resource_\(action.rawValue)", "resource": "\(name)", "agent": "\(agent)", "rc": "\(result.code)"]
        if ok {
            logger.info("resource \(action.rawValue) ok", metadata: meta)
        } else {
            logger.error("resource \(action.rawValue) failed", metadata: meta.merging(["detail": "\(Self.explain(result))"]) { $1 })
        }
        return result
    }

    private func startMonitor(_ name: String) {
        guard let i = index(name) else { return }
        let interval = entries[i].config.monitorInterval
        entries[i].monitor = Task { [weak self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                guard !Task.isCancelled, let self else { return }
                if await !self.monitorOnce(name) { return }
            }
        }
    }

    /// One monitor round; false ends the monitor (gave up, or the resource is gone).
    private func monitorOnce(_ name: String) async -> Bool {
        guard let i = index(name) else { return false }
        let entry = entries[i]
        let result = await entry.driver.run(.monitor)
        if Task.isCancelled { return false }
        guard let i = index(name) else { return false }
        if result.ok {
            metrics?.resourceUp(name, true)
            if entries[i].state == .failed { entries[i].state = .running }
            return true
        }
        metrics?.resourceUp(name, false)
        let restarts = entries[i].restarts, maxRestarts = entries[i].config.maxRestarts
        let meta: Logger.Metadata = ["event": "resource_monitor_failed", "resource": "\(name)", "rc": "\(result.code)",
                                     "restarts": "\(restarts)", "max_restarts": "\(maxRestarts)"]
        if restartsHeld {
            entries[i].state = .failed
            logger.warning("resource monitor failed; restarts are held, not acting", metadata: meta)
            return true
        }
        if restarts >= maxRestarts {
            entries[i].state = .failed
            // The monitor ends here; `cleanup` starts a new one.
            entries[i].monitor = nil
            let reason = "resource \(name) failed its monitor (\(Self.explain(result))) after \(restarts) restart(s)"
            logger.error("resource keeps failing; giving up", metadata: meta)
            // Outside the actor and this task: the daemon's switchover calls stopAll(),
            // which waits for this monitor to end.
            let onGiveUp = self.onGiveUp
            Task.detached { await onGiveUp(name, reason) }
            return false
        }
        entries[i].restarts += 1
        metrics?.resourceRestarted(name)
        // Those after it may depend on it (a filesystem on an attached device): they go
        // down first and come back after it, in order, as at a promotion.
        let dependents = entries[(i + 1)...].filter { $0.state != .stopped }.map(\.config.name)
        let along = dependents.isEmpty ? "" : " with \(dependents.joined(separator: ", ")) after it"
        logger.warning("resource monitor failed; restarting\(along)", metadata: meta)
        for d in dependents { await cancelMonitor(d) }
        for d in dependents.reversed() { _ = await perform(.stop, d) }
        _ = await perform(.stop, name)
        if Task.isCancelled { return false }
        _ = await perform(.start, name)
        // A failed start shows at the next monitor and counts against max_restarts there.
        for d in dependents where !Task.isCancelled {
            _ = await perform(.start, d)
            startMonitor(d)
        }
        return true
    }

    private func cancelMonitor(_ name: String) async {
        guard let i = index(name), let task = entries[i].monitor else { return }
        task.cancel()
        entries[i].monitor = nil
        await task.value
    }

    private func cancelMonitors() async {
        let tasks = entries.compactMap(\.monitor)
        for i in entries.indices {
            entries[i].monitor?.cancel()
            entries[i].monitor = nil
        }
        for t in tasks { await t.value }
    }

    private static func explain(_ r: AgentResult) -> String {
        let name = r.status.map { "\($0)" } ?? "exit \(r.code)"
        return r.detail.isEmpty ? "\(name) (rc \(r.code))" : "\(name) (rc \(r.code)): \(r.detail)"
    }
}
