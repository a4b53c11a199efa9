import ArgumentParser

@main
struct Hamgr: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hamgr",
        abstract: "High-availability cluster manager for replicated block storage.",
        subcommands: [RunCommand.self, ArbitratorCommand.self, CheckCommand.self, ExportCommand.self])
}
