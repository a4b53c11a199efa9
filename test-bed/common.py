"""Shared helpers for the hamgr fault-injection test bed (stdlib only).

Every external command runs with a timeout; every loop in the bed is bounded in
count and in time. Timestamps are CLOCK_REALTIME seconds (time.time()): all
namespaces share the host's clock, so client, poller and nemesis records can be
compared directly.
"""
import json
import os
import shlex
import subprocess
import sys
import threading
import time

PY = "/usr/bin/python3"          # Debian's python: it has the libnbd `nbd` module
BED_DIR = os.path.dirname(os.path.abspath(__file__))
STATE_ROOT = "/run/hamgr-testbed"  # one JSON per live run (owner pid, names)
WORK_ROOT = "/tmp/hamgr-bed"       # run dirs, disk images, mounts
NAME_PREFIX = "hb"                 # every netns/link/cgroup name we create starts with it
ROUTE_PROTO = "211"                # tag on our root-namespace blackhole routes

_log_lock = threading.Lock()
VERBOSE = os.environ.get("BED_VERBOSE", "0") == "1"


def log(*parts):
    line = "[%s] %s" % (time.strftime("%H:%M:%S"), " ".join(str(p) for p in parts))
    with _log_lock:
        print(line, file=sys.stderr, flush=True)


def vlog(*parts):
    if VERBOSE:
        log(*parts)


class CommandError(RuntimeError):
    pass


def run(cmd, timeout=10, check=True, input=None, quiet=False):
    """Run a command (list) with a hard timeout; returns CompletedProcess."""
    vlog("$", " ".join(shlex.quote(c) for c in cmd))
    try:
        cp = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CommandError("timeout after %ss: %s" % (timeout, " ".join(cmd)))
    if check and cp.returncode != 0:
        raise CommandError("exit %d: %s\n%s%s" % (cp.returncode, " ".join(cmd), cp.stdout, cp.stderr))
    if not quiet and cp.returncode != 0:
        vlog("  rc=%d %s" % (cp.returncode, cp.stderr.strip()))
    return cp


def try_run(cmd, timeout=10):
    """Best-effort run for teardown paths: never raises."""
    try:
        return run(cmd, timeout=timeout, check=False, quiet=True)
    except Exception as e:  # noqa: BLE001 - teardown must go on
        vlog("ignored:", e)
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Jsonl:
    """Append-only JSONL writer safe across threads and processes.

    One os.write per record on an O_APPEND descriptor: records from several
    processes (workload, poller, orchestrator) interleave but never tear.
    """

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Lock()

    def write(self, rec):
        data = (json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self.lock:
            os.write(self.fd, data)

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def read_jsonl(path):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                # A torn last line from a killed writer is tolerated, nothing else.
                out.append({"type": "garbled", "line": n})
    return out


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def bounded_wait(pred, timeout, interval=0.1):
    """Poll pred() until true or timeout; returns the last value of pred()."""
    deadline = time.monotonic() + timeout
    n = 0
    val = pred()
    while not val and time.monotonic() < deadline and n < 100000:
        time.sleep(interval)
        n += 1
        val = pred()
    return val
