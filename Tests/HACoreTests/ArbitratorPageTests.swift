import HACore
import XCTest

/// The arbitrator's HTML status page, rendered without a process (docs/operator-guide.md,
/// "The arbitrator's status page").
final class ArbitratorPageTests: XCTestCase {
    typealias Entry = ArbitratorStatusDocument.ClusterEntry

    /// The backup (b) spoke 60 s ago, when its link came up: normal, it is linked.
    let healthy = Entry(name: "web1", master: "a", epoch: 7, outdated: [], lastContactMs: ["a": 120, "b": 60_340],
                        leaseRemainingMs: 4_260, connected: ["a", "b"])
    let degraded = Entry(name: "db1", master: "b", epoch: 12, outdated: [.init(node: "a", epoch: 11)],
                         lastContactMs: ["a": 9_500, "b": 80], leaseRemainingMs: 3_000, connected: ["b"])
    let noMaster = Entry(name: "mail", master: nil, epoch: 3, outdated: [], lastContactMs: ["a": nil, "b": nil], connected: [])

    func testAssessNamesTheStateAndWhy() {
        XCTAssertEqual(ArbitratorPage.assess(healthy, staleAfterMs: 3_000).0, .healthy)
        XCTAssertEqual(ArbitratorPage.assess(healthy, staleAfterMs: 3_000).1, [])
        let (d, why) = ArbitratorPage.assess(degraded, staleAfterMs: 3_000)
        XCTAssertEqual(d, .degraded)
        XCTAssertEqual(why, ["a outdated at epoch 11", "a has no link to the arbitrator"])
        let (n, nwhy) = ArbitratorPage.assess(noMaster, staleAfterMs: 3_000)
        XCTAssertEqual(n, .noMaster)
        XCTAssertEqual(nwhy, ["no valid lease granted", "a has no link to the arbitrator", "b has no link to the arbitrator"])
        // The master's silence: just inside the bound is still healthy; one millisecond past it is not.
        var edge = healthy
        edge.lastContactMs["a"] = 3_000
        XCTAssertEqual(ArbitratorPage.assess(edge, staleAfterMs: 3_000).0, .healthy)
        edge.lastContactMs["a"] = 3_001
        XCTAssertEqual(ArbitratorPage.assess(edge, staleAfterMs: 3_000).0, .degraded)
        XCTAssertEqual(ArbitratorPage.assess(edge, staleAfterMs: 3_000).1, ["master a not heard for 3.0 s"])
        // A linked backup's silence is not a fault, however long.
        var quietBackup = healthy
        quietBackup.lastContactMs["b"] = 3_600_000
        XCTAssertEqual(ArbitratorPage.assess(quietBackup, staleAfterMs: 3_000).0, .healthy)
        // A master with an outdated peer is degraded even with every link up: it writes alone.
        var alone = healthy
        alone.outdated = [.init(node: "b", epoch: 7)]
        XCTAssertEqual(ArbitratorPage.assess(alone, staleAfterMs: 3_000).1, ["b outdated at epoch 7"])
        // The backup's link down: degraded.
        var unlinked = healthy
        unlinked.connected = ["a"]
        XCTAssertEqual(ArbitratorPage.assess(unlinked, staleAfterMs: 3_000).1, ["b has no link to the arbitrator"])
        // A document without links (an older arbitrator) is judged on the rest.
        var older = healthy
        older.connected = nil
        XCTAssertEqual(ArbitratorPage.assess(older, staleAfterMs: 3_000).0, .healthy)
    }

