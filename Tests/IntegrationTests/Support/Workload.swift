import Foundation
import XCTest

/// A write workload through a real NBD client (qemu-io): numbered 64 KiB writes, each with
/// its own byte pattern, so every acknowledged write can be checked afterwards. qemu-io
/// prints "wrote N/N bytes at offset X" only once the server has replied, which is the
/// acknowledgement; a write whose line is missing was not acknowledged.
struct PatternWorkload {
    static let writeBytes = 65536

    /// Offset and pattern of write `i` (patterns 1…250, never 0 so a lost write is visible).
    /// Slot 0 (offset 0) is left to probes such as `firstAcknowledgedWrite`.
    static func offset(_ i: Int, slots: Int) -> Int { (i % slots + 1) * writeBytes }
    static func pattern(_ i: Int) -> Int { i % 250 + 1 }

    let uri: String
    let first: Int
    let count: Int
    let slots: Int
    let logPath: String
    private(set) var process: Process?

    init(uri: String, first: Int = 0, count: Int, slots: Int, logPath: String) {
        self.uri = uri; self.first = first; self.count = count; self.slots = slots; self.logPath = logPath
    }

    /// Starts qemu-io in the background with one `write` command per write.
    mutating func start() throws {
        // Line-buffered, so each "wrote" line is in the log as soon as the reply arrived.
        var args = ["-oL", "qemu-io", "-f", "raw"]
        for i in first..<(first + count) {
            args += ["-c", "write -P \(Self.pattern(i)) \(Self.offset(i, slots: slots)) \(Self.writeBytes)"]
        }
        args.append(uri)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/stdbuf")
        p.arguments = args
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        p.standardOutput = fh
        p.standardError = fh
        p.standardInput = FileHandle.nullDevice
        try p.run()
        process = p
    }

    func wait(seconds: Double) {
        guard let p = process else { return }
        let end = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < end { usleep(20_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
    }

    /// Offsets acknowledged, in order (from qemu-io's "wrote … at offset X" lines).
    func acknowledgedOffsets() -> [Int] {
        guard let text = try? String(contentsOfFile: logPath, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            guard line.hasPrefix("wrote "), let r = line.range(of: "at offset ") else { return nil }
            return Int(line[r.upperBound...].trimmingCharacters(in: .whitespaces))
        }
    }

    /// The acknowledged writes, as (index, offset, pattern), assuming qemu-io ran them in order.
    func acknowledgedWrites() -> [(index: Int, offset: Int, pattern: Int)] {
        acknowledgedOffsets().enumerated().map { k, off in
            let i = first + k
            precondition(off == Self.offset(i, slots: slots), "qemu-io acknowledged out of order: \(off) for write \(i)")
            return (i, off, Self.pattern(i))
        }
    }

    /// For each slot, the pattern of the last acknowledged write to it.
    func expectedSlots() -> [Int: Int] {
        var last: [Int: Int] = [:]
        for w in acknowledgedWrites() { last[w.offset] = w.pattern }
        return last
    }
}

/// Reads back `expected` (offset → pattern) through a real client; returns the mismatches.
func verifyPatterns(uri: String, expected: [Int: Int], file: StaticString = #filePath, line: UInt = #line) throws -> [Int] {
    var bad: [Int] = []
    let items = expected.sorted { $0.key < $1.key }
    // One qemu-io per batch of reads; a failing read prints "Pattern verification failed".
    for batch in stride(from: 0, to: items.count, by: 64) {
        let part = items[batch..<min(items.count, batch + 64)]
        var args = ["qemu-io", "-f", "raw", "-r"]
        for (off, pat) in part { args += ["-c", "read -P \(pat) \(off) \(PatternWorkload.writeBytes)"] }
        args.append(uri)
        let r = try shell(args, timeout: 60)
        guard r.status == 0 || r.stdout.contains("Pattern verification failed") else {
            XCTFail("qemu-io read-back failed: \(r.stdout) \(r.stderr)", file: file, line: line)
            return part.map(\.key)
        }
        // Every read that ran prints "read N/N bytes at offset X", a mismatching one too: it
        // prints "Pattern verification failed at offset X, N bytes" before. A read counts only
        // with the first line and without the second.
        func offsets(_ prefix: String, upTo end: Character?) -> Set<Int> {
            Set(r.stdout.split(separator: "\n").compactMap { l -> Int? in
                guard l.hasPrefix(prefix), let rr = l.range(of: "at offset ") else { return nil }
                let tail = l[rr.upperBound...]
                return Int((end.flatMap { tail.split(separator: $0).first } ?? tail).trimmingCharacters(in: .whitespaces))
            })
        }
        let read = offsets("read ", upTo: nil), mismatched = offsets("Pattern verification failed", upTo: ",")
        bad += part.map(\.key).filter { !read.contains($0) || mismatched.contains($0) }
    }
    return bad
}

/// Polls a trivial write through `uri` until one is acknowledged; returns when (or nil).
func firstAcknowledgedWrite(uri: String, within seconds: Double) -> Date? {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if let r = try? shell(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4096", uri], timeout: 3), r.status == 0,
           r.stdout.contains("wrote ") {
            return Date()
        }
        usleep(20_000)
    }
    return nil
}
