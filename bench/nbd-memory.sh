#!/usr/bin/env bash
# NBD memory under load (issue 13): the serving process's peak RSS while
#   (a) a client pipelines 1 MiB writes for RUNTIME seconds and never reads a reply,
#   (b) the same with 1 MiB reads (its receive buffer fixed at 256 KiB, so that the replies
#       stay with the server rather than in the client's kernel),
#   (c) fio --ioengine=nbd randwrite, 1 MiB blocks, iodepth 32, for RUNTIME seconds,
# for `hamgr export` (release build) and nbdkit's file plugin side by side, each load against
# a freshly started server, backing files on tmpfs. Prints the budget hamgr runs with,
# RSS before the load, peak RSS during it (VmRSS sampled every 50 ms, and VmHWM), requests
# the client got onto the wire, and the load average.
#
#   bench/nbd-memory.sh                       # builds hamgr (release) into .build-release first
#   HAMGR_BIN=path/to/hamgr RUNTIME=20 bench/nbd-memory.sh
#   MAX_IN_FLIGHT_BYTES=16MiB bench/nbd-memory.sh   # hamgr export --max-in-flight-bytes
#   KEEP_WORK=1 bench/nbd-memory.sh           # keep the temp dir (servers' logs) afterwards
#   LOADS="write read" BENCH_UNREPLICATED=0 BENCH_REPLICATED=1 bench/nbd-memory.sh  # a subset
#   MAX_REQUESTS=1000 bench/nbd-memory.sh     # the non-reading client sends at most this many
#                                             # (bounds what a server without a budget can take)
#   BENCH_REPLICATED=1 bench/nbd-memory.sh    # also: the master of a two-node protocol C
#                                             # cluster (bench/lib.sh), same three loads
# BENCH_REPLICATED: the cluster is started once (its nodes' RSS before each load is shown).
#   REPL_PROTOCOL=A|B|C (default C): the cluster's replication protocol.
#   SLOW_BACKUP=1: during each load the backup process is stopped 400 ms out of every 500 ms
#   (SIGSTOP/SIGCONT): a backup that takes a fifth of what the master sends. Under protocol A
#   that is what made a master buffer without bound before the link's backpressure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1G}
SHM=${SHM:-/dev/shm}
HAMGR_BIN=${HAMGR_BIN:-}
MAX_IN_FLIGHT_BYTES=${MAX_IN_FLIGHT_BYTES:-}

for tool in fio nbdkit nbdinfo python3; do
    command -v "$tool" >/dev/null || { echo "nbd-memory: $tool is not installed" >&2; exit 2; }
done
if [ -z "$HAMGR_BIN" ]; then
    nice -n 15 swift build -c release --package-path "$ROOT" --scratch-path "$ROOT/.build-release" --product hamgr >&2
    HAMGR_BIN="$ROOT/.build-release/release/hamgr"
fi

