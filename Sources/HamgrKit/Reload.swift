import Foundation
import HAShell
import Logging

/// A part of the configuration a running daemon changes without a restart
/// (docs/operator-guide.md, "Reload").
enum LiveSetting: String, CaseIterable, Sendable, Comparable {
    case logLevel = "log.level"
    case resources = "resource"
    case hooks = "hooks"
    case resyncRate = "volume.resync_rate"
    case exportAllow = "export.allow"

    /// The setting a changed key (`ClusterConfig.changedKeys`) belongs to, if any.
    init?(key: String) {
        switch key {
        case "log.level": self = .logLevel
        case "volume.resync_rate": self = .resyncRate
        case "export.allow": self = .exportAllow
        case _ where key.hasPrefix("resource["): self = .resources
        case _ where key.hasPrefix("hooks."): self = .hooks
        default: return nil
        }
    }

    static func < (a: LiveSetting, b: LiveSetting) -> Bool { a.rawValue < b.rawValue }
}

/// A daemon that applies settings of a reloaded configuration while it runs.
protocol ReloadTarget: AnyObject, Sendable {
    /// What it applies live (the log level is the `Reloader`'s own).
    var liveSettings: Set<LiveSetting> { get }
    /// Apply `fresh`'s value of each setting in `settings` (each one changed), logging one
    /// event per change; returns once they are in force. Returns the settings it refused
    /// (e.g. a hook that is not executable here), with why: they stay as they run.
    func apply(_ settings: Set<LiveSetting>, from fresh: ClusterConfig) -> [LiveSetting: String]
}

/// `systemctl reload` (SIGHUP): re-read the config, apply what can change live and refuse,
/// one line per key, what needs a restart. Never exits. The one place that decides what a
/// reload does: the daemons only carry out `ReloadTarget.apply`.
///
/// `running` is the configuration in force: the start's, with every setting a reload
/// applied since. A key refused stays at its running value, so every later reload names
/// it again until the restart.
final class Reloader: @unchecked Sendable {
    private let path: String
    private let option: String?
    private let startLevel: Logger.Level
    private let target: ReloadTarget?
    private let logger = Logger(label: "hamgr.reload")
    private let lock = NSLock()
    private var running: ClusterConfig  // under lock

    init(path: String, running: ClusterConfig, option: String?, startLevel: Logger.Level, target: ReloadTarget?) {
        self.path = path; self.running = running; self.option = option; self.startLevel = startLevel; self.target = target
    }

    /// The configuration in force.
    var current: ClusterConfig { lock.withLock { running } }

    func reload() {
        lock.lock()
        defer { lock.unlock() }
        let fresh: ClusterConfig
        do {
            fresh = try ClusterConfig.load(path: path)
        } catch {
            logger.error("reload refused: \(path): \(error); the running configuration stays", metadata: ["event": "reload_refused"])
            return
        }
        let keys = running.changedKeys(comparedTo: fresh)
        let live = (target?.liveSettings ?? []).union([.logLevel])
        var applying = Set<LiveSetting>()
        var refused: [String] = []
        for key in keys {
            if let s = LiveSetting(key: key), live.contains(s) { applying.insert(s) } else { refused.append(key) }
        }
        if applying.contains(.logLevel) { applyLogLevel(fresh) }
        let forTarget = applying.subtracting([.logLevel])
        let declined = forTarget.isEmpty ? [:] : target?.apply(forTarget, from: fresh) ?? [:]
        for (setting, why) in declined.sorted(by: { $0.key < $1.key }) {
            applying.remove(setting)
            logger.error("reload: \(setting.rawValue) not applied: \(why)", metadata: ["event": "reload_refused", "key": .string(setting.rawValue)])
        }
        for key in refused {
            logger.warning("reload: \(key) changed; needs a restart (not applied)", metadata: ["event": "reload_needs_restart", "key": .string(key)])
        }
        running = running.adopting(applying, from: fresh)
        logger.notice("reload done", metadata: ["event": "reload", "applied": .string(applying.sorted().map(\.rawValue).joined(separator: ",")),
                                               "needs_restart": .string("\(refused.count)")])
    }

    private func applyLogLevel(_ fresh: ClusterConfig) {
        let fixed = option != nil || !(ProcessInfo.processInfo.environment["HAMGR_LOG_LEVEL"] ?? "").isEmpty
        guard !fixed else {
            logger.notice("reload: log.level changed; --log-level or $HAMGR_LOG_LEVEL fixes the level at \(startLevel) (not applied)",
                          metadata: ["event": "reload_not_applied", "key": "log.level"])
            return
        }
        let wanted = fresh.logLevel.flatMap(HamgrLogging.level) ?? .info
        var handler = logger
        let before = handler.logLevel
        guard wanted != before else { return }
        handler.logLevel = wanted  // the output's level: every logger of the process
        logger.notice("reload: log level \(before) → \(wanted)", metadata: ["event": "reload_applied", "key": "log.level"])
    }
}

extension ClusterConfig {
    /// This configuration with `settings` taken from `fresh`.
    func adopting(_ settings: Set<LiveSetting>, from fresh: ClusterConfig) -> ClusterConfig {
        var c = self
        for s in settings {
            switch s {
            case .logLevel: c.logLevel = fresh.logLevel
            case .resources: c.resources = fresh.resources
            case .hooks: c.hooks = fresh.hooks
            case .resyncRate: c.volume.resyncRateBytesPerSecond = fresh.volume.resyncRateBytesPerSecond
            case .exportAllow: c.export.allow = fresh.export.allow
            }
        }
        return c
    }
}
