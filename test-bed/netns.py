#!/usr/bin/python3
"""Hosts for the test bed: a router namespace and host namespaces on their own subnets.

    router (ip_forward=1, nftables table `inet bed` for faults)
      |-- a  10.K.1.2/24   data node A
      |-- b  10.K.2.2/24   data node B
      |-- w  10.K.3.2/24   arbitrator W
      `-- c  10.K.4.2/24   client + status poller (never partitioned by default)

K is chosen per run in 200..249 so parallel runs don't clash; the root namespace
gets `blackhole 10.K.0.0/16` while the bed is up, so nothing started outside a
namespace by mistake can send those addresses off the machine.

Names: every netns, veth, cgroup and work dir carries the run's prefix hbXXXXXX.
A state file in /run/hamgr-testbed/ records what exists; `cleanup-stale` removes
everything whose owner process is gone.

CLI:  netns.py up [--hold SECONDS] | cleanup-stale | list
"""
import argparse
import atexit
import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (NAME_PREFIX, ROUTE_PROTO, STATE_ROOT, WORK_ROOT, CommandError,  # noqa: E402
                    log, pid_alive, run, try_run, write_json_atomic)

HOSTS = {"a": 1, "b": 2, "w": 3, "c": 4}
FREEZER = "/sys/fs/cgroup/freezer"


def _used_octets():
    used = set()
    cp = try_run(["ip", "route", "show"])
    for line in (cp.stdout if cp else "").splitlines():
        parts = line.split()
        for p in parts[:2]:
            if p.startswith("10.") and "/" in p:
                try:
                    used.add(int(p.split(".")[1]))
                except ValueError:
                    pass
    for f in glob.glob(os.path.join(STATE_ROOT, "*.json")):
        try:
            with open(f) as fh:
                used.add(int(json.load(fh)["octet"]))
        except (OSError, ValueError, KeyError):
            pass
    return used


