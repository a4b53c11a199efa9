import Foundation

/// What a finished external command did.
struct ProcessResult: CustomStringConvertible {
    var exitCode: Int32
    var stdout: String
    var stderr: String
    /// The command hit its timeout and was killed.
    var timedOut: Bool

    var description: String {
        "exit \(exitCode)\(timedOut ? " (timed out)" : "")\nstdout: \(stdout.suffix(2000))\nstderr: \(stderr.suffix(2000))"
    }
}

/// Runs external commands (real NBD clients, mkfs, …) with a timeout, capturing output.
/// Every process it starts is killed on timeout; background processes are stopped by
/// `BackgroundProcess.stop()` (also on deinit), so a failing test leaks nothing.
enum ProcessRunner {
    /// The full path of `tool` on PATH (plus the sbin directories), or nil.
    static func which(_ tool: String) -> String? {
        if tool.hasPrefix("/") { return FileManager.default.isExecutableFile(atPath: tool) ? tool : nil }
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Runs `tool args…` to completion or until `timeout` seconds (then SIGTERM, SIGKILL).
    @discardableResult
    static func run(_ tool: String, _ arguments: [String], timeout: TimeInterval = 60,
                    environment: [String: String]? = nil, currentDirectory: String? = nil) throws -> ProcessResult {
        guard let exe = which(tool) else { throw RunnerError.missingTool(tool) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = arguments
        if let env = environment { p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 } }
        if let dir = currentDirectory { p.currentDirectoryURL = URL(fileURLWithPath: dir) }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        let exited = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in exited.signal() }
        // Drain both pipes concurrently so a chatty process never blocks on a full pipe.
        let outData = Drain(out.fileHandleForReading), errData = Drain(err.fileHandleForReading)
        try p.run()
        var timedOut = false
        if exited.wait(timeout: .now() + timeout) == .timedOut {
            timedOut = true
            p.terminate()
            if exited.wait(timeout: .now() + 3) == .timedOut {
                kill(p.processIdentifier, SIGKILL)
                exited.wait()
            }
        }
        return ProcessResult(exitCode: p.terminationStatus, stdout: outData.text(), stderr: errData.text(), timedOut: timedOut)
    }

    /// Starts `tool args…` in the background; stdout/stderr go to files in `logDirectory`.
    static func start(_ tool: String, _ arguments: [String], logDirectory: String) throws -> BackgroundProcess {
        guard let exe = which(tool) else { throw RunnerError.missingTool(tool) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = arguments
        let base = "\(logDirectory)/\(URL(fileURLWithPath: tool).lastPathComponent)-\(UUID().uuidString.prefix(8))"
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        p.standardError = FileHandle(forWritingAtPath: base + ".err")
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return BackgroundProcess(process: p, logBase: base)
    }

    enum RunnerError: Error, CustomStringConvertible {
        case missingTool(String)
        var description: String {
            switch self { case .missingTool(let t): return "\(t) is not installed" }
        }
    }

    /// Reads a pipe to EOF on its own thread.
    private final class Drain: @unchecked Sendable {
        private var data = Data()
        private let done = DispatchSemaphore(value: 0)
        init(_ handle: FileHandle) {
            Thread.detachNewThread { [self] in
                data = handle.readDataToEndOfFile()
                done.signal()
            }
        }
        func text() -> String {
            _ = done.wait(timeout: .now() + 5)
            return String(decoding: data, as: UTF8.self)
        }
    }
}

/// A process started by `ProcessRunner.start`; stopped (TERM, then KILL) on `stop()` or deinit.
final class BackgroundProcess {
    let process: Process
    let logBase: String
    init(process: Process, logBase: String) { self.process = process; self.logBase = logBase }

    var isRunning: Bool { process.isRunning }
    var stderr: String { (try? String(contentsOfFile: logBase + ".err", encoding: .utf8)) ?? "" }
    var stdout: String { (try? String(contentsOfFile: logBase + ".out", encoding: .utf8)) ?? "" }

    /// SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status.
    @discardableResult
    func stop(grace: TimeInterval = 5) -> Int32 {
        if process.isRunning {
            process.terminate()
            let deadline = Date().addingTimeInterval(grace)
            while process.isRunning && Date() < deadline { usleep(20_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit { stop(grace: 2) }
}
