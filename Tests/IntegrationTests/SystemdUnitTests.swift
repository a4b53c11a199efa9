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
                                   ("hamgr-arbitrator@main.service", try unit("hamgr-arbitrator@.service"))])
        XCTAssertEqual(problems, [])
        let node = try unit("hamgr@.service")
        XCTAssertTrue(node.contains("\nType=notify\n"))
        XCTAssertTrue(node.contains("\nWatchdogSec="))
        XCTAssertTrue(node.contains("hamgr run --config /etc/hamgr/%i.toml --node ${HAMGR_NODE}"))
        XCTAssertTrue(try unit("hamgr-arbitrator@.service").contains("hamgr arbitrator $HAMGR_ARBITRATOR_ARGS"))
        XCTAssertTrue(node.contains("\nExecReload=/bin/kill -HUP $MAINPID\n"))
        XCTAssertFalse(node.contains("LimitMEMLOCK"), "nothing locks memory")
    }

    /// The arbitrator needs no privilege: it runs as user hamgr in a tight sandbox, scored
    /// by `systemd-analyze security` (docs/operator-guide.md records the scores).
    func testArbitratorRunsUnprivilegedInATightSandbox() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze") else {
            throw XCTSkip("systemd-analyze is not installed")
        }
        let text = try unit("hamgr-arbitrator@.service")
        XCTAssertTrue(text.contains("\nUser=hamgr\n") && text.contains("\nCapabilityBoundingSet=\n"), text)
        let dir = try OpsTest.scratchDirectory("security")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func exposure(_ name: String, _ body: String) throws -> Double {
            let p = dir + "/" + name
            try body.write(toFile: p, atomically: true, encoding: .utf8)
            let r = try OpsTest.run(["/usr/bin/systemd-analyze", "security", "--offline=true", p])
            let line = (r.stdout + r.stderr).split(separator: "\n").first { $0.contains("Overall exposure level") } ?? ""
            guard let colon = line.lastIndex(of: ":"),
                  let score = Double(line[line.index(after: colon)...].split(separator: " ").first ?? "") else {
                XCTFail("no exposure level in: \(r.stdout) \(r.stderr)"); return 99
            }
            return score
        }
        let arbitrator = try exposure("hamgr-arbitrator@main.service", text)
        XCTAssertLessThanOrEqual(arbitrator, 2.0, "the arbitrator's exposure level")
        // The same unit as root, unsandboxed, scores far worse: the check can fail.
        let loose = text.split(separator: "\n").filter { !$0.hasPrefix("User=") && !$0.hasPrefix("Protect") && !$0.hasPrefix("Private")
            && !$0.hasPrefix("CapabilityBoundingSet") && !$0.hasPrefix("SystemCallFilter") && !$0.hasPrefix("Restrict") }.joined(separator: "\n")
        XCTAssertGreaterThan(try exposure("loose@main.service", loose), 5.0)
    }

    /// The commented `LoadCredential=` example, switched on, still verifies and keeps the
    /// arbitrator's exposure level (credentials are how its keys reach the unprivileged user).
    func testArbitratorCredentialExampleVerifies() throws {
        let text = try unit("hamgr-arbitrator@.service")
        XCTAssertTrue(text.contains("\n#LoadCredential=web1.key:/etc/hamgr/web1.key\n"), text)
        XCTAssertTrue(text.contains("key_file = \"${CREDENTIALS_DIRECTORY}/web1.key\""), text)
        let on = text.replacingOccurrences(of: "\n#LoadCredential=", with: "\nLoadCredential=")
        XCTAssertEqual(try verify([("hamgr-arbitrator@main.service", on)]), [])
        let dir = try OpsTest.scratchDirectory("credential")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = dir + "/hamgr-arbitrator@main.service"
        try on.write(toFile: p, atomically: true, encoding: .utf8)
        let r = try OpsTest.run(["/usr/bin/systemd-analyze", "security", "--offline=true", p])
        let line = (r.stdout + r.stderr).split(separator: "\n").first { $0.contains("Overall exposure level") } ?? ""
        let score = line.lastIndex(of: ":").flatMap { Double(line[line.index(after: $0)...].split(separator: " ").first ?? "") }
        XCTAssertLessThanOrEqual(try XCTUnwrap(score, "no exposure level in: \(r.stdout) \(r.stderr)"), 2.0)
    }

    func testATypoIsCaught() throws {
        let typo = try unit("hamgr@.service").replacingOccurrences(of: "WatchdogSec=", with: "WatchDogSec=")
        let problems = try verify([("hamgr@web1.service", typo)])
        XCTAssertTrue(problems.contains { $0.contains("Unknown key 'WatchDogSec'") }, "\(problems)")
    }
}
