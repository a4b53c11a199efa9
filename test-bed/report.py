#!/usr/bin/python3
"""Aggregate `SUMMARY {...}` lines of run.py rounds (stdin or files) into a table.

    report.py [--expect-violation] FILE...     exit 0 if all rounds passed
                                               (with --expect-violation: if at least one failed)
"""
import json
import statistics
import sys
from collections import Counter


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    expect_violation = "--expect-violation" in sys.argv
    lines = []
    for path in args or ["-"]:
        fh = sys.stdin if path == "-" else open(path)
        lines += [l for l in fh if l.startswith("SUMMARY ")]
    rounds = [json.loads(l[8:]) for l in lines]
    faults, viol = Counter(), Counter()
    acked = lost = dual = 0
    conv = []
    failed = []
    for r in rounds:
        faults.update(r["faults"])
        viol.update(r["violations"])
        acked += r["writes_acked"]
        lost += r["writes_lost"]
        dual += r["dual_master"]
        conv += r["convergence"]
        if not r["ok"]:
            failed.append(r)
    print("rounds: %d (%d passed, %d failed)%s" % (len(rounds), len(rounds) - len(failed), len(failed),
                                                  "  [STAND-IN, not hamgr]" if any(r.get("standin") for r in rounds) else ""))
    print("%-22s %s" % ("fault kind", "injected"))
    for k in sorted(faults):
        print("  %-20s %d" % (k, faults[k]))
    print("%-22s %d" % ("writes acknowledged", acked))
    print("%-22s %d" % ("writes lost", lost))
    print("%-22s %d" % ("dual-master intervals", dual))
    if conv:
        print("%-22s median %.2f s, max %.2f s (n=%d)" % ("convergence after heal", statistics.median(conv),
                                                           max(conv), len(conv)))
    else:
        print("%-22s n/a" % "convergence after heal")
    gaps = {}
    for r in rounds:
        for kind, target, g in r.get("write_gaps", []):
            gaps.setdefault(kind, []).append(g)
    if gaps:
        print("longest stretch without an acknowledged write, per fault kind (s): median / max")
        for k in sorted(gaps):
            print("  %-20s %.2f / %.2f (n=%d)" % (k, statistics.median(gaps[k]), max(gaps[k]), len(gaps[k])))
    for k in sorted(viol):
        print("violation %-20s %d" % (k, viol[k]))
    for r in failed:
        print("FAILED seed=%s history=%s/history.jsonl violations=%s" % (r["seed"], r["run_dir"], r["violations"]))
    if expect_violation:
        return 0 if failed else 1
    return 0 if rounds and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
