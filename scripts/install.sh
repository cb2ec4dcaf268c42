#!/usr/bin/env bash
# Installs everything Corral needs on Debian 12 (bookworm) or a derivative: system packages (runsc from
# bookworm-backports, nftables, debootstrap, xfsprogs, iproute2) and a virtualenv at .venv with Corral in it.
# Idempotent: safe to run again; it only adds what is missing. On any failure it names the step that failed.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

step="starting"
# Only the script's own shell reports: a failure inside $(...) ends that subshell quietly and is then
# reported once, by the assignment that used it.
trap 'rc=$?; [ "$BASHPID" = "$$" ] && echo "install.sh: failed while ${step} (exit ${rc}); see the output above" >&2;
      exit $rc' ERR
say() { step=$1; echo "==> $1"; }
source scripts/lib/apt-mirror.sh
source scripts/lib/nss-localhost.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh must run as root (runsc, network namespaces and mounts need it): sudo $0" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT_DIR=${CORRAL_APT_DIR:-/etc/apt}
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
backports=$APT_DIR/sources.list.d/corral-backports.sources
if ! { apt-cache policy 2>/dev/null || true; } | grep -q "${codename}-backports" && [ ! -f "$backports" ]; then
  say "adding ${codename}-backports to apt's sources (for runsc)"
  mirror=$(debian_mirror "$APT_DIR")
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "    mirror: $mirror"
  cat > "$backports" <<SRC
Types: deb
URIs: ${mirror}
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

say "checking system packages"
# skopeo and umoci: templates from OCI images in registries (src/corral/templates/images.py).
packages="nftables debootstrap iproute2 xfsprogs python3-venv python3-pip ca-certificates util-linux
          libnss-myhostname skopeo umoci"
# The test suite's own OCI registry (tests/helpers/registry.py); scripts/test.sh asks for it. Not by
# default: Debian's docker-registry package enables a registry service on port 5000 when installed.
# chromium: a headless browser on the host opens a desktop sandbox's live stream
# (tests/test_desktop_stream_browser.py).
if [ "${CORRAL_TEST_TOOLS:-}" = 1 ]; then
  packages="$packages docker-registry apache2-utils chromium"
fi
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
command -v runsc >/dev/null 2>&1 || missing="$missing runsc"
# node + npm: the JS SDK tests, and template builds install npm packages (Node.js 24 for `base`, Deno's
# kernel) with them.
command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
if [ -n "$missing" ]; then
  say "updating apt's package lists"
  apt-get update -q
  plain=$(echo "$missing" | sed 's/ runsc//')
  if [ -n "${plain// /}" ]; then
    say "installing Debian packages:$plain"
    apt-get install -y -q --no-install-recommends $plain
    if echo "$plain" | grep -qw docker-registry && command -v systemctl >/dev/null 2>&1; then
      say "stopping the docker-registry service the package started (the tests run their own)"
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
  fi
  if echo "$missing" | grep -qw runsc; then
    say "installing runsc (gVisor) from ${codename}-backports"
    apt-get install -y -q --no-install-recommends -t "${codename}-backports" runsc
  fi
fi

nsswitch=${CORRAL_NSSWITCH:-/etc/nsswitch.conf}
if ! grep -Eq '^[[:space:]]*hosts:.*[[:space:]]myhostname([[:space:]]|$)' "$nsswitch" 2>/dev/null; then
  say "resolving *.localhost to this machine (myhostname in $nsswitch, for https://*.corral.localhost)"
  ensure_myhostname "$nsswitch"
fi

python=${PYTHON:-python3}
venv=${CORRAL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtualenv $venv"
  "$python" -m venv "$venv"
fi
say "installing Corral into $venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e '.[dev]'
say "fetching the dashboard's front-end packages (pinned in src/corral/dashboard/assets.lock.json)"
"$venv/bin/python" -m corral.dashboard.assets fetch
say "checking the installation"
version=$("$venv/bin/corral" --version)
echo "corral installed: $version"
