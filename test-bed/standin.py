#!/usr/bin/python3
"""STAND-IN for harness plumbing only, NOT hamgr: a fixed /status on a node address,
and on node a an `nbdkit file` export (child process) of the node's backing file.
a is always primary at epoch 1; b always secondary upToDate, peer inSync.
"""
import argparse
import http.server
import json
import os
import signal
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--backing")
    ap.add_argument("--size-mb", type=int, default=32)
    a = ap.parse_args()
    with open(a.cluster) as f:
        c = json.load(f)
    child = None
    if a.node == "a":
        if not os.path.exists(a.backing):
            with open(a.backing, "wb") as f:
                f.truncate(a.size_mb << 20)
        host, port = c["nodes"]["a"]["service"].rsplit(":", 1)
        # BED_STANDIN_PLUGIN=memory makes a deliberately lossy stand-in (a kill loses
        # everything): the self-test uses it to see the checker catch real loss end to end.
        plugin = (["memory", "%dM" % a.size_mb] if os.environ.get("BED_STANDIN_PLUGIN") == "memory"
                  else ["file", a.backing])
        child = subprocess.Popen(["nbdkit", "-f", "-i", host, "-p", port, "-e", c["name"]] + plugin)
        signal.signal(signal.SIGTERM, lambda *_: (child.kill(), sys.exit(0)))
    master = {"node": "a", "service_address": c["nodes"]["a"]["service"]}
    doc = {"cluster": c["name"], "node": a.node, "role": "primary" if a.node == "a" else "secondary",
           "epoch": 1, "master": master, "disk_state": "upToDate",
           "peer": {"node": "b" if a.node == "a" else "a", "reachable": True, "replication": "inSync"},
           "out_of_sync_bytes": 0, "standin": True}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(doc).encode()
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    host, port = a.listen.rsplit(":", 1)
    srv = http.server.ThreadingHTTPServer((host, int(port)), H)
    try:
        srv.serve_forever()
    finally:
        if child:
            child.kill()


if __name__ == "__main__":
    main()
