import ArgumentParser
import Foundation
import HAShell
import Replication
import ReplicationShell

/// `hactl demo`: a local cluster — arbitrator and two data nodes, each on its own loopback
/// address — in a temporary directory with file-backed volumes, TLS on everywhere (`hamgr
/// certs` makes the CA and the hosts' certificates; NBD, status and admin run over TLS,
/// verified against that CA). It shows the status table,
/// writes data through the master's NBD export, kills the master, shows the backup promoted
/// on its own address with the data intact, brings the old master back as backup, and
/// removes every process and file it made (also on Ctrl-C or failure).
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Start a local demo cluster (two nodes and an arbitrator on this machine) and walk through a failover.")

    @Flag(name: .long, help: "Keep the demo's directory (config, logs, volumes) instead of removing it.")
    var keep = false

    @Flag(name: .long, help: "Walk through on stderr; print only a JSON result {action, node, endpoint, ok, message, fields, results} on stdout.")
    var json = false

    func run() throws {
        // With --json the walkthrough goes to stderr and stdout carries one JSON object.
        let savedStdout = json ? dup(1) : -1
        if json { fflush(stdout); dup2(2, 1) }
        func restoreStdout() {
            guard savedStdout >= 0 else { return }
            fflush(stdout); dup2(savedStdout, 1); close(savedStdout)
        }
        do {
            try reporting {
                try runOnce()
            }
        } catch {
            restoreStdout()
            if json { printJSON(AdminResults.object(action: "demo", results: [], error: "the demo failed; its walkthrough is on stderr")) }
            throw error
        }
        restoreStdout()
        if json {
            printJSON(AdminResults.object(action: "demo", results: [
                AdminOutcome(node: nil, endpoint: "local", ok: true, message: "demo completed: failover shown, data intact"
                             + (keep ? "; directory kept" : "")),
            ]))
        }
    }

    private func runOnce() throws {
        do {
            let cluster = try LocalCluster.make()
            LocalCluster.current = cluster
            // Whatever ends the demo, its processes and files go with it: a closed stdout
            // (`hactl demo | head`) must not kill us before the cleanup.
            signal(SIGPIPE, SIG_IGN)
            for sig in [SIGINT, SIGTERM, SIGHUP] {
                signal(sig) { s in LocalCluster.current?.teardown(keepFiles: false); Foundation.exit(128 + s) }
            }
            defer { cluster.teardown(keepFiles: keep) }
            try runDemo(cluster)
        }
    }

    private func step(_ s: String) { print("\n==> \(s)"); fflush(stdout) }

    private func table(_ c: LocalCluster) {
        let client = ClusterClient(endpoints: c.statusEndpoints, trust: c.trust, timeout: .seconds(2))
        let views = client.discover(followPeers: false)
        print(StatusTable.render(views.filter { $0.arbitrator == nil }), terminator: "")
        for w in views.compactMap(\.arbitrator) { print(StatusTable.render(arbitrator: w), terminator: "") }
    }

    private func runDemo(_ c: LocalCluster) throws {
        step("Making certificates in \(c.dir.path) with hamgr certs: a cluster CA, and one for each node and the arbitrator (naming its addresses)")
        try c.makeCertificates()
        print("    NBD, status and admin all run over TLS, verified against \(c.caFile);")
        print("    the replication and quorum links are encrypted and authenticated with the cluster key")
        step("Starting an arbitrator and two nodes on loopback in \(c.dir.path)")
        try c.start("w"); try c.start("a"); try c.start("b")
        guard let master = c.waitForMaster(within: 30), c.waitInSync(master, within: 30) else {
            throw HactlError("the demo cluster did not elect a master within 30 s; logs in \(c.dir.path)\n\(c.tail("a"))\n\(c.tail("b"))")
        }
        let backup = master == "a" ? "b" : "a"
        table(c)

        step("Writing 4 MiB through \(master)'s NBD export at \(c.serviceAddress(master)) over TLS (NBD_OPT_STARTTLS; protocol C: acknowledged only when both disks have it)")
        let data = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 12) }
        let hp = try parseHostPort(c.serviceAddress(master))
        let writer = try NBDClient(host: hp.host, port: hp.port, timeoutSeconds: 10, tls: c.nbdTLS)
        for off in stride(from: 0, to: data.count, by: 1 << 20) {
            try writer.write(offset: UInt64(off), bytes: Array(data[off..<(off + (1 << 20))]))
        }
        try writer.flush()
        writer.disconnect()
        print("    wrote and flushed 4 MiB")

        step("Killing the master \(master) (SIGKILL)")
        let killed = Date()
        c.kill(master)
        guard let rto = c.firstWrite(on: backup, within: 20, since: killed) else {
            throw HactlError("\(backup) was not promoted within 20 s\n\(c.tail(backup))")
        }
        print(String(format: "    %@ was promoted and acknowledged a write %.2f s after the kill", backup, rto))
        table(c)

        step("Reading the 4 MiB back from the new master \(backup) at \(c.serviceAddress(backup)) over TLS (its own certificate, same CA)")
        let hp2 = try parseHostPort(c.serviceAddress(backup))
        let reader = try NBDClient(host: hp2.host, port: hp2.port, timeoutSeconds: 10, tls: c.nbdTLS)
        var back: [UInt8] = []
        for off in stride(from: 0, to: data.count, by: 1 << 20) {
            back += try reader.read(offset: UInt64(off), length: 1 << 20)
        }
        reader.disconnect()
        // The probe write of `firstWrite` went to the volume's last block, outside the 4 MiB.
        guard back == data else { throw HactlError("data check FAILED: the new master's copy differs") }
        print("    data intact: all 4 MiB read back as written")

        step("Restarting \(master): it rejoins as backup (no automatic failback) and resyncs")
        try c.start(master)
        _ = c.waitInSync(backup, within: 30)
        table(c)
        step("Done. Stopping the cluster and removing its files.")
    }
}

