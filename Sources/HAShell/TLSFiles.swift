import Foundation
import NIOSSL

/// The `[tls]` section: the cluster CA and where each host finds its own certificate
/// and key. The config file is the same on every host, so `cert_file` and `key_file`
/// may name the host with `{name}` (a node's name, or `arbitrator`): `hamgr certs`
/// writes exactly that layout.
public struct TLSSettings: Sendable, Equatable {
    /// The cluster CA (PEM): clients (hactl, the peer) verify hamgr's certificates with it.
    public var caFile: String
    public var certFile: String
    public var keyFile: String

    public static let hostPlaceholder = "{name}"

    public init(caFile: String, certFile: String, keyFile: String) {
        self.caFile = caFile; self.certFile = certFile; self.keyFile = keyFile
    }

    public func certFile(for host: String) -> String { certFile.replacingOccurrences(of: Self.hostPlaceholder, with: host) }
    public func keyFile(for host: String) -> String { keyFile.replacingOccurrences(of: Self.hostPlaceholder, with: host) }
}

/// How the NBD export treats TLS (`export.tls`), as nbdkit's `--tls=off|on|require`.
public enum ExportTLSMode: String, Sendable, Equatable, CaseIterable {
    /// No TLS: NBD_OPT_STARTTLS is refused as unsupported.
    case off
    /// Clients may upgrade with NBD_OPT_STARTTLS or stay in plaintext.
    case allow
    /// Every option other than STARTTLS (and ABORT) gets NBD_REP_ERR_TLS_REQD until the
    /// client has upgraded: no export is named, sized or served in plaintext.
    case require
}

/// The `[export]` section: who may reach the NBD export, and how.
public struct ExportSettings: Sendable, Equatable {
    public var tls: ExportTLSMode
    /// If set, a TLS client must present a certificate signed by this CA.
    public var clientCAFile: String?
    /// Networks a TCP client must come from; empty means any. Checked on accept,
    /// before a byte of the handshake is sent.
    public var allow: [ClientNetwork]
    /// A Unix-socket export for consumers on the node itself (no TLS, no allow-list:
    /// the socket's file mode decides). May name the node with `{name}`.
    public var unixSocket: String?
    /// Payload bytes (writes received, read replies to send) one connection may hold until
    /// the replies are written; past it the server stops reading from that client.
    public var maxInFlightBytes: Int
    /// Requests one connection may have admitted and not yet answered on the socket.
    public var maxInFlightRequests: Int
    /// Connections the export keeps open at once (TCP and Unix socket together); one more
    /// is closed before the greeting.
    public var maxConnections: Int = ExportSettings.defaultMaxConnections

    public static let defaultMaxInFlightBytes = 64 << 20
    public static let defaultMaxInFlightRequests = 256
    /// Bounds checked by the config: below 1 MiB ordinary I/O would go one request at a time.
    public static let minInFlightBytes = 1 << 20
    public static let maxInFlightRequestsLimit = 65536
    public static let defaultMaxConnections = 16
    public static let maxConnectionsLimit = 4096

    /// Node `host`'s socket path.
    public func unixSocket(for host: String) -> String? {
        unixSocket?.replacingOccurrences(of: TLSSettings.hostPlaceholder, with: host)
    }

    public init(tls: ExportTLSMode = .off, clientCAFile: String? = nil, allow: [ClientNetwork] = [], unixSocket: String? = nil,
                maxInFlightBytes: Int = ExportSettings.defaultMaxInFlightBytes,
                maxInFlightRequests: Int = ExportSettings.defaultMaxInFlightRequests) {
        self.tls = tls; self.clientCAFile = clientCAFile; self.allow = allow; self.unixSocket = unixSocket
        self.maxInFlightBytes = maxInFlightBytes; self.maxInFlightRequests = maxInFlightRequests
    }
}

/// The `[status]` section: the listener of /metrics, /status, /healthz and the admin API.
public struct StatusSettings: Sendable, Equatable {
    /// HTTPS with the host's certificate; plaintext connections are refused.
    public var tls: Bool
    /// If set, GET /metrics and /status need this bearer token (or the admin token).
    public var readTokenFile: String?

    public init(tls: Bool = false, readTokenFile: String? = nil) {
        self.tls = tls; self.readTokenFile = readTokenFile
    }
}

