#!/usr/bin/env bash
# The README's second command, and exactly what CI runs (.ci/run): installs what the tests
# need, builds (with the explicit import check), checks module purity, runs the whole suite
# (unit, simulator, real-client and process tests), then (root only) the Debian package's
# install test and the fault-injection test bed's self-test and short matrix.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh || exit 1
fail=0
# Executables first: the process-level tests spawn them, and --build-tests alone does not relink them.
# The import check refuses a file that imports a module its target does not declare, so the
# dependency lists in Package.swift (which scripts/check-purity.sh reads) are the real ones.
importCheck=(--explicit-target-dependency-import-check error)
swift build "${importCheck[@]}" && swift build --build-tests "${importCheck[@]}" || exit 1
# Module rule (docs/architecture.md, "Modules"): prove the checker can fail, then check.
bash scripts/check-purity.sh --self-test || fail=1
bash scripts/check-purity.sh || fail=1
swift test --skip-build 2>&1 | tee /tmp/hamgr-swift-test.log
[ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
# Whole-node simulator: 10,000 seeds (about 1.5 min in release on one core), then each
# planted bug must be caught (docs/reliability.md "Whole-node simulator").
bash scripts/simulate.sh --seeds 10000 --quiet || fail=1
for bug in skipLeaseWait skipOutdate votesNotPersisted noDriftMargin leaseAnchoredAtReply gateOpenOnNewerEpoch \
           freshMetadataTrusted resyncOverNewerWrite; do
  bash scripts/simulate.sh --plant "$bug" --seeds 500 --quiet || fail=1
done
# The Debian package: built with a static Swift runtime, installed, checked, removed (root).
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/package-test.sh || fail=1
else
  echo "package-test: skipped (needs root for dpkg -i)"
fi
if [ "$(id -u)" -eq 0 ] && [ -x test-bed/run_matrix.sh ]; then
  export HAMGR_BIN="$PWD/.build/debug/hamgr" HACTL_BIN="$PWD/.build/debug/hactl"
  bash test-bed/selftest.sh || fail=1
  bash test-bed/run_matrix.sh || fail=1
else
  echo "test-bed: skipped (needs root for network namespaces)"
fi
exit $fail
