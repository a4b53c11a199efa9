// linkping — round trip of one frame between two processes, through the product's own peer
// transport: PeerListener / PeerDialer, hello with nonces, per-direction AES-256-GCM session
// keys, PeerConnection.send from the event loop, the frame callback on the receiver.
// One round trip on the replication link is what every protocol-C write pays at least.
//
//   linkping serve  --listen 127.0.0.1:7799 --key-file K
//   linkping client --connect 127.0.0.1:7799 --key-file K [--count 20000] [--payload 0] [--warmup 1000]
//   linkping cost                      # CPU of frame protection, in process (see costs())
//
// serve echoes every frame at once (same kind, epoch and payload) on the session it came from.
// client keeps exactly one frame outstanding: WARMUP round trips untimed, then COUNT timed, and
// prints one JSON line: {"payload":B,"count":N,"mean_us":..,"p50_us":..,"p99_us":..,"min_us":..}.
// It exits 1 if no session is established within 10 s or an echo takes more than 5 s.
import Crypto
import Dispatch
import Foundation
import HAShell
import NIOCore
import NIOPosix

setvbuf(stdout, nil, _IOLBF, 0)

func log(_ message: String) {
    FileHandle.standardError.write("linkping: \(message)\n".data(using: .utf8)!)
}

func die(_ message: String, code: Int32 = 1) -> Never {
    log(message)
    exit(code)
}

func arg(_ name: String, _ def: String? = nil) -> String {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: "--\(name)"), i + 1 < a.count { return a[i + 1] }
    guard let def else { die("--\(name) is required", code: 64) }
    return def
}

func intArg(_ name: String, _ def: Int, _ range: ClosedRange<Int>) -> Int {
    guard let v = Int(arg(name, String(def))), range.contains(v) else { die("--\(name) must be an integer in \(range)", code: 64) }
    return v
}

func address(_ name: String) -> (host: String, port: Int) {
    do { return try parseHostPort(arg(name), key: "--\(name)") } catch { die("\(error)", code: 64) }
}

// The product's own loader, so mode and length checks match the daemon's.
func loadKey() -> SymmetricKey {
    do { return try SymmetricKey.load(clusterKeyFile: arg("key-file")) } catch { die("\(error)") }
}

let cluster = "linkping"
let channelName = "ping"
let pingKind: UInt8 = 1  // kind 0 is the transport's keepalive, never handed to owners
let pingEpoch = Epoch(1)
// The product's default failure_timeout_ms: silence limit and keepalive pacing as in a real link.
// Under continuous ping-pong no keepalive is ever due, so none lands inside a measured round trip.
let idleTimeout = TimeAmount.milliseconds(800)
let establishBoundNs: UInt64 = 10_000_000_000
let echoBoundNs: UInt64 = 5_000_000_000

struct PingError: Error, CustomStringConvertible {
    var description: String
}

func serve() -> Never {
    let listen = address("listen")
    let key = loadKey()
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let me = PeerHello(cluster: cluster, node: NodeID("server"), channel: channelName)
    let echo = PeerSessionCallbacks(
        established: { c in log("session with \(c.remote.node) established") },
        frame: { c, f in c.send(kind: f.kind, epoch: f.epoch, payload: f.payload) },
        closed: { c, why in if c != nil { log("session closed: \(why)") } })
    let listener: PeerListener
    do {
        listener = try PeerListener.bind(
            host: listen.host, port: listen.port, group: group, idleTimeout: idleTimeout,
            keysForCluster: { $0 == cluster ? [key] : [] },
            refused: { log($0) },
            route: { $0.cluster == cluster && $0.channel == channelName ? (me, echo) : nil }).wait()
    } catch { die("cannot listen on \(listen.host):\(listen.port): \(error)") }
    // bench/link-ping.sh waits for this line before it starts a client.
    print("listening on \(listen.host):\(listener.localPort ?? listen.port)")
    try? listener.channel.closeFuture.wait()
    exit(0)
}

/// The client's whole state lives on its one event loop; `done` hands the samples to main.
final class Pinger: @unchecked Sendable {
    let loop: EventLoop
    let payload: ByteBuffer
    let warmup: Int
    let count: Int
    let done: EventLoopPromise<[UInt64]>
    var dialer: PeerDialer!
    var watchdog: RepeatedTask?
    var conn: PeerConnection?
    var rtts: [UInt64] = []
    var echoes = 0
    var sentAt: UInt64 = 0
    var startedAt: UInt64 = 0
    var lastProgress: UInt64 = 0
    var lastClose = "no connection accepted"
    var finished = false

    init(group: EventLoopGroup, host: String, port: Int, key: SymmetricKey, payloadBytes: Int, warmup: Int, count: Int) {
        loop = group.next()
        payload = ByteBuffer(repeating: 0xA5, count: payloadBytes)
        self.warmup = warmup
        self.count = count
        done = loop.makePromise()
        rtts.reserveCapacity(count)
        dialer = PeerDialer(
            group: loop, host: host, port: port,
            local: PeerHello(cluster: cluster, node: NodeID("client"), channel: channelName), key: key,
            idleTimeout: idleTimeout,
            callbacks: PeerSessionCallbacks(
                established: { [unowned self] c in self.established(c) },
                frame: { [unowned self] _, f in self.frame(f) },
                closed: { [unowned self] c, why in self.closed(c, why) }))
    }

    func run() -> EventLoopFuture<[UInt64]> {
        loop.execute {
            self.startedAt = DispatchTime.now().uptimeNanoseconds
            // Bounds are checked by a coarse timer rather than one timer per ping, which would
            // add its own scheduling to every measured round trip.
            self.watchdog = self.loop.scheduleRepeatedTask(initialDelay: .milliseconds(100), delay: .milliseconds(100)) { _ in
                self.check()
            }
            self.dialer.start()
        }
        return done.futureResult
    }

