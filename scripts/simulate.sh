#!/usr/bin/env bash
# The whole-node simulator (docs/reliability.md "Whole-node simulator").
#   scripts/simulate.sh [--seeds N] [--start K]      run seeds K..K+N-1 (default 1..1000)
#   scripts/simulate.sh --seed S [--plant BUG]        replay one seed with its trace
#   scripts/simulate.sh --link-drop MS [--seeds N]    scripted: the link reset under a write and a
#                                                     flush, down MS ms (no random faults)
#   scripts/simulate.sh --plant BUG [--seeds N]       prove BUG is caught: exits 0 and prints
#                                                     "caught at seed S" when it is, 1 when not
# Builds hamgr-sim in release first. The last line is always "N seeds, V violations";
# without --plant the exit status is nonzero when V > 0.
set -uo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds|--seed|--plant|--start|--link-drop) [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }; args+=("$1" "$2"); shift 2 ;;
    --rollback|--quiet) args+=("$1"); shift ;;
    *) echo "usage: scripts/simulate.sh [--seeds N] [--start K] [--seed S] [--plant BUG] [--link-drop MS] [--rollback] [--quiet]" >&2; exit 2 ;;
  esac
done
swift build -c release --product hamgr-sim >/tmp/hamgr-sim-build.log 2>&1 || { tail -30 /tmp/hamgr-sim-build.log; echo "build of hamgr-sim failed" >&2; exit 2; }
# Deterministic hashing: replays do not depend on the process's hash seed.
export SWIFT_DETERMINISTIC_HASHING=1
exec .build/release/hamgr-sim "${args[@]}"
