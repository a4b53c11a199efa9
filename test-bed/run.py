#!/usr/bin/python3
"""One seeded round: bed up -> cluster up -> workload + poller -> faults -> heal ->
convergence -> final read -> checker -> teardown. Prints the checker verdict line
and a JSON summary line `SUMMARY {...}`; exit 0 pass, 1 violation, 3 setup failure.

    run.py --seed N [--kinds k1,k2] [--faults N] [--planted] [--standin] [--out DIR]

Env: HAMGR_BIN (default .build/debug/hamgr), HAMGR_BIN_PLANTED (for --planted),
BED_CONVERGE_BOUND (s, default 30), BED_BOOT_BOUND (s, default 90).
"""
import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402
import netns  # noqa: E402
import nemesis  # noqa: E402
from cluster import Cluster, find_bin  # noqa: E402
from common import PY, BED_DIR, WORK_ROOT, Jsonl, log  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--kinds", default=",".join(nemesis.ALL_KINDS))
    ap.add_argument("--faults", type=int, default=0, help="number of faults (default: one per kind)")
    ap.add_argument("--planted", action="store_true", help="daemon with HAMGR_PLANTED_BUG=skip-lease-wait")
    ap.add_argument("--standin", action="store_true", help="NOT hamgr: nbdkit+fake status, plumbing only")
    ap.add_argument("--out", default=None, help="keep run artifacts here (default /tmp/hamgr-bed/runs/...)")
    ap.add_argument("--size-mb", type=int, default=32)
    ap.add_argument("--gap", type=float, default=1.0, help="quiet seconds between faults")
    ap.add_argument("--no-pinned", action="store_true")
    ap.add_argument("--target", choices=["master", "backup", "w"], help="pin every fault's target host")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run.py needs root")
    kinds = [k for k in a.kinds.split(",") if k]
    for k in kinds:
        if k not in nemesis.ALL_KINDS:
            sys.exit("unknown fault kind %r (known: %s)" % (k, ", ".join(nemesis.ALL_KINDS)))
    conv_bound = float(os.environ.get("BED_CONVERGE_BOUND", "30"))
    boot_bound = float(os.environ.get("BED_BOOT_BOUND", "90"))
    faults = nemesis.schedule(a.seed, kinds, a.faults or len(kinds), a.target)

    netns.cleanup_stale(verbose=False)
    bed = netns.Bed()
    run_dir = a.out or os.path.join(WORK_ROOT, "runs", "%s-seed%d" % (bed.prefix, a.seed))
    os.makedirs(run_dir, exist_ok=True)
    env = {}
    hamgr = None
    if a.planted:
        hamgr = find_bin("HAMGR_BIN_PLANTED", ".build/debug/hamgr")
        env["HAMGR_PLANTED_BUG"] = "skip-lease-wait"
    cl = Cluster(bed, run_dir, size_mb=a.size_mb, hamgr=hamgr, env=env, standin=a.standin)
    if not a.standin and not os.access(cl.hamgr, os.X_OK):
        print("hamgr binary not found at %s (set HAMGR_BIN)" % cl.hamgr)
        return 3
    hist = Jsonl(os.path.join(run_dir, "history.jsonl"))
    hist.write({"type": "meta", "seed": a.seed, "t": time.time(), "faults": faults, "standin": a.standin,
                "planted": a.planted, "hamgr": None if a.standin else cl.hamgr, "prefix": bed.prefix,
                "converge_bound": conv_bound})
    log("run seed=%d dir=%s %s" % (a.seed, run_dir, "(STAND-IN, not hamgr)" if a.standin else cl.hamgr))
    stop_w = os.path.join(run_dir, "stop-workload")
    stop_p = os.path.join(run_dir, "stop-poller")
    rc = 0
    injected = collections.Counter()
    try:
        bed.up()
        cl.prepare()
        cl.start_all()
        h_path = os.path.join(run_dir, "history.jsonl")
        bed.spawn("poller", "c", [PY, os.path.join(BED_DIR, "workload.py"), "poll", "--cluster", cl.cluster_json,
                                  "--history", h_path, "--stop-file", stop_p, "--latest", cl.latest_path,
                                  "--seconds", "1800"], log_path=os.path.join(run_dir, "poller.log"))
        ok, secs, why = cl.wait_converged(boot_bound, fail_on_exit=True)
        hist.write({"type": "converge", "after": "bootstrap", "ok": ok, "seconds": secs, "bound": boot_bound,
                    "why": why, "t": time.time()})
        if not ok:
            log("cluster did not come up within %ss: %s" % (boot_bound, why))
            for name in ("arb", "node-a", "node-b"):
                log("--- %s log tail:\n%s" % (name, cl.log_tail(name)))
            print("SETUP FAILED: cluster did not converge at bootstrap: %s (run dir %s)" % (why, run_dir))
            print("SUMMARY " + json.dumps({"seed": a.seed, "ok": False, "run_dir": run_dir, "standin": a.standin,
                                           "faults": {}, "writes_acked": 0, "writes_lost": 0, "dual_master": 0,
                                           "convergence": [], "violations": {"setup-failed": 1}}))
            rc = 3
            return rc
        log("cluster up in %.1fs: %s" % (secs, why))
        wl_argv = [PY, os.path.join(BED_DIR, "workload.py"), "run", "--cluster", cl.cluster_json,
                   "--history", h_path, "--stop-file", stop_w, "--seconds", "1800", "--seed", str(a.seed)]
        if a.no_pinned:
            wl_argv.append("--no-pinned")
        bed.spawn("workload", "c", wl_argv, log_path=os.path.join(run_dir, "workload.log"))
        time.sleep(2.0)
        nem = nemesis.Nemesis(bed, cl, hist)
        for spec in faults:
            f = nem.inject(spec)
            injected[f["kind"]] += 1
            t_end = time.monotonic() + f["hold"]
            n = 0
            while time.monotonic() < t_end and n < 10000:
                n += 1
                time.sleep(0.1)
            nem.heal(f)
            cl.ensure_running(hist)
            ok, secs, why = cl.wait_converged(conv_bound)
            hist.write({"type": "converge", "after": "heal", "fault_id": f["id"], "kind": f["kind"], "ok": ok,
                        "seconds": secs, "bound": conv_bound, "t": time.time(),
                        "last_status": None if ok else {h: (r.get("s") or r.get("err")) for h, r in cl.latest().items()}})
            log("converged after %s in %.1fs" % (f["kind"], secs) if ok else
                "NOT converged %.0fs after healing %s: %s" % (secs, f["kind"], why))
            if not ok:
                log("stopping the schedule: further faults on an unconverged cluster prove nothing")
                break
            time.sleep(a.gap)
        hist.write({"type": "workload-stop", "t": time.time()})
        open(stop_w, "w").close()
        try:
            bed.procs["workload"]["popen"].wait(timeout=20)
        except subprocess.TimeoutExpired:
            bed.kill("workload")
        ok, secs, why = cl.wait_converged(conv_bound)
        hist.write({"type": "converge", "after": "final", "ok": ok, "seconds": secs, "bound": conv_bound,
                    "t": time.time(), "why": why})
        fr = subprocess.run(["ip", "netns", "exec", bed.ns["c"], PY, os.path.join(BED_DIR, "workload.py"),
                             "final", "--cluster", cl.cluster_json, "--history", h_path],
                            capture_output=True, text=True, timeout=90)
        if fr.returncode != 0:
            log("final read failed: %s" % fr.stderr.strip()[-300:])
        open(stop_p, "w").close()
        try:
            bed.procs["poller"]["popen"].wait(timeout=5)
        except subprocess.TimeoutExpired:
            bed.kill("poller")
    finally:
        try:
            cl.stop_all()
            for name in list(bed.procs):
                bed.kill(name)
        finally:
            bed.down()
    c = checker.Checker(run_dir)
    passed = c.check()
    v = c.verdict()
    with open(os.path.join(run_dir, "verdict.json"), "w") as f:
        json.dump(v, f, indent=1, sort_keys=True)
    st = v["stats"]
    print("checker: %s seed=%d writes=%d acked=%d lost=%d reads=%d dual_ack=%d dual_primary=%d faults=%d" % (
        "PASS" if passed else "FAIL", a.seed, st.get("writes", 0), st.get("writes_acked", 0),
        st.get("writes_lost", 0), st.get("reads", 0), st.get("dual_ack_overlaps", 0),
        st.get("dual_primary_intervals", 0), st.get("faults_injected", 0)))
    if not passed:
        for k, d in v["violations"].items():
            print("VIOLATION %s x%d: %s" % (k, d["count"], json.dumps(d["examples"][0], sort_keys=True)[:600]))
        print("seed=%d history=%s" % (a.seed, v["history"]))
    print("SUMMARY " + json.dumps({"seed": a.seed, "ok": passed, "run_dir": run_dir, "standin": a.standin,
                                   "faults": dict(injected), "writes_acked": st.get("writes_acked", 0),
                                   "writes_lost": st.get("writes_lost", 0),
                                   "dual_master": st.get("dual_ack_overlaps", 0) +
                                   sum(d["count"] for k, d in v["violations"].items() if k.startswith("dual-primary")),
                                   "convergence": [round(x, 2) for x in st.get("convergence_times", [])],
                                   "write_gaps": [[g["kind"], g["target"], g["max_write_gap_s"]]
                                                  for g in st.get("write_gaps", [])],
                                   "violations": {k: d["count"] for k, d in v["violations"].items()}},
                                  sort_keys=True))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
