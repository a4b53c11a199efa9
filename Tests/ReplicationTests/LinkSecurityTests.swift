import Foundation
import HACore
import NIOCore
@testable import Replication
@testable import ReplicationShell
import HAShell
import XCTest

/// Issue 10, acceptance 1: what crosses the replication link. A relay between the master
/// ("a") and the backup ("b") records every byte both ways, as a capture would, and can
/// tamper with the master's frames: flip a bit, replay one, or slip in one from an earlier
/// session.
final class LinkSecurityTests: XCTestCase {
    static let mib = 1 << 20

    /// A pair whose link runs through a relay; a is primary in epoch 1.
    func relayedPair(name: String = #function) throws -> (VolumePair, FrameRelay) {
        let pair = try VolumePair(test: self, proto: .c, name: name)
        let relay = try FrameRelay(targetPort: pair.listener.localPort!)
        addTeardownBlock { relay.close() }
        pair.dialPort = relay.port
        try pair.connectPrimary()
        return (pair, relay)
    }

    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SplitMix64(seed: seed)
        var out = [UInt8]()
        out.reserveCapacity(count)
        while out.count < count { withUnsafeBytes(of: rng.next()) { out.append(contentsOf: $0) } }
        return Array(out.prefix(count))
    }

    func testCaptureOfAProtocolCSessionHoldsNoRunOfTheWrittenData() throws {
        let (pair, relay) = try relayedPair()
        let a = pair.a!
        let data = Self.pattern(Self.mib, seed: 0xC0FFEE)
        try a.write(offset: 0, data: ByteBuffer(bytes: data), fua: false, on: pair.group.next()).wait()
        // Protocol C: acknowledged means the backup has it, so it crossed the relay.
        XCTAssertEqual(Array(pair.fileBytes("b")[0..<Self.mib]), data, "the backup holds the written megabyte")
        let capture = relay.capture
        XCTAssertGreaterThan(capture.count, Self.mib, "the megabyte went through the relay")
        let finder = RunFinder(pattern: data, run: 64)
        // The detector finds the data where it is in plaintext: it can fail.
        XCTAssertNotNil(finder.firstRun(in: pair.fileBytes("b")), "control: the pattern is found on the backup's disk")
        var planted = Self.pattern(4096, seed: 1)
        planted.append(contentsOf: data[1000..<1064])
        XCTAssertNotNil(finder.firstRun(in: planted + Self.pattern(4096, seed: 2)), "control: a planted 64-byte run is found")
        XCTAssertNil(finder.firstRun(in: capture), "a 64-byte run of the written data crossed the link in plaintext")
    }

    func testFlippedBitIsRefusedAndLogged() throws {
        try refusal(.flipBit, expect: "frame authentication failed")
    }

    func testReplayedFrameIsRefusedAndLogged() throws {
        try refusal(.replay, expect: "replayed or reordered")
    }

    func testFrameFromAnEarlierSessionIsRefusedAndLogged() throws {
        try refusal(.fromEarlierSession, expect: "frame authentication failed")
    }

    /// Arms `tamper` on the next frame of a write, then checks the backup refused it and
    /// said why, the link came back, and both stores end equal with the intended bytes.
    func refusal(_ tamper: FrameRelay.Tamper, expect: String, name: String = #function) throws {
        let (pair, relay) = try relayedPair(name: name)
        let a = pair.a!, b = pair.b!
        let loop = pair.group.next()
        let first = Self.pattern(4096, seed: 10)
        try a.write(offset: 0, data: ByteBuffer(bytes: first), fua: false, on: loop).wait()
        if tamper == .fromEarlierSession {
            // More frames in the first session than the second will have sent when it is
            // tampered with, then end it so the next frames belong to a second one.
            for i in 1...30 {
                try a.write(offset: UInt64(i) * 4096 + 1 << 20, data: ByteBuffer(bytes: Self.pattern(4096, seed: UInt64(100 + i))), fua: false, on: loop).wait()
            }
            let established = b.status.linksEstablished
            relay.dropAll()
            waitUntil("a second session") { b.status.linksEstablished > established && a.status.peerState == .inSync }
            try a.write(offset: 4096, data: ByteBuffer(bytes: Self.pattern(4096, seed: 11)), fua: false, on: loop).wait()
        }
        relay.arm(tamper)
        let second = Self.pattern(4096, seed: 12)
        let write = a.write(offset: 65536, data: ByteBuffer(bytes: second), fua: false, on: loop)
        waitUntil("the relay to tamper with a frame") { relay.tampered }
        waitUntil("b to refuse it") { pair.logs.all.contains { $0.hasPrefix("[b] warning: replication link down: ") && $0.contains(expect) } }
        // The link comes back, and the write is acknowledged once the backup really has it.
        try write.wait()
        waitUntil("in sync again") { a.status.peerState == .inSync && b.status.peerState == .inSync && a.status.outOfSyncBytes == 0 }
        XCTAssertEqual(Array(pair.fileBytes("b")[65536..<65536 + 4096]), second, "the backup holds the intended bytes")
        XCTAssertTrue(pair.fileBytes("a") == pair.fileBytes("b"), "stores equal after the refused frame")
    }
}

