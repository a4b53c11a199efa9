import ArgumentParser
import Foundation
import HAShell
import ReplicationShell

/// `hactl --endpoint http(s)://HOST:PORT [--ca-file F] [--token-file F] COMMAND` (design.md §5).
/// Talks only to the nodes' status servers: `/status` to read, `/admin/*` to act.
@main
struct Hactl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hactl",
        abstract: "Operate a hamgr cluster: status, switchover, drills, recovery.",
        discussion: """
        ENDPOINT is a node's status_address as a URL (http://10.1.0.1:9650, or https:// \
        when the cluster serves status over TLS). Give one and hactl finds the peer through \
        it; give both to reach each node directly. https:// needs --ca-file (the cluster CA, \
        tls.ca_file); with a CA file, a bare HOST:PORT means https://. Admin commands need \
        the cluster's admin token file (mode 0600); it also opens /status when the cluster \
        sets status.read_token_file, as does --read-token-file. HACTL_ENDPOINT, \
        HACTL_CA_FILE, HACTL_TOKEN_FILE and HACTL_READ_TOKEN_FILE set the defaults.

        --config FILE (or HACTL_CONFIG) reads the cluster TOML: both nodes' status \
        endpoints (https:// with status.tls), tls.ca_file, and the admin and read token \
        files when readable here; options and HACTL_* variables override it.

        Every command takes --json (one JSON object on stdout). `status` exits 0 healthy, \
        1 degraded, 2 no master, 3 split brain, 4 unknown (nothing could be read); other \
        commands exit 0 done, 1 refused or failed; 64 is a usage error.

        Shell completions: hactl --generate-completion-script bash|zsh|fish
        """,
        version: hamgrVersion,
        subcommands: [StatusCommand.self, SwitchoverCommand.self, PromoteCommand.self, DemoteCommand.self,
                      MaintenanceCommand.self, VerifyCommand.self, ResyncCommand.self, ResolveCommand.self,
                      BootstrapCommand.self, InvalidateCommand.self, ArbitratorAcceptCommand.self,
                      ResourceCommand.self, DrillCommand.self, DemoCommand.self])

    @Option(name: .long, help: ArgumentHelp("A node's status endpoint, http(s)://HOST:PORT (repeatable).", valueName: "url"))
    var endpoint: [String] = []

    @Option(name: .long, help: ArgumentHelp("The cluster CA (PEM) that https:// endpoints' certificates must chain to.", valueName: "file"))
    var caFile: String?

    @Option(name: .long, help: ArgumentHelp("The cluster's admin token file (mode 0600); it also opens reads.", valueName: "file"))
    var tokenFile: String?

    @Option(name: .long, help: ArgumentHelp("The read-only token file (status.read_token_file, mode 0600), for /status.", valueName: "file"))
    var readTokenFile: String?

    @Option(name: .long, help: ArgumentHelp("The cluster TOML: both nodes' status endpoints, the CA, and the token files readable on this host.", valueName: "file"))
    var config: String?

    @Option(name: .long, help: "Seconds to wait for each HTTP answer.")
    var timeout: Double = 5

    /// The cluster config named by --config, else $HACTL_CONFIG, parsed (not validated:
    /// the cluster key and other files need not exist on an operator's host).
    func clusterConfig() throws -> ClusterConfig? {
        guard let path = config ?? Self.environment("HACTL_CONFIG") else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw HactlError("--config: cannot read \(path): \(String(cString: strerror(errno)))")
        }
        let dir = URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent().path
        do {
            var c = try ClusterConfig.parse(toml: String(decoding: data, as: UTF8.self), relativeTo: dir)
            c.sourcePath = path
            return c
        } catch let e as ConfigError {
            throw HactlError("--config \(path): \(e.key): \(e.message)")
        }
    }

    /// The endpoints to use: the options, else $HACTL_ENDPOINT (comma separated), else both
    /// nodes' status_address from the config, else the local default; a bare HOST:PORT is
    /// https:// when a CA file is given (or the config sets status.tls).
    func endpoints(secure: Bool, config: ClusterConfig? = nil) -> [String] {
        if !endpoint.isEmpty { return endpoint.map { Self.normalize($0, secure: secure) } }
        if let env = Self.environment("HACTL_ENDPOINT") {
            return env.split(separator: ",").map { Self.normalize(String($0), secure: secure) }
        }
        if let config, !config.nodes.isEmpty {
            return config.nodes.map { Self.normalize($0.statusAddress, secure: config.status.tls) }
        }
        return [Self.normalize("127.0.0.1:9650", secure: secure)]
    }

    /// `HOST:PORT` is accepted for `http://HOST:PORT` (`https://` with `secure`).
    static func normalize(_ s: String, secure: Bool) -> String {
        let t = s.trimmingCharacters(in: .whitespaces)
        return t.hasPrefix("http://") || t.hasPrefix("https://") ? t : (secure ? "https://" : "http://") + t
    }

    /// A non-empty environment variable.
    static func environment(_ name: String) -> String? {
        ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// The CA file given (--ca-file, else $HACTL_CA_FILE), if any. (The config's
    /// tls.ca_file is added by `client`.)
    var caFilePath: String? { caFile ?? Self.environment("HACTL_CA_FILE") ?? (try? clusterConfig())?.tls?.caFile }

    func client(needsToken: Bool) throws -> ClusterClient {
        let config = try clusterConfig()
        let adminToken = try secret(tokenFile ?? Self.environment("HACTL_TOKEN_FILE"), option: "--token-file")
            ?? secret(fromConfig: config?.cluster.adminTokenFile, key: "cluster.admin_token_file")
        if needsToken && adminToken == nil {
            throw HactlError("this command needs --token-file FILE (the cluster's admin_token_file)"
                             + (config.map { c in c.cluster.adminTokenFile.map { "; \($0) named by \(c.sourcePath ?? "the config") is not readable here" } ?? "" } ?? ""))
        }
        let readToken = try secret(readTokenFile ?? Self.environment("HACTL_READ_TOKEN_FILE"), option: "--read-token-file")
            ?? secret(fromConfig: config?.status.readTokenFile, key: "status.read_token_file")
        var trust: HTTPClient.TrustedCA?
        let explicitCA = caFile ?? Self.environment("HACTL_CA_FILE")
        if let ca = explicitCA ?? config?.tls?.caFile {
            let option = explicitCA != nil ? "--ca-file" : "tls.ca_file"
            do {
                trust = try HTTPClient.TrustedCA(file: ca, key: option)
            } catch let e as ConfigError {
                throw HactlError("\(option): \(e.message)")
            }
        }
        let endpoints = endpoints(secure: trust != nil, config: config)
        if trust == nil, let ep = endpoints.first(where: { $0.hasPrefix("https://") }) {
            throw HactlError("\(ep): an https:// endpoint needs --ca-file FILE (the cluster CA, tls.ca_file) or HACTL_CA_FILE")
        }
        // The arbitrator's status endpoint, for `status`, when the config names one and no
        // endpoint was given explicitly.
        var arbitrators: [String] = []
        if endpoint.isEmpty, Self.environment("HACTL_ENDPOINT") == nil, let config, let a = config.arbitrator.statusAddress {
            arbitrators = [Self.normalize(a, secure: config.status.tls)]
        }
        var names: [String: String] = [:]
        for n in config?.nodes ?? [] { names[Self.normalize(n.statusAddress, secure: config?.status.tls ?? false)] = n.name.name }
        return ClusterClient(endpoints: endpoints, arbitratorEndpoints: arbitrators, names: names, adminToken: adminToken,
                             readToken: readToken, trust: trust, timeout: .milliseconds(Int64(max(0.1, timeout) * 1000)))
    }

    /// The token in the secret file at `path` (mode 0600), if a path is given.
    private func secret(_ path: String?, option: String) throws -> String? {
        guard let path else { return nil }
        do {
            return try ClusterConfig.readSecretFile(path, key: option)
        } catch let e as ConfigError {
            throw HactlError("\(option): \(e.message)")
        }
    }

    /// A token file named by the config: used when it can be read on this host (an
    /// operator's workstation may not hold it, nor have `$CREDENTIALS_DIRECTORY`); a readable
    /// file with a bad mode is an error.
    private func secret(fromConfig configured: String?, key: String) throws -> String? {
        guard let configured, let path = try? SystemdCredentials.expand(configured, key: key), access(path, R_OK) == 0 else { return nil }
        do {
            return try ClusterConfig.readSecretFile(path, key: key)
        } catch let e as ConfigError {
            throw HactlError("--config: \(key): \(e.message)")
        }
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

/// Run a command body, turning our errors into one `hactl: …` line on stderr (with
/// `json`, a JSON error object on stdout, docs/operator-guide.md) and exit `failure`.
func reporting(action: String = "", json: Bool = false, failure: Int32 = 1, _ body: () throws -> Void) throws {
    func fail(_ message: String) throws -> Never {
        if json {
            printJSON(AdminResults.object(action: action, results: [], error: message))
        } else {
            warn("hactl: \(message)")
        }
        throw ExitCode(failure)
    }
    do {
        try body()
    } catch let e as HactlError {
        try fail(e.description)
    } catch let e as HTTPClient.Failure {
        try fail("\(e)")
    } catch let e as NBDClientError {
        try fail("\(e)")
    }
}

/// Print a JSON object (sorted keys, pretty printed) on stdout.
func printJSON(_ object: [String: Any]) {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]))
        ?? Data("{}".utf8)
    print(String(decoding: data, as: UTF8.self))
}

/// An Encodable value as a JSONSerialization object (NSNull for nil).
func jsonValue<T: Encodable>(_ value: T?) -> Any {
    guard let value, let data = try? JSONEncoder().encode(value),
          let o = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]) else { return NSNull() }
    return o
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
