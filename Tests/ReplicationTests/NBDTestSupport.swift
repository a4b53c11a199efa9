import Foundation
import Logging
import NIOCore
import NIOPosix
import XCTest
@testable import Replication
@testable import ReplicationShell
import HAShell

/// An in-process NBDServer + LocalVolume on 127.0.0.1 (port 0) over a temp backing file.
final class TestExport {
    let directory: String
    let backingPath: String
    let group: MultiThreadedEventLoopGroup
    let server: NBDServer
    let store: BackingStore
    let volume: LocalVolume
    let exportName: String
    private var stopped = false

    init(size: UInt64 = 64 << 20, exportName: String = "test", readOnly: Bool = false, open: Bool = true,
         tls: NBDServer.TLS? = nil, allow: [ClientNetwork] = [], unixSocket: Bool = false, logger: Logger? = nil,
         inFlightLimits: NBDInFlightBudget.Limits = .defaults,
         serve: (LocalVolume) -> BlockVolume = { $0 }) throws {
        directory = NSTemporaryDirectory() + "nbdtest-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        backingPath = directory + "/backing.img"
        self.exportName = exportName
        store = try BackingStore(path: backingPath, createSize: size)
        volume = LocalVolume(store: store, ioThreads: 4, readOnly: readOnly)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var defaultLogger = Logger(label: "nbd-test")
        defaultLogger.logLevel = ProcessInfo.processInfo.environment["NBD_TEST_DEBUG"] != nil ? .debug : .warning
        server = NBDServer(group: group, exportName: exportName, exportDescription: "test export", tls: tls, allow: allow,
                           inFlightLimits: inFlightLimits, logger: logger ?? defaultLogger)
        if open { server.setVolume(serve(volume), refusal: "") }
        try server.start(host: "127.0.0.1", port: 0).wait()
        if unixSocket { try server.start(unixSocket: socketPath).wait() }
    }

    var port: Int { server.boundPort! }
    /// Where `unixSocket: true` listens.
    var socketPath: String { directory + "/nbd.sock" }
    var uri: String { "nbd://127.0.0.1:\(port)/\(exportName)" }

    func stop() {
        guard !stopped else { return }
        stopped = true
        try? server.stop().wait()
        volume.shutdown()
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }

    /// Polls `condition` for up to `timeout` seconds.
    static func eventually(timeout: TimeInterval = 5, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }
}

/// Skips the test with a clear message when an external tool is missing.
func requireTools(_ tools: String...) throws {
    for t in tools where ProcessRunner.which(t) == nil {
        throw XCTSkip("\(t) is not installed (apt-get install libnbd-bin nbdkit qemu-utils fio fuse3 e2fsprogs)")
    }
}

/// A blocking TCP socket speaking raw NBD bytes, written from the spec, for the tests that
/// send what no well-behaved client would.
final class RawNBDSocket {
    private(set) var fd: Int32

