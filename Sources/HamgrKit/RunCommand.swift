import ArgumentParser
import Dispatch
import Foundation
import HAShell
import Logging
import NIOCore
import NIOPosix

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a data node of a cluster (master or backup, as the quorum decides).",
        discussion: """
        SIGHUP (systemctl reload) re-reads --config and applies [log] level, the [[resource]] \
        list, [hooks], [volume] resync_rate and [export] allow at once; every other changed key \
        is refused with one line naming it (it needs a restart). SIGHUP never ends the process. \
        SIGTERM hands over first when a peer can take over, then stops.
        """)

    @Option(name: .long, help: "The cluster's TOML configuration file.")
    var config: String

    @Option(name: .long, help: "This node's name in the configuration.")
    var node: String

    @Option(name: .long, help: ArgumentHelp("Log level (overrides $HAMGR_LOG_LEVEL and the config's [log] level).", valueName: "level"))
    var logLevel: String?

    func run() throws {
        let cfg = try loadConfig(config)
        let level = try startLogging(cfg, option: logLevel, identifier: "hamgr-\(cfg.cluster.name)")
        _ = try cfg.node(named: node)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(2, NIOSingletons.groupLoopCountSuggestion))
        let daemon: NodeDaemon
        do {
            // A store that is missing or not this node's stops the start with one line naming
            // the key and the path (nothing is created, nothing is touched).
            try cfg.validateNodeCredentials(node)
            try cfg.validateBacking(node)
            daemon = try NodeDaemon(config: cfg, node: node, group: group, logger: Logger(label: "hamgr.node"))
        } catch let e as ConfigError {
            FileHandle.standardError.write(Data("hamgr: \(config): \(e)\n".utf8))
            throw ExitCode(1)
        }
        try daemon.start()
        let reloader = Reloader(path: config, running: cfg, option: logLevel, startLevel: level, target: daemon)
        waitForTermination(reload: { reloader.reload() })
        daemon.shutdown()
        try? group.syncShutdownGracefully()
    }
}

struct ArbitratorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "arbitrator",
        abstract: "Run the third-site arbitrator for one or more clusters.")

    @Option(name: .long, help: "A cluster's configuration file; repeat for every cluster this arbitrator serves.")
    var config: [String]

    // One loop by default: every decision is made on one loop anyway, and a session on any
    // other loop pays two cross-thread hops (message in, reply out) per message, which cost
    // more than the I/O they spread (docs/benchmarks.md §3).
    @Option(name: .long, help: "Event-loop threads for sessions and status (decisions always run on one of them).")
    var eventLoops: Int = 1

    @Flag(name: .long, help: "Create the state of a configured cluster whose state file is missing (first start, or a deliberate rebuild).")
    var `init` = false

    @Option(name: .long, help: ArgumentHelp("Log level (overrides $HAMGR_LOG_LEVEL and the first config's [log] level).", valueName: "level"))
    var logLevel: String?

    func run() throws {
        guard !config.isEmpty else { throw ValidationError("give at least one --config") }
        guard (1...256).contains(eventLoops) else { throw ValidationError("--event-loops must be 1…256") }
        let configs = try config.map(loadConfig)
        let level = try startLogging(configs[0], option: logLevel, identifier: "hamgr-arbitrator")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoops)
        let daemon: ArbitratorDaemon
        do {
            for c in configs { try c.validateArbitratorHost() }
            daemon = try ArbitratorDaemon(configs: configs, group: group, logger: Logger(label: "hamgr.arbitrator"), initialize: `init`)
        } catch let e as ConfigError {
            FileHandle.standardError.write(Data("hamgr arbitrator: \(e)\n".utf8))
            throw ExitCode(1)
        }
        try daemon.start()
        // The arbitrator applies only the log level live: everything else it reads is
        // refused by key until a restart.
        let reloader = Reloader(path: config[0], running: configs[0], option: logLevel, startLevel: level, target: nil)
        waitForTermination(reload: { reloader.reload() })
        daemon.shutdown()
        try? group.syncShutdownGracefully()
    }
}

/// Installs hamgr's log handler at the level in force (see `HamgrLogging.resolveLevel`).
func startLogging(_ config: ClusterConfig, option: String?, identifier: String) throws -> Logger.Level {
    let level: Logger.Level
    do {
        level = try HamgrLogging.resolveLevel(option: option, config: config.logLevel.flatMap(HamgrLogging.level))
    } catch let e as ConfigError {
        throw ValidationError("\(e)")
    }
    HamgrLogging.bootstrap(level: level, identifier: identifier)
    return level
}

/// Loads and validates a config; a bad one becomes one clear line and exit status 1.
func loadConfig(_ path: String) throws -> ClusterConfig {
    do {
        return try ClusterConfig.load(path: path)
    } catch let e as ConfigError {
        throw ValidationError("\(path): \(e)")
    }
}

/// Blocks until SIGTERM or SIGINT; SIGHUP runs `reload` and never ends the process.
func waitForTermination(reload: @escaping @Sendable () -> Void = {}) {
    let sem = DispatchSemaphore(value: 0)
    var sources: [DispatchSourceSignal] = []
    for sig in [SIGTERM, SIGINT] {
        signal(sig, SIG_IGN)
        let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        s.setEventHandler { sem.signal() }
        s.resume()
        sources.append(s)
    }
    signal(SIGHUP, SIG_IGN)
    let hup = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "hamgr.reload"))
    hup.setEventHandler { reload() }
    hup.resume()
    sources.append(hup)
    sem.wait()
    _ = sources
}
