import HACore
import XCTest
@testable import Quorum

/// One test per rule of design.md §2 (in the manner of raft_paper_test.go), each citing it.
final class ProtocolRuleTests: XCTestCase {
    typealias H = Harness
    let gen1 = DataGenerations(current: GenerationID(1))

    // MARK: §2 Lease

    /// "A voter that knows this master for this epoch grants, and records leaseExpiry = localNow + lease."
    func testVoterGrantsRenewalToKnownMasterAndHoldsLeaseOnItsOwnClock() {
        let h = H()
        h.electA()
        XCTAssertEqual(h.status(H.b).master, H.a)
        let req = VoteRequest(epoch: Epoch(2), round: 9, disk: .upToDate, generations: gen1)
        let before = h.handle(H.b, .received(from: H.a, .renew(epoch: Epoch(1), seq: 99, generation: GenerationID(1))))
        XCTAssertTrue(before.sent.contains { if case .renewReply(_, 99, true, _) = $0.message { return true }; return false })
        // b will not stand itself before that grant has run out on its own clock.
        XCTAssertTrue(h.handle(H.b, .tick, at: h.now + h.t.lease - .milliseconds(1)).sent.allSatisfy { if case .voteRequest = $0.message { return false }; return true })
        // The arbitrator: the renewal is granted and its lease runs `lease` from receipt.
        let w = h.arbitrate(from: H.a, .renew(epoch: Epoch(1), seq: 100, generation: GenerationID(1)))
        XCTAssertTrue(w.contains { if case .send(_, _, .renewReply(_, 100, true, _)) = $0 { return true }; return false })
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.leaseExpiry, h.now + h.t.lease)
        let refused = h.arbitrate(from: H.b, .voteRequest(req), at: h.now + h.t.lease - .milliseconds(1))
        XCTAssertTrue(refused.contains { if case .send(_, _, .voteReply(_, _, _, .leaseHeld?)) = $0 { return true }; return false })
    }

    /// A data node voter applies the arbitrator's generation rule: a candidate must know the
    /// generation the last master announced, even when the voter's own copy is as stale (the
    /// master wrote alone in generation 2, then its disk was replaced and synced from b).
    /// Found by the whole-node simulator (seed 113 before the fix: two stale copies elected
    /// each other and acknowledged writes were gone without an operator).
    func testVoterRefusesACandidateBehindTheLastMastersGeneration() {
        let h = H()
        h.electA()
        _ = h.handle(H.b, .received(from: H.a, .renew(epoch: Epoch(1), seq: 7, generation: GenerationID(2))))
        XCTAssertEqual(h.persisted[H.b]?.masterGeneration, GenerationID(2), "the announced generation is durable")
        let stale = VoteRequest(epoch: Epoch(2), round: 1, disk: .upToDate, generations: gen1)
        let later = h.now + h.t.lease + .milliseconds(1)
        let refused = h.handle(H.b, .received(from: H.a, .voteRequest(stale)), at: later)
        XCTAssertTrue(refused.sent.contains { if case .voteReply(_, _, _, .dataBehind?) = $0.message { return true }; return false })
        let current = VoteRequest(epoch: Epoch(2), round: 2, disk: .upToDate,
                                  generations: DataGenerations(current: GenerationID(3), bitmap: GenerationID(1), history: [GenerationID(2)]))
        let granted = h.handle(H.b, .received(from: H.a, .voteRequest(current)), at: later)
        XCTAssertTrue(granted.sent.contains { if case .voteReply(_, _, _, nil) = $0.message { return true }; return false })
        // b itself does not stand on its stale copy either, and says why.
        XCTAssertEqual(h.status(H.b).role, .secondary)
    }

    /// "The master's lease is valid until sendTime + lease·(1−drift) of the newest renewal that got at least one grant."
    func testMasterLeaseIsSendTimePlusDiscountedLease() {
        let h = H()
        h.electA()
        h.advance(h.t.renewInterval)
        let sendTime = h.now
        h.tick(H.a)
        h.advance(.milliseconds(300)) // the grant comes back late: it does not move the anchor
        h.deliverAll()
        XCTAssertEqual(h.status(H.a).gate.validUntil, sendTime + h.t.masterLeaseSpan)
        // A late grant of an older renewal never shortens or stretches it.
        h.handle(H.a, .received(from: H.w, .renewReply(epoch: Epoch(1), seq: 1, granted: true, promised: Epoch(1))))
        XCTAssertEqual(h.status(H.a).gate.validUntil, sendTime + h.t.masterLeaseSpan)
    }

    /// "It never acks a write without a valid lease": the gate closes by its own validUntil;
    /// a tick that comes late cannot extend it, and the master then demotes.
    func testGateClosesByItsOwnTimestampAndMasterDemotes() {
        let h = H()
        h.electA()
        let gate = h.status(H.a).gate
        XCTAssertTrue(gate.allowsAck(at: h.now))
        XCTAssertFalse(gate.allowsAck(at: gate.validUntil))
        // No renewal is granted any more (both voters unreachable); a very late tick:
        let late = gate.validUntil + .seconds(5)
        let out = h.handle(H.a, .tick, at: late)
        h.inbox.removeAll()
        XCTAssertFalse(h.status(H.a).gate.allowsAck(at: late))
        XCTAssertEqual(h.status(H.a).role, .secondary)
        XCTAssertTrue(out.contains(.becomeSecondary(epoch: Epoch(1), master: nil)))
        XCTAssertLessThan(out.index { if case .writeGate = $0 { return true }; return false }!,
                          out.index { if case .becomeSecondary = $0 { return true }; return false }!)
    }

    // MARK: §2 Election

    /// "A secondary that misses the master for failure_timeout asks for Vote(epoch+1, …)",
    /// and never before the lease it granted has expired on its own clock.
    func testSecondaryAsksForVotesOnlyAfterFailureTimeoutAndItsGrantedLease() {
        let h = H()
        h.electA()
        let lastGrant = h.now
        func asked(_ out: [NodeAction]) -> Bool { out.sent.contains { if case .voteRequest = $0.message { return true }; return false } }
        XCTAssertFalse(asked(h.handle(H.b, .tick, at: lastGrant + h.t.failureTimeout + .milliseconds(1))))
        XCTAssertFalse(asked(h.handle(H.b, .tick, at: lastGrant + h.t.lease - .milliseconds(1))))
        let out = h.handle(H.b, .tick, at: lastGrant + h.t.lease + .milliseconds(1))
        XCTAssertTrue(out.sent.contains { if case let .voteRequest(r) = $0.message { return r.epoch == Epoch(2) && r.disk == .upToDate }; return false })
        XCTAssertEqual(h.status(H.b).epoch, Epoch(2))
    }

    /// "A voter grants only if the lease it granted has expired on its own clock."
    func testArbitratorRefusesVoteWhileItsGrantedLeaseRuns() {
        let h = H()
        h.electA()
        let req = VoteRequest(epoch: Epoch(2), round: 1, disk: .upToDate, generations: gen1)
        h.arbitrate(from: H.a, .renew(epoch: Epoch(1), seq: 50, generation: GenerationID(1)))
        let expiry = h.now + h.t.lease
        var out = h.arbitrate(from: H.b, .voteRequest(req), at: expiry - .milliseconds(1))
        XCTAssertTrue(out.contains { if case .send(_, _, .voteReply(_, _, _, .leaseHeld(H.a, _)?)) = $0 { return true }; return false })
        out = h.arbitrate(from: H.b, .voteRequest(req), at: expiry)
        XCTAssertTrue(out.contains { if case .send(_, _, .voteReply(Epoch(2), _, _, nil)) = $0 { return true }; return false })
    }

    /// "… the candidate is upToDate …"
    func testVotersRefuseACandidateThatIsNotUpToDate() {
        let h = H()
        for d in [DiskState.outdated, .inconsistent, .diskless] {
            let req = VoteRequest(epoch: Epoch(1), round: 1, disk: d, generations: gen1)
            let w = h.arbitrate(from: H.b, .voteRequest(req))
            XCTAssertTrue(w.contains { if case .send(_, _, .voteReply(_, _, _, .notUpToDate(d)?)) = $0 { return true }; return false })
            let n = h.handle(H.a, .received(from: H.b, .voteRequest(req)))
            XCTAssertEqual(voteRefusals(n), [.notUpToDate(d)])
        }
        // And a node whose own disk is not up to date does not stand at all.
        h.handle(H.b, .disk(LocalDisk(state: .inconsistent, generations: gen1)))
        let out = h.handle(H.b, .tick, at: h.now + .seconds(10))
        XCTAssertTrue(out.sent.isEmpty || !out.sent.contains { if case .voteRequest = $0.message { return true }; return false })
        XCTAssertEqual(h.status(H.b).whyNotPromoted, "local disk is inconsistent")
    }

    /// A crashed primary of protocol B/C does not stand while its peer, reachable and up to
    /// date in its generation, holds the only copy of writes it acknowledged: it waits for
    /// the link to resync its crash extents (docs/replication.md "Power cuts").
    func testCrashedPrimaryWaitsForItsPeersCopyOfTheCrashExtents() {
        let crashed = LocalDisk(state: .upToDate, generations: gen1, crashCopyOnPeer: true)
        let h = H(disks: [H.a: crashed])
        h.handle(H.b, .admin(.maintenance(true)))  // b never stands: only a could
        h.tick(H.b)  // its heartbeat reaches a first (a restarted node has its quarantine to hear it)
        h.deliverAll()
        h.run(for: .seconds(5))
        XCTAssertEqual(h.status(H.a).role, .secondary)
        XCTAssertFalse(h.actions[H.a, default: []].sent.contains { if case .voteRequest = $0.message { return true }; return false })
        XCTAssertEqual(h.status(H.a).whyNotPromoted,
                       "b holds every write this node acknowledged before it crashed: waiting for the replication link to resync the crash extents from it")
        XCTAssertEqual(h.actions[H.a, default: []].logNames.filter { $0 == "waitingForPeerCopy" }.count, 1, "one event for the wait")
        // A forced promotion is the operator's call; a plain one waits like the election.
        let refused = h.handle(H.a, .admin(.promote(force: false)))
        XCTAssertTrue(refused.contains { if case .adminResult(_, .failure(let why)) = $0 { return why.reason.hasSuffix("promote --force overrides") }; return false })
        h.run(for: .seconds(2))
        XCTAssertEqual(h.status(H.a).role, .secondary)
        // The resync brought them back: it stands and wins.
        h.handle(H.a, .disk(LocalDisk(state: .upToDate, generations: gen1)))
        h.run(for: .seconds(5))
        XCTAssertEqual(h.status(H.a).role, .primary)
    }

    /// … but a silent peer holds nothing it could give: the crashed primary stands with its own copy.
    func testCrashedPrimaryStandsWhenItsPeerIsSilent() {
        let h = H(disks: [H.a: LocalDisk(state: .upToDate, generations: gen1, crashCopyOnPeer: true)])
        h.run(for: .seconds(5), drop: { from, to, _ in from == H.b || to == H.b })
        XCTAssertEqual(h.status(H.a).role, .primary)
    }

    /// "… and not marked outdated at this voter …"; whyNotPromoted says so.
    func testArbitratorRefusesCandidateMarkedOutdatedAndStatusSaysWhy() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        h.deliverAll()
        h.advance(h.t.renewInterval)
        h.handle(H.a, .peerReplication(.disconnected))
        h.run(for: h.t.renewInterval * 2, drop: { from, to, _ in (from == H.a && to == H.b) || (from == H.b && to == H.a) })
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.outdated.map(\.node), [H.b])
        XCTAssertTrue(h.status(H.a).peerOutdated)
        // a dies; b stands once its granted lease has run out, and the arbitrator refuses it.
        h.nodes[H.a] = nil
        h.run(for: h.t.lease * 2, drop: { _, to, _ in to == H.a })
        XCTAssertNotEqual(h.status(H.b).role, .primary)
        XCTAssertEqual(h.status(H.b).whyNotPromoted, "arbitrator refused vote: b is outdated at epoch 1")
    }

    /// "… the candidate's data is not behind what the voter knows."
    func testVotersRefuseACandidateWhoseDataIsBehind() {
        // Node voter: a's data went on to generation 2 (bitmap 1); b still has 1.
        let aDisk = LocalDisk(state: .upToDate, generations: DataGenerations(current: GenerationID(2), bitmap: GenerationID(1)))
        let h = H(disks: [H.a: aDisk])
        let req = VoteRequest(epoch: Epoch(1), round: 1, disk: .upToDate, generations: gen1)
        XCTAssertEqual(voteRefusals(h.handle(H.a, .received(from: H.b, .voteRequest(req)))), [.dataBehind])
        // Diverged: neither knows the other's current generation.
        let other = VoteRequest(epoch: Epoch(1), round: 2, disk: .upToDate, generations: DataGenerations(current: GenerationID(7), bitmap: GenerationID(1)))
        XCTAssertEqual(voteRefusals(h.handle(H.a, .received(from: H.b, .voteRequest(other)))), [.diverged])
        // Arbitrator: it knows the generation the master announced in its renewals.
        h.arbitrate(from: H.a, .renew(epoch: Epoch(1), seq: 1, generation: GenerationID(2)))
        let w = h.arbitrate(from: H.b, .voteRequest(VoteRequest(epoch: Epoch(2), round: 3, disk: .upToDate, generations: gen1)),
                            at: h.now + h.t.lease)
        XCTAssertTrue(w.contains { if case .send(_, _, .voteReply(_, _, _, .dataBehind?)) = $0 { return true }; return false })
        // A candidate that knows the generation (ahead or equal) is not behind.
        let ok = h.arbitrate(from: H.a, .voteRequest(VoteRequest(epoch: Epoch(2), round: 4, disk: .upToDate, generations: aDisk.generations)),
                             at: h.now + h.t.lease)
        XCTAssertTrue(ok.contains { if case .send(_, _, .voteReply(_, _, _, nil)) = $0 { return true }; return false })
    }

    /// "… it has not voted for another candidate in epoch+1." A repeated request from the same
    /// candidate is granted again (lost replies, duplicates).
    func testOneVotePerEpoch() {
        let h = H()
        let ra = VoteRequest(epoch: Epoch(3), round: 1, disk: .upToDate, generations: gen1)
        let rb = VoteRequest(epoch: Epoch(3), round: 1, disk: .upToDate, generations: gen1)
        XCTAssertTrue(h.arbitrate(from: H.a, .voteRequest(ra)).contains { if case .send(_, _, .voteReply(_, _, _, nil)) = $0 { return true }; return false })
        XCTAssertTrue(h.arbitrate(from: H.b, .voteRequest(rb)).contains { if case .send(_, _, .voteReply(_, _, _, .alreadyVoted(H.a)?)) = $0 { return true }; return false })
        XCTAssertTrue(h.arbitrate(from: H.a, .voteRequest(ra)).contains { if case .send(_, _, .voteReply(_, _, _, nil)) = $0 { return true }; return false })
        // Node voter: b votes for a in 3, then refuses … b itself is the only other candidate;
        // a stale epoch is refused too.
        XCTAssertEqual(voteRefusals(h.handle(H.b, .received(from: H.a, .voteRequest(ra)))), [nil].compactMap { $0 })
        XCTAssertEqual(h.status(H.b).epoch, Epoch(3))
        let stale = VoteRequest(epoch: Epoch(2), round: 2, disk: .upToDate, generations: gen1)
        XCTAssertEqual(voteRefusals(h.handle(H.b, .received(from: H.a, .voteRequest(stale)))), [.staleEpoch])
    }

    /// "Votes and promised epochs are persisted before the reply" — for both kinds of voter.
    func testVotesArePersistedBeforeTheReply() {
        let h = H()
        let r = VoteRequest(epoch: Epoch(4), round: 1, disk: .upToDate, generations: gen1)
        let n = h.handle(H.b, .received(from: H.a, .voteRequest(r)))
        let p = n.index { if case let .persist(s) = $0 { return s.votedFor == H.a && s.promisedEpoch == Epoch(4) }; return false }
        let s = n.index { if case .send(_, .voteReply) = $0 { return true }; return false }
        XCTAssertNotNil(p); XCTAssertNotNil(s)
        XCTAssertLessThan(p!, s!)
        let w = h.arbitrate(from: H.a, .voteRequest(r))
        let wp = w.firstIndex { if case let .persist(_, st) = $0 { return st.votedFor == H.a && st.promisedEpoch == Epoch(4) }; return false }
        let ws = w.firstIndex { if case .send(_, _, .voteReply) = $0 { return true }; return false }
        XCTAssertNotNil(wp); XCTAssertNotNil(ws)
        XCTAssertLessThan(wp!, ws!)
    }

    /// "The arbitrator persists … before replying, so a restarted arbitrator never grants twice."
    /// With the planted bug the same script does grant twice: this test can fail.
    func testRestartedArbitratorNeverGrantsTwice() {
        func secondGrant(bugs: Set<PlantedBug>) -> Bool {
            let h = H(settings: QuorumSettings(plantedBugs: bugs))
            let ra = VoteRequest(epoch: Epoch(5), round: 1, disk: .upToDate, generations: gen1)
            h.arbitrate(from: H.a, .voteRequest(ra))
            h.restartArbitrator()
            let first = h.now
            // Right after the restart: refused either way (the persisted vote, or the quarantine
            // that waits out a lease granted before the crash).
            let early = h.arbitrate(from: H.b, .voteRequest(VoteRequest(epoch: Epoch(5), round: 1, disk: .upToDate, generations: gen1)), at: first)
            let expected: VoteRefusal = bugs.isEmpty ? .alreadyVoted(H.a) : .restartQuarantine(remainingMilliseconds: UInt32(h.t.lease.milliseconds))
            XCTAssertTrue(early.contains { if case .send(_, _, .voteReply(_, _, _, expected?)) = $0 { return true }; return false }, "\(early)")
            let later = h.arbitrate(from: H.b, .voteRequest(VoteRequest(epoch: Epoch(5), round: 2, disk: .upToDate, generations: gen1)),
                                    at: first + h.t.lease)
            return later.contains { if case .send(_, _, .voteReply(_, _, _, nil)) = $0 { return true }; return false }
        }
        XCTAssertFalse(secondGrant(bugs: []))
        XCTAssertTrue(secondGrant(bugs: [.votesNotPersisted]))
    }

    /// A restarted data node also waits out a lease it may have granted and forgotten.
    func testRestartedNodeQuarantinesItsVote() {
        let h = H()
        h.electA()
        h.restartNode(H.b)
        let r = VoteRequest(epoch: Epoch(2), round: 1, disk: .upToDate, generations: gen1)
        var out = h.handle(H.b, .received(from: H.a, .voteRequest(r)))
        if case .restartQuarantine? = voteRefusals(out).first {} else { XCTFail("expected quarantine, got \(voteRefusals(out))") }
        out = h.handle(H.b, .received(from: H.a, .voteRequest(r)), at: h.now + h.t.lease)
        XCTAssertEqual(voteRefusals(out), [])
        XCTAssertTrue(out.sent.contains { if case .voteReply(_, _, _, nil) = $0.message { return true }; return false })
    }

    // MARK: §2 Outdate before continuing

    /// "When the master loses the replication link … it must first get the arbitrator to record
    /// outdated(peer, epoch) before acknowledging any further write."
    func testOutdateBeforeContinuing() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        h.deliverAll()
        h.handle(H.a, .peerReplication(.disconnected))
        // Nothing changes until the arbitrator confirms: the gate still requires the peer.
        h.run(for: h.t.renewInterval * 3, drop: { _, to, m in
            if to == H.w, case .outdate = m { return true }
            return false
        })
        XCTAssertTrue(h.status(H.a).gate.peerRequired)
        XCTAssertTrue(h.actions[H.a]!.sent.contains { if case .outdate(H.b, Epoch(1), _) = $0.message { return true }; return false })
        // Once the mark is recorded the gate drops peerRequired, after a persist of the local copy.
        h.run(for: h.t.renewInterval * 2)
        XCTAssertFalse(h.status(H.a).gate.peerRequired)
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.outdated, [OutdateMark(node: H.b, epoch: Epoch(1), instance: 1)])
        XCTAssertEqual(h.persisted[H.a]?.peerOutdatedAt, Epoch(1))
    }

    /// "No arbitrator and no peer → no quorum → stop."
    func testNoArbitratorAndNoPeerMeansStop() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        h.handle(H.a, .peerReplication(.disconnected))
        h.run(for: h.t.lease * 2, drop: { from, to, _ in from == H.a || to == H.a })
        XCTAssertTrue(h.actions[H.a]!.gates.allSatisfy { $0.peerRequired || !$0.allowsAck(at: .zero) })
        XCTAssertEqual(h.status(H.a).role, .secondary)
        XCTAssertFalse(h.status(H.a).gate.allowsAck(at: h.now))
    }

    /// Back in sync: "the gate goes back to peerRequired=true first and then the arbitrator mark is cleared."
    func testGateRequiresPeerBeforeTheMarkIsCleared() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        h.handle(H.a, .peerReplication(.disconnected))
        h.run(for: h.t.renewInterval * 3)
        XCTAssertFalse(h.status(H.a).gate.peerRequired)
        let out = h.handle(H.a, .peerReplication(.inSync))
        let g = out.index { if case let .writeGate(g) = $0 { return g.peerRequired }; return false }
        let c = out.index { if case .send(H.w, .clearOutdate(H.b, _, _)) = $0 { return true }; return false }
        XCTAssertNotNil(g); XCTAssertNotNil(c)
        XCTAssertLessThan(g!, c!)
        h.deliverAll()
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.outdated, [])
        XCTAssertNil(h.persisted[H.a]?.peerOutdatedAt)
    }

    /// A late duplicate of an old clear never removes a newer mark (marks are ordered).
    func testLateClearDoesNotUndoNewerMark() {
        let h = H()
        h.arbitrate(from: H.a, .renew(epoch: Epoch(1), seq: 1, generation: GenerationID(1)))
        h.arbitrate(from: H.a, .outdate(peer: H.b, epoch: Epoch(1), instance: 1))
        h.arbitrate(from: H.a, .clearOutdate(peer: H.b, epoch: Epoch(1), instance: 1))
        h.arbitrate(from: H.a, .outdate(peer: H.b, epoch: Epoch(1), instance: 2))
        h.arbitrate(from: H.a, .clearOutdate(peer: H.b, epoch: Epoch(1), instance: 1)) // late duplicate
        h.arbitrate(from: H.a, .outdate(peer: H.b, epoch: Epoch(1), instance: 1))      // late duplicate
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.outdated, [OutdateMark(node: H.b, epoch: Epoch(1), instance: 2)])
    }

    // MARK: §2 No flapping

    /// "A backup that loses the master while the master still renews at the arbitrator is refused",
    /// and the refusal does not raise the arbitrator's epoch (so the master goes on).
    func testNoFlappingWhileMasterRenewsAtArbitrator() {
        let h = H()
        h.electA()
        // a → b is cut: b hears nothing, a still renews at w.
        let cut: (NodeID, NodeID, QuorumMessage) -> Bool = { from, to, _ in from == H.a && to == H.b }
        h.run(for: .seconds(5), drop: cut)
        XCTAssertEqual(h.status(H.a).role, .primary)
        XCTAssertTrue(h.status(H.a).gate.allowsAck(at: h.now))
        XCTAssertNotEqual(h.status(H.b).role, .primary)
        XCTAssertEqual(h.arbitrator.status(cluster: "c")?.master, H.a)
        XCTAssertTrue(h.status(H.b).whyNotPromoted?.contains("refused vote") ?? false, "\(String(describing: h.status(H.b).whyNotPromoted))")
    }

    /// "Arbitrator down while A–B connected: the master keeps renewing with the peer and goes on."
    func testArbitratorDownMasterGoesOnWithPeer() {
        let h = H()
        h.electA()
        h.run(for: .seconds(5), drop: { from, to, _ in from == H.w || to == H.w })
        XCTAssertEqual(h.status(H.a).role, .primary)
        XCTAssertTrue(h.status(H.a).gate.allowsAck(at: h.now))
        XCTAssertEqual(h.status(H.b).master, H.a)
    }

    // MARK: §2 Switchover
    // The handover itself: Transcript/testdata/rules-switchover.txt (TranscriptTests).

    func testSwitchoverRefusedWhenPeerIsOutdated() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        h.handle(H.a, .peerReplication(.disconnected))
        h.run(for: h.t.renewInterval * 3)
        let out = h.handle(H.a, .admin(.switchover))
        XCTAssertTrue(out.contains(.adminResult(.switchover, .failure(AdminRefusal("peer is outdated")))))
        XCTAssertFalse(out.contains(.drainForSwitchover))
    }

    // MARK: §2 Policy and forced promotion

    /// "`allow` lets a backup promote without the arbitrator after failure_timeout"; `prohibit` never does.
    func testSplitBrainPolicy() {
        for policy in [SplitBrainPolicy.prohibit, .allow] {
            let h = H(settings: QuorumSettings(splitBrain: policy))
            h.electA()
            h.run(for: .seconds(4), drop: { _, to, _ in to != H.a })   // b hears nobody, nobody hears b
            h.nodes[H.a] = nil
            let promoted = h.actions[H.b]!.becamePrimary
            if policy == .allow {
                XCTAssertEqual(promoted?.newGeneration, true, "a lone promotion starts a new generation")
            } else {
                XCTAssertNil(promoted)
            }
        }
    }

    /// "Forced promotion … starts a new data generation"; voters skip the data checks, not the lease.
    func testForcedPromotionOverridesOutdatedMark() {
        let h = H()
        h.arbitrate(from: H.a, .renew(epoch: Epoch(1), seq: 1, generation: GenerationID(1)))
        h.arbitrate(from: H.a, .outdate(peer: H.b, epoch: Epoch(1), instance: 1))
        h.advance(h.t.lease)
        h.handle(H.b, .admin(.promote(force: false)))
        h.deliverAll(drop: { _, to, _ in to == H.a })
        XCTAssertNotEqual(h.status(H.b).role, .primary)
        h.advance(h.t.failureTimeout); h.tick(H.b); h.inbox.removeAll()
        let out = h.handle(H.b, .admin(.promote(force: true)))
        XCTAssertTrue(out.contains { if case .adminResult(_, .success) = $0 { return true }; return false })
        h.deliverAll(drop: { _, to, _ in to == H.a })
        XCTAssertEqual(h.actions[H.b]!.becamePrimary?.newGeneration, true)
    }

    // MARK: §2 No automatic failback, epochs, restart

    /// "No automatic failback": a restarted node rejoins as secondary and stays so while the
    /// new master renews.
    func testRestartedOldMasterRejoinsAsSecondary() {
        let h = H()
        h.electA()
        let saved = h.nodes[H.a]
        h.nodes[H.a] = nil // a crashes
        h.run(for: .seconds(3), drop: { _, to, _ in to == H.a })
        XCTAssertEqual(h.status(H.b).role, .primary)
        h.nodes[H.a] = saved
        h.restartNode(H.a)
        XCTAssertEqual(h.status(H.a).role, .secondary)
        XCTAssertFalse(h.status(H.a).gate.allowsAck(at: h.now))
        h.run(for: .seconds(6))
        XCTAssertEqual(h.status(H.a).role, .secondary)
        XCTAssertEqual(h.status(H.b).role, .primary)
        XCTAssertEqual(h.status(H.a).master, H.b)
        XCTAssertEqual(h.actions[H.a]!.filter { if case .becomePrimary = $0 { return true }; return false }.count, 1, "only the first election")
    }


    /// A master whose peer promised a newer epoch (its failed candidacy) moves itself there with
    /// the voters' consent, keeping its lease: the peer follows again.
    func testMasterMovesToNewerEpochItsPeerPromised() {
        let h = H()
        h.electA()
        // b restarts after a candidacy of its own for epoch 5 that failed (it voted for itself).
        h.nodes[H.b] = NodeCore(cluster: "c", me: H.b, peer: H.a, arbitrator: H.w, settings: h.settings,
                                persisted: NodePersistentState(promisedEpoch: Epoch(5), votedFor: H.b), disk: h.disks[H.b]!,
                                now: h.now - .seconds(5))
        h.run(for: .seconds(2))
        XCTAssertEqual(h.status(H.a).role, .primary)
        XCTAssertGreaterThan(h.status(H.a).gate.epoch, Epoch(5))
        XCTAssertEqual(h.status(H.b).master, H.a)
        XCTAssertTrue(h.status(H.a).gate.allowsAck(at: h.now))
        XCTAssertTrue(h.actions[H.a]!.logNames.contains("epochRaised"))
    }

    // MARK: Admin and refused input

    func testAdminRefusalsSayWhy() {
        let h = H()
        h.electA()
        XCTAssertTrue(h.handle(H.b, .admin(.promote(force: false))).contains(.adminResult(.promote(force: false), .failure(AdminRefusal("a is master at epoch 1; run switchover there")))))
        XCTAssertTrue(h.handle(H.b, .admin(.switchover)).contains { if case .adminResult(.switchover, .failure) = $0 { return true }; return false })
        // Maintenance on the master unmanages its resources; it stays master, lease renewed.
        XCTAssertTrue(h.handle(H.a, .admin(.maintenance(true))).contains(.adminResult(.maintenance(true), .success("maintenance on"))))
        h.run(for: .seconds(3))
        XCTAssertEqual(h.status(H.a).role, .primary)
        XCTAssertTrue(h.status(H.a).maintenance)
        XCTAssertTrue(h.handle(H.a, .admin(.maintenance(false))).contains(.adminResult(.maintenance(false), .success("maintenance off"))))
        // Maintenance keeps a node from standing.
        h.handle(H.b, .admin(.maintenance(true)))
        XCTAssertEqual(h.persisted[H.b]?.maintenance, true)
        h.nodes[H.a] = nil
        h.run(for: .seconds(4), drop: { _, to, _ in to == H.a })
        XCTAssertEqual(h.status(H.b).role, .secondary)
        XCTAssertEqual(h.status(H.b).whyNotPromoted, "maintenance mode is on")
    }

    /// An admin promotion is a vote for oneself: it too waits for the lease this node granted
    /// (simulator seed 69059 found it skipping that wait).
    func testAdminPromoteWaitsForTheLeaseThisNodeGranted() {
        let h = H()
        h.electA()
        let granted = h.now
        h.nodes[H.a] = nil // a freezes with its lease still valid
        h.advance(h.t.failureTimeout + .milliseconds(1))
        let out = h.handle(H.b, .admin(.promote(force: false)))
        XCTAssertTrue(out.contains { if case let .adminResult(_, .success(msg)) = $0 { return msg.contains("when the lease granted to a has expired") }; return false }, "\(out)")
        XCTAssertTrue(out.sent.isEmpty, "no vote request before the lease granted to a is over")
        var asked: Instant?
        while asked == nil, h.now < granted + h.t.lease * 2 {
            h.advance(.milliseconds(10))
            if h.handle(H.b, .tick).sent.contains(where: { if case .voteRequest = $0.message { return true }; return false }) { asked = h.now }
        }
        XCTAssertNotNil(asked)
        XCTAssertGreaterThanOrEqual(asked!, granted + h.t.lease)
    }

    func testDemoteLetsThePeerTakeOver() {
        let h = H()
        h.electA()
        h.handle(H.a, .peerReplication(.inSync))
        let out = h.handle(H.a, .admin(.demote))
        XCTAssertFalse(h.status(H.a).gate.allowsAck(at: h.now))
        XCTAssertTrue(out.contains { if case .adminResult(.demote, .success) = $0 { return true }; return false })
        h.deliverAll()
        h.run(for: .seconds(1))
        XCTAssertEqual(h.status(H.b).role, .primary)
        XCTAssertEqual(h.status(H.a).master, H.b)
    }

    func testMessagesFromStrangersAreIgnoredAndLogged() {
        let h = H()
        let out = h.handle(H.a, .received(from: "mallory", .renew(epoch: Epoch(9), seq: 1, generation: .none)))
        XCTAssertEqual(out.logNames, ["messageIgnored"])
        XCTAssertEqual(h.status(H.a).epoch, .zero)
        // The arbitrator ignores replies it never asked for.
        let w = h.arbitrate(from: H.a, .voteReply(epoch: Epoch(1), round: 1, promised: Epoch(1), refusal: nil))
        XCTAssertTrue(w.allSatisfy { if case .log = $0 { return true }; return false })
    }

    func testArbitratorKeepsClustersApart() {
        var w = ArbitratorCore(settings: QuorumSettings(), persisted: [:])
        let t0 = Instant(nanoseconds: 1_000_000_000_000)
        _ = w.handle(cluster: "x", from: H.a, .renew(epoch: Epoch(3), seq: 1, generation: GenerationID(1)), at: t0)
        let out = w.handle(cluster: "y", from: H.b, .voteRequest(VoteRequest(epoch: Epoch(1), round: 1, disk: .upToDate, generations: gen1)),
                           at: t0 + .seconds(2))
        XCTAssertTrue(out.contains { if case .send("y", H.b, .stamped(_, .voteReply(_, _, _, nil))) = $0 { return true }; return false })
        XCTAssertEqual(w.clusters, ["x", "y"])
        XCTAssertEqual(w.status(cluster: "x")?.master, H.a)
        XCTAssertEqual(w.status(cluster: "y")?.master, H.b)
        XCTAssertEqual(w.status(cluster: "x")?.epoch, Epoch(3))
    }
}

