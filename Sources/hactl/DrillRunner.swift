import Crypto
import Dispatch
import Foundation
import HAShell
import Replication
import ReplicationShell

/// Carries out a drill against the cluster behind `client`: a pattern writer through the
/// master's NBD export, the failover (switchover request or the operator's kill command),
/// then every block read back from the new master.
///
/// Each 4 KiB block written holds a self-describing record (drill id, block, sequence,
/// SHA-256 of the rest), so a read shows exactly which write it holds. RTO is the write
/// downtime: from the last write acknowledged by the old master to the first acknowledged
/// by the new one. A block whose last acknowledged write cannot be read back (neither that
/// record nor a later one that was in flight) is an acknowledged write lost.
struct DrillRunner {
    var client: ClusterClient
    var plan: DrillPlan
    /// TLS for the NBD connections (hactl --ca-file), or plaintext.
    var nbdTLS: NBDClientTLS? = nil
    var log: (String) -> Void = { _ in }

    static let blockBytes = 4096

    struct Attempt { var block: Int; var sequence: UInt64; var acknowledged: Bool }

    func run() throws -> DrillReport {
        let views = client.discover()
        // Remember every node found now: the endpoint given may be the master that dies.
        var client = self.client
        client.endpoints = Array(Set(client.endpoints + views.filter { $0.error == nil }.map(\.endpoint)))
        guard let masterView = views.first(where: { $0.document?.role == .primary }), let master = masterView.document else {
            throw HactlError("no master found at \(client.endpoints.joined(separator: ", ")); the drill needs a running cluster with a master")
        }
        let drillID = UInt64.random(in: 1...UInt64.max)
        var attempts: [Attempt] = []
        var notes: [String] = []
        var sequence: UInt64 = 0
        var lastAckOld: Date?
        var firstAckNew: Date?
        var newMaster: StatusDocument?
        let blocks = max(1, plan.blocks)
        let start = Date()

        // Phase 1: write through the current master for a moment.
        var conn: NBDClient?
        do {
            conn = try connect(master.serviceAddress)
        } catch let e as NBDClientError {
            var hint = ""
            if case .tlsRequired = e { hint = " (give hactl --ca-file FILE, the cluster CA, without --nbd-plaintext)" }
            if case .tls(let why) = e, why.contains("STARTTLS") { hint = " (for an export with export.tls = \"off\": --nbd-plaintext)" }
            throw HactlError("cannot connect to \(master.node)'s NBD export at \(master.serviceAddress): \(e)\(hint)")
        }
        log("writing a pattern through \(master.node) at \(master.serviceAddress)")
        while Date().timeIntervalSince(start) < 1.0 || attempts.filter(\.acknowledged).count < 50 {
            sequence += 1
            let ok = write(&conn, block: Int(sequence) % blocks, sequence: sequence, drill: drillID)
            attempts.append(Attempt(block: Int(sequence) % blocks, sequence: sequence, acknowledged: ok))
            if ok { lastAckOld = Date() } else { break }
            if Date().timeIntervalSince(start) > 10 { break }
        }

        // Phase 2: fail over while the writer keeps going.
        let trigger = DispatchGroup()
        var triggerError: String?
        trigger.enter()
        DispatchQueue.global().async {
            defer { trigger.leave() }
            do {
                switch plan.mode {
                case .switchover:
                    let (code, reply) = try client.admin(.switchover, at: masterView.endpoint)
                    if code != 200 { triggerError = "switchover refused (HTTP \(code)): \(reply.message)" }
                case .crash:
                    let p = Process()
                    p.executableURL = URL(fileURLWithPath: "/bin/sh")
                    p.arguments = ["-c", plan.killCommand ?? "false"]
                    try p.run()
                    p.waitUntilExit()
                    if p.terminationStatus != 0 { triggerError = "kill command exited \(p.terminationStatus)" }
                }
            } catch {
                triggerError = "\(error)"
            }
        }
        log(plan.mode == .switchover ? "asking \(master.node) to switch over" : "running the kill command")
        let failoverDeadline = Date().addingTimeInterval(30)
        var sawFailure = false
        while Date() < failoverDeadline {
            sequence += 1
            let block = Int(sequence) % blocks
            let ok = write(&conn, block: block, sequence: sequence, drill: drillID)
            attempts.append(Attempt(block: block, sequence: sequence, acknowledged: ok))
            if ok {
                if let nm = newMaster, nm.node != master.node { firstAckNew = firstAckNew ?? Date(); break }
                if !sawFailure { lastAckOld = Date() }
                continue
            }
            sawFailure = true
            // Find whoever is master now and write there.
            conn?.disconnect()
            conn = nil
            usleep(20_000)
            if let nm = client.discover().compactMap(\.document).first(where: { $0.role == .primary }) {
                newMaster = nm
                conn = try? connect(nm.serviceAddress)
            }
        }
        trigger.wait()
        if let e = triggerError { notes.append(e) }
        guard let nm = newMaster, nm.node != master.node, firstAckNew != nil else {
            conn?.disconnect()
            return DrillReport(cluster: master.cluster, mode: plan.mode, oldMaster: master.node, newMaster: newMaster?.node,
                               newServiceAddress: newMaster?.serviceAddress, epochBefore: master.epoch, epochAfter: newMaster?.epoch,
                               rtoMs: nil, lostAcknowledgedWrites: 0, writesAcknowledged: attempts.filter(\.acknowledged).count,
                               blocksChecked: 0, blocksMismatched: 0, notes: notes + ["no new master acknowledged a write within 30 s"])
        }
        log("\(nm.node) at \(nm.serviceAddress) acknowledges writes; reading every block back")

        // Phase 3: a few more writes on the new master, then the data check.
        for _ in 0..<50 {
            sequence += 1
            let block = Int(sequence) % blocks
            attempts.append(Attempt(block: block, sequence: sequence, acknowledged: write(&conn, block: block, sequence: sequence, drill: drillID)))
        }
        let (checked, lost) = try verify(attempts: attempts, blocks: blocks, drill: drillID, at: nm.serviceAddress)
        conn?.disconnect()
        let rto = (firstAckNew!.timeIntervalSince(lastAckOld ?? start)) * 1000
        return DrillReport(cluster: master.cluster, mode: plan.mode, oldMaster: master.node, newMaster: nm.node,
                           newServiceAddress: nm.serviceAddress, epochBefore: master.epoch, epochAfter: nm.epoch,
                           rtoMs: rto, lostAcknowledgedWrites: lost, writesAcknowledged: attempts.filter(\.acknowledged).count,
                           blocksChecked: checked, blocksMismatched: lost, notes: notes)
    }

