#!/usr/bin/env bash
# Cost of replication per write: one fio job against a fresh loopback cluster (protocol C,
# backing on tmpfs), with each node's CPU and context switches over the job, and optionally
# a perf profile of both nodes.
#
#   bench/repl-profile.sh 4k            # 4 KiB random writes, iodepth 32
#   bench/repl-profile.sh 1m            # 1 MiB sequential writes, iodepth 8
#   PERF=1 bench/repl-profile.sh 4k     # + perf record of master and backup (6 s, mid-run)
#                                       #   into $OUT/master.data, $OUT/backup.data
# Env: HAMGR_BIN/HACTL_BIN (default .build-release/release/*), RUNTIME (12 s), OUT (/tmp).
# Prints IOPS, MB/s, p99, CPU per node in cores and µs per write, voluntary context switches.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
bench_require fio curl python3
WL=${1:-4k}; RUNTIME=${RUNTIME:-12}; OUT=${OUT:-/tmp}
case $WL in
    4k) args="--rw=randwrite --bs=4k --iodepth=32" ;;
    1m) args="--rw=write --bs=1M --iodepth=8" ;;
    *) echo "usage: $0 4k|1m" >&2; exit 2 ;;
esac
WORK=$(mktemp -d "${SHM:-/dev/shm}/hamgr-repl-profile.XXXXXX")
PERF_PIDS=()
cleanup() {
    for p in "${PERF_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    cluster_stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cluster_init "$WORK/c" profile C 1GiB
cluster_start w; cluster_start a; cluster_start b
m=$(wait_master_in_sync 60) || { echo "repl-profile: no master in sync within 60 s" >&2; exit 1; }
o=b; [ "$m" = b ] && o=a
svc=SERVICE_$m
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
csw() { cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt_switches/{s+=$2} END{print s}'; }
if [ "${PERF:-0}" = 1 ]; then
    command -v perf >/dev/null || { echo "repl-profile: perf is not installed" >&2; exit 2; }
    (sleep 4; timeout 20 perf record -F 999 -g -o "$OUT/master.data" -p "${CPID[$m]}" -- sleep 6 >/dev/null 2>&1) & PERF_PIDS+=($!)
    (sleep 4; timeout 20 perf record -F 999 -g -o "$OUT/backup.data" -p "${CPID[$o]}" -- sleep 6 >/dev/null 2>&1) & PERF_PIDS+=($!)
fi
m0=$(cpu "${CPID[$m]}"); b0=$(cpu "${CPID[$o]}"); ms0=$(csw "${CPID[$m]}"); bs0=$(csw "${CPID[$o]}"); t0=$(date +%s.%N)
# shellcheck disable=SC2086
timeout $((RUNTIME + 60)) fio --name=profile --ioengine=nbd --uri="nbd://${!svc}/profile" $args --size=1G \
    --time_based --runtime="$RUNTIME" --ramp_time=2 --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
    { echo "repl-profile: fio failed:" >&2; cat "$WORK/fio.err" >&2; exit 1; }
m1=$(cpu "${CPID[$m]}"); b1=$(cpu "${CPID[$o]}"); ms1=$(csw "${CPID[$m]}"); bs1=$(csw "${CPID[$o]}"); t1=$(date +%s.%N)
for p in "${PERF_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PERF_PIDS=()
python3 - "$WORK/fio.json" "$m0" "$m1" "$b0" "$b1" "$t0" "$t1" "$ms0" "$ms1" "$bs0" "$bs1" "$(getconf CLK_TCK)" "$WL" <<'PY'
import json, sys
f, m0, m1, b0, b1, t0, t1, ms0, ms1, bs0, bs1, hz, wl = sys.argv[1:]
t = open(f).read(); job = json.loads(t[t.index("{"):])["jobs"][0]; w = job["write"]
wall = float(t1) - float(t0); hz = float(hz); iops = w["iops"]
mc = (float(m1) - float(m0)) / hz / wall; bc = (float(b1) - float(b0)) / hz / wall
per = lambda c: c / iops * 1e6 if iops else 0
print(f"{wl}: IOPS {iops:.0f}  MB/s {w['bw_bytes']/1e6:.1f}  p99 {w['clat_ns']['percentile']['99.000000']/1000:.0f} us")
print(f"master {mc:.2f} cores = {per(mc):.1f} us/write; backup {bc:.2f} cores = {per(bc):.1f} us/write; fio {(job['usr_cpu']+job['sys_cpu'])/100:.2f} cores")
ops = iops * wall
print(f"voluntary context switches per write: master {(int(ms1)-int(ms0))/ops:.2f}, backup {(int(bs1)-int(bs0))/ops:.2f}")
PY
if [ "${PERF:-0}" = 1 ]; then echo "perf: perf report -i $OUT/master.data --no-children --sort symbol (and backup.data)"; fi
