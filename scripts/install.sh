#!/usr/bin/env bash
# Installs everything Corral needs on Debian 12 (bookworm) or a derivative: system packages (runsc from
# bookworm-backports, nftables, debootstrap, xfsprogs, iproute2) and a virtualenv at .venv with Corral in it.
# Idempotent: safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh must run as root (runsc, network namespaces and mounts need it): sudo $0" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
backports=/etc/apt/sources.list.d/corral-backports.sources
if ! apt-cache policy 2>/dev/null | grep -q "${codename}-backports"; then
  mirror=$(grep -hoE 'https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  cat > "$backports" <<SRC
Types: deb
URIs: ${mirror%/}
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

packages="nftables debootstrap iproute2 xfsprogs python3-venv python3-pip ca-certificates util-linux"
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
command -v runsc >/dev/null 2>&1 || missing="$missing runsc"
# node + npm: the JS SDK tests, and template builds install npm packages (Node.js 24 for `base`, Deno's
# kernel) with them.
command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
if [ -n "$missing" ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $(echo "$missing" | sed 's/ runsc//')
  if echo "$missing" | grep -qw runsc; then
    apt-get install -y -q --no-install-recommends -t "${codename}-backports" runsc
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "corral installed: $(.venv/bin/corral --version)"
