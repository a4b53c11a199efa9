import HACore
import NIOCore

/// Resync of `ReplicationCore`: the source's paced pass over the bitmap, the target's
/// completion, on-demand repair and split-brain resolution.
extension ReplicationCore {
    // MARK: resync

    /// A new resync bandwidth cap (a reload of `volume.resync_rate`). A resync in progress
    /// goes on at the new rate from now; later ones start at it.
    public mutating func setResyncRate(_ bytesPerSecond: Int, now: Instant) -> [CoreAction] {
        out = []
        eventNow = max(eventNow, now)
        let rate = max(1, bytesPerSecond)
        guard rate != settings.resyncRateBytesPerSecond else { return out }
        settings.resyncRateBytesPerSecond = rate
        if var r = resync {
            r.throttle = ResyncThrottle(bytesPerSecond: rate, chunkBytes: settings.chunkBytes)
            resync = r
            log(.notice, "resync rate now ≤ \(rate) B/s")
            pumpResync(now)
        }
        noteChanges()
        return out
    }

    func isRepairSource(_ l: Link) -> Bool {
        guard header.diskState == .upToDate else { return false }
        if role == .primary { return true }
        if l.peer?.role == .primary { return false }
        return settings.me < settings.peer
    }

    mutating func startResync(_ now: Instant) {
        guard resync == nil else { return pumpResync(now) }
        let total = bytes(of: bitmap)
        resync = ResyncRun(cursor: ResyncCursor(window: settings.windowChunks),
                           throttle: ResyncThrottle(bytesPerSecond: settings.resyncRateBytesPerSecond, chunkBytes: settings.chunkBytes),
                           totalBytes: total)
        log(.notice, "resync source: \(bitmap.setCount) chunks (\(total) bytes) to \(settings.peer) at ≤ \(settings.resyncRateBytesPerSecond) B/s")
        out.append(.emit(.resyncProgress(done: 0, total: total)))
        // The target will be called up to date with the bytes this node reads now, some of
        // which may sit in its volatile cache (a backup's replicated writes are not synced
        // until a flush). Sync first, ahead of every chunk read on the I/O queue: a power cut
        // of this node after the resync must not leave it different from its target with no
        // bit set on either side (simulator seed 326: the backup, source of a crashed
        // master's extents under C, lost a synced-nowhere zero write it had just sent).
        out.append(.io(IOBatch(steps: [.sync], then: nil, failure: nil, ack: nil)))
        pumpResync(now)
    }

    mutating func pumpResync(_ now: Instant) {
        guard var r = resync, let l = link, !r.finishing else { return }
        defer { resync = r }
        while r.cursor.inFlight.count < settings.windowChunks {
            if bitmap.nextSet(from: r.cursor.next) == nil { break }
            if let wait = r.throttle.take(settings.chunkBytes, now: now) {
                if !r.wakeScheduled { r.wakeScheduled = true; out.append(.wakeUp(after: wait)) }
                return
            }
            guard let chunk = r.cursor.take(from: bitmap) else { break }
            let len = chunkLength(chunk)
            // Read on the I/O queue: after every write issued before it, before every later one.
            out.append(.io(IOBatch(steps: [.sendChunk(l.session, chunk: chunk, offset: UInt64(chunk) * UInt64(settings.chunkBytes), length: len)],
                                   then: .resyncChunkSent(bytes: len), failure: nil, ack: nil)))
        }
        if r.cursor.passComplete(bitmap: bitmap) {
            r.finishing = true
            out.append(.io(IOBatch(steps: [.send(l.session, .resyncDone(header.generations))], then: nil, failure: nil, ack: nil)))
        }
    }

    mutating func resyncAcked(_ chunk: Int, _ now: Instant) {
        guard var r = resync, r.cursor.acked(chunk) else { return }
        bitmap.clear(chunk)
        r.doneBytes += UInt64(chunkLength(chunk))
        resync = r
        out.append(.emit(.resyncProgress(done: r.doneBytes, total: r.totalBytes)))
        pumpResync(now)
    }

