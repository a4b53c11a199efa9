import HACore
@testable import Replication
import XCTest

/// The sync decision table (docs/replication.md "Sync decision"), one row per relation,
/// each checked from both ends.
/// Row helpers shared by the decision-table tests.
class GenerationRowTestCase: XCTestCase {
    let X0 = GenerationID(0x10), X1 = GenerationID(0x11), X2 = GenerationID(0x12), X3 = GenerationID(0x13), X4 = GenerationID(0x14), Z = GenerationID(0x99)

    func side(_ n: NodeID, _ cur: GenerationID, bitmap: GenerationID = .none, history: [GenerationID] = [], disk: DiskState = .upToDate,
              role: Role = .secondary, dirty: Bool = false, crashed: Bool = false, copyOnPeer: Bool = false, discard: Bool = false,
              size: UInt64 = 1 << 30, chunk: Int = 65536, fresh: Bool = false, empty: Bool = false, clean: Bool = false) -> SyncSide {
        SyncSide(node: n, generations: DataGenerations(current: cur, bitmap: bitmap, history: history), diskState: disk, role: role,
                 hasDirtyChunks: dirty, crashedPrimary: crashed, crashCopyOnPeer: copyOnPeer, discardLocal: discard, sizeBytes: size, chunkBytes: chunk,
                 fresh: fresh, emptyFresh: empty, assumeClean: clean)
    }

    /// Asserts the decision from a's side and the mirrored one from b's side.
    func check(_ a: SyncSide, _ b: SyncSide, _ expected: SyncDecision, file: StaticString = #filePath, line: UInt = #line) {
        let da = SyncDecision.decide(me: a, peer: b), db = SyncDecision.decide(me: b, peer: a)
        switch expected {
        case .splitBrain:
            guard case .splitBrain = da, case .splitBrain = db else { return XCTFail("\(da) / \(db)", file: file, line: line) }
        case .refuse:
            guard case .refuse = da, case .refuse = db else { return XCTFail("\(da) / \(db)", file: file, line: line) }
        default:
            XCTAssertEqual(da, expected, "a's view", file: file, line: line)
            XCTAssertEqual(db, expected.mirrored, "b's view", file: file, line: line)
        }
    }
}

final class GenerationDecisionTests: GenerationRowTestCase {
    func testEqualCurrentClean() {
        check(side("a", X1), side("b", X1), .inSync)
        check(side("a", X1, role: .primary), side("b", X1), .inSync)
        check(side("a", X1, disk: .outdated), side("b", X1), .inSync)
    }

    func testEqualCurrentWithDirtyChunks() {
        // Primary side is source.
        check(side("a", X1, dirty: true), side("b", X1, role: .primary), .becomeTarget(.bitmap))
        // Crashed primary's AL: the crashed side is source when neither is primary.
        check(side("a", X1, dirty: true), side("b", X1, dirty: true, crashed: true), .becomeTarget(.bitmap))
        // Only one side dirty.
        check(side("a", X1), side("b", X1, dirty: true), .becomeTarget(.bitmap))
        // Both dirty, same standing: the name sorting first is source, from both ends.
        check(side("a", X1, dirty: true), side("b", X1, dirty: true), .becomeSource(.bitmap))
        // Two secondaries, both dirty: the one that was primary since it started (demoted, no
        // crash) holds the newest writes and is source, whatever the names (seed 1044).
        var wasPrimary = side("b", X1, dirty: true)
        wasPrimary.wasPrimary = true
        check(side("a", X1, dirty: true), wasPrimary, .becomeTarget(.bitmap))
        var cleanWasPrimary = side("b", X1)
        cleanWasPrimary.wasPrimary = true
        check(side("a", X1, dirty: true), cleanWasPrimary, .becomeTarget(.bitmap))
        // Two secondaries: the later primary is source, even against a crashed primary of an
        // older epoch (seed 2618: the crashed master of epoch 2 would overwrite what its
        // successor of epoch 3 acknowledged before it was demoted).
        var crashedOld = side("a", X1, dirty: true, crashed: true)
        crashedOld.primaryEpoch = Epoch(2)
        var demotedNew = side("b", X1, dirty: true)
        demotedNew.primaryEpoch = Epoch(3)
        check(crashedOld, demotedNew, .becomeTarget(.bitmap))
        // A crashed primary under protocol B/C: its up-to-date peer holds every write it
        // acknowledged, so the peer is source for the crash extents, even when the crashed
        // side was primary in a later epoch (it is the one whose unflushed writes are gone).
        var crashedC = side("a", X1, dirty: true, crashed: true, copyOnPeer: true)
        crashedC.primaryEpoch = Epoch(4)
        check(crashedC, side("b", X1), .becomeTarget(.bitmap))
        check(side("a", X1), side("b", X1, dirty: true, crashed: true, copyOnPeer: true), .becomeSource(.bitmap))
        // … but not from an outdated peer, not from another crashed primary, and never into a
        // primary: there the crashed side's own copy stays the source.
        check(crashedC, side("b", X1, disk: .outdated), .becomeSource(.bitmap))
        check(side("a", X1, dirty: true, crashed: true, copyOnPeer: true), side("b", X1, dirty: true, crashed: true), .becomeSource(.bitmap))
        check(side("a", X1, role: .primary, dirty: true, crashed: true, copyOnPeer: true), side("b", X1), .becomeSource(.bitmap))
        // A later primary still wins over a crashed one of protocol B/C (it holds those writes).
        var later = side("b", X1, dirty: true)
        later.primaryEpoch = Epoch(5)
        check(crashedC, later, .becomeTarget(.bitmap))
        // An interrupted resync: the inconsistent side is target.
        check(side("a", X1, disk: .inconsistent), side("b", X1), .becomeTarget(.bitmap))
        check(side("a", X1, role: .primary), side("b", X1, role: .primary), .refuse(""))
    }