extension LinkSecurityTests {
    /// Issue 13: a dialer's hello captured on the wire (valid MAC, old nonce) and replayed to
    /// the backup's listener on fresh connections — alone, and followed by the captured key
    /// confirmation — while the real link is live. Neither connection becomes a session: the
    /// live link is not replaced, writes keep being acknowledged, and the listener logs and
    /// closes both (the first at once, the second at the handshake timeout).
    func testReplayedHelloDoesNotReplaceTheLiveLink() throws {
        let (pair, relay) = try relayedPair()
        let a = pair.a!, b = pair.b!
        let loop = pair.group.next()
        try a.write(offset: 0, data: ByteBuffer(bytes: Self.pattern(4096, seed: 20)), fua: false, on: loop).wait()
        let captured = relay.dialerFrames(session: 0)
        XCTAssertGreaterThanOrEqual(captured.count, 2, "the relay saw the hello and at least one frame after it")
        let hello = try XCTUnwrap(captured.first), firstFrame = try XCTUnwrap(captured.dropFirst().first)
        let established = b.status.linksEstablished
        let port = try XCTUnwrap(pair.listener.localPort)

        let started = Date()
        let withConfirmation = try RawClient(port: port)
        defer { withConfirmation.close() }
        let helloOnly = try RawClient(port: port)
        defer { helloOnly.close() }
        XCTAssertTrue(withConfirmation.send(hello + firstFrame))
        XCTAssertTrue(helloOnly.send(hello))

        // Writes go on being acknowledged through the live link while both replays are open.
        var written: [(offset: Int, data: [UInt8])] = []
        var closedAfter: [String: TimeInterval] = [:]
        while closedAfter.count < 2, Date().timeIntervalSince(started) < 12 {
            let offset = (1 << 20) + written.count * 4096
            let data = Self.pattern(4096, seed: UInt64(offset))
            try a.write(offset: UInt64(offset), data: ByteBuffer(bytes: data), fua: false, on: loop).wait()
            written.append((offset, data))
            for (name, c) in [("withConfirmation", withConfirmation), ("helloOnly", helloOnly)] where closedAfter[name] == nil {
                if c.isClosedByPeer(waitingMilliseconds: 50) { closedAfter[name] = Date().timeIntervalSince(started) }
            }
        }
        let backup = pair.fileBytes("b")
        for w in written { XCTAssertEqual(Array(backup[w.offset..<w.offset + 4096]), w.data, "the backup holds the write at \(w.offset)") }
        XCTAssertGreaterThan(written.count, 10, "writes were acknowledged while the replays were open")
        XCTAssertLessThan(try XCTUnwrap(closedAfter["withConfirmation"], "replayed hello + confirmation left open"), 2,
                          "a confirmation that does not open closes the connection at once")
        XCTAssertLessThan(try XCTUnwrap(closedAfter["helloOnly"], "replayed hello left open"), 8,
                          "an unconfirmed hello is closed at the handshake timeout")
        let refusals = pair.logs.all.filter { $0.hasPrefix("[listener] warning: refused session from ") && $0.contains("hello replayed or key not confirmed") }
        XCTAssertEqual(refusals.count, 2, "\(pair.logs.all.filter { $0.contains("[listener]") })")
        XCTAssertFalse(pair.logs.contains("replaced by a new session"), "a replayed hello replaced the live session")
        XCTAssertFalse(pair.logs.contains("new replication session replaces the old one"))
        XCTAssertEqual(b.status.linksEstablished, established, "the replays never reached the volume as sessions")
        XCTAssertEqual(a.status.peerState, .inSync)
        XCTAssertEqual(relay.dialerFrames(session: 1).count, 0, "the real dialer never had to redial")
    }
}

