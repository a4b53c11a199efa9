/// A small JSON coder for the pure modules, which may not import Foundation: compact output
/// with sorted keys (the layout `JSONEncoder` with `.sortedKeys` writes), and a strict parser
/// that reads what either writes. Integers keep their exact digits (a random 64-bit
/// incarnation survives the round trip). Used for the persisted quorum state
/// (`Quorum/PersistentState.swift`) and `JSONValue.description`.
public enum PureJSON {
    /// Compact JSON bytes of `value`, object keys sorted.
    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let ref = Ref()
        try box(value, into: ref, path: [])
        var out: [UInt8] = []
        write(ref.node, into: &out)
        return out
    }

    /// Decode `type` from JSON bytes; throws on malformed JSON or a shape that does not fit.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        var parser = Parser(bytes: bytes)
        let node = try parser.document()
        return try unbox(type, from: node, path: [])
    }

    /// Compact JSON text of a `JSONValue` (keys sorted); "?" if it cannot be written (a
    /// non-finite number), as `JSONEncoder` would refuse it.
    public static func text(_ value: JSONValue) -> String {
        guard let bytes = try? encode(value) else { return "?" }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A JSON syntax error, with the byte offset where it was found.
    public struct SyntaxError: Error, CustomStringConvertible {
        public var offset: Int
        public var message: String
        public var description: String { "invalid JSON at byte \(offset): \(message)" }
    }

    indirect enum Node: Equatable {
        case null
        case bool(Bool)
        /// The number's JSON text, so that integers keep every digit.
        case number(String)
        case string(String)
        case array([Node])
        case object([String: Node])
    }

    // MARK: Encoding

    /// Where an encoder writes: one value, or an array or object of further places.
    final class Ref {
        var leaf: Node = .null
        var array: [Ref]?
        var object: [String: Ref]?
        var node: Node {
            if let object { return .object(object.mapValues { $0.node }) }
            if let array { return .array(array.map { $0.node }) }
            return leaf
        }
    }

    static func box<T: Encodable>(_ value: T, into ref: Ref, path: [any CodingKey]) throws {
        switch value {
        case let v as Bool: ref.leaf = .bool(v)
        case let v as String: ref.leaf = .string(v)
        case let v as Double: ref.leaf = .number(try number(v, path: path))
        case let v as Float: ref.leaf = .number(try number(Double(v), path: path))
        case let v as any FixedWidthInteger: ref.leaf = .number(String(describing: v))
        default: try value.encode(to: Encoder(ref: ref, codingPath: path))
        }
    }

    static func number(_ v: Double, path: [any CodingKey]) throws -> String {
        guard v.isFinite else {
            throw EncodingError.invalidValue(v, .init(codingPath: path, debugDescription: "\(v) is not representable in JSON"))
        }
        if v == v.rounded(), abs(v) < 1e15 { return String(Int64(v)) }
        return String(describing: v)
    }

    struct Encoder: Swift.Encoder {
        let ref: Ref
        var codingPath: [any CodingKey]
        var userInfo: [CodingUserInfoKey: Any] { [:] }

        func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
            if ref.object == nil { ref.object = [:] }
            return KeyedEncodingContainer(KeyedEncoder<Key>(ref: ref, codingPath: codingPath))
        }
        func unkeyedContainer() -> any UnkeyedEncodingContainer {
            if ref.array == nil { ref.array = [] }
            return UnkeyedEncoder(ref: ref, codingPath: codingPath)
        }
        func singleValueContainer() -> any SingleValueEncodingContainer {
            SingleValueEncoder(ref: ref, codingPath: codingPath)
        }
    }

    struct KeyedEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
        let ref: Ref
        var codingPath: [any CodingKey]

        func child(_ key: Key) -> Ref {
            let r = Ref()
            ref.object![key.stringValue] = r
            return r
        }
        mutating func encodeNil(forKey key: Key) throws { child(key).leaf = .null }
        mutating func encode(_ value: Bool, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: String, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Double, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Float, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Int, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Int8, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Int16, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Int32, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: Int64, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: UInt, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: UInt8, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: UInt16, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: UInt32, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode(_ value: UInt64, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws { try PureJSON.box(value, into: child(key), path: codingPath + [key]) }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
            Encoder(ref: child(key), codingPath: codingPath + [key]).container(keyedBy: keyType)
        }
        mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
            Encoder(ref: child(key), codingPath: codingPath + [key]).unkeyedContainer()
        }
        mutating func superEncoder() -> any Swift.Encoder { Encoder(ref: child(Key(stringValue: "super")!), codingPath: codingPath) }
        mutating func superEncoder(forKey key: Key) -> any Swift.Encoder { Encoder(ref: child(key), codingPath: codingPath + [key]) }
    }

    struct UnkeyedEncoder: UnkeyedEncodingContainer {
        let ref: Ref
        var codingPath: [any CodingKey]
        var count: Int { ref.array!.count }

        func next() -> Ref {
            let r = Ref()
            ref.array!.append(r)
            return r
        }
        mutating func encodeNil() throws { next().leaf = .null }
        mutating func encode(_ value: Bool) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: String) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Double) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Float) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Int) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Int8) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Int16) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Int32) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: Int64) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: UInt) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: UInt8) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: UInt16) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: UInt32) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode(_ value: UInt64) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func encode<T: Encodable>(_ value: T) throws { try PureJSON.box(value, into: next(), path: codingPath) }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
            Encoder(ref: next(), codingPath: codingPath).container(keyedBy: keyType)
        }
        mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
            Encoder(ref: next(), codingPath: codingPath).unkeyedContainer()
        }
        mutating func superEncoder() -> any Swift.Encoder { Encoder(ref: next(), codingPath: codingPath) }
    }

    struct SingleValueEncoder: SingleValueEncodingContainer {
        let ref: Ref
        var codingPath: [any CodingKey]
        mutating func encodeNil() throws { ref.leaf = .null }
        mutating func encode(_ value: Bool) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: String) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Double) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Float) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Int) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Int8) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Int16) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Int32) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: Int64) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: UInt) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: UInt8) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: UInt16) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: UInt32) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode(_ value: UInt64) throws { try PureJSON.box(value, into: ref, path: codingPath) }
        mutating func encode<T: Encodable>(_ value: T) throws { try PureJSON.box(value, into: ref, path: codingPath) }
    }

    // MARK: Decoding

    static func unbox<T: Decodable>(_ type: T.Type, from node: Node, path: [any CodingKey]) throws -> T {
        func mismatch(_ what: String) -> DecodingError {
            .typeMismatch(type, .init(codingPath: path, debugDescription: "expected \(what), found \(node.kind)"))
        }
        if type == Bool.self {
            guard case .bool(let b) = node else { throw mismatch("a boolean") }
            return b as! T
        }
        if type == String.self {
            guard case .string(let s) = node else { throw mismatch("a string") }
            return s as! T
        }
        if type == Double.self || type == Float.self {
            guard case .number(let text) = node, let d = Double(text) else { throw mismatch("a number") }
            return (type == Double.self ? d as Any : Float(d) as Any) as! T
        }
        if let integer = type as? any FixedWidthInteger.Type {
            guard case .number(let text) = node else { throw mismatch("an integer") }
            guard let v = exactInteger(integer, text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: path, debugDescription: "\(text) does not fit in \(type)"))
            }
            return v as! T
        }
        return try T(from: Decoder(node: node, codingPath: path))
    }

    static func exactInteger<I: FixedWidthInteger>(_ type: I.Type, _ text: String) -> I? {
        if let v = I(text) { return v }
        // "3.0" or "3e2": accepted when the value is an exact integer in range.
        guard let d = Double(text), d == d.rounded() else { return nil }
        return I(exactly: d)
    }

    struct Decoder: Swift.Decoder {
        let node: Node
        var codingPath: [any CodingKey]
        var userInfo: [CodingUserInfoKey: Any] { [:] }

        func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
            guard case .object(let o) = node else {
                throw DecodingError.typeMismatch([String: Any].self, .init(codingPath: codingPath, debugDescription: "expected an object, found \(node.kind)"))
            }
            return KeyedDecodingContainer(KeyedDecoder<Key>(object: o, codingPath: codingPath))
        }
        func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
            guard case .array(let a) = node else {
                throw DecodingError.typeMismatch([Any].self, .init(codingPath: codingPath, debugDescription: "expected an array, found \(node.kind)"))
            }
            return UnkeyedDecoder(array: a, codingPath: codingPath)
        }
        func singleValueContainer() throws -> any SingleValueDecodingContainer {
            SingleValueDecoder(node: node, codingPath: codingPath)
        }
    }

    struct KeyedDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
        let object: [String: Node]
        var codingPath: [any CodingKey]
        var allKeys: [Key] { object.keys.sorted().compactMap { Key(stringValue: $0) } }

        func contains(_ key: Key) -> Bool { object[key.stringValue] != nil }
        func node(_ key: Key) throws -> Node {
            guard let n = object[key.stringValue] else {
                throw DecodingError.keyNotFound(key, .init(codingPath: codingPath, debugDescription: "no value for '\(key.stringValue)'"))
            }
            return n
        }
        func decodeNil(forKey key: Key) throws -> Bool { try node(key) == .null }
        func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: String.Type, forKey key: Key) throws -> String { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Float.Type, forKey key: Key) throws -> Float { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T { try PureJSON.unbox(type, from: node(key), path: codingPath + [key]) }
        func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
            try Decoder(node: node(key), codingPath: codingPath + [key]).container(keyedBy: type)
        }
        func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
            try Decoder(node: node(key), codingPath: codingPath + [key]).unkeyedContainer()
        }
        func superDecoder() throws -> any Swift.Decoder { Decoder(node: object["super"] ?? .null, codingPath: codingPath) }
        func superDecoder(forKey key: Key) throws -> any Swift.Decoder { Decoder(node: try node(key), codingPath: codingPath + [key]) }
    }

    struct UnkeyedDecoder: UnkeyedDecodingContainer {
        let array: [Node]
        var codingPath: [any CodingKey]
        var currentIndex = 0
        var count: Int? { array.count }
        var isAtEnd: Bool { currentIndex >= array.count }

        init(array: [Node], codingPath: [any CodingKey]) { self.array = array; self.codingPath = codingPath }

        mutating func next() throws -> Node {
            guard !isAtEnd else {
                throw DecodingError.valueNotFound(Any.self, .init(codingPath: codingPath, debugDescription: "array ended after \(array.count) values"))
            }
            defer { currentIndex += 1 }
            return array[currentIndex]
        }
        mutating func decodeNil() throws -> Bool {
            guard !isAtEnd, array[currentIndex] == .null else { return false }
            currentIndex += 1
            return true
        }
        mutating func decode(_ type: Bool.Type) throws -> Bool { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: String.Type) throws -> String { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Double.Type) throws -> Double { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Float.Type) throws -> Float { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Int.Type) throws -> Int { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Int8.Type) throws -> Int8 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Int16.Type) throws -> Int16 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Int32.Type) throws -> Int32 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: Int64.Type) throws -> Int64 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: UInt.Type) throws -> UInt { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: UInt8.Type) throws -> UInt8 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: UInt16.Type) throws -> UInt16 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: UInt32.Type) throws -> UInt32 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode(_ type: UInt64.Type) throws -> UInt64 { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func decode<T: Decodable>(_ type: T.Type) throws -> T { try PureJSON.unbox(type, from: next(), path: codingPath) }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
            try Decoder(node: next(), codingPath: codingPath).container(keyedBy: type)
        }
        mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
            try Decoder(node: next(), codingPath: codingPath).unkeyedContainer()
        }
        mutating func superDecoder() throws -> any Swift.Decoder { Decoder(node: try next(), codingPath: codingPath) }
    }

    struct SingleValueDecoder: SingleValueDecodingContainer {
        let node: Node
        var codingPath: [any CodingKey]
        func decodeNil() -> Bool { node == .null }
        func decode(_ type: Bool.Type) throws -> Bool { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: String.Type) throws -> String { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Double.Type) throws -> Double { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Float.Type) throws -> Float { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Int.Type) throws -> Int { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Int8.Type) throws -> Int8 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Int16.Type) throws -> Int16 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Int32.Type) throws -> Int32 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: Int64.Type) throws -> Int64 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: UInt.Type) throws -> UInt { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: UInt8.Type) throws -> UInt8 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: UInt16.Type) throws -> UInt16 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: UInt32.Type) throws -> UInt32 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode(_ type: UInt64.Type) throws -> UInt64 { try PureJSON.unbox(type, from: node, path: codingPath) }
        func decode<T: Decodable>(_ type: T.Type) throws -> T { try PureJSON.unbox(type, from: node, path: codingPath) }
    }

    // MARK: Text

    static func write(_ node: Node, into out: inout [UInt8]) {
        switch node {
        case .null: out += Array("null".utf8)
        case .bool(let b): out += Array((b ? "true" : "false").utf8)
        case .number(let text): out += Array(text.utf8)
        case .string(let s): writeString(s, into: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, n) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(n, into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            for (i, k) in o.keys.sorted().enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                writeString(k, into: &out)
                out.append(UInt8(ascii: ":"))
                write(o[k]!, into: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    static func writeString(_ s: String, into out: inout [UInt8]) {
        let hex = Array("0123456789abcdef".utf8)
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out += [UInt8(ascii: "\\"), b]
            case UInt8(ascii: "\\"): out += [UInt8(ascii: "\\"), b]
            case 0x0A: out += Array("\\n".utf8)
            case 0x0D: out += Array("\\r".utf8)
            case 0x09: out += Array("\\t".utf8)
            case 0x08: out += Array("\\b".utf8)
            case 0x0C: out += Array("\\f".utf8)
            case 0..<0x20: out += Array("\\u00".utf8) + [hex[Int(b >> 4)], hex[Int(b & 0xF)]]
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    struct Parser {
        let bytes: [UInt8]
        var i = 0
        static let maxDepth = 256

        init(bytes: [UInt8]) { self.bytes = bytes }

        func fail(_ message: String) -> SyntaxError { SyntaxError(offset: i, message: message) }

        mutating func document() throws -> Node {
            let n = try value(depth: 0)
            skipSpace()
            guard i == bytes.count else { throw fail("unexpected data after the value") }
            return n
        }

        mutating func skipSpace() {
            while i < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[i]) { i += 1 }
        }

        mutating func literal(_ word: String, _ node: Node) throws -> Node {
            let w = Array(word.utf8)
            guard bytes.count - i >= w.count, Array(bytes[i..<(i + w.count)]) == w else { throw fail("expected \(word)") }
            i += w.count
            return node
        }

        mutating func value(depth: Int) throws -> Node {
            guard depth < Self.maxDepth else { throw fail("nested deeper than \(Self.maxDepth)") }
            skipSpace()
            guard i < bytes.count else { throw fail("unexpected end of input") }
            switch bytes[i] {
            case UInt8(ascii: "n"): return try literal("null", .null)
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "["):
                i += 1
                var items: [Node] = []
                skipSpace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                while true {
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard i < bytes.count else { throw fail("unterminated array") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                    throw fail("expected , or ]")
                }
            case UInt8(ascii: "{"):
                i += 1
                var members: [String: Node] = [:]
                skipSpace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                while true {
                    skipSpace()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw fail("expected a key") }
                    let key = try string()
                    skipSpace()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw fail("expected :") }
                    i += 1
                    members[key] = try value(depth: depth + 1)
                    skipSpace()
                    guard i < bytes.count else { throw fail("unterminated object") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                    throw fail("expected , or }")
                }
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try number())
            default: throw fail("unexpected character")
            }
        }

        mutating func digits() -> Int {
            let start = i
            while i < bytes.count, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "9") { i += 1 }
            return i - start
        }

        /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
        mutating func number() throws -> String {
            let start = i
            if bytes[i] == UInt8(ascii: "-") { i += 1 }
            guard i < bytes.count else { throw fail("truncated number") }
            if bytes[i] == UInt8(ascii: "0") { i += 1 } else if digits() == 0 { throw fail("expected a digit") }
            if i < bytes.count, bytes[i] == UInt8(ascii: ".") {
                i += 1
                guard digits() > 0 else { throw fail("expected a digit after the point") }
            }
            if i < bytes.count, bytes[i] == UInt8(ascii: "e") || bytes[i] == UInt8(ascii: "E") {
                i += 1
                if i < bytes.count, bytes[i] == UInt8(ascii: "+") || bytes[i] == UInt8(ascii: "-") { i += 1 }
                guard digits() > 0 else { throw fail("expected an exponent") }
            }
            return String(decoding: bytes[start..<i], as: UTF8.self)
        }

        mutating func hex4() throws -> UInt32 {
            guard bytes.count - i >= 4 else { throw fail("truncated \\u escape") }
            var v: UInt32 = 0
            for _ in 0..<4 {
                let c = bytes[i]
                let d: UInt8
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = c - UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = c - UInt8(ascii: "a") + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): d = c - UInt8(ascii: "A") + 10
                default: throw fail("bad \\u escape")
                }
                v = v << 4 | UInt32(d)
                i += 1
            }
            return v
        }

        mutating func string() throws -> String {
            i += 1  // opening quote
            var raw: [UInt8] = []
            while true {
                guard i < bytes.count else { throw fail("unterminated string") }
                let c = bytes[i]
                i += 1
                switch c {
                case UInt8(ascii: "\""):
                    guard let s = strictUTF8String(raw) else { throw fail("string is not valid UTF-8") }
                    return s
                case UInt8(ascii: "\\"):
                    guard i < bytes.count else { throw fail("unterminated escape") }
                    let e = bytes[i]
                    i += 1
                    switch e {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): raw.append(e)
                    case UInt8(ascii: "b"): raw.append(0x08)
                    case UInt8(ascii: "f"): raw.append(0x0C)
                    case UInt8(ascii: "n"): raw.append(0x0A)
                    case UInt8(ascii: "r"): raw.append(0x0D)
                    case UInt8(ascii: "t"): raw.append(0x09)
                    case UInt8(ascii: "u"):
                        var scalar = try hex4()
                        if (0xD800..<0xDC00).contains(scalar) {
                            guard bytes.count - i >= 2, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") else {
                                throw fail("unpaired surrogate")
                            }
                            i += 2
                            let low = try hex4()
                            guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate") }
                            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                        }
                        guard let u = Unicode.Scalar(scalar) else { throw fail("unpaired surrogate") }
                        raw += Array(String(Character(u)).utf8)
                    default: throw fail("unknown escape")
                    }
                case 0..<0x20: throw fail("control character in string")
                default: raw.append(c)
                }
            }
        }
    }
}

extension PureJSON.Node {
    var kind: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}