/// The demo's processes and files.
final class LocalCluster: @unchecked Sendable {
    nonisolated(unsafe) static var current: LocalCluster?

    let dir: URL
    let config: String
    let hamgr: String
    let ips = ["a": "127.0.77.1", "b": "127.0.77.2", "w": "127.0.77.3"]
    let port: Int
    private var pids: [String: pid_t] = [:]
    private let volumeBytes = 64 << 20
    /// The cluster CA `hamgr certs` makes (tls.ca_file), and the clients that trust it (set
    /// by `makeCertificates`).
    var caFile: String { dir.appendingPathComponent("tls/ca.crt").path }
    private(set) var trust: HTTPClient.TrustedCA?
    private(set) var nbdTLS: NBDClientTLS?

    init(dir: URL, config: String, hamgr: String, port: Int) {
        self.dir = dir; self.config = config; self.hamgr = hamgr; self.port = port
    }

    static func hamgrBinary() throws -> String {
        if let p = ProcessInfo.processInfo.environment["HAMGR_BIN"] { return p }
        let me = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        let sibling = me.deletingLastPathComponent().appendingPathComponent("hamgr").path
        if FileManager.default.isExecutableFile(atPath: sibling) { return sibling }
        throw HactlError("cannot find the hamgr binary next to hactl; set HAMGR_BIN")
    }

    static func make() throws -> LocalCluster {
        let hamgr = try hamgrBinary()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-demo-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let port = 17000 + Int(getpid() % 500) * 4
        var rng = SystemRandomNumberGenerator()
        let key = dir.appendingPathComponent("demo.key").path
        FileManager.default.createFile(atPath: key, contents: Data((0..<48).map { _ in UInt8.random(in: 0...255, using: &rng) }),
                                       attributes: [.posixPermissions: 0o600])
        var toml = """
        [cluster]
        name = "demo"
        key_file = "\(key)"
        protocol = "C"

        [volume]
        size = "64MiB"
        chunk_size = "64KiB"
        create = true

        """
        for (n, ip) in [("a", "127.0.77.1"), ("b", "127.0.77.2")] {
            toml += """
            [[node]]
            name = "\(n)"
            replication_address = "\(ip):\(port)"
            service_address = "\(ip):\(port + 1)"
            status_address = "\(ip):\(port + 2)"
            backing = "\(dir.appendingPathComponent("\(n).img").path)"
            metadata = "\(dir.appendingPathComponent("\(n).meta").path)"

            """
        }
        toml += """
        [arbitrator]
        address = "127.0.77.3:\(port + 3)"
        status_address = "127.0.77.3:\(port + 2)"
        state_dir = "\(dir.appendingPathComponent("arbitrator").path)"

        [tls]
        ca_file = "\(dir.appendingPathComponent("tls/ca.crt").path)"
        cert_file = "\(dir.appendingPathComponent("tls/{name}.crt").path)"
        key_file = "\(dir.appendingPathComponent("tls/{name}.key").path)"

        """
        let config = dir.appendingPathComponent("demo.toml").path
        try toml.write(toFile: config, atomically: true, encoding: .utf8)
        return LocalCluster(dir: dir, config: config, hamgr: hamgr, port: port)
    }

