#!/usr/bin/env bash
# Full-sync throughput: a new pair where node a holds SIZE_MIB of random data and b is new;
# `hactl bootstrap --source a` makes b a full-sync target; prints the time from the
# resync's start to its end (from a's log) and the rate, then checks the stores with cmp.
#   HAMGR_BIN=.build/debug/hamgr HACTL_BIN=.build/debug/hactl bench/resync-full.sh [SIZE_MIB]
set -u
SIZE_MIB=${1:-512}
HAMGR_BIN=${HAMGR_BIN:-$PWD/.build/debug/hamgr}; HACTL_BIN=${HACTL_BIN:-$PWD/.build/debug/hactl}
dir=$(mktemp -d /tmp/hamgr-resync-XXXX); pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
head -c 32 /dev/urandom >"$dir/key"; echo "token-$(date +%s%N)" >"$dir/tok"; chmod 600 "$dir/key" "$dir/tok"
cat >"$dir/c.toml" <<TOML
[cluster]
name = "rs"
key_file = "$dir/key"
admin_token_file = "$dir/tok"
[volume]
size = "${SIZE_MIB}MiB"
resync_rate = "4GiB"
create = true
[[node]]
name = "a"
replication_address = "127.0.91.1:7788"
service_address = "127.0.91.1:10809"
status_address = "127.0.91.1:9650"
backing = "$dir/a.img"
metadata = "$dir/a.meta"
[[node]]
name = "b"
replication_address = "127.0.91.2:7788"
service_address = "127.0.91.2:10809"
status_address = "127.0.91.2:9650"
backing = "$dir/b.img"
metadata = "$dir/b.meta"
[arbitrator]
address = "127.0.91.3:7790"
status_address = "127.0.91.3:9651"
state_dir = "$dir/arb"
TOML
head -c $((SIZE_MIB << 20)) /dev/urandom >"$dir/a.img"
"$HAMGR_BIN" arbitrator --config "$dir/c.toml" --init >"$dir/w.log" 2>&1 & pids+=($!)
"$HAMGR_BIN" run --config "$dir/c.toml" --node a >"$dir/a.log" 2>&1 & pids+=($!)
"$HAMGR_BIN" run --config "$dir/c.toml" --node b >"$dir/b.log" 2>&1 & pids+=($!)
sleep 3
"$HACTL_BIN" --endpoint http://127.0.91.1:9650 --token-file "$dir/tok" bootstrap --source a --yes >/dev/null || exit 1
for _ in $(seq 1 1200); do grep -q "resync finished" "$dir/a.log" && break; sleep 0.1; done
python3 - "$dir/a.log" "$SIZE_MIB" <<'PY'
import re, sys, datetime
t = {}
for line in open(sys.argv[1]):
    for key in ("resync source", "resync finished"):
        if key in line: t[key] = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
s = (t["resync finished"] - t["resync source"]).total_seconds()
print(f"full sync of {sys.argv[2]} MiB: {s:.2f} s, {int(sys.argv[2]) / s:.0f} MiB/s")
PY
sleep 1
cmp -n $((SIZE_MIB << 20)) "$dir/a.img" "$dir/b.img" && echo "stores identical (cmp)"
