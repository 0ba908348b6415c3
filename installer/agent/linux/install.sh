#!/bin/sh
# Mobility agent for Linux: check, install or upgrade, start, stop, status, uninstall.
#
#   install.sh check     [--prefix DIR]            prerequisites only; exit 3 when one fails
#   install.sh install   [--prefix DIR] [--force]  install or upgrade in place (exit 0 = done or
#                                                  already installed; 4 = newer installed, refused)
#   install.sh start|stop|status|uninstall [--prefix DIR]
#                  (also as PREFIX/opt/mobility-agent/current/install.sh, kept with each version)
#
# Everything goes under PREFIX (default /): opt/mobility-agent/<version> (a venv),
# opt/mobility-agent/current (symlink to the running version), var/lib/mobility-agent (the agent's
# state: registration, certificate, configuration; kept across upgrades and uninstall),
# var/log/mobility-agent.
# With PREFIX=/ and systemd running, the agent runs as the systemd service mobility-agent (root);
# otherwise as a background process with a pid file (containers, tests with a temporary prefix).
# A failed install removes what it created and leaves the running version untouched; running it
# again is safe. No secret is taken on the command line: registration reads the passphrase on stdin.
set -eu

PACKAGE_DIR=$(cd "$(dirname "$0")" && pwd)
ACTION=${1:-}
[ $# -gt 0 ] && shift
case "$ACTION" in
    check|install|start|stop|status|uninstall) ;;
    *) echo "usage: install.sh check|install|start|stop|status|uninstall [--prefix DIR] [--force]" >&2; exit 2 ;;
esac
PREFIX=/
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --force) FORCE=1; shift ;;
        *) echo "install.sh: unknown option $1 (allowed: --prefix DIR, --force)" >&2; exit 2 ;;
    esac
done
PREFIX=${PREFIX%/}
PYTHON=${MOBILITY_AGENT_PYTHON:-python3}
PYTHON_EXE=$PYTHON
[ -f "$PACKAGE_DIR/manifest.json" ] || { echo "install.sh: no manifest.json beside it: run it from the unpacked package" >&2; exit 2; }
# manifest.json is written with one key per line and a one-space indent at the top level.
VERSION=$(sed -n 's/^ "version": "\([^"]*\)",*$/\1/p' "$PACKAGE_DIR/manifest.json")
REQUIRED_PYTHON=$(sed -n 's/^  "python": "\([0-9.]*\)",*$/\1/p' "$PACKAGE_DIR/manifest.json")
OPT="$PREFIX/opt/mobility-agent"
STATE="$PREFIX/var/lib/mobility-agent"
LOGDIR="$PREFIX/var/log/mobility-agent"
PIDFILE="$STATE/agent.pid"
UNIT=/etc/systemd/system/mobility-agent.service

log() { echo "mobility-agent: $*"; }
fail() { echo "mobility-agent: error: $*" >&2; exit "${2:-1}"; }

use_systemd() { [ -z "$PREFIX" ] && [ -d /run/systemd/system ]; }

installed_version() {
    if [ -f "$OPT/current/INSTALLED" ]; then cat "$OPT/current/INSTALLED"; fi
}

# version_gt A B: true when A is a later version than B.
version_gt() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n1)" = "$1" ]; }

