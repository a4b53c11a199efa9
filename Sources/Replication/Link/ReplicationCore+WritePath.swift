import HACore
import NIOCore

/// The write path of `ReplicationCore`: admission (activity log, held requests), the ack
/// rule per write, I/O completions and failures, role changes, drain and stop.
extension ReplicationCore {
    // MARK: write path

    /// Returns false only for a request taken from the AL queue that still does not fit
    /// (the caller keeps it at the head, so writes enter the disk in submission order).
    @discardableResult
    mutating func submitWrite(_ req: Held, _ now: Instant, fromQueue: Bool = false) -> Bool {
        let (id, isDrain): (RequestID, Bool)
        switch req {
        case .write(let i, _, _, _, _): (id, isDrain) = (i, false)
        case .flush(let i, let d): (id, isDrain) = (i, d)
        }
        func refuse(_ e: VolumeError) -> Bool { out.append(isDrain ? .drained(id, e) : .complete(id, e)); return true }
        guard !stopped else { return refuse(.shuttingDown) }
        guard role == .primary else { return refuse(.notPrimary(master: nil)) }
        guard isDrain || !suspended else { return refuse(.shuttingDown) }
        if var l = link, !l.ready {
            l.held.append(req)
            link = l
            return true
        }
        let seq = nextSeq
        let following = link?.following ?? false
        let session = following ? link?.session : nil
        switch req {
        case let .flush(id, drain):
            issueBarrier(request: id, drain: drain)
        case let .write(id, op, offset, length, fua):
            let extents = ActivityLog.extents(offset: offset, length: length, extentBytes: settings.activityLogExtentBytes)
            if !fromQueue && !alWaiting.isEmpty { alWaiting.append(req); return true }
            var steps: [IOStep] = []
            switch al.begin(extents, tag: barriersIssued) {
            case .full:
                if fromQueue { return false }
                alWaiting.append(req)
                return true
            case .needsBarrier(let tag):
                // The log is full of extents whose writes are not yet durable on both nodes
                // (see `ActivityLog`): wait for a barrier that covers them, issuing one
                // unless a client flush or FUA write after them is already on its way.
                if !fromQueue { alWaiting.append(req) }
                if barriersIssued <= tag { issueBarrier(request: nil, drain: false) }
                return !fromQueue
            case .hot: break
            case .persist(let hot): steps.append(.writeAL(hot))
            }
            nextSeq += 1
            let cb = UInt64(settings.chunkBytes)
            let chunks = Int(offset / cb)..<(Int((offset + UInt64(length) - 1) / cb) + 1)
            writes[seq] = Write(seq: seq, request: id, isDrain: false, chunks: chunks, extents: extents, bytes: length, barrier: fua, open: true,
                                issued: eventNow, peerLost: !following, barrierTag: barriersIssued)
            if fua { barriersIssued += 1 }
            if !following { steps += markOutOfSync(chunks) }
            if let s = session {
                var flags: WriteFlags = fua ? [.fua] : []
                var data: ByteBuffer?
                switch op {
                case .data(let d): data = d
                case .zeroes(let dealloc): flags.insert(.zeroes); if dealloc { flags.insert(.mayDeallocate) }
                }
                steps.append(.send(s, .write(seq: seq, offset: offset, flags: flags, length: UInt32(length), data: data)))
            }
            switch op {
            case .data(let d): steps.append(.writeData(offset: offset, data: d))
            case .zeroes(let dealloc): steps.append(.writeZeroes(offset: offset, length: length, mayDeallocate: dealloc))
            }
            if fua { steps.append(.sync) }
            out.append(.io(IOBatch(steps: steps, then: .localWrite(seq: seq, queued: session != nil), failure: .localWrite(seq: seq, queued: false))))
        }
        return true
    }

    /// A flush: the peer's sync (when it follows) and ours, behind every write before it. A
    /// client's (`request`), a switchover drain's, or the activity log's own (request nil).
    mutating func issueBarrier(request: RequestID?, drain: Bool) {
        let following = link?.following ?? false
        let session = following ? link?.session : nil
        let seq = nextSeq
        nextSeq += 1
        writes[seq] = Write(seq: seq, request: request, isDrain: drain, chunks: 0..<0, extents: [], bytes: 0, barrier: true, open: true,
                            issued: eventNow, peerLost: !following, barrierTag: barriersIssued)
        barriersIssued += 1
        var steps: [IOStep] = []
        if let s = session { steps.append(.send(s, .flush(id: seq))) }
        steps.append(.sync)
        out.append(.io(IOBatch(steps: steps, then: .localWrite(seq: seq, queued: session != nil), failure: .localWrite(seq: seq, queued: false))))
    }