/// Arbitrator continuity (issue 8): a node counts the arbitrator's answers only from the
/// state incarnation it knows; a wiped or rebuilt arbitrator state (new incarnation) cannot
/// elect an outdated backup until an operator accepts it.
final class ArbitratorContinuityTests: XCTestCase {
    typealias H = Harness
    func stamped(_ inc: UInt64, _ m: QuorumMessage) -> QuorumMessage { .stamped(incarnation: inc, m) }

    func testEveryArbitratorReplyCarriesItsIncarnation() {
        var w = ArbitratorCore(settings: QuorumSettings(), persisted: ["c": ArbitratorPersistentState(incarnation: 0xABC)])
        let out = w.handle(cluster: "c", from: H.a, .renew(epoch: Epoch(1), seq: 1, generation: GenerationID(1)), at: Instant(nanoseconds: 1 << 40))
        let sends = out.compactMap { a -> QuorumMessage? in if case let .send(_, _, m) = a { return m }; return nil }
        XCTAssertFalse(sends.isEmpty)
        for m in sends { guard case .stamped(0xABC, _) = m else { return XCTFail("unstamped reply \(m)") } }
        // The stamp survives the wire.
        for m in sends { XCTAssertEqual(try QuorumMessage.decode(m.encoded()), m) }
    }

