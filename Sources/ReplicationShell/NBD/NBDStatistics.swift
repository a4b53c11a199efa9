import NIOConcurrencyHelpers
import NIOCore
import Replication

/// A snapshot of what an `NBDServer` has served, for `/metrics` (design.md §4).
public struct NBDStatistics: Sendable, Equatable {
    /// One counter: an operation ("read", "write", "flush", "trim", "write_zeroes",
    /// "disconnect", "unknown") and its result ("ok" or the NBD error name, e.g. "EINVAL").
    public struct OperationKey: Hashable, Sendable, CustomStringConvertible {
        public var operation: String
        public var result: String
        public init(operation: String, result: String) { self.operation = operation; self.result = result }
        public var description: String { "\(operation)/\(result)" }
    }

    public var operations: [OperationKey: UInt64] = [:]
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Time from a WRITE request's arrival to its reply being queued, in seconds.
    public var writeLatency = NBDLatencyHistogram()
    public var connectionsOpen: Int = 0
    public var connectionsAccepted: UInt64 = 0
    /// Requests admitted on all connections whose replies are not yet written to the socket.
    public var inFlightRequests: Int = 0
    /// Payload bytes of those requests (write data received, read data to send).
    public var inFlightBytes: Int = 0
    /// The highest `inFlightBytes` since the server started.
    public var inFlightBytesPeak: Int = 0

    public init() {}

    /// The count for one (operation, result) pair; 0 if never seen.
    public func count(_ operation: String, _ result: String = "ok") -> UInt64 {
        operations[OperationKey(operation: operation, result: result)] ?? 0
    }
}

/// A latency histogram with fixed bucket bounds, in the Prometheus shape: cumulative counts
/// per upper bound (`le`), plus the total count and sum.
public struct NBDLatencyHistogram: Sendable, Equatable {
    /// Upper bounds in seconds, from 50 µs (a page-cache write) to 10 s (a stuck peer).
    public static let bucketBounds: [Double] = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]
    /// `cumulativeCounts[i]` = observations ≤ `bucketBounds[i]`; `count` covers +Inf.
    public var cumulativeCounts: [UInt64] = Array(repeating: 0, count: NBDLatencyHistogram.bucketBounds.count)
    public var count: UInt64 = 0
    public var sumSeconds: Double = 0
    public init() {}
}

/// The operations counted, as indices into the recorder's table.
enum NBDOperationKind: Int, CaseIterable {
    case read, write, flush, trim, writeZeroes, disconnect, unknown

    init(command: UInt16) {
        switch command {
        case NBDCommand.read: self = .read
        case NBDCommand.write: self = .write
        case NBDCommand.flush: self = .flush
        case NBDCommand.trim: self = .trim
        case NBDCommand.writeZeroes: self = .writeZeroes
        case NBDCommand.disconnect: self = .disconnect
        default: self = .unknown
        }
    }

    var name: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .trim: return "trim"
        case .writeZeroes: return "write_zeroes"
        case .disconnect: return "disconnect"
        case .unknown: return "unknown"
        }
    }
}

/// Thread-safe accumulation behind `NBDServer.statistics`: fixed arrays under one lock,
/// so recording a request allocates nothing.
final class NBDStatisticsRecorder: @unchecked Sendable {
    private static let errors = NBDError.allCases
    private struct Table {
        var counts = [UInt64](repeating: 0, count: NBDOperationKind.allCases.count * NBDError.allCases.count)
        var bytesRead: UInt64 = 0
        var bytesWritten: UInt64 = 0
        var buckets = [UInt64](repeating: 0, count: NBDLatencyHistogram.bucketBounds.count)
        var latencyCount: UInt64 = 0
        var latencySum: Double = 0
        var open = 0
        var accepted: UInt64 = 0
        var inFlightRequests = 0
        var inFlightBytes = 0
        var inFlightBytesPeak = 0
    }
    private let lock = NIOLock()
    private var table = Table()

    func record(_ op: NBDOperationKind, _ result: NBDError, bytes: Int = 0, latencySeconds: Double? = nil) {
        let errorIndex = Self.errors.firstIndex(of: result)!
        lock.withLockVoid {
            table.counts[op.rawValue * Self.errors.count + errorIndex] &+= 1
            if result == .ok {
                if op == .read { table.bytesRead &+= UInt64(bytes) }
                if op == .write { table.bytesWritten &+= UInt64(bytes) }
            }
            if let s = latencySeconds {
                // Non-cumulative here; the snapshot makes it cumulative.
                if let i = NBDLatencyHistogram.bucketBounds.firstIndex(where: { s <= $0 }) { table.buckets[i] &+= 1 }
                table.latencyCount &+= 1
                table.latencySum += s
            }
        }
    }

    func connectionOpened() { lock.withLockVoid { table.open += 1; table.accepted &+= 1 } }
    func connectionClosed() { lock.withLockVoid { table.open -= 1 } }

    /// A connection admitted (positive) or released (negative) requests and their bytes.
    func inFlightChanged(requests: Int, bytes: Int) {
        lock.withLockVoid {
            table.inFlightRequests += requests
            table.inFlightBytes += bytes
            table.inFlightBytesPeak = max(table.inFlightBytesPeak, table.inFlightBytes)
        }
    }

    func snapshot() -> NBDStatistics {
        let t = lock.withLock { table }
        var s = NBDStatistics()
        for op in NBDOperationKind.allCases {
            for (i, e) in Self.errors.enumerated() {
                let n = t.counts[op.rawValue * Self.errors.count + i]
                if n > 0 { s.operations[.init(operation: op.name, result: e.name)] = n }
            }
        }
        s.bytesRead = t.bytesRead
        s.bytesWritten = t.bytesWritten
        var running: UInt64 = 0
        for i in t.buckets.indices {
            running &+= t.buckets[i]
            s.writeLatency.cumulativeCounts[i] = running
        }
        s.writeLatency.count = t.latencyCount
        s.writeLatency.sumSeconds = t.latencySum
        s.connectionsOpen = t.open
        s.connectionsAccepted = t.accepted
        s.inFlightRequests = t.inFlightRequests
        s.inFlightBytes = t.inFlightBytes
        s.inFlightBytesPeak = t.inFlightBytesPeak
        return s
    }
}
