import NIOCore
import XCTest
@testable import Replication

/// The codec byte for byte, from the layouts in NetworkBlockDevice/nbd doc/proto.md.
final class NBDProtocolTests: XCTestCase {
    func testGreetingBytes() {
        var out = ByteBuffer()
        NBDHandshakeEncoder.writeGreeting(flags: NBDHandshakeFlags.fixedNewstyle | NBDHandshakeFlags.noZeroes, into: &out)
        XCTAssertEqual(Array(out.readableBytesView), Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0x00, 0x03])
    }

    func testClientFlagsRejectUnknownBits() throws {
        var ok = ByteBuffer(bytes: [0, 0, 0, 3])
        XCTAssertEqual(try NBDHandshakeDecoder.nextClientFlags(&ok), 3)
        var bad = ByteBuffer(bytes: [0, 0, 0, 4])
        XCTAssertThrowsError(try NBDHandshakeDecoder.nextClientFlags(&bad)) { XCTAssertEqual($0 as? NBDProtocolError, .unknownClientFlags(4)) }
        var short = ByteBuffer(bytes: [0, 0, 0])
        XCTAssertNil(try NBDHandshakeDecoder.nextClientFlags(&short))
    }

    func testOptionDecodedOneByteAtATime() throws {
        let wire: [UInt8] = Array("IHAVEOPT".utf8) + [0, 0, 0, 7] + [0, 0, 0, 12] + [0, 0, 0, 4] + Array("disk".utf8) + [0, 1, 0, 3]
        var buffer = ByteBuffer()
        var got: NBDOptionRequest?
        for (i, byte) in wire.enumerated() {
            buffer.writeInteger(byte)
            got = try NBDHandshakeDecoder.nextOption(&buffer)
            if i < wire.count - 1 { XCTAssertNil(got, "complete after \(i + 1) bytes") }
        }
        let option = try XCTUnwrap(got)
        XCTAssertEqual(option.code, NBDOption.go)
        XCTAssertEqual(buffer.readableBytes, 0)
        let parsed = try XCTUnwrap(NBDHandshakeDecoder.parseInfoRequest(option.data))
        XCTAssertEqual(parsed.name, "disk")
        XCTAssertEqual(parsed.requests, [NBDInfo.blockSize])
    }

    func testOptionLengthBoundedBeforeWaiting() {
        var b = ByteBuffer(bytes: Array("IHAVEOPT".utf8) + [0, 0, 0, 7] + [0x7F, 0xFF, 0xFF, 0xFF])
        XCTAssertThrowsError(try NBDHandshakeDecoder.nextOption(&b)) { XCTAssertEqual($0 as? NBDProtocolError, .optionTooLong(0x7FFF_FFFF)) }
        var bad = ByteBuffer(bytes: Array("IHAVEOPX".utf8))
        XCTAssertThrowsError(try NBDHandshakeDecoder.nextOption(&bad))
    }

    func testInfoRequestValidation() {
        func parse(_ bytes: [UInt8]) -> (String, [UInt16])? {
            NBDHandshakeDecoder.parseInfoRequest(ByteBuffer(bytes: bytes)).map { ($0.name, $0.requests) }
        }
        XCTAssertEqual(parse([0, 0, 0, 0, 0, 0])?.0, "")
        XCTAssertNil(parse([0, 0, 0, 9, 0x61, 0, 0]))            // name longer than the data
        XCTAssertNil(parse([0, 0, 0, 1, 0x61, 0, 2, 0, 3]))      // 2 requests announced, 1 present
        XCTAssertNil(parse([0, 0, 0, 1, 0x61, 0, 0, 9]))         // trailing byte
        XCTAssertNil(parse([0xFF, 0xFF, 0xFF, 0xFF, 0, 0]))       // absurd name length
        XCTAssertNil(parse([0, 0]))
    }

    func testRequestDecodedOneByteAtATime() throws {
        var wire = ByteBuffer()
        NBDRequestHeader(flags: .fua, type: NBDCommand.write, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 5).write(into: &wire)
        wire.writeBytes([1, 2, 3, 4, 5])
        NBDRequestHeader(flags: [], type: NBDCommand.flush, cookie: 9, offset: 0, length: 0).write(into: &wire)
        XCTAssertEqual(Array(wire.readableBytesView.prefix(28)),
                       [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 5])
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1024)
        var buffer = ByteBuffer()
        var events: [NBDRequestEvent] = []
        for byte in wire.readableBytesView {
            buffer.writeInteger(byte)
            while let e = try decoder.next(&buffer) { events.append(e) }
        }
        XCTAssertEqual(events, [
            .request(NBDRequestHeader(flags: .fua, type: NBDCommand.write, cookie: 0x0102_0304_0506_0708, offset: 4096, length: 5),
                     payload: ByteBuffer(bytes: [1, 2, 3, 4, 5])),
            .request(NBDRequestHeader(flags: [], type: NBDCommand.flush, cookie: 9, offset: 0, length: 0), payload: nil),
        ])
    }

    func testOversizedWriteIsSkippedWithoutBuffering() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 16)
        var buffer = ByteBuffer()
        NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: 1, offset: 0, length: 100).write(into: &buffer)
        buffer.writeRepeatingByte(0xAA, count: 40)
        XCTAssertNil(try decoder.next(&buffer))
        XCTAssertEqual(buffer.readableBytes, 0, "skipped data must not stay buffered")
        XCTAssertTrue(decoder.isSkippingPayload)
        buffer.writeRepeatingByte(0xAA, count: 60)
        NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: 2, offset: 0, length: 4).write(into: &buffer)
        XCTAssertEqual(try decoder.next(&buffer), .oversizedWrite(NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: 1, offset: 0, length: 100)))
        XCTAssertEqual(try decoder.next(&buffer), .request(NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: 2, offset: 0, length: 4), payload: nil))
    }

    func testBytesNeededSizesTheNextRequest() {
        let decoder = NBDRequestDecoder(maximumPayloadBytes: 1 << 20)
        var b = ByteBuffer()
        NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: 1, offset: 0, length: 65536).write(into: &b)
        XCTAssertEqual(decoder.bytesNeeded(b), 28 + 65536)
        XCTAssertNil(decoder.bytesNeeded(b.getSlice(at: 0, length: 27)!))
        var r = ByteBuffer()
        NBDRequestHeader(flags: [], type: NBDCommand.read, cookie: 1, offset: 0, length: 65536).write(into: &r)
        XCTAssertEqual(decoder.bytesNeeded(r), 28)
        var big = ByteBuffer()
        NBDRequestHeader(flags: [], type: NBDCommand.write, cookie: 1, offset: 0, length: 2 << 20).write(into: &big)
        XCTAssertEqual(decoder.bytesNeeded(big), 28, "an oversized write is skipped, never buffered")
    }

    func testBadRequestMagicThrowsAsSoonAsVisible() {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 16)
        var b = ByteBuffer(bytes: [0x25, 0x60, 0x95, 0x14])
        XCTAssertThrowsError(try decoder.next(&b))
    }

    func testReplyEncodings() {
        var simple = ByteBuffer()
        NBDReplyEncoder.writeSimpleReply(cookie: 7, error: .invalid, into: &simple)
        XCTAssertEqual(Array(simple.readableBytesView), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7])

        var data = ByteBuffer()
        NBDReplyEncoder.writeOffsetDataHeader(cookie: 1, offset: 512, dataBytes: 4, into: &data)
        XCTAssertEqual(Array(data.readableBytesView),
                       [0x66, 0x8E, 0x33, 0xEF, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 2, 0])

        var error = ByteBuffer()
        NBDReplyEncoder.writeErrorChunk(cookie: 2, error: .noSpace, message: "full", into: &error)
        XCTAssertEqual(Array(error.readableBytesView),
                       [0x66, 0x8E, 0x33, 0xEF, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 10, 0, 0, 0, 28, 0, 4] + Array("full".utf8))

        var option = ByteBuffer()
        NBDHandshakeEncoder.writeInfoExport(option: NBDOption.go, size: 1 << 20, flags: [.hasFlags, .sendFlush], into: &option)
        XCTAssertEqual(Array(option.readableBytesView),
                       [0, 3, 0xE8, 0x89, 0x04, 0x55, 0x65, 0xA9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0,
                        0, 0, 0, 0, 0, 0x10, 0, 0, 0, 5])

        var exportName = ByteBuffer()
        NBDHandshakeEncoder.writeExportNameReply(size: 1, flags: [.hasFlags], noZeroes: false, into: &exportName)
        XCTAssertEqual(exportName.readableBytes, 8 + 2 + 124)
    }

    func testTransmissionFlagsFollowCapabilities() {
        var caps = VolumeCapabilities()
        XCTAssertEqual(NBDTransmissionFlags(capabilities: caps), [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn])
        caps.multiConn = false
        caps.trim = false
        XCTAssertEqual(NBDTransmissionFlags(capabilities: caps), [.hasFlags, .sendFlush, .sendFUA, .sendWriteZeroes])
        caps.readOnly = true
        XCTAssertEqual(NBDTransmissionFlags(capabilities: caps), [.hasFlags, .sendFlush, .readOnly])
    }

    func testErrorMapping() {
        XCTAssertEqual(NBDError(VolumeError.io(errno: 5)), .io)
        XCTAssertEqual(NBDError(VolumeError.io(errno: 122)), .noSpace)  // EDQUOT
        XCTAssertEqual(NBDError(VolumeError.io(errno: 99)), .io)        // anything else
        XCTAssertEqual(NBDError(VolumeError.noSpace), .noSpace)
        XCTAssertEqual(NBDError(VolumeError.notPrimary(master: "10.0.0.1:10809")), .shutdown)
        XCTAssertEqual(NBDError(VolumeError.invalid("x")), .invalid)
        XCTAssertEqual(NBDError(VolumeError.shuttingDown), .shutdown)
    }

    /// The request rules are pure (no handler, no volume): each verdict of doc/proto.md.
    func testRequestVerdicts() {
        var caps = VolumeCapabilities()
        func h(_ type: UInt16, _ off: UInt64, _ len: UInt32, _ flags: NBDCommandFlags = []) -> NBDRequestHeader {
            NBDRequestHeader(flags: flags, type: type, cookie: 1, offset: off, length: len)
        }
        let size: UInt64 = 1 << 20
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.read, 0, 4096), capabilities: caps, exportSize: size), .serve)
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.read, 0, 0), capabilities: caps, exportSize: size), .nothingToDo)
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.read, size, 1), capabilities: caps, exportSize: size),
                       .reject(.invalid, "read beyond the end of the export"))
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.write, size - 1, 2), capabilities: caps, exportSize: size),
                       .reject(.noSpace, "write beyond the end of the export"))
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.write, UInt64.max, 2), capabilities: caps, exportSize: size),
                       .reject(.noSpace, "write beyond the end of the export"), "offset + length overflows")
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.write, 0, 512, [.noHole]), capabilities: caps, exportSize: size),
                       .reject(.invalid, "unsupported flags for NBD_CMD_WRITE"))
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.blockStatus, 0, 512), capabilities: caps, exportSize: size),
                       .reject(.invalid, "unknown command 7"))
        caps.readOnly = true
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.trim, 0, 512), capabilities: caps, exportSize: size),
                       .reject(.perm, "the export is read-only"))
        caps = VolumeCapabilities(); caps.trim = false
        XCTAssertEqual(NBDRequestVerdict.check(h(NBDCommand.trim, 0, 512), capabilities: caps, exportSize: size),
                       .reject(.invalid, "NBD_CMD_TRIM was not advertised"))
    }
}