    mutating func sourceFinish(_ now: Instant) {
        guard let r = resync, r.finishing else { return }
        resync = nil
        if !header.generations.bitmap.isNone {
            header.generations.pushHistory(header.generations.bitmap)
            header.generations.bitmap = .none
        }
        header.flags.remove(.crashRecoveryPending)
        link?.decision = .inSync
        counters.peerDiskState = .upToDate
        counters.resyncDoneBytes = r.doneBytes
        counters.resyncTotalBytes = r.totalBytes
        persistHeader(withBitmap: true)
        log(.notice, "resync finished: \(r.doneBytes) bytes; \(settings.peer) is up to date")
        // Writes that lost the peer were all issued before this resync began (while the link
        // follows, writes are replicated): their chunks were in the bitmap, the resync read
        // them after the writes (the I/O queue runs in order) and the target synced them
        // before saying it finished. The peer has them durably, as protocol C would: without
        // this, a write caught by a short link drop waited for an outdate mark that a peer
        // back in sync never gets (found by LinkSecurityTests' tampered-frame cases).
        peerHoldsWritesItLost()
        evaluateAll(now)
    }

    /// The peer is back in sync with every chunk a write that lost it touched (a finished
    /// resync, or a handshake that found nothing dirty on either side): such writes count as
    /// written there durably. A flush that lost the peer touches no chunk; with nothing
    /// dirty, every write before it that the peer had not synced would have been marked
    /// (transfer log), so the peer holds them all durably (simulator seeds 3183, 4667,
    /// 5393: a flush refused by the peer's epoch fence, the link back in sync at once, the
    /// flush waiting for an outdate mark that never came).
    mutating func peerHoldsWritesItLost() {
        for seq in writes.keys.sorted() {
            guard var w = writes[seq], w.peerLost, !w.failedLocally, !w.chunks.contains(where: bitmap.isSet) else { continue }
            w.peerLost = false
            w.confirmation = .written
            writes[seq] = w
        }
    }

    mutating func targetSynced(_ session: SessionID) {
        guard let l = link, l.session == session, let gens = pendingTargetGenerations else { return }
        pendingTargetGenerations = nil
        if header.generations.current != gens.current { header.generations.pushHistory(header.generations.current) }
        header.generations.current = gens.current
        header.generations.bitmap = .none
        header.diskState = syncSourceDisk == .upToDate ? .upToDate : .outdated
        header.flags.remove(.crashRecoveryPending)
        header.flags.remove(.discardLocal)
        bitmap.clearAll()
        link?.decision = .inSync
        if let t = targetRun {
            counters.resyncDoneBytes = t.doneBytes
            counters.resyncTotalBytes = max(t.totalBytes, t.doneBytes)
        }
        targetRun = nil
        out.append(.io(IOBatch(steps: [.writeBitmap(bitmap), .writeHeader(header), .send(session, .resyncFinished)], then: nil, failure: nil, ack: nil)))
        log(.notice, "resync target finished: up to date in generation \(gens.current)")
    }

    mutating func requestResync(_ now: Instant) {
        guard let l = link, l.ready else { return log(.warning, "resync needs a connected peer") }
        let mismatches = counters.lastVerifyMismatches ?? []
        if isRepairSource(l) {
            persistPages(bitmap.mark(mismatches))
            startResync(now)
        } else {
            let runs = ChunkRun.runs(of: Array(Set(mismatches + bitmap.setChunks)).sorted())
            out.append(.send(l.session, .resyncRequest(runs)))
        }
    }

    mutating func resolveSplitBrain(_ discardLocal: Bool) {
        if discardLocal {
            guard role == .secondary else { return log(.error, "a primary cannot discard its data; demote it first") }
            header.flags.insert(.discardLocal)
            persistHeader()
            log(.warning, "split brain: this node's changes will be discarded on the next connect")
        }
        counters.splitBrain = nil
        if let l = link { dropLink(l, reason: "split brain resolution"); out.append(.close(l.session)) }
    }
}
