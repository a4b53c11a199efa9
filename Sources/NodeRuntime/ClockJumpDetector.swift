import HACore

/// Detects that this node's monotonic clock stood still while real time went on — a process
/// or VM freeze (a paused KVM guest's CLOCK_MONOTONIC and CLOCK_BOOTTIME stop; its wall clock
/// is stepped forward afterwards by the guest agent or NTP). The shell samples both clocks on
/// every tick; a gap larger than `threshold` between how far the reference (wall) clock and
/// the monotonic clock advanced is fed to the core as `NodeEvent.clockJump`. NTP slewing
/// (≤ 500 ppm) never comes near the threshold; a wall-clock step by an operator is a false
/// alarm that costs one renewal round of closed gate.
public struct ClockJumpDetector: Sendable {
    public let threshold: Duration
    private var last: (monotonic: Instant, reference: Instant)?

    public init(threshold: Duration) { self.threshold = threshold }

    /// The jump since the previous sample, when it exceeds the threshold.
    public mutating func observe(monotonic: Instant, reference: Instant) -> Duration? {
        defer { last = (monotonic, reference) }
        guard let l = last else { return nil }
        let gap = (reference - l.reference) - (monotonic - l.monotonic)
        return gap > threshold ? gap : nil
    }
}
