@preconcurrency import Crypto
import Foundation
import HACore
import Logging
import NIOCore
import NIOPosix
@testable import Replication
@testable import ReplicationShell
import HAShell
import XCTest

/// A temporary directory removed when the test ends.
func makeTempDir(_ test: XCTestCase, _ name: String = #function) throws -> String {
    let dir = NSTemporaryDirectory() + "hamgr-repl-\(name.filter { $0.isLetter || $0.isNumber })-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}

/// Collects log lines so tests can assert that something was logged.
final class LogCapture: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    let echo = ProcessInfo.processInfo.environment["HAMGR_TEST_LOGS"] != nil
    func append(_ s: String) {
        lock.lock(); lines.append(s); lock.unlock()
        if echo { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }
    }
    func contains(_ s: String) -> Bool { lock.lock(); defer { lock.unlock() }; return lines.contains { $0.contains(s) } }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}

struct CaptureLogHandler: LogHandler {
    let capture: LogCapture
    let label: String
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .debug
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        capture.append("[\(label)] \(level): \(message)")
    }
}

/// Two replicated volumes "a" (dials) and "b" (accepts through a PeerListener the test
/// owns, as the daemon does) on 127.0.0.1, with temp files.
final class VolumePair: @unchecked Sendable {
    let dir: String
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let logs = LogCapture()
    let key = SymmetricKey(data: [UInt8](repeating: 0x5A, count: 32))
    var listenerKey: SymmetricKey
    var listener: PeerListener!
    private let lock = NSLock()
    private var _b: ReplicatedVolume?
    var a: ReplicatedVolume?
    var b: ReplicatedVolume? {
        get { lock.lock(); defer { lock.unlock() }; return _b }
        set { lock.lock(); _b = newValue; lock.unlock() }
    }
    var proto: ReplicationProtocol
    var sizeBytes: UInt64 = 16 << 20
    var chunkBytes = 64 << 10
    var resyncRate = 256 << 20
    /// Stores keep unsynced writes in memory, so `simulatePowerCut()` loses them.
    var volatileCache = false
    var applyQueueBytes: Int?
    var linkSendBufferBytes: Int?
    /// Hot extents of 1 MiB in the activity log.
    var activityLogExtents = 8
    /// Where "a" dials its peer; nil: b's listener. A test sets it to put a relay in between.
    var dialPort: Int?
    var events = EventLog()

    final class EventLog: @unchecked Sendable {
        private let lock = NSLock()
        private var list: [(NodeID, ReplicationEvent)] = []
        func add(_ n: NodeID, _ e: ReplicationEvent) { lock.lock(); list.append((n, e)); lock.unlock() }
        var all: [(NodeID, ReplicationEvent)] { lock.lock(); defer { lock.unlock() }; return list }
    }

    /// `fresh`: leave both nodes without metadata (a new pair). Otherwise the pair is first
    /// brought up the way a new pair on two empty sparse files comes up by itself (both
    /// fresh, provably empty → up to date in one generation), then closed: tests start from
    /// two up-to-date nodes in the same generation, as after a completed initial sync.
    init(test: XCTestCase, proto: ReplicationProtocol = .c, listenerKey: SymmetricKey? = nil, fresh: Bool = false,
         name: String = #function) throws {
        dir = try makeTempDir(test, name)
        self.proto = proto
        self.listenerKey = listenerKey ?? key
        let lk = self.listenerKey
        listener = try PeerListener.bind(host: "127.0.0.1", port: 0, group: group, idleTimeout: .seconds(2),
                                         keysForCluster: { $0 == "test" ? [lk] : [] },
                                         refused: { [logs] why in logs.append("[listener] warning: \(why)") },
                                         route: { [weak self] hello in
                                             guard hello.channel == ReplicatedVolumeConfig.channel, hello.node == "a",
                                                   let b = self?.b else { return nil }
                                             return (PeerHello(cluster: "test", node: "b", channel: ReplicatedVolumeConfig.channel), b.inboundSession())
                                         }).wait()
        test.addTeardownBlock { [self] in self.shutdown() }
        if !fresh && listenerKey == nil { try pairUp() }
    }

    /// Opens both new nodes, waits until they agree they are up to date in one generation,
    /// and closes them again.
    func pairUp(file: StaticString = #filePath, line: UInt = #line) throws {
        let b = try open("b"), a = try open("a")
        waitUntil("the new pair to come up on its own", timeout: .seconds(10), file: file, line: line) {
            a.status.diskState == .upToDate && b.status.diskState == .upToDate
                && a.status.generations.current == b.status.generations.current
        }
        a.stop(); b.stop()
        self.a = nil; self.b = nil
    }

    func path(_ node: String, _ ext: String) -> String { "\(dir)/\(node).\(ext)" }

