import Foundation
import XCTest

/// Issue 8: no disk is ever called up to date without its source's bytes. Each test runs
/// real `hamgr` processes on real files, writes and reads through real NBD clients
/// (qemu-io, nbdcopy), and compares the stores with `cmp`. While a copy runs, every poll
/// checks that a node reporting `upToDate` (or a link reported `inSync`) already holds the
/// master's bytes.
final class DiskIdentityProcessTests: XCTestCase {
    static let volumeBytes = 64 << 20

    /// `cmp` of the volume range of both stores (the identity labels after it differ by design).
    func sameBytes(_ h: ClusterHarness) throws -> Bool {
        try shell(["cmp", "-n", "\(Self.volumeBytes)", h.backing("a"), h.backing("b")], timeout: 60).status == 0
    }

    /// Polls until `done` holds (bounded); at every poll, a node claiming up-to-date data (or
    /// a master claiming its peer in sync) must hold the same bytes as the other store.
    func watchCopy(_ h: ClusterHarness, target: String, within seconds: Double, file: StaticString = #filePath, line: UInt = #line,
                   until done: () -> Bool) throws {
        let end = Date().addingTimeInterval(seconds)
        var claimsChecked = 0
        while Date() < end {
            if done() { break }
            let s = h.status(target)
            let claims = (s?["disk_state"] as? String) == "upToDate" || ((s?["peer"] as? [String: Any])?["replication"] as? String) == "inSync"
            if claims {
                claimsChecked += 1
                XCTAssertTrue(try sameBytes(h), "\(target) claims up-to-date data while its store differs: \(String(describing: s))", file: file, line: line)
            }
            usleep(100_000)
        }
        XCTAssertTrue(done(), "copy to \(target) did not complete within \(seconds) s\n\(h.tail(target))", file: file, line: line)
    }

    func diskState(_ h: ClusterHarness, _ n: String) -> String? { h.status(n)?["disk_state"] as? String }
    func peerReplication(_ h: ClusterHarness, _ n: String) -> String? { (h.status(n)?["peer"] as? [String: Any])?["replication"] as? String }