    func established(_ c: PeerConnection) {
        guard conn == nil, !finished else { return }
        conn = c
        lastProgress = DispatchTime.now().uptimeNanoseconds
        ping()
    }

    func ping() {
        sentAt = DispatchTime.now().uptimeNanoseconds
        conn!.send(kind: pingKind, epoch: pingEpoch, payload: payload)
    }

    func frame(_ f: Frame) {
        let now = DispatchTime.now().uptimeNanoseconds
        guard !finished else { return }
        guard f.kind == pingKind, f.payload.readableBytes == payload.readableBytes else {
            return finish(.failure(PingError(description: "unexpected echo: kind \(f.kind), \(f.payload.readableBytes) bytes")))
        }
        echoes += 1
        lastProgress = now
        if echoes > warmup { rtts.append(now - sentAt) }
        if echoes == warmup + count { finish(.success(rtts)) } else { ping() }
    }

    func closed(_ c: PeerConnection?, _ why: String) {
        if c != nil {
            finish(.failure(PingError(description: "session closed after \(echoes) round trips: \(why)")))
        } else {
            lastClose = why
        }
    }

    func check() {
        let now = DispatchTime.now().uptimeNanoseconds
        if conn == nil, now - startedAt > establishBoundNs {
            finish(.failure(PingError(description: "no session established within \(establishBoundNs / 1_000_000_000) s (last: \(lastClose))")))
        } else if conn != nil, now - lastProgress > echoBoundNs {
            finish(.failure(PingError(description: "no echo within \(echoBoundNs / 1_000_000_000) s after \(echoes) round trips")))
        }
    }

    func finish(_ result: Result<[UInt64], Error>) {
        guard !finished else { return }
        finished = true
        watchdog?.cancel()
        dialer.stop()
        done.completeWith(result)
    }
}

func client() -> Never {
    let target = address("connect")
    let key = loadKey()
    let count = intArg("count", 20000, 1...100_000_000)
    let payloadBytes = intArg("payload", 0, 0...Frame.maxPayloadBytes)
    let warmup = intArg("warmup", 1000, 0...100_000_000)
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let pinger = Pinger(group: group, host: target.host, port: target.port, key: key,
                        payloadBytes: payloadBytes, warmup: warmup, count: count)
    let rtts: [UInt64]
    do { rtts = try pinger.run().wait().sorted() } catch { die("\(error)") }
    // Nearest-rank percentiles, as bench/lib.sh's print_stats.
    func pct(_ p: Double) -> Double {
        Double(rtts[max(0, Int((p / 100 * Double(rtts.count)).rounded(.up)) - 1)]) / 1000
    }
    let mean = Double(rtts.reduce(0, +)) / Double(rtts.count) / 1000
    print(String(format: "{\"payload\":%d,\"count\":%d,\"mean_us\":%.2f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"min_us\":%.2f}",
                 payloadBytes, rtts.count, mean, pct(50), pct(99), Double(rtts[0]) / 1000))
    exit(0)
}

/// What protecting one frame costs on this CPU, in this process: sealing and opening a session
/// frame (`FrameSealer`, AES-256-GCM) against the HMAC-SHA256 of the same bytes (`FrameMAC`,
/// what frames used before), for 4 KiB and 1 MiB payloads. One JSON line per case.
func costs() -> Never {
    let key = SymmetricKey(size: .bits256)
    for size in [4096, 1 << 20] {
        let iterations = size == 4096 ? 100_000 : 1_000
        let payload = ByteBuffer(bytes: (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 131) })
        func report(_ name: String, _ nanos: UInt64) {
            let us = Double(nanos) / Double(iterations) / 1000
            print(String(format: "{\"case\":\"%@\",\"payload\":%d,\"us\":%.2f,\"GB_per_s\":%.2f}", name, size, us, Double(size) / us / 1000))
        }
        var tx = FrameSealer(key: key)
        var frames: [ByteBuffer] = []
        frames.reserveCapacity(iterations)
        var t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations {
            var out = ByteBuffer()
            tx.seal(kind: 1, epoch: Epoch(1), payload: payload, into: &out)
            if frames.count < 64 { frames.append(out) } else { frames[frames.count - 1] = out }
        }
        report("aes-256-gcm seal", DispatchTime.now().uptimeNanoseconds - t0)
        // Open the same frame again and again (a fresh opener per pass: sequences must match).
        var first = frames[0]
        guard let body = try? FrameBodyDecoder.nextBody(&first) else { die("cost: no frame") }
        t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations {
            var rx = FrameSealer(key: key)
            guard case .success(let f) = rx.open(body), f.payload.readableBytes == size else { die("cost: open failed") }
        }
        report("aes-256-gcm open", DispatchTime.now().uptimeNanoseconds - t0)
        let mac = FrameMAC(key: key)
        var sink: UInt8 = 0
        t0 = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<iterations { sink ^= payload.withUnsafeReadableBytes { mac.tag($0) }.withUnsafeBytes { $0[0] } }
        report("hmac-sha256 tag", DispatchTime.now().uptimeNanoseconds - t0)
        if sink == 42 { log("") }  // keep the tags observable
    }
    exit(0)
}

switch CommandLine.arguments.dropFirst().first {
case "serve": serve()
case "client": client()
case "cost": costs()
default: die("usage: linkping serve --listen HOST:PORT --key-file F\n"
             + "       linkping client --connect HOST:PORT --key-file F [--count N] [--payload BYTES] [--warmup W]\n"
             + "       linkping cost", code: 64)
}
