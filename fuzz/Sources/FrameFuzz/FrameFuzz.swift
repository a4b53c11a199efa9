import Crypto
import HACore
import NIOCore

// libFuzzer entry point for the peer-link framing (Sources/HACore/Frame.swift): the length-
// prefixed body splitter `FrameBodyDecoder.nextBody` and the authenticator `FrameSealer.open`.
// Whatever opens decodes consistently; a tampered frame never opens; and a frame sealed with the
// key from fuzzer-chosen fields must open to exactly those fields, however it is chunked.
private let key = SymmetricKey(data: [UInt8](repeating: 0x42, count: 32))

@_cdecl("LLVMFuzzerTestOneInput")
public func frameFuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    guard let control = input.first else { return 0 }
    let chunk = Int(control) % 97 + 1

    // 1. Untrusted stream: split and open whatever comes.
    var opener = FrameSealer(key: key)
    var buffer = ByteBuffer()
    var offset = 1
    streaming: while offset < size {
        let n = min(chunk, size - offset)
        buffer.writeBytes(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: input[offset..<(offset + n)])))
        offset += n
        do {
            while let body = try FrameBodyDecoder.nextBody(&buffer) {
                precondition(body.readableBytes <= Frame.maxBodyBytes)
                let expected = opener.nextSequence
                // Seeds may hold frames sealed with the fuzz key; those must decode consistently.
                if case .success(let f) = opener.open(body) {
                    precondition(f.sequence == expected && opener.nextSequence == expected &+ 1)
                    precondition(f.payload.readableBytes == body.readableBytes - Frame.headerBytes - Frame.tagBytes)
                }
            }
        } catch {
            break streaming
        }
    }

    // 2. Round trip: seal fuzzer-chosen fields, feed in chunks, open.
    guard size >= 3 else { return 0 }
    let kind = input[1]
    let epoch = UInt64(input[2])
    let payload = ByteBuffer(bytes: input[3...])
    var sealer = FrameSealer(key: key, firstSequence: UInt64(control))
    var wire = ByteBuffer()
    sealer.seal(kind: kind, epoch: Epoch(epoch), payload: payload, into: &wire)
    var receiver = FrameSealer(key: key, firstSequence: UInt64(control))
    var incoming = ByteBuffer()
    var opened = 0
    while wire.readableBytes > 0 {
        var piece = wire.readSlice(length: min(chunk, wire.readableBytes))!
        incoming.writeBuffer(&piece)
        while let body = try! FrameBodyDecoder.nextBody(&incoming) {
            guard case .success(let frame) = receiver.open(body) else { preconditionFailure("own frame did not open") }
            precondition(frame.kind == kind && frame.epoch == Epoch(epoch) && frame.payload == payload)
            precondition(frame.sequence == UInt64(control))
            opened += 1
        }
    }
    precondition(opened == 1 && incoming.readableBytes == 0)
    // Flipping any byte of a sealed frame must make it fail to open.
    var tampered = ByteBuffer()
    var resealer = FrameSealer(key: key)
    resealer.seal(kind: kind, epoch: Epoch(epoch), payload: payload, into: &tampered)
    let at = 4 + Int(control) % (tampered.readableBytes - 4)
    tampered.setInteger(tampered.getInteger(at: at, as: UInt8.self)! ^ 0x01, at: at)
    if let body = try? FrameBodyDecoder.nextBody(&tampered) {
        var fresh = FrameSealer(key: key)
        if case .success = fresh.open(body) { preconditionFailure("a tampered frame opened") }
    }
    return 0
}