    /// Admits AL-queued writes in order while they fit (not while a handshake is open:
    /// they would land behind newer held writes).
    mutating func admitWaiting() {
        guard link?.ready ?? true else { return }
        while let first = alWaiting.first {
            alWaiting.removeFirst()
            if !submitWrite(first, .zero, fromQueue: true) {
                alWaiting.insert(first, at: 0)
                return
            }
        }
    }

    /// Marks chunks the peer will not get. A primary starts a new generation only once it may
    /// acknowledge writes the peer lacks (the arbitrator confirmed the peer outdated, so the
    /// gate no longer requires it): until then its unreplicated writes were never
    /// acknowledged, its data stays in the old generation, and after a failover it is a
    /// plain resync target (its dirty chunks included) instead of a false split brain.
    mutating func markOutOfSync<C: Sequence>(_ chunks: C) -> [IOStep] where C.Element == Int {
        var steps: [IOStep] = []
        if role == .primary && !gate.peerRequired && header.generations.bitmap.isNone {
            branchForUnreplicatedWrites()
            steps.append(.writeHeader(header))
        }
        let pages = bitmap.mark(chunks)
        if !pages.isEmpty { steps.append(.writeBitmapPages(pages.map { BitmapPage(index: $0, bytes: bitmap.pageBytes($0)) })) }
        return steps
    }

    mutating func evaluate(_ seq: UInt64, _ now: Instant) {
        guard var w = writes[seq] else { return }
        if w.open {
            let v = AckRule.verdict(localDone: w.localDone, confirmation: w.confirmation, peerLost: w.peerLost, bitmapDurable: w.bitmapDurable,
                                    barrier: w.barrier, protocol: settings.replicationProtocol, gate: gate, now: now)
            switch v {
            case .wait: break
            case .ack: w.open = false; finish(w, nil)
            case .fail(let e): w.open = false; finish(w, e)
            }
            writes[seq] = w
        }
        retireIfDone(seq)
    }

    mutating func finish(_ w: Write, _ e: VolumeError?) {
        guard let id = w.request else { return }
        out.append(w.isDrain ? .drained(id, e) : .complete(id, e))
    }

    mutating func evaluateAll(_ now: Instant) {
        for s in writes.keys.sorted() { evaluate(s, now) }
    }

    /// A write stops pinning its AL extents only when the peer has it or the bitmap durably
    /// records that it lacks it; the extent itself leaves the log only once a settled barrier
    /// made the write durable on both nodes (`ActivityLog`).
    mutating func retireIfDone(_ seq: UInt64) {
        guard let w = writes[seq], !w.open else { return }
        let settled = w.failedLocally || (w.localDone && (w.confirmation == .written || (w.peerLost && w.bitmapDurable)))
        guard settled else { return }
        // A settled barrier is durable here (its sync ran behind every earlier write) and at
        // the peer (its flush or FUA was confirmed), or the peer's lack of those writes is
        // durably in the bitmap: their AL extents may leave the log now.
        if w.barrier, !w.failedLocally { al.durable(throughBarrier: w.barrierTag) }
        if role == .primary, !w.peerLost, !w.failedLocally, w.confirmation == .written {
            if w.barrier {
                unflushedAtPeer = unflushedAtPeer.filter { $0.value > w.barrierTag }
            } else {
                for c in w.chunks { unflushedAtPeer[c] = max(unflushedAtPeer[c] ?? 0, w.barrierTag) }
            }
        }
        writes[seq] = nil
        al.end(w.extents)
        admitWaiting()
        checkDrained()
    }

    mutating func completed(_ c: IOCompletion, _ now: Instant) {
        switch c {
        case let .localWrite(seq, queued):
            guard var w = writes[seq] else { return }
            w.localDone = true
            w.bitmapDurable = true  // every metadata write issued before it on the queue is synced
            if queued && w.confirmation < .queued { w.confirmation = .queued }
            writes[seq] = w
            evaluate(seq, now)
        case .bitmapDurable(let seqs):
            for s in seqs { writes[s]?.bitmapDurable = true }
            evaluateAll(now)
        case .queuedToPeer(let seqs):
            for s in seqs {
                guard var w = writes[s], !w.peerLost, w.confirmation < .queued else { continue }
                w.confirmation = .queued
                writes[s] = w
                evaluate(s, now)
            }
        case .resyncChunkSent(let n):
            counters.resyncBytesSent += UInt64(n)
        case .targetChunkWritten(let n):
            targetRun?.doneBytes += UInt64(n)
        case .targetSynced(let s):
            targetSynced(s)
        case let .verifyCompared(chunk, match):
            if !match { targetMismatches.append(chunk) }
        }
    }

