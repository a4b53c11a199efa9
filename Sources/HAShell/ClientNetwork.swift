import NIOCore

/// One entry of an export's allow-list: an IPv4 or IPv6 network in CIDR notation
/// (`10.1.0.0/16`, `2001:db8::/32`), or a single address (`192.0.2.7`, `::1`).
/// An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, what a dual-stack socket reports) is
/// matched as the IPv4 address it carries.
public struct ClientNetwork: Sendable, Equatable, CustomStringConvertible {
    /// 4 or 16 bytes, host bits cleared.
    public let address: [UInt8]
    public let prefixLength: Int

    public var description: String {
        let text = address.count == 4 ? address.map(String.init).joined(separator: ".") : Self.formatIPv6(address)
        return "\(text)/\(prefixLength)"
    }

    /// Parse `ADDRESS[/PREFIX]`; nil if it is not one.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let bytes = Self.parseAddress(String(parts[0])) else { return nil }
        let maxPrefix = bytes.count * 8
        var prefix = maxPrefix
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...maxPrefix).contains(p), !parts[1].hasPrefix("+") else { return nil }
            prefix = p
        }
        self.address = Self.mask(bytes, prefix)
        self.prefixLength = prefix
    }

    /// Whether `peer` lies in this network. Unix-socket peers are never in a network.
    public func contains(_ peer: SocketAddress) -> Bool {
        guard var bytes = Self.bytes(of: peer) else { return false }
        if bytes.count == 16, address.count == 4, bytes[0..<12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff][...] {
            bytes = Array(bytes[12...])
        }
        guard bytes.count == address.count else { return false }
        return Self.mask(bytes, prefixLength) == address
    }

    static func bytes(of peer: SocketAddress) -> [UInt8]? {
        switch peer {
        case .v4(let a):
            return withUnsafeBytes(of: a.address.sin_addr.s_addr) { Array($0) }
        case .v6(let a):
            return withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
        case .unixDomainSocket:
            return nil
        }
    }

    static func mask(_ bytes: [UInt8], _ prefix: Int) -> [UInt8] {
        var out = bytes
        for i in 0..<out.count {
            let bits = max(0, min(8, prefix - i * 8))
            out[i] &= bits == 0 ? 0 : UInt8(truncatingIfNeeded: 0xff << (8 - bits))
        }
        return out
    }

    static func parseAddress(_ s: String) -> [UInt8]? {
        if !s.contains(":") {
            let parts = s.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var out: [UInt8] = []
            for p in parts {
                guard !p.isEmpty, p.count <= 3, p.allSatisfy(\.isASCII), let v = UInt8(p) else { return nil }
                out.append(v)
            }
            return out
        }
        // IPv6: groups of hex, at most one "::", optionally ending in a dotted IPv4.
        var text = Substring(s)
        var tail: [UInt8] = []
        if let lastColon = text.lastIndex(of: ":"), text[text.index(after: lastColon)...].contains(".") {
            guard let v4 = parseAddress(String(text[text.index(after: lastColon)...])) else { return nil }
            tail = v4
            text = text[...lastColon]
            if text.hasSuffix(":") && !text.hasSuffix("::") { text = text.dropLast() }
        }
        let halves = text.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ h: String) -> [UInt16]? {
            if h.isEmpty { return [] }
            var out: [UInt16] = []
            for g in h.split(separator: ":", omittingEmptySubsequences: false) {
                guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        let rest = halves.count == 2 ? groups(halves[1]) : []
        guard let rest else { return nil }
        let wanted = 8 - tail.count / 2
        var all: [UInt16]
        if halves.count == 2 {
            guard head.count + rest.count < wanted else { return nil }
            all = head + Array(repeating: 0, count: wanted - head.count - rest.count) + rest
        } else {
            guard head.count == wanted else { return nil }
            all = head
        }
        var out: [UInt8] = []
        for g in all { out.append(UInt8(g >> 8)); out.append(UInt8(g & 0xff)) }
        return out + tail
    }

    static func formatIPv6(_ b: [UInt8]) -> String {
        stride(from: 0, to: 16, by: 2).map { String(UInt16(b[$0]) << 8 | UInt16(b[$0 + 1]), radix: 16) }.joined(separator: ":")
    }
}
