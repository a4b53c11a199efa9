import HACore
import XCTest
@testable import Quorum

/// The render-time rule (issue 8): what a node announces as its role is derived from the
/// lease expiry against the clock read at render time, never from the role the core cached
/// at its last event. `/status`, the `hamgr_role` gauge and `hactl status` all render
/// `NodeQuorumStatus.announced(at:)`.
final class AnnouncedStatusTests: XCTestCase {
    typealias H = Harness

    /// A primary whose lease is running is announced as it is.
    func testPrimaryWithRunningLeaseIsAnnouncedAsPrimary() {
        let h = H()
        h.electA()
        let snap = h.status(H.a)
        XCTAssertEqual(snap.role, .primary)
        let until = try! XCTUnwrap(snap.leaseValidUntil)
        let shown = snap.announced(at: until - .nanoseconds(1))
        XCTAssertEqual(shown.role, .primary)
        XCTAssertEqual(shown.master, H.a)
        XCTAssertTrue(shown.hasQuorum)
        XCTAssertNil(shown.whyNotPromoted)
        XCTAssertEqual(shown.leaseRemaining(at: until - .milliseconds(7)), .milliseconds(7))
    }

    /// The snapshot still says primary (no event has reached the core since), but the clock
    /// has passed the lease: the announcement is secondary, demoting, with no master.
    func testStaleSnapshotPastItsLeaseIsNotAnnouncedAsPrimary() {
        let h = H()
        h.electA()
        let snap = h.status(H.a)
        let until = try! XCTUnwrap(snap.leaseValidUntil)
        for late in [until, until + .milliseconds(10), until + .seconds(5)] {
            XCTAssertEqual(h.status(H.a).role, .primary, "premise: the core has not been fed, so its cached role is still primary")
            let shown = snap.announced(at: late)
            XCTAssertEqual(shown.role, .secondary, "announced primary \(late - until) after the lease lapsed")
            XCTAssertNil(shown.master)
            XCTAssertNil(shown.leaseValidUntil)
            XCTAssertFalse(shown.hasQuorum)
            XCTAssertFalse(shown.peerOutdated)
            XCTAssertEqual(shown.whyNotPromoted, NodeQuorumStatus.leaseLapsedReason)
            XCTAssertEqual(shown.leaseRemaining(at: late), .zero)
            XCTAssertEqual(shown.epoch, snap.epoch, "the promised epoch is unchanged")
        }
    }

    /// The announced role and the write gate agree at every instant: primary exactly while
    /// an acknowledgement would be allowed.
    func testAnnouncedPrimaryIffTheGateWouldAck() {
        let h = H()
        h.electA()
        let snap = h.status(H.a)
        let until = try! XCTUnwrap(snap.leaseValidUntil)
        XCTAssertEqual(snap.gate.validUntil, until)
        var t = h.now
        var checked = 0
        while t < until + .milliseconds(50) {
            XCTAssertEqual(snap.announced(at: t).role == .primary, snap.gate.allowsAck(at: t), "at \(t)")
            t = t + .microseconds(997)
            checked += 1
        }
        XCTAssertGreaterThan(checked, 100)
    }

    /// A primary snapshot without a lease expiry (never expected from the core) is not
    /// announced as primary: no lease, no mastership.
    func testPrimaryWithoutLeaseExpiryIsNotAnnouncedAsPrimary() {
        let h = H()
        h.electA()
        var snap = h.status(H.a)
        snap.leaseValidUntil = nil
        XCTAssertEqual(snap.announced(at: h.now).role, .secondary)
        XCTAssertEqual(snap.leaseRemaining(at: h.now), .zero)
    }

    /// Secondaries are announced unchanged at any time.
    func testSecondaryIsAnnouncedUnchanged() {
        let h = H()
        h.electA()
        let snap = h.status(H.b)
        XCTAssertEqual(snap.role, .secondary)
        for t in [h.now, h.now + .seconds(10)] {
            XCTAssertEqual(snap.announced(at: t), snap)
            XCTAssertEqual(snap.leaseRemaining(at: t), .zero)
        }
    }

    /// Once the core has demoted itself, the announcement agrees with it.
    func testAnnouncementAgreesWithTheCoreAfterItsOwnDemotion() {
        let h = H()
        h.electA()
        let until = try! XCTUnwrap(h.status(H.a).leaseValidUntil)
        h.handle(H.a, .tick, at: until + .seconds(1))
        h.inbox.removeAll()
        let snap = h.status(H.a)
        XCTAssertEqual(snap.role, .secondary)
        XCTAssertEqual(snap.announced(at: until + .seconds(1)), snap)
    }

    /// The core steps down at max(leaseValidUntil, primarySince + lease span): when the
    /// winning grant came back late, a tick just past the lease leaves the cached role
    /// primary. The announcement is secondary all the same.
    func testLateGrantWindowIsNotAnnouncedAsPrimaryEvenAfterATick() {
        let h = H()
        h.handle(H.a, .admin(.promote(force: false)))
        h.advance(.milliseconds(150)) // the votes come back late: the lease is anchored at the request
        h.deliverAll()
        let won = h.status(H.a)
        XCTAssertEqual(won.role, .primary)
        let until = try! XCTUnwrap(won.leaseValidUntil)
        XCTAssertEqual(until, h.now - .milliseconds(150) + h.t.masterLeaseSpan)
        // No renewal is granted (voters unreachable); a tick just after the lease ran out.
        let late = until + .milliseconds(1)
        h.handle(H.a, .tick, at: late)
        h.inbox.removeAll()
        let snap = h.status(H.a)
        XCTAssertEqual(snap.role, .primary, "premise: the core keeps its cached role until primarySince + lease span")
        XCTAssertFalse(snap.gate.allowsAck(at: late))
        XCTAssertEqual(snap.announced(at: late).role, .secondary)
        XCTAssertEqual(snap.announced(at: late).whyNotPromoted, NodeQuorumStatus.leaseLapsedReason)
    }
}
