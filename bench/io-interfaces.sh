#!/usr/bin/env bash
# Which Linux I/O interface for the data path? Measured before adopting any of them
# (docs/benchmarks.md "I/O interfaces"): one 4 KiB random write at a time on a file,
# through fio's engines — psync (pwrite, what hamgr uses), pvsync2 (pwritev2) and io_uring
# (liburing's interface, one request in flight) — and, for FUA, pwrite + fdatasync against
# one pwritev2(RWF_DSYNC), on tmpfs and on the root file system's disk.
#
#   bench/io-interfaces.sh                 # RUNTIME=5 s per case
#   DIRS="/dev/shm /var/tmp" bench/io-interfaces.sh
#
# Prints mean completion latency (µs) and IOPS per engine and directory.
set -euo pipefail
RUNTIME=${RUNTIME:-5}
DIRS=${DIRS:-/dev/shm /var/tmp}
for tool in fio python3; do command -v "$tool" >/dev/null || { echo "io-interfaces: $tool is not installed" >&2; exit 2; }; done
FILES=()
cleanup() { rm -f "${FILES[@]}"; }
trap cleanup EXIT INT TERM

printf '%-10s %-34s %10s %10s\n' dir case "mean us" IOPS
for d in $DIRS; do
    f=$(mktemp "$d/io-interfaces.XXXXXX"); FILES+=("$f")
    truncate -s 256M "$f"
    for engine in psync pvsync2 io_uring; do
        out=$(fio --name=w --filename="$f" --size=256M --rw=randwrite --bs=4k --iodepth=1 --ioengine="$engine" \
                  --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null)
        python3 - "$d" "$engine (no sync)" "$out" <<'PY'
import json, sys
d, case, text = sys.argv[1], sys.argv[2], sys.argv[3]
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
print(f"{d:<10} {case:<34} {w['clat_ns']['mean'] / 1000:>10.1f} {w['iops']:>10.0f}")
PY
    done
    # FUA: two system calls against one.
    python3 - "$d" "$f" "$RUNTIME" <<'PY'
import os, random, sys, time
d, path, runtime = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_RDWR)
buf = os.urandom(4096)
blocks = (256 << 20) // 4096
for name, op in [("pwrite + fdatasync", lambda off: (os.pwrite(fd, buf, off), os.fdatasync(fd))),
                 ("pwritev2(RWF_DSYNC)", lambda off: os.pwritev(fd, [buf], off, os.RWF_DSYNC))]:
    n, start = 0, time.monotonic()
    while time.monotonic() - start < runtime / 2 and n < 200_000:
        op(random.randrange(blocks) * 4096)
        n += 1
    secs = time.monotonic() - start
    print(f"{d:<10} {'FUA: ' + name:<34} {secs / n * 1e6:>10.1f} {n / secs:>10.0f}")
os.close(fd)
PY
done
