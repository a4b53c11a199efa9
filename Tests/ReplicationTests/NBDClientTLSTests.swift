import Foundation
import HAShell
import NIOCore
import XCTest
@testable import Replication
@testable import ReplicationShell

/// hamgr's blocking `NBDClient` over NBD_OPT_STARTTLS: against our own `NBDServer` and
/// against nbdkit (an independent server, GnuTLS), with the errors a user sees when the CA,
/// the host name, the client certificate or TLS itself is missing.
final class NBDClientTLSTests: XCTestCase {
    var certs: TestCertificates!
    var exports: [TestExport] = []
    var nbdkits: [Process] = []

    override func setUpWithError() throws { certs = try TestCertificates() }

    override func tearDown() {
        exports.forEach { $0.stop() }
        exports = []
        for p in nbdkits where p.isRunning {
            p.terminate()
            p.waitUntilExit()
        }
        nbdkits = []
        certs?.remove()
        certs = nil
    }

    private func export(tls mode: ExportTLSMode? = nil, clientCertificates: Bool = false) throws -> TestExport {
        let tls = try mode.map { try certs.serverTLS(mode: $0, clientCertificates: clientCertificates) }
        let e = try TestExport(size: 64 << 20, exportName: "test", tls: tls)
        exports.append(e)
        return e
    }

    private var trustingCA: NBDClientTLS { get throws { try NBDClientTLS(caFile: certs.caCert) } }

    private func backing(_ e: TestExport, offset: Int, count: Int) throws -> [UInt8] {
        let fh = try XCTUnwrap(FileHandle(forReadingAtPath: e.backingPath))
        defer { try? fh.close() }
        try fh.seek(toOffset: UInt64(offset))
        return Array(try fh.read(upToCount: count) ?? Data())
    }

