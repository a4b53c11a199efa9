import Foundation
import HAShell

/// One node as hactl sees it: its `/status` document, or why it could not be read.
struct NodeView {
    var endpoint: String
    var document: StatusDocument?
    /// Set instead of `document` when the endpoint is an arbitrator.
    var arbitrator: ArbitratorStatusDocument?
    var raw: Data?
    var error: String?
    /// The node's name when known only from the peer's document.
    var expectedName: String?

    var name: String { document?.node ?? (arbitrator != nil ? "arbitrator" : nil) ?? expectedName ?? endpoint }
}

/// Reads `/status` and posts admin requests over the blocking HTTP client. Reads carry the
/// read token if given, else the admin token (nodes accept either; an arbitrator only the
/// read token); admin requests carry the admin token. `https://` endpoints, given or
/// found as a peer's status URL, are verified with `trust`.
struct ClusterClient {
    var endpoints: [String]
    /// The arbitrator's status endpoint(s) from the config, read by `status` only.
    var arbitratorEndpoints: [String] = []
    /// Node names by endpoint, when the config says which node serves where.
    var names: [String: String] = [:]
    var adminToken: String?
    var readToken: String?
    var trust: HTTPClient.TrustedCA?
    var timeout: Duration

    func http(_ endpoint: String, token: String?) -> HTTPClient {
        HTTPClient(endpoint: endpoint, bearerToken: token, timeout: timeout, trust: trust)
    }

    /// The document at `endpoint`, or the reason it could not be read.
    func fetch(_ endpoint: String) -> NodeView {
        do {
            let r = try http(endpoint, token: readToken ?? adminToken).get("/status")
            if r.status == 401 {
                return NodeView(endpoint: endpoint, error: "HTTP 401: /status needs the read token (--read-token-file) or the admin token (--token-file); "
                                + ((readToken ?? adminToken) == nil ? "none was given" : "the one given was refused"))
            }
            guard r.status == 200 else { return NodeView(endpoint: endpoint, error: "HTTP \(r.status): \(r.text.prefix(200))") }
            if let w = try? JSONDecoder().decode(ArbitratorStatusDocument.self, from: r.body), w.role == "arbitrator" {
                return NodeView(endpoint: endpoint, arbitrator: w, raw: r.body)
            }
            let doc = try JSONDecoder().decode(StatusDocument.self, from: r.body)
            return NodeView(endpoint: endpoint, document: doc, raw: r.body)
        } catch let e as DecodingError {
            return NodeView(endpoint: endpoint, error: "not a hamgr /status document (\(e))")
        } catch {
            return NodeView(endpoint: endpoint, error: "\(error)")
        }
    }

    /// Every node reachable from the given endpoints: each one asked, plus the peer each
    /// document names that was not given explicitly.
    func discover(followPeers: Bool = true) -> [NodeView] {
        var views = endpoints.map { ep in
            var v = fetch(ep)
            v.expectedName = names[ep]
            return v
        }
        guard followPeers else { return views }
        var known = Set(views.compactMap { $0.document?.node })
        var asked = Set(endpoints)
        for v in views {
            guard let peer = v.document?.peer, !known.contains(peer.node) else { continue }
            known.insert(peer.node)
            // The document may name the endpoint or the /status URL itself.
            guard var url = peer.statusURL else { continue }
            if url.hasSuffix("/status") { url.removeLast("/status".count) }
            guard !asked.contains(url) else { continue }
            asked.insert(url)
            var pv = fetch(url)
            pv.expectedName = peer.node
            views.append(pv)
        }
        return views
    }

    /// The endpoint of the current master, as the cluster reports it.
    func masterEndpoint(in views: [NodeView]) -> String? {
        views.first { $0.document?.role == .primary }?.endpoint
    }

    /// POST an admin command; returns the HTTP status and the reply.
    func admin(_ command: AdminCommand, at endpoint: String) throws -> (Int, AdminReply) {
        let body = try JSONEncoder().encode(command.params)
        let r = try http(endpoint, token: adminToken).post("/admin/\(command.action)", json: body)
        let reply = (try? JSONDecoder().decode(AdminReply.self, from: r.body))
            ?? AdminReply(ok: r.status == 200, message: r.text.trimmingCharacters(in: .whitespacesAndNewlines))
        return (r.status, reply)
    }
}
