#!/usr/bin/env bash
# Crash-failover RTO: bench/rto.sh [KILLS=20]
# A loopback cluster (a, b, arbitrator; protocol C; default timeouts 200/1200/800 ms);
# KILLS times: hactl drill --mode crash --kill-command "kill -9 <master pid>" --json, restart
# the killed node, wait until inSync. Prints each RTO, median/p90/p99/max, lost acknowledged
# writes, and the comparison with the targets (median <= 1.5 s, p99 <= 2.5 s).
# Env: HAMGR_BIN, HACTL_BIN (default .build-release/release/{hamgr,hactl}), SHM (backing dir).
MODE=crash exec "$(dirname "$0")/drill-loop.sh" "${1:-20}"
