import Foundation
import NIOConcurrencyHelpers
import NIOCore
import XCTest
@testable import Replication
@testable import ReplicationShell

/// Issue 13: a client that sends requests without reading replies holds at most the
/// connection's in-flight budget (docs/nbd.md, "Memory bound"); the server stops reading
/// from it, serves everyone else, and answers every request once the client reads.
final class NBDMemoryBoundTests: XCTestCase {
    static let mib = 1 << 20
    static let budget = NBDInFlightBudget.Limits(maxRequests: 64, maxBytes: 8 << 20)

    /// The content of MiB `i` in these tests.
    static func block(_ i: Int) -> [UInt8] { (0..<mib).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9 &+ i &* 7) } }

    // MARK: pure rules

    func testBudgetAdmitsWithinLimitsOrAlone() {
        var b = NBDInFlightBudget(limits: .init(maxRequests: 3, maxBytes: 4 * Self.mib))
        XCTAssertTrue(b.admits(cost: 32 * Self.mib), "a request over the byte limit is admitted alone")
        b.admit(cost: 3 * Self.mib)
        XCTAssertFalse(b.admits(cost: 2 * Self.mib))
        XCTAssertTrue(b.admits(cost: Self.mib))
        b.admit(cost: Self.mib)
        XCTAssertTrue(b.admits(cost: 0))
        b.admit(cost: 0)
        XCTAssertFalse(b.admits(cost: 0), "three requests are the limit")
        XCTAssertFalse(b.mayResumeReading)
        b.release(count: 2, cost: 3 * Self.mib)
        XCTAssertEqual(b.requests, 1)
        XCTAssertEqual(b.bytes, Self.mib)
        XCTAssertTrue(b.mayResumeReading)
        b.release(count: 1, cost: Self.mib)
        XCTAssertTrue(b.admits(cost: 32 * Self.mib))
    }

    func testCostIsTheReadOrWritePayload() {
        func cost(_ type: UInt16, _ length: UInt32) -> Int {
            NBDInFlightBudget.cost(of: NBDRequestHeader(flags: [], type: type, cookie: 1, offset: 0, length: length), maximumPayloadBytes: 32 << 20)
        }
        XCTAssertEqual(cost(NBDCommand.write, 4096), 4096)
        XCTAssertEqual(cost(NBDCommand.read, 1 << 20), 1 << 20)
        XCTAssertEqual(cost(NBDCommand.trim, 1 << 30), 0, "a trim carries no payload either way")
        XCTAssertEqual(cost(NBDCommand.writeZeroes, 1 << 30), 0)
        XCTAssertEqual(cost(NBDCommand.flush, 0), 0)
        XCTAssertEqual(cost(NBDCommand.write, (32 << 20) + 1), 0, "an oversized write's payload is skipped, not kept")
        XCTAssertEqual(cost(NBDCommand.read, (32 << 20) + 1), 0, "an oversized read is refused with a header")
    }

    // MARK: a non-reading writer

    func testNonReadingWriterIsStoppedAtTheBudgetAndAnsweredLater() throws {
        let count = 160  // 160 MiB: more than the budget plus both sockets' buffers (tcp_rmem max 32 MiB)
        let gate = GatedWriteVolume()
        let export = try TestExport(size: UInt64(count * Self.mib), inFlightLimits: Self.budget, serve: { gate.wrap($0) })
        defer { export.stop() }
        let s = try RawNBDSocket(port: export.port, timeoutSeconds: 10)
        XCTAssertNotNil(s.go(name: "test"))

        // The writes go out from another thread: its send blocks once the server stops reading.
        let sent = SendProgress()
        let fd = s.fd
        let sender = Thread {
            for i in 0..<count {
                var wire = ByteBuffer()
                NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: UInt64(i), offset: UInt64(i * Self.mib), length: UInt32(Self.mib)).write(into: &wire)
                wire.writeBytes(Self.block(i))
                guard SendProgress.sendAll(fd, wire) else { break }
                sent.add(1)
            }
            sent.finish()
        }
        sender.start()
        XCTAssertTrue(sent.waitUntilStalled(quietSeconds: 1, limitSeconds: 60), "the writer never stalled")
        XCTAssertLessThan(sent.requests, count, "the server read every write although no reply was read")

        let stalled = export.server.statistics
        XCTAssertGreaterThan(stalled.inFlightBytes, 0)
        XCTAssertLessThanOrEqual(stalled.inFlightBytes, Self.budget.maxBytes)
        XCTAssertLessThanOrEqual(stalled.inFlightBytesPeak, Self.budget.maxBytes)
        XCTAssertLessThanOrEqual(stalled.inFlightRequests, Self.budget.maxRequests)

        // Another client is served meanwhile (a read: writes wait at the gate).
        let other = try NBDClient(host: "127.0.0.1", port: export.port, exportName: "test", timeoutSeconds: 5)
        XCTAssertEqual(try other.read(offset: 0, length: 512).count, 512)
        other.disconnect()

        // The writes complete; the client reads: every reply arrives, and the data landed.
        gate.open()
        var cookies = Set<UInt64>()
        for _ in 0..<count {
            let r = try XCTUnwrap(s.receiveSimpleReply(), "reply \(cookies.count + 1) of \(count) missing")
            XCTAssertEqual(r.error, 0)
            cookies.insert(r.cookie)
        }
        XCTAssertEqual(cookies, Set(0..<UInt64(count)))
        XCTAssertTrue(sent.waitUntilFinished(limitSeconds: 30))
        for i in [0, 77, count - 1] {
            s.sendRequest(NBDCommand.read, cookie: 1000, offset: UInt64(i * Self.mib), length: UInt32(Self.mib))
            XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
            XCTAssertTrue(s.receive(Self.mib) == Self.block(i), "MiB \(i) read back differs")
        }
        XCTAssertTrue(TestExport.eventually { export.server.statistics.inFlightRequests == 0 && export.server.statistics.inFlightBytes == 0 },
                      "in flight after all replies: \(export.server.statistics.inFlightRequests) requests")
        // The peak is server-wide: this connection's budget plus the other client's 512 bytes.
        XCTAssertLessThanOrEqual(export.server.statistics.inFlightBytesPeak, Self.budget.maxBytes + 512)
    }

    // MARK: a non-reading reader

    func testNonReadingReaderIsStoppedAtTheBudgetAndGetsEveryReply() throws {
        let count = 64
        let export = try TestExport(size: UInt64(count * Self.mib), inFlightLimits: Self.budget)
        defer { export.stop() }
        let file = try XCTUnwrap(FileHandle(forWritingAtPath: export.backingPath))
        for i in 0..<count { file.write(Data(Self.block(i))) }
        try file.synchronize()
        try file.close()

        let s = try RawNBDSocket(port: export.port, timeoutSeconds: 10)
        s.setReceiveBuffer(bytes: 256 << 10)  // no autotuned 32 MiB of replies in the client's kernel
        XCTAssertNotNil(s.go(name: "test"))
        var wire = ByteBuffer()
        for i in 0..<count {
            NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: UInt64(i), offset: UInt64(i * Self.mib), length: UInt32(Self.mib)).write(into: &wire)
        }
        s.send(wire)  // 64 reads, 64 MiB of replies, none read yet

        var served = UInt64(0)
        XCTAssertTrue(Self.waitUntilSteady(limitSeconds: 60) { export.server.statistics.count("read") }, "reads never stopped being served")
        served = export.server.statistics.count("read")
        XCTAssertLessThan(served, UInt64(count), "every read was served although no reply was read")
        let stalled = export.server.statistics
        XCTAssertGreaterThan(stalled.inFlightBytes, 0)
        XCTAssertLessThanOrEqual(stalled.inFlightBytes, Self.budget.maxBytes)
        XCTAssertLessThanOrEqual(stalled.inFlightBytesPeak, Self.budget.maxBytes)

        let other = try NBDClient(host: "127.0.0.1", port: export.port, exportName: "test", timeoutSeconds: 5)
        XCTAssertTrue(try other.read(offset: 5 * UInt64(Self.mib), length: 4096) == Array(Self.block(5)[0..<4096]))
        other.disconnect()

        for _ in 0..<count {
            let r = try XCTUnwrap(s.receiveSimpleReply())
            XCTAssertEqual(r.error, 0)
            XCTAssertTrue(s.receive(Self.mib) == Self.block(Int(r.cookie)), "read \(r.cookie) returned other data")
        }
        XCTAssertTrue(TestExport.eventually { export.server.statistics.inFlightBytes == 0 && export.server.statistics.inFlightRequests == 0 })
        XCTAssertEqual(export.server.statistics.count("read"), UInt64(count + 1), "the client's reads and the other client's one")
    }

    /// `export.max_connections`: the per-connection budget times this is the export's bound.
    /// One connection over it is closed before the greeting and logged; a slot freed by a
    /// client that left is taken by the next one (nbdinfo, a real client).
    func testConnectionsOverTheLimitAreClosedBeforeTheGreeting() throws {
        let log = EventLog()
        let limits = NBDInFlightBudget.Limits(maxRequests: 8, maxBytes: Self.mib, maxConnections: 2)
        let export = try TestExport(size: 1 << 20, logger: log.logger(), inFlightLimits: limits)
        defer { export.stop() }
        var held = [try RawNBDSocket(port: export.port), try RawNBDSocket(port: export.port)]
        for s in held { XCTAssertNotNil(s.greet(), "within the limit") }
        XCTAssertEqual(try RawNBDSocket(port: export.port).receiveUntilClosed(), [], "the third is closed with no byte sent")
        XCTAssertTrue(TestExport.eventually { log.entries(event: "nbd_connection_limit").count == 1 }, "\(log.all)")
        if ProcessRunner.which("nbdinfo") != nil {
            XCTAssertNotEqual(try ProcessRunner.run("nbdinfo", ["--size", export.uri], timeout: 30).exitCode, 0, "a real client is refused too")
        }
        held.removeLast()  // closes it: its slot frees once the server sees the close
        XCTAssertTrue(TestExport.eventually { export.server.statistics.connectionsOpen == 1 })
        if ProcessRunner.which("nbdinfo") != nil {
            let r = try ProcessRunner.run("nbdinfo", ["--size", export.uri], timeout: 30)
            XCTAssertEqual(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "\(1 << 20)", r.stderr)
        } else {
            XCTAssertNotNil(try RawNBDSocket(port: export.port).greet(), "the freed slot is taken")
        }
        XCTAssertNotNil(held.first)
    }

    /// A request larger than the whole budget is still served, by itself.
    func testRequestLargerThanTheBudgetIsServedAlone() throws {
        let limits = NBDInFlightBudget.Limits(maxRequests: 8, maxBytes: Self.mib)
        let export = try TestExport(size: 32 << 20, inFlightLimits: limits)
        defer { export.stop() }
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test"))
        let big = 4 * Self.mib
        var wire = ByteBuffer()
        for i in 0..<3 {
            NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: UInt64(i), offset: UInt64(i * big), length: UInt32(big)).write(into: &wire)
            for m in 0..<4 { wire.writeBytes(Self.block(i * 4 + m)) }
        }
        for i in 0..<3 {
            NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: UInt64(10 + i), offset: UInt64(i * big), length: UInt32(big)).write(into: &wire)
        }
        s.send(wire)
        var written = Set<UInt64>()
        var reads: [UInt64: [UInt8]] = [:]
        for _ in 0..<6 {
            let r = try XCTUnwrap(s.receiveSimpleReply())
            XCTAssertEqual(r.error, 0)
            if r.cookie < 10 {
                written.insert(r.cookie)
            } else {
                reads[r.cookie] = try XCTUnwrap(s.receive(big))
            }
        }
        XCTAssertEqual(written, [0, 1, 2])
        for i in 0..<3 {
            let expected = (0..<4).flatMap { Self.block(i * 4 + $0) }
            XCTAssertTrue(reads[UInt64(10 + i)] == expected, "read \(i) differs")
        }
        XCTAssertLessThanOrEqual(export.server.statistics.inFlightBytesPeak, big, "more than one request over the budget was in flight")
    }

    // MARK: the process

    /// `hamgr export` under a client that pipelines 1 MiB reads and reads nothing: the
    /// process's RSS grows by less than the budget plus 64 MiB (allocator slack, buffers),
    /// where the 200 MiB of replies would otherwise sit in its memory.
    func testExportProcessRSSStaysBoundedUnderANonReadingReader() throws {
        let binary = try XCTUnwrap(Self.hamgrBinary(), "the hamgr executable is not built beside the tests")
        let dir = NSTemporaryDirectory() + "nbdmem-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let count = 200
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["export", "--backing", dir + "/backing.img", "--size", "\(count)MiB", "--listen", "127.0.0.1:0",
                       "--max-in-flight-bytes", "8MiB", "--event-loops", "1", "--io-threads", "2"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer {
            if p.isRunning { p.terminate() }
            p.waitUntilExit()
        }
        let line = try XCTUnwrap(Self.readLine(out.fileHandleForReading, limitSeconds: 30), "hamgr export printed nothing")
        let after = try XCTUnwrap(line.range(of: " on 127.0.0.1:"), line).upperBound
        let port = try XCTUnwrap(Int(line[after...].prefix { $0.isNumber }), line)

        // Baseline after one ordinary client.
        let warm = try NBDClient(host: "127.0.0.1", port: port, exportName: "hamgr", timeoutSeconds: 5)
        _ = try warm.read(offset: 0, length: Self.mib)
        warm.disconnect()
        let baseline = try XCTUnwrap(Self.rssBytes(pid: p.processIdentifier))

        let s = try RawNBDSocket(port: port, timeoutSeconds: 10)
        s.setReceiveBuffer(bytes: 256 << 10)
        XCTAssertNotNil(s.go(name: "hamgr"))
        var wire = ByteBuffer()
        for i in 0..<count {
            NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: UInt64(i), offset: UInt64(i * Self.mib), length: UInt32(Self.mib)).write(into: &wire)
        }
        s.send(wire)
        var peak = baseline
        XCTAssertTrue(Self.waitUntilSteady(limitSeconds: 60) { () -> Int in
            let rss = Self.rssBytes(pid: p.processIdentifier) ?? 0
            peak = max(peak, rss)
            return rss >> 20
        })
        let bound = 8 * Self.mib + 64 * Self.mib
        print("hamgr export VmRSS: \(baseline >> 20) MiB before, \(peak >> 20) MiB at most under \(count) unread 1 MiB reads (bound: +\(bound >> 20) MiB)")
        XCTAssertLessThan(peak - baseline, bound, "RSS grew by \((peak - baseline) >> 20) MiB (baseline \(baseline >> 20) MiB)")

        // Every reply still arrives.
        for _ in 0..<count {
            let r = try XCTUnwrap(s.receiveSimpleReply())
            XCTAssertEqual(r.error, 0)
            XCTAssertNotNil(s.receive(Self.mib))
        }
    }

    // MARK: helpers

    /// Polls `value` every 100 ms until it has not changed for a second; false if it kept
    /// changing for `limitSeconds`.
    static func waitUntilSteady<T: Equatable>(limitSeconds: Double, _ value: () -> T) -> Bool {
        let deadline = Date().addingTimeInterval(limitSeconds)
        var last = value()
        var since = Date()
        while Date() < deadline {
            usleep(100_000)
            let now = value()
            if now != last {
                last = now
                since = Date()
            } else if Date().timeIntervalSince(since) >= 1 {
                return true
            }
        }
        return false
    }

    /// The hamgr executable beside the test bundle (.build/<triple>/debug/), or $HAMGR_BIN.
    static func hamgrBinary() -> String? {
        if let p = ProcessInfo.processInfo.environment["HAMGR_BIN"] { return p }
        var u = Bundle.main.bundleURL
        for _ in 0..<4 {
            let candidate = u.appendingPathComponent("hamgr").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            u = u.deletingLastPathComponent()
        }
        return nil
    }

    static func rssBytes(pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") else { return nil }
        return kib * 1024
    }

    static func readLine(_ handle: FileHandle, limitSeconds: Int) -> String? {
        var pfd = pollfd(fd: handle.fileDescriptor, events: Int16(POLLIN), revents: 0)
        var bytes: [UInt8] = []
        let deadline = Date().addingTimeInterval(Double(limitSeconds))
        while Date() < deadline {
            guard poll(&pfd, 1, 200) > 0 else { continue }
            var b: UInt8 = 0
            guard read(handle.fileDescriptor, &b, 1) == 1 else { return nil }
            if b == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(b)
        }
        return nil
    }
}

