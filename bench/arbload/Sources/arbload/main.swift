// arbload — N simulated cluster masters against one hamgr arbitrator.
//
// Each simulated master ("node a" of cluster PREFIX-NNNNN) keeps one authenticated quorum
// session (HAShell.PeerDialer: hello with nonces, per-direction HMAC-SHA256 session keys,
// sequence numbers, keepalives after idle/2 of silence), first wins an election (VoteRequest at epoch 1,
// retried while the arbitrator refuses, e.g. during its restart quarantine), then sends
// Renew(epoch 1) every 1/RATE seconds and measures the round trip to the RenewReply.
//
// Prints "READY ..." once every cluster has won its election, then measures for WINDOW
// seconds and prints one "WINDOW ..." line of key=value figures, then exits.
//
//   arbload --arbitrator 127.0.0.1:7790 --key K --prefix c --clusters 1000 [--rate 1]
//           [--window 30] [--threads 2] [--idle-ms 800] [--ramp-s 10] [--ready-timeout-s 300] [--linger-s 3]
import Crypto
import Foundation
import HAShell
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Quorum

setvbuf(stdout, nil, _IOLBF, 0)

func arg(_ name: String, _ def: String? = nil) -> String {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: "--\(name)"), i + 1 < a.count { return a[i + 1] }
    guard let def else { FileHandle.standardError.write("arbload: --\(name) is required\n".data(using: .utf8)!); exit(64) }
    return def
}

let arbitrator = try parseHostPort(arg("arbitrator"))
let key = try SymmetricKey.load(clusterKeyFile: arg("key"))
let prefix = arg("prefix")
let clusters = Int(arg("clusters"))!
let rate = Double(arg("rate", "1"))!
let window = Double(arg("window", "30"))!
let threads = Int(arg("threads", "2"))!
let idleMs = Int64(arg("idle-ms", "800"))!
let rampS = Double(arg("ramp-s", "10"))!
let readyTimeout = Double(arg("ready-timeout-s", "300"))!
let linger = Double(arg("linger-s", "3"))!

let quorumKind: UInt8 = 1  // Sources/HamgrKit/QuorumChannels.swift: quorumMessageFrameKind
let epoch1 = Epoch(1)

struct Stats {
    var established = 0, disconnects = 0, elected = 0, voteRefusals = 0
    var renewsSent = 0, renewGranted = 0, renewRefused = 0
    var windowOpen = false
    var wSent = 0, wGranted = 0, wRefused = 0, wDisconnects = 0
    var wRTT: [Int64] = []
    var refusalReasons: [String: Int] = [:]
    var closeReasons: [String: Int] = [:]  // why sessions closed, digits stripped (ports, counts)
}
let stats = NIOLockedValueBox(Stats())

final class SimMaster: @unchecked Sendable {  // all state on `loop`
    let name: String
    let loop: EventLoop
    var dialer: PeerDialer!
    var conn: PeerConnection?
    var elected = false
    var round: UInt64 = 0
    var seq: UInt64 = 0
    var pending: [UInt64: Int64] = [:]  // renew seq → send time (ns)
    var renewTask: RepeatedTask?
    var sessions = 0  // established sessions so far (1 = never reconnected)
    var slowReplies = 0  // window replies slower than 500 ms

    init(index: Int, group: EventLoopGroup) {
        name = String(format: "%@-%05d", prefix, index)
        loop = group.next()
        let local = PeerHello(cluster: name, node: NodeID("a"), channel: "quorum")
        dialer = PeerDialer(
            group: loop, host: arbitrator.host, port: arbitrator.port, local: local, key: key,
            idleTimeout: .milliseconds(idleMs), retryDelay: .milliseconds(200),
            callbacks: PeerSessionCallbacks(
                established: { [weak self] c in self?.established(c) },
                frame: { [weak self] _, f in self?.frame(f) },
                closed: { [weak self] c, why in self?.closed(c, why) }))
    }

    func start() { dialer.start() }

    func send(_ m: QuorumMessage) {
        conn?.send(kind: quorumKind, epoch: epoch1, payload: ByteBuffer(bytes: m.encoded()))
    }

    func established(_ c: PeerConnection) {
        conn = c
        sessions += 1
        stats.withLockedValue { $0.established += 1 }
        if !elected { askVote() }
    }

    func askVote() {
        guard conn != nil, !elected else { return }
        round += 1
        send(.voteRequest(VoteRequest(epoch: epoch1, round: round, disk: .upToDate,
                                      generations: DataGenerations(current: GenerationID(0x1000 + UInt64(name.hashValue & 0xffff))))))
    }

    func frame(_ f: Frame) {
        guard f.kind == quorumKind, let stamped = try? QuorumMessage.decode(Array(f.payload.readableBytesView)) else { return }
        // The arbitrator stamps every reply with its state incarnation (arbitrator continuity).
        switch stamped.unstamped {
        case let .voteReply(_, r, _, refusal):
            guard r == round, !elected else { return }
            if let refusal {
                let why = "\(refusal)".split(separator: "(").first.map(String.init) ?? "?"
                stats.withLockedValue { $0.voteRefusals += 1; $0.refusalReasons[why, default: 0] += 1 }
                loop.scheduleTask(in: .milliseconds(300)) { self.askVote() }
            } else {
                elected = true
                stats.withLockedValue { $0.elected += 1 }
                let period = Int64(1_000_000_000 / rate)
                let phase = Int64.random(in: 0..<period)  // spread renewals evenly over the period
                renewTask = loop.scheduleRepeatedTask(initialDelay: .nanoseconds(phase), delay: .nanoseconds(period)) { [weak self] _ in
                    self?.renew()
                }
            }
        case let .renewReply(_, s, granted, _):
            guard let t0 = pending.removeValue(forKey: s) else { return }
            let rtt = DispatchTime.now().uptimeNanoseconds - UInt64(t0)
            if rtt > 500_000_000 { slowReplies += 1 }
            stats.withLockedValue {
                if granted { $0.renewGranted += 1 } else { $0.renewRefused += 1 }
                if $0.windowOpen {
                    if granted { $0.wGranted += 1 } else { $0.wRefused += 1 }
                    $0.wRTT.append(Int64(rtt))
                }
            }
        default:
            break
        }
    }

