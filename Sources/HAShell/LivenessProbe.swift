import Dispatch
import Foundation
import NIOCore

/// Proves that a daemon's event loops and queues still run work: each check hands a no-op to
/// every executor and waits, bounded, for all of them to run it. The systemd watchdog is fed
/// from this, not from health: a node whose disk failed is alive and must stay up (reporting
/// `diskless` on `/healthz` and in metrics), while a node with a hung loop must stop pinging
/// so systemd restarts it.
public final class LivenessProbe: @unchecked Sendable {
    /// Runs the given work on the probed thread (an event loop's `execute`, a queue's `async`).
    public typealias Executor = @Sendable (@escaping @Sendable () -> Void) -> Void

    private let executors: [(name: String, run: Executor)]

    public init(_ executors: [(name: String, run: Executor)]) {
        self.executors = executors
    }

    /// The names of the executors that did not run a no-op within `bound` (empty: all alive).
    /// Blocks the calling thread for at most `bound`; never call it on a probed executor.
    public func stuck(within bound: Duration) -> [String] {
        let group = DispatchGroup()
        let lock = NSLock()
        var answered = Set<Int>()
        for (i, e) in executors.enumerated() {
            group.enter()
            e.run {
                lock.lock(); answered.insert(i); lock.unlock()
                group.leave()
            }
        }
        _ = group.wait(timeout: .now() + .nanoseconds(Int(bound.nanosecondsClamped)))
        lock.lock(); defer { lock.unlock() }
        return executors.indices.filter { !answered.contains($0) }.map { executors[$0].name }
    }
}

extension LivenessProbe {
    /// One executor per event loop of `group` ("event loop 0", …).
    public static func loops(of group: EventLoopGroup, prefix: String = "event loop") -> [(name: String, run: Executor)] {
        var out: [(name: String, run: Executor)] = []
        for (i, loop) in group.makeIterator().enumerated() {
            out.append(("\(prefix) \(i)", { work in loop.execute(work) }))
        }
        return out
    }

    /// A dispatch queue as an executor.
    public static func queue(_ q: DispatchQueue, name: String) -> (name: String, run: Executor) {
        (name, { work in q.async(execute: work) })
    }
}
