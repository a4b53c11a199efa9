import Foundation
import HACore
import HAShell

/// A scratch directory holding a valid cluster config (design.md §5's example) with its
/// key and token files, for tests that change one thing and expect one error.
final class ConfigFixture {
    let dir: String

    static let validTOML = """
    [cluster]
    name = "web1"
    key_file = "web1.key"
    admin_token_file = "web1.token"
    protocol = "C"
    split_brain = "prohibit"

    [timeouts]
    renew_interval_ms = 200
    lease_ms = 1200
    failure_timeout_ms = 800

    [volume]
    size = "1GiB"
    chunk_size = "64KiB"
    resync_rate = "100MiB"

    [[node]]
    name = "a"
    replication_address = "10.1.0.1:7788"
    service_address = "10.1.0.1:10809"
    status_address = "10.1.0.1:9650"
    backing = "/var/lib/hamgr/web1-a.img"
    metadata = "/var/lib/hamgr/web1-a.meta"

    [[node]]
    name = "b"
    replication_address = "10.2.0.1:7788"
    service_address = "10.2.0.1:10809"
    status_address = "10.2.0.1:9650"
    backing = "/var/lib/hamgr/web1-b.img"
    metadata = "/var/lib/hamgr/web1-b.meta"

    [arbitrator]
    address = "10.3.0.1:7790"
    status_address = "10.3.0.1:9651"
    state_dir = "/var/lib/hamgr/arbitrator"

    [[resource]]
    name = "fs"
    agent = "ocf:heartbeat:Filesystem"
    params = { device = "/dev/nbd0", directory = "/srv/web1", fstype = "ext4" }
    monitor_interval_ms = 5000

    [hooks]
    on_promote = "/etc/hamgr/announce.sh"

    """

    init() throws {
        dir = NSTemporaryDirectory() + "hamgr-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try writeSecret("web1.key", Data((0..<32).map { _ in UInt8.random(in: 0...255) }))
        try writeSecret("web1.token", Data("s3cret-token-0123456789\n".utf8))
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func writeSecret(_ name: String, _ data: Data, mode: Int = 0o600) throws {
        let path = dir + "/" + name
        _ = FileManager.default.createFile(atPath: path, contents: data)
        chmod(path, mode_t(mode))
    }

    /// Write `toml` as the config and return its path.
    @discardableResult
    func write(_ toml: String, name: String = "web1.toml") throws -> String {
        let path = dir + "/" + name
        try toml.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// The valid config with `old` replaced by `new` (asserting `old` occurs).
    static func variant(_ old: String, _ new: String) -> String {
        precondition(validTOML.contains(old), "fixture does not contain \(old)")
        return validTOML.replacingOccurrences(of: old, with: new)
    }
}