    /// `hamgr certs --config` (output in certs.log), then load the CA for the clients.
    func makeCertificates() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: hamgr)
        p.arguments = ["certs", "--config", config]
        let logPath = dir.appendingPathComponent("certs.log").path
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        defer { try? fh.close() }
        p.standardOutput = fh
        p.standardError = fh
        p.standardInput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            let out = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            throw HactlError("hamgr certs failed (exit \(p.terminationStatus)):\n\(out)")
        }
        do {
            trust = try HTTPClient.TrustedCA(file: caFile, key: "tls.ca_file")
            nbdTLS = try NBDClientTLS(caFile: caFile, caOption: "tls.ca_file")
        } catch {
            throw HactlError("the demo's CA \(caFile): \(error)")
        }
    }

    var statusEndpoints: [String] { ["a", "b", "w"].map { "https://\(ips[$0]!):\(port + 2)" } }
    func serviceAddress(_ n: String) -> String { "\(ips[n]!):\(port + 1)" }
    func log(_ n: String) -> String { dir.appendingPathComponent("\(n).log").path }

    func start(_ n: String) throws {
        let args = n == "w" ? ["arbitrator", "--config", config, "--init"] : ["run", "--config", config, "--node", n]
        let p = Process()
        p.executableURL = URL(fileURLWithPath: hamgr)
        p.arguments = args
        if !FileManager.default.fileExists(atPath: log(n)) { FileManager.default.createFile(atPath: log(n), contents: nil) }
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: log(n)))
        fh.seekToEndOfFile()
        p.standardOutput = fh
        p.standardError = fh
        p.standardInput = FileHandle.nullDevice
        try p.run()
        pids[n] = p.processIdentifier
    }

    func kill(_ n: String) {
        guard let pid = pids.removeValue(forKey: n) else { return }
        Foundation.kill(pid, SIGKILL)
        var st: Int32 = 0
        waitpid(pid, &st, 0)
    }

    func status(_ n: String) -> StatusDocument? {
        guard let r = try? HTTPClient(endpoint: "https://\(ips[n]!):\(port + 2)", bearerToken: nil, timeout: .seconds(1), trust: trust).get("/status"),
              r.status == 200 else { return nil }
        return try? JSONDecoder().decode(StatusDocument.self, from: r.body)
    }

    func waitForMaster(within seconds: Double) -> String? {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if let m = ["a", "b"].first(where: { status($0)?.role == .primary }) { return m }
            usleep(100_000)
        }
        return nil
    }

    func waitInSync(_ master: String, within seconds: Double) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if status(master)?.peer.replication == .inSync { return true }
            usleep(100_000)
        }
        return false
    }

    /// Seconds from `since` until `n` acknowledged a probe write (in the last 4 KiB).
    func firstWrite(on n: String, within seconds: Double, since: Date) -> Double? {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if let hp = try? parseHostPort(serviceAddress(n)),
               let c = try? NBDClient(host: hp.host, port: hp.port, timeoutSeconds: 2, tls: nbdTLS) {
                defer { c.disconnect() }
                if (try? c.write(offset: UInt64(volumeBytes - 4096), bytes: [UInt8](repeating: 0xEE, count: 4096))) != nil {
                    return Date().timeIntervalSince(since)
                }
            }
            usleep(20_000)
        }
        return nil
    }

    func tail(_ n: String) -> String {
        let s = (try? String(contentsOfFile: log(n), encoding: .utf8)) ?? ""
        return s.split(separator: "\n").suffix(15).joined(separator: "\n")
    }

    func teardown(keepFiles: Bool) {
        for n in Array(pids.keys) { kill(n) }
        if !keepFiles { try? FileManager.default.removeItem(at: dir) } else { print("kept \(dir.path)") }
    }
}