    func testFirstContactAdoptsThenAnotherIncarnationIsNotCountedUntilAccepted() {
        let h = H()
        let vote = VoteReply(epoch: Epoch(1), round: 1)
        // First contact: adopted and persisted before anything else of that answer counts.
        let first = h.handle(H.b, .received(from: H.w, stamped(7, vote.message)))
        XCTAssertTrue(first.contains { if case let .persist(s) = $0 { return s.arbitratorIncarnation == 7 }; return false })
        XCTAssertNil(h.status(H.b).arbitratorRefused)
        // A reply from incarnation 8 (the state was wiped and re-created): dropped, and said so.
        let second = h.handle(H.b, .received(from: H.w, stamped(8, vote.message)))
        XCTAssertFalse(second.contains { if case .persist = $0 { return true }; return false }, "nothing from a foreign incarnation is acted on")
        let refused = h.status(H.b).arbitratorRefused ?? ""
        XCTAssertTrue(refused.contains("incarnation 8") && refused.contains("knows 7") && refused.contains("arbitrator-accept"), refused)
        XCTAssertTrue(h.status(H.b).whyNotPromoted?.contains("arbitrator-accept") ?? false)
        // Accepting adopts 8 durably; a node with nothing to accept refuses.
        let accept = h.handle(H.b, .admin(.acceptArbitrator))
        XCTAssertTrue(accept.contains { if case let .persist(s) = $0 { return s.arbitratorIncarnation == 8 }; return false })
        XCTAssertTrue(accept.contains { if case .adminResult(.acceptArbitrator, .success) = $0 { return true }; return false })
        XCTAssertNil(h.status(H.b).arbitratorRefused)
        let again = h.handle(H.b, .admin(.acceptArbitrator))
        XCTAssertTrue(again.contains { if case .adminResult(.acceptArbitrator, .failure) = $0 { return true }; return false })
    }

