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
        abstract: "Run a data node of a cluster (master or backup, as the quorum decides).")

    @Option(name: .long, help: "The cluster's TOML configuration file.")
    var config: String

    @Option(name: .long, help: "This node's name in the configuration.")
    var node: String

    func run() throws {
        HamgrLogging.bootstrap()
        let cfg = try loadConfig(config)
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
        waitForTermination()
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

    func run() throws {
        HamgrLogging.bootstrap()
        guard !config.isEmpty else { throw ValidationError("give at least one --config") }
        guard (1...256).contains(eventLoops) else { throw ValidationError("--event-loops must be 1…256") }
        let configs = try config.map(loadConfig)
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
        waitForTermination()
        daemon.shutdown()
        try? group.syncShutdownGracefully()
    }
}

/// Loads and validates a config; a bad one becomes one clear line and exit status 1.
func loadConfig(_ path: String) throws -> ClusterConfig {
    do {
        return try ClusterConfig.load(path: path)
    } catch let e as ConfigError {
        throw ValidationError("\(path): \(e)")
    }
}

/// Blocks until SIGTERM or SIGINT.
func waitForTermination() {
    let sem = DispatchSemaphore(value: 0)
    var sources: [DispatchSourceSignal] = []
    for sig in [SIGTERM, SIGINT] {
        signal(sig, SIG_IGN)
        let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        s.setEventHandler { sem.signal() }
        s.resume()
        sources.append(s)
    }
    sem.wait()
    _ = sources
}
