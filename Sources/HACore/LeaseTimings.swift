/// The timing knobs of design.md §2, with the one inequality they must satisfy.
public struct LeaseTimings: Hashable, Sendable, Codable {
    /// How often the master renews its lease with peer and arbitrator.
    public var renewInterval: Duration
    /// How long a voter honours a grant, on its own clock.
    public var lease: Duration
    /// How long a secondary waits without hearing from the master before asking for votes.
    public var failureTimeout: Duration
    /// Bound on the relative clock-rate difference between any two nodes (0.1 = 10 %).
    public var drift: Double

    public init(renewInterval: Duration = .milliseconds(200), lease: Duration = .milliseconds(1200),
                failureTimeout: Duration = .milliseconds(800), drift: Double = 0.1) {
        self.renewInterval = renewInterval
        self.lease = lease
        self.failureTimeout = failureTimeout
        self.drift = drift
    }

    public static let defaults = LeaseTimings()

    /// The master counts its lease only this long after sending the renewal that was granted:
    /// a voter's grant lasts `lease` on the voter's clock from a later instant, and the two
    /// clocks may differ in rate by `drift`, so the master's view ends first.
    public var masterLeaseSpan: Duration { lease.scaled(by: 1 - drift) }

    /// The smallest clock-rate margin accepted (1 %).
    public static let minimumDrift = 0.01

    /// Violations of the lease rule, each naming the key (empty = valid).
    /// renew_interval ≤ lease·(1−drift)/3 (three chances to renew before it lapses),
    /// renew_interval < failure_timeout < lease (a backup notices a dead master before the
    /// voters' grants lapse, and never sooner than two missed renewals).
    public func violations() -> [String] {
        var out: [String] = []
        // drift 0 would leave no margin at all between the master's lease and the voters'
        // grants: any clock running a little fast on a voter opens a window for two masters.
        if !(drift >= Self.minimumDrift && drift < 0.5) {
            out.append("timeouts.drift: must be in [\(Self.minimumDrift), 0.5), got \(drift); it is the margin between the master's lease and the voters' grants")
            return out  // the rules below scale by (1 − drift): not with this value (NaN would trap)
        }
        if lease < .milliseconds(100) { out.append("timeouts.lease_ms: must be at least 100 ms, got \(Int(lease.milliseconds))") }
        if renewInterval <= .zero { out.append("timeouts.renew_interval_ms: must be positive") }
        let maxRenew = masterLeaseSpan.scaled(by: 1.0 / 3.0)
        if renewInterval > maxRenew {
            out.append("timeouts.renew_interval_ms: \(Int(renewInterval.milliseconds)) ms exceeds lease_ms·(1−drift)/3 = \(Int(maxRenew.milliseconds)) ms; the master would get fewer than three chances to renew")
        }
        if failureTimeout >= lease {
            out.append("timeouts.failure_timeout_ms: \(Int(failureTimeout.milliseconds)) ms must be below lease_ms (\(Int(lease.milliseconds)) ms)")
        }
        if failureTimeout < renewInterval * 2 {
            out.append("timeouts.failure_timeout_ms: \(Int(failureTimeout.milliseconds)) ms must be at least two renew intervals (\(Int((renewInterval * 2).milliseconds)) ms)")
        }
        return out
    }
}
