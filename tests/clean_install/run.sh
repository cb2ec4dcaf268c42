#!/usr/bin/env bash
# Runs scripts/install.sh as a new user does: as root on a fresh Debian 12, here a debootstrap'd (minbase)
# chroot whose apt sources are deb822 only (debian.sources as Debian 12 images ship it, snapshot comments and
# the security stanza included, no sources.list) and whose package lists were never updated, with a copy of
# this checkout in /root/corral. Passes when install.sh gets to "corral installed" and a second run (it is
# idempotent) needs no apt work.
#
#   sudo tests/clean_install/run.sh              # the committed tree (HEAD)
#   sudo tests/clean_install/run.sh <commit>     # another commit
#   sudo tests/clean_install/run.sh --worktree   # the working tree as it is (tracked and new files)
#
# A few minutes with a fast mirror (most of it apt and pip downloads); reruns skip debootstrap.
#
# Needs root, debootstrap, and network access to the Debian mirror and PyPI. Outside the pytest run on
# purpose (slow, downloads). On the host it writes only the cached tarball (/var/cache/corral/clean-install,
# keyed by suite, variant, mirror, architecture and debootstrap's version), the log
# (/var/tmp/corral-clean-install.log) and a scratch chroot under /var/tmp, which is unmounted and removed
# on success and on failure (KEEP_CHROOT=1 keeps the directory, never the mounts).
# The host's TLS trust goes along (its local CAs, and PIP_CERT if set), so this also works behind a
# TLS-intercepting proxy, as install.sh on that host would.
set -Eeuo pipefail

suite=bookworm
variant=minbase
mirror=http://deb.debian.org/debian
cache_dir=/var/cache/corral/clean-install
log=/var/tmp/corral-clean-install.log
repo=$(cd "$(dirname "$0")/../.." && pwd)
tree=${1:-HEAD}
if [ "$tree" != --worktree ] && ! git -C "$repo" rev-parse --verify -q "$tree^{commit}" > /dev/null; then
  echo "usage: $0 [<commit> | --worktree]  (default HEAD)" >&2
  exit 2
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (debootstrap, chroot and mounts need it): sudo $0" >&2
  exit 1
fi

step="starting"
say() { step=$1; echo "==> $1"; }
trap 'rc=$?; [ "$BASHPID" = "$$" ] && echo "clean install: FAILED while ${step} (exit ${rc}); log: $log" >&2;
      exit $rc' ERR

root=$(mktemp -d /var/tmp/corral-clean-install.XXXXXX)
: > "$log"

mounts_under_root() {
  # Mount points at or below $root, deepest first (mountinfo's 5th field; octal escapes are fine here,
  # mktemp's names have none).
  awk -v root="$root" '$5 == root || index($5, root "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

cleanup() {
  local rc=$? m left
  trap - ERR
  for m in $(mounts_under_root); do
    umount "$m" 2>/dev/null || umount --lazy "$m" || true
  done
  left=$(mounts_under_root)
  if [ -n "$left" ]; then
    # Never delete through a mount (a bound /dev): leave the directory and say so.
    echo "clean install: could not unmount $left; $root left in place" >&2
  elif [ "${KEEP_CHROOT:-0}" = 1 ]; then
    echo "clean install: chroot kept at $root (nothing mounted)"
  else
    rm -rf --one-file-system "$root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

key=$(printf '%s\n' "$suite" "$variant" "$mirror" "$(dpkg --print-architecture)" \
        "$(dpkg-query -W -f='${Version}' debootstrap)" | sha256sum | cut -c1-16)
tarball=$cache_dir/$suite-$variant-$key.tar
if [ -f "$tarball" ]; then
  say "unpacking the cached $suite ($variant) tree $tarball"
  tar -C "$root" --numeric-owner -xpf "$tarball"
else
  say "debootstrap $suite ($variant) from $mirror (cached as $tarball)"
  debootstrap --variant="$variant" "$suite" "$root" "$mirror" >> "$log" 2>&1 ||
    { tail -n 20 "$log" >&2; false; }
  mkdir -p "$cache_dir"
  chmod 0755 "$root"
  tar -C "$root" --numeric-owner -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
fi

chmod 0755 "$root"  # the chroot's /: mktemp's 0700 would lock out every user but root (apt's _apt)

say "making it a fresh Debian 12 image: deb822 sources only, no package lists"
rm -f "$root/etc/apt/sources.list"
cp "$repo/tests/clean_install/debian-12-image.sources" "$root/etc/apt/sources.list.d/debian.sources"
find "$root/var/lib/apt/lists" -maxdepth 1 -type f -delete
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
# Packages' maintainer scripts must not start daemons: in a chroot they would run on the host.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"

mkdir -p "$root/root/corral"
if [ "$tree" = --worktree ]; then
  say "copying this working tree (tracked and new files) to /root/corral"
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    tar -C "$repo" --null --ignore-failed-read -T - -cf - | tar -C "$root/root/corral" -xf -
else
  say "copying commit $(git -C "$repo" rev-parse --short "$tree") of this checkout to /root/corral"
  git -C "$repo" archive "$tree" | tar -C "$root/root/corral" -xf -
fi

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"

in_chroot() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ${PIP_CERT:+PIP_CERT=$PIP_CERT} \
    /bin/bash -c "$1"
}

started=$SECONDS
say "running scripts/install.sh in the chroot"
in_chroot 'cd /root/corral && scripts/install.sh' 2>&1 | tee -a "$log"
grep -q '^corral installed: ' "$log"

say "checking that *.localhost names resolve (the default public domain, docs/network.md)"
in_chroot 'getent ahostsv4 api.corral.localhost | grep -q "^127.0.0.1 " && grep -Eq "^hosts:.* myhostname" /etc/nsswitch.conf' \
  || { echo "api.corral.localhost does not resolve to 127.0.0.1 in the chroot" >&2; false; }

say "running scripts/install.sh again: it must need no apt work"
in_chroot 'cd /root/corral && scripts/install.sh' 2>&1 | tee "$log.again"
grep -q '^corral installed: ' "$log.again"
if grep -q "==> updating apt's package lists" "$log.again"; then
  echo "the second run updated apt's lists: something the first run installed is not detected" >&2
  false
fi

echo "clean install: PASSED ($(grep '^corral installed: ' "$log"); both install.sh runs: $(( SECONDS - started )) s)"
