import NIOCore
import Replication

// libFuzzer entry point for the NBD handshake and request decoders (Sources/Replication/NBD/
// NBDProtocol.swift). The first input byte picks the phase and the chunk size the stream
// arrives in; the rest is the stream. Checked beyond "no crash": decoders never read past
// what they were given, a decoded option/request is self-consistent, and decoding the same
// bytes in one piece or in chunks gives the same events.
@_cdecl("LLVMFuzzerTestOneInput")
public func nbdDecoderFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let control = data[0]
    let stream = UnsafeBufferPointer(start: data + 1, count: size - 1)
    let chunk = Int(control >> 2) % 61 + 1
    switch control & 3 {
    case 0: handshake(stream, chunk: chunk)
    default: requests(stream, chunk: chunk, maxPayload: control & 3 == 1 ? 64 : 32 * 1024 * 1024)
    }
    return 0
}

private func handshake(_ stream: UnsafeBufferPointer<UInt8>, chunk: Int) {
    func run(chunk: Int) -> [String] {
        var events: [String] = []
        var buffer = ByteBuffer()
        var sawFlags = false
        var offset = 0
        while offset < stream.count {
            let n = min(chunk, stream.count - offset)
            buffer.writeBytes(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: stream[offset..<(offset + n)])))
            offset += n
            do {
                while true {
                    let before = buffer.readableBytes
                    if !sawFlags {
                        guard let f = try NBDHandshakeDecoder.nextClientFlags(&buffer) else { break }
                        precondition(f & ~NBDHandshakeFlags.clientKnown == 0)
                        sawFlags = true
                        events.append("flags \(f)")
                    } else {
                        guard let o = try NBDHandshakeDecoder.nextOption(&buffer) else { break }
                        precondition(UInt32(o.data.readableBytes) <= NBDLimits.maxOptionBytes)
                        precondition(before - buffer.readableBytes == 16 + o.data.readableBytes)
                        if let (_, infos) = NBDHandshakeDecoder.parseInfoRequest(o.data) {
                            precondition(6 + 2 * infos.count <= o.data.readableBytes)
                        }
                        _ = NBDHandshakeDecoder.parseExportName(o.data)
                        events.append("option \(o.code) \(o.data.readableBytes)")
                    }
                }
            } catch {
                events.append("error \(error)")
                return events
            }
        }
        return events
    }
    let whole = run(chunk: max(stream.count, 1))
    let pieces = run(chunk: chunk)
    precondition(whole == pieces, "chunking changed the decoded events: \(whole) vs \(pieces)")
}

private func requests(_ stream: UnsafeBufferPointer<UInt8>, chunk: Int, maxPayload: UInt32) {
    func run(chunk: Int) -> [NBDRequestEvent?] {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: maxPayload)
        var events: [NBDRequestEvent?] = []
        var buffer = ByteBuffer()
        var offset = 0
        while offset < stream.count {
            let n = min(chunk, stream.count - offset)
            buffer.writeBytes(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: stream[offset..<(offset + n)])))
            offset += n
            do {
                while let e = try decoder.next(&buffer) {
                    switch e {
                    case .request(let h, let payload):
                        if h.type == NBDCommand.write {
                            precondition(payload?.readableBytes == Int(h.length) && h.length <= maxPayload)
                        } else {
                            precondition(payload == nil)
                        }
                    case .oversizedWrite(let h):
                        precondition(h.type == NBDCommand.write && h.length > maxPayload)
                    }
                    events.append(e)
                }
            } catch {
                events.append(nil)
                return events
            }
        }
        return events
    }
    let whole = run(chunk: max(stream.count, 1))
    let pieces = run(chunk: chunk)
    precondition(whole == pieces, "chunking changed the decoded requests")
}
