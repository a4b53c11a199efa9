import XCTest

/// The datadriven transcripts in `testdata/` (see `Transcript`). One test per file.
final class TranscriptTests: XCTestCase {
    func testBasics() { Transcript.run("basics.txt") }
    func testClockFreeze() { Transcript.run("clock-freeze.txt") }
    func testSwitchoverAbandoned() { Transcript.run("switchover-abandoned.txt") }
    func testFailedCandidacyDoesNotFence() { Transcript.run("failed-candidacy-fence.txt") }
    func testStartEmitsThePersistedFence() { Transcript.run("start-fence.txt") }
    func testClearOutdateIsBoundToSenderAndEpoch() { Transcript.run("clear-outdate-bound.txt") }
    func testStaleOutdateMarkOnNewMasterIsCleared() { Transcript.run("stale-outdate-mark.txt") }
    func testServicesAreFencedBeforeTheLeaseLapses() { Transcript.run("fence-services.txt") }

    // Rules of design.md §2 that read better as transcripts (converted from ProtocolRuleTests).
    func testRuleEpochsNeverGoBack() { Transcript.run("rules-epochs.txt") }
    func testRuleSwitchoverHandsOverAtOnce() { Transcript.run("rules-switchover.txt") }
}
