#!/usr/bin/python3
"""Self-tests of the harness; none needs hamgr. Prints `N passed, M failed`.

    selftest.py [-k NAME_SUBSTRING]
"""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402
import netns  # noqa: E402
import nemesis  # noqa: E402
from common import PY, BED_DIR, Jsonl, bounded_wait, run, try_run  # noqa: E402

TESTS = []
MINE = set()  # bed prefixes this self-test created: other beds may run concurrently (CI)

_orig_init = netns.Bed.__init__


def _tracking_init(self, *a, **kw):
    _orig_init(self, *a, **kw)
    MINE.add(self.prefix)


netns.Bed.__init__ = _tracking_init


def foreign_live():
    out = set()
    for f in netns.glob.glob(os.path.join(netns.STATE_ROOT, "*.json")):
        try:
            st = json.load(open(f))
            if st["prefix"] not in MINE and netns.pid_alive(int(st["owner"])):
                out.add(st["prefix"])
        except (OSError, ValueError, KeyError):
            pass
    return out


def ours(prefix):
    """What of one bed exists now: netns, route, cgroups, loops, state file."""
    left = netns.leftovers()
    return {k: [x for x in v if prefix in x] for k, v in left.items() if k != "routes"}


def test(fn):
    TESTS.append(fn)
    return fn


def root_snapshot():
    return {"routes": run(["ip", "route", "show", "table", "all"]).stdout,
            "netns": run(["ip", "netns", "list"]).stdout,
            "nft": run(["nft", "list", "tables"]).stdout,
            "links": sorted(l.split(":")[1].strip().split("@")[0]
                            for l in run(["ip", "-o", "link"]).stdout.splitlines()),
            "ours": netns.leftovers()}


def assert_eq(a, b, what):
    if a != b:
        raise AssertionError("%s: %r != %r" % (what, a, b))


def assert_true(c, what):
    if not c:
        raise AssertionError(what)


class StubCluster:
    """What nemesis needs from a cluster, for tests without hamgr."""

    def __init__(self, bed):
        self.bed = bed
        self.mounts = {}

    def current_master(self):
        return "a"

    def link_ports(self, src, dst):
        return {"a": [7788], "b": [7788], "w": [7790], "c": []}[dst] if src != "c" else [10809]

    def proc_name(self, h):
        return "node-" + h

    def restart(self, name):
        self.bed.restart(name)

    def disk_mount(self, h):
        return self.mounts[h]

    def repair_disk(self, h):
        pass


def ping(bed, src, dst, count=2, interval="0.2", wait="1"):
    cp = bed.nsx(bed.ns[src], ["ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", wait,
                               bed.ip(dst)], timeout=30, check=False)
    for line in cp.stdout.splitlines():
        if "packets transmitted" in line:
            rx = int(line.split(",")[1].split()[0])
            return rx
    return 0


UDP_RX = r"""
import socket,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((sys.argv[1],int(sys.argv[2])));s.settimeout(1.5)
try: print(s.recv(100).decode())
except socket.timeout: print("none")
"""
UDP_TX = r"""
import socket,sys,time
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
for i in range(5): s.sendto(b"hi",(sys.argv[1],int(sys.argv[2]))); time.sleep(0.1)
"""


