/// Small text helpers the pure modules use instead of Foundation (`String(format:)`,
/// `trimmingCharacters(in:)`, `String(bytes:encoding:)`).

/// `x` with `decimals` (0…3) digits after the point: the same text as
/// `String(format: "%.<decimals>f", x)`, i.e. the exact binary value rounded half to even,
/// and "-" for any negative value, e.g. `fixedPoint(1.5, decimals: 3) == "1.500"`.
public func fixedPoint(_ x: Double, decimals: Int) -> String {
    precondition((0...3).contains(decimals), "fixedPoint supports 0…3 decimals")
    guard x.isFinite else { return x.isNaN ? "nan" : (x < 0 ? "-inf" : "inf") }
    let sign = x.sign == .minus ? "-" : ""
    let a = x.magnitude
    var pow10: UInt64 = 1
    for _ in 0..<decimals { pow10 *= 10 }
    // a == m * 2^e exactly.
    let bits = Int(a.exponentBitPattern)
    let m = UInt64(a.significandBitPattern) | (bits == 0 ? 0 : 1 << 52)
    let e = (bits == 0 ? 1 : bits) - 1075
    var units: UInt64  // round(a * 10^decimals), half to even
    if e >= 0 {
        // An integer. Beyond UInt64 / 10^decimals (no caller comes near) Swift's own text.
        guard let whole = UInt64(exactly: a), whole <= UInt64.max / pow10 else { return sign + String(describing: a) }
        units = whole * pow10
    } else {
        let product = m * pow10  // m < 2^53, pow10 <= 1000: fits
        let shift = -e
        if shift >= 64 {
            units = 0  // product < 2^63 <= half of 2^shift
        } else {
            units = product >> UInt64(shift)
            let rest = product & ((1 << UInt64(shift)) - 1)
            let half: UInt64 = 1 << UInt64(shift - 1)
            if rest > half || (rest == half && units % 2 == 1) { units += 1 }
        }
    }
    var text = sign + String(units / pow10)
    if decimals > 0 {
        let digits = String(units % pow10)
        text += "." + String(repeating: "0", count: decimals - digits.count) + digits
    }
    return text
}

/// `text` without leading and trailing spaces and tabs.
public func trimmingWhitespace<S: StringProtocol>(_ text: S) -> String {
    let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" }
    guard let first = text.firstIndex(where: { !isSpace($0) }) else { return "" }
    let last = text.lastIndex(where: { !isSpace($0) })!
    return String(text[first...last])
}

/// The bytes as a string if they are valid UTF-8, nil otherwise (no repair).
public func strictUTF8String<C: Collection>(_ bytes: C) -> String? where C.Element == UInt8 {
    var decoder = UTF8()
    var iterator = bytes.makeIterator()
    var scalars = String.UnicodeScalarView()
    while true {
        switch decoder.decode(&iterator) {
        case .scalarValue(let s): scalars.append(s)
        case .emptyInput: return String(scalars)
        case .error: return nil
        }
    }
}
