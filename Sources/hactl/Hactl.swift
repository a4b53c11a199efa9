import ArgumentParser
import Foundation
import HAShell

/// `hactl --endpoint http://HOST:PORT [--token-file F] COMMAND` (design.md §5).
/// Talks only to the nodes' status servers: `/status` to read, `/admin/*` to act.
@main
struct Hactl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hactl",
        abstract: "Operate a hamgr cluster: status, switchover, drills, recovery.",
        discussion: """
        ENDPOINT is a node's status_address as a URL (http://10.1.0.1:9650). Give one and \
        hactl finds the peer through it; give both to reach each node directly. \
        HACTL_ENDPOINT and HACTL_TOKEN_FILE set the defaults. Admin commands need the \
        cluster's admin token file (mode 0600).

        Shell completions: hactl --generate-completion-script bash|zsh|fish
        """,
        version: hamgrVersion,
        subcommands: [StatusCommand.self, SwitchoverCommand.self, PromoteCommand.self, DemoteCommand.self,
                      MaintenanceCommand.self, VerifyCommand.self, ResyncCommand.self, ResolveCommand.self,
                      BootstrapCommand.self, InvalidateCommand.self, ArbitratorAcceptCommand.self,
                      DrillCommand.self, DemoCommand.self])

    @Option(name: .long, help: ArgumentHelp("A node's status endpoint, http://HOST:PORT (repeatable).", valueName: "url"))
    var endpoint: [String] = []

    @Option(name: .long, help: ArgumentHelp("The cluster's admin token file (mode 0600).", valueName: "file"))
    var tokenFile: String?

    @Option(name: .long, help: "Seconds to wait for each HTTP answer.")
    var timeout: Double = 5

    /// The endpoints to use: the options, else $HACTL_ENDPOINT (comma separated), else the local default.
    var endpoints: [String] {
        if !endpoint.isEmpty { return endpoint.map(Self.normalize) }
        if let env = ProcessInfo.processInfo.environment["HACTL_ENDPOINT"], !env.isEmpty {
            return env.split(separator: ",").map { Self.normalize(String($0)) }
        }
        return ["http://127.0.0.1:9650"]
    }

    /// `HOST:PORT` is accepted for `http://HOST:PORT`.
    static func normalize(_ s: String) -> String {
        let t = s.trimmingCharacters(in: .whitespaces)
        return t.hasPrefix("http://") || t.hasPrefix("https://") ? t : "http://" + t
    }

    func client(needsToken: Bool) throws -> ClusterClient {
        var token: String?
        let path = tokenFile ?? ProcessInfo.processInfo.environment["HACTL_TOKEN_FILE"].flatMap { $0.isEmpty ? nil : $0 }
        if let path {
            do {
                token = try ClusterConfig.readSecretFile(path, key: "--token-file")
            } catch let e as ConfigError {
                throw HactlError("\(e.message)")
            }
        } else if needsToken {
            throw HactlError("this command needs --token-file FILE (the cluster's admin_token_file)")
        }
        return ClusterClient(endpoints: endpoints, token: token, timeout: .milliseconds(Int64(max(0.1, timeout) * 1000)))
    }
}

/// A failure to report as `hactl: message` with exit status 1.
struct HactlError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Print to stderr.
func warn(_ s: String) {
    FileHandle.standardError.write(Data((s + "\n").utf8))
}

/// Run a command body, turning our errors into one `hactl: …` line and exit 1.
func reporting(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as HactlError {
        warn("hactl: \(e)")
        throw ExitCode(1)
    } catch let e as HTTPClient.Failure {
        warn("hactl: \(e)")
        throw ExitCode(1)
    }
}

/// True if both stdin and stdout are terminals (prompts and progress bars).
var isInteractive: Bool { isatty(0) == 1 && isatty(1) == 1 }

/// The confirmation every data-discarding command asks for (unless `--yes`): refused without
/// a terminal (naming `risk`), else the operator must type `expected`. `ask` runs only on a
/// terminal (it may fetch the node's status to word the question).
func requireConfirmation(_ risk: String, _ ask: () -> (question: String, expected: String)) throws {
    guard isInteractive else { throw HactlError("\(risk): it needs --yes when not run from a terminal") }
    let (question, expected) = ask()
    guard confirm(question, expected: expected) else { throw HactlError("not confirmed; nothing done") }
}

/// Ask for a typed confirmation; false unless the operator types `expected`.
func confirm(_ question: String, expected: String) -> Bool {
    print(question)
    print("Type '\(expected)' to continue: ", terminator: "")
    fflush(stdout)
    return readLine()?.trimmingCharacters(in: .whitespaces) == expected
}
