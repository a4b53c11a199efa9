#!/usr/bin/env bash
# Arbitrator scale: one `hamgr arbitrator` serving 1,000 then 10,000 clusters, loaded by
# bench/arbload (a Swift executable reusing HACore.PeerDialer + Quorum.QuorumMessage): one
# authenticated quorum session per cluster (the master, node "a"), which first wins an
# election (VoteRequest at epoch 1) and then renews its lease at RATE Hz (default 1).
#
#   bench/arbitrator.sh                      # COUNTS="1000 10000" WINDOW=30 RATE=1
#   COUNTS=10000 WINDOW=30 bench/arbitrator.sh
#
# Measures over WINDOW seconds: the arbitrator's CPU (utime+stime from /proc/PID/stat →
# cores), the p99 of hamgr_arbitrator_decision_seconds (bucket delta of two /metrics scrapes
# taken just before and after the window), the renew round trip at the load generator, the
# load generator's own CPU and the whole machine's busy share. Target: < 0.5 core at 10,000.
# Env: HAMGR_BIN (default .build-release/release/hamgr), ARBLOAD_BIN (default: built with
# `swift build -c release` in bench/arbload), SHM (work dir parent, default /dev/shm).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
COUNTS=${COUNTS:-"1000 10000"}
WINDOW=${WINDOW:-30}
RATE=${RATE:-1}
THREADS=${THREADS:-2}
# FAILURE_MS/LEASE_MS/RENEW_MS: write a [timeouts] section into every generated config (the
# arbitrator's session idle timeout is failure_timeout_ms; keepalives go every third of it on
# both sides). Empty (default): the product defaults 200/1200/800 ms. For a 1 Hz renewal the
# lease rule (renew <= lease*(1-drift)/3) needs e.g. RENEW_MS=1000 LEASE_MS=3600 FAILURE_MS=2400.
RENEW_MS=${RENEW_MS:-}; LEASE_MS=${LEASE_MS:-}; FAILURE_MS=${FAILURE_MS:-}
RAMP_S=${RAMP_S:-}
# ARB_EVENT_LOOPS: pass --event-loops N to the arbitrator (empty: the product default).
ARB_EVENT_LOOPS=${ARB_EVENT_LOOPS:-}
ARBLOAD_BIN=${ARBLOAD_BIN:-$HERE/arbload/.build/release/arbload}
for t in python3 curl; do command -v $t >/dev/null || { echo "arbitrator.sh: $t missing" >&2; exit 2; }; done
[ -x "$HAMGR_BIN" ] || { echo "arbitrator.sh: no hamgr at $HAMGR_BIN" >&2; exit 2; }
if [ ! -x "$ARBLOAD_BIN" ]; then swift build -c release --package-path "$HERE/arbload" >&2; fi

ulimit -n "$(ulimit -Hn)"
echo "timeouts: renew ${RENEW_MS:-200(default)} lease ${LEASE_MS:-1200(default)} failure ${FAILURE_MS:-800(default)} ms; renew rate $RATE Hz"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; load average before: $(cut -d' ' -f1-3 /proc/loadavg); ulimit -n $(ulimit -n); ARG_MAX $(getconf ARG_MAX)"
WORK=$(mktemp -d "${SHM:-/dev/shm}/hamgr-arb-bench.XXXXXX")
ARB_PID=; LOAD_PID=
cleanup() {
    for p in $LOAD_PID $ARB_PID; do kill "$p" 2>/dev/null || true; done
    for p in $LOAD_PID $ARB_PID; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
    done
    ARB_PID=; LOAD_PID=
}
# KEEP_WORK=1 keeps the work directory (configs, arbitrator.log, load.out/err) for a post-mortem.
trap 'cleanup; if [ -n "${KEEP_WORK:-}" ]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi' EXIT
trap 'exit 130' INT TERM
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }          # utime + stime of a process
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

RESULTS=()
for N in $COUNTS; do
    dir=$WORK/n$N; mkdir -p "$dir/c"
    head -c 48 /dev/urandom >"$dir/cluster.key"; chmod 600 "$dir/cluster.key"
    ip=127.$((200 + RANDOM % 50)).$((RANDOM % 250 + 1)).3
    python3 - "$dir" "$N" "$ip" "$RENEW_MS" "$LEASE_MS" "$FAILURE_MS" <<'PY'