    func config(_ node: NodeID) -> ReplicatedVolumeConfig {
        let other: NodeID = node == "a" ? "b" : "a"
        var c = ReplicatedVolumeConfig(cluster: "test", me: node, peer: other,
                                       backingPath: path(node.name, "img"), metadataPath: path(node.name, "meta"),
                                       sizeBytes: sizeBytes, chunkBytes: chunkBytes, replicationProtocol: proto,
                                       peerReplicationAddress: (host: "127.0.0.1", port: node == "a" ? (dialPort ?? listener.localPort!) : 1),
                                       clusterKey: key, linkTimeout: .seconds(2), resyncRateBytesPerSecond: resyncRate)
        c.activityLogExtentBytes = 1 << 20
        c.activityLogExtents = activityLogExtents
        c.redialDelay = .milliseconds(50)
        c.createBacking = true
        c.volatileCacheForTests = volatileCache
        if let q = applyQueueBytes { c.applyQueueBytes = q }
        if let l = linkSendBufferBytes { c.linkSendBufferBytes = l }
        return c
    }

    @discardableResult
    func open(_ node: NodeID, start: Bool = true) throws -> ReplicatedVolume {
        var logger = Logger(label: node.name) { [logs] label in CaptureLogHandler(capture: logs, label: label) }
        logger.logLevel = .debug
        let v = try ReplicatedVolume(config: config(node), group: group, logger: logger, clock: { MonotonicClock.now() })
        let ev = events
        v.onEvent = { e in ev.add(node, e) }
        if node == "a" { a = v } else { b = v }
        if start { v.start() }
        return v
    }

    /// Opens both nodes, "a" primary in epoch 1 with an open gate, and waits until the link
    /// is in sync.
    func connectPrimary(timeout: Duration = .seconds(15), file: StaticString = #filePath, line: UInt = #line) throws {
        let b = try open("b")
        b.setPromisedEpoch(Epoch(1))
        let a = try open("a", start: false)
        try a.becomePrimary(epoch: Epoch(1), newGeneration: false)
        a.setWriteGate(VolumePair.openGate(Epoch(1)))
        a.start()
        waitUntil("link in sync", timeout: timeout, file: file, line: line) { a.status.peerState == .inSync && b.status.peerState == .inSync }
    }

    static func openGate(_ epoch: Epoch, peerRequired: Bool = true) -> WriteGate {
        WriteGate(epoch: epoch, validUntil: MonotonicClock.now() + .seconds(3600), peerRequired: peerRequired)
    }

    func shutdown() {
        a?.stop(); b?.stop()
        a = nil; b = nil
        try? listener.close().wait()
        try? group.syncShutdownGracefully()
    }

    func fileBytes(_ node: String) -> [UInt8] {
        // The volume's bytes: the store also carries this node's identity label past the end.
        Array(([UInt8](FileManager.default.contents(atPath: path(node, "img")) ?? Data())).prefix(Int(sizeBytes)))
    }
}

/// Polls `cond` every 10 ms for at most `timeout`.
func waitUntil(_ what: String, timeout: Duration = .seconds(15), file: StaticString = #filePath, line: UInt = #line, _ cond: () -> Bool) {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if cond() { return }
        usleep(10_000)
    }
    XCTFail("timed out waiting for \(what)", file: file, line: line)
}

/// A seeded random workload of writes, zeroes and trims through the BlockVolume API.
struct Workload {
    var rng: SplitMix64
    let sizeBytes: UInt64
    init(seed: UInt64, sizeBytes: UInt64) { rng = SplitMix64(seed: seed); self.sizeBytes = sizeBytes }

    mutating func submit(_ v: ReplicatedVolume, count: Int, on loop: EventLoop) -> [EventLoopFuture<Void>] {
        var out: [EventLoopFuture<Void>] = []
        for _ in 0..<count {
            let len = Int(1 + rng.next() % 256) * 512  // 512 B … 128 KiB
            let off = (rng.next() % ((sizeBytes - UInt64(len)) / 512)) * 512
            let kind = rng.next() % 20
            let fua = rng.next() % 10 == 0
            if kind == 0 {
                out.append(v.writeZeroes(offset: off, length: len, fua: fua, mayDeallocate: false, on: loop))
            } else if kind == 1 {
                out.append(v.trim(offset: off, length: len, fua: fua, on: loop))
            } else {
                var b = ByteBuffer()
                b.reserveCapacity(len)
                let seed = rng.next()
                var r = SplitMix64(seed: seed)
                for _ in 0..<(len / 8) { b.writeInteger(r.next()) }
                out.append(v.write(offset: off, data: b, fua: fua, on: loop))
            }
        }
        return out
    }
}

extension Array where Element == EventLoopFuture<Void> {
    /// Waits for every future; returns (succeeded, failed).
    func waitAll() -> (Int, Int) {
        var ok = 0, bad = 0
        for f in self { if (try? f.wait()) != nil { ok += 1 } else { bad += 1 } }
        return (ok, bad)
    }
}

func sha(_ b: [UInt8]) -> String { SHA256.hash(data: b).map { String(format: "%02x", $0) }.joined() }
