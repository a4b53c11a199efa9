import ArgumentParser
import HAShell

/// The root command; `Sources/hamgr/main.swift` runs it.
public struct Hamgr: ParsableCommand {
    public init() {}
    public static let configuration = CommandConfiguration(
        commandName: "hamgr",
        abstract: "High-availability cluster manager for replicated block storage.",
        version: hamgrVersion,
        subcommands: [RunCommand.self, ArbitratorCommand.self, CheckCommand.self, ExportCommand.self, CertsCommand.self])
}
