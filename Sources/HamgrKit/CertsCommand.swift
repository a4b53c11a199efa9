import ArgumentParser
import Foundation
import HAShell

/// `hamgr certs`: make the cluster CA and every host's certificate with `openssl`, at the
/// paths the config's `[tls]` section names (docs/operator-guide.md, "Security").
///
/// Each host certificate names the host (`DNS:<name>`) and every address it serves on
/// (`IP:` or `DNS:` for the hosts of its service, status and replication addresses), so
/// clients that check the name (libnbd, qemu, hactl) accept it under the address they dial.
/// Keys are ECDSA P-256, written mode 0600. Files that exist are kept unless `--renew`
/// (which re-issues host certificates under the existing CA; the CA is never replaced).
struct CertsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "certs",
        abstract: "Make the cluster CA and the nodes' and arbitrator's certificates (or an NBD client's), using openssl.",
        discussion: """
            The paths come from the config's [tls] section; the CA's private key is written next to \
            ca_file as <ca_file without .crt/.pem>.key (keep it off the nodes once done).
            With --client NAME --out DIR, writes DIR/ca-cert.pem, DIR/client-cert.pem and \
            DIR/client-key.pem: the layout libnbd (tls-certificates=DIR) and qemu \
            (tls-creds-x509,dir=DIR) read.
            """)

    @Option(name: .long, help: "The cluster's TOML config file (its [tls] section says where the files go).")
    var config: String

    @Flag(name: .long, help: "Re-issue the host certificates (and keys) that already exist, under the existing CA.")
    var renew = false

    @Option(name: .long, help: "Validity of host and client certificates, in days.")
    var days: Int = 825

    @Option(name: .long, help: "Make a client certificate with this common name instead (needs --out).")
    var client: String?

    @Option(name: .long, help: "Directory for --client files.")
    var out: String?

    func validate() throws {
        guard (1...3650).contains(days) else { throw ValidationError("--days must be 1…3650") }
        if client != nil, out == nil { throw ValidationError("--client needs --out DIR") }
        if out != nil, client == nil { throw ValidationError("--out is only for --client") }
        if let c = client, c.isEmpty || !c.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }) {
            throw ValidationError("--client: '\(c)' must use only letters, digits, '-', '_' and '.'")
        }
    }

    func run() throws {
        let cfg = try loadConfig(config)
        guard let tls = cfg.tls else {
            throw ValidationError("\(config): no [tls] section; add ca_file, cert_file and key_file (e.g. \"tls/ca.crt\", \"tls/{name}.crt\", \"tls/{name}.key\")")
        }
        let pki = OpenSSLPKI(caCert: tls.caFile, caKey: Self.caKeyPath(tls.caFile), days: days)
        try pki.ensureCA(commonName: "hamgr CA \(cfg.cluster.name)")
        if let client, let out {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            try pki.issue(commonName: client, sans: ["DNS:\(client)"], cert: "\(out)/client-cert.pem", key: "\(out)/client-key.pem", renew: renew)
            try OpenSSLPKI.copy(tls.caFile, to: "\(out)/ca-cert.pem")
            print("client \(client): \(out)/client-cert.pem, \(out)/client-key.pem, \(out)/ca-cert.pem")
            return
        }
        var hosts: [(name: String, addresses: [String])] = cfg.nodes.map {
            ($0.name.name, [$0.serviceAddress, $0.statusAddress, $0.replicationAddress])
        }
        hosts.append((ClusterConfig.reservedArbitratorName, [cfg.arbitrator.address] + (cfg.arbitrator.statusAddress.map { [$0] } ?? [])))
        for h in hosts {
            var sans = ["DNS:\(h.name)"]
            for a in h.addresses {
                guard let host = try? parseHostPort(a).host else { continue }
                let san = ClientNetwork(host) != nil ? "IP:\(host)" : "DNS:\(host)"
                if !sans.contains(san) { sans.append(san) }
            }
            let cert = tls.certFile(for: h.name), key = tls.keyFile(for: h.name)
            if try pki.issue(commonName: h.name, sans: sans, cert: cert, key: key, renew: renew) {
                print("\(h.name): \(cert) (\(sans.joined(separator: ", ")))")
            } else {
                print("\(h.name): \(cert) exists; kept (--renew re-issues it)")
            }
        }
        print("CA: \(tls.caFile) (its key \(pki.caKey) signs new certificates; keep it off the nodes)")
    }

    static func caKeyPath(_ caFile: String) -> String {
        for ext in [".crt", ".pem"] where caFile.hasSuffix(ext) { return String(caFile.dropLast(ext.count)) + ".key" }
        return caFile + ".key"
    }
}

