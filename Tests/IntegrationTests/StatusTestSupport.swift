import Foundation

/// Helpers for the operator-surface tests (config check, status server, resources,
/// hooks, hactl). Namespaced so they cannot clash with other suites' helpers.
enum OpsTest {
    struct Output { var status: Int32; var stdout: String; var stderr: String }

    /// A built product (`hamgr`, `hactl`) next to the test bundle.
    static func binary(_ name: String) throws -> String {
        var candidates: [URL] = [Bundle.main.bundleURL.deletingLastPathComponent(), Bundle.main.bundleURL]
        let argv0 = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        candidates.append(argv0.deletingLastPathComponent())
        candidates.append(argv0.deletingLastPathComponent().deletingLastPathComponent())
        for dir in candidates {
            let p = dir.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        throw NSError(domain: "OpsTest", code: 1, userInfo: [NSLocalizedDescriptionKey: "\(name) not built next to the tests (looked in \(candidates.map(\.path)))"])
    }

    /// Run a process to completion with a time limit (killed after it).
    @discardableResult
    static func run(_ argv: [String], env: [String: String] = [:], stdin: String? = nil, timeout: Double = 30) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        var environment = ProcessInfo.processInfo.environment
        for (k, v) in env { environment[k] = v }
        p.environment = environment
        let out = Pipe(), err = Pipe(), input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? input.fileHandleForWriting.close()
        let killer = DispatchWorkItem { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: killer)
        // Read both pipes concurrently so a chatty child cannot block on a full pipe.
        final class Box: @unchecked Sendable { var data = Data() }
        let errBox = Box()
        let errDone = DispatchSemaphore(value: 0)
        DispatchQueue.global().async { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); errDone.signal() }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        errDone.wait()
        let errData = errBox.data
        p.waitUntilExit()
        killer.cancel()
        return Output(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData, as: UTF8.self))
    }

    /// `curl` one request: returns (HTTP status, body).
    static func curl(_ url: String, method: String = "GET", token: String? = nil, body: String? = nil) throws -> (Int, String) {
        var argv = ["/usr/bin/curl", "-sS", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}"]
        if let token { argv += ["-H", "Authorization: Bearer \(token)"] }
        if let body { argv += ["-H", "Content-Type: application/json", "--data-binary", body] }
        argv.append(url)
        let r = try run(argv)
        guard r.status == 0, let nl = r.stdout.lastIndex(of: "\n"), let code = Int(r.stdout[r.stdout.index(after: nl)...]) else {
            throw NSError(domain: "OpsTest", code: 2, userInfo: [NSLocalizedDescriptionKey: "curl failed (\(r.status)): \(r.stderr)"])
        }
        return (code, String(r.stdout[..<nl]))
    }

    /// A fresh scratch directory, removed by the caller.
    static func scratchDirectory(_ tag: String) throws -> String {
        let dir = NSTemporaryDirectory() + "hamgr-\(tag)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Write an executable shell script.
    static func writeScript(_ path: String, _ text: String) throws {
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
    }
}
