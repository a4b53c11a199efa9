import Foundation
import XCTest

/// The shipped unit files pass `systemd-analyze verify`. It exits 0 even on unknown keys,
/// so the test reads its output: the only complaint allowed is that hamgr is not yet
/// installed at /usr/local/bin on this machine.
final class SystemdUnitTests: XCTestCase {
    static let contrib = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("contrib/systemd").path

    private func verify(_ units: [(String, String)]) throws -> [String] {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze") else {
            throw XCTSkip("systemd-analyze is not installed")
        }
        let dir = try OpsTest.scratchDirectory("units")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var paths: [String] = []
        for (name, text) in units {
            let p = dir + "/" + name
            try text.write(toFile: p, atomically: true, encoding: .utf8)
            paths.append(p)
        }
        let r = try OpsTest.run(["/usr/bin/systemd-analyze", "verify"] + paths)
        let notInstalled = !FileManager.default.isExecutableFile(atPath: "/usr/local/bin/hamgr")
        return (r.stdout + r.stderr).split(separator: "\n").map(String.init).filter { line in
            !(notInstalled && line.hasSuffix("Command /usr/local/bin/hamgr is not executable: No such file or directory"))
        }
    }

    private func unit(_ name: String) throws -> String {
        try String(contentsOfFile: Self.contrib + "/" + name, encoding: .utf8)
    }

    func testShippedUnitsVerifyClean() throws {
        let problems = try verify([("hamgr@web1.service", try unit("hamgr@.service")),
                                   ("hamgr-arbitrator.service", try unit("hamgr-arbitrator.service"))])
        XCTAssertEqual(problems, [])
        let node = try unit("hamgr@.service")
        XCTAssertTrue(node.contains("\nType=notify\n"))
        XCTAssertTrue(node.contains("\nWatchdogSec="))
        XCTAssertTrue(node.contains("hamgr run --config /etc/hamgr/%i.toml --node ${HAMGR_NODE}"))
        XCTAssertTrue(try unit("hamgr-arbitrator.service").contains("hamgr arbitrator $HAMGR_ARBITRATOR_ARGS"))
    }

    func testATypoIsCaught() throws {
        let typo = try unit("hamgr@.service").replacingOccurrences(of: "WatchdogSec=", with: "WatchDogSec=")
        let problems = try verify([("hamgr@web1.service", typo)])
        XCTAssertTrue(problems.contains { $0.contains("Unknown key 'WatchDogSec'") }, "\(problems)")
    }
}