    init(port: Int, timeoutSeconds: Int = 5) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw NBDClientError.transport("connect: \(errno)") }
    }

    deinit { if fd >= 0 { close(fd) } }

    func send(_ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }

    func send(_ buffer: ByteBuffer) { send(Array(buffer.readableBytesView)) }

    /// Exactly `count` bytes, or nil if the peer closed (or timed out) first.
    func receive(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if n <= 0 { return nil }
            done += n
        }
        return out
    }

    func receiveBuffer(_ count: Int) -> ByteBuffer? { receive(count).map { ByteBuffer(bytes: $0) } }

    /// True if the server closes the connection within the timeout (EOF or reset, no data).
    func isClosedByPeer() -> Bool {
        var b = [UInt8](repeating: 0, count: 1)
        let n = b.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, 1, 0) }
        if n == 0 { return true }
        if n < 0 { return errno == ECONNRESET }
        return false
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// A fixed receive buffer (no autotuning), so that replies the test does not read stay
    /// in the server rather than in this socket. Call before connecting data flows.
    func setReceiveBuffer(bytes: Int) {
        var n = Int32(bytes)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &n, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Hard close with RST (SO_LINGER 0), as a crashed client would.
    func abort() {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        close(fd)
        fd = -1
    }

    // MARK: NBD steps

    /// Reads the greeting and sends client flags; returns the handshake flags.
    func greet(clientFlags: UInt32 = NBDHandshakeFlags.clientFixedNewstyle | NBDHandshakeFlags.clientNoZeroes) -> UInt16? {
        guard var g = receiveBuffer(18), g.readInteger(as: UInt64.self) == NBDMagic.initial,
              g.readInteger(as: UInt64.self) == NBDMagic.option else { return nil }
        let flags: UInt16 = g.readInteger()!
        var out = ByteBuffer()
        out.writeInteger(clientFlags)
        send(out)
        return flags
    }

    func sendOption(_ code: UInt32, _ data: [UInt8] = []) {
        var out = ByteBuffer()
        out.writeInteger(NBDMagic.option)
        out.writeInteger(code)
        out.writeInteger(UInt32(data.count))
        out.writeBytes(data)
        send(out)
    }

    /// (option, type, data) of one option reply.
    func receiveOptionReply() -> (option: UInt32, type: UInt32, data: [UInt8])? {
        guard var h = receiveBuffer(20), h.readInteger(as: UInt64.self) == NBDMagic.optionReply else { return nil }
        let option: UInt32 = h.readInteger()!
        let type: UInt32 = h.readInteger()!
        let length: UInt32 = h.readInteger()!
        guard let data = length == 0 ? [] : receive(Int(length)) else { return nil }
        return (option, type, data)
    }

    static func goData(name: String, infos: [UInt16] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(name.utf8.count))
        b.writeString(name)
        b.writeInteger(UInt16(infos.count))
        for i in infos { b.writeInteger(i) }
        return Array(b.readableBytesView)
    }

    /// Greets and sends GO; returns (size, flags) once in transmission, nil on refusal.
    func go(name: String, structured: Bool = false) -> (size: UInt64, flags: NBDTransmissionFlags)? {
        guard greet() != nil else { return nil }
        if structured {
            sendOption(NBDOption.structuredReply)
            guard receiveOptionReply()?.type == NBDOptionReply.ack else { return nil }
        }
        sendOption(NBDOption.go, Self.goData(name: name))
        var result: (UInt64, NBDTransmissionFlags)?
        while let r = receiveOptionReply() {
            if r.type == NBDOptionReply.ack { return result }
            if NBDOptionReply.isError(r.type) { return nil }
            var d = ByteBuffer(bytes: r.data)
            if d.readInteger(as: UInt16.self) == NBDInfo.export {
                result = (d.readInteger()!, NBDTransmissionFlags(rawValue: d.readInteger()!))
            }
        }
        return nil
    }

    func sendRequest(_ type: UInt16, flags: NBDCommandFlags = [], cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) {
        var out = ByteBuffer()
        NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length).write(into: &out)
        out.writeBytes(payload)
        send(out)
    }

    /// A simple reply: (error, cookie).
    func receiveSimpleReply() -> (error: UInt32, cookie: UInt64)? {
        guard var h = receiveBuffer(16), h.readInteger(as: UInt32.self) == NBDMagic.simpleReply else { return nil }
        return (h.readInteger()!, h.readInteger()!)
    }
}

/// A LocalVolume seen only through `BlockVolume` (not `ScatterWriteVolume`), to exercise the
/// server's path that joins a write's pieces for volumes that take one buffer.
final class SingleBufferVolume: BlockVolume, @unchecked Sendable {
    let base: LocalVolume
    init(_ base: LocalVolume) { self.base = base }
    var sizeBytes: UInt64 { base.sizeBytes }
    var capabilities: VolumeCapabilities { base.capabilities }
    func read(offset: UInt64, length: Int, on loop: EventLoop) -> EventLoopFuture<ByteBuffer> { base.read(offset: offset, length: length, on: loop) }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { base.write(offset: offset, data: data, fua: fua, on: loop) }
    func flush(on loop: EventLoop) -> EventLoopFuture<Void> { base.flush(on: loop) }
    func trim(offset: UInt64, length: Int, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { base.trim(offset: offset, length: length, fua: fua, on: loop) }
    func writeZeroes(offset: UInt64, length: Int, fua: Bool, mayDeallocate: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        base.writeZeroes(offset: offset, length: length, fua: fua, mayDeallocate: mayDeallocate, on: loop)
    }
}
