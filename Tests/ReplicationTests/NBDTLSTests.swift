import Foundation
import HAShell
import Logging
import NIOCore
import XCTest
@testable import Replication
@testable import ReplicationShell

/// NBD_OPT_STARTTLS, client certificates, the allow-list and the Unix-socket export, with
/// real clients (libnbd's nbdinfo/nbdcopy, qemu-io) and raw sockets for what they never send.
final class NBDTLSTests: XCTestCase {
    var certs: TestCertificates!
    var exports: [TestExport] = []
    let log = EventLog()

    override func setUpWithError() throws { certs = try TestCertificates() }

    override func tearDown() {
        exports.forEach { $0.stop() }
        exports = []
        certs?.remove()
        certs = nil
    }

    private func export(tls mode: ExportTLSMode? = nil, clientCertificates: Bool = false, allow: [String] = [],
                        unixSocket: Bool = false, name: String = "test", size: UInt64 = 64 << 20) throws -> TestExport {
        let tls = try mode.map { try certs.serverTLS(mode: $0, clientCertificates: clientCertificates) }
        let e = try TestExport(size: size, exportName: name, tls: tls, allow: allow.map { ClientNetwork($0)! },
                               unixSocket: unixSocket, logger: log.logger())
        exports.append(e)
        return e
    }

    private func tlsURI(_ e: TestExport, dir: String) -> String {
        "nbds://127.0.0.1:\(e.port)/\(e.exportName)?tls-certificates=\(dir)"
    }

