import CSystemd
import HACore
import Foundation
import Logging

/// hamgr's log output (design.md §4 "systemd"): one human-readable line per event on
/// stderr, and structured journald fields when a journal is present.
///
/// By convention hamgr attaches the metadata keys `cluster`, `node`, `epoch` and `event`;
/// they become the journal fields HAMGR_CLUSTER, HAMGR_NODE, HAMGR_EPOCH, HAMGR_EVENT
/// (`journalctl HAMGR_EVENT=promote`). Other metadata keys become upper-cased fields.
public enum HamgrLogging {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var installed = false

    /// Install the hamgr handler for every `Logger`. Only the first call in a process
    /// takes effect (swift-log allows one bootstrap). `identifier` is the journal's
    /// SYSLOG_IDENTIFIER: the unit's (`hamgr-CLUSTER` for a node, `hamgr-arbitrator`), so
    /// `journalctl -t hamgr-web1` finds the structured entries too.
    public static func bootstrap(level: Logger.Level = .info, identifier: String = "hamgr", output: LogOutput = .detect()) {
        lock.lock(); defer { lock.unlock() }
        guard !installed else { return }
        installed = true
        output.identifier = identifier
        output.level = level
        LoggingSystem.bootstrap { label in HamgrLogHandler(label: label, output: output) }
    }

    /// Parse `trace|debug|info|notice|warning|error|critical`.
    public static func level(_ s: String) -> Logger.Level? { Logger.Level(rawValue: s.lowercased()) }

    /// The level in force: `--log-level`, else `$HAMGR_LOG_LEVEL`, else the config's
    /// `[log] level`, else info. Throws naming the source of an unknown value.
    public static func resolveLevel(option: String?, environment: [String: String] = ProcessInfo.processInfo.environment,
                                    config: Logger.Level?) throws -> Logger.Level {
        if let option {
            guard let l = level(option) else { throw ConfigError(key: "--log-level", message: "unknown level '\(option)'; expected one of \(levelNames)") }
            return l
        }
        if let env = environment["HAMGR_LOG_LEVEL"], !env.isEmpty {
            guard let l = level(env) else { throw ConfigError(key: "HAMGR_LOG_LEVEL", message: "unknown level '\(env)'; expected one of \(levelNames)") }
            return l
        }
        return config ?? .info
    }

    public static let levelNames = Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")

    /// journald MESSAGE_IDs of the state changes operators search for
    /// (`journalctl MESSAGE_ID=…`): fixed for ever, listed in the operator guide.
    public static let messageIDs: [String: String] = [
        "promoted": "6f1c3b0e9a2d4c58b7e1f0a4d3c2b190",
        "demoted": "0b7e4d2c1a9f4e3d8c6b5a4f3e2d1c01",
        "splitBrain": "a3d9e8f7c6b54a3f9e8d7c6b5a4f3e21",
        "disk_failure": "5c4b3a2f1e0d4c9b8a7f6e5d4c3b2a19",
        "peerOutdated": "e1d2c3b4a5f64e7d8c9b0a1f2e3d4c5b",
    ]
}

/// Where lines go. Shared by every handler of a process; writes are serialised.
public final class LogOutput: @unchecked Sendable {
    /// Write human-readable lines to stderr.
    public let toStderr: Bool
    /// Send structured entries with `sd_journal_sendv`.
    public let toJournal: Bool
    /// Tests: receive every formatted line and journal field list.
    private let capture: (@Sendable (String, [String]) -> Void)?
    private let lock = NSLock()
    private var _identifier = "hamgr"
    private var _level = Logger.Level.info

    /// SYSLOG_IDENTIFIER of every journal entry.
    public var identifier: String {
        get { lock.lock(); defer { lock.unlock() }; return _identifier }
        set { lock.lock(); _identifier = newValue; lock.unlock() }
    }

    /// The level of every handler writing here; changing it (a reload) takes effect at
    /// once for every `Logger`, whenever it was made.
    public var level: Logger.Level {
        get { lock.lock(); defer { lock.unlock() }; return _level }
        set { lock.lock(); _level = newValue; lock.unlock() }
    }

