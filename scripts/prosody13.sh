#!/bin/bash
# Prosody 13 (Debian bookworm-backports) next to the system's Prosody 0.12,
# for `make test-prosody13`. Nothing is installed over the system Prosody: the
# backports .deb is fetched with `apt-get download` and unpacked with `dpkg -x`
# into $PROSODY13_DIR (default .cache/prosody13, ignored by git), and its two
# launchers are copied with their hard-coded directories pointed there.
# Only the Lua libraries the package depends on (and lua-unbound, which
# docker-jitsi-meet's Prosody image installs, and lua-readline for the shell)
# come from apt, and only when missing.
#
# Works on a fresh Debian 12 as root (or through sudo). Prints, as its last
# line, the environment tests/prosody.py reads:
#   PROSODY_BIN=... PROSODYCTL_BIN=...
set -euo pipefail
cd "$(dirname "$0")/.."
# everything but that last line goes to stderr
exec 3>&1 1>&2

DIR="${PROSODY13_DIR:-$PWD/.cache/prosody13}"
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
case "$DIR" in *"'"*|*" "*) echo "prosody13.sh: PROSODY13_DIR must not contain quotes or spaces: $DIR" >&2; exit 1 ;; esac
SUITE=bookworm-backports
# "13" takes the newest 13.x that backports has; a full Debian version pins one
WANT="${PROSODY13_VERSION:-13}"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
log() { echo "prosody13.sh: $*" >&2; }

candidate() {
  # newest prosody version that the backports suite offers matching $WANT
  apt-cache madison prosody 2>/dev/null \
    | awk -F'|' -v s="$SUITE/" '$3 ~ s { gsub(/ /, "", $2); print $2 }' \
    | grep -E "^${WANT//./\\.}([.~+-]|$)" | head -n 1 || true
}

# 1. the backports source. CI machines do not have it: add one on the same
#    mirror as the machine's own bookworm source, with backports' default
#    priority (100: apt never upgrades anything from it on its own).
if ! apt-cache policy 2>/dev/null | awk '{ print $3 }' | grep -qx "$SUITE/main"; then
  mirror="$(apt-cache policy 2>/dev/null | awk '$3 == "bookworm/main" && $2 ~ /^[a-z]+:\/\// { print $2; exit }')"
  if [ -z "$mirror" ]; then
    log "no apt source for Debian bookworm found; run apt-get update, or add $SUITE yourself"
    exit 1
  fi
  parts=/etc/apt/sources.list.d/
  eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
  src="${parts%/}/captions-bookworm-backports.sources"
  log "adding $SUITE from $mirror ($src)"
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$SUITE" | $SUDO tee "$src" >/dev/null
  $SUDO apt-get update -qq
fi
ver="$(candidate)"
if [ -z "$ver" ]; then
  log "$SUITE has no prosody matching '$WANT' (apt-cache madison prosody; apt-get update?)"
  exit 1
fi

# 2. the package, unpacked (again only when the version changed)
if [ "$(cat "$DIR/VERSION" 2>/dev/null || true)" != "$ver" ]; then
  log "fetching prosody $ver from $SUITE"
  if [ -e "$DIR" ] && [ ! -f "$DIR/VERSION" ] && [ -n "$(ls -A "$DIR")" ]; then
    log "$DIR exists and was not made by this script; not touching it"
    exit 1
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR/deb"
  # apt's download sandbox user must be able to write there
  chmod 777 "$DIR/deb"
  (cd "$DIR/deb" && apt-get download -q "prosody=$ver" >/dev/null)
  deb="$(ls "$DIR"/deb/prosody_*.deb)"
  dpkg -x "$deb" "$DIR/root"
  dpkg-deb -f "$deb" Depends > "$DIR/DEPENDS"
  mkdir -p "$DIR/bin" "$DIR/etc/certs" "$DIR/data"
  # a default config of its own (Debian's writes to /var/log and /run)
  printf 'run_as_root = true\npidfile = "%s/data/prosody.pid"\nlog = { { to = "file", filename = "%s/data/prosody.log" } }\n' \
    "$DIR" "$DIR" > "$DIR/etc/prosody.cfg.lua"
  # The launchers hard-code the Debian paths (CFG_SOURCEDIR picks the Lua
  # sources, i.e. which Prosody runs; the config, plugin and data
  # directories are only defaults, the tests pass --config and data_path).
  for exe in prosody prosodyctl; do
    sed -e "s|^CFG_SOURCEDIR=.*|CFG_SOURCEDIR='$DIR/root/usr/lib/prosody';|" \
        -e "s|^CFG_CONFIGDIR=.*|CFG_CONFIGDIR='$DIR/etc';|" \
        -e "s|^CFG_PLUGINDIR=.*|CFG_PLUGINDIR='$DIR/root/usr/lib/prosody/modules/';|" \
        -e "s|^CFG_DATADIR=.*|CFG_DATADIR='$DIR/data';|" \
        "$DIR/root/usr/bin/$exe" > "$DIR/bin/$exe"
    chmod 755 "$DIR/bin/$exe"
    for var in CFG_SOURCEDIR CFG_CONFIGDIR CFG_PLUGINDIR CFG_DATADIR; do
      grep -q "^$var='$DIR/" "$DIR/bin/$exe" || { log "could not set $var in $exe"; exit 1; }
    done
  done
  echo "$ver" > "$DIR/VERSION"
fi

# 3. the Lua libraries. The check is what Prosody itself needs at start-up
#    (util.dependencies): expat, filesystem, socket, sec, plus unbound and
#    readline; apt gets the package's own Depends line satisfied when any is
#    missing, so versions and virtual lua5.4-* names are apt's business.
lua_ok() {
  lua5.4 -e 'for _, m in ipairs{ "lxp", "lfs", "socket", "ssl", "lunbound", "readline" } do require(m) end' 2>/dev/null
}
if ! command -v lua5.4 >/dev/null || ! lua_ok; then
  log "installing Prosody 13's Lua libraries with apt"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get satisfy -y -qq --no-install-recommends \
    "$(cat "$DIR/DEPENDS"), lua5.4-unbound, lua5.4-readline" >/dev/null
  lua_ok || { log "Lua libraries still missing after apt"; exit 1; }
fi

# 4. it runs: the version it reports is the one unpacked
got="$("$DIR/bin/prosodyctl" about 2>/dev/null | sed -n 's/^Prosody \([0-9][^ ]*\).*/\1/p' | head -n 1)"
case "$ver" in
  "$got"-*|"$got") ;;
  *) log "the unpacked prosodyctl reports '$got', expected $ver"; "$DIR/bin/prosodyctl" about >&2 || true; exit 1 ;;
esac
log "Prosody $got ready in $DIR"
echo "PROSODY_BIN=$DIR/bin/prosody PROSODYCTL_BIN=$DIR/bin/prosodyctl" >&3
