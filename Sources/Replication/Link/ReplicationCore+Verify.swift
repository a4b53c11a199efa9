import HACore
import NIOCore

/// Online verify of `ReplicationCore`: chunk hashes compared on the peer, mismatches
/// reported (and with `repair`, resynced).
extension ReplicationCore {
    // MARK: verify

    mutating func startVerify(repair: Bool) {
        guard let l = link, case .inSync? = l.decision, verify == nil else {
            return log(.warning, "verify needs a connected peer in sync")
        }
        log(.info, "online verify\(repair ? " with repair" : "") started over \(settings.chunkCount) chunks")
        verify = VerifyRun(repair: repair)
        pumpVerify()
    }

    mutating func pumpVerify() {
        guard var v = verify, let l = link else { return }
        defer { verify = v }
        while v.inFlight < settings.windowChunks && v.next < settings.chunkCount {
            let c = v.next
            v.next += 1
            v.inFlight += 1
            out.append(.io(IOBatch(steps: [.sendChunkHash(l.session, chunk: c, offset: UInt64(c) * UInt64(settings.chunkBytes), length: chunkLength(c))],
                                   then: nil, failure: nil, ack: nil)))
        }
    }

    mutating func verifyReplied(_ chunk: Int, _ match: Bool) {
        guard var v = verify else { return }
        v.inFlight -= 1
        if !match { v.mismatches.append(chunk) }
        verify = v
        guard v.next >= settings.chunkCount && v.inFlight == 0 else { return pumpVerify() }
        verify = nil
        let mm = v.mismatches.sorted()
        counters.lastVerifyMismatches = mm
        log(.notice, "verify finished: \(mm.count) of \(settings.chunkCount) chunks differ\(mm.isEmpty ? "" : ": \(mm.prefix(20))")")
        if let l = link { out.append(.send(l.session, .verifyEnd(chunks: UInt64(settings.chunkCount)))) }
        out.append(.emit(.verifyFinished(mismatchedChunks: mm)))
        if v.repair && !mm.isEmpty { requestResync(.zero) }
    }
}
