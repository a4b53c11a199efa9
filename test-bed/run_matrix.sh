#!/bin/sh
# CI matrix: every fault kind at least once, against the real daemon, bounded to
# 10 minutes in total. Exits non-zero on any violation (or setup failure) and
# prints "N passed, M failed".
#   HAMGR_BIN=.build/debug/hamgr test-bed/run_matrix.sh
#   test-bed/run_matrix.sh --standin      (plumbing only, NOT a hamgr result)
set -u
cd "$(dirname "$0")"
PY=/usr/bin/python3
EXTRA="${1:-}"
OUT="${BED_OUT:-/tmp/hamgr-bed/matrix-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BED_MATRIX_BUDGET:-600}
pass=0; fail=0
# seed:kinds — each kind alone on a fresh cluster (a failure names its fault),
# then every kind mixed in one seeded round.
for round in \
  "101:isolate" "102:cut-ab" "103:one-way" "104:loss" "105:delay" "106:slow" \
  "107:kill" "108:pause" "109:freeze" "110:disk-full" "111:disk-eio" "112:switchover" "113:cut-kill" \
  "120:isolate,cut-ab,one-way,loss,delay,slow,kill,pause,freeze,disk-full,disk-eio,switchover,cut-kill"; do
  seed=${round%%:*}; kinds=${round#*:}
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 60 ]; then
    echo "matrix: time budget exhausted before seed $seed"; fail=$((fail + 1)); continue
  fi
  echo "== seed $seed kinds $kinds (budget left ${left}s)"
  timeout -k 10 "$left" $PY run.py --seed "$seed" --kinds "$kinds" --out "$OUT/seed$seed" $EXTRA \
    >"$OUT/seed$seed.out" 2>"$OUT/seed$seed.err"
  rc=$?
  grep -E "^(checker|VIOLATION|seed=)" "$OUT/seed$seed.out"
  grep "^SUMMARY " "$OUT/seed$seed.out" >>"$OUT/summary.jsonl"
  if [ $rc -eq 0 ]; then pass=$((pass + 1)); else
    fail=$((fail + 1)); echo "   round failed rc=$rc (log: $OUT/seed$seed.err)"; tail -3 "$OUT/seed$seed.err"
  fi
done
$PY netns.py cleanup-stale >/dev/null 2>&1
touch "$OUT/summary.jsonl"; $PY report.py "$OUT/summary.jsonl" >"$OUT/report.txt"; cat "$OUT/report.txt"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
