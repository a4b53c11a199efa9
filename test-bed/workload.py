#!/usr/bin/python3
"""Client workload, status poller and final read. Runs INSIDE the client namespace.

    workload.py run   --cluster CLUSTER.json --history H.jsonl --stop-file F [--seconds S] [--seed N]
    workload.py poll  --cluster CLUSTER.json --history H.jsonl --stop-file F --latest L.json
    workload.py final --cluster CLUSTER.json --history H.jsonl [--node X]
    workload.py status --cluster CLUSTER.json          (one poll of every node, JSON to stdout)

CLUSTER.json: {"name", "nodes": {"a": {"status": "IP:PORT", "service": "IP:PORT"}, ...},
               "arbitrator": {"status": "IP:PORT"}, "hot_blocks": N, "append_blocks": M,
               "export": ""}

Blocks are 4 KiB and self-describing (magic, block number, writer, sequence, epoch
seen, start time, filler, SHA-256 of the rest): a read tells exactly which write it
returns, or that it is zero or garbage. Every client-visible operation is one JSONL
record with start/end (time.time()), node, address and result ok/error/timeout.
Workers:
  f0, f1   follow the master (discover via /status, reconnect on error)
  pa, pb   pinned to node a / b: they try to write to that node whatever its role,
           so two nodes acknowledging writes at once is observable
"""
import argparse
import collections
import hashlib
import json
import os
import random
import struct
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Jsonl, write_json_atomic  # noqa: E402

BLOCK = 4096
MAGIC = b"HBED1\x00\x00\x00"
HDR = struct.Struct(">8sQ16sQqd")  # magic, block, worker, seq, epoch, t_start = 56 bytes


