import XCTest
@testable import HACore

final class LeaseTimingsTests: XCTestCase {
    func testDefaultsSatisfyTheLeaseRule() {
        XCTAssertEqual(LeaseTimings.defaults.violations(), [])
        XCTAssertEqual(LeaseTimings.defaults.masterLeaseSpan, .milliseconds(1080))
    }

    func testEachBrokenRuleNamesItsKey() {
        XCTAssertTrue(LeaseTimings(renewInterval: .milliseconds(400)).violations().contains { $0.hasPrefix("timeouts.renew_interval_ms") })
        XCTAssertTrue(LeaseTimings(failureTimeout: .milliseconds(1300)).violations().contains { $0.hasPrefix("timeouts.failure_timeout_ms") })
        XCTAssertTrue(LeaseTimings(failureTimeout: .milliseconds(300)).violations().contains { $0.hasPrefix("timeouts.failure_timeout_ms") })
        XCTAssertTrue(LeaseTimings(lease: .milliseconds(50)).violations().contains { $0.hasPrefix("timeouts.lease_ms") })
        XCTAssertTrue(LeaseTimings(drift: 0.7).violations().contains { $0.hasPrefix("timeouts.drift") })
        XCTAssertTrue(LeaseTimings(drift: 0).violations().contains { $0.hasPrefix("timeouts.drift") }, "no margin at all is refused")
        XCTAssertTrue(LeaseTimings(drift: .nan).violations().contains { $0.hasPrefix("timeouts.drift") })
        XCTAssertFalse(LeaseTimings(drift: 0.01).violations().contains { $0.hasPrefix("timeouts.drift") })
    }

    func testGenerationBranchKeepsTheBitmapBase() {
        var g = DataGenerations(current: GenerationID(1))
        g.branch(to: GenerationID(2))
        XCTAssertEqual(g.bitmap, GenerationID(1))
        g.branch(to: GenerationID(3))
        XCTAssertEqual(g.bitmap, GenerationID(1), "a second branch while still tracking keeps the original base")
        XCTAssertEqual(g.current, GenerationID(3))
        XCTAssertTrue(g.knows(GenerationID(2)))
    }
}