def udp_delivered(bed, src, dst, port=5555):
    rx = subprocess.Popen(["ip", "netns", "exec", bed.ns[dst], PY, "-c", UDP_RX, bed.ip(dst), str(port)],
                          stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    bed.nsx(bed.ns[src], [PY, "-c", UDP_TX, bed.ip(dst), str(port)], timeout=10)
    out, _ = rx.communicate(timeout=10)
    return out.strip() == "hi"


ECHO = r"""
import socket,threading,sys
ls=socket.socket();ls.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);ls.bind((sys.argv[1],int(sys.argv[2])));ls.listen(8)
def h(c):
    while True:
        d=c.recv(4096)
        if not d: break
        c.sendall(d)
for _ in range(100):
    c,_=ls.accept(); threading.Thread(target=h,args=(c,),daemon=True).start()
"""
RTT = r"""
import socket,sys,time,statistics
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5);s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
r=[]
for i in range(int(sys.argv[3])):
    t=time.monotonic();s.sendall(b"x"*64);n=0
    while n<64: n+=len(s.recv(64-n))
    r.append((time.monotonic()-t)*1000)
print(statistics.median(r))
"""


def rtt_ms(bed, src, dst, port, n=10):
    cp = bed.nsx(bed.ns[src], [PY, "-c", RTT, bed.ip(dst), str(port), str(n)], timeout=60)
    return float(cp.stdout.strip())


# ---------------------------------------------------------------------------
@test
def netns_up_down_leaves_nothing():
    strict = not foreign_live()  # the whole-root comparison only when no other bed runs
    before = root_snapshot()
    bed = netns.Bed().up(install_handlers=False)
    mid = netns.leftovers()
    assert_eq(len([n for n in mid["netns"] if n.startswith(bed.prefix)]), 5, "five namespaces while up")
    assert_true(any("blackhole 10.%d.0.0/16" % bed.octet in r for r in mid["routes"]), "blackhole route")
    # the root namespace must not route the bed's addresses anywhere
    cp = run(["ip", "route", "get", bed.ip("a")], check=False)
    assert_true(cp.returncode != 0 or "blackhole" in cp.stdout, "root routes bed address: " + cp.stdout)
    assert_eq(ping(bed, "a", "b"), 2, "a->b ping through router")
    assert_eq(ping(bed, "c", "w"), 2, "c->w ping through router")
    bed.down()
    assert_true(not any(ours(bed.prefix).values()), "leftovers of %s: %s" % (bed.prefix, ours(bed.prefix)))
    assert_true(not any("10.%d.0.0/16" % bed.octet in r for r in netns.leftovers()["routes"]), "route left")
    if strict and not foreign_live():
        assert_eq(root_snapshot(), before, "root namespace state after teardown")


@test
def partitions_drop_and_heal():
    bed = netns.Bed().up(install_handlers=False)
    try:
        hist = Jsonl(os.path.join(bed.workdir, "h.jsonl"))
        nem = nemesis.Nemesis(bed, StubCluster(bed), hist)
        assert_eq(ping(bed, "a", "b"), 2, "before")
        f = nem.inject({"kind": "isolate", "host": "a"})
        assert_eq(ping(bed, "a", "b", wait="0.5"), 0, "a isolated: a->b")
        assert_eq(ping(bed, "w", "a", wait="0.5"), 0, "a isolated: w->a")
        assert_eq(ping(bed, "c", "a"), 2, "client still reaches a")
        assert_eq(ping(bed, "b", "w"), 2, "b-w unaffected")
        nem.heal(f)
        assert_eq(ping(bed, "a", "b"), 2, "healed a->b")
        f = nem.inject({"kind": "cut-ab"})
        assert_eq(ping(bed, "b", "a", wait="0.5"), 0, "cut-ab")
        assert_eq(ping(bed, "a", "w"), 2, "cut-ab leaves a-w")
        nem.heal(f)
        f = nem.inject({"kind": "one-way", "src": "a", "dst": "b"})
        assert_true(not udp_delivered(bed, "a", "b"), "one-way a->b must drop")
        assert_true(udp_delivered(bed, "b", "a"), "one-way b->a must pass")
        nem.heal(f)
        assert_true(udp_delivered(bed, "a", "b"), "healed one-way")
        recs = [json.loads(l) for l in open(hist.path)]
        assert_eq(len([r for r in recs if r["type"] == "nemesis"]), 6, "inject+heal records")
        assert_true(all("t" in r for r in recs), "timestamps")
        out = bed.nsx(bed.router, ["nft", "list", "chain", "inet", "bed", "filt"]).stdout
        assert_true("drop" not in out, "no drop rule left after heals: " + out)
    finally:
        bed.down()


@test
def loss_rule_drops_some():
    bed = netns.Bed().up(install_handlers=False)
    try:
        nem = nemesis.Nemesis(bed, StubCluster(bed), Jsonl(os.path.join(bed.workdir, "h.jsonl")))
        f = nem.inject({"kind": "loss", "x": "a", "y": "b", "pct": 30})
        rx = ping(bed, "a", "b", count=200, interval="0.005", wait="0.3")
        nem.heal(f)
        # each ping crosses the rule twice: expected delivery 0.7^2 = 49 %
        assert_true(60 <= rx <= 140, "30%% loss both ways: %d/200 replies" % rx)
        assert_eq(ping(bed, "a", "b"), 2, "healed")
    finally:
        bed.down()


@test
def delay_relay_adds_configured_delay():
    bed = netns.Bed().up(install_handlers=False)
    try:
        bed.spawn("echo", "b", [PY, "-c", ECHO, bed.ip("b"), "7788"])
        time.sleep(0.5)
        base = rtt_ms(bed, "a", "b", 7788)
        nem = nemesis.Nemesis(bed, StubCluster(bed), Jsonl(os.path.join(bed.workdir, "h.jsonl")))
        f = nem.inject({"kind": "delay", "x": "a", "y": "b", "ms": 50})
        delayed = rtt_ms(bed, "a", "b", 7788)
        nem.heal(f)
        after = rtt_ms(bed, "a", "b", 7788)
        print("    rtt direct %.2f ms, with 50 ms relay %.2f ms, healed %.2f ms" % (base, delayed, after))
        assert_true(95 <= delayed - base <= 130, "relay should add ~100 ms RTT, added %.1f" % (delayed - base))
        assert_true(after < 20, "healed rtt %.1f" % after)
    finally:
        bed.down()


@test
def slow_link_tbf():
    bed = netns.Bed().up(install_handlers=False)
    try:
        nem = nemesis.Nemesis(bed, StubCluster(bed), Jsonl(os.path.join(bed.workdir, "h.jsonl")))
        f = nem.inject({"kind": "slow", "host": "a", "kbit": 256})
        out = bed.nsx(bed.router, ["tc", "qdisc", "show", "dev", "to-a"]).stdout
        assert_true("tbf" in out, out)
        nem.heal(f)
        out = bed.nsx(bed.router, ["tc", "qdisc", "show", "dev", "to-a"]).stdout
        assert_true("tbf" not in out, out)
    finally:
        bed.down()


@test
def process_faults_kill_pause_freeze():
    bed = netns.Bed().up(install_handlers=False)
    try:
        nem = nemesis.Nemesis(bed, StubCluster(bed), Jsonl(os.path.join(bed.workdir, "h.jsonl")))
        bed.spawn("node-a", "a", ["sleep", "300"])
        pid = bed.procs["node-a"]["pid"]
        def pstate():
            return open("/proc/%d/stat" % pid).read().split(")")[1].split()[0]
        f = nem.inject({"kind": "pause", "host": "a"})
        assert_true(bounded_wait(lambda: pstate() == "T", 2.0), "stopped: %s" % pstate())
        nem.heal(f)
        assert_true(bounded_wait(lambda: pstate() in ("S", "R"), 2.0), "continued: %s" % pstate())
        f = nem.inject({"kind": "freeze", "host": "a"})
        cg = "/sys/fs/cgroup/freezer/%s-a" % bed.prefix
        assert_eq(open(cg + "/freezer.state").read().strip(), "FROZEN", "frozen")
        assert_true(str(pid) in open(cg + "/cgroup.procs").read().split(), "pid in freezer cgroup")
        nem.heal(f)
        assert_eq(open(cg + "/freezer.state").read().strip(), "THAWED", "thawed")
        f = nem.inject({"kind": "kill", "host": "a"})
        assert_true(not bed.alive("node-a"), "killed")
        nem.heal(f)
        assert_true(bed.alive("node-a") and bed.procs["node-a"]["pid"] != pid, "restarted with new pid")
    finally:
        bed.down()
    assert_true(not os.path.exists("/sys/fs/cgroup/freezer/%s-a" % bed.prefix), "freezer cgroup removed")


@test
def storage_faults_full_and_eio():
    bed = netns.Bed().up(install_handlers=False)
    try:
        cl = StubCluster(bed)
        nem = nemesis.Nemesis(bed, cl, Jsonl(os.path.join(bed.workdir, "h.jsonl")))
        _, mnt = bed.make_disk("a", 32)
        cl.mounts["a"] = mnt
        data = os.path.join(mnt, "data")
        fd = os.open(data, os.O_RDWR | os.O_CREAT)
        f = nem.inject({"kind": "disk-full", "host": "a"})
        try:
            os.pwrite(fd, b"x" * 65536, 1 << 20)
            os.fsync(fd)
            raise AssertionError("write to a full fs succeeded")
        except OSError as e:
            assert_eq(e.errno, 28, "ENOSPC")
        nem.heal(f)
        os.pwrite(fd, b"x" * 65536, 1 << 20)
        os.fsync(fd)
        f = nem.inject({"kind": "disk-eio", "host": "a"})
        try:
            os.pwrite(fd, b"y" * 4096, 0)
            os.fsync(fd)
            raise AssertionError("write after shutdown succeeded")
        except OSError as e:
            assert_eq(e.errno, 5, "EIO")
        os.close(fd)
    finally:
        bed.down()
    assert_true(not ours(bed.prefix)["loops"], "loop device detached")


@test
def sigterm_tears_down():
    p = subprocess.Popen([PY, os.path.join(BED_DIR, "netns.py"), "up", "--hold", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert_true(line.startswith("{"), "bed came up: %r" % line)
    pfx = json.loads(line)["prefix"]
    MINE.add(pfx)
    assert_eq(len(ours(pfx)["netns"]), 5, "up")
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert_true(not any(ours(pfx).values()), "after SIGTERM: %s" % ours(pfx))


@test
def cleanup_stale_removes_killed_run():
    p = subprocess.Popen([PY, os.path.join(BED_DIR, "netns.py"), "up", "--hold", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert_true(line.startswith("{"), "bed came up")
    pfx = json.loads(line)["prefix"]
    MINE.add(pfx)
    p.kill()  # SIGKILL: no handler runs, leftovers stay
    p.wait(timeout=10)
    assert_eq(len(ours(pfx)["netns"]), 5, "leftovers after SIGKILL")
    cp = run([PY, os.path.join(BED_DIR, "netns.py"), "cleanup-stale"], timeout=60)
    assert_true("removed" in cp.stdout, cp.stdout)
    assert_true(not any(ours(pfx).values()), "after cleanup-stale: %s" % ours(pfx))


# --- checker on hand-made histories ----------------------------------------
def mk_run(records):
    d = tempfile.mkdtemp(prefix="hbcheck-")
    with open(os.path.join(d, "history.jsonl"), "w") as f:
        f.write(json.dumps({"type": "meta", "seed": 42}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
    return d


def W(wid, block, node, start, end, result="ok", epoch=1):
    return {"type": "op", "op": "write", "wid": wid, "block": block, "node": node, "start": start,
            "end": end, "result": result, "epoch_seen": epoch, "worker": wid.split("-")[0], "conn": "x"}


def R(block, node, start, end, value, epoch=1):
    return {"type": "op", "op": "read", "block": block, "node": node, "start": start, "end": end,
            "result": "ok", "value": value, "epoch_seen": epoch, "worker": "f0", "conn": "x"}


def FINAL(values, node="a"):
    return {"type": "final", "node": node, "epoch": 1, "start": 100, "end": 101, "values": values}


def ST(node, t, role, epoch, **kw):
    s = {"role": role, "epoch": epoch}
    s.update(kw)
    return {"type": "status", "node": node, "t0": t, "t1": t + 0.01, "ok": True, "s": s}


def CONV(ok, secs=2.0):
    return {"type": "converge", "ok": ok, "seconds": secs, "bound": 30, "after": "final"}


GOOD = [W("f0-1", 0, "a", 1.0, 1.1), W("f0-2", 0, "a", 2.0, 2.1), W("f0-3", 1, "a", 2.2, 2.3),
        R(0, "a", 2.5, 2.6, "f0-2"),
        W("f1-1", 2, "a", 3.0, 3.5, result="timeout"),   # indeterminate: may or may not survive
        W("f1-2", 1, "b", 6.0, 6.1, epoch=2),             # after failover to b
        R(1, "b", 6.2, 6.3, "f1-2", epoch=2),
        R(2, "b", 6.4, 6.5, "zero", epoch=2),
        ST("a", 1.0, "primary", 1), ST("a", 3.0, "primary", 1), ST("a", 4.0, "secondary", 2),
        ST("b", 1.0, "secondary", 1), ST("b", 4.5, "primary", 2), ST("b", 7.0, "primary", 2),
        CONV(True), FINAL({"0": "f0-2", "1": "f1-2"}, node="b")]


def verdict(records):
    c = checker.Checker(mk_run(records))
    c.check()
    return c.verdict()


@test
def checker_passes_good_history():
    v = verdict(GOOD)
    assert_true(v["ok"], "good history flagged: %s" % json.dumps(v["violations"]))
    v = verdict(GOOD[:-1] + [FINAL({"0": "f0-2", "1": "f1-2", "2": "f1-1"}, node="b")])
    assert_true(v["ok"], "indeterminate write surviving is allowed: %s" % json.dumps(v["violations"]))


def expect_violation(records, kind):
    v = verdict(records)
    assert_true(not v["ok"] and kind in v["violations"],
                "expected %s, got %s" % (kind, list(v["violations"])))
    return v


@test
def checker_flags_lost_write():
    v = expect_violation(GOOD[:-1] + [FINAL({"0": "f0-1", "1": "f1-2"}, node="b")], "lost-write")
    assert_eq(v["stats"]["writes_lost"], 1, "one lost write")
    expect_violation(GOOD[:-1] + [FINAL({"1": "f1-2"}, node="b")], "lost-write")  # block 0 zero
    expect_violation(GOOD[:-1] + [FINAL({"0": "f0-2", "1": "f0-3"}, node="b")], "lost-write")


@test
def checker_flags_stale_read():
    expect_violation(GOOD + [R(0, "a", 2.7, 2.8, "f0-1")], "stale-read")
    expect_violation(GOOD + [R(1, "b", 6.7, 6.8, "f0-3", epoch=2)], "stale-read")
    expect_violation(GOOD + [R(0, "b", 6.7, 6.8, "zero", epoch=2)], "stale-read-after-failover")


@test
def checker_flags_dual_master():
    expect_violation(GOOD + [W("pb-1", 5, "b", 2.05, 2.2, epoch=2)], "dual-ack")
    expect_violation(GOOD + [ST("b", 3.0, "primary", 1), ST("b", 3.2, "primary", 1)],
                     "dual-primary-same-epoch")
    expect_violation(GOOD + [ST("a", 5.0, "primary", 1), ST("a", 6.5, "primary", 1)], "dual-primary")
    FAIL_A = {"type": "status", "node": "a", "t0": 4.4, "t1": 4.9, "ok": False, "err": "timed out"}
    # a goes silent after claiming 900 ms at 4.3; b claims a lease at 4.6: two open gates
    expect_violation(GOOD + [ST("a", 4.3, "primary", 1, lease_valid_ms=900), FAIL_A,
                             ST("b", 4.6, "primary", 2, lease_valid_ms=1000),
                             ST("b", 4.9, "primary", 2, lease_valid_ms=1000)], "dual-lease")
    # a's silent lease ends (4.45) before b's first claim (4.6): fine
    v = verdict(GOOD + [ST("a", 4.3, "primary", 1, lease_valid_ms=150), FAIL_A,
                        ST("b", 4.6, "primary", 2, lease_valid_ms=1000)])
    assert_true("dual-lease" not in v["violations"], "lease ended in time: %s" % v["violations"])
    # switchover: a claims 1000 ms at 4.3 but answers at 4.5 as secondary (released): fine
    v = verdict(GOOD + [ST("a", 4.3, "primary", 1, lease_valid_ms=1000), ST("a", 4.5, "secondary", 2),
                        ST("b", 4.55, "primary", 2, lease_valid_ms=1000)])
    assert_true("dual-lease" not in v["violations"], "released lease: %s" % v["violations"])
    # observed directly: both claim in overlapping runs
    expect_violation(GOOD + [ST("a", 4.3, "primary", 1, lease_valid_ms=500), ST("a", 4.7, "primary", 1, lease_valid_ms=100),
                             ST("b", 4.5, "primary", 2, lease_valid_ms=1000), ST("b", 4.8, "primary", 2, lease_valid_ms=900)],
                     "dual-lease")
    # a brief overlap inside the poll tolerance is a finding, not a violation
    v = verdict(GOOD + [ST("a", 4.5, "primary", 1)])
    assert_true(v["ok"] and v["findings"], "brief overlap: %s" % json.dumps(v))


@test
def checker_flags_corruption_convergence_crash():
    expect_violation(GOOD[:-1] + [FINAL({"0": "garbage:bad checksum", "1": "f1-2"})], "corrupt-final")
    expect_violation(GOOD[:-1] + [FINAL({"0": "zz-9", "1": "f1-2"})], "phantom-final")
    expect_violation(GOOD + [R(0, "a", 2.7, 2.8, "garbage:bad magic")], "corrupt-read")
    expect_violation(GOOD + [R(0, "a", 2.7, 2.8, "garbage:bad checksum")], "corrupt-read")
    v = verdict(GOOD + [R(0, "a", 2.05, 2.08, "garbage:bad checksum")])  # overlaps write f0-2
    assert_true(v["ok"] and v["stats"]["torn_reads_concurrent"] == 1, "torn concurrent read: %s" % v)
    expect_violation(GOOD + [CONV(False)], "no-convergence")
    expect_violation(GOOD[:-1], "no-final-read")
    d = mk_run(GOOD)
    with open(os.path.join(d, "node-a.log"), "w") as f:
        f.write("ok\nFatal error: Index out of range\n")
    c = checker.Checker(d)
    assert_true(not c.check() and "crash" in c.violations, "crash in log")


@test
def checker_reads_daemon_log_epochs():
    d = mk_run(GOOD)
    with open(os.path.join(d, "node-a.log"), "w") as f:
        f.write("2026-11-22T00:00:01.000Z NOTICE hamgr: promoted epoch=1 event=promote node=a\n")
    with open(os.path.join(d, "node-b.log"), "w") as f:
        f.write("2026-11-22T00:00:05.500Z NOTICE hamgr: promoted epoch=2 event=promote node=b\n")
    c = checker.Checker(d)
    assert_true(c.check(), "distinct epochs are fine: %s" % dict(c.violations))
    assert_eq(len(c.verdict()["log_timeline"]), 2, "timeline")
    with open(os.path.join(d, "node-b.log"), "a") as f:
        f.write("2026-11-22T00:00:09.000Z NOTICE hamgr: promoted epoch=1 event=promote node=b\n")
    c = checker.Checker(d)
    assert_true(not c.check() and "dual-promote-same-epoch-log" in c.violations, "same epoch twice")


@test
def checker_cli_exit_codes():
    cp = run([PY, os.path.join(BED_DIR, "checker.py"), mk_run(GOOD)], check=False)
    assert_eq(cp.returncode, 0, "good: " + cp.stdout)
    bad = mk_run(GOOD[:-1] + [FINAL({"0": "f0-1", "1": "f1-2"}, node="b")])
    cp = run([PY, os.path.join(BED_DIR, "checker.py"), bad], check=False)
    assert_eq(cp.returncode, 1, "bad exit code")
    assert_true("seed=42" in cp.stdout and "history.jsonl" in cp.stdout, cp.stdout)


@test
def seeded_schedule_is_reproducible_and_covers_kinds():
    a = nemesis.schedule(7, nemesis.ALL_KINDS, len(nemesis.ALL_KINDS))
    b = nemesis.schedule(7, nemesis.ALL_KINDS, len(nemesis.ALL_KINDS))
    assert_eq(a, b, "same seed, same schedule")
    assert_eq(sorted(f["kind"] for f in a), sorted(nemesis.ALL_KINDS), "every kind once")
    assert_true(a != nemesis.schedule(8, nemesis.ALL_KINDS, len(nemesis.ALL_KINDS)), "seed matters")
    assert_true(all(f["hold"] >= 3 for f in a if f["kind"] in ("pause", "freeze")), "pause > lease")


def run_round(args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    cp = subprocess.run([PY, os.path.join(BED_DIR, "run.py")] + args, capture_output=True, text=True,
                        timeout=300, env=e)
    summ = [l for l in cp.stdout.splitlines() if l.startswith("SUMMARY ")]
    assert_true(summ, "no SUMMARY line: rc=%d\n%s\n%s" % (cp.returncode, cp.stdout, cp.stderr[-2000:]))
    return cp.returncode, json.loads(summ[-1][8:]), cp.stdout


@test
def standin_end_to_end_plumbing():
    """Workload, poller, nemesis, final read and checker against a STAND-IN (nbdkit), not hamgr."""
    rc, s, out = run_round(["--standin", "--seed", "11", "--kinds", "delay,loss,kill,pause,one-way",
                            "--gap", "0.3"])
    assert_eq(rc, 0, "stand-in round should pass: %s" % out)
    assert_true(s["writes_acked"] > 100, "workload acked writes: %s" % s)
    assert_eq(sum(s["faults"].values()), 5, "five faults")


@test
def standin_lossy_is_caught_end_to_end():
    """nbdkit memory as the 'master', killed and restarted: acked writes vanish -> violation."""
    rc, s, out = run_round(["--standin", "--seed", "13", "--kinds", "kill", "--gap", "0.3"],
                           env={"BED_STANDIN_PLUGIN": "memory"})
    assert_eq(rc, 1, "lossy stand-in must fail: %s" % out)
    assert_true("lost-write" in s["violations"] or "stale-read" in s["violations"]
                or "stale-read-after-failover" in s["violations"], "lost-write reported: %s" % s)


def foreign_octets(prefixes):
    out = []
    for p in prefixes:
        try:
            out.append(str(json.load(open(os.path.join(netns.STATE_ROOT, p + ".json")))["octet"]))
        except (OSError, ValueError, KeyError):
            pass
    return out


def main():
    only = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "-k" else None
    if os.geteuid() != 0:
        sys.exit("selftest needs root")
    netns.cleanup_stale(verbose=False)
    passed = failed = 0
    for t in TESTS:
        if only and only not in t.__name__:
            continue
        t0 = time.monotonic()
        try:
            t()
            passed += 1
            print("ok   %-45s %.1fs" % (t.__name__, time.monotonic() - t0), flush=True)
        except Exception:  # noqa: BLE001
            failed += 1
            print("FAIL %-45s %.1fs\n%s" % (t.__name__, time.monotonic() - t0,
                                            "".join("    " + l for l in traceback.format_exc().splitlines(True))),
                  flush=True)
    # Only what this self-test created is ours to judge (CI may run beds in parallel).
    left = {}
    for pfx in MINE:
        for k, v in ours(pfx).items():
            left.setdefault(k, []).extend(v)
    if any(left.values()):
        failed += 1
        print("FAIL leftovers after self-tests: %s" % json.dumps(left))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
