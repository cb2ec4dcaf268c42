# Makes `*.localhost` names resolve to this machine (127.0.0.1 and ::1), which Corral's default public
# domain (`corral.localhost`: https://api.corral.localhost, https://<port>-<id>.corral.localhost) needs.
# glibc does that through the `myhostname` NSS module (Debian's libnss-myhostname); Debian's package adds
# it to nsswitch.conf when installed, but an nsswitch.conf edited by hand keeps its own `hosts:` line, so
# this puts `myhostname` right after `files` there when it is missing. Sourced by install.sh; tests call
# `ensure_myhostname FILE` on fixture files.

ensure_myhostname() {
  local conf=${1:-/etc/nsswitch.conf}
  if [ ! -f "$conf" ]; then
    printf 'hosts:          files myhostname dns\n' > "$conf"
    return
  fi
  # Only the active `hosts:` line counts: a commented one says nothing about what glibc does.
  if grep -Eq '^[[:space:]]*hosts:.*[[:space:]]myhostname([[:space:]]|$)' "$conf"; then
    return
  fi
  if ! grep -Eq '^[[:space:]]*hosts:' "$conf"; then
    printf 'hosts:          files myhostname dns\n' >> "$conf"
  elif grep -Eq '^[[:space:]]*hosts:.*[[:space:]]files([[:space:]]|$)' "$conf"; then
    sed -i -E '/^[[:space:]]*hosts:/ s/([[:space:]])files([[:space:]]|$)/\1files myhostname\2/' "$conf"
  else
    sed -i -E '/^[[:space:]]*hosts:/ s/^([[:space:]]*hosts:[[:space:]]*)/\1myhostname /' "$conf"
  fi
}
