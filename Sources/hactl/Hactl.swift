import ArgumentParser

@main
struct Hactl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hactl",
        abstract: "Operate a hamgr cluster: status, switchover, drills, recovery.")
}