check() {
    failed=0
    report() {  # report OK WHAT FOUND
        if [ "$1" = 1 ]; then echo "PASS $2: $3"; else echo "FAIL $2: $3"; failed=1; fi
    }
    report "$([ "$(id -u)" = 0 ] && echo 1 || echo 0)" "root" "uid $(id -u) (the agent runs as root; use root or sudo)"
    arch=$(uname -m)
    report "$([ "$arch" = x86_64 ] && echo 1 || echo 0)" "architecture" "$arch (x86_64 needed)"
    # The interpreter's own path is kept (PYTHON_EXE): a launcher in PATH (pyenv's shims, say)
    # is then not run again for every later step.
    if found=$("$PYTHON" -c 'import sys, venv; print("%d.%d %s" % (*sys.version_info[:2], sys.executable))' 2>/dev/null); then
        PYTHON_EXE=${found#* }
        found=${found%% *}
        report "$([ "$found" = "$REQUIRED_PYTHON" ] && echo 1 || echo 0)" "python" "$PYTHON is $found ($REQUIRED_PYTHON with venv needed)"
    else
        report 0 "python" "$PYTHON with the venv module not found ($REQUIRED_PYTHON needed)"
    fi
    where="$PREFIX/opt"
    while [ ! -d "$where" ]; do where=$(dirname "$where"); done
    free_mb=$(df -Pm "$where" 2>/dev/null | awk 'NR==2 {print $4}')
    report "$([ "${free_mb:-0}" -ge 200 ] && echo 1 || echo 0)" "disk space" "${free_mb:-0} MB free under $PREFIX/opt (200 MB needed)"
    return $failed
}

agent_pid() {
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then cat "$PIDFILE"; fi
}

start() {
    [ -x "$OPT/current/bin/mobility-agent" ] || fail "not installed under ${PREFIX:-/}: run install first"
    if use_systemd; then
        systemctl enable --now mobility-agent.service >/dev/null
        log "service mobility-agent started"
        return
    fi
    if [ -n "$(agent_pid)" ]; then log "already running (pid $(agent_pid))"; return; fi
    mkdir -p "$LOGDIR" "$STATE"
    # setsid: the agent outlives the SSH session that started it.
    setsid "$OPT/current/bin/mobility-agent" run --state-dir "$STATE" \
        >>"$LOGDIR/agent.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    log "started (pid $!)"
}

stop() {
    if use_systemd; then
        systemctl stop mobility-agent.service 2>/dev/null || true
        return
    fi
    pid=$(agent_pid)
    [ -n "$pid" ] || return 0
    kill "$pid"
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    log "stopped (pid $pid)"
}

status() {
    version=$(installed_version)
    [ -n "$version" ] || { echo "not installed"; return 3; }
    if use_systemd; then
        state=$(systemctl is-active mobility-agent.service 2>/dev/null || true)
    elif [ -n "$(agent_pid)" ]; then state=running; else state=stopped; fi
    echo "installed $version $state"
}

install_unit() {
    sed "s#@PREFIX@#$PREFIX#g" "$PACKAGE_DIR/mobility-agent.service" >"$UNIT.tmp"
    mv "$UNIT.tmp" "$UNIT"
    systemctl daemon-reload
}

install() {
    [ -n "$VERSION" ] || fail "manifest.json in $PACKAGE_DIR names no version: the package is damaged"
    current=$(installed_version)
    if [ "$current" = "$VERSION" ] && [ "$FORCE" = 0 ]; then
        log "version $VERSION is already installed: nothing to do"
        return 0
    fi
    if [ -n "$current" ] && version_gt "$current" "$VERSION" && [ "$FORCE" = 0 ]; then
        fail "version $current is installed, newer than this package ($VERSION): a downgrade needs --force" 4
    fi
    check >/dev/null || { check; fail "prerequisites not met (see FAIL lines above)" 3; }
    target="$OPT/$VERSION"
    mkdir -p "$OPT" "$STATE" "$LOGDIR"
    chmod 700 "$STATE"
    was_running=0
    if use_systemd && systemctl is-active --quiet mobility-agent.service; then was_running=1; fi
    if ! use_systemd && [ -n "$(agent_pid)" ]; then was_running=1; fi
    # Reinstalling the running version (--force) replaces it in place, so stop it first.
    if [ "$current" = "$VERSION" ]; then stop; fi
    # The venv's scripts name their own path, so it is built where it stays; a failure removes
    # it (the EXIT trap) and the running version, if any, is untouched.
    rm -rf "$target"
    trap 'rm -rf "$target"' EXIT
    # One isolated Python process makes the venv and unpacks the locked wheels into it (no pip,
    # no bytecode compilation: the agent's first import writes what it uses).
    set --
    for wheel in "$PACKAGE_DIR"/wheels/*.whl; do
        case "$(basename "$wheel")" in pip-*) ;; *) set -- "$@" "$wheel" ;; esac
    done
    "$PYTHON_EXE" -I -S "$PACKAGE_DIR/install_wheels.py" "$target" "$@"
    # Starting the installed agent proves every module it imports is there (and compiles them once).
    "$target/bin/mobility-agent" --help >/dev/null || fail "the installed agent does not start (see above)"
    # The control script stays with the version (start/stop/status/uninstall after the package is gone).
    cp "$PACKAGE_DIR/install.sh" "$PACKAGE_DIR/manifest.json" "$PACKAGE_DIR/mobility-agent.service" "$target/"
    echo "$VERSION" >"$target/INSTALLED"
    trap - EXIT
    if [ "$was_running" = 1 ]; then stop; fi
    ln -sfn "$VERSION" "$OPT/current.new" && mv -T "$OPT/current.new" "$OPT/current"
    if use_systemd; then install_unit; fi
    for old in "$OPT"/*; do
        case "$(basename "$old")" in "$VERSION"|current) ;; *) rm -rf "$old" ;; esac
    done
    log "installed $VERSION${current:+ (upgraded from $current)} under ${PREFIX:-/}"
    if [ "$was_running" = 1 ]; then start; fi
}

uninstall() {
    stop
    if use_systemd && [ -f "$UNIT" ]; then
        systemctl disable mobility-agent.service >/dev/null 2>&1 || true
        rm -f "$UNIT"
        systemctl daemon-reload
    fi
    rm -rf "$OPT"
    log "uninstalled (registration and state kept in $STATE)"
}

case "$ACTION" in
    check) check || exit 3 ;;
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    uninstall) uninstall ;;
esac
