import Foundation
import XCTest

/// Runs a real cluster — `hamgr arbitrator` and two `hamgr run` processes — on loopback,
/// each node on its own 127.0.0.x addresses, in a temporary directory. Every process is
/// killed and every file removed by `shutdown()` (call it in a defer or tearDown).
final class ClusterHarness {
    struct Node {
        let name: String
        let ip: String
        let replicationPort: Int
        let servicePort: Int
        let statusPort: Int
        var serviceAddress: String { "\(ip):\(servicePort)" }
        var statusAddress: String { "\(ip):\(statusPort)" }
        var nbdURI: String { "nbd://\(ip):\(servicePort)" }
    }

    let dir: URL
    let cluster: String
    let nodes: [Node]
    let arbitratorIP: String
    let arbitratorPort: Int
    let arbitratorStatusPort: Int
    let configPath: String
    let tokenPath: String
    private(set) var processes: [String: Process] = [:]
    /// Set for a cluster with `[tls]` (status over HTTPS): status reads and admin posts go
    /// to https:// and verify the listener with this CA.
    var statusCAFile: String?
    /// Set for a cluster with `[status] read_token_file`: status reads send it as a bearer token.
    var statusReadToken: String?
    let volumeBytes: Int

    static var binDir: URL {
        if let p = ProcessInfo.processInfo.environment["HAMGR_BIN"] { return URL(fileURLWithPath: p).deletingLastPathComponent() }
        // The test bundle lives in .build/<triple>/debug/; the executables beside it.
        var u = Bundle.main.bundleURL
        for _ in 0..<4 where !FileManager.default.fileExists(atPath: u.appendingPathComponent("hamgr").path) {
            u = u.deletingLastPathComponent()
        }
        return u
    }
    static var hamgr: String { binDir.appendingPathComponent("hamgr").path }
    static var hactl: String { binDir.appendingPathComponent("hactl").path }