    func testBitmapRelation() {
        // a branched from X1 while b stayed there: a is source for its bitmap.
        check(side("a", X2, bitmap: X1, role: .primary), side("b", X1), .becomeSource(.bitmap))
        check(side("a", X1), side("b", X2, bitmap: X1), .becomeTarget(.bitmap))
        // Returning crashed primary (X1 + AL) against the promoted node (X2 over X1).
        check(side("a", X1, dirty: true, crashed: true), side("b", X2, bitmap: X1, role: .primary), .becomeTarget(.bitmap))
        // Interrupted resync target still at X1, inconsistent.
        check(side("a", X2, bitmap: X1), side("b", X1, disk: .inconsistent), .becomeSource(.bitmap))
    }

    func testHistoryRelationNeedsFullSync() {
        check(side("a", X3, history: [X2, X1]), side("b", X1), .becomeSource(.full))
        check(side("a", X1, disk: .inconsistent), side("b", X3, bitmap: X2, history: [X1]), .becomeTarget(.full))
    }

    func testSplitBrain() {
        // Both branched from X1 and wrote.
        check(side("a", X2, bitmap: X1, role: .primary), side("b", X3, bitmap: X1, role: .primary), .splitBrain(""))
        check(side("a", X2, bitmap: X1), side("b", X3, bitmap: X1), .splitBrain(""))
        // Diverged from a common ancestor further back.
        check(side("a", X2, bitmap: X1, history: [X0]), side("b", X3, bitmap: X0), .splitBrain(""))
        // Unrelated data.
        check(side("a", X2), side("b", Z), .splitBrain(""))
        if case .splitBrain(let why) = SyncDecision.decide(me: side("a", X2), peer: side("b", Z)) {
            XCTAssertTrue(why.contains("unrelated"), why)
        }
    }

    func testSplitBrainResolvedByDiscardingOneSide() {
        check(side("a", X2, bitmap: X1, discard: true), side("b", X3, bitmap: X1, role: .primary), .becomeTarget(.bitmap))
        check(side("a", X2, bitmap: X1), side("b", X3, bitmap: X1, discard: true), .becomeSource(.bitmap))
        check(side("a", X2, discard: true), side("b", Z), .becomeTarget(.full))
        // Both asked to discard: still split brain.
        check(side("a", X2, bitmap: X1, discard: true), side("b", X3, bitmap: X1, discard: true), .splitBrain(""))
    }

    func testRefusals() {
        check(side("a", X1), side("b", X1, size: 2 << 30), .refuse(""))
        check(side("a", X1), side("b", X1, chunk: 4096), .refuse(""))
        check(side("a", X1, disk: .inconsistent), side("b", X1, disk: .inconsistent), .refuse(""))
        check(side("a", X1, disk: .diskless), side("b", X1), .refuse(""))
        check(side("a", .none), side("b", X1), .refuse(""))
        // A primary is never made a sync target.
        check(side("a", X2, bitmap: X1), side("b", X1, role: .primary), .refuse(""))
        check(side("a", X3, history: [X1]), side("b", X1, role: .primary), .refuse(""))
    }

    func testSymmetryOverRandomPairs() {
        var rng = SplitMix64(seed: 7)
        let ids = [GenerationID.none, X0, X1, X2, X3]
        func pick<T>(_ xs: [T]) -> T { xs[Int(rng.next() % UInt64(xs.count))] }
        for _ in 0..<5000 {
            let a = side("a", pick(Array(ids.dropFirst())), bitmap: pick(ids), history: [pick(ids)].filter { !$0.isNone },
                         disk: pick(DiskState.allCases), role: pick(Role.allCases), dirty: pick([true, false]),
                         crashed: pick([true, false]), copyOnPeer: pick([true, false]), discard: pick([true, false]), empty: pick([true, false]), clean: pick([true, false]))
            let b = side("b", pick(Array(ids.dropFirst())), bitmap: pick(ids), history: [pick(ids)].filter { !$0.isNone },
                         disk: pick(DiskState.allCases), role: pick(Role.allCases), dirty: pick([true, false]),
                         crashed: pick([true, false]), copyOnPeer: pick([true, false]), discard: pick([true, false]), empty: pick([true, false]), clean: pick([true, false]))
            let da = SyncDecision.decide(me: a, peer: b), db = SyncDecision.decide(me: b, peer: a)
            XCTAssertEqual(da.mirrored, db, "\(a) vs \(b)")
            // Invariants: never sync into a primary, never from an inconsistent side.
            if case .becomeSource = da { XCTAssertNotEqual(b.role, .primary); XCTAssertNotEqual(a.diskState, .inconsistent) }
            if case .becomeTarget = da { XCTAssertNotEqual(a.role, .primary); XCTAssertNotEqual(b.diskState, .inconsistent) }
            // An inconsistent side becomes up to date only from an up-to-date source, or when
            // it is fresh and provably empty.
            if case .becomeSource = da, b.diskState == .inconsistent { XCTAssertEqual(a.diskState, .upToDate) }
            if case .becomeTarget = da, a.diskState == .inconsistent { XCTAssertEqual(b.diskState, .upToDate) }
            if case .adoptClean = da {
                if a.diskState == .inconsistent { XCTAssertTrue(a.emptyFresh) }
                if b.diskState == .inconsistent { XCTAssertTrue(b.emptyFresh) }
            }
            // Never "in sync" with a side that holds no consistent data.
            if case .inSync = da { XCTAssertNotEqual(a.diskState, .inconsistent); XCTAssertNotEqual(b.diskState, .inconsistent) }
        }
    }
}
