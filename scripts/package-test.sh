#!/usr/bin/env bash
# Builds the Debian package and tests it on this machine (root): install with dpkg -i,
# no Swift library in ldd, --version runs, man pages open, the installed units verify,
# then remove it and check nothing of it is left. Called by scripts/test.sh as root.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "package-test: needs root (dpkg -i)"; exit 2; }
if dpkg-query -W -f='${Status}' hamgr 2>/dev/null | grep -q "install ok installed"; then
    echo "package-test: a hamgr package is already installed here; not touching it" >&2; exit 2
fi
fail=0
check() { if "$@"; then echo "ok   $*"; else echo "FAIL $*"; fail=1; fi; }

DEB=$(bash scripts/package.sh) || { echo "package-test: the package did not build" >&2; exit 1; }
echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
WORK=$(mktemp -d /tmp/hamgr-package-test.XXXXXX)
cleanup() { dpkg -r hamgr >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

check dpkg -i "$DEB"
for tool in hamgr hactl; do
    check test -x "/usr/bin/$tool"
    ldd "/usr/bin/$tool" >"$WORK/ldd.$tool" 2>&1
    check test -z "$(grep -iE 'swift|Foundation|dispatch|not found' "$WORK/ldd.$tool")"
    "/usr/bin/$tool" --version >"$WORK/version.$tool" 2>&1
    check grep -qx "$(sed -n 's/^public let hamgrVersion = "\(.*\)"$/\1/p' Sources/HACore/Vocabulary.swift)" "$WORK/version.$tool"
    check test -s "/usr/share/bash-completion/completions/$tool"
done
sed 's/^/    ldd hamgr: /' "$WORK/ldd.hamgr"
for page in /usr/share/man/man1/hamgr.1.gz /usr/share/man/man1/hactl.1.gz; do
    check test -f "$page"
    MANWIDTH=80 man -l "$page" >"$WORK/man.txt" 2>/dev/null
    check grep -q "hamgr\|hactl" "$WORK/man.txt"
done
ls /usr/share/man/man1/ | grep -E '^(hamgr|hactl)' | sed 's/^/    man page: /'
# Template units need an instance name to verify.
cp /lib/systemd/system/hamgr@.service "$WORK/hamgr@web1.service"
cp /lib/systemd/system/hamgr-arbitrator@.service "$WORK/hamgr-arbitrator@main.service"
check systemd-analyze verify "$WORK/hamgr@web1.service" "$WORK/hamgr-arbitrator@main.service"
check test -f /usr/share/doc/hamgr/docs/operator-guide.md

check dpkg -r hamgr
check test ! -e /usr/bin/hamgr
check test ! -e /lib/systemd/system/hamgr@.service
check test -z "$(dpkg-query -W -f='${Status}' hamgr 2>/dev/null | grep 'install ok installed')"
[ $fail -eq 0 ] && echo "package-test: all checks passed" || echo "package-test: FAILED"
exit $fail
