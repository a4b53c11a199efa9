"""A hamgr cluster (or a stand-in for harness plumbing) on a bed's namespaces.

Real mode: `hamgr arbitrator` in w, `hamgr run --node a|b` in a and b, one config
file (design.md §5) shared by all, each node's backing+metadata on its own small
loop-mounted ext4 (so storage faults hit only that node).

Stand-in mode (`standin=True`): NOT hamgr. nbdkit's file plugin serves the volume
from a's disk and standin.py serves a fixed /status on a and b. It exists only to
exercise the bed's plumbing (workload, poller, nemesis, checker) before the daemon
is ready; results from it are never hamgr results.
"""
import json
import os
import secrets
import shutil
import time

from common import PY, BED_DIR, log, run, try_run, write_json_atomic

REPL_PORT, SERVICE_PORT, STATUS_PORT = 7788, 10809, 9650
ARB_PORT, ARB_STATUS_PORT = 7790, 9651
NODES = ("a", "b")


def find_bin(env_name, default_rel):
    p = os.environ.get(env_name)
    if p:
        return os.path.abspath(p)
    root = os.path.dirname(BED_DIR)
    for cand in (default_rel, default_rel.replace(".build/", ".build-t/")):
        full = os.path.join(root, cand)
        if os.path.exists(full):
            return full
    return os.path.join(root, default_rel)