    private static func pattern(_ count: Int, seed: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed &+ $0 >> 9) }
    }

    /// The error `body` throws, as an NBDClientError.
    private func clientError(_ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line) -> NBDClientError? {
        do {
            try body()
            XCTFail("expected an error", file: file, line: line)
            return nil
        } catch let e as NBDClientError {
            return e
        } catch {
            XCTFail("not an NBDClientError: \(error)", file: file, line: line)
            return nil
        }
    }

    /// Open file descriptors of this process.
    private func openFDs() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    // MARK: our server

    func testWriteFlushReadOverTLSByAddressAndByName() throws {
        let e = try export(tls: .require)
        let tls = try trustingCA
        for (host, seed) in [("127.0.0.1", 1), ("localhost", 2)] {
            let c = try NBDClient(host: host, port: e.port, exportName: "test", timeoutSeconds: 10, tls: tls)
            XCTAssertTrue(c.isTLS)
            XCTAssertEqual(c.sizeBytes, 64 << 20)
            XCTAssertTrue(c.structuredReplies, "structured replies negotiated inside TLS")
            let data = Self.pattern(1 << 20, seed: seed)
            let offset = seed * (2 << 20)
            try c.write(offset: UInt64(offset), bytes: data)
            try c.write(offset: UInt64(offset + (1 << 20)), bytes: Self.pattern(4096, seed: seed), fua: true)
            try c.flush()
            XCTAssertEqual(try c.read(offset: UInt64(offset), length: 1 << 20), data, host)
            XCTAssertEqual(try c.read(offset: UInt64(offset + (1 << 20)), length: 4096), Self.pattern(4096, seed: seed), host)
            // A read larger than one TLS record (16 KiB) arrives in pieces: still whole.
            XCTAssertEqual(try c.read(offset: UInt64(offset) + 100, length: 300_000), Array(data[100..<300_100]))
            c.disconnect()
            XCTAssertEqual(try backing(e, offset: offset, count: 1 << 20), data, "the bytes reached the export's disk")
            XCTAssertThrowsError(try c.read(offset: 0, length: 4096), "disconnected")
        }
    }

    func testPlaintextClientAgainstRequireSaysTLSIsRequired() throws {
        let e = try export(tls: .require)
        for structured in [true, false] {
            let error = clientError { _ = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", structuredReplies: structured, timeoutSeconds: 5) }
            XCTAssertEqual(error, .tlsRequired)
            XCTAssertTrue("\(error.map { "\($0)" } ?? "")".contains("the server requires TLS (NBD_REP_ERR_TLS_REQD): give a CA file"), "\(String(describing: error))")
        }
        // allow: plaintext and TLS both work.
        let optional = try export(tls: .allow)
        let plain = try NBDClient(host: "127.0.0.1", port: optional.port, exportName: "test", timeoutSeconds: 5)
        XCTAssertFalse(plain.isTLS)
        try plain.write(offset: 0, bytes: Self.pattern(4096, seed: 7))
        plain.disconnect()
        let secure = try NBDClient(host: "127.0.0.1", port: optional.port, exportName: "test", timeoutSeconds: 5, tls: try trustingCA)
        XCTAssertEqual(try secure.read(offset: 0, length: 4096), Self.pattern(4096, seed: 7))
        secure.disconnect()
    }

    func testWrongCAFailsVerificationNamingTheServer() throws {
        let e = try export(tls: .require)
        let other = try NBDClientTLS(caFile: certs.otherCADir + "/ca-cert.pem")
        let error = clientError { _ = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: other) }
        guard case .tls(let why)? = error else { return XCTFail("\(String(describing: error))") }
        print("wrong CA: \(error!)")
        XCTAssertTrue(why.contains("certificate verification of 127.0.0.1:\(e.port) failed"), why)
        XCTAssertTrue(why.contains("does not chain to the CA in \(certs.otherCADir)/ca-cert.pem"), why)
    }

    func testStartTLSRefusedByAnExportWithoutTLS() throws {
        let e = try export()
        let error = clientError { _ = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: try self.trustingCA) }
        guard case .tls(let why)? = error else { return XCTFail("\(String(describing: error))") }
        print("TLS off: \(error!)")
        XCTAssertTrue(why.contains("refused NBD_OPT_STARTTLS"), why)
        XCTAssertTrue(why.contains("does not offer TLS"), why)
    }

    func testClientCertificateWhenTheServerRequiresOne() throws {
        let e = try export(tls: .require, clientCertificates: true)
        // Without one: TLS 1.3 finishes the client's handshake first, the server's alert
        // comes with the first reply; either way the error says what is missing.
        let error = clientError { _ = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: try self.trustingCA) }
        guard case .tls(let why)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(why.contains("requires a client certificate"), why)
        print("no client certificate: \(error!)")

        // One from another CA.
        let stranger = try NBDClientTLS(caFile: certs.caCert, clientCertificateFile: certs.strangerClientDir + "/client-cert.pem",
                                        clientKeyFile: certs.strangerClientDir + "/client-key.pem")
        let refused = clientError { _ = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: stranger) }
        guard case .tls(let why2)? = refused else { return XCTFail("\(String(describing: refused))") }
        XCTAssertTrue(why2.contains("refused our client certificate"), why2)
        print("stranger's client certificate: \(refused!)")

        let known = try NBDClientTLS(caFile: certs.caCert, clientCertificateFile: certs.clientDir + "/client-cert.pem",
                                     clientKeyFile: certs.clientDir + "/client-key.pem")
        let c = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: known)
        try c.write(offset: 8192, bytes: Self.pattern(65536, seed: 3))
        try c.flush()
        XCTAssertEqual(try c.read(offset: 8192, length: 65536), Self.pattern(65536, seed: 3))
        c.disconnect()

        XCTAssertThrowsError(try NBDClientTLS(caFile: certs.caCert, clientCertificateFile: certs.clientDir + "/client-cert.pem")) {
            XCTAssertTrue("\($0)".contains("without its key"), "\($0)")
        }
    }

    /// Connections come and go (as in a drill's reconnect loop) without leaking descriptors.
    func testDisconnectClosesEverything() throws {
        let e = try export(tls: .require)
        let tls = try trustingCA
        // Warm up NIO's shared loops (their epoll and eventfd descriptors stay).
        try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: tls).disconnect()
        XCTAssertTrue(TestExport.eventually { e.server.statistics.connectionsOpen == 0 })
        let before = openFDs()
        for i in 0..<20 {
            let c = try NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: tls)
            try c.write(offset: UInt64(i * 4096), bytes: Self.pattern(4096, seed: i))
            if i % 2 == 0 { c.disconnect() }  // the others go away by deinit
        }
        // Failed handshakes release theirs too.
        let other = try NBDClientTLS(caFile: certs.otherCADir + "/ca-cert.pem")
        for _ in 0..<5 { _ = try? NBDClient(host: "127.0.0.1", port: e.port, exportName: "test", timeoutSeconds: 5, tls: other) }
        XCTAssertTrue(TestExport.eventually(timeout: 10) { self.openFDs() <= before }, "open descriptors: \(before) before, \(openFDs()) after")
    }

    /// A server that acknowledges STARTTLS and then says nothing: the handshake times out.
    func testSilentServerAfterStartTLSTimesOut() throws {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(listener, 0)
        defer { close(listener) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) } }
        XCTAssertEqual(listen(listener, 1), 0)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let served = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            defer { served.signal() }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var tv = timeval(tv_sec: 10, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var out = ByteBuffer()
            out.writeInteger(NBDMagic.initial); out.writeInteger(NBDMagic.option); out.writeInteger(NBDHandshakeFlags.fixedNewstyle)
            _ = out.withUnsafeReadableBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
            var inbound = [UInt8](repeating: 0, count: 4 + 16)
            var got = 0
            while got < inbound.count {
                let n = inbound.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, $0.count - got, 0) }
                if n <= 0 { return }
                got += n
            }
            var ack = ByteBuffer()
            ack.writeInteger(NBDMagic.optionReply); ack.writeInteger(NBDOption.startTLS)
            ack.writeInteger(NBDOptionReply.ack); ack.writeInteger(UInt32(0))
            _ = ack.withUnsafeReadableBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
            _ = release.wait(timeout: .now() + 10)
        }
        let start = Date()
        let error = clientError { _ = try NBDClient(host: "127.0.0.1", port: port, timeoutSeconds: 1, tls: try self.trustingCA) }
        release.signal()
        XCTAssertEqual(served.wait(timeout: .now() + 10), .success)
        guard case .tls(let why)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(why.contains("no TLS handshake with 127.0.0.1:\(port) within 1 s"), why)
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
    }

    // MARK: nbdkit

    /// nbdkit's memory plugin with `--tls=require` and our test certificates (its
    /// `--tls-certificates` directory wants ca-cert.pem, server-cert.pem, server-key.pem:
    /// the layout TestCertificates writes). Listens on every address, on a free port.
    private func nbdkit() throws -> Int {
        try requireTools("nbdkit")
        let config = try ProcessRunner.run("nbdkit", ["--dump-config"], timeout: 10)
        guard config.stdout.contains("tls=yes") else { throw XCTSkip("nbdkit is built without TLS") }
        for _ in 0..<5 {
            let port = Int.random(in: 20000...60000)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: ProcessRunner.which("nbdkit")!)
            p.arguments = ["-f", "--exit-with-parent", "-p", "\(port)", "--tls=require", "--tls-certificates=\(certs.directory)",
                           "memory", "64M"]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            nbdkits.append(p)
            // Listening within 5 s, or it exited (port taken): try another.
            let end = Date().addingTimeInterval(5)
            while Date() < end && p.isRunning {
                if (try? RawNBDSocket(port: port, timeoutSeconds: 1).greet()) != nil { return port }
                usleep(50_000)
            }
            if p.isRunning { p.terminate(); p.waitUntilExit() }
        }
        throw XCTSkip("nbdkit did not start listening")
    }

    func testAgainstNbdkitOverTLS() throws {
        let port = try nbdkit()
        let tls = try trustingCA
        let c = try NBDClient(host: "127.0.0.1", port: port, timeoutSeconds: 10, tls: tls)
        XCTAssertTrue(c.isTLS)
        XCTAssertEqual(c.sizeBytes, 64 << 20)
        let data = Self.pattern(1 << 20, seed: 9)
        try c.write(offset: 4096, bytes: data)
        try c.write(offset: 32 << 20, bytes: Self.pattern(4096, seed: 10), fua: c.transmissionFlags.contains(.sendFUA))
        try c.flush()
        XCTAssertEqual(try c.read(offset: 4096, length: 1 << 20), data)
        XCTAssertEqual(try c.read(offset: 32 << 20, length: 4096), Self.pattern(4096, seed: 10))
        XCTAssertEqual(try c.read(offset: 48 << 20, length: 65536), [UInt8](repeating: 0, count: 65536), "unwritten space reads as zeroes (holes)")
        c.disconnect()
        // A second connection sees the data (nbdkit's memory plugin is shared).
        let again = try NBDClient(host: "localhost", port: port, timeoutSeconds: 10, tls: tls)
        XCTAssertEqual(try again.read(offset: 4096, length: 4096), Array(data[0..<4096]))
        again.disconnect()
    }

    func testNbdkitRefusalsAreExplained() throws {
        let port = try nbdkit()
        XCTAssertEqual(clientError { _ = try NBDClient(host: "127.0.0.1", port: port, timeoutSeconds: 5) }, .tlsRequired)

        let other = try NBDClientTLS(caFile: certs.otherCADir + "/ca-cert.pem")
        let wrongCA = clientError { _ = try NBDClient(host: "127.0.0.1", port: port, timeoutSeconds: 5, tls: other) }
        guard case .tls(let why)? = wrongCA else { return XCTFail("\(String(describing: wrongCA))") }
        XCTAssertTrue(why.contains("certificate verification of 127.0.0.1:\(port) failed"), why)

        // nbdkit listens on every loopback address; 127.0.0.2 is not in its certificate.
        let wrongName = clientError { _ = try NBDClient(host: "127.0.0.2", port: port, timeoutSeconds: 5, tls: try self.trustingCA) }
        guard case .tls(let why2)? = wrongName else { return XCTFail("\(String(describing: wrongName))") }
        XCTAssertTrue(why2.contains("not issued for 127.0.0.2"), why2)
        print("nbdkit, wrong CA: \(wrongCA!)\nnbdkit, wrong name: \(wrongName!)")
    }
}
