import HAShell
import Logging
import NIOCore
import NIOSSL
import Replication

/// One NBD connection: the handshake, then pipelined requests. Confined to the channel's
/// event loop. Requests go to the volume as soon as they are decoded; replies are written
/// as each completes (in any order, as the spec allows) and flushed once per loop turn.
/// With `tls`, NBD_OPT_STARTTLS puts a TLS handler in front of this one, and everything
/// after its reply (options, then transmission) is encrypted.
///
/// Memory: a request is admitted only within the connection's `NBDInFlightBudget` and
/// counts against it until its reply's write completes; while the next request does not
/// fit, or the channel is not writable (replies queued past the high watermark), the
/// handler stops reading from the client (docs/nbd.md, "Memory bound").
final class NBDConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase { case clientFlags, options, transmission, closed }

    private let server: NBDServer
    /// nil: STARTTLS is unsupported on this connection (TLS off, or the Unix socket).
    private let tls: NBDServer.TLS?
    /// NBD_OPT_STARTTLS was acknowledged and the TLS handler added.
    private var tlsStarted = false
    private var logger: Logger
    private var phase = Phase.clientFlags
    private var pending: ByteBuffer?
    private var noZeroes = false
    private var structuredReplies = false

    // Transmission state.
    private var volume: BlockVolume?
    private var capabilities = VolumeCapabilities()
    private var exportSize: UInt64 = 0
    private var decoder = NBDRequestDecoder(maximumPayloadBytes: VolumeCapabilities().maximumBlockSize)
    /// Requests dispatched whose reply is not yet decided (NBD_CMD_DISC waits for them).
    private var unansweredRequests = 0
    /// Requests and bytes admitted whose replies are not yet written to the socket.
    private var budget: NBDInFlightBudget
    /// The request at the head of `pending` does not fit the budget: reading stays off.
    private var waitingForBudget = false
    private var processing = false
    private var disconnectRequested = false
    private var readingPaused = false
    private var flushScheduled = false
    /// Replies of this loop turn not yet handed to the channel: small replies share one buffer.
    private var outbound: ByteBuffer?
    /// The requests (count, payload bytes) whose replies are in `outbound`: released from
    /// the budget when the write carrying them completes.
    private var outboundReleases = (count: 0, cost: 0)
    /// A write whose header arrived before all of its payload: the payload is gathered as
    /// slices of the receive buffers (no copy on the event loop; perf showed the copy of
    /// 1 MiB writes as the loop thread's main cost) and handed to a `ScatterWriteVolume` as
    /// is, or joined for any other volume.
    private var partialWrite: (header: NBDRequestHeader, chunks: [ByteBuffer], received: Int)?
    private var context: ChannelHandlerContext?
    private var handshakeDeadline: Scheduled<Void>?

    init(server: NBDServer, tls: NBDServer.TLS?) {
        self.server = server
        self.tls = tls
        self.logger = server.logger
        self.budget = NBDInFlightBudget(limits: server.inFlightLimits)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if let peer = context.channel.remoteAddress { logger[metadataKey: "peer"] = "\(peer)" }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        phase = .closed
        pending = nil
        dropPartialWrite()
        dropOutbound()
    }

    func channelActive(context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 18)
        NBDHandshakeEncoder.writeGreeting(flags: NBDHandshakeFlags.fixedNewstyle | NBDHandshakeFlags.noZeroes, into: &out)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        handshakeDeadline = context.eventLoop.scheduleTask(in: server.handshakeTimeout) { [self] in
            guard phase == .clientFlags || phase == .options, let context = self.context else { return }
            logger.notice("NBD handshake not completed in time; closing")
            close(context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase != .closed, unansweredRequests > 0 || (pending?.readableBytes ?? 0) > 0 {
            logger.info("NBD client went away", metadata: ["inFlight": "\(unansweredRequests)", "unparsedBytes": "\(pending?.readableBytes ?? 0)"])
        }
        phase = .closed
        pending = nil
        dropPartialWrite()
        dropOutbound()
        handshakeDeadline?.cancel()
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if phase == .transmission { updateReading(context) }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if case NIOSSLError.handshakeFailed(let why) = error {
            logger.notice("NBD TLS handshake failed; closing", metadata: ["event": "nbd_tls_handshake_failed", "error": "\(why)"])
        } else {
            logger.debug("NBD connection error", metadata: ["error": "\(error)"])
        }
        close(context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        guard phase != .closed else { return }
        if var head = pending, head.readableBytes > 0, head.readableBytes < NBDLimits.requestHeaderBytes,
           phase == .transmission, partialWrite == nil {
            // A request header split between two reads: complete it from the new bytes (at
            // most 27 copied) and decode it first. Appending the whole read instead copied
            // every byte of the next megabyte write (perf: 18 % of a master's CPU at 1 MiB).
            pending = nil
            var part = incoming.readSlice(length: min(NBDLimits.requestHeaderBytes - head.readableBytes, incoming.readableBytes))!
            head.writeBuffer(&part)
            pending = head
            process(context)
            guard phase != .closed, incoming.readableBytes > 0 else { return }
        }
        if pending == nil || pending!.readableBytes == 0 {
            pending = incoming
        } else {
            pending!.writeBuffer(&incoming)  // only while reading is paused, or in the handshake
        }
        process(context)
    }

    // MARK: decoding

    private func process(_ context: ChannelHandlerContext) {
        guard !processing, var buffer = pending else { return }
        processing = true
        defer { processing = false }
        pending = nil
        var slicedPayloads = false
        do {
            loop: while buffer.readableBytes > 0 || decoder.isSkippingPayload && phase == .transmission {
                switch phase {
                case .clientFlags:
                    guard let flags = try NBDHandshakeDecoder.nextClientFlags(&buffer) else { break loop }
                    noZeroes = flags & NBDHandshakeFlags.clientNoZeroes != 0
                    phase = .options
                case .options:
                    guard let option = try NBDHandshakeDecoder.nextOption(&buffer) else { break loop }
                    if option.code == NBDOption.startTLS {
                        if try answerStartTLS(option, bytesAfter: buffer.readableBytes, context) { break loop }
                    } else {
                        handleOption(option, context)
                    }
                case .transmission:
                    if disconnectRequested {  // the client MUST NOT send after NBD_CMD_DISC
                        buffer.moveReaderIndex(to: buffer.writerIndex)
                        break loop
                    }
                    if var pw = partialWrite {  // admitted with its header
                        let n = min(Int(pw.header.length) - pw.received, buffer.readableBytes)
                        pw.chunks.append(buffer.readSlice(length: n)!)
                        pw.received += n
                        slicedPayloads = true
                        if pw.received < Int(pw.header.length) {
                            partialWrite = pw
                            break loop
                        }
                        partialWrite = nil
                        dispatch(pw.header, payload: nil, writeChunks: pw.chunks, cost: Int(pw.header.length), context)
                        continue loop
                    }
                    var cost = 0
                    if !decoder.isSkippingPayload, let header = try NBDRequestDecoder.peekHeader(buffer) {
                        // Nothing of a request is taken off the wire until it fits the budget.
                        cost = NBDInFlightBudget.cost(of: header, maximumPayloadBytes: capabilities.maximumBlockSize)
                        guard budget.admits(cost: cost) else {
                            waitingForBudget = true
                            updateReading(context)
                            break loop
                        }
                        if waitingForBudget {
                            waitingForBudget = false
                            updateReading(context)
                        }
                        if let need = decoder.bytesNeeded(buffer), need > buffer.readableBytes {
                            // A write whose payload is still arriving (bytesNeeded counts only payloads it buffers).
                            admit(cost)
                            buffer.moveReaderIndex(forwardBy: NBDLimits.requestHeaderBytes)
                            let n = buffer.readableBytes
                            partialWrite = (header, n > 0 ? [buffer.readSlice(length: n)!] : [], n)
                            slicedPayloads = true
                            break loop
                        }
                    }
                    guard let event = try decoder.next(&buffer) else { break loop }
                    switch event {
                    case .request(let header, let payload):
                        if payload != nil { slicedPayloads = true }
                        if header.type != NBDCommand.disconnect { admit(cost) }
                        dispatch(header, payload: payload, cost: cost, context)
                    case .oversizedWrite(let header):
                        // Checked against the budget at its header (cost 0); nothing was released since.
                        admit(0)
                        unansweredRequests += 1
                        complete(header, .write, .failure(.invalid, "write of \(header.length) bytes exceeds the maximum payload of \(capabilities.maximumBlockSize)"), started: nil, cost: 0)
                    }
                case .closed:
                    break loop
                }
            }
        } catch {
            logger.notice("NBD protocol violation; closing", metadata: ["reason": "\(error)"])
            close(context)
            return
        }
        guard phase != .closed, buffer.readableBytes > 0 else { return }
        if slicedPayloads {
            // Write payloads still reference this storage: appending to it would copy it all
            // (copy-on-write), so move what is left to fresh storage. That is usually less
            // than a request header (payloads that do not fit go to `partialWrite`); more
            // only while reading is paused for the budget.
            var fresh = context.channel.allocator.buffer(capacity: max(buffer.readableBytes, 4096))
            fresh.writeBuffer(&buffer)
            pending = fresh
        } else {
            buffer.discardReadBytes()
            pending = buffer
        }
    }

    // MARK: handshake

    private func handleOption(_ option: NBDOptionRequest, _ context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 256)
        let code = option.code
        if tls?.mode == .require, !tlsStarted, code != NBDOption.abort {
            // Nothing about the export is said in plaintext.
            guard code != NBDOption.exportName else {
                logger.notice("NBD_OPT_EXPORT_NAME before TLS on a TLS-only export; closing", metadata: ["event": "nbd_tls_required"])
                return close(context)
            }
            NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errTLSRequired,
                                                 message: "this server requires TLS: send NBD_OPT_STARTTLS first", into: &out)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            return
        }
        switch code {
        case NBDOption.exportName:
            // No way to send an error here: the spec says close.
            guard let name = NBDHandshakeDecoder.parseExportName(option.data), server.matches(exportName: name) else {
                logger.notice("NBD_OPT_EXPORT_NAME for an unknown export; closing")
                return close(context)
            }
            switch server.openVolume(for: context.channel) {
            case .failure(let refused):
                logger.notice("NBD export refused; closing", metadata: ["reason": "\(refused.message)"])
                return close(context)
            case .success(let v):
                NBDHandshakeEncoder.writeExportNameReply(size: v.sizeBytes, flags: NBDTransmissionFlags(capabilities: v.capabilities), noZeroes: noZeroes, into: &out)
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
                enterTransmission(v)
            }
        case NBDOption.abort:
            NBDHandshakeEncoder.writeOptionReply(option: code, type: NBDOptionReply.ack, into: &out)
            context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in context.close(promise: nil) }
            phase = .closed
        case NBDOption.list:
            if option.data.readableBytes != 0 {
                NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errInvalid, message: "NBD_OPT_LIST takes no data", into: &out)
            } else {
                NBDHandshakeEncoder.writeServerReply(name: server.exportName, description: server.exportDescription, into: &out)
                NBDHandshakeEncoder.writeOptionReply(option: code, type: NBDOptionReply.ack, into: &out)
            }
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        case NBDOption.info, NBDOption.go:
            answerInfo(option, context, &out)
        case NBDOption.structuredReply:
            if option.data.readableBytes != 0 {
                NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data", into: &out)
            } else {
                structuredReplies = true
                NBDHandshakeEncoder.writeOptionReply(option: code, type: NBDOptionReply.ack, into: &out)
            }
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        default:
            NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errUnsupported, message: "option \(code) is not supported by hamgr", into: &out)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
    }

    /// NBD_OPT_STARTTLS: refused with an error reply, or acknowledged in plaintext with the
    /// TLS handler then put in front of this one (the client's next bytes are its
    /// ClientHello; the handshake deadline still runs). True if TLS started.
    private func answerStartTLS(_ option: NBDOptionRequest, bytesAfter: Int, _ context: ChannelHandlerContext) throws -> Bool {
        var out = context.channel.allocator.buffer(capacity: 128)
        func refuse(_ type: UInt32, _ message: String) -> Bool {
            NBDHandshakeEncoder.writeOptionError(option: option.code, type: type, message: message, into: &out)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            return false
        }
        guard let tls, tls.mode != .off else { return refuse(NBDOptionReply.errUnsupported, "TLS is not enabled on this export") }
        guard !tlsStarted else { return refuse(NBDOptionReply.errInvalid, "TLS is already running") }
        guard option.data.readableBytes == 0 else { return refuse(NBDOptionReply.errInvalid, "NBD_OPT_STARTTLS takes no data") }
        // What follows is neither options (the client must wait for the reply) nor TLS
        // (that starts after the reply).
        guard bytesAfter == 0 else { throw NBDProtocolError.bytesAfterStartTLS(bytesAfter) }
        NBDHandshakeEncoder.writeOptionReply(option: option.code, type: NBDOptionReply.ack, into: &out)
        // Written through to the socket before the TLS handler exists: the ACK is plaintext.
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context), position: .first)
        tlsStarted = true
        logger.debug("NBD STARTTLS acknowledged", metadata: ["event": "nbd_starttls"])
        return true
    }

    private func answerInfo(_ option: NBDOptionRequest, _ context: ChannelHandlerContext, _ out: inout ByteBuffer) {
        let code = option.code
        defer { context.writeAndFlush(wrapOutboundOut(out), promise: nil) }
        guard let (name, requests) = NBDHandshakeDecoder.parseInfoRequest(option.data) else {
            NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errInvalid, message: "malformed NBD_OPT_INFO/GO data", into: &out)
            return
        }
        guard server.matches(exportName: name) else {
            NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errUnknown,
                                                 message: "no export named \"\(name)\"; this server exports \"\(server.exportName)\"", into: &out)
            return
        }
        let opened = code == NBDOption.go ? server.openVolume(for: context.channel) : server.currentExport()
        switch opened {
        case .failure(let refused):
            NBDHandshakeEncoder.writeOptionError(option: code, type: NBDOptionReply.errUnknown, message: refused.message, into: &out)
        case .success(let v):
            let caps = v.capabilities
            NBDHandshakeEncoder.writeInfoExport(option: code, size: v.sizeBytes, flags: NBDTransmissionFlags(capabilities: caps), into: &out)
            if requests.contains(NBDInfo.name) {
                NBDHandshakeEncoder.writeInfoString(option: code, info: NBDInfo.name, text: server.exportName, into: &out)
            }
            if requests.contains(NBDInfo.description), let text = server.exportDescription {
                NBDHandshakeEncoder.writeInfoString(option: code, info: NBDInfo.description, text: text, into: &out)
            }
            // Sent even unasked: the client may ignore it, and our limits are the defaults.
            NBDHandshakeEncoder.writeInfoBlockSize(option: code, minimum: caps.minimumBlockSize, preferred: caps.preferredBlockSize,
                                                   maximum: caps.maximumBlockSize, into: &out)
            NBDHandshakeEncoder.writeOptionReply(option: code, type: NBDOptionReply.ack, into: &out)
            if code == NBDOption.go { enterTransmission(v) }
        }
    }

    private func enterTransmission(_ v: BlockVolume) {
        volume = v
        capabilities = v.capabilities
        exportSize = v.sizeBytes
        decoder = NBDRequestDecoder(maximumPayloadBytes: capabilities.maximumBlockSize)
        phase = .transmission
        handshakeDeadline?.cancel()
        handshakeDeadline = nil
        logger.debug("NBD transmission phase", metadata: ["structuredReplies": "\(structuredReplies)"])
    }

    // MARK: transmission

    private enum Outcome {
        case success(ByteBuffer?)
        case failure(NBDError, String)
    }

    /// `cost`: what the request was admitted with; released once its reply is written.
    private func dispatch(_ h: NBDRequestHeader, payload: ByteBuffer?, writeChunks: [ByteBuffer]? = nil, cost: Int, _ context: ChannelHandlerContext) {
        let kind = NBDOperationKind(command: h.type)
        if kind == .disconnect {
            disconnectRequested = true
            server.recorder.record(.disconnect, .ok)
            closeIfDrained(context)
            return
        }
        unansweredRequests += 1
        guard let volume = volume else { return complete(h, kind, .failure(.shutdown, "the export is closed"), started: nil, cost: cost) }
        switch NBDRequestVerdict.check(h, capabilities: capabilities, exportSize: exportSize) {
        case .reject(let e, let why): return complete(h, kind, .failure(e, why), started: nil, cost: cost)
        case .nothingToDo: return complete(h, kind, .success(nil), started: nil, cost: cost)
        case .serve: break
        }
        let loop = context.eventLoop
        let fua = h.flags.contains(.fua)

        switch kind {
        case .read:
            volume.read(offset: h.offset, length: Int(h.length), on: loop).whenComplete { [self] r in
                completeResult(h, kind, r.map { .success($0) }, started: nil, cost: cost)
            }
        case .write:
            let chunks = writeChunks ?? [payload ?? ByteBuffer()]
            let bytes = Int(h.length)
            let started = NIODeadline.now()
            let written: EventLoopFuture<Void>
            if chunks.count == 1 {
                written = volume.write(offset: h.offset, data: chunks[0], fua: fua, on: loop)
            } else if let scatter = volume as? ScatterWriteVolume {
                written = scatter.write(offset: h.offset, chunks: chunks, fua: fua, on: loop)
            } else {
                var joined = context.channel.allocator.buffer(capacity: bytes)
                for var c in chunks { joined.writeBuffer(&c) }
                written = volume.write(offset: h.offset, data: joined, fua: fua, on: loop)
            }
            written.whenComplete { [self] r in
                completeResult(h, kind, r.map { _ in .success(nil) }, started: started, bytes: bytes, cost: cost)
            }
        case .flush:
            volume.flush(on: loop).whenComplete { [self] r in completeResult(h, kind, r.map { _ in .success(nil) }, started: nil, cost: cost) }
        case .trim:
            volume.trim(offset: h.offset, length: Int(h.length), fua: fua, on: loop).whenComplete { [self] r in
                completeResult(h, kind, r.map { _ in .success(nil) }, started: nil, cost: cost)
            }
        case .writeZeroes:
            volume.writeZeroes(offset: h.offset, length: Int(h.length), fua: fua, mayDeallocate: !h.flags.contains(.noHole), on: loop)
                .whenComplete { [self] r in completeResult(h, kind, r.map { _ in .success(nil) }, started: nil, cost: cost) }
        case .disconnect, .unknown:
            complete(h, kind, .failure(.invalid, "unknown command \(h.type)"), started: nil, cost: cost)
        }
    }

    private func completeResult(_ h: NBDRequestHeader, _ kind: NBDOperationKind, _ result: Result<Outcome, Error>, started: NIODeadline?, bytes: Int = 0, cost: Int) {
        let outcome: Outcome
        switch result {
        case .success(let o): outcome = o
        case .failure(let e as VolumeError): outcome = .failure(NBDError(e), e.description)
        case .failure(let e): outcome = .failure(.io, "\(e)")
        }
        complete(h, kind, outcome, started: started, bytes: bytes, cost: cost)
    }

    private func complete(_ h: NBDRequestHeader, _ kind: NBDOperationKind, _ outcome: Outcome, started: NIODeadline?, bytes: Int = 0, cost: Int) {
        unansweredRequests -= 1
        let latency = started.map { Double((NIODeadline.now() - $0).nanoseconds) / 1e9 }
        switch outcome {
        case .success(let data):
            server.recorder.record(kind, .ok, bytes: kind == .read ? (data?.readableBytes ?? 0) : bytes, latencySeconds: latency)
        case .failure(let e, let why):
            server.recorder.record(kind, e, latencySeconds: latency)
            logger.debug("NBD request failed", metadata: ["op": "\(kind.name)", "error": "\(e.name)", "reason": "\(why)"])
        }
        guard phase == .transmission, let context = context else { return release(count: 1, cost: cost) }
        var out = outbound ?? context.channel.allocator.buffer(capacity: 4096)
        outbound = nil
        outboundReleases.count += 1
        outboundReleases.cost += cost
        switch outcome {
        case .success(let data):
            if kind == .read, var data = data, data.readableBytes > 0 {
                if structuredReplies {
                    NBDReplyEncoder.writeOffsetDataHeader(cookie: h.cookie, offset: h.offset, dataBytes: data.readableBytes, into: &out)
                } else {
                    NBDReplyEncoder.writeSimpleReply(cookie: h.cookie, error: .ok, into: &out)
                }
                if data.readableBytes <= 16 * 1024 {  // small: copy, one buffer for many replies
                    out.writeBuffer(&data)
                    outbound = out
                } else {
                    // The data's write completes after the header's: it releases both.
                    context.write(wrapOutboundOut(out), promise: nil)
                    context.write(wrapOutboundOut(data), promise: releasePromise(context))
                }
            } else {
                if kind == .read && structuredReplies {
                    NBDReplyEncoder.writeDone(cookie: h.cookie, into: &out)  // a read must not get a simple reply
                } else {
                    NBDReplyEncoder.writeSimpleReply(cookie: h.cookie, error: .ok, into: &out)
                }
                outbound = out
            }
        case .failure(let e, let why):
            if structuredReplies {
                NBDReplyEncoder.writeErrorChunk(cookie: h.cookie, error: e, message: why, into: &out)
            } else {
                NBDReplyEncoder.writeSimpleReply(cookie: h.cookie, error: e, into: &out)
            }
            outbound = out
        }
        scheduleFlush(context)
        closeIfDrained(context)
    }

    /// Replies completing in the same loop turn share one flush (one writev).
    private func scheduleFlush(_ context: ChannelHandlerContext) {
        guard !flushScheduled else { return }
        flushScheduled = true
        context.eventLoop.execute { [self] in
            flushScheduled = false
            guard let context = self.context else { return }
            guard volume?.mayAnswer() ?? true else { return refuseToAnswer(context) }
            if let out = outbound {
                outbound = nil
                context.write(wrapOutboundOut(out), promise: releasePromise(context))
            }
            context.flush()
        }
    }

    // MARK: budget

    private func admit(_ cost: Int) {
        budget.admit(cost: cost)
        server.recorder.inFlightChanged(requests: 1, bytes: cost)
    }

    /// A promise that releases the requests whose replies are in the write it is given to
    /// (`outboundReleases`, taken now); nil if there are none.
    private func releasePromise(_ context: ChannelHandlerContext) -> EventLoopPromise<Void>? {
        let taken = outboundReleases
        outboundReleases = (0, 0)
        guard taken.count > 0 else { return nil }
        let promise = context.eventLoop.makePromise(of: Void.self)
        promise.futureResult.whenComplete { [self] _ in release(count: taken.count, cost: taken.cost) }
        return promise
    }

    /// Replies that will never be written (the connection is closing): their requests leave the budget.
    private func dropOutbound() {
        outbound = nil
        let taken = outboundReleases
        outboundReleases = (0, 0)
        release(count: taken.count, cost: taken.cost)
    }

    /// A write whose payload will never complete: it was admitted with its header.
    private func dropPartialWrite() {
        guard let pw = partialWrite else { return }
        partialWrite = nil
        release(count: 1, cost: Int(pw.header.length))
    }

    private func release(count: Int, cost: Int) {
        guard count > 0 else { return }
        budget.release(count: count, cost: cost)
        server.recorder.inFlightChanged(requests: -count, bytes: -cost)
        guard phase == .transmission, let context else { return }
        if waitingForBudget { process(context) }  // the buffered request may fit now
        updateReading(context)
    }

    /// Reading stops while the next request does not fit the budget or replies are queued
    /// past the channel's high watermark; it resumes once neither holds and at most half of
    /// the budget is in use.
    private func updateReading(_ context: ChannelHandlerContext) {
        if waitingForBudget || !context.channel.isWritable {
            guard !readingPaused else { return }
            readingPaused = true
            _ = try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
        } else if readingPaused, budget.mayResumeReading {
            readingPaused = false
            _ = try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
        }
    }

    /// The volume may no longer answer (its lease lapsed since these replies were decided):
    /// nothing pending is sent, the connection closes, and the client treats the requests
    /// as failed — never as acknowledged by a deposed master.
    private func refuseToAnswer(_ context: ChannelHandlerContext) {
        logger.notice("NBD replies pending after this node's lease lapsed: closing the connection unanswered",
                      metadata: ["event": "nbd_replies_dropped", "inFlight": "\(unansweredRequests)"])
        phase = .closed
        dropOutbound()
        close(context)
    }

    private func closeIfDrained(_ context: ChannelHandlerContext) {
        guard disconnectRequested, unansweredRequests == 0, phase == .transmission else { return }
        guard volume?.mayAnswer() ?? true else { return refuseToAnswer(context) }
        phase = .closed
        // Flush the last replies first: NBD_CMD_DISC means "finish what is outstanding".
        let last = outbound ?? context.channel.allocator.buffer(capacity: 0)
        outbound = nil
        let released = releasePromise(context)
        context.writeAndFlush(wrapOutboundOut(last)).whenComplete { result in
            released?.completeWith(result)
            context.close(promise: nil)
        }
    }

    private func close(_ context: ChannelHandlerContext) {
        phase = .closed
        pending = nil
        context.close(promise: nil)
    }
}
