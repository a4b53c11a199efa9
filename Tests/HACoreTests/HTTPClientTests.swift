import Foundation
@testable import HACore
@testable import HAShell
import XCTest

final class HTTPClientTests: XCTestCase {
    func testParsesContentLengthAndChunkedResponses() throws {
        let plain = try HTTPClient.parse(Data("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\nextra".utf8))
        XCTAssertEqual(plain.status, 200)
        XCTAssertEqual(plain.text, "ok\n")
        XCTAssertEqual(plain.header("content-type"), "text/plain")
        let chunked = try HTTPClient.parse(Data("HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n3\r\n!!!\r\n0\r\n\r\n".utf8))
        XCTAssertEqual(chunked.status, 401)
        XCTAssertEqual(chunked.text, "nope!!!")
        XCTAssertThrowsError(try HTTPClient.parse(Data("garbage\r\n\r\n".utf8)))
        XCTAssertThrowsError(try HTTPClient.parse(Data("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort".utf8)))
    }

    func testBadURLAndRefusedConnection() throws {
        XCTAssertThrowsError(try HTTPClient(endpoint: "https://x:1").get("/")) { error in
            XCTAssertTrue("\(error)".contains("https:// endpoint needs a CA file"), "\(error)")
        }
        XCTAssertThrowsError(try HTTPClient(endpoint: "ftp://x:1").get("/"))
        XCTAssertThrowsError(try HTTPClient(endpoint: "http://nohostport").get("/"))
        // A port nobody listens on: a bound but not listening socket reserves it.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        XCTAssertThrowsError(try HTTPClient(endpoint: "http://127.0.0.1:\(port)").get("/status")) { error in
            XCTAssertTrue("\(error)".contains("cannot connect"), "\(error)")
        }
    }

    func testTimesOutOnASilentServer() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 4)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let start = ContinuousClock.now
        XCTAssertThrowsError(try HTTPClient(endpoint: "http://127.0.0.1:\(port)", timeout: .milliseconds(300)).get("/status")) { error in
            XCTAssertTrue("\(error)".contains("in time"), "\(error)")
        }
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(2))
    }
}
