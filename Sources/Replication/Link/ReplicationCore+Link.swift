import HACore
import NIOCore

/// The link of `ReplicationCore`: session lifecycle, inbound frames and the handshake that
/// runs the sync decision.
extension ReplicationCore {
    // MARK: link lifecycle

    mutating func linkUp(_ session: SessionID, _ node: NodeID) {
        guard !stopped, node == settings.peer else {
            log(.warning, "refused replication session from \(node)")
            return out.append(.close(session))
        }
        if let old = link {
            log(.info, "new replication session replaces the old one")
            dropLink(old, reason: "replaced by a new session")
            out.append(.close(old.session))
        }
        // The bitmap follows the handshake in pieces: a fragmented map of a large volume is
        // bigger than one frame may be.
        let pages = LinkMessage.dirtyBitmapFrames(bitmap)
        let pageCount = pages.reduce(0) { n, m in if case .dirtyBitmap(let p) = m { return n + p.count }; return n }
        let hs = LinkHandshake(sizeBytes: settings.sizeBytes, chunkBytes: UInt32(settings.chunkBytes), generations: header.generations,
                               diskState: header.diskState, role: role, crashedPrimary: header.flags.contains(.crashRecoveryPending) && !header.flags.contains(.steppedDown),
                               crashCopyOnPeer: crashCopyOnPeer,
                               discardLocal: header.flags.contains(.discardLocal), dirtyChunks: UInt64(bitmap.setCount), dirtyPages: UInt32(pageCount),
                               fresh: header.flags.contains(.fresh), emptyFresh: emptyFresh && header.flags.contains(.fresh),
                               assumeClean: header.flags.contains(.assumeClean), wasPrimary: primarySinceOpen,
                               primaryEpoch: header.primaryEpoch)
        link = Link(session: session, sent: hs)
        counters.linksEstablished += 1
        log(.info, "replication link up with \(node); handshake sent (generation \(hs.generations.current), \(hs.diskState), \(bitmap.setCount) dirty chunks)")
        out.append(.send(session, .handshake(hs)))
        for m in pages { out.append(.send(session, m)) }
    }

    mutating func linkDown(_ session: SessionID?, _ why: String, _ now: Instant) {
        guard let session else {
            if counters.lastLinkError != why { log(.warning, "replication session failed: \(why)") }
            counters.lastLinkError = why
            return
        }
        guard let l = link, l.session == session else { return }
        log(.warning, "replication link down: \(why)")
        if counters.splitBrain == nil { counters.lastLinkError = why }
        dropLink(l, reason: why)
    }

    /// The peer no longer follows: every write it has not confirmed goes into the bitmap.
    mutating func dropLink(_ l: Link, reason: String) {
        guard link?.session == l.session else { return }
        let held = link?.held ?? []
        link = nil
        resync = nil
        targetRun = nil
        plantedHeldResyncChunk = nil  // PLANTED BUG path only
        if verify != nil { log(.warning, "verify aborted: \(reason)"); verify = nil }
        let unconfirmed = writes.values.filter { !$0.peerLost && $0.confirmation < .written && !$0.failedLocally }.map(\.seq).sorted()
        // Written at the peer but not yet synced there: lost if the peer lost power.
        var chunks = Set(unflushedAtPeer.keys)
        unflushedAtPeer = [:]
        if !unconfirmed.isEmpty || !chunks.isEmpty {
            var steps: [IOStep] = []
            for s in unconfirmed {
                writes[s]!.peerLost = true
                writes[s]!.bitmapDurable = false
                chunks.formUnion(writes[s]!.chunks)
            }
            steps += markOutOfSync(chunks.sorted())
            out.append(.io(IOBatch(steps: steps, then: .bitmapDurable(unconfirmed), failure: nil, ack: nil)))
        }
        admitWaiting()
        for h in held { submitWrite(h, .zero) }
    }

    mutating func refuse(_ l: Link, _ why: String) {
        // A refusal repeats on every redial until something changes: say it once.
        if counters.lastLinkError != why { log(.error, "replication link refused: \(why)") }
        counters.lastLinkError = why
        out.append(.send(l.session, .refuse(why)))
        dropLink(l, reason: why)
        out.append(.close(l.session))
    }

    // MARK: inbound frames