WORK=$(mktemp -d "$SHM/nbd-memory.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then echo "nbd-memory: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_nbd() {
    for _ in $(seq 1 100); do
        timeout 5 nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nbd-memory: no NBD server at $1" >&2; return 1
}
kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# The non-reading client: a fixed-newstyle handshake (NBD_OPT_GO), then requests as fast as
# the socket takes them for SECONDS, never a reply read. Prints the requests fully sent.
cat >"$WORK/nonreader.py" <<'EOF'
import select, socket, struct, sys, time
host, port, name, mode, seconds, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
limit = int(sys.argv[7]) if len(sys.argv) > 7 and sys.argv[7] else None
block = 1 << 20
s = socket.socket()
if mode == "read":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
s.connect((host, port))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: sys.exit("server closed during the handshake")
        b += c
    return b
greeting = recv(18)
assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
while True:
    _, _, rtype, length = struct.unpack(">QIII", recv(20))
    recv(length)
    if rtype == 1: break
    if rtype & 0x80000000: sys.exit(f"NBD_OPT_GO refused: {rtype:#x}")
payload = bytes((i * 31) & 0xFF for i in range(block))
s.setblocking(False)
deadline = time.monotonic() + seconds
sent, cookie = 0, 0
while time.monotonic() < deadline and (limit is None or sent < limit):
    offset = (cookie * block) % (size - block + 1) // block * block
    kind = 1 if mode == "write" else 0
    wire = memoryview(struct.pack(">IHHQQI", 0x25609513, 0, kind, cookie, offset, block) + (payload if kind == 1 else b""))
    while wire and time.monotonic() < deadline:
        _, w, _ = select.select([], [s], [], max(0.0, min(0.2, deadline - time.monotonic())))
        if w:
            try:
                wire = wire[s.send(wire):]
            except BlockingIOError:
                pass
    if wire: break
    sent += 1
    cookie += 1
# Hold the connection, still reading nothing, until the end of the load.
time.sleep(max(0.0, deadline - time.monotonic()))
print(sent)
EOF

# run_load LABEL PID URI HOST PORT NAME LOAD → one result line in $WORK/results
run_load() {
    local label=$1 pid=$2 uri=$3 host=$4 port=$5 name=$6 load=$7 before peak=0 hwm=0 rss sent=- size_bytes note=
    size_bytes=$(nbdinfo --size "$uri")
    before=$(kb "$pid" VmRSS)
    case $load in
        write|read) python3 "$WORK/nonreader.py" "$host" "$port" "$name" "$load" "$RUNTIME" "$size_bytes" "${MAX_REQUESTS:-}" >"$WORK/sent" & ;;
        fio) fio --name=m --ioengine=nbd --uri="$uri" --rw=randwrite --bs=1M --iodepth=32 --size="$SIZE" \
                 --time_based --runtime="$RUNTIME" --output-format=terse >"$WORK/fio.out" 2>&1 & ;;
    esac
    local client=$!
    while kill -0 "$client" 2>/dev/null; do
        rss=$(kb "$pid" VmRSS); [ "${rss:-0}" -gt "$peak" ] && peak=$rss
        rss=$(kb "$pid" VmHWM); [ "${rss:-0}" -gt "$hwm" ] && hwm=$rss
        sleep 0.05
    done
    wait "$client" || { echo "nbd-memory: $load client failed against $label" >&2; cat "$WORK/fio.out" "$WORK/sent" 2>/dev/null >&2; exit 1; }
    [ "$load" = fio ] || sent=$(cat "$WORK/sent")
    # The client's close resets a connection with replies unread: note a server that dies of it.
    sleep 0.5
    kill -0 "$pid" 2>/dev/null || note="server-died-after-client-reset"
    echo "$label $load $((before / 1024)) $((peak / 1024)) $((hwm / 1024)) $sent $note" >>"$WORK/results"
}

read -r -a LOADS <<<"${LOADS:-write read fio}"
DESC_write="non-reading 1MiB writes"
DESC_read="non-reading 1MiB reads"
DESC_fio="fio randwrite 1MiB QD32"
BUDGET_ARGS=()
if [ -n "$MAX_IN_FLIGHT_BYTES" ]; then BUDGET_ARGS=(--max-in-flight-bytes "$MAX_IN_FLIGHT_BYTES"); fi

