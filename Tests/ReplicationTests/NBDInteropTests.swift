import Foundation
import XCTest
@testable import Replication
@testable import ReplicationShell

/// Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, fio) against an in-process
/// NBDServer + LocalVolume on a temp backing file.
final class NBDInteropTests: XCTestCase {
    var export: TestExport!

    override func setUpWithError() throws { export = try TestExport(size: 256 << 20) }
    override func tearDown() { export?.stop(); export = nil }

    func testNbdinfoShowsSizeAndCapabilities() throws {
        try requireTools("nbdinfo")
        let r = try ProcessRunner.run("nbdinfo", ["--json", export.uri], timeout: 30)
        XCTAssertEqual(r.exitCode, 0, "\(r)")
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let exports = try XCTUnwrap(json["exports"] as? [[String: Any]])
        let e = try XCTUnwrap(exports.first)
        XCTAssertEqual(e["export-size"] as? Int, 256 << 20)
        XCTAssertEqual(e["is_read_only"] as? Bool, false)
        for key in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            XCTAssertEqual(e[key] as? Bool, true, "\(key) in \(r.stdout)")
        }
        XCTAssertEqual(e["block_size_maximum"] as? Int, 32 << 20)
        // Exit codes prove each capability as the client negotiated it.
        for cap in ["flush", "fua", "trim", "zero", "multi-conn"] {
            XCTAssertEqual(try ProcessRunner.run("nbdinfo", ["--can", cap, export.uri], timeout: 30).exitCode, 0, "--can \(cap)")
        }
        XCTAssertNotEqual(try ProcessRunner.run("nbdinfo", ["--is", "readonly", export.uri], timeout: 30).exitCode, 0)
        XCTAssertNotEqual(try ProcessRunner.run("nbdinfo", ["--can", "cache", export.uri], timeout: 30).exitCode, 0, "not advertised")
    }

    func testReadOnlyExportIsReadOnlyToNbdinfo() throws {
        try requireTools("nbdinfo")
        let ro = try TestExport(size: 1 << 20, readOnly: true)
        defer { ro.stop() }
        XCTAssertEqual(try ProcessRunner.run("nbdinfo", ["--is", "readonly", ro.uri], timeout: 30).exitCode, 0)
        XCTAssertNotEqual(try ProcessRunner.run("nbdinfo", ["--can", "trim", ro.uri], timeout: 30).exitCode, 0)
    }

    func testRefusalTextReachesTheClient() throws {
        try requireTools("nbdinfo")
        export.server.setVolume(nil, refusal: "not primary; the master serves at 127.0.0.2:10809")
        // libnbd turns the reply type into an errno for its error line and prints the
        // server's message in its debug output.
        let r = try ProcessRunner.run("nbdinfo", [export.uri], timeout: 30, environment: ["LIBNBD_DEBUG": "1"])
        XCTAssertNotEqual(r.exitCode, 0)
        XCTAssertTrue(r.stderr.contains("not primary; the master serves at 127.0.0.2:10809"), "\(r)")
    }

    func testQemuIoPatternWriteReadFlushAndMismatch() throws {
        try requireTools("qemu-io")
        let uri = "nbd://127.0.0.1:\(export.port)/test"
        let ok = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "flush",
                                                   "-c", "write -P 0xcd 3M 64k", "-c", "read -P 0xab 0 1M",
                                                   "-c", "read -P 0xcd 3M 64k", "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M", uri], timeout: 60)
        XCTAssertEqual(ok.exitCode, 0, "\(ok)")
        XCTAssertFalse(ok.stdout.contains("Pattern verification failed"), ok.stdout)
        let bad = try ProcessRunner.run("qemu-io", ["-f", "raw", "-c", "read -P 0xac 0 1M", uri], timeout: 60)
        XCTAssertNotEqual(bad.exitCode, 0, "a mismatching pattern must fail: \(bad)")
        XCTAssertTrue(bad.stdout.contains("Pattern verification failed"), "\(bad)")
        // What qemu-io wrote is in the backing file.
        let fh = try XCTUnwrap(FileHandle(forReadingAtPath: export.backingPath))
        defer { try? fh.close() }
        XCTAssertEqual(Array(try fh.read(upToCount: 1 << 20) ?? Data()), [UInt8](repeating: 0xAB, count: 1 << 20))
    }

    func testNbdcopyRoundTripIsByteIdentical() throws {
        try requireTools("nbdcopy", "cmp", "dd")
        let input = export.directory + "/in.bin", output = export.directory + "/out.bin"
        XCTAssertEqual(try ProcessRunner.run("dd", ["if=/dev/urandom", "of=\(input)", "bs=1M", "count=256", "status=none"], timeout: 60).exitCode, 0)
        let copyIn = try ProcessRunner.run("nbdcopy", ["--flush", input, export.uri], timeout: 120)
        XCTAssertEqual(copyIn.exitCode, 0, "\(copyIn)")
        let copyOut = try ProcessRunner.run("nbdcopy", [export.uri, output], timeout: 120)
        XCTAssertEqual(copyOut.exitCode, 0, "\(copyOut)")
        let cmp = try ProcessRunner.run("cmp", [input, output], timeout: 60)
        XCTAssertEqual(cmp.exitCode, 0, "\(cmp)")
        XCTAssertEqual(try ProcessRunner.run("cmp", [input, export.backingPath], timeout: 60).exitCode, 0)
        XCTAssertGreaterThanOrEqual(export.server.statistics.bytesWritten, 256 << 20)
    }

    func testFioRandomWriteVerifies() throws {
        try requireTools("fio")
        let r = try ProcessRunner.run("fio", ["--name=nbdverify", "--ioengine=nbd", "--uri=\(export.uri)", "--rw=randwrite", "--bs=4k",
                                              "--iodepth=32", "--size=64M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                                              "--verify_state_save=0",
                                              "--output-format=json"], timeout: 300)
        XCTAssertEqual(r.exitCode, 0, "\(r)")
        // fio may print notes before the JSON document.
        let text = r.stdout[(r.stdout.firstIndex(of: "{") ?? r.stdout.startIndex)...]
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "\(r)")
        let job = try XCTUnwrap((json["jobs"] as? [[String: Any]])?.first)
        XCTAssertEqual(job["error"] as? Int, 0)
        let write = try XCTUnwrap(job["write"] as? [String: Any])
        let read = try XCTUnwrap(job["read"] as? [String: Any])
        XCTAssertEqual(write["io_bytes"] as? Int, 64 << 20)
        // The verify pass reads back everything written: proof that verification ran.
        XCTAssertEqual(read["io_bytes"] as? Int, 64 << 20, "verify phase did not read back: \(read)")
    }

    func testNBDClientAgainstNbdkitAndHamgr() throws {
        try requireTools("nbdkit")
        let port = 20000 + Int.random(in: 0..<20000)
        let kit = try ProcessRunner.start("nbdkit", ["-f", "-p", "\(port)", "-i", "127.0.0.1", "--exit-with-parent", "memory", "64M"],
                                          logDirectory: export.directory)
        defer { kit.stop() }
        var client: NBDClient?
        XCTAssertTrue(TestExport.eventually(timeout: 10) {
            client = try? NBDClient(host: "127.0.0.1", port: port, exportName: "", timeoutSeconds: 5)
            return client != nil
        }, "nbdkit did not come up: \(kit.stderr)")
        for structured in [true, false] {
            for (name, c) in [("nbdkit", structured ? try XCTUnwrap(client) : try NBDClient(host: "127.0.0.1", port: port, structuredReplies: false)),
                              ("hamgr", try NBDClient(host: "127.0.0.1", port: export.port, exportName: "test", structuredReplies: structured))] {
                XCTAssertEqual(c.structuredReplies, structured, name)
                XCTAssertTrue(c.transmissionFlags.contains(.sendFlush), name)
                let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
                try c.write(offset: 1 << 20, bytes: pattern, fua: true)
                try c.flush()
                XCTAssertEqual(try c.read(offset: 1 << 20, length: pattern.count), pattern, name)
                XCTAssertThrowsError(try c.read(offset: c.sizeBytes, length: 4096), name) { error in
                    guard case NBDClientError.server(let e, _) = error else { return XCTFail("\(name): \(error)") }
                    XCTAssertEqual(e, .invalid, name)
                }
                // The connection survives the error.
                XCTAssertEqual(try c.read(offset: 1 << 20, length: 16), Array(pattern.prefix(16)), name)
                c.disconnect()
            }
        }
        XCTAssertThrowsError(try NBDClient(host: "127.0.0.1", port: export.port, exportName: "other")) {
            guard case NBDClientError.refused(let text) = $0 else { return XCTFail("\($0)") }
            XCTAssertTrue(text.contains("no export named"), text)
        }
    }
}
