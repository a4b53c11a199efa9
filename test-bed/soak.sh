#!/bin/sh
# Soak: ROUNDS seeded rounds (seeds SEED, SEED+1, ...), every fault kind in each
# round in a seeded order; prints a table (faults by kind, writes acknowledged,
# writes lost, dual-master intervals, convergence after heal median/max).
#   test-bed/soak.sh ROUNDS [SEED]
#   test-bed/soak.sh --planted-bug [ROUNDS] [SEED]
#       runs against HAMGR_BIN_PLANTED with HAMGR_PLANTED_BUG=skip-lease-wait and
#       succeeds only if the checker reports a violation (issue 5 acceptance 3).
#   add --standin as last argument for plumbing runs (NOT hamgr).
set -u
cd "$(dirname "$0")"
PY=/usr/bin/python3
MODE=soak
if [ "${1:-}" = "--planted-bug" ]; then MODE=planted; shift; fi
ROUNDS=${1:-3}; SEED=${2:-$(( $(date +%s) % 100000 ))}
EXTRA="${3:-}"
case "$ROUNDS" in ''|*[!0-9]*) echo "usage: soak.sh [--planted-bug] ROUNDS [SEED]"; exit 2;; esac
[ "$ROUNDS" -le 1000 ] || { echo "at most 1000 rounds"; exit 2; }
OUT="${BED_OUT:-/tmp/hamgr-bed/soak-$MODE-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
if [ $MODE = planted ]; then
  # Faults that end a master's lease while clients can still reach it.
  KINDS=${BED_KINDS:-isolate,pause,freeze,one-way,isolate,pause}
  ARGS="--planted --target master --kinds $KINDS"
else
  KINDS=${BED_KINDS:-isolate,cut-ab,one-way,loss,delay,slow,kill,pause,freeze,disk-full,disk-eio,switchover,cut-kill}
  ARGS="--kinds $KINDS"
fi
i=0
while [ $i -lt "$ROUNDS" ]; do
  seed=$((SEED + i))
  echo "== round $((i + 1))/$ROUNDS seed $seed"
  timeout -k 10 900 $PY run.py --seed "$seed" $ARGS --out "$OUT/seed$seed" $EXTRA \
    >"$OUT/seed$seed.out" 2>"$OUT/seed$seed.err"
  rc=$?
  grep -E "^(checker|VIOLATION|seed=)" "$OUT/seed$seed.out"
  [ $rc -eq 3 ] && { echo "   setup failed (log: $OUT/seed$seed.err)"; tail -3 "$OUT/seed$seed.err"; }
  grep "^SUMMARY " "$OUT/seed$seed.out" >>"$OUT/summary.jsonl"
  i=$((i + 1))
done
$PY netns.py cleanup-stale >/dev/null 2>&1
touch "$OUT/summary.jsonl"
if [ $MODE = planted ]; then
  $PY report.py --expect-violation "$OUT/summary.jsonl"; rc=$?
  if [ $rc -eq 0 ]; then echo "planted bug DETECTED (checker reported a violation)"; else
    echo "planted bug NOT detected"; fi
  exit $rc
fi
$PY report.py "$OUT/summary.jsonl"
