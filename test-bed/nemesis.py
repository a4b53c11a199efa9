#!/usr/bin/python3
"""Nemesis: seeded faults with an inject and a heal, both written to the history.

Kinds (see docs/reliability.md):
  isolate    host X cut from the other cluster hosts, both ways (client C still reaches it)
  cut-ab     the A-B link alone, both ways
  one-way    X->Y dropped, Y->X delivered (asymmetric partition)
  loss       N % random packet loss on a link, both ways (nft numgen)
  delay      a link's TCP connections routed through relay.py holding each chunk D ms
  slow       tbf rate limit on a host's link (both directions)
  kill       SIGKILL a hamgr process (node or arbitrator), restart it at heal
  pause      SIGSTOP a hamgr process for longer than the lease, SIGCONT at heal
  freeze     cgroup-freeze every process of a host namespace, thaw at heal
  disk-full  fill the node's (loop-mounted ext4) filesystem; heal removes the filler
             and restarts the node if it reports itself diskless (no attach command)
  disk-eio   ext4 shutdown ioctl: every read/write/fsync on the node's disk -> EIO;
             heal = kill node, unmount, e2fsck, mount, restart (disk replaced/repaired)
  cut-kill   compound: cut A-B (the master must outdate the backup at W and go on
             alone), 1.5 s later SIGKILL the master; the outdated backup must not be
             promoted (no acknowledged write may be lost); heal = restart, uncut
  switchover not a fault: a planned POST /admin/switchover to the master under load
             (design: zero loss, < 1 s without a master); heal does nothing

Targets "master"/"backup" are resolved from the latest /status poll at inject time.
"""
import fcntl
import os
import random
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PY, BED_DIR, log, run, try_run  # noqa: E402

ALL_KINDS = ["isolate", "cut-ab", "one-way", "loss", "delay", "slow", "kill", "pause", "freeze",
             "disk-full", "disk-eio", "switchover", "cut-kill"]
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
RELAY_BASE_PORT = 21000


def make_fault(rng, kind):
    """One fault spec drawn from rng; targets may be symbolic (master/backup)."""
    cl = ["a", "b", "w"]
    if kind == "isolate":
        return {"kind": kind, "host": rng.choice(["master", "backup", "w"]), "hold": rng.uniform(3, 6)}
    if kind == "cut-ab":
        return {"kind": kind, "hold": rng.uniform(3, 6)}
    if kind == "one-way":
        src = rng.choice(["master", "backup", "w"])
        dst = rng.choice([h for h in ["master", "backup", "w"] if h != src])
        return {"kind": kind, "src": src, "dst": dst, "hold": rng.uniform(3, 6)}
    if kind == "loss":
        pair = rng.choice([("a", "b"), ("a", "w"), ("b", "w")])
        return {"kind": kind, "x": pair[0], "y": pair[1], "pct": rng.randint(1, 30),
                "hold": rng.uniform(3, 6)}
    if kind == "delay":
        pair = rng.choice([("a", "b"), ("a", "w"), ("b", "w"), ("c", "master")])
        return {"kind": kind, "x": pair[0], "y": pair[1], "ms": rng.choice([20, 50, 100, 200, 400]),
                "hold": rng.uniform(3, 6)}
    if kind == "slow":
        return {"kind": kind, "host": rng.choice(["master", "backup"]),
                "kbit": rng.choice([256, 1024, 4096]), "hold": rng.uniform(3, 6)}
    if kind in ("kill", "pause"):
        hold = rng.uniform(3, 5) if kind == "pause" else rng.uniform(1, 4)
        return {"kind": kind, "host": rng.choice(["master", "master", "backup", "w"]), "hold": hold}
    if kind == "freeze":
        return {"kind": kind, "host": rng.choice(["master", "backup", "w"]), "hold": rng.uniform(3, 5)}
    if kind == "cut-kill":
        return {"kind": kind, "host": "master", "hold": rng.uniform(3, 5)}
    if kind == "switchover":
        return {"kind": kind, "host": "master", "hold": rng.uniform(1, 3)}
    if kind in ("disk-full", "disk-eio"):
        return {"kind": kind, "host": rng.choice(["master", "backup"]), "hold": rng.uniform(2, 5)}
    raise ValueError("unknown fault kind %r" % kind)


