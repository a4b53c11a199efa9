import Foundation
import HACore
import HAShell
import XCTest

final class StatusDocumentTests: XCTestCase {
    static func sample() -> StatusDocument {
        StatusDocument(
            cluster: "web1", node: "a", role: .primary, epoch: 7,
            master: .init(node: "a", serviceAddress: "10.1.0.1:10809"), diskState: .upToDate,
            peer: .init(node: "b", statusURL: "http://10.2.0.1:9650", reachable: true, replication: .behind, diskState: .inconsistent),
            arbitrator: .init(reachable: true), quorum: true, leaseValidMs: 950, outOfSyncBytes: 4096,
            resync: .init(doneBytes: 1024, totalBytes: 4096), serviceAddress: "10.1.0.1:10809", generation: "1f2e",
            resources: [.init(name: "fs", state: "running", restarts: 1)])
    }

    func testSnakeCaseKeysAndExplicitNulls() throws {
        var doc = Self.sample()
        doc.master = nil
        doc.resync = nil
        let obj = try JSONSerialization.jsonObject(with: JSONEncoder.hamgr.encode(doc)) as! [String: Any]
        XCTAssertEqual(Set(obj.keys), [
            "cluster", "node", "role", "epoch", "master", "disk_state", "peer", "arbitrator", "quorum",
            "lease_valid_ms", "out_of_sync_bytes", "resync", "split_brain", "why_not_promoted", "maintenance",
            "service_address", "generation", "resources", "version", "disk_error", "disk_note",
        ])
        XCTAssertTrue(obj["master"] is NSNull)
        XCTAssertTrue(obj["split_brain"] is NSNull)
        XCTAssertEqual(obj["role"] as? String, "primary")
        XCTAssertEqual(obj["disk_state"] as? String, "upToDate")
        let peer = obj["peer"] as! [String: Any]
        XCTAssertEqual(peer["replication"] as? String, "behind")
        XCTAssertEqual(peer["disk_state"] as? String, "inconsistent")
        XCTAssertEqual(peer["status_url"] as? String, "http://10.2.0.1:9650")
    }

    func testRoundTrip() throws {
        let doc = Self.sample()
        let back = try JSONDecoder().decode(StatusDocument.self, from: JSONEncoder.hamgr.encode(doc))
        XCTAssertEqual(back, doc)
        let obj = try JSONSerialization.jsonObject(with: JSONEncoder.hamgr.encode(doc)) as! [String: Any]
        let master = obj["master"] as! [String: Any]
        XCTAssertEqual(master["service_address"] as? String, "10.1.0.1:10809")
        let resync = obj["resync"] as! [String: Any]
        XCTAssertEqual(resync["done_bytes"] as? Int, 1024)
    }

    func testArbitratorDocument() throws {
        let doc = ArbitratorStatusDocument(clusters: [
            .init(name: "web1", master: "a", epoch: 7, outdated: [.init(node: "b", epoch: 7)], lastContactMs: ["a": 120, "b": nil]),
        ])
        let data = try JSONEncoder.hamgr.encode(doc)
        let obj = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        XCTAssertEqual(obj["role"] as? String, "arbitrator")
        let c = (obj["clusters"] as! [[String: Any]])[0]
        XCTAssertEqual(c["master"] as? String, "a")
        let contact = c["last_contact_ms"] as! [String: Any]
        XCTAssertEqual(contact["a"] as? Int, 120)
        XCTAssertTrue(contact["b"] is NSNull)
        XCTAssertEqual(try JSONDecoder().decode(ArbitratorStatusDocument.self, from: data), doc)
        XCTAssertTrue(c["lease_remaining_ms"] is NSNull, "no lease given: null, present")
        XCTAssertTrue(c["connected"] is NSNull, "links not reported: null, present")
    }

