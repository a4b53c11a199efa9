import Foundation
import NIOCore
import NIOPosix
import XCTest
@testable import Replication
@testable import ReplicationShell

/// LocalVolume over a real temp file: data lands in the file, holes are punched, bounds and
/// read-only are enforced, and a volume that was shut down fails with `.shuttingDown`.
final class LocalVolumeTests: XCTestCase {
    private var dir: String!
    private var group: MultiThreadedEventLoopGroup!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "localvolume-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func testWriteReadZeroAndBounds() throws {
        let store = try BackingStore(path: dir + "/v.img", createSize: 1 << 20)
        let volume = LocalVolume(store: store, ioThreads: 2)
        defer { volume.shutdown() }
        let loop = group.next()
        XCTAssertEqual(volume.sizeBytes, 1 << 20)
        XCTAssertTrue(volume.capabilities.multiConn)

        try volume.write(offset: 8192, data: ByteBuffer(repeating: 0xC3, count: 8192), fua: true, on: loop).wait()
        XCTAssertEqual(Array(try volume.read(offset: 8192, length: 8192, on: loop).wait().readableBytesView), [UInt8](repeating: 0xC3, count: 8192))
        try volume.flush(on: loop).wait()
        // The bytes are in the file itself.
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: dir + "/v.img"))
        XCTAssertEqual(Array(onDisk[8192..<16384]), [UInt8](repeating: 0xC3, count: 8192))

        try volume.writeZeroes(offset: 8192, length: 4096, fua: false, mayDeallocate: false, on: loop).wait()
        try volume.trim(offset: 12288, length: 4096, fua: true, on: loop).wait()
        XCTAssertEqual(Array(try volume.read(offset: 8192, length: 8192, on: loop).wait().readableBytesView), [UInt8](repeating: 0, count: 8192))

        XCTAssertThrowsError(try volume.read(offset: (1 << 20) - 10, length: 20, on: loop).wait()) {
            guard case VolumeError.invalid = $0 else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try volume.write(offset: 1 << 20, data: ByteBuffer(bytes: [1]), fua: false, on: loop).wait()) {
            XCTAssertEqual($0 as? VolumeError, .noSpace)
        }
        XCTAssertThrowsError(try volume.read(offset: UInt64.max, length: 2, on: loop).wait())
    }

    func testReadOnlyAndShutDown() throws {
        let store = try BackingStore(path: dir + "/ro.img", createSize: 65536)
        let ro = LocalVolume(store: store, readOnly: true)
        let loop = group.next()
        XCTAssertTrue(ro.capabilities.readOnly)
        XCTAssertThrowsError(try ro.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false, on: loop).wait())
        XCTAssertEqual(try ro.read(offset: 0, length: 4, on: loop).wait().readableBytes, 4)
        ro.shutdown()
        XCTAssertThrowsError(try ro.read(offset: 0, length: 4, on: loop).wait()) {
            XCTAssertEqual($0 as? VolumeError, .shuttingDown)
        }
    }

    func testConcurrentWritesFromManyLoopsAllLand() throws {
        let store = try BackingStore(path: dir + "/c.img", createSize: 4 << 20)
        let volume = LocalVolume(store: store, ioThreads: 4)
        defer { volume.shutdown() }
        let loops = MultiThreadedEventLoopGroup(numberOfThreads: 3)
        defer { try? loops.syncShutdownGracefully() }
        let futures = (0..<256).map { i in
            volume.write(offset: UInt64(i) * 16384, data: ByteBuffer(repeating: UInt8(i), count: 16384), fua: i % 16 == 0, on: loops.next())
        }
        for f in futures { try f.wait() }
        for i in stride(from: 0, to: 256, by: 37) {
            XCTAssertEqual(Set(try volume.read(offset: UInt64(i) * 16384, length: 16384, on: loops.next()).wait().readableBytesView), [UInt8(i)])
        }
    }
}
