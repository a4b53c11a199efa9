import ArgumentParser
import Dispatch
import Foundation
import HAShell
import Logging
import NIOCore
import NIOPosix
import Replication
import ReplicationShell

/// `hamgr export`: serve a local backing store over NBD, unreplicated (bring-up, benchmarks).
struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Serve a local file or block device over NBD, unreplicated.",
        discussion: "Runs until SIGINT or SIGTERM. Sizes accept 4096, 512KiB, 256MiB, 1GiB, 2TiB (also K/M/G/T, KB/MB/GB = powers of 1000).")

    @Option(name: .long, help: "Backing file or block device (a missing file is created sparse).")
    var backing: String

    @Option(name: .long, help: "Size to create or extend a backing file to, e.g. 1GiB.")
    var size: String?

    @Option(name: .long, help: "Address to listen on, HOST:PORT (port 0 picks a free one).")
    var listen: String = "127.0.0.1:10809"

    @Option(name: .long, help: "Export name (clients may also ask for the default export \"\").")
    var name: String = "hamgr"

    @Flag(name: .long, help: "Serve the export read-only.")
    var readOnly = false

    @Option(name: .long, help: "Event loop threads (default: CPU count).")
    var eventLoops: Int?

    @Option(name: .long, help: "I/O threads doing pread/pwrite/fdatasync.")
    var ioThreads: Int = 8

    @Option(name: .long, help: "Server certificate (PEM) for NBD_OPT_STARTTLS on the TCP listener.")
    var tlsCert: String?

    @Option(name: .long, help: "Private key (PEM, mode 0600) of --tls-cert.")
    var tlsKey: String?

    @Option(name: .long, help: "CA (PEM) that TLS clients' certificates must chain to; without it no client certificate is asked for.")
    var tlsCaClients: String?

    @Option(name: .long, help: "off, allow or require (default: require with --tls-cert, else off).")
    var tls: String?

    @Option(name: .long, help: "Only TCP clients from this network may connect (repeatable), e.g. 10.1.0.0/16, ::1.")
    var allow: [String] = []

    @Option(name: .long, help: "Also serve on this Unix socket (mode 0660; no TLS, no --allow).")
    var unix: String?

    @Option(name: .long, help: "Payload bytes one connection may hold until their replies are written, 1MiB…2GiB (export.max_in_flight_bytes; default 64MiB).")
    var maxInFlightBytes: String?

    @Option(name: .long, help: "Requests one connection may hold until their replies are written, 1…65536 (export.max_in_flight_requests; default 256).")
    var maxInFlightRequests: Int = ExportSettings.defaultMaxInFlightRequests

    @Option(name: .long, help: "Connections kept open at once, 1…4096; one more is closed before the greeting (export.max_connections; default 16).")
    var maxConnections: Int = ExportSettings.defaultMaxConnections

    func validate() throws {
        if let s = size, ByteSize.parse(s) == nil { throw ValidationError("--size: cannot read \"\(s)\" as a size (e.g. 256MiB, 1GiB, 4096)") }
        if HostPort.parse(listen) == nil { throw ValidationError("--listen: expected HOST:PORT, got \"\(listen)\"") }
        if ioThreads < 1 { throw ValidationError("--io-threads: must be at least 1") }
        if let t = tls, ExportTLSMode(rawValue: t) == nil { throw ValidationError("--tls: expected off, allow or require, got \"\(t)\"") }
        if tlsMode != .off && (tlsCert == nil || tlsKey == nil) { throw ValidationError("--tls \(tlsMode.rawValue): needs --tls-cert and --tls-key") }
        if tlsCaClients != nil && tlsMode == .off { throw ValidationError("--tls-ca-clients: needs --tls allow or require") }
        for a in allow where ClientNetwork(a) == nil { throw ValidationError("--allow: '\(a)' is not an address or a network (e.g. 10.1.0.0/16)") }
        if let text = maxInFlightBytes {
            guard let b = ByteSize.parse(text) else { throw ValidationError("--max-in-flight-bytes: cannot read \"\(text)\" as a size (e.g. 64MiB)") }
            guard b >= UInt64(ExportSettings.minInFlightBytes), b <= UInt64(2 << 30) else {
                throw ValidationError("--max-in-flight-bytes: \(b) bytes: must be from 1MiB to 2GiB")
            }
        }
        if !(1...ExportSettings.maxInFlightRequestsLimit).contains(maxInFlightRequests) {
            throw ValidationError("--max-in-flight-requests: must be from 1 to \(ExportSettings.maxInFlightRequestsLimit), got \(maxInFlightRequests)")
        }
        if !(1...ExportSettings.maxConnectionsLimit).contains(maxConnections) {
            throw ValidationError("--max-connections: must be from 1 to \(ExportSettings.maxConnectionsLimit), got \(maxConnections)")
        }
    }

    private var inFlightLimits: NBDInFlightBudget.Limits {
        .init(maxRequests: maxInFlightRequests,
              maxBytes: maxInFlightBytes.flatMap(ByteSize.parse).map { Int($0) } ?? ExportSettings.defaultMaxInFlightBytes,
              maxConnections: maxConnections)
    }

    private var tlsMode: ExportTLSMode {
        tls.flatMap(ExportTLSMode.init(rawValue:)) ?? (tlsCert == nil ? .off : .require)
    }

    /// The STARTTLS configuration from --tls-cert/--tls-key/--tls-ca-clients, nil with TLS off.
    private func exportTLS() throws -> NBDServer.TLS? {
        guard tlsMode != .off, let cert = tlsCert, let key = tlsKey else { return nil }
        let identity = try TLSFiles.identity(certFile: cert, certKey: "--tls-cert", keyFile: key, keyKey: "--tls-key")
        let clientCA = try tlsCaClients.map { try TLSFiles.certificates($0, key: "--tls-ca-clients") }
        return try NBDServer.TLS(mode: tlsMode, configuration: identity.serverConfiguration(clientCA: clientCA))
    }

    func run() throws {
        let tlsServer: NBDServer.TLS?
        do { tlsServer = try exportTLS() } catch { throw ValidationError("\(error)") }
        var logger = Logger(label: "hamgr.export")
        logger.logLevel = .info
        let createSize = size.flatMap(ByteSize.parse)
        let store: BackingStore
        do { store = try BackingStore(path: backing, createSize: createSize) } catch {
            throw ValidationError("--backing: \(error)")
        }
        guard store.sizeBytes > 0 else { throw ValidationError("--backing: \(backing) is empty; give --size") }
        let (host, port) = HostPort.parse(listen)!
        let group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoops ?? System.coreCount)
        let volume = LocalVolume(store: store, ioThreads: ioThreads, readOnly: readOnly)
        let server = NBDServer(group: group, exportName: name, exportDescription: "hamgr unreplicated export of \(backing)",
                               tls: tlsServer, allow: allow.compactMap(ClientNetwork.init), inFlightLimits: inFlightLimits, logger: logger)
        server.setVolume(volume, refusal: "")
        try server.start(host: host, port: port).wait()
        if let path = unix { try server.start(unixSocket: path).wait() }
        // One line on stdout that scripts can wait for and parse.
        print("hamgr export: serving \(backing) (\(store.sizeBytes) bytes) as \"\(name)\" on \(host):\(server.boundPort ?? port)"
              + " (in flight per connection at most \(inFlightLimits.maxBytes) bytes, \(inFlightLimits.maxRequests) requests)")
        fflush(stdout)

        waitForTermination()
        logger.info("stopping NBD export")
        try? server.stop().wait()
        volume.shutdown()
        try? store.sync()
        try? group.syncShutdownGracefully()
    }
}

/// Byte sizes as people write them: "4096", "512KiB", "1GiB", "1G" (binary), "1GB" (decimal).
fileprivate enum ByteSize {
    static func parse(_ text: String) -> UInt64? {
        let s = text.trimmingCharacters(in: .whitespaces)
        guard let split = s.firstIndex(where: { !$0.isNumber }) ?? Optional(s.endIndex) else { return nil }
        guard let number = UInt64(s[..<split]) else { return nil }
        let unit = s[split...].trimmingCharacters(in: .whitespaces).lowercased()
        let multipliers: [String: UInt64] = [
            "": 1, "b": 1,
            "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
            "m": 1 << 20, "mib": 1 << 20, "mb": 1_000_000,
            "g": 1 << 30, "gib": 1 << 30, "gb": 1_000_000_000,
            "t": 1 << 40, "tib": 1 << 40, "tb": 1_000_000_000_000,
        ]
        guard let m = multipliers[unit] else { return nil }
        let (v, overflow) = number.multipliedReportingOverflow(by: m)
        return overflow ? nil : v
    }
}

/// "HOST:PORT" or "[v6]:PORT".
fileprivate enum HostPort {
    static func parse(_ text: String) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        return (host, port)
    }
}