    func renew() {
        guard conn != nil else { return }
        seq += 1
        if pending.count > 16 { pending.removeAll() }  // replies lost with a dropped session
        pending[seq] = Int64(DispatchTime.now().uptimeNanoseconds)
        send(.renew(epoch: epoch1, seq: seq, generation: .none))
        stats.withLockedValue { $0.renewsSent += 1; if $0.windowOpen { $0.wSent += 1 } }
    }

    func closed(_ c: PeerConnection?, _ why: String) {
        if c != nil { conn = nil }
        let reason = String(why.map { $0.isNumber ? "#" : $0 })
        stats.withLockedValue { $0.disconnects += 1; $0.closeReasons[reason, default: 0] += 1; if $0.windowOpen { $0.wDisconnects += 1 } }
    }
}

func cpuSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
var sims: [SimMaster] = []
sims.reserveCapacity(clusters)
let t0 = Date()
let batches = max(1, Int(rampS * 10))
let perBatch = (clusters + batches - 1) / batches
for i in 0..<clusters {
    let s = SimMaster(index: i, group: group)
    sims.append(s)
    s.start()
    if (i + 1) % perBatch == 0 { usleep(100_000) }
}
var lastReport = Date()
while true {
    let s = stats.withLockedValue { $0 }
    if s.elected >= clusters { break }
    if Date().timeIntervalSince(t0) > readyTimeout {
        print("NOTREADY elected=\(s.elected) of \(clusters) established=\(s.established) disconnects=\(s.disconnects) vote_refusals=\(s.voteRefusals) \(s.refusalReasons)")
        exit(3)
    }
    if Date().timeIntervalSince(lastReport) > 5 {
        FileHandle.standardError.write("arbload: \(Int(Date().timeIntervalSince(t0))) s: established \(s.established), elected \(s.elected)/\(clusters), vote refusals \(s.voteRefusals) \(s.refusalReasons), disconnects \(s.disconnects) \(s.closeReasons)\n".data(using: .utf8)!)
        lastReport = Date()
    }
    usleep(50_000)
}
let s0 = stats.withLockedValue { $0 }
print(String(format: "READY clusters=%d elected=%d after_s=%.1f established=%d disconnects=%d vote_refusals=%d", clusters, s0.elected,
             Date().timeIntervalSince(t0), s0.established, s0.disconnects, s0.voteRefusals) + " reasons=\(s0.refusalReasons)")
// Let every renewal timer start (phases are spread over one period) before measuring.
usleep(UInt32(min(5.0, 1.5 / rate) * 1_000_000))
let cpu0 = cpuSeconds()
let w0 = Date()
stats.withLockedValue { $0.windowOpen = true }
print("WINDOW_START")
usleep(UInt32(window * 1_000_000))
stats.withLockedValue { $0.windowOpen = false }
let elapsed = Date().timeIntervalSince(w0)
let cpu1 = cpuSeconds()
let w = stats.withLockedValue { $0 }
let rtt = w.wRTT.sorted()
func pct(_ p: Double) -> Double {
    guard !rtt.isEmpty else { return .nan }
    let k = max(0, Int((p / 100 * Double(rtt.count)).rounded(.up)) - 1)
    return Double(rtt[k]) / 1e6
}
print(String(format: "WINDOW seconds=%.1f renews_sent=%d replies_granted=%d replies_refused=%d disconnects=%d rate_per_s=%.0f rtt_ms_p50=%.3f rtt_ms_p90=%.3f rtt_ms_p99=%.3f rtt_ms_max=%.3f loadgen_cpu_cores=%.3f",
             elapsed, w.wSent, w.wGranted, w.wRefused, w.wDisconnects, Double(w.wGranted + w.wRefused) / elapsed,
             pct(50), pct(90), pct(99), rtt.last.map { Double($0) / 1e6 } ?? .nan, (cpu1 - cpu0) / elapsed))
// Who the slow replies (> 500 ms) went to: a few sessions every time, or spread (stalls)?
let perSim = sims.map { s in s.loop.submit { (s.slowReplies, s.sessions) } }.compactMap { try? $0.wait() }
let slowSims = perSim.filter { $0.0 > 0 }
print("SLOW_REPLIES total=\(slowSims.reduce(0) { $0 + $1.0 }) sessions=\(slowSims.count) of_them_reconnected=\(slowSims.filter { $0.1 > 1 }.count) reconnected_overall=\(perSim.filter { $0.1 > 1 }.count)")
if !w.closeReasons.isEmpty { print("CLOSE_REASONS \(w.closeReasons)") }
// Keep renewing a little longer: bench/arbitrator.sh's own window (arbitrator CPU, decision
// histogram) starts a moment after ours and must not see the sessions closing.
usleep(UInt32(linger * 1_000_000))
exit(0)
