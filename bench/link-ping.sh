#!/usr/bin/env bash
# Link ping-pong: the round trip of one frame between two processes over loopback, through the
# product's own peer transport (bench/arbload, product linkping: PeerListener echoing from its frame callback,
# PeerDialer sending from the event loop, per-session AES-256-GCM as on the replication link).
# Strictly one frame outstanding. It is the floor of what a protocol-C write costs: one round
# trip on the replication link, before any disk or NBD work. Then `linkping cost`: the CPU of
# sealing and opening one frame (AES-256-GCM) against HMAC-SHA256 of the same bytes.
#
#   bench/link-ping.sh                          # PAYLOADS="0 4096" COUNT=20000 WARMUP=1000
#   PAYLOADS="0 4096 65536" COUNT=50000 bench/link-ping.sh
#   OUT_JSON=/tmp/ping.jsonl bench/link-ping.sh # also write the client's raw JSON lines there
#
# Env: LINKPING_BIN (default: built with `swift build -c release` in bench/linkping; setting it
# skips the build), SHM (work dir parent, default /dev/shm), OUT_JSON (path for the JSON lines,
# one per payload: {"payload":B,"count":N,"mean_us":..,"p50_us":..,"p99_us":..,"min_us":..}).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PAYLOADS=${PAYLOADS:-"0 4096"}
COUNT=${COUNT:-20000}
WARMUP=${WARMUP:-1000}
command -v python3 >/dev/null || { echo "link-ping.sh: python3 missing" >&2; exit 2; }
if [ -z "${LINKPING_BIN:-}" ]; then
    swift build -c release --package-path "$HERE/arbload" --product linkping >&2
    LINKPING_BIN=$HERE/arbload/.build/release/linkping
fi
[ -x "$LINKPING_BIN" ] || { echo "link-ping.sh: no linkping at $LINKPING_BIN" >&2; exit 2; }

WORK=$(mktemp -d "${SHM:-/dev/shm}/hamgr-linkping.XXXXXX")
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

head -c 48 /dev/urandom >"$WORK/cluster.key"; chmod 600 "$WORK/cluster.key"
port=$(free_port)
"$LINKPING_BIN" serve --listen "127.0.0.1:$port" --key-file "$WORK/cluster.key" >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVER_PID=$!
for _ in $(seq 1 100); do
    grep -q '^listening on' "$WORK/serve.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
grep -q '^listening on' "$WORK/serve.out" || { echo "link-ping.sh: server did not start:" >&2; cat "$WORK/serve.err" >&2; exit 1; }

echo "machine: $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg); count $COUNT after $WARMUP warmup round trips"
: >"$WORK/results.jsonl"
for p in $PAYLOADS; do
    if ! "$LINKPING_BIN" client --connect "127.0.0.1:$port" --key-file "$WORK/cluster.key" \
        --count "$COUNT" --payload "$p" --warmup "$WARMUP" >>"$WORK/results.jsonl"; then
        echo "link-ping.sh: client failed at payload $p; server log:" >&2; tail -5 "$WORK/serve.err" >&2; exit 1
    fi
done
if [ -n "${OUT_JSON:-}" ]; then cp "$WORK/results.jsonl" "$OUT_JSON"; fi

python3 - "$WORK/results.jsonl" <<'PY'
import json, sys
print(f"{'payload B':>10} {'mean µs':>9} {'p50 µs':>9} {'p99 µs':>9} {'min µs':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['payload']:>10} {r['mean_us']:>9.1f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['min_us']:>9.1f}")
PY

echo
echo "frame protection, one core, in process (linkping cost):"
"$LINKPING_BIN" cost >"$WORK/cost.jsonl"
python3 - "$WORK/cost.jsonl" <<'PY'
import json, sys
print(f"{'case':<18} {'payload B':>10} {'us/frame':>9} {'GB/s':>7}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['case']:<18} {r['payload']:>10} {r['us']:>9.2f} {r['GB_per_s']:>7.2f}")
PY