    private func connect(_ serviceAddress: String) throws -> NBDClient {
        let hp = try parseHostPort(serviceAddress, key: "service_address")
        return try NBDClient(host: hp.host, port: hp.port, timeoutSeconds: 5, tls: nbdTLS)
    }

    /// One acknowledged-or-not write of block `block`'s record.
    private func write(_ conn: inout NBDClient?, block: Int, sequence: UInt64, drill: UInt64) -> Bool {
        guard let c = conn else { return false }
        do {
            try c.write(offset: UInt64(block * Self.blockBytes), bytes: Self.record(drill: drill, block: block, sequence: sequence))
            return true
        } catch {
            conn = nil
            c.disconnect()
            return false
        }
    }

    /// drill id · block · sequence · filler · SHA-256 of the preceding bytes.
    static func record(drill: UInt64, block: Int, sequence: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: blockBytes - 32)
        withUnsafeBytes(of: drill.bigEndian) { b.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: UInt64(block).bigEndian) { b.replaceSubrange(8..<16, with: $0) }
        withUnsafeBytes(of: sequence.bigEndian) { b.replaceSubrange(16..<24, with: $0) }
        for i in 24..<b.count { b[i] = UInt8(truncatingIfNeeded: Int(sequence) &* 31 &+ i) }
        return b + Array(SHA256.hash(data: b))
    }

    /// The sequence number a block holds, if it is an intact record of this drill.
    static func sequence(in bytes: [UInt8], drill: UInt64, block: Int) -> UInt64? {
        guard bytes.count == blockBytes else { return nil }
        let body = Array(bytes[0..<(blockBytes - 32)])
        guard Array(SHA256.hash(data: body)) == Array(bytes[(blockBytes - 32)...]) else { return nil }
        let d = body[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let blk = body[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        guard d == drill, blk == UInt64(block) else { return nil }
        return body[16..<24].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }

    /// Every block whose last acknowledged write is known must hold that write or a later
    /// attempt (acknowledged or in flight). Returns (blocks checked, acknowledged writes lost).
    private func verify(attempts: [Attempt], blocks: Int, drill: UInt64, at serviceAddress: String) throws -> (Int, Int) {
        var lastAck: [Int: UInt64] = [:]
        var acceptable: [Int: Set<UInt64>] = [:]
        for a in attempts {
            if a.acknowledged { lastAck[a.block] = a.sequence; acceptable[a.block] = [a.sequence] } else { acceptable[a.block, default: []].insert(a.sequence) }
        }
        let reader = try connect(serviceAddress)
        defer { reader.disconnect() }
        var lost = 0
        for (block, _) in lastAck {
            let bytes = try reader.read(offset: UInt64(block * Self.blockBytes), length: Self.blockBytes)
            let seq = Self.sequence(in: bytes, drill: drill, block: block)
            if seq == nil || !(acceptable[block] ?? []).contains(seq!) { lost += 1 }
        }
        return (lastAck.count, lost)
    }
}
