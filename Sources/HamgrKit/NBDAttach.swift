import Foundation
import HAShell

/// Where a node reaches its own export (`hamgr:nbd-attach`): the Unix socket when
/// `[export] unix_socket` is set (no TLS, no allow-list), else its service address, over TLS
/// when the export requires it.
struct NBDAttachTarget: Sendable, Equatable {
    struct TLSFiles: Sendable, Equatable {
        var caFile: String
        /// This host's certificate and key, presented when the export asks for a client
        /// certificate (`export.client_ca_file`); nil otherwise.
        var certFile: String?
        var keyFile: String?
    }

    var exportName: String
    var unixSocket: String?
    var host: String
    var port: Int
    var tls: TLSFiles?

    /// Node `node`'s own export as `config` describes it.
    static func own(_ config: ClusterConfig, node: ClusterConfig.Node) throws -> NBDAttachTarget {
        let (host, port) = try parseHostPort(node.serviceAddress, key: "node.service_address")
        // A wildcard listener is reached on loopback.
        let dial = host == "0.0.0.0" ? "127.0.0.1" : host == "::" ? "::1" : host
        var tls: TLSFiles?
        if config.export.tls == .require, let t = config.tls {
            let withCert = config.export.clientCAFile != nil
            tls = TLSFiles(caFile: t.caFile, certFile: withCert ? t.certFile(for: node.name.name) : nil,
                           keyFile: withCert ? t.keyFile(for: node.name.name) : nil)
        }
        return NBDAttachTarget(exportName: node.exportName, unixSocket: config.export.unixSocket(for: node.name.name),
                               host: dial, port: port, tls: tls)
    }
}

/// `hamgr:nbd-attach`: attaches this node's own export as a local block device at the path
/// the operator names (`device`), so a `Filesystem` resource after it can mount it.
/// `/dev/nbdN` uses the kernel client (`nbd-client`, module `nbd`); any other path uses
/// `nbdfuse` (the export as a file on a FUSE mount in the state directory) and `losetup`
/// (that file as a loop device), with `device` a symlink to the loop device. Stop undoes
/// everything it finds, also what a crash left: the symlink, every loop device on the FUSE
/// file, the FUSE mount, the nbdfuse process.
struct NBDAttachDriver: ResourceDriver {
    let name: String
    /// The FUSE file's name: also how a loop device on it is recognised after its mount was
    /// detached lazily (nbdfuse unmounts that way when it ends), when the kernel shows the
    /// file as `/NAME`.
    let fuseName: String
    let settings: NBDAttachSettings?
    let settingsError: String?
    let stateDir: String
    let target: NBDAttachTarget?
    let timeout: Duration

    init(resource: ClusterConfig.Resource, cluster: String, target: NBDAttachTarget?) {
        name = resource.name
        fuseName = "hamgr-\(cluster)-\(resource.name)"
        do {
            let s = try NBDAttachSettings(params: resource.params, key: "resource \(resource.name) params")
            settings = s
            settingsError = nil
            stateDir = s.stateDirectory(cluster: cluster, resource: resource.name)
        } catch {
            settings = nil
            settingsError = "\(error)"
            stateDir = "/run/hamgr/\(cluster)/\(resource.name)"
        }
        self.target = target
        timeout = resource.timeout
    }

    var fuseDir: String { stateDir + "/fuse" }
    var fuseFile: String { fuseDir + "/" + fuseName }
    var pidFile: String { stateDir + "/nbdfuse.pid" }
    var logFile: String { stateDir + "/nbdfuse.log" }
    var tlsDir: String { stateDir + "/tls" }

    func run(_ action: ResourceAction) async -> AgentResult {
        guard let settings else { return AgentResult(code: OCFStatus.errConfigured.rawValue, detail: settingsError ?? "bad parameters") }
        let deadline = ContinuousClock.now + timeout
        switch (settings.method, action) {
        case (.nbdfuse, .start): return await fuseStart(settings, deadline: deadline)
        case (.nbdfuse, .stop): return await fuseStop(settings, deadline: deadline)
        case (.nbdfuse, .monitor), (.nbdfuse, .probe): return await fuseMonitor(settings, deadline: deadline)
        case (.nbdClient, .start): return await kernelStart(settings, deadline: deadline)
        case (.nbdClient, .stop): return await kernelStop(settings, deadline: deadline)
        case (.nbdClient, .monitor), (.nbdClient, .probe): return await kernelMonitor(settings, deadline: deadline)
        }
    }