    public init(toStderr: Bool, toJournal: Bool, capture: (@Sendable (_ line: String, _ journalFields: [String]) -> Void)? = nil) {
        self.toStderr = toStderr; self.toJournal = toJournal; self.capture = capture
    }

    /// stderr always, unless stderr itself is the journal (systemd sets JOURNAL_STREAM to
    /// its device:inode), where a plain line would duplicate the structured entry; the
    /// journal whenever its socket exists. `sd_journal_sendv` reports success even when
    /// nobody listens, so stderr stays on unless the journal is known to be reading it.
    public static func detect(environment: [String: String] = ProcessInfo.processInfo.environment) -> LogOutput {
        let socketExists = FileManager.default.fileExists(atPath: "/run/systemd/journal/socket")
        let stderrIsJournal = Self.stderrIsJournalStream(environment["JOURNAL_STREAM"])
        return LogOutput(toStderr: !stderrIsJournal, toJournal: socketExists || stderrIsJournal)
    }

    static func stderrIsJournalStream(_ value: String?) -> Bool {
        guard let value else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let dev = UInt64(parts[0]), let ino = UInt64(parts[1]) else { return false }
        var st = stat()
        guard fstat(2, &st) == 0 else { return false }
        return UInt64(st.st_dev) == dev && UInt64(st.st_ino) == ino
    }

    func emit(line: String, fields: [String]) {
        lock.lock(); defer { lock.unlock() }
        if toStderr {
            let bytes = Array((line + "\n").utf8)
            bytes.withUnsafeBytes { raw in
                var off = 0
                while off < raw.count {
                    let n = write(2, raw.baseAddress! + off, raw.count - off)
                    if n <= 0 { if errno == EINTR { continue }; break }
                    off += n
                }
            }
        }
        if toJournal {
            let rc = Self.journalSend(fields)
            if rc < 0 && !toStderr {
                // The journal refused; never lose the line.
                FileHandle.standardError.write(Data((line + "\n").utf8))
            }
        }
        capture?(line, fields)
    }

    /// Send `FIELD=value` strings as one journal entry. Returns sd_journal_sendv's result.
    @discardableResult
    public static func journalSend(_ fields: [String]) -> Int32 {
        let buffers = fields.map { Array($0.utf8) }
        var iovecs: [iovec] = []
        iovecs.reserveCapacity(buffers.count)
        return withExtendedLifetime(buffers) {
            for b in buffers {
                b.withUnsafeBufferPointer { p in
                    iovecs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: p.baseAddress), iov_len: p.count))
                }
            }
            return sd_journal_sendv(iovecs, Int32(iovecs.count))
        }
    }
}