    mutating func frame(_ session: SessionID, _ kind: UInt8, _ epoch: Epoch, _ payload: ByteBuffer, _ now: Instant) {
        guard let l = link, l.session == session else { return }
        let msg: LinkMessage
        switch LinkMessage.decode(kind: kind, payload: payload) {
        case .success(let m): msg = m
        case .failure(let e): return refuse(l, "\(e)")
        }
        if EpochFence.isFenced(msg.kind), !EpochFence.admits(frameEpoch: epoch, promised: promisedEpoch) {
            counters.fencedFrames += 1
            return refuse(l, "fenced \(msg.kind) frame from epoch \(epoch); this node promised epoch \(promisedEpoch)")
        }
        switch msg {
        case .handshake, .refuse, .dirtyBitmap: break
        default: if !l.ready { return refuse(l, "\(msg.kind) frame before the handshake") }
        }
        if case .handshake = msg, role == .secondary, epoch > promisedEpoch {
            // A secondary promises at least the epoch its peer speaks in: otherwise, as a sync
            // source, its resync frames would be fenced by a target that promised a newer epoch
            // (a failed candidacy) while no master exists to raise this node's promise — a
            // resync that never starts. Refusing frames older than the peer's own epoch costs
            // nothing: the peer is the only other data node. (Whole-node simulator seed 26.)
            promisedEpoch = epoch
            header.epoch = max(header.epoch, epoch)
            persistHeader()
        }
        switch msg {
        case .handshake(let hs): handshake(hs, l, now)
        case .dirtyBitmap(let pages): peerBitmapPages(pages, l, now)
        case .refuse(let why):
            log(.error, "peer refused the link: \(why)")
            counters.lastLinkError = "peer: \(why)"
            dropLink(l, reason: why)
            out.append(.close(l.session))
        case let .write(seq, offset, flags, length, data):
            guard role == .secondary else { return refuse(l, "write frame while this node is primary") }
            if case .becomeSource? = l.decision { return refuse(l, "write frame from the sync target") }
            guard Int(length) <= settings.maximumWriteBytes, offset + UInt64(length) <= settings.sizeBytes else {
                return refuse(l, "write frame outside the volume: \(offset)+\(length)")
            }
            if settings.replicationProtocol == .b { out.append(.send(session, .writeAck(seq: seq, stage: .received, status: 0))) }
            if verify != nil, length > 0 {
                let cb = UInt64(settings.chunkBytes)
                verifyRaced(Int(offset / cb)..<(Int((offset + UInt64(length) - 1) / cb) + 1))
            }
            var steps: [IOStep] = []
            if flags.contains(.zeroes) {
                steps.append(.writeZeroes(offset: offset, length: Int(length), mayDeallocate: flags.contains(.mayDeallocate)))
            } else if let data {
                steps.append(.writeData(offset: offset, data: data))
            }
            if flags.contains(.fua) { steps.append(.sync) }
            out.append(.io(IOBatch(steps: steps, then: nil, failure: nil, ack: (session, .write(seq: seq)))))
            // PLANTED BUG `resyncOverNewerWrite` (test only): the held chunk lands after this write.
            if let held = plantedHeldResyncChunk { plantedHeldResyncChunk = nil; out.append(.io(held)) }
        case let .writeAck(seq, stage, status):
            if status != 0 { return refuse(l, "peer failed to write (errno \(status))") }
            if var w = writes[seq] {
                let c: PeerConfirmation = stage == .written ? .written : .received
                if c > w.confirmation { w.confirmation = c; writes[seq] = w }
                evaluate(seq, now)
            }
        case .flush(let id):
            guard role == .secondary else { return refuse(l, "flush frame while primary") }
            out.append(.io(IOBatch(steps: [.sync], then: nil, failure: nil, ack: (session, .flush(id: id)))))
        case let .flushAck(id, status):
            if status != 0 { return refuse(l, "peer failed to flush (errno \(status))") }
            if writes[id] != nil { writes[id]!.confirmation = .written; evaluate(id, now) }
        case let .resyncData(chunk, data):
            let c = Int(clamping: chunk)
            guard role == .secondary, c < settings.chunkCount, data.readableBytes == chunkLength(c) else {
                return refuse(l, "bad resync chunk \(chunk) (\(data.readableBytes) bytes)")
            }
            if targetRun == nil { targetRun = TargetRun(totalBytes: 0) }  // an on-demand repair of an in-sync peer
            verifyRaced(c..<c + 1)
            // The ack lets the source clear the chunk's bit for good, so the chunk must be
            // durable first: a target that loses power mid-resync resumes from the bits left,
            // and a chunk acked from the page cache would never be sent again. (The I/O queue
            // merges the syncs of a burst of chunks into one.)
            let batch = IOBatch(steps: [.writeData(offset: UInt64(c) * UInt64(settings.chunkBytes), data: data), .sync],
                                then: .targetChunkWritten(bytes: data.readableBytes), failure: nil, ack: (session, .resync(chunk: chunk)))
            if settings.plantedBugs.contains(.resyncOverNewerWrite) {
                // PLANTED BUG (test only): hold each chunk back until the next frame.
                if let held = plantedHeldResyncChunk { out.append(.io(held)) }
                plantedHeldResyncChunk = batch
            } else {
                out.append(.io(batch))
            }
        case .resyncZeroes(let chunk):
            let c = Int(clamping: chunk)
            guard role == .secondary, c < settings.chunkCount else { return refuse(l, "bad resync chunk \(chunk) (zeroes)") }
            if targetRun == nil { targetRun = TargetRun(totalBytes: 0) }
            verifyRaced(c..<c + 1)
            let len = chunkLength(c)
            out.append(.io(IOBatch(steps: [.writeZeroes(offset: UInt64(c) * UInt64(settings.chunkBytes), length: len, mayDeallocate: true), .sync],
                                   then: .targetChunkWritten(bytes: len), failure: nil, ack: (session, .resync(chunk: chunk)))))
        case let .resyncAck(chunk, status):
            if status != 0 { return refuse(l, "peer failed to write resync chunk \(chunk) (errno \(status))") }
            resyncAcked(Int(clamping: chunk), now)
        case .resyncDone(let gens):
            guard role == .secondary else { return refuse(l, "resync done while primary") }
            pendingTargetGenerations = gens
            if let held = plantedHeldResyncChunk { plantedHeldResyncChunk = nil; out.append(.io(held)) }  // PLANTED BUG path only
            out.append(.io(IOBatch(steps: [.sync], then: .targetSynced(session), failure: nil, ack: nil)))
        case .resyncFinished: sourceFinish(now)
        case let .verifyRequest(chunk, hash):
            let c = Int(clamping: chunk)
            guard c < settings.chunkCount else { return refuse(l, "verify of chunk \(chunk) outside the volume") }
            if c == 0 { targetMismatches = [] }
            out.append(.io(IOBatch(steps: [.compareChunkHash(session, chunk: c, offset: UInt64(c) * UInt64(settings.chunkBytes),
                                                             length: chunkLength(c), sha256: hash)], then: nil, failure: nil, ack: nil)))
        case let .verifyReply(chunk, match): verifyReplied(Int(clamping: chunk), match)
        case .verifyEnd:
            let mm = targetMismatches.sorted()
            counters.lastVerifyMismatches = mm
            log(.info, "verify by peer finished: \(mm.count) mismatched chunks")
            out.append(.emit(.verifyFinished(mismatchedChunks: mm)))
        case .resyncRequest(let runs):
            guard isRepairSource(l) else { return log(.warning, "peer asked for a resync this node cannot source") }
            let pages = bitmap.mark(runs.flatMap { Array($0.chunks) })
            persistPages(pages)
            startResync(now)
        }
    }