for load in "${LOADS[@]}"; do
    [ "${BENCH_UNREPLICATED:-1}" = 1 ] || break
    # hamgr export, fresh per load.
    port=$(free_port)
    rm -f "$WORK/hamgr.img"
    "$HAMGR_BIN" export --backing "$WORK/hamgr.img" --size "$SIZE" --listen "127.0.0.1:$port" --name bench \
        "${BUDGET_ARGS[@]}" >"$WORK/hamgr.log" 2>&1 &
    hp=$!; PIDS+=("$hp")
    wait_nbd "nbd://127.0.0.1:$port/bench"
    BUDGET_LINE=$(grep -o 'in flight per connection[^)]*' "$WORK/hamgr.log" | head -1 || true)
    run_load hamgr-export "$hp" "nbd://127.0.0.1:$port/bench" 127.0.0.1 "$port" bench "$load"
    kill "$hp" 2>/dev/null || true; wait "$hp" 2>/dev/null || true

    # nbdkit file plugin, fresh per load.
    port=$(free_port)
    rm -f "$WORK/nbdkit.img"; truncate -s "$SIZE" "$WORK/nbdkit.img"
    nbdkit -f -i 127.0.0.1 -p "$port" file "$WORK/nbdkit.img" 2>"$WORK/nbdkit.log" &
    np=$!; PIDS+=("$np")
    wait_nbd "nbd://127.0.0.1:$port/"
    run_load nbdkit-file "$np" "nbd://127.0.0.1:$port/" 127.0.0.1 "$port" "" "$load"
    kill "$np" 2>/dev/null || true; wait "$np" 2>/dev/null || true
done

if [ "${BENCH_REPLICATED:-0}" = 1 ]; then
    # shellcheck source=bench/lib.sh
    . "$ROOT/bench/lib.sh"
    HACTL_BIN=${HACTL_BIN:-$ROOT/.build-release/release/hactl}
    vol=${SIZE/%G/GiB}; vol=${vol/%M/MiB}
    cluster_init "$WORK/repl" bench-mem "${REPL_PROTOCOL:-C}" "$vol"
    if [ -n "$MAX_IN_FLIGHT_BYTES" ]; then printf '\n[export]\nmax_in_flight_bytes = "%s"\n' "$MAX_IN_FLIGHT_BYTES" >>"$CLUSTER_CONF"; fi
    cluster_start w; cluster_start a; cluster_start b
    PIDS+=("${CPID[a]}" "${CPID[b]}" "${CPID[w]}")
    m=$(wait_master_in_sync 180) || { echo "nbd-memory: replicated cluster not in sync within 180 s" >&2; exit 1; }
    svc=SERVICE_$m; addr=${!svc}
    wait_nbd "nbd://$addr/bench-mem"
    if [ "$m" = a ]; then backup=b; else backup=a; fi
    label="replicated-${REPL_PROTOCOL:-C}-master-$m"
    [ "${SLOW_BACKUP:-0}" = 1 ] && label="$label-slowbk"
    for load in "${LOADS[@]}"; do
        cycler=""
        if [ "${SLOW_BACKUP:-0}" = 1 ]; then
            bpid=${CPID[$backup]}
            ( for _ in $(seq 1 $((RUNTIME * 2 + 40))); do kill -STOP "$bpid" 2>/dev/null || exit 0; sleep 0.4; kill -CONT "$bpid" 2>/dev/null || exit 0; sleep 0.1; done ) &
            cycler=$!
        fi
        run_load "$label" "${CPID[$m]}" "nbd://$addr/bench-mem" "${addr%:*}" "${addr##*:}" bench-mem "$load"
        if [ -n "$cycler" ]; then kill "$cycler" 2>/dev/null || true; wait "$cycler" 2>/dev/null || true; kill -CONT "${CPID[$backup]}" 2>/dev/null || true; fi
    done
fi

echo "nbd-memory: RUNTIME=${RUNTIME}s SIZE=$SIZE, hamgr export: ${BUDGET_LINE:-?}; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-22s %-28s %10s %10s %10s %10s\n' target load "RSS MiB" "peak MiB" "HWM MiB" requests
while read -r label load before peak hwm sent note; do
    dvar=DESC_$load
    printf '%-22s %-28s %10s %10s %10s %10s %s\n' "$label" "${!dvar}" "$before" "$peak" "$hwm" "$sent" "$note"
done <"$WORK/results"
echo "(RSS MiB: before the load; peak MiB: highest VmRSS sampled during it; HWM MiB: VmHWM (peak since the process started), last seen while the client ran; requests: fully sent by the non-reading client)"
