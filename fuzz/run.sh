#!/usr/bin/env bash
# Build and run one libFuzzer target of this package.
#   fuzz/run.sh NBDDecoderFuzz 10000000
#   fuzz/run.sh FrameFuzz 10000000 -jobs=2
# New inputs go to fuzz/.build/corpus/TARGET (ignored); the committed seeds in
# fuzz/corpus/TARGET are read too. Crashes land in fuzz/artifacts/TARGET/ (ignored):
# replay one with `fuzz/.build/release/TARGET fuzz/artifacts/TARGET/crash-…`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TARGET=${1:?usage: fuzz/run.sh NBDDecoderFuzz|FrameFuzz [RUNS] [libFuzzer flags...]}
RUNS=${2:-10000000}
shift; [ $# -gt 0 ] && shift
if [ -z "${FUZZ_SKIP_BUILD:-}" ]; then
    swift build -c release --package-path "$HERE" --scratch-path "$HERE/.build" \
        -Xswiftc -sanitize=fuzzer,address --product "$TARGET" >&2
fi
mkdir -p "$HERE/artifacts/$TARGET" "$HERE/.build/corpus/$TARGET"
exec "$HERE/.build/release/$TARGET" -runs="$RUNS" -artifact_prefix="$HERE/artifacts/$TARGET/" \
    -print_final_stats=1 "$@" "$HERE/.build/corpus/$TARGET" "$HERE/corpus/$TARGET"