/// A swift-log handler writing through a `LogOutput`.
public struct HamgrLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    /// The output's level, shared by every handler of the process.
    public var logLevel: Logger.Level {
        get { output.level }
        set { output.level = newValue }
    }
    public var metadataProvider: Logger.MetadataProvider?
    public let label: String
    private let output: LogOutput

    public init(label: String, output: LogOutput) {
        self.label = label; self.output = output
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let m = event.metadata { all.merge(m) { _, new in new } }
        if let error = event.error, all["error"] == nil { all["error"] = "\(error)" }
        let message = event.message.description
        let line = Self.formatLine(date: Date(), level: event.level, label: label, message: message, metadata: all)
        let fields = Self.journalFields(level: event.level, label: label, message: message, metadata: all,
                                        identifier: output.identifier,
                                        file: event.file, function: event.function, line: event.line)
        output.emit(line: line, fields: fields)
    }

    /// `2026-01-02T03:04:05.678Z NOTICE hamgr: promoted epoch=7 event=promote node=a`
    public static func formatLine(date: Date, level: Logger.Level, label: String, message: String, metadata: Logger.Metadata) -> String {
        var line = "\(timestamp(date)) \(level.rawValue.uppercased()) \(label): \(message)"
        for key in metadata.keys.sorted() {
            line += " \(key)=\(quoteIfNeeded("\(metadata[key]!)"))"
        }
        return line
    }

    /// The journal entry: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER (the unit's), the logger's
    /// label as HAMGR_LOGGER, MESSAGE_ID for the events of `HamgrLogging.messageIDs`,
    /// HAMGR_* for the well-known keys, the other metadata upper-cased (prefixed HAMGR_
    /// where the name would clash with a journal field), and the code location.
    public static func journalFields(level: Logger.Level, label: String, message: String, metadata: Logger.Metadata,
                                     identifier: String = "hamgr",
                                     file: String = "", function: String = "", line: UInt = 0) -> [String] {
        var fields = [
            "MESSAGE=\(message)",
            "PRIORITY=\(priority(level))",
            "SYSLOG_IDENTIFIER=\(identifier)",
            "HAMGR_LOGGER=\(label)",
        ]
        if let event = metadata["event"].map({ "\($0)" }), let id = HamgrLogging.messageIDs[event] {
            fields.append("MESSAGE_ID=\(id)")
        }
        for key in metadata.keys.sorted() {
            let value = "\(metadata[key]!)"
            fields.append("\(journalFieldName(key))=\(value)")
        }
        if !file.isEmpty {
            fields.append("CODE_FILE=\(file)")
            fields.append("CODE_LINE=\(line)")
            fields.append("CODE_FUNC=\(function)")
        }
        return fields
    }

    private static let wellKnown: Set<String> = ["cluster", "node", "epoch", "event"]
    private static let reserved: Set<String> = [
        "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "SYSLOG_PID",
        "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO", "INVOCATION_ID", "USER_INVOCATION_ID",
        "DOCUMENTATION", "TID", "UNIT", "USER_UNIT",
    ]

    /// Journal field names are `[A-Z0-9_]`, start with a letter, ≤ 64 bytes.
    public static func journalFieldName(_ key: String) -> String {
        if wellKnown.contains(key.lowercased()) { return "HAMGR_" + key.uppercased() }
        var name = String(key.uppercased().unicodeScalars.map { ("A"..."Z").contains($0) || ("0"..."9").contains($0) ? Character($0) : "_" })
        if name.first.map({ !("A"..."Z").contains($0) }) ?? true || reserved.contains(name) {
            name = "HAMGR_" + name
        }
        return String(name.prefix(64))
    }

    /// syslog priorities (sd-journal): 7 debug … 2 critical.
    public static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    private static func quoteIfNeeded(_ s: String) -> String {
        if !s.isEmpty && !s.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) { return s }
        return "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n") + "\""
    }

    private static func timestamp(_ d: Date) -> String {
        var t = time_t(d.timeIntervalSince1970)
        var tm = tm()
        gmtime_r(&t, &tm)
        let ms = Int((d.timeIntervalSince1970 - Double(t)) * 1000)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                      Int(tm.tm_year) + 1900, Int(tm.tm_mon) + 1, Int(tm.tm_mday),
                      Int(tm.tm_hour), Int(tm.tm_min), Int(tm.tm_sec), max(0, min(999, ms)))
    }
}

/// Bounds how often one kind of log line is written: at most `burst` lines per `window` for
/// each key (an event name). What is held back is counted and named by the next line of that
/// key once its window has passed ("… 812 similar lines suppressed"), so a storm — an
/// arbitrator restarted under 10,000 clusters refusing votes for one lease — costs a few
/// lines, not thousands, and nothing disappears without a trace. Thread-safe.
public final class RepeatLimiter: @unchecked Sendable {
    public let burst: Int
    public let window: Duration
    private let lock = NSLock()
    private var keys: [String: (start: ContinuousClock.Instant, count: Int, held: Int)] = [:]

    public init(burst: Int = 20, window: Duration = .seconds(1)) {
        self.burst = burst; self.window = window
    }

    /// nil: hold this line back. Otherwise write it, saying how many were held back before it.
    public func admit(_ key: String, now: ContinuousClock.Instant = .now) -> Int? {
        lock.lock(); defer { lock.unlock() }
        guard var k = keys[key], now - k.start < window else {
            let held = keys[key]?.held ?? 0
            keys[key] = (now, 1, 0)
            return held
        }
        if k.count < burst {
            k.count += 1
            keys[key] = k
            return 0
        }
        k.held += 1
        keys[key] = k
        return nil
    }
}
