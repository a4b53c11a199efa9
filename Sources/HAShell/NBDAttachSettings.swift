import Foundation

/// The parameters of a `hamgr:nbd-attach` resource (docs/operator-guide.md, "Attaching the
/// export on the master"): where the attached device appears, and where the attachment keeps
/// its FUSE mount and notes.
public struct NBDAttachSettings: Sendable, Equatable {
    /// How the export becomes a block device, chosen by `device`.
    public enum Method: String, Sendable {
        /// `/dev/nbdN`: the kernel NBD client (`nbd-client`, module `nbd`).
        case nbdClient = "nbd-client"
        /// Any other path: `nbdfuse` exposes the export as a file, `losetup` makes it a loop
        /// device, and `device` is a symlink to that loop device.
        case nbdfuse
    }

    /// The stable path the operator mounts (`/dev/nbd0`, or e.g. `/run/hamgr/web1/disk`).
    public var device: String
    /// Where the FUSE mount point and the notes live; nil: `/run/hamgr/CLUSTER/RESOURCE`.
    public var stateDir: String?

    public static let parameterNames = ["device", "state_dir"]

    public var method: Method { Self.isKernelDevice(device) ? .nbdClient : .nbdfuse }

    /// The state directory of resource `resource` of cluster `cluster`.
    public func stateDirectory(cluster: String, resource: String) -> String {
        stateDir ?? "/run/hamgr/\(cluster)/\(resource)"
    }

    /// Reads and checks the parameters; errors name `key.PARAM`.
    public init(params: [String: String], key: String) throws {
        if let extra = params.keys.sorted().first(where: { !Self.parameterNames.contains($0) }) {
            throw ConfigError(key: "\(key).\(extra)", message: "hamgr:nbd-attach takes only \(Self.parameterNames.joined(separator: " and "))")
        }
        guard let device = params["device"] else {
            throw ConfigError(key: "\(key).device", message: "required: /dev/nbdN (kernel nbd-client) or a path for a symlink to the loop device (nbdfuse)")
        }
        guard device.hasPrefix("/"), !device.hasSuffix("/"), device.utf8.count <= 255 else {
            throw ConfigError(key: "\(key).device", message: "\(device): must be an absolute path of at most 255 bytes")
        }
        // Only the kernel client's own devices are used under /dev: hamgr never creates
        // anything there (the nbdfuse method's symlink goes elsewhere, e.g. /run/hamgr).
        if device.hasPrefix("/dev/") && !Self.isKernelDevice(device) {
            throw ConfigError(key: "\(key).device", message: "\(device): under /dev only /dev/nbdN (kernel nbd-client) is allowed; for nbdfuse name a path such as /run/hamgr/CLUSTER/disk")
        }
        if let dir = params["state_dir"], !dir.hasPrefix("/") || dir.utf8.count > 200 {
            throw ConfigError(key: "\(key).state_dir", message: "\(dir): must be an absolute path of at most 200 bytes")
        }
        self.device = device
        self.stateDir = params["state_dir"]
    }

    public static func validate(_ params: [String: String], key: String) throws {
        _ = try NBDAttachSettings(params: params, key: key)
    }

    static func isKernelDevice(_ path: String) -> Bool {
        guard path.hasPrefix("/dev/nbd") else { return false }
        let n = path.dropFirst("/dev/nbd".count)
        return !n.isEmpty && n.allSatisfy(\.isASCII) && n.allSatisfy(\.isNumber)
    }
}
