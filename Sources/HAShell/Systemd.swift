import CSystemd
import Foundation

/// The service manager protocol (sd_notify): READY=1 once serving, STATUS= lines for
/// `systemctl status`, WATCHDOG=1 at half of WatchdogSec while the loops answer, STOPPING=1 on the
/// way out (design.md §4). Every call is a no-op without NOTIFY_SOCKET, so the same
/// binary runs under systemd, in tests and in the demo.
public final class SystemdNotifier: @unchecked Sendable {
    private let lock = NSLock()
    private var watchdogTimer: DispatchSourceTimer?

    public init() {}

    /// True when a service manager listens (NOTIFY_SOCKET is set).
    public var isSupervised: Bool { getenv("NOTIFY_SOCKET") != nil }

    /// Send raw `KEY=value` lines. Returns sd_notify's result: > 0 sent, 0 no socket, < 0 -errno.
    @discardableResult
    public func notify(_ state: String) -> Int32 {
        sd_notify(0, state)
    }

    /// Startup finished: the daemon serves (status endpoint up, role decided).
    @discardableResult
    public func ready(status: String? = nil) -> Int32 {
        notify(status.map { "READY=1\nSTATUS=\(Self.oneLine($0))" } ?? "READY=1")
    }

    /// A one-line status shown by `systemctl status`.
    @discardableResult
    public func status(_ text: String) -> Int32 {
        notify("STATUS=\(Self.oneLine(text))")
    }

    /// Shutdown began (demoting, stopping resources).
    @discardableResult
    public func stopping(status: String? = nil) -> Int32 {
        stopWatchdog()
        return notify(status.map { "STOPPING=1\nSTATUS=\(Self.oneLine($0))" } ?? "STOPPING=1")
    }

    /// Ask for more time for the current start or stop (e.g. stopping slow resources).
    @discardableResult
    public func extendTimeout(_ d: Duration) -> Int32 {
        notify("EXTEND_TIMEOUT_USEC=\(max(0, d.nanosecondsClamped / 1000))")
    }

    /// One keep-alive ping.
    @discardableResult
    public func watchdogPing() -> Int32 {
        notify("WATCHDOG=1")
    }

    /// WatchdogSec of the unit (from WATCHDOG_USEC, honouring WATCHDOG_PID), nil if off.
    public var watchdogInterval: Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(clamping: usec))
    }

    /// Ping at half the watchdog interval after each successful `isAlive()` — which should
    /// prove that the daemon's loops answer (`LivenessProbe`), not that it is healthy: a
    /// daemon whose check fails stops pinging and systemd restarts it. The check runs on a
    /// thread of its own and may block for up to a quarter of the interval. Returns false
    /// (and does nothing) without a watchdog.
    @discardableResult
    public func startWatchdog(isAlive: @escaping @Sendable (_ bound: Duration) -> Bool) -> Bool {
        guard let interval = watchdogInterval else { return false }
        let period = interval / 2
        let queue = DispatchQueue(label: "hamgr.watchdog")
        let timer = DispatchSource.makeTimerSource(queue: queue)
        timer.schedule(deadline: .now(), repeating: .nanoseconds(Int(period.nanosecondsClamped)), leeway: .milliseconds(10))
        timer.setEventHandler { [weak self] in
            // A check still running when the watchdog stops must not ping after STOPPING=1.
            guard isAlive(period / 2), let self else { return }
            self.lock.withLock { if !timer.isCancelled { self.watchdogPing() } }
        }
        lock.lock()
        watchdogTimer?.cancel()
        watchdogTimer = timer
        lock.unlock()
        timer.resume()
        return true
    }

    public func stopWatchdog() {
        lock.lock()
        watchdogTimer?.cancel()
        watchdogTimer = nil
        lock.unlock()
    }

    deinit { watchdogTimer?.cancel() }

    private static func oneLine(_ s: String) -> String {
        s.replacingOccurrences(of: "\n", with: " ")
    }
}
