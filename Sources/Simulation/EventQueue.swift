/// The simulator's agenda: a binary min-heap on (real time, insertion order), so events of
/// the same instant run in the order they were scheduled. Everything the simulation does is
/// one of these closures; nothing runs concurrently.
struct EventQueue {
    struct Entry {
        var time: Int64
        var seq: UInt64
        var run: () -> Void
    }
    private var heap: [Entry] = []
    private var seq: UInt64 = 0

    init() { heap.reserveCapacity(512) }

    var isEmpty: Bool { heap.isEmpty }
    var count: Int { heap.count }

    private static func less(_ a: Entry, _ b: Entry) -> Bool { a.time != b.time ? a.time < b.time : a.seq < b.seq }

    mutating func push(_ time: Int64, _ run: @escaping () -> Void) {
        seq &+= 1
        heap.append(Entry(time: time, seq: seq, run: run))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if Self.less(heap[i], heap[parent]) { heap.swapAt(i, parent); i = parent } else { break }
        }
    }

    mutating func pop() -> Entry? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count, Self.less(heap[l], heap[m]) { m = l }
            if r < heap.count, Self.less(heap[r], heap[m]) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return top
    }
}