    func testArbitratorDocumentLeaseAndLinks() throws {
        let doc = ArbitratorStatusDocument(clusters: [
            .init(name: "web1", master: "a", epoch: 7, outdated: [], lastContactMs: ["a": 1, "b": 2], leaseRemainingMs: 4_200,
                  connected: ["a"]),
        ])
        let data = try JSONEncoder.hamgr.encode(doc)
        let c = ((try JSONSerialization.jsonObject(with: data) as! [String: Any])["clusters"] as! [[String: Any]])[0]
        XCTAssertEqual(c["lease_remaining_ms"] as? Int, 4_200)
        XCTAssertEqual(c["connected"] as? [String], ["a"])
        XCTAssertEqual(try JSONDecoder().decode(ArbitratorStatusDocument.self, from: data), doc)
        // A document from an arbitrator that predates the key still decodes (hactl against an older one).
        let old = Data(#"{"role":"arbitrator","version":"0.1.0","clusters":[{"name":"web1","master":"a","epoch":7,"outdated":[],"last_contact_ms":{"a":1}}]}"#.utf8)
        let decoded = try JSONDecoder().decode(ArbitratorStatusDocument.self, from: old)
        XCTAssertNil(decoded.clusters[0].leaseRemainingMs)
        XCTAssertNil(decoded.clusters[0].connected)
        XCTAssertEqual(decoded.clusters[0].master, "a")
    }

    func testAdminCommandParsing() throws {
        XCTAssertEqual(try AdminCommand.parse(action: "promote", params: [:]), .promote(force: false))
        XCTAssertEqual(try AdminCommand.parse(action: "promote", params: ["force": .bool(true)]), .promote(force: true))
        XCTAssertEqual(try AdminCommand.parse(action: "maintenance", params: ["on": .bool(false)]), .maintenance(on: false))
        XCTAssertEqual(try AdminCommand.parse(action: "resolve", params: ["discard": .string("peer")]), .resolve(discard: .peer))
        XCTAssertThrowsError(try AdminCommand.parse(action: "maintenance", params: [:]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "maintenance", params: ["on": .string("yes")]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "promote", params: ["forse": .bool(true)]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "resolve", params: ["discard": .string("both")]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "switchover", params: ["to": .string("b")]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "reboot", params: [:]))
        XCTAssertEqual(try AdminCommand.parse(action: "resource_cleanup", params: [:]), .resourceCleanup(name: nil))
        XCTAssertEqual(try AdminCommand.parse(action: "resource_cleanup", params: ["resource": .string("fs")]), .resourceCleanup(name: "fs"))
        XCTAssertThrowsError(try AdminCommand.parse(action: "resource_cleanup", params: ["resource": .string("")]))
        XCTAssertThrowsError(try AdminCommand.parse(action: "resource_cleanup", params: ["name": .string("fs")]))
        for c in [AdminCommand.switchover, .promote(force: true), .demote, .maintenance(on: true), .verify(repair: false), .verify(repair: true), .resync, .resolve(discard: .local), .bootstrap(assumeClean: false), .bootstrap(assumeClean: true), .invalidate,
                  .resourceCleanup(name: nil), .resourceCleanup(name: "fs")] {
            XCTAssertEqual(try AdminCommand.parse(action: c.action, params: c.params), c, "params round-trip for \(c)")
        }
    }

    func testAdminReplyFlattensFields() throws {
        let r = AdminReply(ok: true, message: "switched over", fields: ["epoch": .number(8), "master": .string("b")])
        let obj = try JSONSerialization.jsonObject(with: JSONEncoder().encode(r)) as! [String: Any]
        XCTAssertEqual(obj["ok"] as? Bool, true)
        XCTAssertEqual(obj["epoch"] as? Int, 8)
        XCTAssertEqual(try JSONDecoder().decode(AdminReply.self, from: JSONEncoder().encode(r)), r)
        XCTAssertNil(JSONValue.parseObject(Data("[1]".utf8)))
        XCTAssertNil(JSONValue.parseObject(Data("{bad".utf8)))
        XCTAssertEqual(JSONValue.parseObject(Data()), [:])
    }
}
