import HACore
@testable import Replication
import XCTest

/// The generation table of docs/replication.md ("Generation table"), the rows added with
/// disk identity and bootstrap: fresh metadata, replaced disks, assume-clean, stale nodes.
/// Each row is checked from both ends (`GenerationDecisionTests.check`).
final class GenerationTableTests: GenerationRowTestCase {
    func testTwoFreshEmptyStoresPairUpInTheFirstSidesGeneration() {
        check(side("a", X1, disk: .inconsistent, empty: true), side("b", Z, disk: .inconsistent, empty: true), .adoptClean(X1))
    }

    func testTwoFreshStoresWithDataWaitForBootstrap() {
        // Data on one side, new metadata on both: nobody may decide alone.
        check(side("a", X1, disk: .inconsistent), side("b", Z, disk: .inconsistent, empty: true), .refuse(""))
        check(side("a", X1, disk: .inconsistent, empty: true), side("b", Z, disk: .inconsistent), .refuse(""))
        if case .refuse(let why) = SyncDecision.decide(me: side("a", X1, disk: .inconsistent), peer: side("b", Z, disk: .inconsistent)) {
            XCTAssertTrue(why.contains("hactl bootstrap"), why)
        } else { XCTFail("refusal expected") }
    }

    func testNewOrReplacedDiskIsAFullSyncTargetOfAnUpToDatePeer() {
        // Fresh metadata (an unrelated random generation) against the master: full, never "in sync".
        check(side("a", X2, bitmap: X1, role: .primary), side("b", Z, disk: .inconsistent), .becomeSource(.full))
        check(side("a", Z, disk: .inconsistent, empty: true), side("b", X2, role: .primary), .becomeTarget(.full))
        // Even an empty fresh store is copied in full unless the source was declared clean.
        check(side("a", X1), side("b", Z, disk: .inconsistent, empty: true), .becomeSource(.full))
    }

    func testAssumeCleanSourceIsAdoptedOnlyByAFreshPeerAndOnlyUnwritten() {
        // The operator declared both stores identical: a fresh peer adopts, empty or not.
        check(side("a", X1, clean: true), side("b", Z, disk: .inconsistent, empty: true), .adoptClean(X1))
        check(side("a", X1, clean: true), side("b", Z, disk: .inconsistent, fresh: true), .adoptClean(X1))
        check(side("a", Z, disk: .inconsistent, fresh: true), side("b", X1, role: .primary, clean: true), .adoptClean(X1))
        // The source holds writes the peer lacks: full sync.
        check(side("a", X1, dirty: true, clean: true), side("b", Z, disk: .inconsistent, fresh: true), .becomeSource(.full))
        // An inconsistent peer that is not fresh (an interrupted sync target, an invalidated
        // node) holds nothing the declaration covers: full.
        check(side("a", X1, clean: true), side("b", Z, disk: .inconsistent), .becomeSource(.full))
        // Not declared clean: a fresh peer is copied in full.
        check(side("a", X1), side("b", Z, disk: .inconsistent, fresh: true), .becomeSource(.full))
    }

    func testInterruptedSyncTargetResumesFromItsRelation() {
        // Same current (an interrupted bitmap resync): bitmap.
        check(side("a", X1, disk: .inconsistent), side("b", X1), .becomeTarget(.bitmap))
        // The source branched from the target's generation: bitmap.
        check(side("a", X2, bitmap: X1), side("b", X1, disk: .inconsistent), .becomeSource(.bitmap))
        // The target's generation only in the source's history: full.
        check(side("a", X3, bitmap: X2, history: [X1]), side("b", X1, disk: .inconsistent), .becomeSource(.full))
        // An inconsistent side is never a source, whatever its generation.
        check(side("a", X2, bitmap: X1, disk: .inconsistent), side("b", X1), .becomeTarget(.full))
    }

    func testNoSyncFromAnOutdatedSideIntoAnInconsistentOne() {
        check(side("a", X1, disk: .outdated), side("b", Z, disk: .inconsistent), .refuse(""))
        check(side("a", X2, bitmap: X1, disk: .outdated), side("b", X1, disk: .inconsistent), .refuse(""))
    }

    func testStaleNodeReturningAfterTwoFailovers() {
        // a stopped in X1. b was promoted (X2 over X1) and promoted again after a restart (X3;
        // the bitmap still counts from X1, X2 in history): a resyncs b's bitmap.
        check(side("a", X1), side("b", X3, bitmap: X1, history: [X2], role: .primary), .becomeTarget(.bitmap))
        // b's bitmap base was since retired (X1 only in history): full.
        check(side("a", X1), side("b", X3, history: [X2, X1], role: .primary), .becomeTarget(.full))
        // a wrote alone meanwhile (X4 over X1): split brain, both stores untouched.
        check(side("a", X4, bitmap: X1), side("b", X3, bitmap: X1, history: [X2], role: .primary), .splitBrain(""))
    }

    func testUnrelatedGenerationsAreRefusedNeverResynced() {
        guard case .splitBrain(let why) = SyncDecision.decide(me: side("a", X1), peer: side("b", Z)) else {
            return XCTFail("unrelated up-to-date data must be refused")
        }
        XCTAssertTrue(why.contains("unrelated"), why)
        check(side("a", X1, role: .primary), side("b", Z), .splitBrain(""))
    }

    func testRandomPairsNeverMakeAnInconsistentSideUpToDateFromNothing() {
        var rng = SplitMix64(seed: 11)
        let ids = [GenerationID.none, X0, X1, X2, X3]
        func pick<T>(_ xs: [T]) -> T { xs[Int(rng.next() % UInt64(xs.count))] }
        for _ in 0..<5000 {
            func random(_ n: NodeID) -> SyncSide {
                side(n, pick(Array(ids.dropFirst())), bitmap: pick(ids), history: [pick(ids)].filter { !$0.isNone },
                     disk: pick(DiskState.allCases), role: pick(Role.allCases), dirty: pick([true, false]),
                     crashed: pick([true, false]), discard: pick([true, false]), fresh: pick([true, false]), empty: pick([true, false]),
                     clean: pick([true, false]))
            }
            let a = random("a"), b = random("b")
            let da = SyncDecision.decide(me: a, peer: b)
            XCTAssertEqual(da.mirrored, SyncDecision.decide(me: b, peer: a), "\(a) vs \(b)")
            switch da {
            case .becomeSource where b.diskState == .inconsistent: XCTAssertEqual(a.diskState, .upToDate)
            case .becomeTarget where a.diskState == .inconsistent: XCTAssertEqual(b.diskState, .upToDate)
            case .adoptClean:
                if a.diskState == .inconsistent { XCTAssertTrue(a.emptyFresh || (a.fresh && b.assumeClean)) }
                if b.diskState == .inconsistent { XCTAssertTrue(b.emptyFresh || (b.fresh && a.assumeClean)) }
                XCTAssertTrue(a.diskState != .inconsistent || b.diskState != .inconsistent || (a.emptyFresh && b.emptyFresh))
            case .inSync:
                XCTAssertNotEqual(a.diskState, .inconsistent); XCTAssertNotEqual(b.diskState, .inconsistent)
            default: break
            }
        }
    }
}
