import Foundation
import HACore
import HAShell
import Logging
import XCTest

final class LoggingTests: XCTestCase {
    final class Captured: @unchecked Sendable {
        let lock = NSLock()
        var entries: [(String, [String])] = []
        func add(_ l: String, _ f: [String]) { lock.lock(); entries.append((l, f)); lock.unlock() }
    }

    func testLineAndJournalFields() throws {
        let captured = Captured()
        let out = LogOutput(toStderr: false, toJournal: false) { captured.add($0, $1) }
        var logger = Logger(label: "hamgr") { HamgrLogHandler(label: $0, output: out) }
        logger[metadataKey: "cluster"] = "web1"
        logger[metadataKey: "node"] = "a"
        logger.notice("promoted to primary", metadata: ["epoch": "7", "event": "promote", "service-address": "10.1.0.1:10809", "message": "x y"])
        XCTAssertEqual(captured.entries.count, 1)
        let (line, fields) = captured.entries[0]
        XCTAssertTrue(line.hasSuffix(" NOTICE hamgr: promoted to primary cluster=web1 epoch=7 event=promote message=\"x y\" node=a service-address=10.1.0.1:10809"), line)
        XCTAssertTrue(fields.contains("MESSAGE=promoted to primary"))
        XCTAssertTrue(fields.contains("PRIORITY=5"))
        XCTAssertTrue(fields.contains("SYSLOG_IDENTIFIER=hamgr"))
        XCTAssertTrue(fields.contains("HAMGR_CLUSTER=web1"))
        XCTAssertTrue(fields.contains("HAMGR_NODE=a"))
        XCTAssertTrue(fields.contains("HAMGR_EPOCH=7"))
        XCTAssertTrue(fields.contains("HAMGR_EVENT=promote"))
        XCTAssertTrue(fields.contains("SERVICE_ADDRESS=10.1.0.1:10809"))
        XCTAssertTrue(fields.contains("HAMGR_MESSAGE=x y"), "a metadata key must not overwrite MESSAGE: \(fields)")
        XCTAssertEqual(fields.filter { $0.hasPrefix("MESSAGE=") }.count, 1)
        XCTAssertTrue(fields.contains { $0.hasPrefix("CODE_FILE=") })
    }

    /// The unit's identifier (`journalctl -t hamgr-web1`), the logger's label as its own
    /// field, and MESSAGE_IDs for the state changes operators search for.
    func testIdentifierAndMessageIDs() {
        let fields = HamgrLogHandler.journalFields(level: .notice, label: "hamgr.node", message: "promoted",
                                                   metadata: ["event": "promoted"], identifier: "hamgr-web1")
        XCTAssertTrue(fields.contains("SYSLOG_IDENTIFIER=hamgr-web1"), "\(fields)")
        XCTAssertTrue(fields.contains("HAMGR_LOGGER=hamgr.node"), "\(fields)")
        XCTAssertTrue(fields.contains("MESSAGE_ID=\(HamgrLogging.messageIDs["promoted"]!)"), "\(fields)")
        for event in ["demoted", "splitBrain", "disk_failure", "peerOutdated"] {
            let f = HamgrLogHandler.journalFields(level: .notice, label: "x", message: "m", metadata: ["event": .string(event)])
            XCTAssertEqual(f.filter { $0.hasPrefix("MESSAGE_ID=") }.count, 1, event)
        }
        XCTAssertFalse(HamgrLogHandler.journalFields(level: .info, label: "x", message: "m", metadata: ["event": "link_down"])
                        .contains { $0.hasPrefix("MESSAGE_ID=") })
        XCTAssertEqual(Set(HamgrLogging.messageIDs.values).count, HamgrLogging.messageIDs.count, "IDs are distinct")
        XCTAssertTrue(HamgrLogging.messageIDs.values.allSatisfy { $0.count == 32 && $0.allSatisfy(\.isHexDigit) })
    }

