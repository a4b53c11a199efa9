#!/bin/sh
# Self-tests of the test bed (no hamgr needed): namespaces, partitions, loss, delay
# relay, tbf, process and storage faults, teardown/cleanup, checker on hand-made
# histories, and (if nbdkit is installed) the workload plumbing against a stand-in.
# Prints "N passed, M failed"; exits non-zero on any failure.
set -u
cd "$(dirname "$0")"
exec timeout 900 /usr/bin/python3 selftest.py "$@"