/// A plain TCP client on 127.0.0.1, for bytes that no hamgr peer would send.
final class RawClient {
    let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = FrameRelay.loopback(port: UInt16(port))
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard ok == 0 else { Glibc.close(fd); throw POSIXError(.ECONNREFUSED) }
    }

    func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let r = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            guard r > 0 else { return false }
            sent += r
        }
        return true
    }

    /// Whether the other side has closed the connection, reading (and dropping) whatever it
    /// sent for at most `waitingMilliseconds`.
    func isClosedByPeer(waitingMilliseconds: Int32) -> Bool {
        let end = Date().addingTimeInterval(Double(waitingMilliseconds) / 1000)
        var buf = [UInt8](repeating: 0, count: 4096)
        repeat {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let left = max(0, Int32(end.timeIntervalSinceNow * 1000))
            guard poll(&p, 1, left) > 0 else { return false }
            let n = read(fd, &buf, buf.count)
            if n <= 0 { return true }
        } while Date() < end
        return false
    }

    /// The next length-prefixed frame (prefix included) of at most `maxBytes`, waiting at
    /// most `seconds`; nil if none arrived whole.
    func readFrame(seconds: Double, maxBytes: Int = 64 * 1024) -> [UInt8]? {
        let end = Date().addingTimeInterval(seconds)
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1)
        func want() -> Int {
            guard got.count >= 4 else { return 4 }
            return 4 + Int(UInt32(got[0]) << 24 | UInt32(got[1]) << 16 | UInt32(got[2]) << 8 | UInt32(got[3]))
        }
        while got.count < want(), got.count <= maxBytes {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let left = Int32(end.timeIntervalSinceNow * 1000)
            guard left > 0, poll(&p, 1, left) > 0, read(fd, &buf, 1) == 1 else { return nil }
            got.append(buf[0])
        }
        return got.count == want() ? got : nil
    }

    func close() { Glibc.close(fd) }
}

/// Finds a run of at least `run` bytes of `pattern` inside other bytes. Indexes the pattern's
/// 8-byte words at multiples of 8: any run of ≥ 15 bytes contains one of them.
struct RunFinder {
    let pattern: [UInt8]
    let run: Int
    private var words: [UInt64: Int] = [:]

    init(pattern: [UInt8], run: Int) {
        precondition(run >= 16)
        self.pattern = pattern; self.run = run
        for q in stride(from: 0, through: pattern.count - 8, by: 8) { words[Self.word(pattern, q)] = q }
    }

    static func word(_ b: [UInt8], _ i: Int) -> UInt64 {
        var w: UInt64 = 0
        for k in 0..<8 { w = w << 8 | UInt64(b[i + k]) }
        return w
    }

    /// The offset in `bytes` of a matching run, or nil.
    func firstRun(in bytes: [UInt8]) -> Int? {
        guard bytes.count >= 8 else { return nil }
        for i in 0...(bytes.count - 8) {
            guard let q = words[Self.word(bytes, i)] else { continue }
            var left = 0
            while left < min(i, q), bytes[i - left - 1] == pattern[q - left - 1] { left += 1 }
            var right = 8
            while i + right < bytes.count, q + right < pattern.count, bytes[i + right] == pattern[q + right] { right += 1 }
            if left + right >= run { return i - left }
        }
        return nil
    }
}

/// A TCP relay on 127.0.0.1 in front of `targetPort`. It passes the dialer's stream frame by
/// frame (the 4-byte length prefix of design.md §3) and the other direction as bytes,
/// recording both. `arm` tampers with the next session frame (not the hello) from the dialer.
final class FrameRelay: @unchecked Sendable {
    enum Tamper: Equatable {
        /// Flip one bit in the middle of the frame.
        case flipBit
        /// Send the frame, then the same bytes again.
        case replay
        /// Before the frame, send the frame of the previous session that had the same
        /// position (so the same sequence number, under the old session's key).
        case fromEarlierSession
    }

    let port: Int
    private let targetPort: Int
    private let listenFD: Int32
    private let lock = NSLock()
    private var stopped = false
    private var connectionFDs: [Int32] = []
    /// The dialer's frames (prefix included), per session.
    private var sessions: [[[UInt8]]] = []
    private var bytes: [UInt8] = []
    private var armed: Tamper?
    private var didTamper = false

