import Foundation
import HACore

// Split from HACore/StatusDocument.swift: the Foundation coders stay out of the pure module.

extension JSONEncoder {
    /// The encoder for everything hamgr serves: sorted keys, so output is diffable.
    public static var hamgr: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return e
    }
}

extension JSONValue {
    /// Parse a JSON object from bytes; nil if the bytes are not a JSON object.
    public static func parseObject(_ data: Data) -> [String: JSONValue]? {
        if data.isEmpty { return [:] }
        return try? JSONDecoder().decode([String: JSONValue].self, from: data)
    }
}
