import HACore

/// What carrying out a `ReplicationCore`'s actions needs from a shell: one method per
/// `CoreAction` case. `ReplicatedVolume` (files, sockets, the serial I/O queue) and the
/// whole-node simulator's volume (simulated disk and network) are the two hosts;
/// `perform(_:on:)` below is the only `switch` over `CoreAction`, so both carry out the core's
/// decisions the same way (issue 9, "one runtime").
///
/// Every method is called on the host's serial context (the volume's event loop, the
/// simulator's loop), in the order the core emitted the actions.
public protocol ReplicationHost: AnyObject {
    /// The epoch the core's frames carry (`ReplicationCore.frameEpoch`), read once per action
    /// list: it is the fencing token of every frame the list sends, data stream included.
    var frameEpoch: Epoch { get }
    /// Queue an ordered batch for the serial I/O queue: its steps run in order, after every
    /// batch queued before it; data-stream frames among them (`.send`, `.sendChunk`, ...) go to
    /// the session from that queue with `epoch`. The outcome comes back as `.io(then)` /
    /// `.ioFailed(failure, ...)` events, and `ack` (if any) is sent after the steps.
    func runIO(_ batch: IOBatch, epoch: Epoch)
    /// Send a control frame now (not part of the ordered data stream).
    func sendControl(_ message: LinkMessage, on session: SessionID, epoch: Epoch)
    /// Close a session; its end comes back as `.linkDown(session, ...)`.
    func closeSession(_ session: SessionID)
    /// Complete a client request: nil = success (the acknowledgement).
    func complete(_ request: RequestID, _ error: VolumeError?)
    /// The switchover drain ended: nil = the peer has every write.
    func drained(_ request: RequestID, _ error: VolumeError?)
    /// A state change for the node runtime (peer, disk, split brain, disk failure, progress).
    func emit(_ event: ReplicationEvent)
    func log(_ level: CoreLogLevel, _ message: String)
    /// Feed `.tick` after this long (on the host's clock).
    func wakeUp(after delay: Duration)
    /// Called once after the whole action list was carried out: a host that defers client
    /// completions (so a completion callback's next request queues behind this list's I/O)
    /// runs them here.
    func didPerform()
}

extension ReplicationHost {
    public func didPerform() {}
}

/// Carries out a core step's actions, in order, on `host`: the only interpreter of
/// `CoreAction`.
public func perform(_ actions: [CoreAction], on host: some ReplicationHost) {
    guard !actions.isEmpty else { return }
    let epoch = host.frameEpoch
    for action in actions {
        switch action {
        case .io(let batch): host.runIO(batch, epoch: epoch)
        case let .send(session, message): host.sendControl(message, on: session, epoch: epoch)
        case .close(let session): host.closeSession(session)
        case let .complete(request, error): host.complete(request, error)
        case let .drained(request, error): host.drained(request, error)
        case .emit(let event): host.emit(event)
        case let .log(level, message): host.log(level, message)
        case .wakeUp(let delay): host.wakeUp(after: delay)
        }
    }
    host.didPerform()
}
