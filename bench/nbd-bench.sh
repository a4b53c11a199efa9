#!/usr/bin/env bash
# NBD benchmark: fio through its NBD engine against nbdkit's file plugin and against
# `hamgr export` (release build), side by side in one run, backing files on tmpfs.
#
#   bench/nbd-bench.sh                 # builds hamgr (release) into .build-release first
#   HAMGR_BIN=path/to/hamgr bench/nbd-bench.sh
#   RUNTIME=20 REPEAT=3 SIZE=1G bench/nbd-bench.sh
#   CPUS=0 bench/nbd-bench.sh          # every server and fio on CPU 0 (taskset -c)
#
# Workloads: 4 KiB random writes at iodepth 1 (what a database commit feels) and 32, and
# 1 MiB sequential writes (iodepth 8). Each (target, workload) runs REPEAT times, targets
# interleaved so that noise from other work on the machine hits all alike; the best run of
# each is reported (highest IOPS). Prints IOPS, MB/s, mean and p99 completion latency, the
# serving processes' CPU per request (utime+stime over the run / requests; both nodes for
# the replicated target), the ratio to nbdkit, and every goal of docs/benchmarks.md as
# MET/MISSED with its ratio.
# BENCH_REPLICATED=1 adds a third target: a two-node hamgr cluster + arbitrator on loopback,
# protocol C (hamgr run / hamgr arbitrator, needs hactl too: HACTL_BIN), fio against the
# master's service address; also prints replicated-C / unreplicated.
# BENCH_TLS=1 runs every target over NBD TLS (STARTTLS required, X.509, ECDSA P-256):
# nbdkit --tls=require, hamgr export --tls-cert, and the cluster with [tls] (bench/lib.sh);
# fio connects with nbds:// URIs; libnbd finds the CAs in $HOME/.pki/libnbd/ca-cert.pem
# (fio's engine may not name local files in a URI), so fio and nbdinfo run with HOME=$WORK/home.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-15}
REPEAT=${REPEAT:-2}
SIZE=${SIZE:-1G}
SHM=${SHM:-/dev/shm}
HAMGR_BIN=${HAMGR_BIN:-}
CPUS=${CPUS:-}
PIN=()
if [ -n "$CPUS" ]; then PIN=(taskset -c "$CPUS"); fi
export HAMGR_PIN=$CPUS  # bench/lib.sh pins the cluster's processes too

for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "nbd-bench: $tool is not installed" >&2; exit 2; }
done
if [ -z "$HAMGR_BIN" ]; then
    swift build -c release --package-path "$ROOT" --scratch-path "$ROOT/.build-release" --product hamgr >&2
    HAMGR_BIN="$ROOT/.build-release/release/hamgr"
fi

WORK=$(mktemp -d "$SHM/nbd-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_nbd() {  # wait until the NBD server at URI $1 answers
    for _ in $(seq 1 100); do
        timeout 5 "${CLIENT_ENV[@]}" nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nbd-bench: no NBD server at $1" >&2; return 1
}

# With BENCH_TLS=1: a CA and a server certificate for 127.0.0.1 in the layout nbdkit reads
# ($WORK/pki), and the CA where libnbd looks by default ($WORK/home/.pki/libnbd).
SCHEME=nbd; NBDKIT_TLS=(); EXPORT_TLS=(); CLIENT_ENV=(env)
if [ "${BENCH_TLS:-0}" = 1 ]; then
    mkdir -p "$WORK/pki" "$WORK/home/.pki/libnbd"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/pki/ca-key.pem" \
        -out "$WORK/pki/ca-cert.pem" -days 2 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/pki/server-key.pem" \
        -out "$WORK/pki/server.csr" -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$WORK/pki/ext.cnf"
    openssl x509 -req -in "$WORK/pki/server.csr" -CA "$WORK/pki/ca-cert.pem" -CAkey "$WORK/pki/ca-key.pem" -set_serial 1 \
        -days 2 -extfile "$WORK/pki/ext.cnf" -out "$WORK/pki/server-cert.pem" 2>/dev/null
    chmod 600 "$WORK/pki/server-key.pem"
    cp "$WORK/pki/ca-cert.pem" "$WORK/home/.pki/libnbd/ca-cert.pem"
    SCHEME=nbds; CLIENT_ENV=(env HOME="$WORK/home")
    NBDKIT_TLS=(--tls=require --tls-certificates="$WORK/pki")
    EXPORT_TLS=(--tls-cert "$WORK/pki/server-cert.pem" --tls-key "$WORK/pki/server-key.pem")
