#!/usr/bin/env bash
# Installs the Debian packages hamgr's build, demo and tests need (idempotent).
# Called by scripts/demo.sh and scripts/test.sh; safe to run by hand.
set -euo pipefail
# chromium: headless, it loads and screenshots the arbitrator's status page (ArbitratorPageProcessTests).
# kmod: modprobe, which the OCF Filesystem agent requires.
PKGS=(libsystemd-dev libnbd-bin qemu-utils nbdkit fio prometheus resource-agents
      python3-libnbd iproute2 nftables iputils-ping faketime fuse3 e2fsprogs curl util-linux procps openssl
      chromium kmod)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "deps: swift 6.x must be on PATH (https://www.swift.org/install/linux/)" >&2; exit 1; }