    mutating func handshake(_ peer: LinkHandshake, _ l0: Link, _ now: Instant) {
        var l = l0
        guard l.peer == nil else { return refuse(l, "second handshake") }
        l.peer = peer
        // The peer's bitmap follows in pages when both sides map the same chunks; with any
        // other geometry the decision refuses the link, and no page is needed.
        if peer.dirtyPages > 0 || peer.dirtyChunks > 0, peer.sizeBytes == settings.sizeBytes, Int(peer.chunkBytes) == settings.chunkBytes {
            let map = DirtyBitmap(chunkCount: settings.chunkCount)
            guard peer.dirtyPages > 0, Int(peer.dirtyPages) <= map.pageCount, peer.dirtyChunks > 0, peer.dirtyChunks <= UInt64(settings.chunkCount) else {
                return refuse(l, "handshake announces \(peer.dirtyPages) bitmap pages and \(peer.dirtyChunks) dirty chunks for \(settings.chunkCount) chunks")
            }
            l.peerBitmap = map
            l.pagesAwaited = Int(peer.dirtyPages)
            link = l
            return
        }
        decide(l, now)
    }

    /// A piece of the peer's dirty bitmap; the last one lets the sync decision run.
    mutating func peerBitmapPages(_ pages: [BitmapPage], _ l0: Link, _ now: Instant) {
        var l = l0
        guard let peer = l.peer, l.decision == nil, var map = l.peerBitmap, pages.count <= l.pagesAwaited else {
            return refuse(l, "dirty bitmap frame outside the handshake")
        }
        for p in pages {
            guard map.merge(page: p.index, bytes: p.bytes) else {
                return refuse(l, "dirty bitmap page \(p.index) outside the volume's \(map.pageCount) pages")
            }
        }
        l.pagesAwaited -= pages.count
        l.peerBitmap = map
        link = l
        guard l.pagesAwaited == 0 else { return }
        guard UInt64(map.setCount) == peer.dirtyChunks else {
            return refuse(l, "the peer's dirty bitmap holds \(map.setCount) chunks; its handshake said \(peer.dirtyChunks)")
        }
        decide(l, now)
    }