    /// The export size nbdinfo reports, or nil (with the output) when it fails.
    private func nbdinfoSize(_ uri: String) throws -> (size: Int?, result: ProcessResult) {
        let r = try ProcessRunner.run("nbdinfo", ["--size", uri], timeout: 30)
        return (r.exitCode == 0 ? Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) : nil, r)
    }

    private func backingPrefix(_ e: TestExport, _ count: Int) throws -> [UInt8] {
        let fh = try XCTUnwrap(FileHandle(forReadingAtPath: e.backingPath))
        defer { try? fh.close() }
        return Array(try fh.read(upToCount: count) ?? Data())
    }

    // MARK: STARTTLS with real clients

    func testNbdinfoOverTLSReportsTheSize() throws {
        try requireTools("nbdinfo")
        let e = try export(tls: .require)
        let (size, r) = try nbdinfoSize(tlsURI(e, dir: certs.anonymousClientDir))
        XCTAssertEqual(size, 64 << 20, "\(r)")
        // The server's certificate is verified: a client trusting another CA refuses it.
        let (wrongCA, r2) = try nbdinfoSize(tlsURI(e, dir: certs.otherCADir))
        XCTAssertNil(wrongCA, "a client trusting another CA must not connect: \(r2)")
    }

    func testQemuIoOverTLSWritesAndReadsBack() throws {
        try requireTools("qemu-io")
        let e = try export(tls: .require)
        let r = try ProcessRunner.run("qemu-io", [
            "--object", "tls-creds-x509,id=tls0,dir=\(certs.anonymousClientDir),endpoint=client",
            "--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=\(e.port),export=test,tls-creds=tls0",
            "-c", "write -P 0xab 0 1M", "-c", "flush", "-c", "read -P 0xab 0 1M",
        ], timeout: 60)
        XCTAssertEqual(r.exitCode, 0, "\(r)")
        XCTAssertFalse(r.stdout.contains("Pattern verification failed"), r.stdout)
        XCTAssertTrue(r.stdout.contains("wrote 1048576/1048576 bytes"), r.stdout)
        XCTAssertTrue(r.stdout.contains("read 1048576/1048576 bytes"), r.stdout)
        XCTAssertEqual(try backingPrefix(e, 1 << 20), [UInt8](repeating: 0xAB, count: 1 << 20))
    }

    func testNbdcopyOverTLSIsByteIdentical() throws {
        try requireTools("nbdcopy", "cmp", "dd")
        let e = try export(tls: .allow, size: 32 << 20)
        let input = e.directory + "/in.bin", output = e.directory + "/out.bin"
        XCTAssertEqual(try ProcessRunner.run("dd", ["if=/dev/urandom", "of=\(input)", "bs=1M", "count=32", "status=none"], timeout: 60).exitCode, 0)
        let uri = tlsURI(e, dir: certs.anonymousClientDir)
        let copyIn = try ProcessRunner.run("nbdcopy", ["--flush", input, uri], timeout: 120)
        XCTAssertEqual(copyIn.exitCode, 0, "\(copyIn)")
        let copyOut = try ProcessRunner.run("nbdcopy", [uri, output], timeout: 120)
        XCTAssertEqual(copyOut.exitCode, 0, "\(copyOut)")
        XCTAssertEqual(try ProcessRunner.run("cmp", [input, output], timeout: 60).exitCode, 0)
        XCTAssertEqual(try backingPrefix(e, 32 << 20), Array(try Data(contentsOf: URL(fileURLWithPath: input))))
    }

    // MARK: modes

    func testRequireModeRefusesPlaintextAndRevealsNothing() throws {
        let e = try export(tls: .require, name: "vault7")
        if ProcessRunner.which("nbdinfo") != nil {
            let r = try ProcessRunner.run("nbdinfo", ["nbd://127.0.0.1:\(e.port)/vault7"], timeout: 30)
            XCTAssertNotEqual(r.exitCode, 0, "a plaintext client must be refused: \(r)")
            XCTAssertFalse(r.stdout.contains("\(64 << 20)"), r.stdout)
        }
        let s = try RawNBDSocket(port: e.port)
        XCTAssertNotNil(s.greet())
        let options: [(UInt32, [UInt8])] = [(NBDOption.list, []), (NBDOption.go, RawNBDSocket.goData(name: "vault7")),
                                            (NBDOption.info, RawNBDSocket.goData(name: "")), (NBDOption.structuredReply, [])]
        for (option, data) in options {
            s.sendOption(option, data)
            let r = try XCTUnwrap(s.receiveOptionReply(), "option \(option)")
            XCTAssertEqual(r.option, option)
            XCTAssertEqual(r.type, 0x8000_0005, "NBD_REP_ERR_TLS_REQD for option \(option)")
            XCTAssertFalse(String(decoding: r.data, as: UTF8.self).contains("vault7"))
        }
        // EXPORT_NAME cannot be answered with an error: the connection closes, saying nothing.
        s.sendOption(NBDOption.exportName, Array("vault7".utf8))
        XCTAssertEqual(s.receiveUntilClosed(), [])

        let aborting = try RawNBDSocket(port: e.port)
        XCTAssertNotNil(aborting.greet())
        aborting.sendOption(NBDOption.abort)
        XCTAssertEqual(aborting.receiveOptionReply()?.type, NBDOptionReply.ack)
    }

    func testStartTLSRefusals() throws {
        // TLS off (the default): unsupported, and the connection goes on in plaintext.
        let plain = try export()
        let s = try RawNBDSocket(port: plain.port)
        XCTAssertNotNil(s.greet())
        s.sendOption(NBDOption.startTLS)
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.errUnsupported)
        s.sendOption(NBDOption.list)
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.server)

        // allow: STARTTLS with data is invalid; plaintext options are served.
        let optional = try export(tls: .allow)
        let t = try RawNBDSocket(port: optional.port)
        XCTAssertNotNil(t.greet())
        t.sendOption(NBDOption.startTLS, [1, 2, 3])
        XCTAssertEqual(t.receiveOptionReply()?.type, NBDOptionReply.errInvalid)
        t.sendOption(NBDOption.list)
        XCTAssertEqual(t.receiveOptionReply()?.type, NBDOptionReply.server)
        if ProcessRunner.which("nbdinfo") != nil {
            XCTAssertEqual(try nbdinfoSize("nbd://127.0.0.1:\(optional.port)/test").size, 64 << 20, "allow serves plaintext")
            XCTAssertEqual(try nbdinfoSize(tlsURI(optional, dir: certs.anonymousClientDir)).size, 64 << 20, "and TLS")
        }
    }

    /// Python's ssl module as a client that speaks raw NBD options over TLS (libnbd 1.14
    /// cannot send a second STARTTLS): after the upgrade the export is listed, a second
    /// STARTTLS is invalid, and ABORT is acknowledged, all inside TLS.
    func testOptionsOverTLSAndASecondStartTLS() throws {
        try requireTools("python3")
        let e = try export(tls: .require, name: "vault7")
        let script = """
            import socket, ssl, struct, sys
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
            def recvn(n):
                b = b""
                while len(b) < n:
                    c = s.recv(n - len(b))
                    if not c: raise EOFError("closed")
                    b += c
                return b
            def option(code, data=b""):
                s.sendall(struct.pack(">QII", 0x49484156454F5054, code, len(data)) + data)
                names = []
                while True:  # NBD_REP_SERVER replies (type 2) until the final one
                    magic, opt, kind, length = struct.unpack(">QIII", recvn(20))
                    body = recvn(length)
                    if kind != 2:
                        return "%d:%08x:%s" % (opt, kind, ",".join(names) or body.decode())
                    names.append(body[4:4 + struct.unpack(">I", body[:4])[0]].decode())
            recvn(18)
            s.sendall(struct.pack(">I", 3))
            print("plain", option(5))
            s = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(s, server_hostname="127.0.0.1")
            print("tls", s.version())
            print("again", option(5))
            print("list", option(3))
            print("abort", option(2))
            """
        let r = try ProcessRunner.run("python3", ["-c", script, "\(e.port)", certs.caCert], timeout: 30)
        XCTAssertEqual(r.exitCode, 0, "\(r)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.count, 5, "\(r)")
        guard lines.count == 5 else { return }
        XCTAssertEqual(lines[0], "plain 5:00000001:")
        XCTAssertTrue(lines[1] == "tls TLSv1.3" || lines[1] == "tls TLSv1.2", lines[1])
        XCTAssertEqual(lines[2], "again 5:80000003:TLS is already running")
        XCTAssertEqual(lines[3], "list 3:00000001:vault7", "the export is listed (then ACK) once TLS runs")
        XCTAssertEqual(lines[4], "abort 2:00000001:")
    }

    // MARK: client certificates

    func testClientCertificateIsRequiredAndVerified() throws {
        try requireTools("nbdinfo", "qemu-io")
        let e = try export(tls: .require, clientCertificates: true)
        let (anonymous, r1) = try nbdinfoSize(tlsURI(e, dir: certs.anonymousClientDir))
        XCTAssertNil(anonymous, "no client certificate: \(r1)")
        let (stranger, r2) = try nbdinfoSize(tlsURI(e, dir: certs.strangerClientDir))
        XCTAssertNil(stranger, "a client certificate from another CA: \(r2)")
        let (known, r3) = try nbdinfoSize(tlsURI(e, dir: certs.clientDir))
        XCTAssertEqual(known, 64 << 20, "\(r3)")
        let q = try ProcessRunner.run("qemu-io", [
            "--object", "tls-creds-x509,id=tls0,dir=\(certs.clientDir),endpoint=client",
            "--image-opts", "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=\(e.port),export=test,tls-creds=tls0",
            "-c", "write -P 0x5c 4096 64k", "-c", "read -P 0x5c 4096 64k",
        ], timeout: 60)
        XCTAssertEqual(q.exitCode, 0, "\(q)")
        XCTAssertFalse(q.stdout.contains("Pattern verification failed"), q.stdout)
        XCTAssertEqual(Array(try backingPrefix(e, 4096 + 65536)[4096...]), [UInt8](repeating: 0x5C, count: 65536))
        // One notice per failed handshake, naming the peer.
        let failures = log.entries(event: "nbd_tls_handshake_failed")
        XCTAssertEqual(failures.count, 2, "\(log.all)")
        for f in failures {
            XCTAssertEqual(f.level, .notice)
            XCTAssertTrue(f.metadata["peer"].map { "\($0)" }?.contains("127.0.0.1") ?? false, "\(f)")
        }
    }

    // MARK: bad input

    func testGarbageInsteadOfClientHelloClosesOnlyThatConnection() throws {
        let e = try export(tls: .require)
        let s = try RawNBDSocket(port: e.port)
        XCTAssertNotNil(s.greet())
        s.sendOption(NBDOption.startTLS)
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.ack)
        s.send(Array("GET / HTTP/1.1\r\nHost: nbd\r\n\r\n".utf8) + [UInt8](repeating: 0x16, count: 64))
        // At most a TLS alert (record type 21) comes back, then the close; never NBD bytes.
        let answer = try XCTUnwrap(s.receiveUntilClosed(), "the server must close the connection")
        XCTAssertTrue(answer.isEmpty || answer[0] == 21, "\(answer.prefix(16))")
        XCTAssertTrue(TestExport.eventually { self.log.entries(event: "nbd_tls_handshake_failed").count == 1 }, "\(log.all)")

        // Bytes sent after STARTTLS before its reply: closed at once, no ACK.
        let eager = try RawNBDSocket(port: e.port)
        XCTAssertNotNil(eager.greet())
        var both = ByteBuffer()
        both.writeInteger(NBDMagic.option); both.writeInteger(NBDOption.startTLS); both.writeInteger(UInt32(0))
        both.writeBytes([0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        eager.send(both)
        XCTAssertEqual(eager.receiveUntilClosed(), [])

        // The server goes on serving.
        if ProcessRunner.which("nbdinfo") != nil {
            XCTAssertEqual(try nbdinfoSize(tlsURI(e, dir: certs.anonymousClientDir)).size, 64 << 20)
        } else {
            let next = try RawNBDSocket(port: e.port)
            XCTAssertNotNil(next.greet())
            next.sendOption(NBDOption.startTLS)
            XCTAssertEqual(next.receiveOptionReply()?.type, NBDOptionReply.ack)
        }
    }

    // MARK: allow-list

    func testClientOutsideTheAllowListGetsNoGreeting() throws {
        let outside = try export(allow: ["10.0.0.0/8", "127.0.0.2/32"])
        let s = try RawNBDSocket(port: outside.port)
        XCTAssertEqual(s.receiveUntilClosed(), [], "closed before the greeting")
        XCTAssertTrue(TestExport.eventually { self.log.entries(event: "nbd_client_refused").count == 1 }, "\(log.all)")
        let refused = try XCTUnwrap(log.entries(event: "nbd_client_refused").first)
        XCTAssertTrue(refused.metadata["peer"].map { "\($0)" }?.contains("127.0.0.1") ?? false, "\(refused)")
        XCTAssertEqual(outside.server.statistics.connectionsAccepted, 0)

        let inside = try export(allow: ["10.0.0.0/8", "127.0.0.0/8"])
        let t = try RawNBDSocket(port: inside.port)
        XCTAssertNotNil(t.greet(), "a client inside the list gets the greeting")
        if ProcessRunner.which("nbdinfo") != nil {
            XCTAssertEqual(try nbdinfoSize(inside.uri).size, 64 << 20)
            XCTAssertNil(try nbdinfoSize(outside.uri).size)
        }
    }

    /// A reload of `export.allow` (issue 12): the new list applies to the next connection,
    /// both ways.
    func testAllowListChangesForNewConnections() throws {
        let e = try export(allow: ["10.0.0.0/8"])
        XCTAssertEqual(try RawNBDSocket(port: e.port).receiveUntilClosed(), [], "outside the first list")
        e.server.allow = [ClientNetwork("127.0.0.0/8")!]
        XCTAssertNotNil(try RawNBDSocket(port: e.port).greet(), "inside the new list")
        e.server.allow = [ClientNetwork("192.0.2.0/24")!]
        XCTAssertEqual(try RawNBDSocket(port: e.port).receiveUntilClosed(), [], "outside again")
        XCTAssertTrue(TestExport.eventually { self.log.entries(event: "nbd_client_refused").count == 2 }, "\(log.all)")
        e.server.allow = []
        XCTAssertNotNil(try RawNBDSocket(port: e.port).greet(), "an empty list lets anyone in")
    }

    // MARK: Unix socket

    func testUnixSocketExportServesWithoutTLS() throws {
        try requireTools("nbdinfo", "qemu-io")
        let e = try export(tls: .require, allow: ["10.0.0.0/8"], unixSocket: true)
        var st = stat()
        XCTAssertEqual(stat(e.socketPath, &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFSOCK)
        XCTAssertEqual(st.st_mode & 0o777, 0o660)

        let (size, r) = try nbdinfoSize("nbd+unix:///test?socket=\(e.socketPath)")
        XCTAssertEqual(size, 64 << 20, "\(r)")
        let q = try ProcessRunner.run("qemu-io", [
            "-f", "raw", "nbd+unix:///test?socket=\(e.socketPath)",
            "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
        ], timeout: 60)
        XCTAssertEqual(q.exitCode, 0, "\(q)")
        XCTAssertFalse(q.stdout.contains("Pattern verification failed"), q.stdout)
        XCTAssertEqual(try backingPrefix(e, 1 << 20), [UInt8](repeating: 0xAB, count: 1 << 20))
        // Withdrawing the volume refuses Unix-socket clients too.
        e.server.setVolume(nil, refusal: "not primary")
        XCTAssertNil(try nbdinfoSize("nbd+unix:///test?socket=\(e.socketPath)").size)

        try e.server.stop().wait()
        XCTAssertFalse(FileManager.default.fileExists(atPath: e.socketPath), "stop removes the socket file")
    }
}

// MARK: support

/// A CA, a server certificate for 127.0.0.1 and localhost, client certificates, and the
/// directories libnbd (`tls-certificates=`) and qemu (`tls-creds-x509,dir=`) read:
/// ca-cert.pem, plus client-cert.pem and client-key.pem for a client with a certificate.
final class TestCertificates {
    let directory: String
    var serverCert: String { directory + "/server-cert.pem" }
    var serverKey: String { directory + "/server-key.pem" }
    var caCert: String { directory + "/ca-cert.pem" }
    /// Trusts the CA; no client certificate.
    var anonymousClientDir: String { directory + "/anonymous" }
    /// Trusts the CA; a client certificate it signed.
    var clientDir: String { directory + "/client" }
    /// Trusts the CA; a client certificate another CA signed.
    var strangerClientDir: String { directory + "/stranger" }
    /// Trusts only another CA.
    var otherCADir: String { directory + "/other-ca" }

    init() throws {
        try requireTools("openssl")
        directory = NSTemporaryDirectory() + "nbdtls-" + UUID().uuidString.prefix(8)
        let fm = FileManager.default
        for d in [directory, anonymousClientDir, clientDir, strangerClientDir, otherCADir] {
            try fm.createDirectory(atPath: d, withIntermediateDirectories: true)
        }
        do {
            try makeCA("ca")
            try makeCA("other")
            try makeLeaf("server", ca: "ca", serial: 2, extensions: "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost")
            try makeLeaf("client", ca: "ca", serial: 3, extensions: "extendedKeyUsage=clientAuth")
            try makeLeaf("stranger", ca: "other", serial: 4, extensions: "extendedKeyUsage=clientAuth")
            for d in [anonymousClientDir, clientDir, strangerClientDir] { try fm.copyItem(atPath: caCert, toPath: d + "/ca-cert.pem") }
            try fm.copyItem(atPath: directory + "/other-cert.pem", toPath: otherCADir + "/ca-cert.pem")
            for (dir, name) in [(clientDir, "client"), (strangerClientDir, "stranger")] {
                try fm.copyItem(atPath: "\(directory)/\(name)-cert.pem", toPath: dir + "/client-cert.pem")
                try fm.copyItem(atPath: "\(directory)/\(name)-key.pem", toPath: dir + "/client-key.pem")
            }
        } catch {
            remove()
            throw error
        }
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }

    /// The server side: this server certificate; with `clientCertificates`, clients must
    /// present one signed by the CA.
    func serverTLS(mode: ExportTLSMode, clientCertificates: Bool = false) throws -> NBDServer.TLS {
        let identity = try TLSFiles.identity(certFile: serverCert, certKey: "server-cert", keyFile: serverKey, keyKey: "server-key")
        let clientCA = clientCertificates ? try TLSFiles.certificates(caCert, key: "ca-cert") : nil
        return try NBDServer.TLS(mode: mode, configuration: identity.serverConfiguration(clientCA: clientCA))
    }

    private func openssl(_ args: [String]) throws {
        let r = try ProcessRunner.run("openssl", args, timeout: 30, currentDirectory: directory)
        guard r.exitCode == 0 else { throw CertificateError(message: "openssl \(args.joined(separator: " ")): \(r)") }
    }

    private func makeCA(_ name: String) throws {
        try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", "\(name)-key.pem", "-out", "\(name)-cert.pem", "-days", "2", "-subj", "/CN=hamgr test \(name)",
                     "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    }

    /// qemu insists on digitalSignature and keyEncipherment in a leaf's key usage.
    private func makeLeaf(_ name: String, ca: String, serial: Int, extensions: String) throws {
        let ext = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\(extensions)\n"
        try ext.write(toFile: "\(directory)/\(name).ext", atomically: true, encoding: .utf8)
        try openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", "\(name)-key.pem", "-out", "\(name).csr", "-subj", "/CN=\(name)"])
        try openssl(["x509", "-req", "-in", "\(name).csr", "-CA", "\(ca)-cert.pem", "-CAkey", "\(ca)-key.pem",
                     "-set_serial", "\(serial)", "-days", "2", "-extfile", "\(name).ext", "-out", "\(name)-cert.pem"])
        chmod("\(directory)/\(name)-key.pem", 0o600)
    }

    struct CertificateError: Error, CustomStringConvertible { var message: String; var description: String { message } }
}

/// Log records with their metadata (the logger's and the call's), to assert on events.
final class EventLog: @unchecked Sendable {
    struct Entry { var level: Logger.Level; var message: String; var metadata: Logger.Metadata }
    private let lock = NSLock()
    private var records: [Entry] = []

    func logger() -> Logger {
        var l = Logger(label: "nbd-tls-test") { _ in Handler(log: self) }
        l.logLevel = .info
        return l
    }

    func append(_ e: Entry) { lock.lock(); records.append(e); lock.unlock() }

    func entries(event: String) -> [Entry] {
        lock.lock(); defer { lock.unlock() }
        return records.filter { $0.metadata["event"] == .string(event) }
    }

    var all: [String] {
        lock.lock(); defer { lock.unlock() }
        return records.map { "\($0.level): \($0.message) \($0.metadata)" }
    }

    struct Handler: LogHandler {
        let log: EventLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            log.append(Entry(level: event.level, message: "\(event.message)", metadata: metadata.merging(event.metadata ?? [:]) { $1 }))
        }
    }
}

extension RawNBDSocket {
    /// Everything the server sends until it closes (at most 64 KiB), or nil if it does not
    /// close within the socket's timeout.
    func receiveUntilClosed() -> [UInt8]? {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while out.count < 65536 {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, 4096, 0) }
            if n == 0 || (n < 0 && errno == ECONNRESET) { return out }
            if n < 0 { return nil }
            out += chunk[0..<n]
        }
        return nil
    }
}