    /// A storm of one event costs `burst` lines per window; the next line after the window
    /// says how many were held back; other events are not held back by it.
    func testRepeatLimiterBoundsAStormAndCountsWhatItHeld() {
        let limiter = RepeatLimiter(burst: 3, window: .seconds(1))
        let t0 = ContinuousClock.now
        var written = 0, held = 0
        for i in 0..<1000 {
            if limiter.admit("voteRefused", now: t0 + .milliseconds(i / 10)) != nil { written += 1 } else { held += 1 }
        }
        XCTAssertEqual(written, 3)
        XCTAssertEqual(held, 997)
        XCTAssertEqual(limiter.admit("voteGranted", now: t0 + .milliseconds(500)), 0, "keys are independent")
        XCTAssertEqual(limiter.admit("voteRefused", now: t0 + .milliseconds(1000)), 997, "the next window names what was held")
        XCTAssertEqual(limiter.admit("voteRefused", now: t0 + .milliseconds(1001)), 0)
    }

    /// `--log-level` beats `$HAMGR_LOG_LEVEL`, which beats the config; bad values name their source.
    func testLevelResolution() throws {
        XCTAssertEqual(try HamgrLogging.resolveLevel(option: nil, environment: [:], config: nil), .info)
        XCTAssertEqual(try HamgrLogging.resolveLevel(option: nil, environment: [:], config: .warning), .warning)
        XCTAssertEqual(try HamgrLogging.resolveLevel(option: nil, environment: ["HAMGR_LOG_LEVEL": "debug"], config: .warning), .debug)
        XCTAssertEqual(try HamgrLogging.resolveLevel(option: "error", environment: ["HAMGR_LOG_LEVEL": "debug"], config: .warning), .error)
        XCTAssertThrowsError(try HamgrLogging.resolveLevel(option: nil, environment: ["HAMGR_LOG_LEVEL": "loud"], config: nil)) {
            XCTAssertEqual(($0 as? ConfigError)?.key, "HAMGR_LOG_LEVEL")
        }
    }

    func testLevelsMapToSyslogPriorities() {
        XCTAssertEqual(HamgrLogHandler.priority(.debug), 7)
        XCTAssertEqual(HamgrLogHandler.priority(.info), 6)
        XCTAssertEqual(HamgrLogHandler.priority(.warning), 4)
        XCTAssertEqual(HamgrLogHandler.priority(.error), 3)
        XCTAssertEqual(HamgrLogHandler.priority(.critical), 2)
        XCTAssertEqual(HamgrLogHandler.journalFieldName("9lives"), "HAMGR_9LIVES")
        XCTAssertEqual(HamgrLogHandler.journalFieldName("peer.addr"), "PEER_ADDR")
    }

    func testStderrIsNotJournalWithoutMatchingStream() {
        XCTAssertFalse(LogOutput.detect(environment: ["JOURNAL_STREAM": "1:2"]).toStderr == false)
        var st = stat()
        fstat(2, &st)
        let out = LogOutput.detect(environment: ["JOURNAL_STREAM": "\(st.st_dev):\(st.st_ino)"])
        XCTAssertFalse(out.toStderr, "stderr is the journal: a plain line would duplicate the entry")
        XCTAssertTrue(out.toJournal)
    }

    /// The structured entry really goes out over the journal's datagram protocol: stand in
    /// for journald at its socket path when no journald runs here (root only).
    func testJournalEntryReachesTheJournalSocket() throws {
        let path = "/run/systemd/journal/socket"
        guard getuid() == 0, !FileManager.default.fileExists(atPath: path) else {
            throw XCTSkip("needs root and no running journald")
        }
        try FileManager.default.createDirectory(atPath: "/run/systemd/journal", withIntermediateDirectories: true)
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(fd); unlink(path) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        XCTAssertEqual(rc, 0)
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))

        let out = LogOutput(toStderr: false, toJournal: true)
        let logger = Logger(label: "hamgr") { HamgrLogHandler(label: $0, output: out) }
        logger.warning("lease lapsed", metadata: ["cluster": "web1", "node": "b", "epoch": "9", "event": "demote"])
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = recv(fd, &buf, buf.count, 0)
        XCTAssertGreaterThan(n, 0)
        let entry = String(decoding: buf[0..<max(0, n)], as: UTF8.self).split(separator: "\n").map(String.init)
        for want in ["MESSAGE=lease lapsed", "PRIORITY=4", "HAMGR_CLUSTER=web1", "HAMGR_NODE=b", "HAMGR_EPOCH=9", "HAMGR_EVENT=demote"] {
            XCTAssertTrue(entry.contains(want), "\(want) missing from \(entry)")
        }
    }
}