    func hactl(_ h: ClusterHarness, _ args: [String], node: String = "a") throws -> CommandResult {
        try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(node).statusAddress)", "--token-file", h.tokenPath] + args, timeout: 60)
    }

    /// Copies the first `bytes` of the export at `uri` into a file with nbdcopy.
    func readExport(_ uri: String, to path: String) throws {
        let r = try shell(["nbdcopy", uri, path], timeout: 120)
        XCTAssertEqual(r.status, 0, "nbdcopy: \(r.stdout) \(r.stderr)")
    }

    /// Kills the master, waits for the backup's promotion, and checks every acknowledged
    /// pattern write through the new master's export.
    func failoverServesEverything(_ h: ClusterHarness, master: String, backup: String, expected: [Int: Int],
                                  file: StaticString = #filePath, line: UInt = #line) throws {
        h.kill9(master)
        guard h.waitForRole(backup, "primary", within: 20, file: file, line: line) != nil else { return }
        let bad = try verifyPatterns(uri: h.node(backup).nbdURI, expected: expected, file: file, line: line)
        XCTAssertEqual(bad, [], "acknowledged writes missing after the failover", file: file, line: line)
    }

    // MARK: 1. a new pair where one disk already holds data

    func testNewPairWithDataOnOneSideWaitsForBootstrapThenFullSyncs() throws {
        let h = try ClusterHarness(name: "boot", subnet: 71)
        defer { h.shutdown() }
        // a's store holds 8 MiB of data at 32 MiB before the first start; b's does not exist.
        var data = [UInt8](repeating: 0, count: 8 << 20)
        var rng = SystemRandomNumberGenerator()
        for i in stride(from: 0, to: data.count, by: 8) { withUnsafeBytes(of: rng.next() as UInt64) { data.replaceSubrange(i..<i + 8, with: $0) } }
        FileManager.default.createFile(atPath: h.backing("a"), contents: nil)
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: h.backing("a")))
        fh.seek(toFileOffset: 32 << 20); fh.write(Data(data)); try fh.truncate(atOffset: UInt64(Self.volumeBytes)); try fh.close()
        let original = h.dir.appendingPathComponent("original.bin").path
        FileManager.default.createFile(atPath: original, contents: Data(data))

        try h.startAll()
        // Nobody is master, nobody is up to date, the link is not in sync — for several leases.
        let end = Date().addingTimeInterval(5)
        var sawBoth = false
        while Date() < end {
            for n in ["a", "b"] {
                guard let s = h.status(n) else { continue }
                XCTAssertNotEqual(s["role"] as? String, "primary", "\(n) became master of a pair nobody bootstrapped")
                XCTAssertNotEqual(s["disk_state"] as? String, "upToDate", "\(n) called up to date: \(s)")
                XCTAssertNotEqual(peerReplication(h, n), "inSync")
            }
            sawBoth = sawBoth || (diskState(h, "a") == "inconsistent" && diskState(h, "b") == "inconsistent")
            usleep(200_000)
        }
        XCTAssertTrue(sawBoth, "both nodes should report inconsistent")
        let note = (h.status("a")?["disk_note"] as? String) ?? ""
        XCTAssertTrue(note.contains("bootstrap"), "status should say how to proceed: \(note)")
        let why = (h.status("a")?["why_not_promoted"] as? String) ?? ""
        XCTAssertTrue(why.contains("inconsistent"), why)
        let st = try hactl(h, ["status"])
        XCTAssertTrue(st.stdout.contains("bootstrap"), "hactl status names the way out:\n\(st.stdout)")

        // Without --yes and without a terminal, bootstrap refuses and changes nothing.
        XCTAssertNotEqual(try hactl(h, ["bootstrap", "--source", "a"]).status, 0)
        XCTAssertEqual(diskState(h, "a"), "inconsistent")

        let r = try hactl(h, ["bootstrap", "--source", "a", "--yes"])
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        h.waitForRole("a", "primary", within: 20)
        // Writes acknowledged while b is still copying.
        var load = PatternWorkload(uri: h.node("a").nbdURI, count: 60, slots: 60, logPath: h.dir.appendingPathComponent("w.log").path)
        try load.start(); load.wait(seconds: 60)
        XCTAssertEqual(load.acknowledgedOffsets().count, 60)
        try watchCopy(h, target: "b", within: 90) { diskState(h, "b") == "upToDate" && peerReplication(h, "a") == "inSync" }
        XCTAssertTrue(try sameBytes(h), "stores differ after the bootstrap sync")
        XCTAssertTrue(h.tail("b", lines: 400).contains("sync target"), "b was not a sync target")

        try failoverServesEverything(h, master: "a", backup: "b", expected: load.expectedSlots())
        let copy = h.dir.appendingPathComponent("copy.img").path
        try readExport(h.node("b").nbdURI, to: copy)
        XCTAssertEqual(try shell(["cmp", "-i", "\(32 << 20):0", "-n", "\(8 << 20)", copy, original]).status, 0, "a's original data lost")
    }

    func testAssumeCleanBootstrapAdoptsWithoutACopyAndBootstrapIsRefusedOnceUpToDate() throws {
        let h = try ClusterHarness(name: "clean", subnet: 77)
        defer { h.shutdown() }
        // Two stores the operator knows to be identical but that are not provably empty
        // (as two zeroed block devices would be): the same 4 MiB on both.
        let data = Data((0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
        for n in ["a", "b"] {
            FileManager.default.createFile(atPath: h.backing(n), contents: nil)
            let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: h.backing(n)))
            fh.write(data); try fh.truncate(atOffset: UInt64(Self.volumeBytes)); try fh.close()
        }
        try h.startAll()
        XCTAssertTrue(waitUntil(10) { self.diskState(h, "a") == "inconsistent" && self.diskState(h, "b") == "inconsistent" })
        usleep(2_000_000)
        XCTAssertNotEqual(h.role("a"), "primary"); XCTAssertNotEqual(h.role("b"), "primary")
        let r = try hactl(h, ["bootstrap", "--source", "a", "--assume-clean", "--yes"])
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        h.waitFor("b", "adopted a's generation", within: 20) { ($0["disk_state"] as? String) == "upToDate" }
        XCTAssertTrue(waitUntil(20) { h.role("a") == "primary" || h.role("b") == "primary" }, "no master after the bootstrap")
        XCTAssertEqual(h.status("a")?["generation"] as? String, h.status("b")?["generation"] as? String)
        XCTAssertTrue(h.tail("b", lines: 300).contains("no data to move"), h.tail("b"))
        XCTAssertFalse(h.tail("a", lines: 300).contains("resync source"), "assume-clean must not copy:\n\(h.tail("a"))")
        XCTAssertTrue(try sameBytes(h))
        // Bootstrap is for nodes nobody vouches for: refused once a node is up to date.
        let again = try hactl(h, ["bootstrap", "--source", "b", "--yes"])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.stderr.contains("bootstrap refused"), again.stderr)
    }

    // MARK: 2 + 3. a replaced secondary disk, with new or with kept metadata

    func testReplacedSecondaryDiskWithNewMetadataIsFullySyncedBeforeUpToDate() throws {
        try replacedDisk(keepMetadata: false, subnet: 72)
    }

    func testDiskSwappedUnderKeptMetadataIsFullySyncedBeforeUpToDate() throws {
        try replacedDisk(keepMetadata: true, subnet: 73)
    }

    func replacedDisk(keepMetadata: Bool, subnet: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        // A slow resync (16 MiB/s: about 4 s for the volume) so the copy can be watched.
        let h = try ClusterHarness(name: keepMetadata ? "swap" : "replace", subnet: subnet, extraVolume: "resync_rate = \"16MiB\"")
        defer { h.shutdown() }
        // Two new sparse files: the pair comes up by itself (no bootstrap needed).
        let (master, backup) = try h.startedCluster()
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 300, slots: 300, logPath: h.dir.appendingPathComponent("w1.log").path)
        try load.start(); load.wait(seconds: 90)
        XCTAssertEqual(load.acknowledgedOffsets().count, 300, file: file, line: line)
        h.kill9(backup)
        try FileManager.default.removeItem(atPath: h.backing(backup))
        if !keepMetadata { try FileManager.default.removeItem(atPath: h.dir.appendingPathComponent("\(backup).meta").path) }
        try h.startNode(backup)
        XCTAssertTrue(waitUntil(15) { self.diskState(h, backup) == "inconsistent" }, "the new disk must be inconsistent\n\(h.tail(backup))",
                      file: file, line: line)
        var progress: [String: Any]?
        try watchCopy(h, target: backup, within: 90) {
            if progress == nil, let s = h.status(backup), (s["disk_state"] as? String) == "inconsistent", let r = s["resync"] as? [String: Any] {
                progress = r
                XCTAssertTrue(((s["disk_note"] as? String) ?? "").contains("sync target"), "\(s)", file: file, line: line)
                XCTAssertTrue(((s["why_not_promoted"] as? String) ?? "").isEmpty || s["why_not_promoted"] is NSNull
                              || ((s["why_not_promoted"] as? String) ?? "").contains("inconsistent"), "\(s)", file: file, line: line)
            }
            return diskState(h, backup) == "upToDate" && peerReplication(h, master) == "inSync"
        }
        // The copy was visible while it ran, and it was a full one: every byte of the volume.
        XCTAssertEqual(progress?["total_bytes"] as? Int, Self.volumeBytes, "\(String(describing: progress))", file: file, line: line)
        XCTAssertTrue(try sameBytes(h), file: file, line: line)
        let log = h.tail(backup, lines: 400)
        XCTAssertTrue(log.contains(keepMetadata ? "event=disk_replaced" : "event=metadata_created"), log, file: file, line: line)
        try failoverServesEverything(h, master: master, backup: backup, expected: load.expectedSlots(), file: file, line: line)
    }

    // MARK: the wrong disk, a missing device

    func testAnotherNodesStoreIsRefusedWithTheMessageNamingThePath() throws {
        let h = try ClusterHarness(name: "wrong", subnet: 74)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        h.kill9(backup)
        // The operator puts a copy of the master's disk (its label included) where the backup's belongs.
        try FileManager.default.removeItem(atPath: h.backing(backup))
        try FileManager.default.copyItem(atPath: h.backing(master), toPath: h.backing(backup))
        let before = try sha256(ofFile: h.backing(backup))
        let r = try shell([ClusterHarness.hamgr, "run", "--config", h.configPath, "--node", backup], timeout: 20)
        XCTAssertEqual(r.status, 1, "\(r.stdout)\n\(r.stderr)")
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains(h.backing(backup)) && r.stderr.contains("belongs to node \(master)"), r.stderr)
        XCTAssertEqual(try sha256(ofFile: h.backing(backup)), before, "the refused store was modified")
    }

    func testMissingBlockDevicePathIsAStartErrorAndNothingIsCreated() throws {
        let h = try ClusterHarness(name: "nodev", subnet: 75)
        defer { h.shutdown() }
        let dev = "/dev/hamgr-test-missing-\(getpid())"
        var toml = try String(contentsOfFile: h.configPath, encoding: .utf8)
        toml = toml.replacingOccurrences(of: "backing = \"\(h.backing("b"))\"", with: "backing = \"\(dev)\"")
        toml = toml.replacingOccurrences(of: "create = true\n", with: "")
        try toml.write(toFile: h.configPath, atomically: true, encoding: .utf8)
        let r = try shell([ClusterHarness.hamgr, "run", "--config", h.configPath, "--node", "b"], timeout: 20)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("node[1].backing") && r.stderr.contains(dev), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dev), "a device path was created")
        let c = try shell([ClusterHarness.hamgr, "check", "--config", h.configPath, "--node", "b"], timeout: 20)
        XCTAssertEqual(c.status, 1)
        XCTAssertTrue(c.stderr.contains("node[1].backing") && c.stderr.contains(dev), c.stderr)
        // A regular file without create = true: the same, and no file appears.
        let r2 = try shell([ClusterHarness.hamgr, "run", "--config", h.configPath, "--node", "a"], timeout: 20)
        XCTAssertEqual(r2.status, 1)
        XCTAssertTrue(r2.stderr.contains("node[0].backing") && r2.stderr.contains("create = true"), r2.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: h.backing("a")))
    }

    // MARK: invalidate and verify --repair

    func testInvalidateMakesTheBackupAFullSyncTargetAndVerifyRepairFixesExactlyTheBadChunks() throws {
        let h = try ClusterHarness(name: "inval", subnet: 76)
        defer { h.shutdown() }
        let (master, backup) = try h.startedCluster()
        var load = PatternWorkload(uri: h.node(master).nbdURI, count: 200, slots: 200, logPath: h.dir.appendingPathComponent("w.log").path)
        try load.start(); load.wait(seconds: 60)
        XCTAssertEqual(load.acknowledgedOffsets().count, 200)

        // verify --repair: two chunks of the backup silently damaged under a running node.
        let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: h.backing(backup)))
        for chunk in [5, 150] { fh.seek(toFileOffset: UInt64(chunk * 65536)); fh.write(Data(repeating: 0xEE, count: 4096)) }
        try fh.synchronize(); try fh.close()
        XCTAssertFalse(try sameBytes(h))
        let v = try shell([ClusterHarness.hactl, "--endpoint", "http://\(h.node(master).statusAddress)", "--token-file", h.tokenPath,
                           "verify", "--repair"], timeout: 120)
        XCTAssertEqual(v.status, 0, "\(v.stdout) \(v.stderr)")
        XCTAssertTrue(waitUntil(30) { (try? self.sameBytes(h)) == true }, "verify --repair left differences\n\(h.tail(master))")
        XCTAssertTrue(h.tail(master, lines: 300).contains("2 of 1024 chunks differ"), h.tail(master))

        // invalidate on the master is refused; on the backup it discards and recopies everything.
        XCTAssertNotEqual(try hactl(h, ["invalidate", "--yes"], node: master).status, 0)
        let r = try hactl(h, ["invalidate", "--yes"], node: backup)
        XCTAssertEqual(r.status, 0, "\(r.stdout) \(r.stderr)")
        try watchCopy(h, target: backup, within: 90) {
            h.tail(backup, lines: 200).contains("resync target finished") && diskState(h, backup) == "upToDate" && peerReplication(h, master) == "inSync"
        }
        XCTAssertTrue(h.tail(master, lines: 300).contains("resync source: 1024 chunks"), "not a full sync:\n\(h.tail(master))")
        XCTAssertTrue(try sameBytes(h))
        try failoverServesEverything(h, master: master, backup: backup, expected: load.expectedSlots())
    }
}