    init(targetPort: Int) throws {
        self.targetPort = targetPort
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 16) == 0 else { Glibc.close(fd); throw POSIXError(.EADDRINUSE) }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        listenFD = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    var capture: [UInt8] { lock.lock(); defer { lock.unlock() }; return bytes }
    /// The frames the dialer sent in relayed connection `session` (length prefix included):
    /// [0] is its hello, [1] its key confirmation.
    func dialerFrames(session: Int) -> [[UInt8]] {
        lock.lock(); defer { lock.unlock() }
        return session < sessions.count ? sessions[session] : []
    }
    var tampered: Bool { lock.lock(); defer { lock.unlock() }; return didTamper }
    func arm(_ t: Tamper) { lock.lock(); armed = t; didTamper = false; lock.unlock() }

    /// Cut every connection (both sides see the link drop).
    func dropAll() {
        lock.lock(); let fds = connectionFDs; lock.unlock()
        for fd in fds { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    func close() {
        lock.lock(); stopped = true; lock.unlock()
        dropAll()
    }

    static func loopback(port: UInt16) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        return a
    }

    private func acceptLoop() {
        defer { Glibc.close(listenFD) }
        while true {
            lock.lock(); let done = stopped; lock.unlock()
            if done { return }
            var p = pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            let client = accept(listenFD, nil, nil)
            guard client >= 0 else { continue }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = Self.loopback(port: UInt16(targetPort))
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard ok == 0 else { Glibc.close(client); Glibc.close(server); continue }
            lock.lock()
            connectionFDs += [client, server]
            let session = sessions.count
            sessions.append([])
            lock.unlock()
            let pumps = Pumps()
            Thread.detachNewThread { [self] in pumpFrames(from: client, to: server, session: session); finish(client, server, pumps) }
            Thread.detachNewThread { [self] in pumpBytes(from: server, to: client); finish(server, client, pumps) }
        }
    }

    private func pumpFrames(from src: Int32, to dst: Int32, session: Int) {
        while let prefix = readExactly(src, 4) {
            let length = Int(UInt32(prefix[0]) << 24 | UInt32(prefix[1]) << 16 | UInt32(prefix[2]) << 8 | UInt32(prefix[3]))
            guard length <= Frame.maxBodyBytes, let body = readExactly(src, length) else { return }
            let frame = prefix + body
            lock.lock()
            let index = sessions[session].count
            sessions[session].append(frame)
            bytes.append(contentsOf: frame)
            var out = [frame]
            if index >= 1, let t = armed {
                switch t {
                case .flipBit:
                    var bad = frame
                    bad[4 + length / 2] ^= 0x10
                    out = [bad]
                case .replay:
                    out = [frame, frame]
                case .fromEarlierSession:
                    // Same position, so the same sequence number: only the key tells it apart.
                    if session >= 1, index < sessions[session - 1].count { out = [sessions[session - 1][index], frame] }
                }
                if out.count > 1 || out[0] != frame {
                    armed = nil
                    didTamper = true
                }
            }
            lock.unlock()
            for f in out { guard writeAll(dst, f) else { return } }
        }
    }

    private func pumpBytes(from src: Int32, to dst: Int32) {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(src, &buf, buf.count)
            guard n > 0 else { return }
            lock.lock(); bytes.append(contentsOf: buf[0..<n]); lock.unlock()
            guard writeAll(dst, Array(buf[0..<n])) else { return }
        }
    }

    /// The two pumps of one connection; the second to end closes its sockets.
    private final class Pumps { var running = 2 }

    private func finish(_ a: Int32, _ b: Int32, _ pumps: Pumps) {
        shutdown(a, Int32(SHUT_RDWR)); shutdown(b, Int32(SHUT_RDWR))
        lock.lock()
        pumps.running -= 1
        let last = pumps.running == 0
        if last { connectionFDs.removeAll { $0 == a || $0 == b } }
        lock.unlock()
        if last { Glibc.close(a); Glibc.close(b) }
    }

    private func readExactly(_ fd: Int32, _ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, n - got) }
            guard r > 0 else { return nil }
            got += r
        }
        return out
    }

    private func writeAll(_ fd: Int32, _ data: [UInt8]) -> Bool {
        var sent = 0
        while sent < data.count {
            let r = data.withUnsafeBytes { send(fd, $0.baseAddress! + sent, data.count - sent, Int32(MSG_NOSIGNAL)) }
            guard r > 0 else { return false }
            sent += r
        }
        return true
    }
}