    mutating func ioFailed(_ c: IOCompletion?, _ why: String, _ errno: Int32, _ now: Instant) {
        log(.critical, "disk failure: \(why)")
        out.append(.emit(.diskFailure(why)))
        guard case .localWrite(let seq, _)? = c, var w = writes[seq] else { return }
        w.failedLocally = true
        if w.open {
            w.open = false
            finish(w, errno == 28 /* ENOSPC */ ? .noSpace : .io(errno: errno))
        }
        writes[seq] = w
        retireIfDone(seq)
    }

    mutating func failAllOpen(_ e: VolumeError) {
        for s in writes.keys.sorted() {
            guard var w = writes[s], w.open else { continue }
            w.open = false
            writes[s] = w
            finish(w, e)
            retireIfDone(s)
        }
        let queued = alWaiting
        let held = link?.held ?? []
        alWaiting = []
        link?.held = []
        for h in queued { submitWrite(h, .zero, fromQueue: true) }  // they see the new role / stopped and fail
        for h in held { submitWrite(h, .zero) }
    }

    // MARK: roles

    mutating func becomeSecondary(_ epoch: Epoch, _ now: Instant) {
        // Only a primary tracks what its peer has not synced. Those chunks stay marked: the
        // link may already be dead without this node knowing (a paused primary steps down
        // before it sees the link drop), and if the peer lost power they exist nowhere else.
        // A stale bit costs one chunk of resync. (Whole-node simulator seed 40: the peer came
        // back "in sync" without a write it had lost.)
        // Writes still in flight may reach this disk (the I/O queue runs on) without ever
        // reaching the peer's: their chunks may differ too (simulator seed 5366: a write the
        // demotion failed was on the old primary's disk, never on the new one's).
        var marks = Set(unflushedAtPeer.keys)
        for w in writes.values where !w.isDrain && w.confirmation < .written { marks.formUnion(w.chunks) }
        if !marks.isEmpty { persistPages(bitmap.mark(marks.sorted())) }
        unflushedAtPeer = [:]
        roleEpoch = max(roleEpoch, epoch)
        promisedEpoch = max(promisedEpoch, epoch)
        header.epoch = max(header.epoch, epoch)
        if role == .primary {
            log(.notice, "secondary in epoch \(epoch)")
            // A crash from here on is a secondary's crash: its activity log is still recovered,
            // but it must not make this node the sync source as a "crashed primary" (simulator
            // seed 229: a node that had handed over, then lost power, overwrote its successor's
            // newer write).
            header.flags.insert(.steppedDown)
        }
        role = .secondary
        suspended = false
        failAllOpen(.notPrimary(master: nil))
        persistHeader()
    }

    mutating func drain(_ id: RequestID, _ now: Instant) {
        guard role == .primary else { return out.append(.drained(id, .notPrimary(master: nil))) }
        suspended = true
        drainWaiting.append(id)
        checkDrained()
    }

    mutating func cancelDrain() {
        let waiting = drainWaiting
        drainWaiting = []
        for id in waiting { out.append(.drained(id, .invalid("switchover cancelled; this node stays primary"))) }
        guard suspended, role == .primary, !stopped else { return }
        suspended = false
        log(.notice, "switchover cancelled: writes resume")
    }

    mutating func checkDrained() {
        guard !drainWaiting.isEmpty, !writes.values.contains(where: { $0.open && !$0.isDrain }), alWaiting.isEmpty else { return }
        let ids = drainWaiting
        drainWaiting = []
        for id in ids {
            guard let l = link, l.following else {
                out.append(.drained(id, .invalid("peer is not in sync; switchover needs a connected, up-to-date peer")))
                continue
            }
            // A flush round trip proves the peer has every write before it.
            _ = submitWrite(.flush(id, drain: true), .zero)
        }
    }

    mutating func stop(_ now: Instant) {
        guard !stopped else { return }
        stopped = true
        if let l = link { dropLink(l, reason: "volume stopped"); out.append(.close(l.session)) }
        failAllOpen(.shuttingDown)
        header.flags.insert(.cleanShutdown)
        header.flags.remove(.wasPrimary)
        out.append(.io(IOBatch(steps: [.sync, .writeBitmap(bitmap), .writeAL([]), .writeHeader(header)], then: nil, failure: nil, ack: nil)))
        log(.info, "replicated volume stopped cleanly")
    }
}
