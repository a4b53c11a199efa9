import ArgumentParser
import Foundation
import HAShell
import ReplicationShell

/// `hactl drill`: a planned (switchover) or crash drill against a running cluster. It
/// writes a verifiable pattern through the master's export, fails over, and reports RTO
/// (first failed or stalled write to first acknowledged write on the new master), RPO
/// (acknowledged writes missing afterwards; must be 0) and the data check.
struct DrillCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drill",
        abstract: "Run a failover drill against a running cluster and report RTO, RPO and the data check.",
        discussion: """
        --mode switchover asks the master to hand over (planned). --mode crash runs \
        --kill-command (e.g. "ssh nodeA systemctl kill -s KILL hamgr@web1") to make the \
        master vanish. The drill writes into the volume: run it on a test volume or in \
        a maintenance window. Exit status 0 only if no acknowledged write was lost and \
        every block reads back as written.

        With --ca-file the drill's NBD connections run over TLS too (NBD_OPT_STARTTLS, the \
        server's certificate verified against the CA and the service address); an export \
        with export.client_ca_file also needs --nbd-client-cert and --nbd-client-key \
        (hamgr certs --client NAME --out DIR makes them). --nbd-plaintext connects to an \
        export with export.tls = "off" while status still runs over HTTPS.
        """)

    enum Mode: String, ExpressibleByArgument, CaseIterable, Codable { case switchover, crash }

    @ParentCommand var hactl: Hactl

    @Option(name: .long, help: "switchover (planned) or crash (run --kill-command).")
    var mode: Mode = .switchover

    @Option(name: .long, help: ArgumentHelp("Shell command that kills the master (crash mode).", valueName: "cmd"))
    var killCommand: String?

    @Option(name: .long, help: "How many distinct 4 KiB blocks the pattern writer cycles through.")
    var blocks: Int = 1024

    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    @Option(name: .long, help: ArgumentHelp("Client certificate (PEM) for an NBD export that requires one (needs --ca-file).", valueName: "file"))
    var nbdClientCert: String?

    @Option(name: .long, help: ArgumentHelp("The client certificate's private key (PEM, mode 0600).", valueName: "file"))
    var nbdClientKey: String?

    @Flag(name: .long, help: "Connect to the NBD export without TLS even with --ca-file (for export.tls = \"off\").")
    var nbdPlaintext = false

    func validate() throws {
        if mode == .crash && killCommand == nil { throw ValidationError("--mode crash needs --kill-command CMD") }
        if mode == .switchover && killCommand != nil { throw ValidationError("--kill-command applies only to --mode crash") }
        if blocks < 1 { throw ValidationError("--blocks must be at least 1") }
        if (nbdClientCert == nil) != (nbdClientKey == nil) { throw ValidationError("--nbd-client-cert and --nbd-client-key go together") }
        if nbdPlaintext && nbdClientCert != nil { throw ValidationError("--nbd-client-cert is for TLS; it cannot go with --nbd-plaintext") }
    }

    /// TLS for the drill's NBD connections: with a CA file, unless --nbd-plaintext.
    func nbdTLS() throws -> NBDClientTLS? {
        guard !nbdPlaintext, let ca = hactl.caFilePath else {
            if nbdClientCert != nil { throw HactlError("--nbd-client-cert needs --ca-file (the cluster CA) to verify the export with") }
            return nil
        }
        do {
            return try NBDClientTLS(caFile: ca, clientCertificateFile: nbdClientCert, clientKeyFile: nbdClientKey,
                                    caOption: "--ca-file", certOption: "--nbd-client-cert", keyOption: "--nbd-client-key")
        } catch let e as NBDClientError {
            throw HactlError("\(e)")
        } catch {
            throw HactlError("\(error)")
        }
    }

    func run() throws {
        try reporting(action: "drill", json: json) {
            let tls = try nbdTLS()
            let client = try hactl.client(needsToken: mode == .switchover)
            let report = try DrillRunner(client: client, plan: DrillPlan(mode: mode, killCommand: killCommand, blocks: blocks),
                                         nbdTLS: tls).run()
            print(json ? report.jsonText() : report.humanText(), terminator: "")
            if !report.passed { throw ExitCode(1) }
        }
    }
}

/// What the drill is asked to do.
struct DrillPlan: Codable, Equatable {
    var mode: DrillCommand.Mode
    var killCommand: String?
    var blocks: Int
}

/// The outcome of one drill: printed by `hactl drill`, parsed by scripts (`--json`).
struct DrillReport: Codable, Equatable {
    var cluster: String
    var mode: DrillCommand.Mode
    var oldMaster: String
    var newMaster: String?
    var newServiceAddress: String?
    var epochBefore: UInt64
    var epochAfter: UInt64?
    /// Time without an acknowledged write, in milliseconds (nil if service never returned).
    var rtoMs: Double?
    /// Acknowledged writes missing after the failover (RPO in writes; must be 0).
    var lostAcknowledgedWrites: Int
    var writesAcknowledged: Int
    var blocksChecked: Int
    var blocksMismatched: Int
    var notes: [String]