/// Counts what a sender thread got onto the socket.
final class SendProgress: @unchecked Sendable {
    private let lock = NIOLock()
    private var sent = 0
    private var done = false

    var requests: Int { lock.withLock { sent } }
    func add(_ n: Int) { lock.withLockVoid { sent += n } }
    func finish() { lock.withLockVoid { done = true } }

    /// True once the count has not moved for `quietSeconds` while the sender is not done.
    func waitUntilStalled(quietSeconds: Double, limitSeconds: Double) -> Bool {
        NBDMemoryBoundTests.waitUntilSteady(limitSeconds: limitSeconds) { requests } && !lock.withLock { done }
    }

    func waitUntilFinished(limitSeconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(limitSeconds)
        while Date() < deadline {
            if lock.withLock({ done }) { return true }
            usleep(20_000)
        }
        return false
    }

    /// A blocking send of the whole buffer; false if the socket failed.
    static func sendAll(_ fd: Int32, _ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n <= 0 { return false }
                done += n
            }
            return true
        }
    }
}

/// A LocalVolume whose write acknowledgements wait until `open()`: a volume slower than
/// the client (a slow backup, a stalled disk).
final class GatedWriteVolume: @unchecked Sendable {
    private let lock = NIOLock()
    private var isOpen = false
    private var held: [(EventLoopPromise<Void>, EventLoopFuture<Void>)] = []

