import ArgumentParser

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "export", abstract: "(being built)")
    func run() throws { throw ValidationError("hamgr export is not built yet") }
}
