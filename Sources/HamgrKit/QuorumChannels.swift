import Crypto
import HAShell
import Logging
import NIOCore
import Quorum

/// Names of the channels that share a node's replication address (routed by the hello).
enum ChannelName {
    static let quorum = "quorum"
    static let replication = "replication"
}

/// Frame kind of a quorum message on a "quorum" channel.
let quorumMessageFrameKind: UInt8 = 1

extension PeerConnection {
    func send(_ message: QuorumMessage, epoch: Epoch) {
        send(kind: quorumMessageFrameKind, epoch: epoch, payload: ByteBuffer(bytes: message.encoded()))
    }
}

extension Frame {
    /// Decodes a quorum frame; nil (and the reason) for anything else.
    func quorumMessage() -> Result<QuorumMessage, Error> {
        guard kind == quorumMessageFrameKind else {
            return .failure(ConfigError(key: "frame.kind", message: "unexpected frame kind \(kind) on a quorum channel"))
        }
        return Result { try QuorumMessage.decode(Array(payload.readableBytesView)) }
    }
}