/// A host's TLS identity, loaded and checked: its certificate chain, its private key
/// (which matches the leaf certificate) and the cluster CA.
public struct TLSIdentity: @unchecked Sendable {
    public let chain: [NIOSSLCertificate]
    public let privateKey: NIOSSLPrivateKey
    public let trustRoots: [NIOSSLCertificate]
    /// When the leaf certificate expires.
    public let notValidAfter: Date

    /// The gauge a daemon serving with this identity exports (alert well before it).
    public static let expiryMetric = "hamgr_tls_certificate_expiry_timestamp_seconds"
    public static let expiryHelp = "When this host's TLS certificate (tls.cert_file) expires, in Unix seconds."

    /// A server configuration: this identity; with `clientCA`, clients must present a
    /// certificate it signed.
    public func serverConfiguration(clientCA: [NIOSSLCertificate]? = nil) -> TLSConfiguration {
        var c = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                         privateKey: .privateKey(privateKey))
        c.minimumTLSVersion = .tlsv12
        if let clientCA {
            c.certificateVerification = .noHostnameVerification
            c.trustRoots = .certificates(clientCA)
        }
        return c
    }
}

/// Loading and checking TLS files; every error names the config key.
public enum TLSFiles {
    /// Certificates of a PEM file (a CA bundle or a chain), checked for validity dates.
    public static func certificates(_ path: String, key: String, now: Date = Date()) throws -> [NIOSSLCertificate] {
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw ConfigError(key: key, message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        let certs: [NIOSSLCertificate]
        do {
            certs = try NIOSSLCertificate.fromPEMFile(path)
        } catch {
            throw ConfigError(key: key, message: "\(path) is not a PEM certificate file (\(error))")
        }
        guard let first = certs.first else {
            throw ConfigError(key: key, message: "\(path) holds no certificate")
        }
        let after = Date(timeIntervalSince1970: TimeInterval(first.notValidAfter))
        let before = Date(timeIntervalSince1970: TimeInterval(first.notValidBefore))
        if after <= now {
            throw ConfigError(key: key, message: "\(path) expired on \(Self.format(after)); renew it (hamgr certs --renew)")
        }
        if before > now {
            throw ConfigError(key: key, message: "\(path) is not valid before \(Self.format(before)); check this host's clock")
        }
        return certs
    }

    /// A private key (PEM, unencrypted), mode 0600.
    public static func privateKey(_ path: String, key: String) throws -> NIOSSLPrivateKey {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ConfigError(key: key, message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        if st.st_mode & 0o077 != 0 {
            throw ConfigError(key: key, message: "\(path) has mode \(String(st.st_mode & 0o777, radix: 8)); a private key must not be readable by group or others (chmod 600)")
        }
        do {
            return try NIOSSLPrivateKey(file: path, format: .pem)
        } catch {
            throw ConfigError(key: key, message: "\(path) is not an unencrypted PEM private key (\(error))")
        }
    }

    /// Host `host`'s identity under `settings`: certificate, matching key, cluster CA.
    public static func identity(_ settings: TLSSettings, host: String, now: Date = Date()) throws -> TLSIdentity {
        let roots = try certificates(settings.caFile, key: "tls.ca_file", now: now)
        return try identity(certFile: settings.certFile(for: host), certKey: "tls.cert_file",
                            keyFile: settings.keyFile(for: host), keyKey: "tls.key_file", trustRoots: roots, now: now)
    }

    /// A certificate and its matching key from named files (`hamgr export --tls-cert
    /// --tls-key`); errors name `certKey` or `keyKey`.
    public static func identity(certFile: String, certKey: String, keyFile: String, keyKey: String,
                                trustRoots: [NIOSSLCertificate] = [], now: Date = Date()) throws -> TLSIdentity {
        let chain = try certificates(certFile, key: certKey, now: now)
        let key = try privateKey(keyFile, key: keyKey)
        // BoringSSL refuses a key that does not match the leaf certificate when both are set
        // on a context: that is the check.
        do {
            _ = try NIOSSLContext(configuration: .makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                                       privateKey: .privateKey(key)))
        } catch {
            throw ConfigError(key: keyKey, message: "\(keyFile) does not match the certificate \(certFile) (\(error))")
        }
        return TLSIdentity(chain: chain, privateKey: key, trustRoots: trustRoots,
                           notValidAfter: Date(timeIntervalSince1970: TimeInterval(chain[0].notValidAfter)))
    }

    static func format(_ d: Date) -> String {
        let f = ISO8601DateFormatter()
        return f.string(from: d)
    }
}
