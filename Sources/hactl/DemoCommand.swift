import ArgumentParser
import Foundation
import HACore

/// `hactl demo`: a local two-node cluster with an arbitrator, no setup needed.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Start a local demo cluster (two nodes and an arbitrator on this machine) and walk through a failover.")

    func run() throws {
        try reporting {
            throw HactlError("hactl demo is not built yet: it arrives with the daemon integration")
        }
    }
}
