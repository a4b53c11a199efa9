import CSystemd
import Foundation

/// The service manager protocol (sd_notify): READY=1 once serving, STATUS= lines for
/// `systemctl status`, WATCHDOG=1 at half of WatchdogSec while healthy, STOPPING=1 on the
/// way out (design.md §4). Every call is a no-op without NOTIFY_SOCKET, so the same
/// binary runs under systemd, in tests and in the demo.
public final class SystemdNotifier: @unchecked Sendable {
    private let lock = NSLock()
    private var watchdogTask: Task<Void, Never>?

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

    /// Ping at half the watchdog interval while `isAlive()` says the daemon is healthy
    /// (e.g. its event loops answered recently). A daemon that stops being alive stops
    /// pinging and systemd restarts it. Returns false (and does nothing) without a watchdog.
    @discardableResult
    public func startWatchdog(isAlive: @escaping @Sendable () -> Bool) -> Bool {
        guard let interval = watchdogInterval else { return false }
        let period = interval / 2
        let task = Task.detached { [weak self] in
            while !Task.isCancelled {
                guard let self else { return }
                if isAlive() { self.watchdogPing() }
                try? await Task.sleep(for: period)
            }
        }
        lock.lock()
        watchdogTask?.cancel()
        watchdogTask = task
        lock.unlock()
        return true
    }

    public func stopWatchdog() {
        lock.lock()
        watchdogTask?.cancel()
        watchdogTask = nil
        lock.unlock()
    }

    deinit { watchdogTask?.cancel() }

    private static func oneLine(_ s: String) -> String {
        s.replacingOccurrences(of: "\n", with: " ")
    }
}
