import Foundation
import HAShell
import Logging
import NIOConcurrencyHelpers

/// Which hook runs (design.md §4: announce after promotion, and on demotion).
enum HookKind: String, Sendable, CaseIterable {
    case onPromote = "on_promote"
    case onDemote = "on_demote"
}

/// What a hook learns, as environment variables (docs/operator-guide.md "Hooks").
struct HookContext: Sendable, Equatable {
    var cluster: String
    /// This node.
    var node: String
    /// This node's role after the transition.
    var role: Role
    var epoch: UInt64
    /// This node's NBD service address.
    var serviceAddress: String
    /// The master after the transition, if known (on demotion it may not be yet).
    var masterNode: String?
    var masterServiceAddress: String?
    var peerNode: String

    var environment: [String: String] {
        [
            "HAMGR_CLUSTER": cluster,
            "HAMGR_NODE": node,
            "HAMGR_ROLE": role.rawValue,
            "HAMGR_EPOCH": String(epoch),
            "HAMGR_SERVICE_ADDRESS": serviceAddress,
            "HAMGR_MASTER_NODE": masterNode ?? "",
            "HAMGR_MASTER_SERVICE_ADDRESS": masterServiceAddress ?? "",
            "HAMGR_PEER_NODE": peerNode,
        ]
    }
}

/// How a hook run ended.
enum HookOutcome: Sendable, Equatable {
    case notConfigured
    case succeeded(output: String)
    case failed(status: String, output: String)
    case timedOut(output: String)
    case couldNotStart(String)

    var metricResult: String {
        switch self {
        case .notConfigured: return "none"
        case .succeeded: return "ok"
        case .failed, .couldNotStart: return "failed"
        case .timedOut: return "timeout"
        }
    }
}

/// Runs `[hooks]` scripts with a time limit and logs the result. A hook's failure is
/// reported, never fatal: the role change already happened and the hook only announces it.
final class HookRunner: Sendable {
    private let current: NIOLockedValueBox<ClusterConfig.Hooks>
    let logger: Logger
    let metrics: NodeMetrics?

    /// The hooks in force (a reload may replace them: the next run uses the new ones).
    var hooks: ClusterConfig.Hooks {
        get { current.withLockedValue { $0 } }
        set { current.withLockedValue { $0 = newValue } }
    }

    init(hooks: ClusterConfig.Hooks, logger: Logger, metrics: NodeMetrics? = nil) {
        current = NIOLockedValueBox(hooks); self.logger = logger; self.metrics = metrics
    }

    @discardableResult
    func run(_ kind: HookKind, context: HookContext) async -> HookOutcome {
        let hooks = self.hooks  // one reading: a reload during the run does not mix two configurations
        guard let path = kind == .onPromote ? hooks.onPromote : hooks.onDemote else { return .notConfigured }
        var env = context.environment
        env["HAMGR_HOOK"] = kind.rawValue
        let meta: Logger.Metadata = ["event": "hook", "hook": "\(kind.rawValue)", "path": "\(path)",
                                     "cluster": "\(context.cluster)", "node": "\(context.node)", "epoch": "\(context.epoch)"]
        let outcome: HookOutcome
        do {
            let r = try await ChildProcess.run(path: path, arguments: [], environment: env, timeout: hooks.timeout)
            if r.timedOut {
                outcome = .timedOut(output: r.output)
            } else if r.succeeded {
                outcome = .succeeded(output: r.output)
            } else {
                outcome = .failed(status: r.statusDescription, output: r.output)
            }
        } catch {
            outcome = .couldNotStart("\(error)")
        }
        metrics?.hookRun(kind.rawValue, result: outcome.metricResult)
        switch outcome {
        case .succeeded(let out):
            logger.info("hook succeeded", metadata: meta.merging(["output": "\(Self.tail(out))"]) { $1 })
        case .failed(let status, let out):
            logger.error("hook failed", metadata: meta.merging(["status": "\(status)", "output": "\(Self.tail(out))"]) { $1 })
        case .timedOut(let out):
            logger.error("hook timed out and was killed", metadata: meta.merging(["timeout_ms": "\(Int(hooks.timeout.milliseconds))", "output": "\(Self.tail(out))"]) { $1 })
        case .couldNotStart(let why):
            logger.error("hook could not start", metadata: meta.merging(["error": "\(why)"]) { $1 })
        case .notConfigured:
            break
        }
        return outcome
    }