class Cluster:
    def __init__(self, bed, run_dir, name="tb", size_mb=32, protocol="C", hamgr=None, env=None,
                 standin=False, disk_mb=None, timeouts=None):
        self.bed = bed
        self.dir = run_dir
        self.name = name
        self.size_mb = size_mb
        self.protocol = protocol
        self.hamgr = hamgr or find_bin("HAMGR_BIN", ".build/debug/hamgr")
        self.env = dict(env or {})
        self.standin = standin
        self.disk_mb = disk_mb or max(48, size_mb * 2 + 16)
        self.timeouts = timeouts or {}
        self.mounts = {}
        self.images = {}
        self.latest_path = os.path.join(run_dir, "latest.json")
        self.config_path = os.path.join(run_dir, "cluster.toml")
        self.cluster_json = os.path.join(run_dir, "cluster.json")

    # config ----------------------------------------------------------------
    def addr(self, h, port):
        return "%s:%d" % (self.bed.ip(h), port)

    def prepare(self):
        os.makedirs(self.dir, exist_ok=True)
        for h in NODES:
            img, mnt = self.bed.make_disk(h, self.disk_mb)
            self.mounts[h], self.images[h] = mnt, img
        key = os.path.join(self.dir, "cluster.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(secrets.token_bytes(48))
        self.token_path = os.path.join(self.dir, "admin.token")
        with open(os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("tb-" + secrets.token_hex(16))
        toml = ['[cluster]', 'name = "%s"' % self.name, 'key_file = "%s"' % key,
                'admin_token_file = "%s"' % self.token_path, 'protocol = "%s"' % self.protocol, '']
        if self.timeouts:
            toml.append("[timeouts]")
            toml += ["%s = %s" % kv for kv in sorted(self.timeouts.items())]
            toml.append("")
        toml += ['[volume]', 'size = "%dMiB"' % self.size_mb, 'chunk_size = "64KiB"', 'create = true', '']
        for h in NODES:
            toml += ['[[node]]', 'name = "%s"' % h,
                     'replication_address = "%s"' % self.addr(h, REPL_PORT),
                     'service_address = "%s"' % self.addr(h, SERVICE_PORT),
                     'status_address = "%s"' % self.addr(h, STATUS_PORT),
                     'backing = "%s/%s.img"' % (self.mounts[h], h),
                     'metadata = "%s/%s.meta"' % (self.mounts[h], h), '']
        arb_dir = os.path.join(self.dir, "arbitrator")
        os.makedirs(arb_dir, exist_ok=True)
        toml += ['[arbitrator]', 'address = "%s"' % self.addr("w", ARB_PORT),
                 'status_address = "%s"' % self.addr("w", ARB_STATUS_PORT),
                 'state_dir = "%s"' % arb_dir, '']
        with open(self.config_path, "w") as f:
            f.write("\n".join(toml))
        blocks = self.size_mb * 256
        hot = 64
        write_json_atomic(self.cluster_json, {
            "name": self.name, "export": self.name,
            "nodes": {h: {"status": self.addr(h, STATUS_PORT), "service": self.addr(h, SERVICE_PORT)}
                      for h in NODES},
            "arbitrator": {"status": self.addr("w", ARB_STATUS_PORT)},
            "hot_blocks": hot, "append_blocks": min(blocks - hot, 2048)})

    # processes -------------------------------------------------------------
    def proc_name(self, h):
        return "arb" if h == "w" else "node-" + h

    def argv(self, h):
        if self.standin:
            if h == "w":
                return [PY, os.path.join(BED_DIR, "standin.py"), "--node", "w", "--listen",
                        self.addr("w", ARB_STATUS_PORT), "--cluster", self.cluster_json]
            return [PY, os.path.join(BED_DIR, "standin.py"), "--node", h, "--listen",
                    self.addr(h, STATUS_PORT), "--cluster", self.cluster_json,
                    "--backing", os.path.join(self.mounts[h], "%s.img" % h), "--size-mb", str(self.size_mb)]
        if h == "w":
            # --init: the state is created on the first start and kept on restarts.
            return [self.hamgr, "arbitrator", "--config", self.config_path, "--init"]
        return [self.hamgr, "run", "--config", self.config_path, "--node", h]

    def start(self, h):
        env = {"HAMGR_LOG_LEVEL": os.environ.get("HAMGR_LOG_LEVEL", "debug")}
        if self.standin and os.environ.get("BED_STANDIN_PLUGIN"):
            env["BED_STANDIN_PLUGIN"] = os.environ["BED_STANDIN_PLUGIN"]
        env.update(self.env)
        name = self.proc_name(h)
        self.bed.spawn(name, h, self.argv(h), env=env, log_path=os.path.join(self.dir, name + ".log"))

    def start_all(self):
        self.start("w")
        for h in NODES:
            self.start(h)

    def restart(self, name):
        self.bed.restart(name)

    def ensure_running(self, history):
        """Restart any of our processes that died on its own; record it."""
        for h in ("w",) + NODES:
            name = self.proc_name(h)
            p = self.bed.procs.get(name)
            if p and p["popen"].poll() is not None:
                history.write({"type": "proc-exit", "proc": name, "rc": p["popen"].returncode,
                               "t": time.time(), "expected": bool(p.get("killed")), "restarted": True})
                log("%s had exited (rc=%s); restarting" % (name, p["popen"].returncode))
                self.restart(name)

    def stop_all(self):
        for h in NODES + ("w",):
            self.bed.kill(self.proc_name(h))

    # storage ---------------------------------------------------------------
    def disk_mount(self, h):
        return self.mounts[h]

    def repair_disk(self, h):
        """After disk-eio: stop the node, fsck and remount its disk, start it again."""
        name = self.proc_name(h)
        self.bed.kill(name)
        mnt = self.mounts[h]
        self.bed.umount_disk(mnt)
        run(["e2fsck", "-fy", self.images[h]], timeout=120, check=False)
        self.bed.mount_disk(self.images[h], mnt)
        self.start(h)

    def admin(self, h, action, timeout=30):
        """POST /admin/ACTION with the bearer token, from the client namespace."""
        with open(self.token_path) as f:
            token = f.read().strip()
        cp = try_run(["ip", "netns", "exec", self.bed.ns["c"], "curl", "-s", "--max-time", str(timeout),
                      "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "-H", "Authorization: Bearer " + token,
                      "-H", "Content-Type: application/json", "--data", "{}",
                      "http://%s/admin/%s" % (self.addr(h, STATUS_PORT), action)], timeout=timeout + 5)
        if cp is None:
            return 0, "timeout"
        body, _, code = cp.stdout.rpartition("\n")
        return int(code) if code.isdigit() else 0, body

    # links -----------------------------------------------------------------
    def link_ports(self, src, dst):
        """TCP ports on dst that src connects to (what a delay on src->dst must carry)."""
        if src == "c":
            return [SERVICE_PORT] if dst in NODES else []
        if dst == "w":
            return [ARB_PORT]
        if dst in NODES and src in NODES:
            return [REPL_PORT]
        return []

    # observation -----------------------------------------------------------
    def latest(self):
        try:
            with open(self.latest_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def current_master(self):
        best = None
        for h, rec in self.latest().items():
            s = rec.get("s") or {}
            if h in NODES and s.get("role") == "primary":
                cand = (s.get("epoch") or 0, h)
                best = max(best, cand) if best else cand
        return best[1] if best else None

    def converged(self, fresh_s=1.5, since=0.0):
        """(ok, why): exactly one primary, both disks upToDate, the primary's peer inSync,
        judged only from polls started after `since` (the heal) and at most fresh_s old."""
        lt = self.latest()
        now = time.time()
        st = {}
        for h in NODES:
            rec = lt.get(h)
            if not rec or not rec.get("ok") or now - rec.get("t1", 0) > fresh_s or rec.get("t0", 0) < since:
                return False, "%s: no fresh status" % h
            st[h] = rec["s"]
        prim = [h for h in NODES if st[h].get("role") == "primary"]
        if len(prim) != 1:
            return False, "primaries=%s" % prim
        p = prim[0]
        s = [h for h in NODES if h != p][0]
        if st[s].get("role") != "secondary":
            return False, "%s role %s" % (s, st[s].get("role"))
        for h in (s, p):
            if st[h].get("disk_state") != "upToDate":
                return False, "%s disk_state %s" % (h, st[h].get("disk_state"))
        rep = (st[p].get("peer") or {}).get("replication")
        if rep != "inSync":
            return False, "%s peer.replication %s" % (p, rep)
        return True, "primary=%s epoch=%s" % (p, st[p].get("epoch"))

    def dead(self):
        return [self.proc_name(h) for h in ("w",) + NODES
                if self.proc_name(h) in self.bed.procs and not self.bed.alive(self.proc_name(h))]

    def log_tail(self, name, n=15):
        try:
            with open(os.path.join(self.dir, name + ".log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_converged(self, bound, n_max=100000, fail_on_exit=False, stable_s=2.0):
        """Converged = the condition held continuously for stable_s (a transient inSync
        that breaks again a moment later is not convergence). Returns the time from the
        call to the start of the stable period."""
        t0 = time.monotonic()
        since = time.time()
        why = ""
        n = 0
        stable_from = None
        while time.monotonic() - t0 < bound + stable_s and n < n_max:
            n += 1
            ok, why = self.converged(since=since)
            if ok:
                if stable_from is None:
                    if time.monotonic() - t0 > bound:
                        break
                    stable_from = time.monotonic()
                if time.monotonic() - stable_from >= stable_s:
                    return True, stable_from - t0, why
            else:
                stable_from = None
            if fail_on_exit and self.dead():
                return False, time.monotonic() - t0, "exited: %s" % " ".join(self.dead())
            time.sleep(0.1)
        return False, time.monotonic() - t0, why

    def cleanup_files(self):
        for h, mnt in self.mounts.items():
            self.bed.umount_disk(mnt)
        shutil.rmtree(os.path.join(self.dir, "arbitrator"), ignore_errors=True)
