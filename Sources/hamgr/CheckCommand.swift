import ArgumentParser

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "(being built)")
    func run() throws { throw ValidationError("hamgr check is not built yet") }
}
