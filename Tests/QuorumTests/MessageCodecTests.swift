import HACore
import XCTest
@testable import Quorum

/// The wire codec: every message round-trips; garbage never crashes (fuzzed with a seeded
/// generator), is bounded, and is refused with a reason.
final class MessageCodecTests: XCTestCase {
    static let gens = DataGenerations(current: GenerationID(0xABCD), bitmap: GenerationID(7),
                                      history: [GenerationID(5), GenerationID(3), GenerationID(2), GenerationID(1)])
    static let samples: [QuorumMessage] = [
        .renew(epoch: Epoch(1), seq: 2, generation: GenerationID(3)),
        .renewReply(epoch: Epoch(4), seq: .max, granted: true, promised: Epoch(5)),
        .renewReply(epoch: Epoch(4), seq: 0, granted: false, promised: Epoch(.max)),
        .voteRequest(VoteRequest(epoch: Epoch(9), round: 3, disk: .upToDate, generations: gens, force: false)),
        .voteRequest(VoteRequest(epoch: Epoch(9), round: 3, disk: .diskless, generations: DataGenerations(current: .none), force: true)),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: nil),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(3), refusal: .staleEpoch),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .alreadyVoted("node-ä")),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .leaseHeld(holder: "a", remainingMilliseconds: 1199)),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .restartQuarantine(remainingMilliseconds: 3)),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .isMaster),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .notUpToDate(.inconsistent)),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .outdated(at: Epoch(7))),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .dataBehind),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .diverged),
        .voteReply(epoch: Epoch(2), round: 1, promised: Epoch(2), refusal: .other("maintenance")),
        .outdate(peer: "b", epoch: Epoch(3), instance: 4),
        .outdateReply(peer: "b", epoch: Epoch(3), instance: 4, granted: true, promised: Epoch(3)),
        .clearOutdate(peer: "b", epoch: Epoch(3), instance: 4),
        .clearOutdateReply(peer: "b", epoch: Epoch(3), instance: 4),
        .release(epoch: Epoch(8), handoverTo: "b"),
        .release(epoch: Epoch(8), handoverTo: nil),
        .heartbeat(Heartbeat(epoch: Epoch(1), master: "a", disk: .outdated, generations: gens, maintenance: true)),
        .heartbeat(Heartbeat(epoch: Epoch(1), master: nil, disk: .upToDate, generations: gens, maintenance: false)),
        .identify,
        .identifyReply(promised: Epoch(9)),
        .stamped(incarnation: 0xFEED_F00D, .voteReply(epoch: Epoch(2), round: 7, promised: Epoch(2), refusal: nil)),
        .stamped(incarnation: 1, .identifyReply(promised: Epoch(3))),
    ]

    func testEveryMessageRoundTrips() throws {
        for m in Self.samples {
            let bytes = m.encoded()
            XCTAssertLessThanOrEqual(bytes.count, QuorumMessage.maxEncodedBytes)
            XCTAssertEqual(try QuorumMessage.decode(bytes), m)
        }
    }

    func testEveryTruncationAndExtensionIsRefused() {
        for m in Self.samples {
            let bytes = m.encoded()
            for n in 0..<bytes.count {
                XCTAssertThrowsError(try QuorumMessage.decode(Array(bytes.prefix(n))), "prefix \(n) of \(m)")
            }
            XCTAssertThrowsError(try QuorumMessage.decode(bytes + [0]))
        }
        XCTAssertThrowsError(try QuorumMessage.decode([UInt8](repeating: 1, count: QuorumMessage.maxEncodedBytes + 1)))
        XCTAssertThrowsError(try QuorumMessage.decode([0]))
        XCTAssertThrowsError(try QuorumMessage.decode([200]))
    }

    func testSpecificGarbageIsRefusedWithAReason() {
        // Boolean byte 2, disk state 9, history of 5, invalid UTF-8 and empty node names.
        var bad = QuorumMessage.renewReply(epoch: Epoch(1), seq: 1, granted: true, promised: Epoch(1)).encoded()
        bad[17] = 2
        XCTAssertThrowsError(try QuorumMessage.decode(bad)) { XCTAssertTrue("\($0)".contains("boolean")) }
        var disk = QuorumMessage.voteRequest(VoteRequest(epoch: Epoch(1), round: 1, disk: .upToDate, generations: Self.gens)).encoded()
        disk[17] = 9
        XCTAssertThrowsError(try QuorumMessage.decode(disk)) { XCTAssertTrue("\($0)".contains("disk state")) }
        var history = QuorumMessage.voteRequest(VoteRequest(epoch: Epoch(1), round: 1, disk: .upToDate, generations: Self.gens)).encoded()
        history[34] = 5
        XCTAssertThrowsError(try QuorumMessage.decode(history)) { XCTAssertTrue("\($0)".contains("history")) }
        XCTAssertThrowsError(try QuorumMessage.decode([5, 2, 0xFF, 0xFE] + [UInt8](repeating: 0, count: 16)))
        XCTAssertThrowsError(try QuorumMessage.decode([5, 0] + [UInt8](repeating: 0, count: 16)))
    }

    /// Seeded fuzzing: random bytes and single-byte mutations of valid messages. Decoding must
    /// never trap; whatever decodes must re-encode to the same bytes (one canonical encoding).
    func testFuzzedInputNeverCrashes() {
        var rng = SplitMix64(seed: 0x5EED)
        var decoded = 0
        for i in 0..<60_000 {
            var bytes: [UInt8]
            if i % 2 == 0 {
                bytes = (0..<Int(rng.next() % 48)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                if !bytes.isEmpty { bytes[0] = UInt8(1 + rng.next() % 11) }
            } else {
                bytes = Self.samples[Int(rng.next() % UInt64(Self.samples.count))].encoded()
                for _ in 0..<(1 + rng.next() % 3) {
                    switch rng.next() % 3 {
                    case 0: bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: bytes.removeLast(Int(rng.next() % UInt64(min(4, bytes.count))))
                    default: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: Int(rng.next() % UInt64(bytes.count + 1)))
                    }
                    if bytes.isEmpty { break }
                }
            }
            if let m = try? QuorumMessage.decode(bytes) {
                decoded += 1
                XCTAssertEqual(m.encoded(), bytes)
            }
        }
        XCTAssertGreaterThan(decoded, 100, "mutations should sometimes stay valid")
    }

    /// Garbage that decodes (authenticated but absurd) must not crash the cores either.
    func testCoresSurviveAbsurdButWellFormedMessages() {
        let h = Harness()
        h.electA()
        let absurd: [QuorumMessage] = [
            .renew(epoch: Epoch(.max), seq: .max, generation: .none),
            .voteRequest(VoteRequest(epoch: Epoch(.max), round: .max, disk: .upToDate, generations: DataGenerations(current: .none))),
            .release(epoch: Epoch(.max), handoverTo: "a"),
            .release(epoch: Epoch(.max), handoverTo: "b"),
            .outdateReply(peer: "zzz", epoch: Epoch(.max), instance: .max, granted: true, promised: Epoch(.max)),
            .voteReply(epoch: Epoch(.max), round: .max, promised: Epoch(.max), refusal: nil),
            .heartbeat(Heartbeat(epoch: Epoch(.max), master: "q", disk: .diskless, generations: DataGenerations(current: .none), maintenance: true)),
        ]
        for m in absurd {
            for target in [Harness.a, Harness.b] {
                h.handle(target, .received(from: target == Harness.a ? Harness.b : Harness.a, m))
                h.handle(target, .received(from: Harness.w, m))
            }
            h.arbitrate(from: Harness.a, m)
            h.arbitrate(from: "stranger", m)
        }
        h.run(for: .seconds(5))
        h.handle(Harness.a, .admin(.promote(force: true)))
        h.handle(Harness.b, .admin(.promote(force: true)))
        XCTAssertLessThanOrEqual([Harness.a, Harness.b].filter { h.status($0).gate.allowsAck(at: h.now) }.count, 1)
    }

    func testPersistentStateRoundTrips() throws {
        let n = NodePersistentState(promisedEpoch: Epoch(9), votedFor: "b", master: "b", lastMasterEpoch: Epoch(4),
                                    role: .secondary, maintenance: true, peerOutdatedAt: Epoch(3))
        XCTAssertEqual(try NodePersistentState.decode(n.encoded()), n)
        XCTAssertEqual(try NodePersistentState.decode(NodePersistentState.initial.encoded()), .initial)
        let w = ArbitratorPersistentState(promisedEpoch: Epoch(3), votedFor: "a", master: "a", masterGeneration: GenerationID(77),
                                          outdated: [OutdateMark(node: "b", epoch: Epoch(3), instance: 2)],
                                          cleared: [OutdateMark(node: "b", epoch: Epoch(3), instance: 1)])
        XCTAssertEqual(try ArbitratorPersistentState.decode(w.encoded()), w)
        XCTAssertThrowsError(try NodePersistentState.decode(Array("{\"promisedEpoch\":".utf8)))
        XCTAssertThrowsError(try ArbitratorPersistentState.decode([0xFF, 0x00]))
    }
}
