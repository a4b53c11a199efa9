import Foundation
import XCTest

/// Issue 8: `/status` never reports `primary` for a node whose lease has lapsed by its own
/// clock, whatever its timers have done yet. Real processes on loopback (arbitrator + A + B).
final class StatusLeaseProcessTests: XCTestCase {
    /// SIGSTOP the master for 3× the lease (1.2 s by default), so its lease has surely lapsed
    /// by its own clock, and the backup has taken over. While it is still stopped, queue
    /// `/status` requests on connections the kernel accepts into the listen backlog; then
    /// SIGCONT. The server reads them the instant the process resumes, in the same scheduling
    /// round as the overdue tick timer, so they are answered before (or while) the core is fed
    /// the tick that demotes it. Then poll in a tight loop (bounded in count and time). No
    /// answer may say `primary`.
    func testResumedMasterNeverAnnouncesPrimaryWithALapsedLease() throws {
        let h = try ClusterHarness(name: "stlease", subnet: 57)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        let node = h.node(master)
        XCTAssertEqual(StatusProbe.get(ip: node.ip, port: node.statusPort)?.role, "primary", "premise: \(master) answers as primary")

        h.signal(master, SIGSTOP)
        let stopped = Date()
        h.waitForRole(backup, "primary", within: 10)
        usleep(useconds_t(max(0, 3.6 - Date().timeIntervalSince(stopped)) * 1_000_000))

        // Requests that wait for the resumed process (bounded: 16 /status, 8 /metrics).
        let queued = (0..<16).compactMap { _ in StatusProbe.send(ip: node.ip, port: node.statusPort) }
        let queuedMetrics = (0..<8).compactMap { _ in StatusProbe.send(ip: node.ip, port: node.statusPort, path: "/metrics") }
        XCTAssertEqual(queued.count + queuedMetrics.count, 24, "could not queue requests at a stopped server")
        h.signal(master, SIGCONT)
        var answers: [StatusProbe.Answer] = queued.compactMap { StatusProbe.receive(fd: $0) }
        var gauges: [String] = queuedMetrics.compactMap { StatusProbe.receiveRoleGauge(fd: $0) }
        let queuedAnswered = answers.count, queuedGauges = gauges.count
        // Then a tight loop: at most 300 requests and 3 s, every fourth one /metrics.
        let end = Date().addingTimeInterval(3)
        var polls = 0
        while polls < 300 && Date() < end {
            polls += 1
            if polls % 4 == 0 {
                if let g = StatusProbe.send(ip: node.ip, port: node.statusPort, path: "/metrics").flatMap({ StatusProbe.receiveRoleGauge(fd: $0) }) { gauges.append(g) }
            } else if let a = StatusProbe.get(ip: node.ip, port: node.statusPort) { answers.append(a) }
        }
        let primaries = answers.filter { $0.role == "primary" }
        print("resumed master: \(queuedAnswered)/16 queued /status and \(queuedGauges)/8 queued /metrics answered, \(polls) polls, \(answers.count) /status answers, \(primaries.count) said primary, \(gauges.count) role gauges, \(gauges.filter { $0 == "primary" }.count) said primary; first answers: \(answers.prefix(3).map(\.summary))")
        XCTAssertGreaterThanOrEqual(queuedAnswered, 8, "the queued requests were not answered after SIGCONT")
        XCTAssertGreaterThanOrEqual(queuedGauges, 4, "the queued /metrics requests were not answered after SIGCONT")
        XCTAssertEqual(gauges.filter { $0 == "primary" }.count, 0, "hamgr_role said primary with a lapsed lease")
        XCTAssertEqual(primaries.count, 0,
                       "the resumed master announced primary with a lapsed lease \(primaries.count) times; first: \(primaries.first?.summary ?? "")\n\(h.tail(master))")
        for a in answers where a.role == "secondary" && a.master == node.name {
            XCTFail("a secondary answer named itself master: \(a.summary)")
            break
        }
        // It demoted for good and the new master stays.
        h.waitForRole(master, "secondary", within: 10)
        XCTAssertEqual(h.role(backup), "primary")
    }
}

/// A minimal HTTP/1.1 client on raw sockets, so a request can be queued at a stopped
/// process and a poll costs no process spawn. Every call is bounded by socket timeouts.
enum StatusProbe {
    struct Answer {
        var role: String?
        var master: String?
        var leaseValidMs: Int?
        var whyNotPromoted: String?
        var summary: String { "role=\(role ?? "?") master=\(master ?? "null") lease_valid_ms=\(leaseValidMs.map(String.init) ?? "?") why=\(whyNotPromoted ?? "null")" }
    }

    /// Connects and sends `GET path`; returns the socket (nil on failure).
    static func send(ip: String, port: Int, path: String = "/status") -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr(ip)
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: \(ip)\r\nConnection: close\r\n\r\n".utf8)
        guard rc == 0, request.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count else {
            close(fd)
            return nil
        }
        return fd
    }

    /// Reads the whole response (the server closes) and closes the socket.
    static func receiveText(fd: Int32) -> String {
        defer { close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16384)
        for _ in 0..<256 {  // bounded: a status document or metrics page is a few KiB
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The role whose `hamgr_role{role=...}` gauge is 1 on a `/metrics` page (nil if unreadable).
    static func receiveRoleGauge(fd: Int32) -> String? {
        let text = receiveText(fd: fd)
        guard text.hasPrefix("HTTP/1.1 200") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("hamgr_role{role=\"") && line.hasSuffix(" 1") {
            return line.split(separator: "\"").dropFirst().first.map(String.init)
        }
        return nil
    }

    static func receive(fd: Int32) -> Answer? {
        let text = receiveText(fd: fd)
        guard text.hasPrefix("HTTP/1.1 200"), let split = text.range(of: "\r\n\r\n"),
              let obj = try? JSONSerialization.jsonObject(with: Data(text[split.upperBound...].utf8)) as? [String: Any] else { return nil }
        return Answer(role: obj["role"] as? String, master: (obj["master"] as? [String: Any])?["node"] as? String,
                      leaseValidMs: obj["lease_valid_ms"] as? Int, whyNotPromoted: obj["why_not_promoted"] as? String)
    }

    static func get(ip: String, port: Int) -> Answer? {
        send(ip: ip, port: port).flatMap { receive(fd: $0) }
    }
}