    func wrap(_ base: LocalVolume) -> BlockVolume { Gated(base: base, gate: self) }

    func open() {
        let released: [(EventLoopPromise<Void>, EventLoopFuture<Void>)] = lock.withLock {
            isOpen = true
            defer { held = [] }
            return held
        }
        for (promise, future) in released { future.cascade(to: promise) }
    }

    fileprivate func pass(_ future: EventLoopFuture<Void>, on loop: EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        let passNow = lock.withLock { () -> Bool in
            if isOpen { return true }
            held.append((promise, future))
            return false
        }
        if passNow { future.cascade(to: promise) }
        return promise.futureResult
    }

    private final class Gated: BlockVolume, @unchecked Sendable {
        let base: LocalVolume
        let gate: GatedWriteVolume
        init(base: LocalVolume, gate: GatedWriteVolume) { self.base = base; self.gate = gate }
        var sizeBytes: UInt64 { base.sizeBytes }
        var capabilities: VolumeCapabilities { base.capabilities }
        func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> { base.read(offset: offset, length: length, on: loop) }
        func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
            gate.pass(base.write(offset: offset, data: data, fua: fua, on: loop), on: loop)
        }
        func flush(on loop: EventLoop) -> EventLoopFuture<Void> { base.flush(on: loop) }
        func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { base.trim(offset: offset, length: length, fua: fua, on: loop) }
        func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
            base.writeZeroes(offset: offset, length: length, fua: fua, mayDeallocate: mayDeallocate, on: loop)
        }
    }
}