def encode_block(block, worker, seq, epoch, t_start):
    hdr = HDR.pack(MAGIC, block, worker.encode()[:16].ljust(16, b"\0"), seq, int(epoch), t_start)
    seed = hashlib.sha256(hdr).digest()
    body = hdr + (seed * ((4064 - len(hdr)) // 32 + 1))[:4064 - len(hdr)]
    return body + hashlib.sha256(body).digest()


def decode_block(buf, block):
    """-> ('zero', None) | ('ok', wid) | ('garbage', reason)."""
    if len(buf) != BLOCK:
        return "garbage", "length %d" % len(buf)
    if buf.count(0) == BLOCK:
        return "zero", None
    if buf[:8] != MAGIC:
        return "garbage", "bad magic"
    if hashlib.sha256(buf[:4064]).digest() != buf[4064:]:
        return "garbage", "bad checksum"
    _, b, w, seq, _epoch, _t = HDR.unpack(buf[:HDR.size])
    wid = "%s-%d" % (w.rstrip(b"\0").decode(), seq)
    if b != block:
        return "garbage", "misdirected: holds block %d write %s" % (b, wid)
    return "ok", wid


def value_of(buf, block):
    kind, v = decode_block(buf, block)
    if kind == "ok":
        return v
    if kind == "zero":
        return "zero"
    return "garbage:" + v


# ---------------------------------------------------------------------------
def http_json(addr, path="/status", timeout=0.5):
    with urllib.request.urlopen("http://%s%s" % (addr, path), timeout=timeout) as r:
        return json.loads(r.read().decode())


def discover(cluster, timeout=0.5):
    """Best master guess from every node's /status: (node, service_addr, epoch) or None."""
    best = None
    for name, n in cluster["nodes"].items():
        try:
            s = http_json(n["status"], timeout=timeout)
        except Exception:  # noqa: BLE001 - unreachable node is normal under faults
            continue
        if s.get("role") == "primary":
            m = s.get("master") or {}
            addr = m.get("service_address") or n["service"]
            cand = (int(s.get("epoch") or 0), name, addr)
            if best is None or cand > best:
                best = cand
    if best is None:
        return None
    return best[1], best[2], best[0]


class NbdTimeout(Exception):
    pass


class NbdConn:
    """libnbd handle driven with the async API so every step has a deadline."""

    def __init__(self, addr, export="", timeout=3.0):
        import nbd
        self.nbd = nbd
        self.h = nbd.NBD()
        self.h.set_export_name(export)
        host, port = addr.rsplit(":", 1)
        self.h.aio_connect_tcp(host, port)
        deadline = time.monotonic() + timeout
        n = 0
        while self.h.aio_is_connecting():
            n += 1
            if time.monotonic() > deadline or n > 100000:
                self.close()
                raise NbdTimeout("connect timeout")
            self.h.poll(50)
        if not self.h.aio_is_ready():
            self.close()
            raise RuntimeError("handshake failed (dead=%s)" % self.h.aio_is_dead())
        self.size = self.h.get_size()

    def _wait(self, cookie, timeout):
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            if self.h.aio_command_completed(cookie):  # raises nbd.Error on a failed command
                return
            n += 1
            if time.monotonic() > deadline or n > 100000:
                raise NbdTimeout("op timeout")
            if self.h.aio_is_dead():
                raise RuntimeError("connection dead")
            self.h.poll(50)

    def pwrite(self, data, off, timeout):
        buf = self.nbd.Buffer.from_bytearray(bytearray(data))
        self._wait(self.h.aio_pwrite(buf, off), timeout)

    def pread(self, n, off, timeout):
        buf = self.nbd.Buffer(n)
        self._wait(self.h.aio_pread(buf, off), timeout)
        return bytes(buf.to_bytearray())

    def flush(self, timeout):
        self._wait(self.h.aio_flush(), timeout)

    def close(self):
        try:
            self.h.shutdown()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.h.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------
class Workload:
    def __init__(self, cluster, history, stop_file, seconds, seed, op_timeout=5.0):
        self.c = cluster
        self.h = history
        self.stop_file = stop_file
        self.deadline = time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.hot = int(cluster.get("hot_blocks", 64))
        self.append_n = int(cluster.get("append_blocks", 1024))
        self.append_next = 0
        self.lock = threading.Lock()
        self.op_timeout = op_timeout
        self.conn_seq = 0
        # Blocks recently acknowledged, with the node that acked them: pinned readers
        # prefer blocks another node just wrote, which is where a deposed master that
        # still serves would return stale data.
        self.recent = collections.deque(maxlen=128)

    def stopping(self):
        return time.monotonic() > self.deadline or os.path.exists(self.stop_file)

    def next_conn_id(self, worker):
        with self.lock:
            self.conn_seq += 1
            return "%s/c%d" % (worker, self.conn_seq)

    def pick_write_block(self, rng):
        if rng.random() < 0.75:
            return rng.randrange(self.hot)
        with self.lock:  # fresh blocks: they allocate on a sparse backing file
            b = self.hot + self.append_next
            self.append_next = (self.append_next + 1) % self.append_n
        return b

    def op(self, rec, fn):
        rec["start"] = time.time()
        try:
            out = fn()
            rec["result"] = "ok"
            return out
        except NbdTimeout as e:
            rec["result"] = "timeout"
            rec["err"] = str(e)
            raise
        except Exception as e:  # noqa: BLE001 - nbd.Error, socket errors: all client-visible
            rec["result"] = "error"
            rec["err"] = str(e)[:200]
            raise
        finally:
            rec["end"] = time.time()
            self.h.write(rec)

    def worker(self, name, pinned=None):
        rng = random.Random("%s-%s" % (self.rng.random(), name))
        seq = 0
        conn = None
        node = addr = None
        epoch = 0
        cid = None
        written = []
        loops = 0
        while not self.stopping() and loops < 10000000:
            loops += 1
            if conn is None:
                if pinned:
                    node, addr = pinned, self.c["nodes"][pinned]["service"]
                    try:
                        s = http_json(self.c["nodes"][pinned]["status"], timeout=0.5)
                        epoch = int(s.get("epoch") or 0)
                    except Exception:  # noqa: BLE001
                        epoch = -1
                else:
                    d = discover(self.c)
                    if d is None:
                        time.sleep(0.1)
                        continue
                    node, addr, epoch = d
                cid = self.next_conn_id(name)
                rec = {"type": "op", "op": "connect", "worker": name, "node": node, "addr": addr,
                       "epoch_seen": epoch, "conn": cid}
                try:
                    conn = self.op(rec, lambda: NbdConn(addr, self.c.get("export", ""), 3.0))
                except Exception:  # noqa: BLE001
                    conn = None
                    time.sleep(0.3 if pinned else 0.1)
                    continue
            r = rng.random()
            if pinned:  # more reads on the pinned workers: 45 % write, 45 % read, 10 % flush
                r = 0.65 * r / 0.45 if r < 0.45 else (0.65 + 0.25 * (r - 0.45) / 0.45 if r < 0.9 else r)
            base = {"type": "op", "worker": name, "node": node, "addr": addr, "epoch_seen": epoch,
                    "conn": cid}
            try:
                if r < 0.65 or not written:
                    seq += 1
                    b = self.pick_write_block(rng)
                    t = time.time()
                    data = encode_block(b, name, seq, epoch, t)
                    rec = dict(base, op="write", block=b, wid="%s-%d" % (name, seq))
                    self.op(rec, lambda: conn.pwrite(data, b * BLOCK, self.op_timeout))
                    self.recent.append((b, node))
                    written.append(b)
                    if len(written) > 256:
                        written = written[-256:]
                elif r < 0.9:
                    others = [x for x, n in list(self.recent) if n != node] if pinned else []
                    if others and rng.random() < 0.6:
                        b = rng.choice(others)
                    else:
                        b = rng.choice(written) if rng.random() < 0.5 else rng.randrange(self.hot)
                    rec = dict(base, op="read", block=b)
                    holder = {}

                    def rd():
                        holder["buf"] = conn.pread(BLOCK, b * BLOCK, self.op_timeout)
                    self.op_pending_value(rec, rd, holder, b)
                else:
                    rec = dict(base, op="flush")
                    self.op(rec, lambda: conn.flush(self.op_timeout))
            except Exception:  # noqa: BLE001 - any failure: drop the connection, rediscover
                conn.close()
                conn = None
                time.sleep(0.05)
                continue
            time.sleep(rng.uniform(0.002, 0.01))
        if conn is not None:
            conn.close()

    def op_pending_value(self, rec, fn, holder, b):
        """Like op() but records the decoded value of a read in the same record."""
        rec["start"] = time.time()
        try:
            fn()
            rec["result"] = "ok"
            rec["value"] = value_of(holder["buf"], b)
        except NbdTimeout as e:
            rec["result"] = "timeout"
            rec["err"] = str(e)
            raise
        except Exception as e:  # noqa: BLE001
            rec["result"] = "error"
            rec["err"] = str(e)[:200]
            raise
        finally:
            rec["end"] = time.time()
            self.h.write(rec)

    def run(self, pinned=True):
        ws = [threading.Thread(target=self.worker, args=("f0",), daemon=True),
              threading.Thread(target=self.worker, args=("f1",), daemon=True)]
        if pinned:
            for n in sorted(self.c["nodes"]):
                ws.append(threading.Thread(target=self.worker, args=("p" + n, n), daemon=True))
        for w in ws:
            w.start()
        for w in ws:
            w.join(timeout=max(1.0, self.deadline - time.monotonic() + 30))


# ---------------------------------------------------------------------------
def poll(cluster, history, stop_file, latest_path, seconds, interval=0.1):
    """Poll every node's /status every ~100 ms; each poll is one history record."""
    targets = {n: v["status"] for n, v in cluster["nodes"].items()}
    if cluster.get("arbitrator", {}).get("status"):
        targets["w"] = cluster["arbitrator"]["status"]
    latest = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one(name, addr):
        n = 0
        while not os.path.exists(stop_file) and time.monotonic() < deadline and n < 10000000:
            n += 1
            t0 = time.time()
            rec = {"type": "status", "node": name, "t0": t0}
            try:
                rec["s"] = http_json(addr, timeout=0.5)
                rec["ok"] = True
            except Exception as e:  # noqa: BLE001
                rec["ok"] = False
                rec["err"] = str(e)[:120]
            rec["t1"] = time.time()
            history.write(rec)
            with lock:
                latest[name] = rec
            time.sleep(max(0.0, interval - (rec["t1"] - t0)))

    ts = [threading.Thread(target=one, args=kv, daemon=True) for kv in targets.items()]
    for t in ts:
        t.start()
    n = 0
    while any(t.is_alive() for t in ts) and n < 10000000:
        n += 1
        with lock:
            snap = dict(latest)
        write_json_atomic(latest_path, snap)
        time.sleep(0.2)
    with lock:
        write_json_atomic(latest_path, dict(latest))


def final_read(cluster, history, node=None, timeout=30.0):
    """Read every block the workload may have touched from the master (or --node)."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline and n < 1000:
        n += 1
        if node:
            d = (node, cluster["nodes"][node]["service"], -1)
        else:
            d = discover(cluster)
        if d is None:
            time.sleep(0.2)
            continue
        name, addr, epoch = d
        nblocks = int(cluster.get("hot_blocks", 64)) + int(cluster.get("append_blocks", 1024))
        t0 = time.time()
        try:
            conn = NbdConn(addr, cluster.get("export", ""), 5.0)
            values = {}
            step = 64
            for first in range(0, nblocks, step):
                cnt = min(step, nblocks - first)
                buf = conn.pread(cnt * BLOCK, first * BLOCK, 10.0)
                for i in range(cnt):
                    v = value_of(buf[i * BLOCK:(i + 1) * BLOCK], first + i)
                    if v != "zero":
                        values[str(first + i)] = v
            conn.close()
        except Exception as e:  # noqa: BLE001
            history.write({"type": "final-error", "node": name, "t": time.time(), "err": str(e)[:200]})
            time.sleep(0.3)
            continue
        rec = {"type": "final", "node": name, "addr": addr, "epoch": epoch, "start": t0,
               "end": time.time(), "nblocks": nblocks, "values": values}
        history.write(rec)
        return rec
    history.write({"type": "final-error", "t": time.time(), "err": "no master readable in %ss" % timeout})
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["run", "poll", "final", "status"])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--history")
    ap.add_argument("--stop-file", default="/nonexistent")
    ap.add_argument("--latest")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--node")
    ap.add_argument("--no-pinned", action="store_true")
    a = ap.parse_args()
    with open(a.cluster) as f:
        cluster = json.load(f)
    if a.cmd == "status":
        out = {}
        for n, v in list(cluster["nodes"].items()) + [("w", cluster.get("arbitrator", {}))]:
            try:
                out[n] = http_json(v["status"], timeout=1.0)
            except Exception as e:  # noqa: BLE001
                out[n] = {"error": str(e)}
        print(json.dumps(out))
        return 0
    h = Jsonl(a.history)
    if a.cmd == "run":
        Workload(cluster, h, a.stop_file, a.seconds, a.seed).run(pinned=not a.no_pinned)
    elif a.cmd == "poll":
        poll(cluster, h, a.stop_file, a.latest, a.seconds)
    else:
        rec = final_read(cluster, h, a.node)
        return 0 if rec else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
