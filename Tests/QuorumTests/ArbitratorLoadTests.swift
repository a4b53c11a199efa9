import HACore
import XCTest
@testable import Quorum

/// The arbitrator serves many clusters from one process (design.md §2): a routine renewal must
/// cost a lookup and a reply, never a persist (an fsync per cluster per second would not scale).
final class ArbitratorLoadTests: XCTestCase {
    func testRoutineRenewalsOfTenThousandClustersNeverPersist() {
        var w = ArbitratorCore(settings: QuorumSettings(), persisted: [:])
        let names = (0..<10_000).map { "cluster-\($0)" }
        var t = Instant(nanoseconds: 1_000_000_000_000)
        // First renewal of each cluster adopts epoch 1: one persist each.
        var persists = 0
        for n in names {
            for a in w.handle(cluster: n, from: "a", .renew(epoch: Epoch(1), seq: 1, generation: GenerationID(1)), at: t) {
                if case .persist = a { persists += 1 }
            }
        }
        XCTAssertEqual(persists, names.count)
        // Then three seconds at 1 Hz: replies only.
        let start = ContinuousClock.now
        var replies = 0
        for round in 2...4 {
            t = t + .seconds(1)
            for n in names {
                for a in w.handle(cluster: n, from: "a", .renew(epoch: Epoch(1), seq: UInt64(round), generation: GenerationID(1)), at: t) {
                    switch a {
                    case .persist: XCTFail("routine renewal persisted for \(n)")
                    case .send(_, _, .stamped(_, .renewReply(_, _, true, _))): replies += 1
                    default: break
                    }
                }
            }
        }
        let elapsed = ContinuousClock.now - start
        XCTAssertEqual(replies, 3 * names.count)
        XCTAssertEqual(w.clusters.count, names.count)
        print("arbitrator: \(replies) routine renewals for \(names.count) clusters in \(elapsed) (debug build)")
    }
}

/// The per-message and per-scrape accessors the daemon uses instead of `status(cluster:)`.
final class ArbitratorAccessorTests: XCTestCase {
    func testEpochAndMetricsRowsAgreeWithStatus() {
        var w = ArbitratorCore(settings: QuorumSettings(), persisted: [:])
        let t = Instant(nanoseconds: 1_000_000_000_000)
        XCTAssertEqual(w.epoch(cluster: "x"), .zero)
        _ = w.handle(cluster: "x", from: "a", .renew(epoch: Epoch(3), seq: 1, generation: GenerationID(1)), at: t)
        _ = w.handle(cluster: "y", from: "a", .outdate(peer: "b", epoch: Epoch(2), instance: 1), at: t)
        for name in ["x", "y"] {
            XCTAssertEqual(w.epoch(cluster: name), w.status(cluster: name)?.epoch)
        }
        let rows = Dictionary(uniqueKeysWithValues: w.metricsRows(at: t).map { ($0.cluster, $0) })
        XCTAssertEqual(Set(rows.keys), ["x", "y"])
        XCTAssertEqual(rows["x"]?.epoch, Epoch(3))
        XCTAssertEqual(rows["x"]?.leaseValid, true)
        XCTAssertEqual(rows["x"]?.outdatedNodes, 0)
        XCTAssertEqual(rows["y"]?.epoch, Epoch(2))
        XCTAssertEqual(rows["y"]?.outdatedNodes, 1)
        // After the lease: no longer valid.
        XCTAssertEqual(w.metricsRows(at: t + w.settings.timings.lease + .milliseconds(1)).first { $0.cluster == "x" }?.leaseValid, false)
    }
}
