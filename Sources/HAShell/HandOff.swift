import Foundation

/// Work handed from one thread to another, run there as one task per burst instead of one
/// task (and one wake-up) per item. `post` says whether the caller must schedule the task;
/// the task `take`s everything posted so far, in order.
public final class HandOff<Item>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [Item] = []
    private var scheduled = false

    public init() {}

    /// Queues `new`; true when no task is pending and the caller must schedule one.
    public func post(_ new: [Item]) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        items += new
        if scheduled { return false }
        scheduled = true
        return true
    }

    /// Everything posted so far; the next `post` schedules a new task.
    public func take() -> [Item] {
        lock.lock()
        defer { lock.unlock() }
        let out = items
        items = []
        scheduled = false
        return out
    }
}
