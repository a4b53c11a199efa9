#!/usr/bin/env bash
# Planned switchover write downtime: bench/switchover.sh [N=20]
# N times: hactl drill --mode switchover --json (the drill keeps writing 4 KiB blocks through
# NBD while it asks the master to hand over; rto_ms = the longest gap between acknowledged
# writes). Direction alternates (a→b, b→a, …). Target: < 1 s, 0 lost writes.
MODE=switchover exec "$(dirname "$0")/drill-loop.sh" "${1:-20}"