    /// The sync decision, once the peer's handshake and every page of its bitmap are in.
    mutating func decide(_ l0: Link, _ now: Instant) {
        var l = l0
        guard let peer = l.peer else { return }
        let peerDirty = l.peerBitmap ?? DirtyBitmap(chunkCount: settings.chunkCount)
        l.peerBitmap = nil
        let mine = l.sent
        let me = SyncSide(node: settings.me, generations: mine.generations, diskState: mine.diskState, role: mine.role,
                          hasDirtyChunks: mine.dirtyChunks > 0, crashedPrimary: mine.crashedPrimary, crashCopyOnPeer: mine.crashCopyOnPeer, discardLocal: mine.discardLocal,
                          sizeBytes: mine.sizeBytes, chunkBytes: Int(mine.chunkBytes), fresh: mine.fresh, emptyFresh: mine.emptyFresh, assumeClean: mine.assumeClean, wasPrimary: mine.wasPrimary, primaryEpoch: mine.primaryEpoch)
        let them = SyncSide(node: settings.peer, generations: peer.generations, diskState: peer.diskState, role: peer.role,
                            hasDirtyChunks: peer.dirtyChunks > 0, crashedPrimary: peer.crashedPrimary, crashCopyOnPeer: peer.crashCopyOnPeer, discardLocal: peer.discardLocal,
                            sizeBytes: peer.sizeBytes, chunkBytes: Int(peer.chunkBytes), fresh: peer.fresh, emptyFresh: peer.emptyFresh, assumeClean: peer.assumeClean, wasPrimary: peer.wasPrimary, primaryEpoch: peer.primaryEpoch)
        var d = SyncDecision.decide(me: me, peer: them)
        if settings.plantedBugs.contains(.freshMetadataTrusted) {
            // PLANTED BUG (test only): a fresh disk is taken for an up-to-date copy of the peer.
            switch d {
            case .becomeTarget where mine.fresh: d = .adoptClean(peer.generations.current)
            case .becomeSource where peer.fresh: d = .adoptClean(mine.generations.current)
            default: break
            }
        }
        counters.peerDiskState = peer.diskState
        log(.info, "sync decision with \(settings.peer): \(d) (mine \(mine.generations.current)/\(mine.generations.bitmap), peer \(peer.generations.current)/\(peer.generations.bitmap))")
        switch d {
        case .splitBrain(let why):
            link = l
            if counters.splitBrain != why {
                log(.critical, "SPLIT BRAIN, link refused, both stores left untouched: \(why)")
                out.append(.emit(.splitBrain(why)))
            }
            counters.splitBrain = why
            dropLink(l, reason: "split brain")
            out.append(.close(l.session))
            return
        case .refuse(let why):
            link = l
            return refuse(l, why)
        case .inSync:
            // Same bytes as the peer: up to date again if the peer is (never from an outdated peer).
            if (header.diskState == .outdated && peer.diskState == .upToDate) || header.flags.contains(.crashRecoveryPending) {
                if peer.diskState == .upToDate { header.diskState = .upToDate }
                header.flags.remove(.crashRecoveryPending)
                persistHeader()
            }
        case .adoptClean(let g):
            if header.generations.current != g { header.generations = DataGenerations(current: g) }
            header.diskState = .upToDate
            header.flags.remove(.fresh)
            header.flags.remove(.assumeClean)
            emptyFresh = false
            persistHeader()
            log(.notice, "no data to move: up to date in generation \(g) together with \(settings.peer)")
            l.peer?.diskState = .upToDate
            counters.peerDiskState = .upToDate
            d = .inSync
        case .becomeSource(let scope):
            var pages = bitmap.merge(peerDirty)
            if scope == .full {
                // Record the relation so an interrupted full sync resumes as a bitmap sync.
                if !header.generations.bitmap.isNone { header.generations.pushHistory(header.generations.bitmap) }
                header.generations.bitmap = peer.generations.current
                bitmap.markAll()
                pages = Array(0..<bitmap.pageCount)
            }
            persistHeader()
            persistPages(pages)
        case .becomeTarget(let scope):
            header.diskState = .inconsistent
            header.flags.remove(.fresh)  // the store is about to hold the peer's data
            emptyFresh = false
            syncSourceDisk = peer.diskState
            persistHeader()
            var union = bitmap
            union.merge(peerDirty)
            if scope == .full { union.markAll() }
            targetRun = TargetRun(totalBytes: bytes(of: union))
            log(.notice, "resync target: \(targetRun!.totalBytes) bytes to receive from \(settings.peer)")
        }
        counters.splitBrain = nil
        l.decision = d
        let held = l.held
        l.held = []
        link = l
        if case .becomeSource = d { startResync(now) }
        if case .inSync = d, role == .primary { peerHoldsWritesItLost() }
        admitWaiting()
        for h in held { submitWrite(h, now) }
        evaluateAll(now)
    }
}
