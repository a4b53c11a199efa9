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
            v.hashing.insert(c)
            out.append(.io(IOBatch(steps: [.sendChunkHash(l.session, chunk: c, offset: UInt64(c) * UInt64(settings.chunkBytes), length: chunkLength(c))],
                                   then: nil, failure: nil, ack: nil)))
        }
    }

    /// Data from the peer (a write or resync chunk) for `chunks` arrived while this node
    /// verifies. A verify run by the secondary travels against the write stream: its hash of
    /// chunk c was read before this write lands here, while the primary, which wrote first,
    /// compares its new bytes — a false mismatch. So a mismatch of a chunk written while its
    /// hash was in flight is not believed; the chunk is hashed again (behind this write on
    /// the I/O queue). A match stays true: the same write lands on both copies. (Whole-node
    /// simulator seed 693: every disk-repair round found one chunk the primary had just
    /// written, the repair gave up after five rounds and the node stayed outdated for good.)
    mutating func verifyRaced(_ chunks: Range<Int>) {
        guard var v = verify, !v.hashing.isEmpty else { return }
        for c in chunks where v.hashing.contains(c) { v.raced.insert(c) }
        verify = v
    }

    mutating func verifyReplied(_ chunk: Int, _ match: Bool) {
        guard var v = verify, let l = link else { return }
        v.hashing.remove(chunk)
        if v.raced.remove(chunk) != nil && !match {
            // Raced with a write from the peer (see `verifyRaced`): hash it again.
            v.hashing.insert(chunk)
            verify = v
            return out.append(.io(IOBatch(steps: [.sendChunkHash(l.session, chunk: chunk, offset: UInt64(chunk) * UInt64(settings.chunkBytes),
                                                                 length: chunkLength(chunk))], then: nil, failure: nil, ack: nil)))
        }
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