    /// - Parameter subnet: the third octet base; each harness in one test run should use its own.
    init(name: String = "t", subnet: Int, protocolLetter: String = "C", size: String = "64MiB",
         extraCluster: String = "", extraVolume: String = "", extraTOML: String = "") throws {
        cluster = name
        let units: [(String, Int)] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        let unit = units.first { size.hasSuffix($0.0) }
        volumeBytes = (Int(size.dropLast(unit == nil ? 0 : 3)) ?? 0) * (unit?.1 ?? 1)
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-it-\(name)-\(getpid())-\(subnet)-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let base = 20000 + (subnet % 200) * 100 + Int.random(in: 0..<20) * 5
        nodes = [
            Node(name: "a", ip: "127.0.\(subnet).1", replicationPort: base, servicePort: base + 1, statusPort: base + 2),
            Node(name: "b", ip: "127.0.\(subnet).2", replicationPort: base, servicePort: base + 1, statusPort: base + 2),
        ]
        arbitratorIP = "127.0.\(subnet).3"
        arbitratorPort = base + 3
        arbitratorStatusPort = base + 4
        let key = dir.appendingPathComponent("cluster.key").path
        var rng = SystemRandomNumberGenerator()
        FileManager.default.createFile(atPath: key, contents: Data((0..<48).map { _ in UInt8.random(in: 0...255, using: &rng) }),
                                       attributes: [.posixPermissions: 0o600])
        tokenPath = dir.appendingPathComponent("admin.token").path
        FileManager.default.createFile(atPath: tokenPath, contents: Data("secret-\(UInt64.random(in: 0...UInt64.max))".utf8),
                                       attributes: [.posixPermissions: 0o600])
        var toml = """
        [cluster]
        name = "\(name)"
        key_file = "\(key)"
        admin_token_file = "\(tokenPath)"
        protocol = "\(protocolLetter)"
        \(extraCluster)

        [volume]
        size = "\(size)"
        chunk_size = "64KiB"
        create = true
        \(extraVolume)

        """
        for n in nodes {
            toml += """
            [[node]]
            name = "\(n.name)"
            replication_address = "\(n.ip):\(n.replicationPort)"
            service_address = "\(n.serviceAddress)"
            status_address = "\(n.statusAddress)"
            backing = "\(dir.appendingPathComponent("\(n.name).img").path)"
            metadata = "\(dir.appendingPathComponent("\(n.name).meta").path)"

            """
        }
        toml += """
        [arbitrator]
        address = "\(arbitratorIP):\(arbitratorPort)"
        status_address = "\(arbitratorIP):\(arbitratorStatusPort)"
        state_dir = "\(dir.appendingPathComponent("arbitrator").path)"

        \(extraTOML)
        """
        configPath = dir.appendingPathComponent("cluster.toml").path
        try toml.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    func node(_ name: String) -> Node { nodes.first { $0.name == name }! }
    func backing(_ name: String) -> String { dir.appendingPathComponent("\(name).img").path }
    /// SHA-256 of node `name`'s volume bytes (its store without the identity label).
    func volumeDigest(_ name: String) throws -> String { try sha256(ofFile: backing(name), first: volumeBytes) }
    func log(_ name: String) -> String { dir.appendingPathComponent("\(name).log").path }

    // MARK: processes

    /// `--init`: the arbitrator's state is created on first start (kept on later starts).
    func startArbitrator(initialize: Bool = true) throws {
        try spawn("w", [Self.hamgr, "arbitrator", "--config", configPath] + (initialize ? ["--init"] : []))
    }
    func startNode(_ name: String, env: [String: String] = [:]) throws {
        try spawn(name, [Self.hamgr, "run", "--config", configPath, "--node", name], env: env)
    }
    func startAll() throws {
        try startArbitrator()
        try startNode("a")
        try startNode("b")
    }

    func spawn(_ name: String, _ argv: [String], env: [String: String] = [:]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        var e = ProcessInfo.processInfo.environment
        e["HAMGR_LOG_LEVEL"] = e["HAMGR_LOG_LEVEL"] ?? "debug"
        for (k, v) in env { e[k] = v }
        p.environment = e
        let logURL = URL(fileURLWithPath: log(name))
        if !FileManager.default.fileExists(atPath: logURL.path) { FileManager.default.createFile(atPath: logURL.path, contents: nil) }
        let fh = try FileHandle(forWritingTo: logURL)
        fh.seekToEndOfFile()
        p.standardOutput = fh
        p.standardError = fh
        try p.run()
        processes[name] = p
    }

    func isRunning(_ name: String) -> Bool { processes[name]?.isRunning ?? false }

    func signal(_ name: String, _ sig: Int32) {
        guard let p = processes[name], p.isRunning else { return }
        kill(p.processIdentifier, sig)
    }

    /// SIGKILL and reap.
    func kill9(_ name: String) {
        guard let p = processes[name] else { return }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        processes[name] = nil
    }

    /// SIGTERM, wait up to `seconds`, then SIGKILL. Returns the exit status.
    @discardableResult
    func stop(_ name: String, seconds: Double = 10) -> Int32? {
        guard let p = processes[name] else { return nil }
        if p.isRunning { kill(p.processIdentifier, SIGTERM) }
        let end = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < end { usleep(20_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        processes[name] = nil
        return p.terminationStatus
    }

    func shutdown(keepFiles: Bool = false) {
        for name in processes.keys { kill9(name) }
        if !keepFiles && ProcessInfo.processInfo.environment["HAMGR_KEEP_TEST_DIRS"] == nil {
            try? FileManager.default.removeItem(at: dir)
        }
    }

    // MARK: observation

    func status(_ name: String) -> [String: Any]? {
        let addr = name == "w" ? "\(arbitratorIP):\(arbitratorStatusPort)" : node(name).statusAddress
        let auth = statusReadToken.map { ["-H", "Authorization: Bearer \($0)"] } ?? []
        guard let out = try? shell(["curl", "-sf", "--max-time", "1"] + curlTLS + auth + ["\(scheme)://\(addr)/status"], timeout: 3), out.status == 0,
              let obj = try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any] else { return nil }
        return obj
    }

    private var scheme: String { statusCAFile == nil ? "http" : "https" }
    private var curlTLS: [String] { statusCAFile.map { ["--cacert", $0] } ?? [] }

    func role(_ name: String) -> String? { status(name)?["role"] as? String }

    /// Waits until `name` reports `role` (bounded); returns the seconds it took.
    @discardableResult
    func waitForRole(_ name: String, _ role: String, within seconds: Double = 20, file: StaticString = #filePath, line: UInt = #line) -> Double? {
        let start = Date()
        while Date().timeIntervalSince(start) < seconds {
            if self.role(name) == role { return Date().timeIntervalSince(start) }
            usleep(50_000)
        }
        XCTFail("\(name) did not become \(role) within \(seconds) s; status: \(String(describing: status(name)))\n--- log tail:\n\(tail(name))", file: file, line: line)
        return nil
    }

    /// Waits until `check(status)` holds for node `name` (bounded).
    @discardableResult
    func waitFor(_ name: String, _ what: String, within seconds: Double = 30, file: StaticString = #filePath, line: UInt = #line,
                 _ check: ([String: Any]) -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if let s = status(name), check(s) { return true }
            usleep(100_000)
        }
        XCTFail("\(name): \(what) not reached within \(seconds) s; status: \(String(describing: status(name)))\n--- log tail:\n\(tail(name))", file: file, line: line)
        return false
    }

    func tail(_ name: String, lines: Int = 40) -> String {
        guard let s = try? String(contentsOfFile: log(name), encoding: .utf8) else { return "(no log)" }
        return s.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    /// POST an admin action with the token.
    func admin(_ name: String, _ action: String, body: String = "{}") throws -> (code: Int, body: String) {
        let out = try shell(["curl", "-s", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"] + curlTLS + [
                           "-H", "Authorization: Bearer \(try String(contentsOfFile: tokenPath, encoding: .utf8))",
                           "-H", "Content-Type: application/json", "--data", body,
                           "\(scheme)://\(node(name).statusAddress)/admin/\(action)"], timeout: 40)
        let parts = out.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(parts.last ?? "") ?? 0, parts.dropLast().joined(separator: "\n"))
    }
}

struct CommandResult { var status: Int32; var stdout: String; var stderr: String }

/// Runs a command to completion with a hard timeout (SIGKILL after `timeout` seconds).
@discardableResult
func shell(_ argv: [String], timeout: Double = 60, env: [String: String] = [:], stdin: String? = nil) throws -> CommandResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = argv
    if !env.isEmpty {
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
    }
    let outURL = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-run-\(UUID().uuidString).out")
    let errURL = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-run-\(UUID().uuidString).err")
    FileManager.default.createFile(atPath: outURL.path, contents: nil)
    FileManager.default.createFile(atPath: errURL.path, contents: nil)
    defer { try? FileManager.default.removeItem(at: outURL); try? FileManager.default.removeItem(at: errURL) }
    p.standardOutput = try FileHandle(forWritingTo: outURL)
    p.standardError = try FileHandle(forWritingTo: errURL)
    if let stdin {
        let pipe = Pipe()
        p.standardInput = pipe
        try p.run()
        pipe.fileHandleForWriting.write(Data(stdin.utf8))
        try pipe.fileHandleForWriting.close()
    } else {
        p.standardInput = FileHandle.nullDevice
        try p.run()
    }
    let end = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < end { usleep(10_000) }
    if p.isRunning { kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    let out = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
    let err = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
    return CommandResult(status: p.isRunning ? -1 : p.terminationStatus, stdout: out, stderr: err)
}

/// SHA-256 of the first `bytes` of a file: a store's volume range, without the identity
/// label that follows it (each node's label differs by design).
func sha256(ofFile path: String, first bytes: Int) throws -> String {
    try shell(["sh", "-c", "head -c \(bytes) \"$0\" | sha256sum", path]).stdout.split(separator: " ").first.map(String.init) ?? ""
}

func sha256(ofFile path: String) throws -> String {
    try shell(["sha256sum", path]).stdout.split(separator: " ").first.map(String.init) ?? ""
}
