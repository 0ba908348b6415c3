#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) for this project, then runs the given command
# inside the project's virtualenv:  ./bootstrap.sh invoke build-ova   |   ./bootstrap.sh invoke test
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(packer qemu-utils qemu-system-x86 libxml2-utils mariadb-server openssh-server
  golang-go golang-github-vmware-govmomi-dev rsync zstd xorriso python3-venv)
# Node.js may come from another source than Debian (its npm then conflicts with Debian's).
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Azurite (Azure Blob emulator) for the storage tests, kept inside the project.
if [ ! -x .tools/node_modules/.bin/azurite-blob ]; then
  echo "bootstrap: installing azurite (npm)"
  mkdir -p .tools
  npm install --silent --no-audit --no-fund --prefix .tools azurite@3 >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.bootstrap-stamp
want=$(cat pyproject.toml appliance_src/pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: preparing .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ./appliance_src -e '.[dev]'
  echo "$want" > "$stamp"
fi

export PATH="$PWD/.venv/bin:$PWD/.tools/node_modules/.bin:$PATH"
if [ $# -eq 0 ]; then
  echo "bootstrap: ready. Run commands with: ./bootstrap.sh COMMAND (e.g. ./bootstrap.sh invoke --list)"
  exit 0
fi
exec "$@"
