#!/usr/bin/python3
"""Delay relay: a TCP proxy that holds every chunk for a fixed time in each direction.

The kernel here has no netem, so link delay is made by this relay running in the
router namespace; nftables DNAT sends a link's new connections to it (nemesis
`delay`). RTT through it grows by 2 x delay. Order within a direction is kept.

    relay.py --delay-ms 100 --map 10.K.1.1:21001=10.K.2.2:7788 [--map ...]

Bounded: at most --max-conns connections, at most --max-queue bytes held per
direction (reading pauses while over it), at most --max-seconds of life.
"""
import argparse
import collections
import socket
import sys
import threading
import time


def pump(src, dst, delay, max_queue, stop):
    q = collections.deque()
    cv = threading.Condition()
    state = {"held": 0, "eof": False}

    def reader():
        try:
            while not stop.is_set():
                data = src.recv(65536)
                with cv:
                    if not data:
                        state["eof"] = True
                        cv.notify_all()
                        return
                    q.append((time.monotonic() + delay, data))
                    state["held"] += len(data)
                    cv.notify_all()
                    waited = 0
                    while state["held"] > max_queue and not stop.is_set() and waited < 600:
                        cv.wait(0.1)
                        waited += 1
        except OSError:
            with cv:
                state["eof"] = True
                cv.notify_all()

    def writer():
        try:
            while not stop.is_set():
                with cv:
                    while not q and not state["eof"] and not stop.is_set():
                        cv.wait(0.5)
                    if not q:
                        break
                    due, data = q[0]
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                dst.sendall(data)
                with cv:
                    q.popleft()
                    state["held"] -= len(data)
                    cv.notify_all()
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    r = threading.Thread(target=reader, daemon=True)
    w = threading.Thread(target=writer, daemon=True)
    r.start()
    w.start()
    return r, w


def serve(listen, target, delay, max_conns, max_queue, stop, sem):
    lh, lp = listen.rsplit(":", 1)
    th, tp = target.rsplit(":", 1)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((lh, int(lp)))
    ls.listen(64)
    ls.settimeout(0.5)
    while not stop.is_set():
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        if not sem.acquire(blocking=False):
            c.close()
            continue
        try:
            u = socket.create_connection((th, int(tp)), timeout=5)
            u.settimeout(None)
        except OSError:
            c.close()
            sem.release()
            continue
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads = pump(c, u, delay, max_queue, stop) + pump(u, c, delay, max_queue, stop)

        def reap(ts=threads, a=c, b=u):
            for t in ts:
                t.join()
            a.close()
            b.close()
            sem.release()
        threading.Thread(target=reap, daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--map", action="append", required=True, help="LISTEN_IP:PORT=TARGET_IP:PORT")
    ap.add_argument("--max-conns", type=int, default=64)
    ap.add_argument("--max-queue", type=int, default=8 << 20)
    ap.add_argument("--max-seconds", type=float, default=3600)
    a = ap.parse_args()
    stop = threading.Event()
    sem = threading.Semaphore(a.max_conns)
    for m in a.map:
        listen, target = m.split("=")
        threading.Thread(target=serve, args=(listen, target, a.delay_ms / 1000.0, a.max_conns,
                                             a.max_queue, stop, sem), daemon=True).start()
    print("relay up delay=%sms %s" % (a.delay_ms, " ".join(a.map)), flush=True)
    time.sleep(a.max_seconds)
    stop.set()


if __name__ == "__main__":
    sys.exit(main())
