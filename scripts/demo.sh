#!/usr/bin/env bash
# The README's first command: a local 3-node cluster (master, backup, arbitrator on
# loopback) with a failover shown. Installs what it needs, builds, runs `hactl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build --product hamgr >/dev/null
swift build --product hactl >/dev/null
HAMGR_BIN="$PWD/.build/debug/hamgr" exec .build/debug/hactl demo "$@"
