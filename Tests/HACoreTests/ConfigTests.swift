import Crypto
import Foundation
import HACore
import HAShell
import XCTest

final class ConfigTests: XCTestCase {
    func testValidConfigLoadsWithEveryKey() throws {
        let f = try ConfigFixture()
        let c = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML))
        XCTAssertEqual(c.cluster.name, "web1")
        XCTAssertEqual(c.cluster.keyFile, f.dir + "/web1.key", "relative paths resolve against the config's directory")
        XCTAssertEqual(c.cluster.replicationProtocol, .c)
        XCTAssertEqual(c.cluster.splitBrain, .prohibit)
        XCTAssertEqual(c.timeouts, LeaseTimings.defaults)
        XCTAssertEqual(c.volume.sizeBytes, 1 << 30)
        XCTAssertEqual(c.volume.chunkSizeBytes, 64 << 10)
        XCTAssertEqual(c.volume.resyncRateBytesPerSecond, 100 << 20)
        XCTAssertEqual(c.nodes.map(\.name), ["a", "b"])
        XCTAssertEqual(c.nodes[1].serviceAddress, "10.2.0.1:10809")
        XCTAssertEqual(c.nodes[0].exportName, "web1", "export_name defaults to the cluster name")
        XCTAssertEqual(c.arbitrator.address, "10.3.0.1:7790")
        XCTAssertEqual(c.resources.count, 1)
        XCTAssertEqual(c.resources[0].agent, .ocf(provider: "heartbeat", agent: "Filesystem"))
        XCTAssertEqual(c.resources[0].params, ["device": "/dev/nbd0", "directory": "/srv/web1", "fstype": "ext4"])
        XCTAssertEqual(c.resources[0].monitorInterval, .milliseconds(5000))
        XCTAssertEqual(c.resources[0].maxRestarts, ClusterConfig.Resource.defaultMaxRestarts)
        XCTAssertEqual(c.hooks.onPromote, "/etc/hamgr/announce.sh")
        XCTAssertNil(c.hooks.onDemote)
        XCTAssertEqual(try c.node(named: "b").statusAddress, "10.2.0.1:9650")
        XCTAssertEqual(try c.peer(of: "a").name, "b")
        XCTAssertEqual(try c.loadAdminToken(), "s3cret-token-0123456789")
        XCTAssertNoThrow(try c.loadClusterKey())
    }

    func testOptionalSectionsTakeDefaults() throws {
        let f = try ConfigFixture()
        var toml = ConfigFixture.validTOML
        for cut in ["[timeouts]\nrenew_interval_ms = 200\nlease_ms = 1200\nfailure_timeout_ms = 800\n",
                    "chunk_size = \"64KiB\"\n", "resync_rate = \"100MiB\"\n", "admin_token_file = \"web1.token\"\n",
                    "protocol = \"C\"\n", "split_brain = \"prohibit\"\n"] {
            XCTAssertTrue(toml.contains(cut)); toml = toml.replacingOccurrences(of: cut, with: "")
        }
        let c = try ClusterConfig.load(path: f.write(toml))
        XCTAssertEqual(c.timeouts, LeaseTimings.defaults)
        XCTAssertEqual(c.volume.chunkSizeBytes, ClusterConfig.Volume.defaultChunkSizeBytes)
        XCTAssertNil(c.cluster.adminTokenFile)
        XCTAssertNil(try c.loadAdminToken())
        XCTAssertEqual(c.cluster.replicationProtocol, .c)
    }

    /// Each broken config is refused with one error naming the key.
    func testEachMistakeNamesItsKey() throws {
        let cases: [(String, String, String)] = [
            ("protocol = \"C\"", "protcol = \"C\"", "cluster.protcol"),
            ("protocol = \"C\"", "protocol = \"D\"", "cluster.protocol"),
            ("split_brain = \"prohibit\"", "split_brain = \"maybe\"", "cluster.split_brain"),
            ("split_brain = \"prohibit\"", "split_brain = \"prohibit\"\nafter_split_brain = \"discard-least-changes\"", "cluster.after_split_brain"),
            ("name = \"web1\"\n", "", "cluster.name"),
            ("name = \"web1\"", "name = \"web 1\"", "cluster.name"),
            ("service_address = \"10.2.0.1:10809\"", "service_address = \"10.1.0.1:10809\"", "node[1].service_address"),
            ("status_address = \"10.2.0.1:9650\"", "status_address = \"10.1.0.1:7788\"", "node[1].status_address"),
            ("replication_address = \"10.2.0.1:7788\"", "replication_address = \"10.2.0.1\"", "node[1].replication_address"),
            ("service_address = \"10.1.0.1:10809\"", "service_address = \"10.1.0.1:70000\"", "node[0].service_address"),
            ("address = \"10.3.0.1:7790\"", "address = \"10.3.0.1:x\"", "arbitrator.address"),
            ("backing = \"/var/lib/hamgr/web1-a.img\"", "backng = \"/var/lib/hamgr/web1-a.img\"", "node[0].backng"),
            ("metadata = \"/var/lib/hamgr/web1-b.meta\"\n", "", "node[1].metadata"),
            ("name = \"b\"", "name = \"a\"", "node[1].name"),
            ("size = \"1GiB\"", "size = \"1 gigabyte\"", "volume.size"),
            ("size = \"1GiB\"", "size = 1000000", "volume.size"),
            ("chunk_size = \"64KiB\"", "chunk_size = \"48KiB\"", "volume.chunk_size"),
            ("chunk_size = \"64KiB\"", "chunk_size = \"2KiB\"", "volume.chunk_size"),
            ("resync_rate = \"100MiB\"", "resync_rate = \"fast\"", "volume.resync_rate"),
            ("renew_interval_ms = 200", "renew_interval_ms = 500", "timeouts.renew_interval_ms"),
            ("failure_timeout_ms = 800", "failure_timeout_ms = 1300", "timeouts.failure_timeout_ms"),
            ("failure_timeout_ms = 800", "failure_timeout_ms = 800\ndrift = 0.7", "timeouts.drift"),
            ("failure_timeout_ms = 800", "failure_timeout_ms = 800\ndrift = 0", "timeouts.drift"),
            ("name = \"b\"", "name = \"arbitrator\"", "node[1].name"),
            ("lease_ms = 1200", "lease_ms = \"1200\"", "timeouts.lease_ms"),
            ("lease_ms = 1200", "lease_ms = -5", "timeouts.lease_ms"),
            ("[hooks]", "[hook]", "hook"),
            ("on_promote = \"/etc/hamgr/announce.sh\"", "on_promte = \"/etc/hamgr/announce.sh\"", "hooks.on_promte"),
            ("agent = \"ocf:heartbeat:Filesystem\"", "agent = \"lsb:apache\"", "resource[0].agent"),
            ("agent = \"ocf:heartbeat:Filesystem\"", "agent = \"exec:relative/script\"", "resource[0].agent"),
            ("fstype = \"ext4\" }", "fstype = \"ext4\", \"bad-name\" = 1 }", "resource[0].params.bad-name"),
            ("monitor_interval_ms = 5000", "monitor_interval_ms = 0", "resource[0].monitor_interval_ms"),
            ("monitor_interval_ms = 5000", "monitor_interval_ms = 5000\n\n[[resource]]\nname = \"fs\"\nagent = \"ocf:heartbeat:Dummy\"", "resource[1].name"),
            ("[arbitrator]\naddress = \"10.3.0.1:7790\"\nstatus_address = \"10.3.0.1:9651\"\nstate_dir = \"/var/lib/hamgr/arbitrator\"\n", "", "arbitrator"),
            ("key_file = \"web1.key\"", "key_file = \"missing.key\"", "cluster.key_file"),
            ("agent = \"ocf:heartbeat:Filesystem\"", "agent = \"hamgr:nbd-attach\"", "resource[0].params.directory"),
            ("agent = \"ocf:heartbeat:Filesystem\"\nparams = { device = \"/dev/nbd0\", directory = \"/srv/web1\", fstype = \"ext4\" }",
             "agent = \"hamgr:nbd-attach\"\nparams = { device = \"/dev/sda\" }", "resource[0].params.device"),
            ("agent = \"ocf:heartbeat:Filesystem\"\nparams = { device = \"/dev/nbd0\", directory = \"/srv/web1\", fstype = \"ext4\" }",
             "agent = \"hamgr:nbd-attach\"\nparams = { state_dir = \"/run/x\" }", "resource[0].params.device"),
            ("[cluster]", "[cluster\n", "config"),
        ]
        for (old, new, key) in cases {
            let f = try ConfigFixture()
            let path = try f.write(ConfigFixture.variant(old, new))
            XCTAssertThrowsError(try ClusterConfig.load(path: path), "\(new) should be refused") { error in
                guard let e = error as? ConfigError else { return XCTFail("\(new): not a ConfigError: \(error)") }
                XCTAssertEqual(e.key, key, "\(new) → \(e)")
                XCTAssertFalse(e.message.isEmpty)
            }
        }
    }

    func testTypoSuggestsTheKnownKey() throws {
        let f = try ConfigFixture()
        let path = try f.write(ConfigFixture.variant("lease_ms = 1200", "leas_ms = 1200"))
        XCTAssertThrowsError(try ClusterConfig.load(path: path)) { error in
            XCTAssertEqual((error as? ConfigError)?.description, "timeouts.leas_ms: unknown key; did you mean 'lease_ms'?")
        }
    }

    func testExactlyTwoNodes() throws {
        let f = try ConfigFixture()
        let secondNode = """
        [[node]]
        name = "b"
        replication_address = "10.2.0.1:7788"
        service_address = "10.2.0.1:10809"
        status_address = "10.2.0.1:9650"
        backing = "/var/lib/hamgr/web1-b.img"
        metadata = "/var/lib/hamgr/web1-b.meta"

        """
        let path = try f.write(ConfigFixture.variant(secondNode, ""))
        XCTAssertThrowsError(try ClusterConfig.load(path: path)) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "node")
        }
    }

    func testKeyFileRules() throws {
        let short = try ConfigFixture()
        try short.writeSecret("web1.key", Data(repeating: 7, count: 16))
        XCTAssertThrowsError(try ClusterConfig.load(path: short.write(ConfigFixture.validTOML))) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "cluster.key_file")
            XCTAssertTrue("\(error)".contains("32"), "\(error)")
        }
        let open = try ConfigFixture()
        chmod(open.dir + "/web1.key", 0o644)
        XCTAssertThrowsError(try ClusterConfig.load(path: open.write(ConfigFixture.validTOML))) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "cluster.key_file")
            XCTAssertTrue("\(error)".contains("chmod 600"), "\(error)")
        }
    }

    /// `key_file = "${CREDENTIALS_DIRECTORY}/…"`: a systemd credential (`LoadCredential=`),
    /// kept as written by the parser and expanded when the key is read.
    func testKeyFileFromSystemdCredential() throws {
        let f = try ConfigFixture()
        let creds = f.dir + "/credentials"
        try FileManager.default.createDirectory(atPath: creds, withIntermediateDirectories: false)
        let key = Data((0..<32).map { _ in UInt8.random(in: 0...255) })
        FileManager.default.createFile(atPath: creds + "/web1.key", contents: key, attributes: [.posixPermissions: 0o400])
        FileManager.default.createFile(atPath: creds + "/web1.read", contents: Data("read-token-0123456789\n".utf8),
                                       attributes: [.posixPermissions: 0o400])
        let toml = ConfigFixture.variant(#"key_file = "web1.key""#, #"key_file = "${CREDENTIALS_DIRECTORY}/web1.key""#)
            + "\n[status]\nread_token_file = \"${CREDENTIALS_DIRECTORY}/web1.read\"\n"
        let parsed = try ClusterConfig.parse(toml: toml, relativeTo: f.dir)
        XCTAssertEqual(parsed.cluster.keyFile, "${CREDENTIALS_DIRECTORY}/web1.key", "not resolved against the config's directory")
        XCTAssertEqual(parsed.status.readTokenFile, "${CREDENTIALS_DIRECTORY}/web1.read")
        XCTAssertEqual(parsed.cluster.adminTokenFile, f.dir + "/web1.token", "other paths resolve as before")

        let saved = getenv(SystemdCredentials.variable).map { String(cString: $0) }
        defer { if let saved { setenv(SystemdCredentials.variable, saved, 1) } else { unsetenv(SystemdCredentials.variable) } }

        // Inside the unit: systemd sets the variable, the key and the token are read from there.
        setenv(SystemdCredentials.variable, creds, 1)
        let config = try ClusterConfig.load(path: f.write(toml))
        XCTAssertEqual(try config.loadClusterKeys().map { $0.withUnsafeBytes { Data($0) } }, [key])
        XCTAssertEqual(try config.loadReadToken(), "read-token-0123456789")

        // Outside it: one error naming the key and the way out, not a missing file named "${…".
        unsetenv(SystemdCredentials.variable)
        XCTAssertThrowsError(try ClusterConfig.load(path: f.write(toml))) { error in
            guard let e = error as? ConfigError else { return XCTFail("not a ConfigError: \(error)") }
            XCTAssertEqual(e.key, "cluster.key_file")
            XCTAssertTrue(e.message.contains("CREDENTIALS_DIRECTORY is not set") && e.message.contains("LoadCredential="), e.message)
        }
        setenv(SystemdCredentials.variable, "", 1)
        XCTAssertThrowsError(try config.loadReadToken()) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "status.read_token_file")
        }
        // A credential is checked like any key file: the wrong directory is a missing file.
        setenv(SystemdCredentials.variable, f.dir + "/elsewhere", 1)
        XCTAssertThrowsError(try config.loadClusterKey()) { error in
            XCTAssertTrue("\(error)".contains(f.dir + "/elsewhere/web1.key"), "\(error)")
        }

        XCTAssertEqual(try SystemdCredentials.expand("/etc/hamgr/k", key: "k", environment: [:]), "/etc/hamgr/k")
        XCTAssertEqual(try SystemdCredentials.expand("${CREDENTIALS_DIRECTORY}/k", key: "k",
                                                     environment: ["CREDENTIALS_DIRECTORY": "/run/credentials/x.service"]),
                       "/run/credentials/x.service/k")
    }

    func testTokenFileRules() throws {
        // The admin token is read on the data nodes only (the arbitrator host need not hold it).
        let open = try ConfigFixture()
        chmod(open.dir + "/web1.token", 0o640)
        let openConfig = try ClusterConfig.load(path: open.write(ConfigFixture.validTOML))
        XCTAssertNoThrow(try openConfig.validateArbitratorHost())
        XCTAssertThrowsError(try openConfig.validateNodeCredentials("a")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "cluster.admin_token_file")
        }
        let empty = try ConfigFixture()
        try empty.writeSecret("web1.token", Data("\n".utf8))
        XCTAssertThrowsError(try ClusterConfig.load(path: empty.write(ConfigFixture.validTOML)).validateNodeCredentials("b")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "cluster.admin_token_file")
        }
    }

    func testStatusSectionTLSAndReadToken() throws {
        // HTTPS on the status listener needs certificates.
        let bare = try ConfigFixture()
        XCTAssertThrowsError(try ClusterConfig.load(path: bare.write(ConfigFixture.validTOML + "\n[status]\ntls = true\n"))) { error in
            guard let e = error as? ConfigError else { return XCTFail("not a ConfigError: \(error)") }
            XCTAssertEqual(e.key, "status.tls")
            XCTAssertTrue(e.message.contains("[tls]"), e.message)
        }
        let plain = try ClusterConfig.load(path: bare.write(ConfigFixture.validTOML + "\n[status]\ntls = false\n"))
        XCTAssertFalse(plain.status.tls)
        XCTAssertEqual(plain.statusURL("10.2.0.1:9650"), "http://10.2.0.1:9650")

        // With [tls], HTTPS is the default; the read token file resolves next to the config.
        let tls = try ConfigFixture()
        let withTLS = ConfigFixture.validTOML + """

        [tls]
        ca_file = "tls/ca.crt"
        cert_file = "tls/{name}.crt"
        key_file = "tls/{name}.key"

        [status]
        read_token_file = "read.token"

        """
        let c = try ClusterConfig.load(path: tls.write(withTLS))
        XCTAssertTrue(c.status.tls)
        XCTAssertEqual(c.statusURL("10.2.0.1:9650"), "https://10.2.0.1:9650")
        XCTAssertEqual(c.status.readTokenFile, tls.dir + "/read.token")
        // The arbitrator host checks the read token its status listener needs.
        let noHTTPS = try ClusterConfig.load(path: tls.write(withTLS.replacingOccurrences(of: "[status]\n", with: "[status]\ntls = false\n")))
        XCTAssertThrowsError(try noHTTPS.validateArbitratorHost()) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "status.read_token_file", "\(error)")
        }
        try tls.writeSecret("read.token", Data("read-token-0123456789\n".utf8))
        XCTAssertNoThrow(try noHTTPS.validateArbitratorHost())
    }

    func testUnknownNodeName() throws {
        let f = try ConfigFixture()
        let c = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML))
        XCTAssertThrowsError(try c.node(named: "c")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "node")
            XCTAssertTrue("\(error)".contains("nodes: a, b"), "\(error)")
        }
    }

    func testNodeHostChecksHooksAndExecResources() throws {
        let f = try ConfigFixture()
        let hook = f.dir + "/announce.sh"
        try "#!/bin/sh\nexit 0\n".write(toFile: hook, atomically: true, encoding: .utf8)
        chmod(hook, 0o755)
        let good = try ClusterConfig.load(path: f.write(ConfigFixture.variant("/etc/hamgr/announce.sh", "announce.sh")
            .replacingOccurrences(of: "[volume]\n", with: "[volume]\ncreate = true\n")))
        XCTAssertNoThrow(try good.validateNodeHost("a"))
        let bad = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML.replacingOccurrences(of: "[volume]\n", with: "[volume]\ncreate = true\n")))
        XCTAssertThrowsError(try bad.validateNodeHost("a")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "hooks.on_promote")
        }
        // Without create, a backing path that does not exist is named first.
        let noCreate = try ClusterConfig.load(path: f.write(ConfigFixture.variant("/etc/hamgr/announce.sh", "announce.sh")))
        XCTAssertThrowsError(try noCreate.validateNodeHost("a")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "node[0].backing")
        }
    }

    func testResourceAgentForms() throws {
        XCTAssertEqual(try ClusterConfig.ResourceAgent.parse("ocf:heartbeat:IPaddr2", key: "k"), .ocf(provider: "heartbeat", agent: "IPaddr2"))
        XCTAssertEqual(try ClusterConfig.ResourceAgent.parse("systemd:nginx", key: "k"), .systemd(unit: "nginx.service"))
        XCTAssertEqual(try ClusterConfig.ResourceAgent.parse("systemd:srv-web1.mount", key: "k"), .systemd(unit: "srv-web1.mount"))
        XCTAssertEqual(try ClusterConfig.ResourceAgent.parse("exec:/usr/local/bin/svc:x", key: "k"), .exec(path: "/usr/local/bin/svc:x"))
        XCTAssertEqual(try ClusterConfig.ResourceAgent.parse("hamgr:nbd-attach", key: "k"), .nbdAttach)
        for bad in ["ocf:heartbeat", "ocf::Dummy", "ocf:../x:Dummy", "systemd:", "exec:", "Dummy", "hamgr:nbd", "hamgr:"] {
            XCTAssertThrowsError(try ClusterConfig.ResourceAgent.parse(bad, key: "resource[0].agent"), bad)
        }
    }

    /// `hamgr:nbd-attach`: `/dev/nbdN` is the kernel client, any other path (not under
    /// /dev) the nbdfuse symlink; the state directory defaults per cluster and resource.
    func testNBDAttachParameters() throws {
        let kernel = try NBDAttachSettings(params: ["device": "/dev/nbd3"], key: "p")
        XCTAssertEqual(kernel.method, .nbdClient)
        XCTAssertEqual(kernel.stateDirectory(cluster: "web1", resource: "disk"), "/run/hamgr/web1/disk")
        let fuse = try NBDAttachSettings(params: ["device": "/run/hamgr/web1/disk", "state_dir": "/var/tmp/x"], key: "p")
        XCTAssertEqual(fuse.method, .nbdfuse)
        XCTAssertEqual(fuse.stateDirectory(cluster: "web1", resource: "disk"), "/var/tmp/x")
        for (params, key) in [(["device": "disk"], "p.device"), (["device": "/dev/nbd"], "p.device"), (["device": "/dev/loop0"], "p.device"),
                              (["device": "/x/"], "p.device"), (["device": "/x", "fstype": "ext4"], "p.fstype"), (["device": "/x", "state_dir": "rel"], "p.state_dir")] {
            XCTAssertThrowsError(try NBDAttachSettings(params: params, key: "p"), "\(params)") { error in
                XCTAssertEqual((error as? ConfigError)?.key, key, "\(params): \(error)")
            }
        }
    }

    /// A reload names each changed key as it is spelled in the file, nothing else.
    func testChangedKeysNameEachKey() throws {
        let f = try ConfigFixture()
        let a = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML))
        XCTAssertEqual(a.changedKeys(comparedTo: a), [])
        var b = a
        b.timeouts.lease = .milliseconds(1500)
        b.nodes[1].serviceAddress = "10.2.0.1:10810"
        b.resources[0].params["fstype"] = "xfs"
        b.resources.append(ClusterConfig.Resource(name: "web", agent: .systemd(unit: "nginx.service")))
        b.export.allow = [ClientNetwork("10.0.0.0/8")!]
        b.logLevel = "debug"
        XCTAssertEqual(a.changedKeys(comparedTo: b),
                       ["timeouts.lease_ms", "node[1].service_address", "resource[0].params", "resource[1]", "export.allow", "log.level"])
    }

    func testSizes() throws {
        XCTAssertEqual(try ByteSize.parse("1GiB", key: "k"), 1 << 30)
        XCTAssertEqual(try ByteSize.parse("64KiB", key: "k"), 65536)
        XCTAssertEqual(try ByteSize.parse("100 MiB", key: "k"), 100 << 20)
        XCTAssertEqual(try ByteSize.parse("4096", key: "k"), 4096)
        XCTAssertEqual(try ByteSize.parse("512B", key: "k"), 512)
        XCTAssertEqual(try ByteSize.parse("2GB", key: "k"), 2_000_000_000)
        for bad in ["", "GiB", "1.5GiB", "-1", "1 PiB", "99999999999999999999", "20000000TiB"] {
            XCTAssertThrowsError(try ByteSize.parse(bad, key: "volume.size"), bad) { error in
                XCTAssertEqual((error as? ConfigError)?.key, "volume.size")
            }
        }
        XCTAssertEqual(ByteSize.format(1 << 30), "1 GiB")
        XCTAssertEqual(ByteSize.format(1536 << 20), "1.5 GiB")
        XCTAssertEqual(ByteSize.format(100), "100 B")
    }

    /// `[export] max_in_flight_bytes` and `max_in_flight_requests`: defaults, sizes, and
    /// refusals that name the key.
    func testExportInFlightLimits() throws {
        let f = try ConfigFixture()
        let defaults = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML))
        XCTAssertEqual(defaults.export.maxInFlightBytes, 64 << 20)
        XCTAssertEqual(defaults.export.maxInFlightRequests, 256)
        XCTAssertEqual(defaults.export.maxConnections, 16)
        let set = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML + "\n[export]\nmax_in_flight_bytes = \"16MiB\"\nmax_in_flight_requests = 32\nmax_connections = 4\n"))
        XCTAssertEqual(set.export.maxInFlightBytes, 16 << 20)
        XCTAssertEqual(set.export.maxInFlightRequests, 32)
        XCTAssertEqual(set.export.maxConnections, 4)
        XCTAssertEqual(defaults.changedKeys(comparedTo: set), ["export.max_in_flight_bytes", "export.max_in_flight_requests", "export.max_connections"],
                       "a reload names them: they apply at the next start")
        for (line, key) in [("max_in_flight_bytes = \"512KiB\"", "export.max_in_flight_bytes"),
                            ("max_in_flight_bytes = \"3GiB\"", "export.max_in_flight_bytes"),
                            ("max_in_flight_bytes = \"lots\"", "export.max_in_flight_bytes"),
                            ("max_in_flight_requests = 0", "export.max_in_flight_requests"),
                            ("max_in_flight_requests = 100000", "export.max_in_flight_requests"),
                            ("max_in_flight_requests = \"8\"", "export.max_in_flight_requests"),
                            ("max_connections = 0", "export.max_connections"),
                            ("max_connections = 5000", "export.max_connections")] {
            XCTAssertThrowsError(try ClusterConfig.load(path: f.write(ConfigFixture.validTOML + "\n[export]\n" + line + "\n")), line) { error in
                guard let e = error as? ConfigError else { return XCTFail("\(line): not a ConfigError: \(error)") }
                XCTAssertEqual(e.key, key, "\(line) → \(e)")
            }
        }
    }

    /// `[volume] link_send_buffer` and `apply_queue`: the link's backpressure bounds.
    func testLinkBackpressureBounds() throws {
        let f = try ConfigFixture()
        let defaults = try ClusterConfig.load(path: f.write(ConfigFixture.validTOML))
        XCTAssertEqual(defaults.volume.linkSendBufferBytes, 8 << 20)
        XCTAssertEqual(defaults.volume.applyQueueBytes, 64 << 20)
        let set = try ClusterConfig.load(path: f.write(ConfigFixture.variant("resync_rate = \"100MiB\"",
                                                                           "resync_rate = \"100MiB\"\nlink_send_buffer = \"32MiB\"\napply_queue = \"256MiB\"")))
        XCTAssertEqual(set.volume.linkSendBufferBytes, 32 << 20)
        XCTAssertEqual(set.volume.applyQueueBytes, 256 << 20)
        XCTAssertEqual(defaults.changedKeys(comparedTo: set), ["volume.link_send_buffer", "volume.apply_queue"])
        for (line, key) in [("link_send_buffer = \"512KiB\"", "volume.link_send_buffer"),
                            ("link_send_buffer = \"2GiB\"", "volume.link_send_buffer"),
                            ("apply_queue = \"1MiB\"", "volume.apply_queue"),
                            ("apply_queue = \"8GiB\"", "volume.apply_queue"),
                            ("apply_queue = 7", "volume.apply_queue")] {
            XCTAssertThrowsError(try ClusterConfig.load(path: f.write(ConfigFixture.variant("resync_rate = \"100MiB\"", "resync_rate = \"100MiB\"\n" + line))), line) { error in
                guard let e = error as? ConfigError else { return XCTFail("\(line): not a ConfigError: \(error)") }
                XCTAssertEqual(e.key, key, "\(line) → \(e)")
            }
        }
    }
}
