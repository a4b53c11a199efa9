#!/usr/bin/env bash
# Builds the Debian package: scripts/package.sh [OUT_DIR]  →  OUT_DIR/hamgr_VERSION_ARCH.deb
#
# Release build with the Swift standard library and Foundation linked statically, so the
# binaries need only libc, libstdc++ and libsystemd on the target host. The package holds:
#   /usr/bin/hamgr, /usr/bin/hactl
#   /lib/systemd/system/hamgr@.service, hamgr-arbitrator@.service  (paths: /usr/bin)
#   /usr/lib/sysusers.d/hamgr.conf, /usr/lib/tmpfiles.d/hamgr.conf
#   /usr/share/man/man1/*.1.gz       (swift-argument-parser's generate-manual tool)
#   /usr/share/bash-completion/completions/{hamgr,hactl}, zsh and fish completions
#   /usr/share/doc/hamgr/            (README, docs/, examples: unit env files, a config)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.build-package}
SCRATCH=${SCRATCH:-$ROOT/.build-static}
cd "$ROOT"

for tool in dpkg-deb gzip; do
    command -v "$tool" >/dev/null || { echo "package: $tool is not installed" >&2; exit 2; }
done

VERSION=$(sed -n 's/^public let hamgrVersion = "\(.*\)"$/\1/p' Sources/HACore/Vocabulary.swift)
[ -n "$VERSION" ] || { echo "package: cannot read hamgrVersion from Sources/HACore/Vocabulary.swift" >&2; exit 1; }
ARCH=$(dpkg --print-architecture)

echo "package: release build with a static Swift runtime ($SCRATCH)" >&2
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product hamgr >&2
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product hactl >&2
# swift-argument-parser's man page generator (the tool its generate-manual plugin runs).
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product generate-manual >&2
BIN=$SCRATCH/release

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/hamgr-package.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
P=$STAGE/hamgr_${VERSION}_${ARCH}
install -d "$P/DEBIAN" "$P/usr/bin" "$P/lib/systemd/system" "$P/usr/lib/sysusers.d" "$P/usr/lib/tmpfiles.d" \
    "$P/usr/share/man/man1" "$P/usr/share/bash-completion/completions" "$P/usr/share/zsh/vendor-completions" \
    "$P/usr/share/fish/vendor_completions.d" "$P/usr/share/doc/hamgr/docs" "$P/usr/share/doc/hamgr/examples"

install -m 0755 -s "$BIN/hamgr" "$BIN/hactl" "$P/usr/bin/"

for unit in hamgr@.service hamgr-arbitrator@.service; do
    sed 's#/usr/local/bin/#/usr/bin/#g; s#^Documentation=.*#Documentation=man:hamgr(1) file:///usr/share/doc/hamgr/docs/operator-guide.md#' \
        "contrib/systemd/$unit" >"$P/lib/systemd/system/$unit"
    chmod 0644 "$P/lib/systemd/system/$unit"
done
cat >"$P/usr/lib/sysusers.d/hamgr.conf" <<'EOF'
# The arbitrator runs as hamgr (hamgr-arbitrator@.service); data nodes run as root (their
# resource agents mount filesystems and start services).
u hamgr - "hamgr arbitrator" /var/lib/hamgr
EOF
cat >"$P/usr/lib/tmpfiles.d/hamgr.conf" <<'EOF'
d /etc/hamgr 0750 root hamgr -
d /var/lib/hamgr 0700 root root -
d /var/lib/hamgr/arbitrator 0700 hamgr hamgr -
d /run/hamgr 0750 root hamgr -
EOF

# Man pages and completions come from the binaries' own argument parsers.
MAN=$STAGE/man
mkdir -p "$MAN"
for tool in hamgr hactl; do
    "$P/usr/bin/$tool" --generate-completion-script bash >"$P/usr/share/bash-completion/completions/$tool"
    "$P/usr/bin/$tool" --generate-completion-script zsh >"$P/usr/share/zsh/vendor-completions/_$tool"
    "$P/usr/bin/$tool" --generate-completion-script fish >"$P/usr/share/fish/vendor_completions.d/$tool.fish"
done
for tool in hamgr hactl; do
    "$BIN/generate-manual" "$P/usr/bin/$tool" --multi-page --section 1 --authors "hamgr developers" \
        --output-directory "$MAN" >&2
done
find "$MAN" -name '*.1' -exec install -m 0644 {} "$P/usr/share/man/man1/" \;
gzip -9n "$P"/usr/share/man/man1/*.1
[ -n "$(ls "$P/usr/share/man/man1")" ] || { echo "package: no man pages were generated" >&2; exit 1; }

install -m 0644 README.md "$P/usr/share/doc/hamgr/"
install -m 0644 docs/*.md "$P/usr/share/doc/hamgr/docs/"
install -m 0644 contrib/systemd/*.env.example "$P/usr/share/doc/hamgr/examples/"

INSTALLED_KB=$(du -sk "$P" | cut -f1)
cat >"$P/DEBIAN/control" <<EOF
Package: hamgr
Version: $VERSION
Architecture: $ARCH
Maintainer: hamgr developers <hamgr@localhost>
Installed-Size: $INSTALLED_KB
Depends: libc6, libstdc++6, libgcc-s1, libsystemd0
Recommends: resource-agents, openssl
Section: admin
Priority: optional
Description: high-availability cluster manager for replicated block storage
 hamgr runs a master and a backup in two data centres and an arbitrator at a third
 site: quorum with split brain prohibited, block-level replication (protocols A/B/C)
 with resync of changed blocks only, automatic failover to an up-to-date backup, and
 an NBD export on each node's own address. hactl is the operator tool.
EOF
cat >"$P/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemd-sysusers hamgr.conf >/dev/null 2>&1 || true
    systemd-tmpfiles --create hamgr.conf >/dev/null 2>&1 || true
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
cat >"$P/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
exit 0
EOF
chmod 0755 "$P/DEBIAN/postinst" "$P/DEBIAN/postrm"

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz --build "$P" "$OUT/hamgr_${VERSION}_${ARCH}.deb" >&2
echo "$OUT/hamgr_${VERSION}_${ARCH}.deb"
