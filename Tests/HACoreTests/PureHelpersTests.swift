import Foundation
import HACore
import XCTest

/// The pure replacements in HACore (JSON.swift, Text.swift) against the Foundation
/// functions they replace, so persisted state and printed values stay as they were.
final class PureHelpersTests: XCTestCase {
    struct Sample: Codable, Equatable {
        var epoch: Epoch
        var node: NodeID?
        var missing: NodeID?
        var big: UInt64
        var negative: Int64
        var ratio: Double
        var text: String
        var list: [GenerationID]
        var nested: [String: [Bool]]
        var role: Role
    }

    static let sample = Sample(epoch: Epoch(7), node: "a/b", missing: nil, big: .max, negative: .min, ratio: 0.25,
                               text: "quote \" backslash \\ tab \t newline \n bell \u{07} é 🙂", list: [GenerationID(1), GenerationID(.max)],
                               nested: ["x": [true, false], "": []], role: .primary)

    func testPureJSONReadsWhatJSONEncoderWrites() throws {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        let foundation = [UInt8](try e.encode(Self.sample))
        XCTAssertEqual(try PureJSON.decode(Sample.self, from: foundation), Self.sample)
        let pretty = JSONEncoder()
        pretty.outputFormatting = [.sortedKeys, .prettyPrinted]
        XCTAssertEqual(try PureJSON.decode(Sample.self, from: [UInt8](try pretty.encode(Self.sample))), Self.sample)
    }

    func testJSONDecoderReadsWhatPureJSONWrites() throws {
        let pure = try PureJSON.encode(Self.sample)
        XCTAssertEqual(try JSONDecoder().decode(Sample.self, from: Data(pure)), Self.sample)
        XCTAssertEqual(try PureJSON.decode(Sample.self, from: pure), Self.sample)
    }

    func testPureJSONWritesSortedCompactKeys() throws {
        XCTAssertEqual(String(decoding: try PureJSON.encode(["b": 1, "a": 2]), as: UTF8.self), #"{"a":2,"b":1}"#)
        XCTAssertEqual(JSONValue.object(["on": .bool(true), "n": .number(1.5), "s": .string("x\"y")]).description,
                       #"{"n":1.5,"on":true,"s":"x\"y"}"#)
        XCTAssertEqual(JSONValue.number(.infinity).description, "?")
    }

    func testPureJSONRefusesMalformedInput() {
        for bad in ["", "{", #"{"a":}"#, "[1,]", "01", "1.", "tru", #""\x""#, #""\ud800""#, "{} x", "[" + String(repeating: "[", count: 300)] {
            XCTAssertThrowsError(try PureJSON.decode(JSONValue.self, from: Array(bad.utf8)), bad)
        }
        XCTAssertThrowsError(try PureJSON.decode(JSONValue.self, from: [0x22, 0xFF, 0x22]), "invalid UTF-8")
        XCTAssertThrowsError(try PureJSON.decode(UInt8.self, from: Array("300".utf8)), "out of range")
        XCTAssertThrowsError(try PureJSON.decode(Sample.self, from: Array("{}".utf8)), "missing keys")
        XCTAssertEqual(try PureJSON.decode(String.self, from: Array(#""\u00e9\ud83d\ude42\/""#.utf8)), "é🙂/")
    }

    func testFixedPointMatchesStringFormat() {
        var values: [Double] = [0, -0.0, 0.0005, 0.0015, 0.0025, -0.0025, 1.25, 1.35, 2.5, 0.5, -0.5, 1e-300, 5e-324,
                                9_223_372_036.854775807, 1e15, 123_456_789.9995, .greatestFiniteMagnitude / 1e300]
        var rng = SplitMix64(seed: 9)
        for _ in 0..<20_000 {
            let ns = Int64(bitPattern: rng.next()) >> (rng.next() % 64)
            values.append(Double(ns) / 1e9)
            values.append(Double(rng.next() >> 10) / Double(UInt64(1) << (rng.next() % 41)))
        }
        for x in values {
            for d in 0...3 {
                XCTAssertEqual(fixedPoint(x, decimals: d), String(format: "%.\(d)f", x), "\(x) with \(d) decimals")
            }
        }
        XCTAssertEqual(Instant(nanoseconds: 1_500_000_000).description, "1.500s")
        XCTAssertEqual(ByteSize.format(1536 << 20), "1.5 GiB")
        XCTAssertEqual(ByteSize.format((5 << 30) / 4), "1.2 GiB", "an exact tie rounds to even, as %.1f did")
    }

    func testTextHelpers() {
        XCTAssertEqual(trimmingWhitespace(" \t 64 KiB\t "), "64 KiB")
        XCTAssertEqual(trimmingWhitespace("   "), "")
        XCTAssertEqual(strictUTF8String(Array("né".utf8)), "né")
        XCTAssertNil(strictUTF8String([0x61, 0xC3]))
        XCTAssertEqual(strictUTF8String([]), "")
    }
}
