import NIOCore

/// What one NBD connection may tie up in memory (docs/nbd.md, "Memory bound"): the payload
/// bytes of write requests and of read replies, counted from when a request is admitted
/// until its reply has been written to the socket, and the number of such requests. A
/// client that sends without reading replies therefore holds at most this much; the
/// connection stops reading from it until replies drain.
///
/// Pure: the connection handler asks `admits` before taking a request off the wire,
/// `admit`s it, and `release`s it once the reply's write completed.
public struct NBDInFlightBudget: Sendable, Equatable {
    public struct Limits: Sendable, Equatable {
        /// Requests admitted and not yet answered on the socket (`export.max_in_flight_requests`).
        public var maxRequests: Int
        /// Payload bytes of those requests (`export.max_in_flight_bytes`).
        public var maxBytes: Int
        /// Open connections the export keeps at once (`export.max_connections`); one more is
        /// closed before the greeting. With the two above it bounds the whole export:
        /// `maxConnections × maxBytes` of request payload at most.
        public var maxConnections: Int

        /// 64 MiB: twice the NBD maximum block size, and QD32 of 1 MiB requests with room
        /// to spare; 256 requests: above the Linux nbd driver's default queue depth (128);
        /// 16 connections: qemu's and nbdcopy's multi-conn (4 each) several times over.
        public static let defaults = Limits(maxRequests: 256, maxBytes: 64 << 20, maxConnections: 16)

        public init(maxRequests: Int, maxBytes: Int, maxConnections: Int = Limits.defaults.maxConnections) {
            self.maxRequests = maxRequests
            self.maxBytes = maxBytes
            self.maxConnections = maxConnections
        }
    }

    public let limits: Limits
    public private(set) var requests = 0
    public private(set) var bytes = 0

    public init(limits: Limits = .defaults) {
        precondition(limits.maxRequests >= 1 && limits.maxBytes >= 1, "NBD in-flight limits must be positive: \(limits)")
        self.limits = limits
    }

    /// The bytes `header` ties up until its reply is written: a write's payload, a read's
    /// reply data. Requests refused for their size (over `maximumPayloadBytes`) cost nothing:
    /// an oversized write's payload is skipped, not kept, and the refusal is a header.
    public static func cost(of header: NBDRequestHeader, maximumPayloadBytes: UInt32) -> Int {
        guard header.length <= maximumPayloadBytes else { return 0 }
        switch header.type {
        case NBDCommand.write, NBDCommand.read: return Int(header.length)
        default: return 0
        }
    }

    /// Whether a request costing `cost` bytes may be admitted now: within both limits, or
    /// alone, so that a request larger than the byte limit is still served (by itself).
    public func admits(cost: Int) -> Bool {
        requests == 0 || (requests < limits.maxRequests && bytes + cost <= limits.maxBytes)
    }

    public mutating func admit(cost: Int) {
        precondition(admits(cost: cost), "NBD request of \(cost) bytes admitted over the budget: \(requests) requests, \(bytes) bytes of \(limits)")
        requests += 1
        bytes += cost
    }

    /// `count` requests of `cost` bytes in all have had their replies written (or dropped
    /// with the connection).
    public mutating func release(count: Int, cost: Int) {
        precondition(count <= requests && cost <= bytes, "NBD release of \(count) requests, \(cost) bytes exceeds those in flight: \(requests), \(bytes)")
        requests -= count
        bytes -= cost
    }

    /// Whether a connection that stopped reading may start again: at most half of each
    /// limit in use, so that one at the limit does not switch reading on and off per reply.
    public var mayResumeReading: Bool {
        requests <= limits.maxRequests / 2 && bytes <= limits.maxBytes / 2
    }
}
