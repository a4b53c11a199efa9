/// Small text helpers the pure modules use instead of Foundation (`String(format:)`,
/// `trimmingCharacters(in:)`, `String(bytes:encoding:)`).

/// `value / scale` with `decimals` digits after the point, rounded half to even on the exact
/// quotient (as `String(format: "%.Nf")` does for exactly representable values), e.g.
/// `fixedPoint(1_500_000_000, scale: 1_000_000_000, decimals: 3) == "1.500"`.
/// `scale * 10^decimals` must fit in a UInt64.
public func fixedPoint<T: BinaryInteger>(_ value: T, scale: UInt64, decimals: Int) -> String {
    precondition(scale > 0 && decimals >= 0)
    let negative = value < 0
    let magnitude = UInt64(value.magnitude)
    var pow10: UInt64 = 1
    for _ in 0..<decimals { pow10 *= 10 }
    var whole = magnitude / scale
    let remainder = magnitude % scale
    let scaled = remainder * pow10
    var fraction = scaled / scale
    let rest = scaled % scale
    // Round half to even on the exact rational rest / scale.
    if rest * 2 > scale || (rest * 2 == scale && fraction % 2 == 1) || (rest * 2 == scale && decimals == 0 && whole % 2 == 1) {
        fraction += 1
    }
    if fraction == pow10 { fraction = 0; whole += 1 }
    var text = (negative && (whole != 0 || fraction != 0) ? "-" : "") + String(whole)
    if decimals > 0 {
        let digits = String(fraction)
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