    // MARK: nbdfuse + losetup

    private func fuseStart(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        guard let target else { return AgentResult(code: OCFStatus.errConfigured.rawValue, detail: "this node's export is not known") }
        let now = await fuseMonitor(s, deadline: deadline)
        if now.ok { return AgentResult(code: 0, detail: "already attached: \(s.device) → \(loopDevices().joined(separator: ", "))") }
        if now.status != .notRunning {
            // A half-attached leftover (a crash between the steps): undo it first.
            let clean = await fuseStop(s, deadline: deadline)
            guard clean.ok else { return .failure("cleaning up a partial attachment: \(clean.detail)") }
        }
        // The device path is ours to replace only as a symlink: never over a file an operator made.
        if FileManager.default.fileExists(atPath: s.device) && !isSymlink(s.device) {
            return AgentResult(code: OCFStatus.errConfigured.rawValue, detail: "\(s.device) exists and is not a symlink; hamgr replaces only its own symlink there")
        }
        for tool in ["nbdfuse", "losetup", "fusermount3", "setsid"] where Self.which(tool) == nil {
            return AgentResult(code: OCFStatus.errInstalled.rawValue, detail: "\(tool) is not installed (packages libnbd-bin, util-linux, fuse3)")
        }
        do {
            try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try? FileManager.default.removeItem(atPath: pidFile)
            var args = ["-P", pidFile, fuseFile]
            if let sock = target.unixSocket {
                args += ["--unix", sock]
            } else if let tls = target.tls {
                guard let nbdkit = Self.which("nbdkit") else {
                    return AgentResult(code: OCFStatus.errInstalled.rawValue, detail: "nbdkit is not installed (package nbdkit): it carries the TLS for nbdfuse")
                }
                args += try tlsCommand(target, tls: tls, nbdkit: nbdkit)
            } else {
                args += ["--tcp", target.host, String(target.port)]
            }
            // setsid -f: nbdfuse outlives this action (and a restart of hamgr) in a session
            // of its own; its output goes to the state directory (this attachment's only),
            // not to our pipe.
            let script = "log=$1; shift; exec setsid -f \"$@\" >\"$log\" 2>&1 </dev/null"
            let r = try await ChildProcess.run(path: "/bin/sh", arguments: ["-c", script, "sh", logFile, Self.which("nbdfuse")!] + args,
                                               environment: [:], timeout: remaining(deadline))
            guard r.succeeded else { return .failure("nbdfuse: \(r.statusDescription) \(HookRunner.tail(r.output))") }
        } catch {
            return .failure("nbdfuse: \(error)")
        }
        // nbdfuse writes its pid file once the FUSE file serves. Nothing here touches the
        // FUSE file itself: a hung nbdfuse would block this thread where no timeout reaches.
        var seenRunning = false
        while ContinuousClock.now < deadline, !FileManager.default.fileExists(atPath: pidFile) {
            let running = !nbdfuseProcesses().isEmpty
            if seenRunning && !running { break }  // it gave up (the log says why)
            seenRunning = seenRunning || running
            try? await Task.sleep(for: .milliseconds(50))
        }
        guard FileManager.default.fileExists(atPath: pidFile), isMounted(fuseDir) else {
            let why = (try? String(contentsOfFile: logFile, encoding: .utf8)).map { HookRunner.tail($0) } ?? ""
            _ = await fuseStop(s, deadline: ContinuousClock.now + .seconds(10))
            return .failure("nbdfuse did not expose the export at \(fuseFile) in time: \(why)")
        }
        do {
            let lo = try await ChildProcess.run(path: Self.which("losetup")!, arguments: ["--find", "--show", fuseFile],
                                                environment: [:], timeout: remaining(deadline))
            let loop = lo.output.trimmingCharacters(in: .whitespacesAndNewlines)
            guard lo.succeeded, loop.hasPrefix("/dev/loop") else {
                _ = await fuseStop(s, deadline: ContinuousClock.now + .seconds(10))
                return .failure("losetup \(fuseFile): \(lo.statusDescription) \(HookRunner.tail(lo.output))")
            }
            try FileManager.default.createDirectory(atPath: (s.device as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            // Replace in one rename: a reader never sees the path missing or half made.
            let tmp = s.device + ".hamgr-new"
            try? FileManager.default.removeItem(atPath: tmp)
            try FileManager.default.createSymbolicLink(atPath: tmp, withDestinationPath: loop)
            guard rename(tmp, s.device) == 0 else {
                let e = errno
                try? FileManager.default.removeItem(atPath: tmp)
                throw POSIXError(POSIXErrorCode(rawValue: e) ?? .EIO)
            }
            return AgentResult(code: 0, detail: "\(s.device) → \(loop)")
        } catch {
            _ = await fuseStop(s, deadline: ContinuousClock.now + .seconds(10))
            return .failure("attaching \(s.device): \(error)")
        }
    }

    private func fuseStop(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        var problems: [String] = []
        var found = false
        if isSymlink(s.device) {
            found = true
            if unlink(s.device) != 0 { problems.append("removing \(s.device): \(String(cString: strerror(errno)))") }
        }
        // Every loop device on the file goes first. One still open after `losetup -d` (the
        // kernel detaches it at the last close) is waited for; one held by a process stuck on
        // a hung nbdfuse is freed by aborting the FUSE connection (never under a mounted
        // filesystem: that would lose its writes).
        var aborted = false
        for _ in 0..<3 where !loopDevices().isEmpty {
            found = true
            for loop in loopDevices() {
                let r = try? await ChildProcess.run(path: Self.which("losetup") ?? "/usr/sbin/losetup", arguments: ["-d", loop],
                                                    environment: [:], timeout: remaining(deadline))
                if r?.succeeded != true { problems.append("losetup -d \(loop): \(r.map { "\($0.statusDescription) \(HookRunner.tail($0.output))" } ?? "could not run")") }
            }
            await waitWhile(until: min(deadline, ContinuousClock.now + .seconds(3))) { !loopDevices().isEmpty }
            let left = loopDevices()
            if left.isEmpty { problems = []; break }
            let mounted = left.filter(isInUseByAFilesystem)
            if !mounted.isEmpty {
                problems.append("\(mounted.joined(separator: ", ")) still mounted or held (the Filesystem resource must come after this one)")
                return .failure(problems.joined(separator: "; "))
            }
            if !aborted {
                aborted = true
                if let why = await abortFuse(deadline: deadline) { problems.append(why) }
            }
        }
        if !loopDevices().isEmpty {
            problems.append("loop device(s) \(loopDevices().joined(separator: ", ")) still hold \(fuseFile)")
            return .failure(problems.joined(separator: "; "))
        }
        if isMounted(fuseDir) {
            found = true
            let abortAt = min(deadline, ContinuousClock.now + .seconds(2))
            while isMounted(fuseDir), ContinuousClock.now < deadline {
                let r = try? await ChildProcess.run(path: Self.which("fusermount3") ?? "/usr/bin/fusermount3", arguments: ["-u", fuseDir],
                                                    environment: [:], timeout: remaining(deadline))
                if r?.succeeded == true { break }
                // Busy with no loop device on it: a request stuck in a hung nbdfuse.
                if !aborted, ContinuousClock.now >= abortAt {
                    aborted = true
                    if let why = await abortFuse(deadline: deadline) { problems.append(why) }
                }
                try? await Task.sleep(for: .milliseconds(200))
            }
            // Never lazily (-z): a loop device on a detached mount could no longer be found.
            if isMounted(fuseDir) {
                problems.append("\(fuseDir) is still mounted (busy)")
                return .failure(problems.joined(separator: "; "))
            }
        }
        let pids = Set(nbdfuseProcesses() + (nbdfusePid().map { [$0] } ?? []).filter(isNbdfuse))
        for pid in pids {
            // Unmounted, nbdfuse ends by itself; a stuck one gets SIGTERM after 3 s, SIGKILL 2 s later.
            found = true
            var alive = isNbdfuse(pid)
            let termAt = min(deadline, ContinuousClock.now + .seconds(3)), killAt = termAt + .seconds(2)
            var signalled = false
            while alive, ContinuousClock.now < killAt {
                if !signalled, ContinuousClock.now >= termAt { kill(pid, SIGTERM); signalled = true }
                try? await Task.sleep(for: .milliseconds(50))
                alive = isNbdfuse(pid)
            }
            if alive { kill(pid, SIGKILL); problems.append("nbdfuse (pid \(pid)) did not exit; killed") }
        }
        try? FileManager.default.removeItem(atPath: pidFile)
        try? FileManager.default.removeItem(atPath: tlsDir)
        if !problems.isEmpty { return .failure(problems.joined(separator: "; ")) }
        return found ? AgentResult(code: 0, detail: "detached \(s.device)") : AgentResult(code: OCFStatus.notRunning.rawValue, detail: "not attached")
    }

    private func fuseMonitor(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        let mounted = isMounted(fuseDir), loops = loopDevices(), link = isSymlink(s.device)
        if !mounted && loops.isEmpty && !link { return AgentResult(code: OCFStatus.notRunning.rawValue, detail: "not attached") }
        guard mounted else { return .failure("\(fuseDir) is not mounted (nbdfuse gone)") }
        guard let loop = loops.first else { return .failure("no loop device on \(fuseFile)") }
        guard link, let dest = try? FileManager.default.destinationOfSymbolicLink(atPath: s.device), dest == loop else {
            return .failure("\(s.device) does not point at \(loop)")
        }
        return await readable(s.device, deadline: deadline)
    }

    /// A direct read of the first 4 KiB, past the page cache: the export answers.
    private func readable(_ device: String, deadline: ContinuousClock.Instant) async -> AgentResult {
        do {
            let r = try await ChildProcess.run(path: Self.which("dd") ?? "/bin/dd",
                                               arguments: ["if=\(device)", "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none"],
                                               environment: [:], timeout: remaining(deadline))
            return r.succeeded ? AgentResult(code: 0, detail: "\(device) attached and readable")
                               : .failure("reading \(device): \(r.statusDescription) \(HookRunner.tail(r.output))")
        } catch {
            return .failure("reading \(device): \(error)")
        }
    }

    /// The NBD server nbdfuse runs on its stdin/stdout when the export requires TLS:
    /// nbdfuse refuses a URI's `tls-certificates` (local file access), so nbdkit's nbd plugin
    /// makes the TLS connection — the cluster CA, and this host's certificate when the export
    /// asks for one, in the directory layout libnbd reads — and serves it in plaintext over the
    /// pipe. `--exit-with-parent`: it ends with nbdfuse.
    private func tlsCommand(_ t: NBDAttachTarget, tls: NBDAttachTarget.TLSFiles, nbdkit: String) throws -> [String] {
        try? FileManager.default.removeItem(atPath: tlsDir)
        try FileManager.default.createDirectory(atPath: tlsDir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        try FileManager.default.createSymbolicLink(atPath: tlsDir + "/ca-cert.pem", withDestinationPath: tls.caFile)
        if let cert = tls.certFile, let key = tls.keyFile {
            try FileManager.default.createSymbolicLink(atPath: tlsDir + "/client-cert.pem", withDestinationPath: cert)
            try FileManager.default.createSymbolicLink(atPath: tlsDir + "/client-key.pem", withDestinationPath: key)
        }
        return ["--command", nbdkit, "-s", "--exit-with-parent", "nbd", "hostname=\(t.host)", "port=\(t.port)", "export=\(t.exportName)",
                "tls=require", "tls-certificates=\(tlsDir)"]
    }

    // MARK: kernel nbd-client

    private func kernelStart(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        guard let target else { return AgentResult(code: OCFStatus.errConfigured.rawValue, detail: "this node's export is not known") }
        guard let client = Self.which("nbd-client") else {
            return AgentResult(code: OCFStatus.errInstalled.rawValue, detail: "nbd-client is not installed (package nbd-client); or name a device outside /dev to use nbdfuse")
        }
        if !FileManager.default.fileExists(atPath: "/sys/module/nbd") {
            _ = try? await ChildProcess.run(path: Self.which("modprobe") ?? "/sbin/modprobe", arguments: ["nbd"], environment: [:], timeout: remaining(deadline))
        }
        guard FileManager.default.fileExists(atPath: "/sys/module/nbd") else {
            return AgentResult(code: OCFStatus.errInstalled.rawValue, detail: "the kernel has no nbd module (modprobe nbd failed); name a device outside /dev to use nbdfuse")
        }
        let now = await kernelMonitor(s, deadline: deadline)
        if now.ok { return AgentResult(code: 0, detail: "already attached: \(s.device)") }
        // docs/nbd.md "Clients" has the kernel client's TLS options.
        var args = ["-N", target.exportName]
        if let sock = target.unixSocket {
            args += ["-unix", sock, s.device]
        } else {
            args += [target.host, String(target.port), s.device]
            if let tls = target.tls {
                args += ["-enable-tls", "-cacertfile", tls.caFile, "-tlshostname", target.host]
                if let cert = tls.certFile, let key = tls.keyFile { args += ["-certfile", cert, "-keyfile", key] }
            }
        }
        do {
            let r = try await ChildProcess.run(path: client, arguments: args, environment: [:], timeout: remaining(deadline))
            guard r.succeeded else { return .failure("nbd-client \(s.device): \(r.statusDescription) \(HookRunner.tail(r.output))") }
        } catch {
            return .failure("nbd-client: \(error)")
        }
        return await readable(s.device, deadline: deadline)
    }

    private func kernelStop(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        guard let client = Self.which("nbd-client") else { return AgentResult(code: OCFStatus.notRunning.rawValue, detail: "nbd-client is not installed") }
        let now = await kernelConnected(client, s.device, deadline: deadline)
        guard now else { return AgentResult(code: OCFStatus.notRunning.rawValue, detail: "not attached") }
        let r = try? await ChildProcess.run(path: client, arguments: ["-d", s.device], environment: [:], timeout: remaining(deadline))
        guard r?.succeeded == true else { return .failure("nbd-client -d \(s.device): \(r.map { "\($0.statusDescription) \(HookRunner.tail($0.output))" } ?? "could not run")") }
        return AgentResult(code: 0, detail: "detached \(s.device)")
    }

    private func kernelMonitor(_ s: NBDAttachSettings, deadline: ContinuousClock.Instant) async -> AgentResult {
        guard let client = Self.which("nbd-client"), FileManager.default.fileExists(atPath: "/sys/module/nbd") else {
            return AgentResult(code: OCFStatus.notRunning.rawValue, detail: "not attached (no nbd-client or nbd module)")
        }
        guard await kernelConnected(client, s.device, deadline: deadline) else {
            return AgentResult(code: OCFStatus.notRunning.rawValue, detail: "not attached")
        }
        return await readable(s.device, deadline: deadline)
    }

    /// `nbd-client -c DEVICE`: 0 while connected.
    private func kernelConnected(_ client: String, _ device: String, deadline: ContinuousClock.Instant) async -> Bool {
        (try? await ChildProcess.run(path: client, arguments: ["-c", device], environment: [:], timeout: remaining(deadline)))?.succeeded == true
    }

    // MARK: what is attached now

    /// Every loop device whose backing file is this resource's FUSE file (also on a mount
    /// detached lazily, where the kernel shows it as `/NAME`).
    func loopDevices() -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.filter { $0.hasPrefix("loop") }.sorted().compactMap { name in
            guard let back = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return nil }
            let path = back.trimmingCharacters(in: .whitespacesAndNewlines)
            let orphan = "/" + fuseName
            return [fuseFile, fuseFile + " (deleted)", orphan, orphan + " (deleted)"].contains(path) ? "/dev/\(name)" : nil
        }
    }

    /// Whether `dir` is a mount point (in this process's mount namespace).
    func isMounted(_ dir: String) -> Bool {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
        // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        let escaped = dir.replacingOccurrences(of: "\\", with: "\\134").replacingOccurrences(of: " ", with: "\\040")
            .replacingOccurrences(of: "\t", with: "\\011").replacingOccurrences(of: "\n", with: "\\012")
        return text.split(separator: "\n").contains { line in
            let fields = line.split(separator: " ", maxSplits: 5)
            return fields.count > 4 && fields[4] == escaped
        }
    }

    private func waitWhile(until end: ContinuousClock.Instant, _ cond: () -> Bool) async {
        while cond(), ContinuousClock.now < end { try? await Task.sleep(for: .milliseconds(50)) }
    }

    /// The loop device is mounted, or held by another block device (device-mapper, md).
    func isInUseByAFilesystem(_ loop: String) -> Bool {
        let name = (loop as NSString).lastPathComponent
        if !((try? FileManager.default.contentsOfDirectory(atPath: "/sys/block/\(name)/holders")) ?? []).isEmpty { return true }
        guard let dev = (try? String(contentsOfFile: "/sys/block/\(name)/dev", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines),
              let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return false }
        return text.split(separator: "\n").contains { $0.split(separator: " ").dropFirst(2).first.map(String.init) == dev }
    }

    /// Fails every pending and later request of this FUSE mount (the kernel's
    /// /sys/fs/fuse/connections/N/abort, N its device minor), so processes stuck on a hung
    /// nbdfuse return and the mount can go. Mounts fusectl if it is not. nil when done, else why not.
    private func abortFuse(deadline: ContinuousClock.Instant) async -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.split(separator: " ").dropFirst(4).first.map(String.init) == fuseDir }),
              let dev = line.split(separator: " ").dropFirst(2).first, let minor = dev.split(separator: ":").last else {
            return nil
        }
        let connections = "/sys/fs/fuse/connections"
        if !FileManager.default.fileExists(atPath: "\(connections)/\(minor)") {
            _ = try? await ChildProcess.run(path: Self.which("mount") ?? "/bin/mount", arguments: ["-t", "fusectl", "fusectl", connections],
                                            environment: [:], timeout: remaining(deadline))
        }
        let abort = "\(connections)/\(minor)/abort"
        guard let fh = FileHandle(forWritingAtPath: abort) else { return "cannot abort the FUSE connection (\(abort) not writable)" }
        defer { try? fh.close() }
        do { try fh.write(contentsOf: Data("1".utf8)) } catch { return "aborting the FUSE connection: \(error)" }
        return nil
    }

    /// nbdfuse processes serving this resource's FUSE file (a crash may have lost the pid file).
    func nbdfuseProcesses() -> [pid_t] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { pid_t($0) }.filter { pid in
            guard isNbdfuse(pid), let cmd = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return cmd.split(separator: 0).contains { String(decoding: $0, as: UTF8.self) == fuseFile }
        }
    }

    private func nbdfusePid() -> pid_t? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8) else { return nil }
        return pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// `pid` is alive and is an nbdfuse (a recycled pid is left alone).
    private func isNbdfuse(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        // A zombie has exited: it holds nothing.
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        if let close = stat.lastIndex(of: ")"), stat[stat.index(after: close)...].hasPrefix(" Z") { return false }
        return comm == "nbdfuse"
    }

    private func isSymlink(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
    }

    private func remaining(_ deadline: ContinuousClock.Instant) -> Duration {
        max(.milliseconds(100), deadline - ContinuousClock.now)
    }

    /// The tool's path in the usual directories (the daemon's PATH may be minimal).
    static func which(_ tool: String) -> String? {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
            + ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        return dirs.lazy.map { "\($0)/\(tool)" }.first { access($0, X_OK) == 0 }
    }
}
