@preconcurrency import Crypto
import Foundation
import HACore

// Split from HACore/Frame.swift: reading the key file is I/O.
extension SymmetricKey {
    /// Load a cluster key: at least 32 bytes, file mode 0600 (no group/other bits).
    /// The path may begin with `${CREDENTIALS_DIRECTORY}` (`SystemdCredentials`).
    public static func load(clusterKeyFile configuredPath: String, key: String = "cluster.key_file") throws -> SymmetricKey {
        let path = try SystemdCredentials.expand(configuredPath, key: key)
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw ConfigError(key: key, message: "cannot read \(path): \(String(cString: strerror(errno)))")
        }
        if st.st_mode & 0o077 != 0 {
            throw ConfigError(key: key, message: "\(path) has mode \(String(st.st_mode & 0o777, radix: 8)); it must not be readable by group or others (chmod 600)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(key: key, message: "cannot read \(path)")
        }
        guard data.count >= 32 else {
            throw ConfigError(key: key, message: "\(path) holds \(data.count) bytes; at least 32 random bytes are required")
        }
        return SymmetricKey(data: data)
    }
}