    static func tail(_ s: String, lines: Int = 5) -> String {
        s.split(separator: "\n", omittingEmptySubsequences: true).suffix(lines).joined(separator: " | ")
    }
}

/// A child process (hook or resource agent) run to completion with a time limit.
/// Spawned in its own process group so a timeout kills the agent's children too; stdout
/// and stderr are merged and the last 16 KiB kept. The child's exit, not its pipe's EOF,
/// ends the run: agents that start daemons leave the pipe open behind them.
enum ChildProcess {
    struct Result: Sendable {
        /// The exit status, nil if killed by a signal.
        var exitCode: Int32?
        var signal: Int32?
        var timedOut: Bool
        var output: String
        var succeeded: Bool { exitCode == 0 && !timedOut }
        var statusDescription: String {
            if timedOut { return "timed out" }
            if let c = exitCode { return "exit \(c)" }
            return "killed by signal \(signal ?? 0)"
        }
    }

    struct SpawnError: Error, CustomStringConvertible {
        var path: String
        var errno: Int32
        var description: String { "cannot run \(path): \(String(cString: strerror(errno)))" }
    }

    static let outputLimit = 16 * 1024

    /// Run `path arguments…` with the daemon's environment plus `environment`.
    static func run(path: String, arguments: [String], environment: [String: String], timeout: Duration) async throws -> Result {
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Result, Error>) in
            // A thread of its own: the wait loop blocks, and must not starve the
            // cooperative pool or the event loops.
            let t = Thread {
                cont.resume(with: catching { try runBlocking(path: path, arguments: arguments, environment: environment, timeout: timeout) })
            }
            t.name = "hamgr-child"
            t.start()
        }
    }

    private static func catching(_ body: () throws -> Result) -> Swift.Result<Result, Error> {
        do { return .success(try body()) } catch { return .failure(error) }
    }

    static func runBlocking(path: String, arguments: [String], environment: [String: String], timeout: Duration) throws -> Result {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SpawnError(path: path, errno: errno) }
        let readEnd = fds[0], writeEnd = fds[1]
        // Neither end may leak into other children (dup2 onto 1 and 2 clears the flag there).
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 1)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 2)

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Own process group (for the timeout kill), default signal handling and an empty
        // mask: the daemon ignores SIGPIPE, a shell script must not inherit that.
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attr, 0)
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attr, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGCHLD, SIGUSR1, SIGUSR2] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)

        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        if env["PATH"] == nil { env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { argv.forEach { free($0) }; envp.forEach { free($0) } }

        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        close(writeEnd)
        guard rc == 0 else { close(readEnd); throw SpawnError(path: path, errno: rc) }
        defer { close(readEnd) }
        _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK)

        var output = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        func drain() {
            while true {
                let n = read(readEnd, &buf, buf.count)
                if n <= 0 { return }
                output.append(contentsOf: buf[0..<n])
                if output.count > outputLimit * 2 { output.removeFirst(output.count - outputLimit) }
            }
        }
        let clock = ContinuousClock()
        let start = clock.now
        var termSentAt: ContinuousClock.Instant?
        var status: Int32 = 0
        while true {
            var p = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 50)
            drain()
            let w = waitpid(pid, &status, WNOHANG)
            if w == pid || (w < 0 && errno == ECHILD) { break }
            let now = clock.now
            if termSentAt == nil, now - start > timeout {
                kill(-pid, SIGTERM)
                termSentAt = now
            } else if let t = termSentAt, now - t > .seconds(2) {
                kill(-pid, SIGKILL)
            }
        }
        drain()
        if output.count > outputLimit { output.removeFirst(output.count - outputLimit) }
        let exited = (status & 0x7f) == 0
        return Result(exitCode: exited ? (status >> 8) & 0xff : nil,
                      signal: exited ? nil : status & 0x7f,
                      timedOut: termSentAt != nil,
                      output: String(decoding: output, as: UTF8.self))
    }
}