class Bed:
    """One run's network of namespaces plus the processes, cgroups and mounts in it."""

    def __init__(self, octet=None):
        self.prefix = NAME_PREFIX + secrets.token_hex(3)
        if octet is None:
            used = _used_octets()
            free = [k for k in range(200, 250) if k not in used]
            if not free:
                raise RuntimeError("no free 10.2xx octet for a bed (cleanup-stale?)")
            octet = free[secrets.randbelow(len(free))]
        self.octet = octet
        self.router = self.prefix + "-r"
        self.ns = {h: "%s-%s" % (self.prefix, h) for h in HOSTS}
        self.workdir = os.path.join(WORK_ROOT, self.prefix)
        self.procs = {}      # name -> dict(pid, ns, argv, popen)
        self.cgroups = []    # freezer cgroup dirs
        self.mounts = []     # (mountpoint, loopdev)
        self.up_done = False
        self.torn = False

    # addresses -------------------------------------------------------------
    def ip(self, host):
        return "10.%d.%d.2" % (self.octet, HOSTS[host])

    def gw(self, host):
        return "10.%d.%d.1" % (self.octet, HOSTS[host])

    def subnet(self, host):
        return "10.%d.%d.0/24" % (self.octet, HOSTS[host])

    @property
    def supernet(self):
        return "10.%d.0.0/16" % self.octet

    # state file ------------------------------------------------------------
    def state_path(self):
        return os.path.join(STATE_ROOT, self.prefix + ".json")

    def save_state(self):
        os.makedirs(STATE_ROOT, exist_ok=True)
        write_json_atomic(self.state_path(), {
            "prefix": self.prefix, "octet": self.octet, "owner": os.getpid(),
            "router": self.router, "ns": self.ns, "workdir": self.workdir,
            "cgroups": self.cgroups, "mounts": self.mounts,
            "pids": {n: p["pid"] for n, p in self.procs.items()},
        })

    # setup -----------------------------------------------------------------
    def up(self, install_handlers=True):
        if install_handlers:
            atexit.register(self.down)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, _raise_exit)
        os.makedirs(self.workdir, exist_ok=True)
        self.save_state()
        # Blackhole first: from here on the root namespace cannot leak 10.K/16.
        run(["ip", "route", "add", "blackhole", self.supernet, "proto", ROUTE_PROTO])
        self.up_done = True
        run(["ip", "netns", "add", self.router])
        self.nsx(self.router, ["ip", "link", "set", "lo", "up"])
        self.nsx(self.router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for h, i in HOSTS.items():
            ns = self.ns[h]
            run(["ip", "netns", "add", ns])
            hv, rv = "%s%s0" % (self.prefix, h), "%s%s1" % (self.prefix, h)
            run(["ip", "link", "add", hv, "netns", ns, "type", "veth", "peer", "name", rv,
                 "netns", self.router])
            self.nsx(ns, ["ip", "link", "set", "lo", "up"])
            self.nsx(ns, ["ip", "link", "set", hv, "name", "eth0"])
            self.nsx(ns, ["ip", "addr", "add", self.ip(h) + "/24", "dev", "eth0"])
            self.nsx(ns, ["ip", "link", "set", "eth0", "up"])
            self.nsx(ns, ["ip", "route", "add", "default", "via", self.gw(h)])
            self.nsx(self.router, ["ip", "link", "set", rv, "name", "to-" + h])
            self.nsx(self.router, ["ip", "addr", "add", self.gw(h) + "/24", "dev", "to-" + h])
            self.nsx(self.router, ["ip", "link", "set", "to-" + h, "up"])
        # Fault table: filter chain for drops, nat chain for relay redirects.
        self.nft("add table inet bed\n"
                 "add chain inet bed filt { type filter hook forward priority 0; policy accept; }\n"
                 "add chain inet bed pre { type nat hook prerouting priority -100; policy accept; }\n")
        self.save_state()
        log("bed %s up: 10.%d.0.0/16, router %s, hosts %s" % (
            self.prefix, self.octet, self.router, " ".join("%s=%s" % (h, self.ip(h)) for h in HOSTS)))
        return self

    def nsx(self, ns, argv, timeout=10, check=True):
        return run(["ip", "netns", "exec", ns] + argv, timeout=timeout, check=check)

    def nft(self, script, timeout=10):
        return run(["ip", "netns", "exec", self.router, "nft", "-f", "-"], input=script, timeout=timeout)

    def nft_add_rule(self, chain, rule, comment):
        """Add one rule; returns its handle (for a precise heal)."""
        cp = run(["ip", "netns", "exec", self.router, "nft", "--echo", "--handle", "add", "rule",
                  "inet", "bed", chain] + rule.split() + ["comment", '"%s"' % comment])
        for tok_line in cp.stdout.splitlines():
            if "# handle" in tok_line:
                return int(tok_line.rsplit("# handle", 1)[1].strip())
        raise CommandError("no handle in nft echo: %r" % cp.stdout)

    def nft_del_rule(self, chain, handle):
        return try_run(["ip", "netns", "exec", self.router, "nft", "delete", "rule", "inet", "bed",
                        chain, "handle", str(handle)])

    # processes -------------------------------------------------------------
    def spawn(self, name, host, argv, env=None, log_path=None):
        """Start argv in host's namespace in a new session; track it by pid."""
        ns = self.router if host == "router" else self.ns[host]
        log_path = log_path or os.path.join(self.workdir, name + ".log")
        out = open(log_path, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
        out.close()
        self.procs[name] = {"pid": p.pid, "ns": ns, "argv": argv, "env": env or {}, "host": host,
                            "popen": p, "log": log_path}
        self.save_state()
        return p.pid

    def alive(self, name):
        p = self.procs.get(name)
        return bool(p) and p["popen"].poll() is None

    def kill(self, name, sig=signal.SIGKILL, wait=5.0):
        p = self.procs.get(name)
        if not p:
            return None
        if sig in (signal.SIGKILL, signal.SIGTERM):
            p["killed"] = True  # an exit we caused, not a crash
        try:
            if sig == signal.SIGKILL:
                os.kill(p["pid"], signal.SIGCONT)
            os.killpg(p["pid"], sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                return p["popen"].wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if sig == signal.SIGTERM:
                    return self.kill(name, signal.SIGKILL, wait)
        return None

    def restart(self, name):
        p = self.procs[name]
        if self.alive(name):
            self.kill(name)
        return self.spawn(name, p["host"], p["argv"], p["env"], p["log"])

    def ns_pids(self, host):
        ns = self.router if host == "router" else self.ns[host]
        cp = try_run(["ip", "netns", "pids", ns])
        return [int(x) for x in (cp.stdout.split() if cp else []) if x.isdigit()]

    # cgroup freezer (a frozen host) ----------------------------------------
    def freeze(self, host):
        cg = os.path.join(FREEZER, "%s-%s" % (self.prefix, host))
        os.makedirs(cg, exist_ok=True)
        if cg not in self.cgroups:
            self.cgroups.append(cg)
            self.save_state()
        for pid in self.ns_pids(host):
            try:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError:
                pass  # exited meanwhile
        with open(os.path.join(cg, "freezer.state"), "w") as f:
            f.write("FROZEN")
        return cg

    def thaw(self, host):
        cg = os.path.join(FREEZER, "%s-%s" % (self.prefix, host))
        _thaw_cgroup(cg)

    # loop-mounted small filesystems (storage faults) -----------------------
    def make_disk(self, host, size_mb):
        img = os.path.join(self.workdir, "disk-%s.img" % host)
        mnt = os.path.join(self.workdir, "disk-%s" % host)
        os.makedirs(mnt, exist_ok=True)
        run(["truncate", "-s", "%dM" % size_mb, img])
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img], timeout=60)
        self.mount_disk(img, mnt)
        return img, mnt

    def mount_disk(self, img, mnt):
        loop = run(["losetup", "-f", "--show", img]).stdout.strip()
        run(["blockdev", "--setrw", loop])  # a loop device may keep an ro flag from an earlier user
        run(["mount", "-t", "ext4", loop, mnt], timeout=30)
        self.mounts.append([mnt, loop, img])
        self.save_state()
        return loop

    def umount_disk(self, mnt):
        for m in list(self.mounts):
            if m[0] == mnt:
                _umount(m)
                self.mounts.remove(m)
        self.save_state()

    # teardown --------------------------------------------------------------
    def down(self):
        if self.torn:
            return
        self.torn = True
        st = {"prefix": self.prefix, "octet": self.octet, "router": self.router, "ns": self.ns,
              "cgroups": self.cgroups, "mounts": self.mounts,
              "pids": {n: p["pid"] for n, p in self.procs.items()}, "workdir": self.workdir}
        teardown_state(st)
        for p in self.procs.values():
            try:
                p["popen"].wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        log("bed %s down" % self.prefix)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _thaw_cgroup(cg):
    if os.path.isdir(cg):
        try:
            with open(os.path.join(cg, "freezer.state"), "w") as f:
                f.write("THAWED")
        except OSError:
            pass


def _umount(m):
    mnt, loop = m[0], m[1]
    try_run(["umount", "-l", mnt], timeout=30)
    try_run(["losetup", "-d", loop])


def teardown_state(st):
    """Remove everything a (possibly dead) run recorded, plus whatever its names match."""
    prefix = st["prefix"]
    # 1. Thaw, then kill processes (frozen ones can't die until thawed).
    for cg in st.get("cgroups", []) + glob.glob(os.path.join(FREEZER, prefix + "-*")):
        _thaw_cgroup(cg)
    names = [st["router"]] + list(st["ns"].values())
    pids = set(int(p) for p in st.get("pids", {}).values())
    for ns in names:
        cp = try_run(["ip", "netns", "pids", ns])
        pids.update(int(x) for x in (cp.stdout.split() if cp else []) if x.isdigit())
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for cg in st.get("cgroups", []) + glob.glob(os.path.join(FREEZER, prefix + "-*")):
        if os.path.isdir(cg):
            try:
                os.rmdir(cg)
            except OSError:
                pass
    # 2. Mounts and loop devices (ours are images under the run's work dir).
    for m in st.get("mounts", []):
        _umount(m)
    cp = try_run(["losetup", "-a"])
    for line in (cp.stdout.splitlines() if cp else []):
        if os.path.join(WORK_ROOT, prefix) in line:
            loop = line.split(":", 1)[0]
            try_run(["umount", "-l", loop], timeout=30)
            try_run(["losetup", "-d", loop])
    # 3. Namespaces (veths go with them).
    for ns in names:
        try_run(["ip", "netns", "delete", ns])
    # 4. Root blackhole route.
    try_run(["ip", "route", "del", "blackhole", "10.%d.0.0/16" % int(st["octet"]), "proto", ROUTE_PROTO])
    try:
        os.unlink(os.path.join(STATE_ROOT, prefix + ".json"))
    except OSError:
        pass


def cleanup_stale(verbose=True):
    """Remove leftovers of runs whose owner process is gone. Returns count removed."""
    live_prefixes, live_octets, removed = set(), set(), 0
    for f in glob.glob(os.path.join(STATE_ROOT, NAME_PREFIX + "*.json")):
        try:
            with open(f) as fh:
                st = json.load(fh)
        except (OSError, ValueError):
            os.unlink(f)
            continue
        if pid_alive(int(st.get("owner", 0))) and int(st.get("owner", 0)) != os.getpid():
            live_prefixes.add(st["prefix"])
            live_octets.add(int(st["octet"]))
            continue
        if verbose:
            log("removing stale run", st["prefix"])
        teardown_state(st)
        removed += 1
    # Orphans without a state file: netns, cgroups, routes that carry our marks.
    cp = try_run(["ip", "netns", "list"])
    orphan = {}
    for line in (cp.stdout.splitlines() if cp else []):
        name = line.split()[0] if line.split() else ""
        if name.startswith(NAME_PREFIX) and "-" in name:
            pfx = name.split("-", 1)[0]
            if pfx not in live_prefixes:
                orphan.setdefault(pfx, []).append(name)
    for pfx, nss in orphan.items():
        if verbose:
            log("removing orphan namespaces", " ".join(nss))
        teardown_state({"prefix": pfx, "octet": 0, "router": pfx + "-r",
                        "ns": {n.split("-", 1)[1]: n for n in nss}})
        removed += 1
    for cg in glob.glob(os.path.join(FREEZER, NAME_PREFIX + "*")):
        if os.path.basename(cg).split("-", 1)[0] not in live_prefixes:
            _thaw_cgroup(cg)
            try:
                os.rmdir(cg)
            except OSError:
                pass
    cp = try_run(["ip", "route", "show", "proto", ROUTE_PROTO])
    for line in (cp.stdout.splitlines() if cp else []):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "blackhole":
            octet = int(parts[1].split(".")[1])
            if octet not in live_octets:
                try_run(["ip", "route", "del", "blackhole", parts[1], "proto", ROUTE_PROTO])
                removed += 1
    cp = try_run(["losetup", "-a"])
    for line in (cp.stdout.splitlines() if cp else []):
        if WORK_ROOT + "/" + NAME_PREFIX in line:
            pfx = line.split(WORK_ROOT + "/", 1)[1].split("/", 1)[0]
            if pfx not in live_prefixes:
                loop = line.split(":", 1)[0]
                try_run(["umount", "-l", loop], timeout=30)
                try_run(["losetup", "-d", loop])
                removed += 1
    return removed


def _releasing(loop, mounts):
    """A detached-while-busy loop device (autoclear set, no longer mounted here) is on
    its way out: `ip netns exec` gives every process a private copy of the mount table,
    so a concurrent bed's processes can pin another bed's lazily unmounted disk until
    they exit; the kernel frees the device then."""
    try:
        with open("/sys/block/%s/loop/autoclear" % os.path.basename(loop)) as f:
            auto = f.read().strip() == "1"
    except OSError:
        return False
    return auto and (loop + " ") not in mounts


def leftovers():
    """What of ours exists right now (for self-tests): netns, routes, cgroups, loops."""
    out = {}
    cp = try_run(["ip", "netns", "list"])
    out["netns"] = [l.split()[0] for l in (cp.stdout.splitlines() if cp else [])
                    if l.startswith(NAME_PREFIX)]
    cp = try_run(["ip", "route", "show", "proto", ROUTE_PROTO])
    out["routes"] = [l for l in (cp.stdout.splitlines() if cp else []) if l.strip()]
    out["cgroups"] = glob.glob(os.path.join(FREEZER, NAME_PREFIX + "*"))
    cp = try_run(["losetup", "-a"])
    mounts = open("/proc/self/mounts").read()
    out["loops"] = [l for l in (cp.stdout.splitlines() if cp else [])
                    if WORK_ROOT in l and not _releasing(l.split(":", 1)[0], mounts)]
    out["states"] = glob.glob(os.path.join(STATE_ROOT, "*.json"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="bring a bed up, print it, hold, tear down")
    u.add_argument("--hold", type=float, default=0.0)
    sub.add_parser("cleanup-stale")
    sub.add_parser("list")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns, nft, mount)")
    if a.cmd == "cleanup-stale":
        n = cleanup_stale()
        print("removed %d stale item(s)" % n)
    elif a.cmd == "list":
        print(json.dumps(leftovers(), indent=1))
    else:
        bed = Bed().up()
        print(json.dumps({"prefix": bed.prefix, "ns": bed.ns, "router": bed.router,
                          "ips": {h: bed.ip(h) for h in HOSTS}}))
        time.sleep(min(max(a.hold, 0), 3600))


if __name__ == "__main__":
    main()