fi

# Targets, as "label|uri|pid[,pid]" (the server processes whose CPU is counted). Each
# start_* function appends one.
TARGETS=()

start_nbdkit() {
    local port; port=$(free_port)
    truncate -s "$SIZE" "$WORK/nbdkit.img"
    "${PIN[@]}" nbdkit -f -i 127.0.0.1 -p "$port" "${NBDKIT_TLS[@]}" file "$WORK/nbdkit.img" 2>"$WORK/nbdkit.log" &
    PIDS+=($!)
    wait_nbd "$SCHEME://127.0.0.1:$port/"
    TARGETS+=("nbdkit-file|$SCHEME://127.0.0.1:$port/|$!")
}

start_hamgr_unreplicated() {
    local port; port=$(free_port)
    "${PIN[@]}" "$HAMGR_BIN" export --backing "$WORK/hamgr.img" --size "$SIZE" --listen "127.0.0.1:$port" --name bench \
        "${EXPORT_TLS[@]}" >"$WORK/hamgr.log" 2>&1 &
    PIDS+=($!)
    wait_nbd "$SCHEME://127.0.0.1:$port/bench"
    TARGETS+=("hamgr-unreplicated|$SCHEME://127.0.0.1:$port/bench|$!")
}

# utime+stime (clock ticks) of the comma-separated pids, summed.
server_cpu_ticks() {
    local p sum=0
    for p in ${1//,/ }; do sum=$((sum + $(awk '{print $14+$15}' "/proc/$p/stat"))); done
    echo "$sum"
}

start_hamgr_replicated() {
    # Two data nodes + arbitrator on loopback (bench/lib.sh: each on its own 127.x.y.z),
    # protocol C, default timeouts, backing and metadata files under $WORK (tmpfs).
    # shellcheck source=bench/lib.sh
    . "$ROOT/bench/lib.sh"
    HACTL_BIN=${HACTL_BIN:-$ROOT/.build-release/release/hactl}
    local vol=${SIZE/%G/GiB}; vol=${vol/%M/MiB}
    cluster_init "$WORK/repl" bench-repl C "$vol"
    cluster_start w; cluster_start a; cluster_start b
    PIDS+=("${CPID[a]}" "${CPID[b]}" "${CPID[w]}")
    local m
    m=$(wait_master_in_sync 180) || { echo "nbd-bench: replicated cluster not in sync within 180 s" >&2; tail -5 "$WORK/repl/"*.log >&2; exit 1; }
    local svc=SERVICE_$m
    if [ -n "$CLUSTER_CA" ]; then cat "$CLUSTER_CA" >>"$WORK/home/.pki/libnbd/ca-cert.pem"; fi
    wait_nbd "$NBD_SCHEME://${!svc}/bench-repl"
    echo "nbd-bench: replicated cluster up, master $m at ${!svc} (protocol C)" >&2
    TARGETS+=("hamgr-replicated-C|$NBD_SCHEME://${!svc}/bench-repl|${CPID[a]},${CPID[b]}")
}

start_nbdkit
start_hamgr_unreplicated
if [ "${BENCH_REPLICATED:-0}" = 1 ]; then start_hamgr_replicated; fi

WORKLOADS=(
    "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1"
    "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32"
    "seqwrite-1m-qd8|--rw=write --bs=1M --iodepth=8"
)

for ((r = 1; r <= REPEAT; r++)); do
    for w in "${WORKLOADS[@]}"; do
        wname=${w%%|*}; wargs=${w#*|}
        for t in "${TARGETS[@]}"; do
            IFS='|' read -r tname uri tpids <<<"$t"
            c0=$(server_cpu_ticks "$tpids"); t0=$(date +%s.%N)
            # shellcheck disable=SC2086
            "${CLIENT_ENV[@]}" "${PIN[@]}" fio --name="$wname" --ioengine=nbd --uri="$uri" $wargs --size="$SIZE" \
                --time_based --runtime="$RUNTIME" --ramp_time=2 --output-format=json \
                >"$WORK/$tname.$wname.$r.json" 2>"$WORK/$tname.$wname.$r.err" ||
                { echo "nbd-bench: fio failed for $tname $wname:" >&2; cat "$WORK/$tname.$wname.$r.err" >&2; exit 1; }
            c1=$(server_cpu_ticks "$tpids"); t1=$(date +%s.%N)
            echo "$c0 $c1 $t0 $t1 $(getconf CLK_TCK)" >"$WORK/$tname.$wname.$r.cpu"
        done
    done
done

python3 - "$WORK" "$REPEAT" "${TARGETS[@]}" <<'EOF'
import json, sys
work, repeat, targets = sys.argv[1], int(sys.argv[2]), [t.split("|")[0] for t in sys.argv[3:]]
workloads = ["randwrite-4k-qd1", "randwrite-4k-qd32", "seqwrite-1m-qd8"]
def load(path):
    text = open(path).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    w = job["write"]
    clat = w["clat_ns"]
    c0, c1, t0, t1, hz = (float(x) for x in open(path[:-5] + ".cpu").read().split())
    cores = (c1 - c0) / hz / (t1 - t0)  # server processes, over fio's whole run (ramp included)
    return {"iops": w["iops"], "mbs": w["bw_bytes"] / 1e6, "mean": clat["mean"] / 1000.0,
            "p99": clat["percentile"].get("99.000000", 0) / 1000.0, "cores": cores,
            "per_op": cores / w["iops"] * 1e6 if w["iops"] else 0,
            "fio": (job["usr_cpu"] + job["sys_cpu"]) / 100.0}
best = {}
for t in targets:
    for wl in workloads:
        runs = [load(f"{work}/{t}.{wl}.{r}.json") for r in range(1, repeat + 1)]
        best[(t, wl)] = max(runs, key=lambda x: x["iops"])
base = targets[0]
# srv cores: CPU of the serving processes per wall second; us/op: that CPU per completed
# request (a cost measure that does not depend on how busy the machine was).
print(f"{'target':<20} {'workload':<18} {'IOPS':>9} {'MB/s':>8} {'mean us':>8} {'p99 us':>8} {'vs ' + base:>16} {'srv cores':>9} {'us/op':>8} {'fio cores':>9}")
for wl in workloads:
    for t in targets:
        b = best[(t, wl)]
        ratio = b["iops"] / best[(base, wl)]["iops"] if best[(base, wl)]["iops"] else 0
        print(f"{t:<20} {wl:<18} {b['iops']:>9.0f} {b['mbs']:>8.1f} {b['mean']:>8.1f} {b['p99']:>8.1f} {ratio:>15.2f}x {b['cores']:>9.2f} {b['per_op']:>8.1f} {b['fio']:>9.2f}")
print()
def goal(name, value, limit, at_least, unit="x"):
    ok = value >= limit if at_least else value <= limit
    rel = ">=" if at_least else "<="
    print(f"{'MET   ' if ok else 'MISSED'} {name}: {value:.2f}{unit} (goal {rel} {limit:g}{unit})")
n = lambda wl: best.get(("nbdkit-file", wl))
u = lambda wl: best.get(("hamgr-unreplicated", wl))
c = lambda wl: best.get(("hamgr-replicated-C", wl))
if n("randwrite-4k-qd1") and u("randwrite-4k-qd1"):
    goal("unreplicated 4k QD1 mean latency / nbdkit", u("randwrite-4k-qd1")["mean"] / n("randwrite-4k-qd1")["mean"], 1.2, False)
    for wl in ["randwrite-4k-qd32", "seqwrite-1m-qd8"]:
        goal(f"unreplicated {wl} IOPS / nbdkit", u(wl)["iops"] / n(wl)["iops"], 1.0, True)
if c("randwrite-4k-qd1"):
    goal("protocol C 4k QD1 mean latency - unreplicated", c("randwrite-4k-qd1")["mean"] - u("randwrite-4k-qd1")["mean"], 60, False, " us")
    for wl in ["randwrite-4k-qd32", "seqwrite-1m-qd8"]:
        goal(f"protocol C {wl} server CPU per write (both nodes) / unreplicated", c(wl)["per_op"] / u(wl)["per_op"], 2.5, False)
    goal("protocol C randwrite-4k-qd32 IOPS / unreplicated", c("randwrite-4k-qd32")["iops"] / u("randwrite-4k-qd32")["iops"], 0.5, True)
EOF