import sys, os
d, n, ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = "".join(f"{k} = {v}\n" for k, v in zip(("renew_interval_ms", "lease_ms", "failure_timeout_ms"), sys.argv[4:7]) if v)
timeouts = f"\n[timeouts]\n{t}" if t else ""
for i in range(n):
    name = f"c-{i:05d}"
    open(f"{d}/c/{i:05d}.toml", "w").write(f'''[cluster]
name = "{name}"
key_file = "{d}/cluster.key"
{timeouts}

[volume]
size = "1GiB"

[[node]]
name = "a"
replication_address = "127.254.0.1:7788"
service_address = "127.254.0.1:10809"
status_address = "127.254.0.1:9650"
backing = "/nonexistent/{name}-a.img"
metadata = "/nonexistent/{name}-a.meta"

[[node]]
name = "b"
replication_address = "127.254.0.2:7788"
service_address = "127.254.0.2:10809"
status_address = "127.254.0.2:9650"
backing = "/nonexistent/{name}-b.img"
metadata = "/nonexistent/{name}-b.meta"

[arbitrator]
address = "{ip}:7790"
status_address = "{ip}:9651"
state_dir = "{d}/state"
''')
PY
    args=(--init); [ -n "$ARB_EVENT_LOOPS" ] && args+=(--event-loops "$ARB_EVENT_LOOPS")
    for ((i = 0; i < N; i++)); do args+=(--config "c/$(printf %05d "$i").toml"); done
    argbytes=$(printf '%s\0' "$HAMGR_BIN" arbitrator "${args[@]}" | wc -c)
    envbytes=$(env | wc -c)
    echo
    echo "== $N clusters: argv $argbytes bytes + environment $envbytes bytes (ARG_MAX $(getconf ARG_MAX)) =="
    t0=$(date +%s.%N)
    (cd "$dir" && exec "$HAMGR_BIN" arbitrator "${args[@]}" >"$dir/arbitrator.log" 2>&1) &
    ARB_PID=$!
    for _ in $(seq 1 600); do curl -sf --max-time 2 "http://$ip:9651/healthz" >/dev/null 2>&1 && break; kill -0 "$ARB_PID" 2>/dev/null || break; sleep 0.2; done
    curl -sf --max-time 5 "http://$ip:9651/healthz" >/dev/null || { echo "arbitrator did not start:"; tail -5 "$dir/arbitrator.log"; exit 1; }
    echo "arbitrator pid $ARB_PID up after $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s; RSS $(awk '/VmRSS/{print $2, $3}' /proc/$ARB_PID/status)"

    PROBE_PID=
    if [ -n "${PROBE:-}" ]; then
        # PROBE=1: every 0.5 s, how long the arbitrator's event loop takes to answer /healthz
        # (a stalled loop shows here), with the machine's run queue; bounded to 15 minutes.
        ( for _ in $(seq 1 1800); do
              kill -0 "$ARB_PID" 2>/dev/null || break
              echo "$(date +%T.%N | cut -c1-12) $(curl -s -o /dev/null -w '%{time_total}' --max-time 10 "http://$ip:9651/healthz") $(cut -d' ' -f4 /proc/loadavg) cpu_ticks=$(cpu_ticks "$ARB_PID" 2>/dev/null) threads=$(cat /proc/$ARB_PID/task/*/stat 2>/dev/null | awk '{printf "%s:%s:%d,", $2, $3, $14 + $15}')"
              sleep 0.5
          done >"$dir/probe.log" 2>&1 ) &
        PROBE_PID=$!
    fi
    "$ARBLOAD_BIN" --arbitrator "$ip:7790" --key "$dir/cluster.key" --prefix c --clusters "$N" --rate "$RATE" \
        --window "$WINDOW" --threads "$THREADS" --ramp-s "${RAMP_S:-$((N / 1000 * 2 + 2))}" --idle-ms "${FAILURE_MS:-800}" >"$dir/load.out" 2>"$dir/load.err" &
    LOAD_PID=$!
    deadline=$((SECONDS + 600))
    until grep -q '^WINDOW_START' "$dir/load.out" 2>/dev/null; do
        kill -0 "$LOAD_PID" 2>/dev/null || { echo "load generator exited:"; cat "$dir/load.out"; tail -5 "$dir/load.err"; exit 1; }
        [ $SECONDS -lt $deadline ] || { echo "load generator not ready in 600 s"; tail -3 "$dir/load.err"; exit 1; }
        sleep 0.2
    done
    grep '^READY' "$dir/load.out"
    curl -sf --max-time 30 "http://$ip:9651/metrics" | grep '^hamgr_arbitrator_decision_seconds\|^hamgr_arbitrator_messages_total' >"$dir/m0"
    c0=$(cpu_ticks "$ARB_PID"); read -r mb0 mt0 < <(machine_busy); s0=$(date +%s.%N)
    sleep "$WINDOW"
    c1=$(cpu_ticks "$ARB_PID"); read -r mb1 mt1 < <(machine_busy); s1=$(date +%s.%N)
    fds=$(ls /proc/$ARB_PID/fd | wc -l)   # while the sessions are still open (the generator exits after its window)
    curl -sf --max-time 60 "http://$ip:9651/metrics" | grep '^hamgr_arbitrator_decision_seconds\|^hamgr_arbitrator_messages_total' >"$dir/m1"
    wait "$LOAD_PID" || true; LOAD_PID=
    rss=$(awk '/VmHWM/{print $2}' /proc/$ARB_PID/status)
    threads=$(awk '/Threads/{print $2}' /proc/$ARB_PID/status)
    grep '^WINDOW \|^CLOSE_REASONS\|^SLOW_REPLIES' "$dir/load.out"
    echo "arbitrator log: $(wc -l <"$dir/arbitrator.log") lines; most frequent events: $(grep -o '"event":"[a-z_]*"\|event=[a-z_]*' "$dir/arbitrator.log" | sort | uniq -c | sort -rn | head -5 | tr -s ' \n' ' ')"
    line=$(python3 - "$dir" "$N" "$c0" "$c1" "$s0" "$s1" "$CLK_TCK" "$mb0" "$mt0" "$mb1" "$mt1" "$rss" "$threads" "$fds" <<'PY'
import sys, re
d, n = sys.argv[1], int(sys.argv[2])
c0, c1, s0, s1, tck = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
mb0, mt0, mb1, mt1 = map(int, sys.argv[8:12]); rss_kb, threads, fds = int(sys.argv[12]), sys.argv[13], sys.argv[14]
def parse(path):
    b, tot = {}, {}
    for line in open(path):
        m = re.match(r'hamgr_arbitrator_decision_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m: b[m.group(1)] = float(m.group(2)); continue
        m = re.match(r'(hamgr_arbitrator_decision_seconds_count|hamgr_arbitrator_decision_seconds_sum|hamgr_arbitrator_messages_total)\S* (\S+)', line)
        if m: tot[m.group(1)] = float(m.group(2))
    return b, tot
b0, t0 = parse(f"{d}/m0"); b1, t1 = parse(f"{d}/m1")
les = sorted(b1, key=lambda x: float("inf") if x == "+Inf" else float(x))
count = b1["+Inf"] - b0.get("+Inf", 0)
def q(p):
    target, prev_le, prev_c = p * count, 0.0, 0.0
    for le in les:
        c = b1[le] - b0.get(le, 0)
        if c >= target:
            if le == "+Inf": return float("inf"), prev_le, le
            hi = float(le)
            # linear interpolation inside the bucket (Prometheus histogram_quantile)
            return prev_le + (hi - prev_le) * ((target - prev_c) / (c - prev_c) if c > prev_c else 1), prev_le, le
        prev_le, prev_c = float(le), c
    return float("nan"), 0, "?"
el = s1 - s0
cores = (c1 - c0) / tck / el
busy = (mb1 - mb0) / max(1, (mt1 - mt0))
sum_s = t1.get("hamgr_arbitrator_decision_seconds_sum", 0) - t0.get("hamgr_arbitrator_decision_seconds_sum", 0)
p50, _, _ = q(0.50); p99, lo, hi = q(0.99)
print(f"clusters={n} window_s={el:.1f} arbitrator_cores={cores:.3f} decisions={count:.0f} decisions_per_s={count/el:.0f} "
      f"decision_mean_us={1e6*sum_s/max(1,count):.1f} decision_p50_us={p50*1e6:.1f} decision_p99_us={p99*1e6:.1f} (bucket {lo}..{hi}) "
      f"machine_busy={100*busy:.0f}% rss_peak_mib={rss_kb/1024:.0f} threads={threads} fds={fds}")
PY
)
    echo "$line"
    if [ -n "$PROBE_PID" ]; then
        kill "$PROBE_PID" 2>/dev/null || true; wait "$PROBE_PID" 2>/dev/null || true
        echo "healthz probe: $(awk '$2 > 0.1 {n++} $2 > m {m = $2} END {printf "%d of %d answers slower than 100 ms, slowest %.2f s", n, NR, m}' "$dir/probe.log")"
    fi
    RESULTS+=("$line|$(grep '^WINDOW ' "$dir/load.out")")
    cleanup
done

echo
echo "== summary (target: < 0.5 core at 10,000 clusters) =="
for r in "${RESULTS[@]}"; do
    python3 - "$r" <<'PY'
import sys, re
a, w = sys.argv[1].split("|")
kv = dict(re.findall(r'(\w+)=([^\s(]+)', a)); kw = dict(re.findall(r'(\w+)=(\S+)', w))
n, cores = int(kv["clusters"]), float(kv["arbitrator_cores"])
verdict = ("MET" if cores < 0.5 else f"MISSED by {cores-0.5:.2f} core ({cores/0.5:.2f}x)") if n >= 10000 else f"{cores/0.5:.2f}x of the 10k budget"
print(f"{n:>6} clusters: arbitrator {cores:.3f} cores ({verdict}); decision p99 {kv['decision_p99_us']} us, mean {kv['decision_mean_us']} us, "
      f"{kv['decisions_per_s']} decisions/s; renew RTT at the load generator p50 {kw['rtt_ms_p50']} ms p99 {kw['rtt_ms_p99']} ms max {kw['rtt_ms_max']} ms, "
      f"{kw['replies_refused']} refused, {kw['disconnects']} disconnects; load generator {kw['loadgen_cpu_cores']} cores; machine busy {kv['machine_busy']}")
PY
done
