# Finds the Debian mirror this host's apt already uses, so bookworm-backports comes from the same place.
# Sourced by install.sh; tests source it too and call `debian_mirror DIR` on fixture directories.
# Reads both source formats: deb822 (stanzas in sources.list.d/*.sources, the default of current Debian
# images) and one-line (`deb [opts] URL suite ...` in sources.list and sources.list.d/*.list).
# Comment lines are ignored, so a URL in a comment (snapshot.debian.org in stock images) never wins;
# security mirrors (they carry no backports), `Enabled: no` stanzas and deb-src-only entries are skipped.
# Debian's own files are read first (sources.list, then debian.sources), so a third-party repository whose
# file sorts earlier (archive_uri-….sources from add-apt-repository) is not taken for the mirror.
# Prints nothing when no mirror is found.

debian_mirror() {
  local apt_dir=${1:-/etc/apt}
  local debian_sources="$apt_dir/sources.list.d/debian.sources"
  local files=() seen_debian="" f
  for f in "$apt_dir/sources.list" "$debian_sources" "$apt_dir"/sources.list.d/*.sources \
           "$apt_dir"/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    if [ "$f" = "$debian_sources" ]; then
      [ -n "$seen_debian" ] && continue
      seen_debian=1
    fi
    files+=("$f")
  done
  if [ "${#files[@]}" -eq 0 ]; then return 0; fi
  # POSIX awk (Debian's default is mawk): no ENDFILE, so a stanza is flushed when the file changes.
  awk '
    function consider(url) {
      if (found != "" || url !~ /^https?:\/\//) return
      if (url ~ /security/) return
      found = url
    }
    function flush(   n, j, u) {
      if (!disabled && types ~ /(^|[ \t])deb([ \t]|$)/) {
        n = split(uris, u, " "); for (j = 1; j <= n; j++) consider(u[j])
      }
      uris = ""; types = ""; disabled = 0; field = ""
    }
    FILENAME != current { flush(); current = FILENAME }
    { sub(/\r$/, "") }
    /^[ \t]*#/ { next }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      # A line starting with white space continues the previous field (a URIs: list over several lines).
      if ($0 ~ /^[ \t]/) { if (field == "uris") uris = uris " " $0; next }
      colon = index($0, ":")
      field = tolower(substr($0, 1, colon - 1)); value = substr($0, colon + 1)
      if (field == "uris") uris = uris " " value
      else if (field == "types") types = types " " value
      else if (field == "enabled") {
        value = tolower(value); gsub(/[ \t]/, "", value)
        if (value ~ /^(no|false|off|0|disable)$/) disabled = 1
      }
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