/// The few `openssl` invocations a cluster PKI needs.
struct OpenSSLPKI {
    let caCert: String
    let caKey: String
    let days: Int

    func ensureCA(commonName: String) throws {
        let fm = FileManager.default
        if fm.fileExists(atPath: caCert) {
            guard fm.fileExists(atPath: caKey) else {
                throw ValidationError("\(caCert) exists but its key \(caKey) does not: new certificates cannot be signed (restore the CA key, or move the CA away to make a new one)")
            }
            return
        }
        try Self.makeParent(caCert); try Self.makeParent(caKey)
        try Self.openssl(["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                          "-keyout", caKey, "-out", caCert, "-days", "3650", "-subj", "/CN=\(commonName)",
                          "-addext", "basicConstraints=critical,CA:TRUE",
                          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        try Self.restrict(caKey)
        print("CA: made \(caCert) (valid 10 years)")
    }

    /// Issue a certificate; false if it exists and `renew` is off.
    @discardableResult
    func issue(commonName: String, sans: [String], cert: String, key: String, renew: Bool) throws -> Bool {
        if FileManager.default.fileExists(atPath: cert) && !renew { return false }
        try Self.makeParent(cert); try Self.makeParent(key)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("hamgr-certs-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let csr = "\(tmp)/req.csr", ext = "\(tmp)/ext.cnf", newKey = "\(tmp)/key.pem"
        try """
            basicConstraints = critical, CA:FALSE
            keyUsage = digitalSignature, keyEncipherment
            extendedKeyUsage = serverAuth, clientAuth
            subjectAltName = \(sans.joined(separator: ", "))

            """.write(toFile: ext, atomically: true, encoding: .utf8)
        try Self.openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                          "-keyout", newKey, "-out", csr, "-subj", "/CN=\(commonName)"])
        try Self.openssl(["x509", "-req", "-in", csr, "-CA", caCert, "-CAkey", caKey, "-set_serial",
                          "0x" + (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255) & 0x7f) }.joined(),
                          "-days", String(days), "-sha256", "-extfile", ext, "-out", cert])
        try Self.restrict(newKey)
        // Replace the key last and atomically: a reader sees the old pair or the new key.
        if rename(newKey, key) != 0 {
            try? FileManager.default.removeItem(atPath: key)
            try FileManager.default.copyItem(atPath: newKey, toPath: key)
            try Self.restrict(key)
        }
        return true
    }

    static func copy(_ from: String, to: String) throws {
        try? FileManager.default.removeItem(atPath: to)
        try FileManager.default.copyItem(atPath: from, toPath: to)
    }

    static func restrict(_ path: String) throws {
        guard chmod(path, 0o600) == 0 else { throw ValidationError("chmod 600 \(path): \(String(cString: strerror(errno)))") }
    }

    static func makeParent(_ path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
    }

    static func openssl(_ args: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["openssl"] + args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        do { try p.run() } catch {
            throw ValidationError("cannot run openssl (apt-get install openssl): \(error)")
        }
        let text = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            let why = String(decoding: text, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw ValidationError("openssl \(args.first ?? "") failed (status \(p.terminationStatus)): \(why)")
        }
    }
}
