#!/usr/bin/env bash
# Repeated failover drills on a loopback cluster (protocol C, default timeouts), using the
# product's own tool `hactl drill --json` as the write prober. Called by bench/rto.sh
# (MODE=crash) and bench/switchover.sh (MODE=switchover); see those for usage.
#
# crash:      per round: find the master via /status, `hactl drill --mode crash
#             --kill-command "kill -9 PID"` (SIGKILL the master's hamgr while the drill writes
#             4 KiB blocks through NBD), then restart the killed node and wait until the
#             master's /status shows the peer inSync and both disks upToDate.
# switchover: per round: `hactl drill --mode switchover` (planned handover under the drill's
#             write load); the direction alternates by itself (a→b, b→a, …); wait inSync.
# rto_ms = the drill's "longest time without an acknowledged write".
set -euo pipefail
MODE=${MODE:?MODE=crash|switchover}
ROUNDS=${1:-20}
ROUND_TIMEOUT=${ROUND_TIMEOUT:-90}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_require python3 curl

WORK=$(mktemp -d "${SHM:-/dev/shm}/hamgr-bench-$MODE.XXXXXX")
cleanup() { cluster_stop_all; [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

cluster_init "$WORK" "bench-$MODE" C 256MiB
cluster_start w; cluster_start a; cluster_start b
master=$(wait_master_in_sync 120) || { echo "drill-loop: no master in sync within 120 s; logs in $WORK" >&2; KEEP=1; exit 1; }
echo "cluster up: master $master; arbitrator $ARB_IP, nodes $NODE_IP_a $NODE_IP_b; TLS everywhere: $([ "${BENCH_TLS:-0}" = 1 ] && echo yes || echo "no (links encrypted)"); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

RTOS=(); LOST=0; FAILED=0
printf '%-5s %-8s %-8s %9s %6s %6s %s\n' round old new rto_ms acked lost notes
for ((r = 1; r <= ROUNDS; r++)); do
    pid=${CPID[$master]}
    args=(--endpoint "$STATUS_SCHEME://$STATUS_a" --endpoint "$STATUS_SCHEME://$STATUS_b" "${HACTL_TLS[@]}" --token-file "$TOKEN" drill --json)
    if [ "$MODE" = crash ]; then args+=(--mode crash --kill-command "kill -9 $pid"); else args+=(--mode switchover); fi
    out=$(timeout "$ROUND_TIMEOUT" "$HACTL_BIN" "${args[@]}" 2>"$WORK/drill.$r.err") || true
    echo "$out" >"$WORK/drill.$r.json"
    read -r old new rto lost acked notes < <(python3 -c '
import json,sys
try: d=json.loads(sys.argv[1])
except Exception: print("? ? NA 0 0 unparseable"); sys.exit()
rto = d.get("rto_ms"); print(d.get("old_master"), d.get("new_master"), "NA" if rto is None else "%.0f" % rto,
      d.get("lost_acknowledged_writes", 0), d.get("writes_acknowledged", 0), ";".join(d.get("notes", [])).replace(" ", "_") or "-")
' "$out")
    printf '%-5s %-8s %-8s %9s %6s %6s %s\n' "$r" "$old" "$new" "$rto" "$acked" "$lost" "$notes"
    if [ "$rto" = NA ]; then FAILED=$((FAILED + 1)); sed 's/^/    drill stderr: /' "$WORK/drill.$r.err" | tail -3; else RTOS+=("$rto"); fi
    LOST=$((LOST + lost))
    if [ "$MODE" = crash ]; then
        wait "$pid" 2>/dev/null || true
        cluster_start "$master"        # the killed node returns as secondary and resyncs
    fi
    t0=$SECONDS
    master=$(wait_master_in_sync 120) || { echo "drill-loop: cluster not back in sync within 120 s after round $r; logs kept in $WORK" >&2; KEEP=1; break; }
    echo "      back inSync after $((SECONDS - t0)) s; master $master"
done

echo
echo "== $MODE drills: $ROUNDS rounds, ${#RTOS[@]} with a measured RTO, $FAILED without; lost acknowledged writes total: $LOST =="
print_stats "rto" "${RTOS[@]}"
python3 - "$MODE" "${RTOS[@]}" <<'PY'
import sys, math
mode, v = sys.argv[1], sorted(float(x) for x in sys.argv[2:])
if not v: sys.exit()
def pct(p): return v[max(0, math.ceil(p / 100 * len(v)) - 1)]
if mode == "crash":
    for name, val, tgt in (("median", pct(50), 1500), ("p99", pct(99), 2500)):
        print(f"target {name} <= {tgt} ms: measured {val:.0f} ms = {val/tgt:.2f}x of target -> {'MET' if val <= tgt else 'MISSED by %.0f ms' % (val - tgt)}")
else:
    worst = v[-1]
    print(f"target < 1000 ms: median {pct(50):.0f} ms ({pct(50)/1000:.2f}x), p90 {pct(90):.0f} ms, max {worst:.0f} ms ({worst/1000:.2f}x) -> "
          + ("MET for every round" if worst < 1000 else f"MISSED in {sum(1 for x in v if x >= 1000)} of {len(v)} rounds"))
PY
echo "lost acknowledged writes: $LOST (target 0) -> $([ "$LOST" = 0 ] && echo MET || echo MISSED)"