def schedule(seed, kinds, count, target=None):
    """count faults, cycling through kinds in a seeded order so each kind appears.
    target ("master"/"backup"/"w") pins host/src of the faults that have one."""
    rng = random.Random(seed)
    out = []
    order = []
    for _ in range(count):
        if not order:
            order = list(kinds)
            rng.shuffle(order)
        f = make_fault(rng, order.pop())
        if target:
            if "host" in f and not (f["kind"] in ("slow", "disk-full", "disk-eio") and target == "w"):
                f["host"] = target
            if "src" in f:
                f["src"] = target
                if f["dst"] == target:
                    f["dst"] = "w" if target != "w" else "backup"
        out.append(f)
    return out


class Nemesis:
    def __init__(self, bed, cluster, history):
        self.bed = bed
        self.cluster = cluster
        self.history = history
        self.next_relay_port = RELAY_BASE_PORT
        self.n = 0

    def _resolve(self, h):
        if h in ("master", "backup"):
            m = self.cluster.current_master()
            if m is None:
                m = "a"
            return m if h == "master" else ("b" if m == "a" else "a")
        return h

    def _record(self, phase, fault, extra=None):
        rec = {"type": "nemesis", "phase": phase, "t": time.time(), "id": fault["id"],
               "kind": fault["kind"], "spec": {k: v for k, v in fault.items() if not k.startswith("_")}}
        rec.update(extra or {})
        self.history.write(rec)
        log("nemesis %s %s %s" % (phase, fault["kind"], {k: v for k, v in fault.items()
                                                        if k not in ("kind", "_heal", "id")}))

    def inject(self, fault):
        """Inject; fills fault['_heal'] with what heal() needs. Returns fault."""
        self.n += 1
        fault = dict(fault)
        fault["id"] = self.n
        for k in ("host", "src", "dst", "x", "y"):
            if k in fault:
                fault[k] = self._resolve(fault[k])
        t0 = time.time()
        fault["_heal"] = getattr(self, "_inj_" + fault["kind"].replace("-", "_"))(fault)
        self._record("inject", fault, {"t_start": t0})
        return fault

    def heal(self, fault):
        t0 = time.time()
        err = None
        try:
            getattr(self, "_heal_" + fault["kind"].replace("-", "_"))(fault, fault["_heal"])
        except Exception as e:  # noqa: BLE001 - record it; the run's final heal-all follows
            err = str(e)
        self._record("heal", fault, {"t_start": t0, "error": err})
        return err

    # network ---------------------------------------------------------------
    def _drop(self, src, dst, fid, extra=""):
        rule = "ip saddr %s ip daddr %s %s drop" % (self.bed.subnet(src), self.bed.subnet(dst), extra)
        return ("filt", self.bed.nft_add_rule("filt", rule.replace("  ", " "), "f%d" % fid))

    def _del(self, handles):
        for chain, h in handles:
            self.bed.nft_del_rule(chain, h)

    def _inj_isolate(self, f):
        others = [h for h in ("a", "b", "w") if h != f["host"]]
        hs = []
        for o in others:
            hs.append(self._drop(f["host"], o, f["id"]))
            hs.append(self._drop(o, f["host"], f["id"]))
        return hs

    def _heal_isolate(self, f, hs):
        self._del(hs)

    def _inj_cut_ab(self, f):
        return [self._drop("a", "b", f["id"]), self._drop("b", "a", f["id"])]

    _heal_cut_ab = _heal_isolate

    def _inj_one_way(self, f):
        return [self._drop(f["src"], f["dst"], f["id"])]

    _heal_one_way = _heal_isolate

    def _inj_loss(self, f):
        extra = "numgen random mod 100 < %d" % int(f["pct"])
        return [self._drop(f["x"], f["y"], f["id"], extra), self._drop(f["y"], f["x"], f["id"], extra)]

    _heal_loss = _heal_isolate

    def _inj_delay(self, f):
        """Route the link's new TCP connections through a relay; drop its old direct flows."""
        maps, handles = [], []
        pairs = [(f["x"], f["y"]), (f["y"], f["x"])]
        for src, dst in pairs:
            for port in self.cluster.link_ports(src, dst):
                lp = self.next_relay_port
                self.next_relay_port += 1
                maps.append("%s:%d=%s:%d" % (self.bed.gw(src), lp, self.bed.ip(dst), port))
                handles.append(("pre", self.bed.nft_add_rule(
                    "pre", "ip saddr %s ip daddr %s tcp dport %d dnat ip to %s:%d" % (
                        self.bed.subnet(src), self.bed.ip(dst), port, self.bed.gw(src), lp),
                    "f%d" % f["id"])))
                # Established direct flows are not DNATed: cut them so the link's
                # traffic really moves to the delayed path (like a route change).
                handles.append(self._drop(src, dst, f["id"], "tcp dport %d" % port))
                handles.append(self._drop(dst, src, f["id"], "tcp sport %d" % port))
        name = "relay-f%d" % f["id"]
        if maps:
            argv = [PY, os.path.join(BED_DIR, "relay.py"), "--delay-ms", str(f["ms"]),
                    "--max-seconds", "900"]
            for m in maps:
                argv += ["--map", m]
            self.bed.spawn(name, "router", argv)
            time.sleep(0.2)
        return {"handles": handles, "relay": name if maps else None}

    def _heal_delay(self, f, st):
        self._del(st["handles"])
        if st["relay"]:
            self.bed.kill(st["relay"])

    def _inj_slow(self, f):
        h = f["host"]
        rate = "%dkbit" % int(f["kbit"])
        args = ["tbf", "rate", rate, "burst", "16kbit", "latency", "300ms"]
        self.bed.nsx(self.bed.router, ["tc", "qdisc", "add", "dev", "to-" + h, "root"] + args)
        self.bed.nsx(self.bed.ns[h], ["tc", "qdisc", "add", "dev", "eth0", "root"] + args)
        return h

    def _heal_slow(self, f, h):
        try_run(["ip", "netns", "exec", self.bed.router, "tc", "qdisc", "del", "dev", "to-" + h, "root"])
        try_run(["ip", "netns", "exec", self.bed.ns[h], "tc", "qdisc", "del", "dev", "eth0", "root"])

    # processes -------------------------------------------------------------
    def _inj_kill(self, f):
        name = self.cluster.proc_name(f["host"])
        self.bed.kill(name, signal.SIGKILL)
        return name

    def _heal_kill(self, f, name):
        self.cluster.restart(name)

    def _inj_pause(self, f):
        name = self.cluster.proc_name(f["host"])
        self.bed.kill(name, signal.SIGSTOP)
        return name

    def _heal_pause(self, f, name):
        self.bed.kill(name, signal.SIGCONT)

    def _inj_freeze(self, f):
        self.bed.freeze(f["host"])
        return f["host"]

    def _heal_freeze(self, f, h):
        self.bed.thaw(h)

    def _inj_cut_kill(self, f):
        hs = [self._drop("a", "b", f["id"]), self._drop("b", "a", f["id"])]
        time.sleep(1.5)
        name = self.cluster.proc_name(f["host"])
        self.bed.kill(name, signal.SIGKILL)
        return {"handles": hs, "proc": name}

    def _heal_cut_kill(self, f, st):
        self.cluster.restart(st["proc"])
        time.sleep(0.5)
        self._del(st["handles"])

    def _inj_switchover(self, f):
        code, body = self.cluster.admin(f["host"], "switchover")
        f["http_code"] = code
        f["reply"] = body[:200]
        return None

    def _heal_switchover(self, f, st):
        pass

    # storage ---------------------------------------------------------------
    def _inj_disk_full(self, f):
        mnt = self.cluster.disk_mount(f["host"])
        path = os.path.join(mnt, "filler")
        st = os.statvfs(mnt)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, max(st.f_bfree * st.f_frsize - 4096, 4096))
            except OSError:
                pass
            chunk = b"\xff" * 65536
            for _ in range(4096):  # top up whatever fallocate left, until ENOSPC
                try:
                    os.write(fd, chunk)
                except OSError:
                    break
            try:
                os.fsync(fd)
            except OSError:
                pass
        finally:
            os.close(fd)
        return path

    def _heal_disk_full(self, f, path):
        os.unlink(path)
        # A node that detached its disk on ENOSPC stays diskless when space returns;
        # hamgr has no attach command, so the operator's recovery is a restart.
        time.sleep(0.5)
        rec = self.cluster.latest().get(f["host"]) or {}
        st = rec.get("s") or {}
        if st.get("disk_state") == "diskless" or st.get("disk_error"):
            f["restarted_diskless_node"] = True
            self.cluster.restart(self.cluster.proc_name(f["host"]))

    def _inj_disk_eio(self, f):
        mnt = self.cluster.disk_mount(f["host"])
        d = os.open(mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(d, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(d)
        return f["host"]

    def _heal_disk_eio(self, f, h):
        self.cluster.repair_disk(h)


def main():
    import argparse
    ap = argparse.ArgumentParser(description="print a seeded fault schedule")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=len(ALL_KINDS))
    ap.add_argument("--kinds", default=",".join(ALL_KINDS))
    a = ap.parse_args()
    for f in schedule(a.seed, a.kinds.split(","), a.count):
        print(f)


if __name__ == "__main__":
    main()