    /// The scenario in the cores: the master writes alone (backup outdated at the
    /// arbitrator), the arbitrator's state is lost (new incarnation, no outdate mark), the master
    /// dies: the backup's candidacy gets the new arbitrator's vote — which is not counted.
    func testWipedArbitratorCannotElectTheOutdatedBackup() {
        let h = H()
        // Both nodes' arbitrator links come up: each learns the arbitrator's incarnation then,
        // not first when it needs a vote (a backup may never have asked for one).
        for n in [H.a, H.b] { h.handle(n, .linkUp(H.w)) }
        h.deliverAll()
        XCTAssertNotNil(h.persisted[H.b]?.arbitratorIncarnation, "the backup adopted the incarnation at link-up")
        h.electA()
        XCTAssertEqual(h.status(H.a).role, .primary)
        // Both nodes know the arbitrator's first incarnation.
        XCTAssertNotNil(h.persisted[H.a]?.arbitratorIncarnation)
        // The arbitrator comes back with a new, empty state (what `--init` after a wipe makes).
        h.replaceArbitrator(with: ArbitratorPersistentState(incarnation: 0xBEEF))
        // a is gone; b waits out the lease and stands.
        h.advance(h.t.lease * 3)
        for _ in 0..<40 { h.tick(H.b); h.deliverAll(drop: { from, _, _ in from == H.a }); h.advance(h.t.renewInterval) }
        XCTAssertNotEqual(h.status(H.b).role, .primary, "an arbitrator with a lost state elected the backup")
        XCTAssertTrue(h.status(H.b).whyNotPromoted?.contains("arbitrator-accept") ?? false, "\(String(describing: h.status(H.b).whyNotPromoted))")
    }
}

extension ArbitratorContinuityTests {
    /// Under split_brain = "allow" a node promotes alone only when nobody answers; a refused
    /// arbitrator (another incarnation) did answer, so the backup does not promote alone.
    func testRefusedArbitratorIsNotSilenceUnderAllow() {
        let h = H(settings: QuorumSettings(splitBrain: .allow))
        for n in [H.a, H.b] { h.handle(n, .linkUp(H.w)) }
        h.deliverAll()
        h.electA()
        h.replaceArbitrator(with: ArbitratorPersistentState(incarnation: 0xBEEF))
        h.advance(h.t.lease * 3)
        for _ in 0..<40 { h.tick(H.b); h.deliverAll(drop: { from, to, _ in from == H.a || to == H.a }); h.advance(h.t.renewInterval) }
        XCTAssertNotEqual(h.status(H.b).role, .primary, "a refused arbitrator's answer was taken for silence")
    }
}

extension VoteReply {
    var message: QuorumMessage { .voteReply(epoch: epoch, round: round, promised: epoch, refusal: nil) }
}

/// A vote reply's fields, for readable tests.
struct VoteReply { var epoch: Epoch; var round: UInt64 }