    var passed: Bool { newMaster != nil && rtoMs != nil && lostAcknowledgedWrites == 0 && blocksMismatched == 0 }

    enum CodingKeys: String, CodingKey {
        case cluster, mode, notes, passed
        case oldMaster = "old_master", newMaster = "new_master", newServiceAddress = "new_service_address"
        case epochBefore = "epoch_before", epochAfter = "epoch_after", rtoMs = "rto_ms"
        case lostAcknowledgedWrites = "lost_acknowledged_writes", writesAcknowledged = "writes_acknowledged"
        case blocksChecked = "blocks_checked", blocksMismatched = "blocks_mismatched"
    }

    init(cluster: String, mode: DrillCommand.Mode, oldMaster: String, newMaster: String?, newServiceAddress: String?,
         epochBefore: UInt64, epochAfter: UInt64?, rtoMs: Double?, lostAcknowledgedWrites: Int, writesAcknowledged: Int,
         blocksChecked: Int, blocksMismatched: Int, notes: [String] = []) {
        self.cluster = cluster; self.mode = mode; self.oldMaster = oldMaster; self.newMaster = newMaster
        self.newServiceAddress = newServiceAddress; self.epochBefore = epochBefore; self.epochAfter = epochAfter
        self.rtoMs = rtoMs; self.lostAcknowledgedWrites = lostAcknowledgedWrites; self.writesAcknowledged = writesAcknowledged
        self.blocksChecked = blocksChecked; self.blocksMismatched = blocksMismatched; self.notes = notes
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        cluster = try c.decode(String.self, forKey: .cluster)
        mode = try c.decode(DrillCommand.Mode.self, forKey: .mode)
        oldMaster = try c.decode(String.self, forKey: .oldMaster)
        newMaster = try c.decodeIfPresent(String.self, forKey: .newMaster)
        newServiceAddress = try c.decodeIfPresent(String.self, forKey: .newServiceAddress)
        epochBefore = try c.decode(UInt64.self, forKey: .epochBefore)
        epochAfter = try c.decodeIfPresent(UInt64.self, forKey: .epochAfter)
        rtoMs = try c.decodeIfPresent(Double.self, forKey: .rtoMs)
        lostAcknowledgedWrites = try c.decode(Int.self, forKey: .lostAcknowledgedWrites)
        writesAcknowledged = try c.decode(Int.self, forKey: .writesAcknowledged)
        blocksChecked = try c.decode(Int.self, forKey: .blocksChecked)
        blocksMismatched = try c.decode(Int.self, forKey: .blocksMismatched)
        notes = try c.decodeIfPresent([String].self, forKey: .notes) ?? []
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(cluster, forKey: .cluster)
        try c.encode(mode, forKey: .mode)
        try c.encode(oldMaster, forKey: .oldMaster)
        try c.encode(newMaster, forKey: .newMaster)
        try c.encode(newServiceAddress, forKey: .newServiceAddress)
        try c.encode(epochBefore, forKey: .epochBefore)
        try c.encode(epochAfter, forKey: .epochAfter)
        try c.encode(rtoMs, forKey: .rtoMs)
        try c.encode(lostAcknowledgedWrites, forKey: .lostAcknowledgedWrites)
        try c.encode(writesAcknowledged, forKey: .writesAcknowledged)
        try c.encode(blocksChecked, forKey: .blocksChecked)
        try c.encode(blocksMismatched, forKey: .blocksMismatched)
        try c.encode(notes, forKey: .notes)
        try c.encode(passed, forKey: .passed)
    }

    func jsonText() -> String {
        String(decoding: (try? JSONEncoder.hamgr.encode(self)) ?? Data("{}".utf8), as: UTF8.self) + "\n"
    }

    func humanText() -> String {
        var rows: [[String]] = []
        rows.append(["cluster", cluster])
        rows.append(["mode", mode.rawValue])
        rows.append(["master", "\(oldMaster) → \(newMaster ?? "none")" + (newServiceAddress.map { " at \($0)" } ?? "")])
        rows.append(["epoch", "\(epochBefore) → \(epochAfter.map(String.init) ?? "?")"])
        rows.append(["RTO", rtoMs.map { String(format: "%.0f ms", $0) } ?? "service did not return"])
        rows.append(["RPO", lostAcknowledgedWrites == 0 ? "0 (no acknowledged write lost)" : "\(lostAcknowledgedWrites) acknowledged write(s) LOST"])
        rows.append(["writes", "\(writesAcknowledged) acknowledged"])
        rows.append(["data check", blocksMismatched == 0 ? "\(blocksChecked) blocks OK" : "\(blocksMismatched) of \(blocksChecked) blocks MISMATCHED"])
        var out = "drill \(passed ? "PASSED" : "FAILED")\n"
        out += StatusTable.table(rows.map { ["  " + $0[0], $0[1]] })
        for n in notes { out += "  note: \(n)\n" }
        return out
    }
}