    func testPageListsEveryClusterWithItsColumns() {
        let doc = ArbitratorStatusDocument(clusters: [healthy, noMaster, degraded], version: "9.9.9")
        let page = ArbitratorPage.render(doc, generatedAt: "2026-12-06T03:04:05Z", staleAfterMs: 3_000)
        XCTAssertTrue(page.hasPrefix("<!DOCTYPE html>\n"), page)
        XCTAssertTrue(page.contains("<meta http-equiv=\"refresh\" content=\"\(ArbitratorPage.refreshSeconds)\">"), page)
        XCTAssertTrue((2...10).contains(ArbitratorPage.refreshSeconds))
        XCTAssertTrue(page.contains("version 9.9.9"))
        XCTAssertTrue(page.contains("snapshot 2026-12-06T03:04:05Z"))
        XCTAssertTrue(page.contains("3 cluster(s): <span class=\"healthy\">1 healthy</span> <span class=\"degraded\">1 degraded</span> <span class=\"nomaster\">1 no master</span>"), page)
        // Rows in name order, whatever the document's order.
        let rows = page.components(separatedBy: "\n").filter { $0.hasPrefix("<tr class=") }
        XCTAssertEqual(rows.count, 3, page)
        XCTAssertTrue(rows[0].contains("data-cluster=\"db1\" data-state=\"degraded\""), rows[0])
        XCTAssertTrue(rows[1].contains("data-cluster=\"mail\" data-state=\"nomaster\""), rows[1])
        XCTAssertTrue(rows[2].contains("data-cluster=\"web1\" data-state=\"healthy\""), rows[2])
        XCTAssertEqual(rows[2], "<tr class=\"healthy\" data-cluster=\"web1\" data-state=\"healthy\"><td class=\"state\"><strong>healthy</strong></td>"
            + "<td class=\"cluster\">web1</td><td class=\"master\">a</td><td class=\"num\">7</td><td class=\"num\">4.3 s</td>"
            + "<td>none</td><td>a: up, 0.1; b: up, 60.3</td></tr>")
        XCTAssertTrue(rows[0].contains("<td class=\"master\">b</td><td class=\"num\">12</td><td class=\"num\">3.0 s</td><td>a (epoch 11)</td>"
            + "<td>a: <strong>down</strong>, 9.5; b: up, 0.1</td>"), rows[0])
        XCTAssertTrue(rows[0].contains("<small>a outdated at epoch 11; a has no link to the arbitrator</small>"), rows[0])
        XCTAssertTrue(rows[1].contains("<td class=\"master\"><em>none</em></td><td class=\"num\">3</td><td class=\"num\">&ndash;</td>"), rows[1])
        XCTAssertTrue(rows[1].contains("<td>a: <strong>down</strong>, never; b: <strong>down</strong>, never</td>"), rows[1])
        // Nothing to run, nothing to fetch.
        XCTAssertFalse(page.lowercased().contains("<script"))
        XCTAssertFalse(page.contains("src="))
        XCTAssertFalse(page.contains("<link"))
    }

    func testEveryStringIsEscaped() {
        let evil = Entry(name: "<script>alert(1)</script>", master: "\"><img src=x onerror=alert(2)>",
                         epoch: 1, outdated: [.init(node: "b'&<", epoch: 1)],
                         lastContactMs: ["<b>": 5, "\"><img src=x onerror=alert(2)>": 1], leaseRemainingMs: 1_000)
        let page = ArbitratorPage.render(ArbitratorStatusDocument(clusters: [evil], version: "<i>v</i>"),
                                         generatedAt: "<u>now</u>", staleAfterMs: 3_000)
        for raw in ["<script", "<img", "<b>", "<i>", "<u>", "b'&<"] {
            XCTAssertFalse(page.contains(raw), "\(raw) reached the page unescaped:\n\(page)")
        }
        XCTAssertTrue(page.contains("data-cluster=\"&lt;script&gt;alert(1)&lt;/script&gt;\""), page)
        XCTAssertTrue(page.contains("<td class=\"master\">&quot;&gt;&lt;img src=x onerror=alert(2)&gt;</td>"), page)
        XCTAssertTrue(page.contains("b&#39;&amp;&lt; (epoch 1)"), page)
        XCTAssertTrue(page.contains("version &lt;i&gt;v&lt;/i&gt;"), page)
        XCTAssertTrue(page.contains("&lt;b&gt;: 0.0"), page)
        XCTAssertEqual(ArbitratorPage.html("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&#39;f")
        XCTAssertEqual(ArbitratorPage.html("é ü 日本"), "é ü 日本")
    }

    func testNoClusters() {
        let page = ArbitratorPage.render(ArbitratorStatusDocument(clusters: []), generatedAt: "t", staleAfterMs: 800)
        XCTAssertTrue(page.contains("This arbitrator serves no cluster."), page)
        XCTAssertFalse(page.contains("<table>"))
        XCTAssertTrue(page.hasSuffix("</html>\n"))
    }
}
