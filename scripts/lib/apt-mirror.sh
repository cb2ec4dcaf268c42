# Finds the Debian mirror this host's apt already uses, so bookworm-backports comes from the same place.
# Sourced by install.sh; tests source it too and call `debian_mirror DIR` on fixture directories.
# Reads both source formats: deb822 (`URIs:` fields in sources.list.d/*.sources, the default of current
# Debian images) and one-line (`deb [opts] URL suite ...` in sources.list and sources.list.d/*.list).
# Comment lines are ignored, so a URL in a comment (snapshot.debian.org in stock images) never wins, and
# security mirrors are skipped (they carry no backports). Prints nothing when no mirror is found.

debian_mirror() {
  local apt_dir=${1:-/etc/apt}
  local files=()
  local f
  for f in "$apt_dir/sources.list" "$apt_dir"/sources.list.d/*.sources "$apt_dir"/sources.list.d/*.list; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -eq 0 ] && return 0
  # POSIX awk (Debian's default is mawk): no ENDFILE, so a stanza is flushed when the file changes.
  awk '
    function consider(url) {
      if (found != "" || url !~ /^https?:\/\//) return
      if (url ~ /security/) return
      found = url
    }
    function flush(   n, j, u) {
      if (!disabled) { n = split(uris, u, " "); for (j = 1; j <= n; j++) consider(u[j]) }
      uris = ""; disabled = 0
    }
    FILENAME != current { flush(); current = FILENAME }
    { sub(/\r$/, "") }
    /^[ \t]*#/ { next }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      if (tolower($1) == "uris:") { for (i = 2; i <= NF; i++) uris = uris " " $i }
      if (tolower($1) == "enabled:" && tolower($2) == "no") disabled = 1
      next
    }
    $1 == "deb" {
      for (i = 2; i <= NF; i++) {
        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; continue }
        consider($i); break
      }
    }
    END { flush(); if (found != "") { sub(/\/+$/, "", found); print found } }
  ' "${files[@]}"
}
