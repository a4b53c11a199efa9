import ArgumentParser

struct ArbitratorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "arbitrator", abstract: "(being built)")
    func run() throws { throw ValidationError("hamgr arbitrator is not built yet") }
}
