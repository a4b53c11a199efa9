import Foundation
import HACore

/// systemd credentials (`LoadCredential=NAME:SOURCE` in a unit): systemd copies SOURCE into a
/// private directory readable only by the service's user, and names it in
/// `$CREDENTIALS_DIRECTORY`. A secret file key (`key_file`, `accept_key_files`,
/// `admin_token_file`, `read_token_file`) may begin with `${CREDENTIALS_DIRECTORY}`: the
/// path is expanded when the file is read, so `hactl` can still parse the config outside
/// the unit, and the arbitrator's user never needs to read the source under /etc.
public enum SystemdCredentials {
    public static let placeholder = "${CREDENTIALS_DIRECTORY}"
    public static let variable = "CREDENTIALS_DIRECTORY"

    /// True when `path` names a credential (the config keeps it as written, not resolved
    /// against the config file's directory).
    public static func names(_ path: String) -> Bool { path.hasPrefix(placeholder) }

    /// `path` with a leading `${CREDENTIALS_DIRECTORY}` replaced by the variable's value;
    /// any other path unchanged. Throws, naming `key`, when the variable is unset or empty.
    public static func expand(_ path: String, key: String,
                              environment: [String: String] = ProcessInfo.processInfo.environment) throws -> String {
        guard names(path) else { return path }
        guard let dir = environment[variable], !dir.isEmpty else {
            throw ConfigError(key: key, message: "\(path) names \(placeholder), but \(variable) is not set: systemd sets it for a unit with LoadCredential= (docs/operator-guide.md, \"Unit files\"); outside systemd set it yourself, e.g. \(variable)=/etc/hamgr hamgr check --config …")
        }
        return dir + path.dropFirst(placeholder.count)
    }
}
