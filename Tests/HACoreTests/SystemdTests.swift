import Foundation
import HACore
import HAShell
import NIOPosix
import XCTest

/// A Unix datagram socket standing in for systemd's NOTIFY_SOCKET.
final class NotifySocket {
    let path: String
    let fd: Int32

    init() throws {
        path = NSTemporaryDirectory() + "hamgr-notify-\(UUID().uuidString.prefix(8))"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw POSIXError(.EADDRINUSE) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd); unlink(path) }

    /// The next datagram, nil after a 2 s timeout.
    func receive() -> String? {
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buf, buf.count, 0)
        return n < 0 ? nil : String(decoding: buf[0..<n], as: UTF8.self)
    }

    /// Nothing arrives within `seconds`.
    func isQuiet(for seconds: Int) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, Int32(seconds * 1000)) == 0
    }
}

final class SystemdTests: XCTestCase {
    override func tearDown() {
        unsetenv("NOTIFY_SOCKET"); unsetenv("WATCHDOG_USEC"); unsetenv("WATCHDOG_PID")
    }

    func testNotifyMessagesReachTheSocket() throws {
        let sock = try NotifySocket()
        setenv("NOTIFY_SOCKET", sock.path, 1)
        let n = SystemdNotifier()
        XCTAssertTrue(n.isSupervised)
        XCTAssertGreaterThan(n.ready(status: "secondary, epoch 3"), 0)
        XCTAssertEqual(sock.receive(), "READY=1\nSTATUS=secondary, epoch 3")
        n.status("primary\nepoch 4")
        XCTAssertEqual(sock.receive(), "STATUS=primary epoch 4")
        n.extendTimeout(.seconds(2))
        XCTAssertEqual(sock.receive(), "EXTEND_TIMEOUT_USEC=2000000")
        n.stopping()
        XCTAssertEqual(sock.receive(), "STOPPING=1")
    }

    func testWatchdogPingsAtHalfTheInterval() throws {
        let sock = try NotifySocket()
        setenv("NOTIFY_SOCKET", sock.path, 1)
        setenv("WATCHDOG_USEC", "400000", 1)
        setenv("WATCHDOG_PID", String(getpid()), 1)
        let n = SystemdNotifier()
        XCTAssertEqual(n.watchdogInterval, .milliseconds(400))
        let start = ContinuousClock.now
        XCTAssertTrue(n.startWatchdog { _ in true })
        var pings = 0
        while pings < 4, let msg = sock.receive() {
            XCTAssertEqual(msg, "WATCHDOG=1")
            pings += 1
        }
        let elapsed = ContinuousClock.now - start
        XCTAssertEqual(pings, 4)
        // Pings at 0, 200, 400, 600 ms: about 600 ms for four, never the full interval apart.
        XCTAssertGreaterThan(elapsed, .milliseconds(450))
        XCTAssertLessThan(elapsed, .milliseconds(1500))
        n.stopping()
        XCTAssertEqual(sock.receive(), "STOPPING=1")
        XCTAssertTrue(sock.isQuiet(for: 1), "no pings after stopping")
    }

    func testUnhealthyDaemonStopsPinging() throws {
        let sock = try NotifySocket()
        setenv("NOTIFY_SOCKET", sock.path, 1)
        setenv("WATCHDOG_USEC", "200000", 1)
        unsetenv("WATCHDOG_PID")
        let n = SystemdNotifier()
        XCTAssertTrue(n.startWatchdog { _ in false })
        XCTAssertTrue(sock.isQuiet(for: 1))
        n.stopWatchdog()
    }

    /// The probe behind the node's and the arbitrator's watchdog: a real event loop blocked
    /// by a task of its own is named stuck within the bound, and the pings stop while it is.
    func testBlockedEventLoopStopsThePings() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { try? group.syncShutdownGracefully() }
        let control = DispatchQueue(label: "test.control")
        let probe = LivenessProbe([LivenessProbe.queue(control, name: "control queue")] + LivenessProbe.loops(of: group))
        XCTAssertEqual(probe.stuck(within: .seconds(1)), [], "idle loops answer")

        let sock = try NotifySocket()
        setenv("NOTIFY_SOCKET", sock.path, 1)
        setenv("WATCHDOG_USEC", "400000", 1)
        unsetenv("WATCHDOG_PID")
        let n = SystemdNotifier()
        XCTAssertTrue(n.startWatchdog { bound in probe.stuck(within: bound).isEmpty })
        XCTAssertEqual(sock.receive(), "WATCHDOG=1", "pings while every loop answers")
        // Block loop 1 for 2.5 s (a handler stuck in a system call, a busy loop).
        let release = DispatchSemaphore(value: 0)
        let loops = Array(group.makeIterator())
        loops[1].execute { _ = release.wait(timeout: .now() + 2.5) }
        usleep(50_000)
        XCTAssertEqual(probe.stuck(within: .milliseconds(100)), ["event loop 1"])
        // Drop pings sent before the block took effect; then silence while it lasts (≥ 1.9 s left).
        usleep(300_000)
        var buf = [UInt8](repeating: 0, count: 64)
        while recv(sock.fd, &buf, buf.count, Int32(MSG_DONTWAIT)) > 0 {}
        XCTAssertTrue(sock.isQuiet(for: 1), "a blocked loop must stop the pings")
        release.signal()
        XCTAssertEqual(sock.receive(), "WATCHDOG=1", "pings resume once the loop answers")
        n.stopWatchdog()
        // The control queue too.
        control.async { _ = release.wait(timeout: .now() + 1) }
        XCTAssertEqual(probe.stuck(within: .milliseconds(100)), ["control queue"])
        release.signal()
    }

    func testWatchdogForAnotherProcessIsIgnored() {
        setenv("WATCHDOG_USEC", "200000", 1)
        setenv("WATCHDOG_PID", String(getpid() + 1), 1)
        XCTAssertNil(SystemdNotifier().watchdogInterval)
        XCTAssertFalse(SystemdNotifier().startWatchdog { _ in true })
    }

    func testNoOpWithoutNotifySocket() {
        unsetenv("NOTIFY_SOCKET")
        let n = SystemdNotifier()
        XCTAssertFalse(n.isSupervised)
        XCTAssertEqual(n.ready(), 0)
        XCTAssertEqual(n.stopping(), 0)
        XCTAssertNil(n.watchdogInterval)
    }
}
