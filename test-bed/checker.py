#!/usr/bin/python3
"""Checker: judges one run from its history, final read, status polls and node logs.

    checker.py RUN_DIR [--lease-ms 1200] [--dual-primary-tolerance-s 0.5] [--json]

Inputs in RUN_DIR: history.jsonl (records of type meta, op, status, nemesis,
converge, final, proc-exit), node logs *.log. Writes RUN_DIR/verdict.json.
Exit 0 = no violation, 1 = violation(s) (seed and history path printed), 2 = bad input.

Definitions (docs/reliability.md, "Checker rules"):
  A write is *acknowledged* if its op record has result "ok". A write with any other
  result (error, timeout) is *indeterminate*: it may take effect at any time after
  its start (Knossos' treatment of "info" operations), so its effective end is +inf.
  An acknowledged write's effective end is the time the client got the ack.
  Write w *precedes* w' iff end(w) < start(w') (real-time order).

  R1 final-state   For each block, the final master's value is zero only if no write
                   to it was acknowledged; otherwise it is a write w to that block
                   (never garbage, never a write nobody issued) and no acknowledged
                   write to the block is preceded by w. (Acknowledged writes covered
                   by a completed flush are a subset of acknowledged writes.)
  R2 reads         A successful read of block b returns zero or a write w to b, never
                   garbage, and no acknowledged write w' to b with end(w') < start(read)
                   is preceded by w (read is not older than a write acked before it began).
                   Reported as "stale-read" when the read's epoch equals the epoch w'
                   was written under, "stale-read-after-failover" otherwise: both are
                   violations under protocol C.
  R3 dual-ack      Two acknowledged writes served by different nodes whose
                   [start, end] intervals overlap.
  R4 dual-primary  Two nodes reporting role "primary" in /status polls at overlapping
                   times: with the same epoch always a violation; with different epochs
                   a violation when the overlap exceeds the tolerance (poll jitter).
  R4b dual-lease   Lease runs from polls (role primary, lease_valid_ms > 0): consecutive
                   claims span [first.t0, last.t1]; if the node then goes silent (failed
                   polls) its own word extends the run to last.t0 + lease_valid_ms; if it
                   answers without a claim (released, demoted) the run ends at last.t1.
                   Runs of two nodes in different epochs overlapping by > 50 ms: two open
                   write gates at once.
  R5 convergence   After every heal the cluster reached exactly one primary, a
                   secondary with disk_state upToDate and peer replication inSync,
                   within the bound (default 30 s), as recorded by the driver.
  R6 final read    The final master could be read at the end.
  R7 crashes       No node log shows a panic / fatal error / failed precondition.
  R8 log epochs    The daemons' stderr logs (`TIME LEVEL label: message key=value…`):
                   two different nodes logging a promotion (event/message matching
                   "promot") for the same epoch is a violation. Promotion/demotion
                   lines form a timeline in verdict.json.
"""
import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_jsonl  # noqa: E402

INF = float("inf")
CRASH_RE = re.compile(r"Fatal error|fatalError|Precondition failed|Assertion failed|"
                      r"panic|Segmentation fault|SIGSEGV|SIGILL|Illegal instruction|"
                      r"Current stack trace", re.I)


LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?) +(\w+) +([^:]+): (.*)$")
KV_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_log_line(line):
    """hamgr's stderr line -> dict(t, level, label, message, kv) or None."""
    m = LOG_RE.match(line.strip())
    if not m:
        return None
    import datetime
    ts = m.group(1).rstrip("Z")
    try:
        t = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None
    rest = m.group(4)
    kv = {k: v.strip('"') for k, v in KV_RE.findall(rest)}
    first_kv = KV_RE.search(rest)
    msg = rest[:first_kv.start()].strip() if first_kv else rest
    return {"t": t, "level": m.group(2), "label": m.group(3), "message": msg, "kv": kv}


def eff_end(w):
    return w["end"] if w.get("result") == "ok" else INF


def lease_valid(s):
    """True/False if /status says whether the lease is valid, None if it doesn't say."""
    for k in ("lease_valid", "leaseValid", "has_lease"):
        if isinstance(s.get(k), bool):
            return s[k]
    if isinstance(s.get("lease_valid_ms"), (int, float)):
        return s["lease_valid_ms"] > 0
    le = s.get("lease")
    if isinstance(le, dict):
        for k in ("valid", "held"):
            if isinstance(le.get(k), bool):
                return le[k]
        for k in ("remaining_ms", "remainingMs"):
            if isinstance(le.get(k), (int, float)):
                return le[k] > 0
    return None


