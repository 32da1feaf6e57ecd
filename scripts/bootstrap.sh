#!/bin/bash
# Everything a fresh Debian 12 machine needs for the demo and the tests:
# system packages (as root, or through sudo), then the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# libssl3 and libuuid1: the Azure Speech SDK (the [azure] extra) loads them at run time
PKGS=(make python3 python3-venv python3-dev gcc espeak-ng pocketsphinx-testdata sox
      prosody lua5.4 lua-busted lua-check ca-certificates openssl prometheus
      ruby-hocon nodejs libssl3 libuuid1
      chromium chromium-driver)  # the transcript page is tested in a real browser
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # prosody's package starts a system instance; the tests run their own
  $SUDO systemctl disable --now prosody >/dev/null 2>&1 || $SUDO service prosody stop >/dev/null 2>&1 || true
  # likewise prometheus (the tests start their own, on loopback)
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || $SUDO service prometheus stop >/dev/null 2>&1 || true
fi
make install
