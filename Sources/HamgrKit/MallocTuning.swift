/// Keeps large buffers in the heap. By default glibc serves every allocation over 128 KiB
/// (raised dynamically up to 32 MiB) with its own mmap, and returns freed memory at the top
/// of the heap to the system: each 1 MiB write then costs page faults and zeroing of fresh
/// pages on every buffer it passes through (perf: 13 % of a replicating master's CPU at
/// 1 MiB writes). Fixed thresholds keep buffers up to 32 MiB (the largest NBD request) in
/// the heap and free memory there for reuse; the memory is bounded by the in-flight limits
/// of the NBD server and the link, not by this.
public func tuneMallocForLargeBuffers() {
    _ = glibcMallopt(-3 /* M_MMAP_THRESHOLD */, 32 << 20)
    _ = glibcMallopt(-1 /* M_TRIM_THRESHOLD */, 256 << 20)
}

@_silgen_name("mallopt")
private func glibcMallopt(_ param: Int32, _ value: Int32) -> Int32
