import ArgumentParser
import Foundation
import HAShell

/// `hamgr check --config F [--node N]`: validate a cluster config the way `run` and
/// `arbitrator` would, print one line, exit 0 — or print the first problem, naming the
/// key, and exit 1.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Validate a cluster config file (and, with --node, this host's part of it).")

    @Option(name: .long, help: "The cluster's TOML config file.")
    var config: String

    @Option(name: .long, help: "Also check what node NAME needs on this host (tokens, certificates, backing store, hooks, exec: resources).")
    var node: String?

    @Flag(name: .long, help: "Also check what the arbitrator needs on this host (its certificate, if it serves status over HTTPS).")
    var arbitrator = false

    func run() throws {
        do {
            let c = try ClusterConfig.load(path: config)
            if let node { try c.validateNodeHost(node) }
            if arbitrator { try c.validateArbitratorHost() }
            var line = "config OK: cluster \(c.cluster.name), nodes \(c.nodes.map(\.name.name).joined(separator: ", "))"
            if let node { line += " (checked for node \(node))" }
            if arbitrator { line += " (checked for the arbitrator)" }
            print(line)
        } catch let e as ConfigError {
            FileHandle.standardError.write(Data("hamgr: \(config): \(e)\n".utf8))
            throw ExitCode(1)
        }
    }
}