class Checker:
    def __init__(self, run_dir, lease_ms=1200, tol=0.5, max_examples=5, lease_tol=0.05):
        self.dir = run_dir
        self.history_path = os.path.join(run_dir, "history.jsonl")
        self.recs = read_jsonl(self.history_path)
        self.lease_ms = lease_ms
        self.tol = tol
        self.lease_tol = lease_tol
        self.max_examples = max_examples
        self.violations = collections.OrderedDict()
        self.findings = []
        self.stats = collections.Counter()
        meta = [r for r in self.recs if r.get("type") == "meta"]
        self.meta = meta[0] if meta else {}

    def violate(self, kind, detail):
        lst = self.violations.setdefault(kind, [])
        lst.append(detail)

    # ------------------------------------------------------------------
    def check(self):
        ops = [r for r in self.recs if r.get("type") == "op"]
        writes = [r for r in ops if r["op"] == "write"]
        reads = [r for r in ops if r["op"] == "read"]
        flushes = [r for r in ops if r["op"] == "flush"]
        self.stats["writes"] = len(writes)
        self.stats["writes_acked"] = sum(1 for w in writes if w["result"] == "ok")
        self.stats["writes_indeterminate"] = sum(1 for w in writes if w["result"] != "ok")
        self.stats["reads"] = len(reads)
        self.stats["reads_ok"] = sum(1 for r in reads if r["result"] == "ok")
        self.stats["flushes_ok"] = sum(1 for f in flushes if f["result"] == "ok")
        by_wid = {w["wid"]: w for w in writes}
        by_block = collections.defaultdict(list)
        for w in writes:
            by_block[w["block"]].append(w)
        acked_by_block = {b: sorted((w for w in ws if w["result"] == "ok"), key=lambda w: w["start"])
                          for b, ws in by_block.items()}
        self.check_final(by_wid, by_block, acked_by_block)
        self.check_reads(reads, by_wid, acked_by_block)
        self.check_dual_ack(writes)
        self.check_dual_primary()
        self.check_convergence()
        self.check_logs()
        self.stats["faults_injected"] = sum(1 for r in self.recs
                                            if r.get("type") == "nemesis" and r.get("phase") == "inject")
        self.write_gaps(writes)
        return not self.violations

    def _value_write(self, v, b, by_wid, where):
        """v is 'zero', 'garbage:…' or a wid. Returns the write, None for zero, or False if bad."""
        if v == "zero":
            return None
        if v.startswith("garbage:"):
            self.violate("corrupt-" + where, {"block": b, "value": v})
            return False
        w = by_wid.get(v)
        if w is None or w["block"] != b:
            self.violate("phantom-" + where, {"block": b, "value": v,
                                              "note": "no write with this id to this block in the history"})
            return False
        return w

    def check_final(self, by_wid, by_block, acked_by_block):
        finals = [r for r in self.recs if r.get("type") == "final"]
        if not finals:
            self.violate("no-final-read", {"note": "the final master could not be read"})
            return
        fin = finals[-1]
        self.stats["final_node"] = fin["node"]
        values = fin["values"]
        lost = 0
        for b in sorted(set(by_block) | set(int(k) for k in values)):
            v = values.get(str(b), "zero")
            w = self._value_write(v, b, by_wid, "final")
            if w is False:
                continue
            acked = acked_by_block.get(b, [])
            end_w = eff_end(w) if w else -INF
            later = [x for x in acked if x["start"] > end_w]
            if later:
                lost += len(later)
                newest = later[-1]
                self.violate("lost-write", {
                    "block": b, "final_value": v, "final_node": fin["node"],
                    "lost_acked_writes": len(later),
                    "newest_lost": {k: newest.get(k) for k in ("wid", "node", "epoch_seen", "start", "end", "conn")},
                    "final_write": ({k: w.get(k) for k in ("wid", "node", "epoch_seen", "start", "end", "result")}
                                    if w else None)})
        self.stats["writes_lost"] = lost

    def check_reads(self, reads, by_wid, acked_by_block):
        writes_by_block = collections.defaultdict(list)
        for w in by_wid.values():
            writes_by_block[w["block"]].append(w)
        for r in reads:
            if r["result"] != "ok":
                continue
            b = r["block"]
            val = r.get("value", "garbage:missing")
            if val.startswith("garbage:bad checksum") and any(
                    w["start"] < r["end"] and eff_end(w) > r["start"] for w in writes_by_block.get(b, [])):
                # NBD orders nothing between concurrent requests: a read overlapping a write
                # of the same block may see a mix. Not a violation; counted.
                self.findings.append({"note": "torn read concurrent with a write", "block": b,
                                      "read": {k: r.get(k) for k in ("worker", "node", "start", "end")}})
                self.stats["torn_reads_concurrent"] += 1
                continue
            w = self._value_write(val, b, by_wid, "read")
            if w is False:
                continue
            end_w = eff_end(w) if w else -INF
            bad = [x for x in acked_by_block.get(b, []) if x["end"] < r["start"] and x["start"] > end_w]
            if bad:
                newest = bad[-1]
                kind = "stale-read" if newest.get("epoch_seen") == r.get("epoch_seen") else \
                    "stale-read-after-failover"
                self.violate(kind, {
                    "block": b, "read": {k: r.get(k) for k in ("worker", "node", "epoch_seen", "start", "end", "value", "conn")},
                    "missed_acked_write": {k: newest.get(k) for k in ("wid", "node", "epoch_seen", "start", "end")}})

    def check_dual_ack(self, writes):
        acked = sorted((w for w in writes if w["result"] == "ok"), key=lambda w: w["start"])
        # sweep: keep, per node, the acked write with the latest end seen so far
        latest = {}
        n = 0
        for w in acked:
            for node, o in latest.items():
                if node != w["node"] and o["end"] >= w["start"]:
                    n += 1
                    if n <= 50:
                        self.violate("dual-ack", {
                            "a": {k: o.get(k) for k in ("wid", "node", "epoch_seen", "start", "end")},
                            "b": {k: w.get(k) for k in ("wid", "node", "epoch_seen", "start", "end")},
                            "overlap_s": round(min(o["end"], w["end"]) - w["start"], 4)})
            cur = latest.get(w["node"])
            if cur is None or w["end"] > cur["end"]:
                latest[w["node"]] = w
        self.stats["dual_ack_overlaps"] = n

    def primary_intervals(self, leased=False):
        """Per node: [t_first, t_last, epoch] runs of consecutive polls reporting primary
        (with leased=True: primary and /status saying the lease is valid)."""
        polls = collections.defaultdict(list)
        for r in self.recs:
            if r.get("type") == "status" and r["node"] != "w":
                polls[r["node"]].append(r)
        out = {}
        for node, ps in polls.items():
            ps.sort(key=lambda r: r["t0"])
            ivs = []
            cur = None
            for p in ps:
                # A failed poll (node paused, frozen, unreachable) ends a run: we only
                # count what was observed, never the unobserved gap.
                s = p["s"] if p.get("ok") and isinstance(p.get("s"), dict) else {}
                hit = s.get("role") == "primary" and (not leased or lease_valid(s) is True)
                if hit and cur and cur[2] == s.get("epoch"):
                    cur[1] = p["t1"]
                    continue
                if cur:
                    ivs.append(cur)
                cur = [p["t0"], p["t1"], s.get("epoch")] if hit else None
            if cur:
                ivs.append(cur)
            out[node] = ivs
        return out

    @staticmethod
    def overlaps(ivs):
        nodes = sorted(ivs)
        for i, x in enumerate(nodes):
            for y in nodes[i + 1:]:
                for a in ivs[x]:
                    for b in ivs[y]:
                        ov = min(a[1], b[1]) - max(a[0], b[0])
                        if ov >= 0:
                            yield x, y, a, b, ov

    def check_dual_primary(self):
        count, total = 0, 0.0
        for x, y, a, b, ov in self.overlaps(self.primary_intervals()):
            count += 1
            total += ov
            d = {"nodes": [x, y], "epochs": [a[2], b[2]], "overlap_s": round(ov, 3),
                 "interval_%s" % x: [a[0], a[1]], "interval_%s" % y: [b[0], b[1]]}
            if a[2] == b[2]:
                self.violate("dual-primary-same-epoch", d)
            elif ov > self.tol:
                self.violate("dual-primary", d)
            else:
                self.findings.append(dict(d, note="primary reports overlapped within tolerance"))
        self.check_lease_claims()
        self.stats["dual_primary_intervals"] = count
        self.stats["dual_primary_seconds"] = round(total, 3)

    def lease_claims(self):
        """Per node: [start, end, epoch] during which the node certainly or by its own
        word held a master lease, from /status polls with role primary and
        lease_valid_ms > 0. A run of consecutive claiming polls (same epoch) spans
        [first.t0, last.t1]. If the next poll of that node succeeds without a claim,
        the lease may have been released (switchover) right after the last claim, so
        the run ends at last.t1. If the node went silent instead (paused, frozen, cut
        off from the poller) the node itself said its lease runs until last.t0 + L."""
        polls = collections.defaultdict(list)
        for r in self.recs:
            if r.get("type") == "status" and r["node"] != "w":
                polls[r["node"]].append(r)
        out = {}
        for node, ps in polls.items():
            ps.sort(key=lambda r: r["t0"])
            runs, cur = [], None
            for p in ps:
                s = p["s"] if p.get("ok") and isinstance(p.get("s"), dict) else None
                rem = s.get("lease_valid_ms") if s else None
                claim = bool(s) and s.get("role") == "primary" and isinstance(rem, (int, float)) and rem > 0
                if claim and cur and cur[2] == s.get("epoch") and cur[4] is None:
                    cur[1], cur[3] = p["t1"], p["t0"] + rem / 1000.0
                    continue
                if cur:
                    # close: silent (failed poll) -> the node's own lease end; else last.t1
                    end = cur[3] if not p.get("ok") else cur[1]
                    runs.append([cur[0], max(cur[1], end), cur[2]])
                    cur = None
                if claim:
                    cur = [p["t0"], p["t1"], s.get("epoch"), p["t0"] + rem / 1000.0, None]
            if cur:
                runs.append([cur[0], max(cur[1], cur[3]), cur[2]])
            out[node] = runs
        return out

    def check_lease_claims(self):
        """R4b: two nodes holding a master lease (open write gate) at one instant."""
        n = 0
        for x, y, a, b, ov in self.overlaps(self.lease_claims()):
            if a[2] != b[2] and ov > self.lease_tol:
                n += 1
                self.violate("dual-lease", {"nodes": [x, y], "epochs": [a[2], b[2]], "overlap_s": round(ov, 3),
                                            "lease_%s" % x: [a[0], a[1]], "lease_%s" % y: [b[0], b[1]]})
        self.stats["dual_lease_overlaps"] = n

    def write_gaps(self, writes):
        """Client-visible write unavailability per fault: the longest stretch without an
        acknowledged write between the inject and 5 s after the heal (not a rule)."""
        import bisect
        ends = sorted(w["end"] for w in writes if w["result"] == "ok")
        inj = {r["id"]: r for r in self.recs if r.get("type") == "nemesis" and r.get("phase") == "inject"}
        heal = {r["id"]: r for r in self.recs if r.get("type") == "nemesis" and r.get("phase") == "heal"}
        gaps = []
        starts = sorted(r.get("t_start", r["t"]) for r in inj.values())
        stop = [r["t"] for r in self.recs if r.get("type") == "workload-stop"]
        last = stop[0] if stop else (ends[-1] if ends else 0.0)
        for fid, r in sorted(inj.items()):
            t0 = r.get("t_start", r["t"])
            t1 = heal[fid]["t"] + 5.0 if fid in heal else t0 + 10.0
            nxt = [t for t in starts if t > t0]
            t1 = min([t1, last] + nxt[:1])
            i = bisect.bisect_left(ends, t0)
            prev, gap = t0, 0.0
            while i < len(ends) and ends[i] <= t1:
                gap = max(gap, ends[i] - prev)
                prev = ends[i]
                i += 1
            gap = max(gap, min(t1, ends[i] if i < len(ends) else t1) - prev)
            gaps.append({"id": fid, "kind": r["kind"], "target": r["spec"].get("host"), "max_write_gap_s": round(gap, 3)})
        self.stats["write_gaps"] = gaps

    def check_convergence(self):
        conv = [r for r in self.recs if r.get("type") == "converge"]
        times = []
        for r in conv:
            if r.get("ok"):
                if r.get("after") == "heal":
                    times.append(r["seconds"])
            else:
                self.violate("no-convergence", {k: r.get(k) for k in ("after", "fault_id", "kind", "bound",
                                                                       "last_status")})
        self.stats["convergence_times"] = times

    def check_log_epochs(self):
        promos = collections.defaultdict(set)
        timeline = []
        for f in sorted(os.listdir(self.dir)):
            if not (f.startswith("node-") and f.endswith(".log")):
                continue
            node = f[len("node-"):-len(".log")]
            try:
                fh = open(os.path.join(self.dir, f), errors="replace")
            except OSError:
                continue
            with fh:
                for n, line in enumerate(fh, 1):
                    if n > 2000000:
                        break
                    if "promot" not in line and "demot" not in line:
                        continue
                    p = parse_log_line(line)
                    if not p:
                        continue
                    ev = p["kv"].get("event", "")
                    what = (ev + " " + p["message"]).lower()
                    kind = "promote" if "promot" in what and "demot" not in ev else (
                        "demote" if "demot" in what else None)
                    if not kind:
                        continue
                    epoch = p["kv"].get("epoch")
                    timeline.append({"t": p["t"], "node": node, "kind": kind, "epoch": epoch,
                                     "line": line.strip()[:200]})
                    if kind == "promote" and epoch is not None and ev.startswith("promot"):
                        promos[epoch].add(node)
        for epoch, nodes in promos.items():
            if len(nodes) > 1:
                self.violate("dual-promote-same-epoch-log", {"epoch": epoch, "nodes": sorted(nodes)})
        timeline.sort(key=lambda e: e["t"])
        self.log_timeline = timeline[:500]

    def check_logs(self):
        self.check_log_epochs()
        for f in sorted(os.listdir(self.dir)):
            if not (f.startswith("node-") or f.startswith("arb")) or not f.endswith(".log"):
                continue
            try:
                with open(os.path.join(self.dir, f), errors="replace") as fh:
                    for n, line in enumerate(fh, 1):
                        if CRASH_RE.search(line):
                            self.violate("crash", {"log": f, "line": n, "text": line.strip()[:300]})
                            break
            except OSError:
                pass
        for r in self.recs:
            if r.get("type") == "proc-exit" and not r.get("expected"):
                self.findings.append({"note": "process exited on its own", "proc": r.get("proc"),
                                      "rc": r.get("rc"), "t": r.get("t")})

    # ------------------------------------------------------------------
    def verdict(self):
        return {"ok": not self.violations, "seed": self.meta.get("seed"), "history": self.history_path,
                "stats": dict(self.stats),
                "violations": {k: {"count": len(v), "examples": v[:self.max_examples]}
                               for k, v in self.violations.items()},
                "findings": self.findings[:20], "log_timeline": getattr(self, "log_timeline", [])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--lease-ms", type=int, default=1200)
    ap.add_argument("--dual-primary-tolerance-s", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.run_dir, "history.jsonl")):
        print("no history.jsonl in %s" % a.run_dir, file=sys.stderr)
        return 2
    c = Checker(a.run_dir, a.lease_ms, a.dual_primary_tolerance_s)
    ok = c.check()
    v = c.verdict()
    with open(os.path.join(a.run_dir, "verdict.json"), "w") as f:
        json.dump(v, f, indent=1, sort_keys=True)
    if a.json:
        print(json.dumps(v, indent=1, sort_keys=True))
    st = v["stats"]
    print("checker: %s writes=%d acked=%d lost=%d reads=%d dual_ack=%d dual_primary=%d faults=%d" % (
        "PASS" if ok else "FAIL", st.get("writes", 0), st.get("writes_acked", 0), st.get("writes_lost", 0),
        st.get("reads", 0), st.get("dual_ack_overlaps", 0), st.get("dual_primary_intervals", 0),
        st.get("faults_injected", 0)))
    if not ok:
        for k, d in v["violations"].items():
            print("VIOLATION %s x%d: %s" % (k, d["count"], json.dumps(d["examples"][0], sort_keys=True)))
        print("seed=%s history=%s" % (v["seed"], v["history"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
