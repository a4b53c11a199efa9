import Foundation

/// Small state files that must survive a crash exactly as written: write a temporary file,
/// fsync it, rename it over the old one, fsync the directory (design.md §1: persisted
/// before it is relied on).
public enum DurableFile {
    public static func write(_ bytes: [UInt8], to path: String) throws {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DurableFileError(op: "open", path: tmp, errno: errno) }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Foundation.write(fd, $0.baseAddress! + done, bytes.count - done) }
            if n < 0 { if errno == EINTR { continue }; throw DurableFileError(op: "write", path: tmp, errno: errno) }
            done += n
        }
        guard fsync(fd) == 0 else { throw DurableFileError(op: "fsync", path: tmp, errno: errno) }
        guard rename(tmp, path) == 0 else { throw DurableFileError(op: "rename", path: path, errno: errno) }
        let dir = (path as NSString).deletingLastPathComponent
        // The rename is durable only once the directory is: a failure here is a failure of the write.
        let dfd = open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dfd >= 0 else { throw DurableFileError(op: "open directory", path: dir, errno: errno) }
        defer { close(dfd) }
        guard syncDirectory(dfd) == 0 else { throw DurableFileError(op: "fsync directory", path: dir, errno: errno) }
    }

    /// The directory fsync; a test replaces it to prove its failure fails the write (no
    /// filesystem here can be made to fail only that call).
    nonisolated(unsafe) static var syncDirectory: (Int32) -> Int32 = { fsync($0) }

    /// nil when the file does not exist.
    public static func read(_ path: String) throws -> [UInt8]? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let d = FileManager.default.contents(atPath: path) else { throw DurableFileError(op: "read", path: path, errno: errno) }
        return [UInt8](d)
    }
}

public struct DurableFileError: Error, CustomStringConvertible {
    public var op: String, path: String, errno: Int32
    public var description: String { "\(op) \(path): \(String(cString: strerror(errno)))" }
}
