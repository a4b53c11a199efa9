/// Byte sizes as operators write them in the config: `"1GiB"`, `"64KiB"`, `"100MiB"`,
/// `"4096"` or a bare TOML integer. Binary suffixes are powers of 1024; the decimal
/// ones (`kB`, `MB`, `GB`, `TB`) powers of 1000, as everywhere else in storage tooling.
public enum ByteSize {
    private static let suffixes: [(String, UInt64)] = [
        ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40),
        ("kB", 1_000), ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000),
        ("B", 1),
    ]

    /// Parse `text`; errors name `key`.
    public static func parse(_ text: String, key: String) throws -> UInt64 {
        let s = trimmingWhitespace(text)
        var number = Substring(s)
        var unit: UInt64 = 1
        for (suffix, factor) in suffixes where s.hasSuffix(suffix) {
            number = s.dropLast(suffix.count)
            unit = factor
            break
        }
        number = Substring(trimmingWhitespace(number))
        guard !number.isEmpty, number.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(number) else {
            throw ConfigError(key: key, message: "'\(text)' is not a size (examples: 1GiB, 64KiB, 100MiB, 4096)")
        }
        let (bytes, overflow) = n.multipliedReportingOverflow(by: unit)
        guard !overflow else { throw ConfigError(key: key, message: "'\(text)' is too large") }
        return bytes
    }

    /// A short human form: `"1 GiB"`, `"64 KiB"`, `"1.5 GiB"`, `"512 B"`.
    public static func format(_ bytes: UInt64) -> String {
        let units: [(String, UInt64)] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        for (name, factor) in units where bytes >= factor {
            if bytes % factor == 0 { return "\(bytes / factor) \(name)" }
            return fixedPoint(Double(bytes) / Double(factor), decimals: 1) + " " + name
        }
        return "\(bytes) B"
    }
}

/// A path where block devices live: hamgr never creates a backing store there. `/dev/shm` is
/// the exception: a tmpfs of plain files (benchmarks and tests keep their stores there).
public func isDevicePath(_ path: String) -> Bool {
    path.hasPrefix("/dev/") && !path.hasPrefix("/dev/shm/")
}
