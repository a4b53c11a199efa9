import Foundation
import NIOCore
import XCTest
@testable import Replication
@testable import ReplicationShell

/// Raw-socket tests written byte for byte from the spec: bad input gets an error reply or a
/// close, never a crash, and the server goes on serving other clients.
final class NBDServerRobustnessTests: XCTestCase {
    var export: TestExport!

    override func setUpWithError() throws { export = try TestExport(size: 1 << 20) }
    override func tearDown() { export.stop(); export = nil }

    /// After each abuse, a fresh well-behaved client must still be able to write and read.
    private func assertStillServes(file: StaticString = #filePath, line: UInt = #line) {
        do {
            let client = try NBDClient(host: "127.0.0.1", port: export.port, exportName: "test", timeoutSeconds: 5)
            try client.write(offset: 4096, bytes: [UInt8](repeating: 0x5A, count: 512))
            XCTAssertEqual(try client.read(offset: 4096, length: 512), [UInt8](repeating: 0x5A, count: 512), file: file, line: line)
            client.disconnect()
        } catch {
            XCTFail("server no longer serves: \(error)", file: file, line: line)
        }
    }

    func testBadOptionMagicCloses() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet())
        s.send(Array("IHAVEOPX".utf8) + [0, 0, 0, 7, 0, 0, 0, 0])
        XCTAssertTrue(s.isClosedByPeer())
        assertStillServes()
    }

    func testUnknownClientFlagsClose() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet(clientFlags: 0x8000_0001))
        XCTAssertTrue(s.isClosedByPeer())
        assertStillServes()
    }

    func testUnknownOptionGetsUnsupThenGoWorks() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet())
        s.sendOption(0xDEAD, [1, 2, 3])
        let r = try XCTUnwrap(s.receiveOptionReply())
        XCTAssertEqual(r.option, 0xDEAD)
        XCTAssertEqual(r.type, NBDOptionReply.errUnsupported)
        s.sendOption(NBDOption.list, [9])   // LIST with data: invalid, connection stays
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.errInvalid)
        s.sendOption(NBDOption.go, [0, 0, 0, 50, 0])  // name longer than the data
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.errInvalid)
        s.sendOption(NBDOption.go, RawNBDSocket.goData(name: "nope"))
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.errUnknown)
        s.sendOption(NBDOption.list)
        let server = try XCTUnwrap(s.receiveOptionReply())
        XCTAssertEqual(server.type, NBDOptionReply.server)
        XCTAssertEqual(Array(server.data[4..<8]), Array("test".utf8))
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.ack)
        s.sendOption(NBDOption.go, RawNBDSocket.goData(name: "test", infos: [NBDInfo.blockSize, NBDInfo.name]))
        var infos: [UInt16] = []
        while let reply = s.receiveOptionReply(), reply.type == NBDOptionReply.info {
            infos.append(UInt16(reply.data[0]) << 8 | UInt16(reply.data[1]))
            if infos.last == NBDInfo.blockSize {
                XCTAssertEqual(Array(reply.data[2...]), [0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
            }
        }
        XCTAssertEqual(Set(infos), [NBDInfo.export, NBDInfo.name, NBDInfo.blockSize])
        s.sendRequest(NBDCommand.read, cookie: 1, offset: 0, length: 8)
        XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
        XCTAssertEqual(s.receive(8), [UInt8](repeating: 0, count: 8))
    }

    func testStalledHandshakeIsClosedButTransmissionIsNot() throws {
        let quick = try TestExport(size: 1 << 20, open: true)
        defer { quick.stop() }
        quick.server.handshakeTimeout = .milliseconds(300)
        let stalled = try RawNBDSocket(port: quick.port)
        XCTAssertNotNil(stalled.greet())          // then silence
        let serving = try RawNBDSocket(port: quick.port)
        XCTAssertNotNil(serving.go(name: "test"))
        XCTAssertTrue(stalled.isClosedByPeer(), "a stalled handshake must be closed")
        usleep(400_000)
        serving.sendRequest(NBDCommand.flush, cookie: 1, offset: 0, length: 0)
        XCTAssertEqual(serving.receiveSimpleReply()?.error, 0, "an idle connection in transmission stays")
    }

    func testAbortIsAcknowledged() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet())
        s.sendOption(NBDOption.abort)
        XCTAssertEqual(s.receiveOptionReply()?.type, NBDOptionReply.ack)
        XCTAssertTrue(s.isClosedByPeer())
    }

    func testExportNameGivesSizeAndFlags() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet(clientFlags: NBDHandshakeFlags.clientFixedNewstyle))  // no NO_ZEROES: 124 zeroes follow
        s.sendOption(NBDOption.exportName, Array("test".utf8))
        var reply = try XCTUnwrap(s.receiveBuffer(8 + 2 + 124))
        XCTAssertEqual(reply.readInteger(as: UInt64.self), 1 << 20)
        XCTAssertEqual(NBDTransmissionFlags(rawValue: reply.readInteger()!), [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn])
        XCTAssertEqual(reply.readBytes(length: 124), [UInt8](repeating: 0, count: 124))
        s.sendRequest(NBDCommand.flush, cookie: 3, offset: 0, length: 0)
        XCTAssertEqual(s.receiveSimpleReply()?.cookie, 3)
    }

    func testBadRequestsGetErrorsAndTheConnectionStays() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test"))
        let size: UInt64 = 1 << 20
        s.sendRequest(0x77, cookie: 1, offset: 0, length: 0)                                      // unknown command
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.read, cookie: 2, offset: size - 512, length: 1024)             // read past the end
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.read, cookie: 3, offset: UInt64.max - 10, length: 512)         // offset overflow
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.write, cookie: 4, offset: size, length: 4, payload: [1, 2, 3, 4]) // write past the end
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.noSpace.rawValue)
        s.sendRequest(NBDCommand.read, cookie: 5, offset: 0, length: 64 << 20)                  // over the maximum payload
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.trim, cookie: 6, offset: size, length: 4096)                   // trim past the end
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.writeZeroes, flags: .fastZero, cookie: 7, offset: 0, length: 4096)  // flag not advertised
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.read, flags: .dontFragment, cookie: 8, offset: 0, length: 4)   // DF not advertised
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        // A write over the maximum payload: its 33 MiB of data are skipped, EINVAL, and the stream stays in step.
        let over = Int(VolumeCapabilities().maximumBlockSize) + 1024 * 1024
        s.sendRequest(NBDCommand.write, cookie: 9, offset: 0, length: UInt32(over), payload: [UInt8](repeating: 0xEE, count: over))
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.invalid.rawValue)
        s.sendRequest(NBDCommand.write, flags: .fua, cookie: 10, offset: 0, length: 4, payload: [9, 8, 7, 6])
        let ok = try XCTUnwrap(s.receiveSimpleReply())
        XCTAssertEqual(ok.error, 0)
        XCTAssertEqual(ok.cookie, 10)
        s.sendRequest(NBDCommand.read, cookie: 11, offset: 0, length: 4)
        XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
        XCTAssertEqual(s.receive(4), [9, 8, 7, 6])
        let stats = export.server.statistics
        XCTAssertEqual(stats.count("unknown", "EINVAL"), 1)
        XCTAssertEqual(stats.count("write", "ENOSPC"), 1)
        XCTAssertEqual(stats.count("write", "EINVAL"), 1)
        XCTAssertEqual(stats.count("read", "EINVAL"), 4)
        XCTAssertEqual(stats.count("write"), 1)
        XCTAssertEqual(stats.writeLatency.count, 1)
    }

    func testStructuredRepliesCarryErrorMessages() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test", structured: true))
        s.sendRequest(NBDCommand.read, cookie: 1, offset: 1 << 20, length: 512)
        var h = try XCTUnwrap(s.receiveBuffer(20))
        XCTAssertEqual(h.readInteger(as: UInt32.self), NBDMagic.structuredReply)
        XCTAssertEqual(h.readInteger(as: UInt16.self), NBDReplyType.flagDone)
        XCTAssertEqual(h.readInteger(as: UInt16.self), NBDReplyType.error)
        XCTAssertEqual(h.readInteger(as: UInt64.self), 1)
        let length: UInt32 = h.readInteger()!
        var p = try XCTUnwrap(s.receiveBuffer(Int(length)))
        XCTAssertEqual(p.readInteger(as: UInt32.self), NBDError.invalid.rawValue)
        let n: UInt16 = p.readInteger()!
        XCTAssertTrue(p.readString(length: Int(n))!.contains("beyond the end"))
        // A successful read is one OFFSET_DATA chunk marked DONE.
        s.sendRequest(NBDCommand.read, cookie: 2, offset: 512, length: 16)
        var d = try XCTUnwrap(s.receiveBuffer(20 + 8 + 16))
        XCTAssertEqual(d.readInteger(as: UInt32.self), NBDMagic.structuredReply)
        XCTAssertEqual(d.readInteger(as: UInt16.self), NBDReplyType.flagDone)
        XCTAssertEqual(d.readInteger(as: UInt16.self), NBDReplyType.offsetData)
        XCTAssertEqual(d.readInteger(as: UInt64.self), 2)
        XCTAssertEqual(d.readInteger(as: UInt32.self), 24)
        XCTAssertEqual(d.readInteger(as: UInt64.self), 512)
    }

    func testBadRequestMagicCloses() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test"))
        s.send([0xDE, 0xAD, 0xBE, 0xEF] + [UInt8](repeating: 0, count: 24))
        XCTAssertTrue(s.isClosedByPeer())
        assertStillServes()
    }

    func testTruncatedRequestThenEOFCloses() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test"))
        s.send([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0, 0])  // 10 of 28 header bytes
        s.shutdownWrite()
        XCTAssertTrue(s.isClosedByPeer())
        XCTAssertTrue(TestExport.eventually { self.export.server.statistics.connectionsOpen == 0 })
        assertStillServes()
    }

    func testClientVanishingMidWriteLeaksNothing() throws {
        for i in 0..<20 {
            let s = try RawNBDSocket(port: export.port)
            XCTAssertNotNil(s.go(name: "test"))
            // Some complete writes in flight, then half of a 1 MiB write, then a reset.
            for c in 0..<8 { s.sendRequest(NBDCommand.write, cookie: UInt64(c), offset: UInt64(c) * 4096, length: 4096, payload: [UInt8](repeating: UInt8(i), count: 4096)) }
            s.sendRequest(NBDCommand.write, cookie: 99, offset: 0, length: 1 << 20, payload: [UInt8](repeating: 1, count: 512 * 1024))
            s.abort()
        }
        XCTAssertTrue(TestExport.eventually { self.export.server.statistics.connectionsOpen == 0 }, "connections leaked: \(export.server.statistics.connectionsOpen)")
        assertStillServes()
    }

    /// A write whose payload arrives over many reads is gathered in pieces: handed over as
    /// pieces to LocalVolume, joined for a volume that takes one buffer. Both land intact.
    func testWriteArrivingInPiecesLandsIntact() throws {
        let single = try TestExport(size: 4 << 20, serve: { SingleBufferVolume($0) })
        defer { single.stop() }
        for port in [export.port, single.port] {
            let s = try RawNBDSocket(port: port)
            XCTAssertNotNil(s.go(name: "test"))
            let data = (0..<(768 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ $0 >> 11) }  // fits both exports
            var header = ByteBuffer()
            NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: 5, offset: 4096, length: UInt32(data.count)).write(into: &header)
            s.send(Array(header.readableBytesView) + Array(data[0..<1000]))
            for start in stride(from: 1000, to: data.count, by: 200_000) {
                usleep(20_000)  // separate TCP reads on the server
                s.send(Array(data[start..<min(start + 200_000, data.count)]))
            }
            XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
            s.sendRequest(NBDCommand.read, cookie: 6, offset: 4096, length: UInt32(data.count))
            XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
            XCTAssertTrue(s.receive(data.count) == data, "data read back differs (port \(port))")
        }
    }

    func testPipelinedRequestsAllAnswered() throws {
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.go(name: "test"))
        let n = 200
        var wire = ByteBuffer()
        for c in 0..<n {
            NBDRequestHeader(flags: c % 7 == 0 ? .fua : [], type: NBDCommand.write, cookie: UInt64(c), offset: UInt64(c) * 4096, length: 4096).write(into: &wire)
            wire.writeRepeatingByte(UInt8(c & 0xFF), count: 4096)
        }
        s.send(wire)  // all requests before reading any reply
        var cookies = Set<UInt64>()
        for _ in 0..<n {
            let r = try XCTUnwrap(s.receiveSimpleReply())
            XCTAssertEqual(r.error, 0)
            cookies.insert(r.cookie)
        }
        XCTAssertEqual(cookies, Set((0..<UInt64(n))))
        for c in [0, 57, 199] {
            s.sendRequest(NBDCommand.read, cookie: 1000, offset: UInt64(c) * 4096, length: 4096)
            XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
            XCTAssertEqual(s.receive(4096), [UInt8](repeating: UInt8(c & 0xFF), count: 4096))
        }
        s.sendRequest(NBDCommand.disconnect, cookie: 0, offset: 0, length: 0)
        XCTAssertTrue(s.isClosedByPeer())
    }

    func testRefusedExportAndDemotionClosesConnections() throws {
        let served = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(served.go(name: "test"))
        export.server.setVolume(nil, refusal: "not primary; the master serves at 127.0.0.2:10809")
        XCTAssertTrue(served.isClosedByPeer(), "demotion must close open connections")
        let s = try RawNBDSocket(port: export.port)
        XCTAssertNotNil(s.greet())
        s.sendOption(NBDOption.go, RawNBDSocket.goData(name: "test"))
        let r = try XCTUnwrap(s.receiveOptionReply())
        XCTAssertEqual(r.type, NBDOptionReply.errUnknown)
        XCTAssertEqual(String(decoding: r.data, as: UTF8.self), "not primary; the master serves at 127.0.0.2:10809")
        s.sendOption(NBDOption.exportName, Array("test".utf8))
        XCTAssertTrue(s.isClosedByPeer())
        export.server.setVolume(export.volume, refusal: "")
        assertStillServes()
    }

    func testReadOnlyExportRefusesWrites() throws {
        let ro = try TestExport(size: 1 << 20, readOnly: true)
        defer { ro.stop() }
        let s = try RawNBDSocket(port: ro.port)
        let (_, flags) = try XCTUnwrap(s.go(name: "test"))
        XCTAssertTrue(flags.contains(.readOnly))
        XCTAssertFalse(flags.contains(.sendTrim))
        s.sendRequest(NBDCommand.write, cookie: 1, offset: 0, length: 4, payload: [1, 2, 3, 4])
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.perm.rawValue)
        s.sendRequest(NBDCommand.writeZeroes, cookie: 2, offset: 0, length: 4096)
        XCTAssertEqual(s.receiveSimpleReply()?.error, NBDError.perm.rawValue)
        s.sendRequest(NBDCommand.read, cookie: 3, offset: 0, length: 4)
        XCTAssertEqual(s.receiveSimpleReply()?.error, 0)
    }
}
