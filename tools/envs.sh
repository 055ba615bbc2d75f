#!/usr/bin/env bash
# Build one virtual environment per folder that has a requirements.txt:
#   requirements.txt            -> .venvs/tests      (the test runner)
#   <folder>/requirements.txt   -> .venvs/<folder>   (that folder's recipes)
#   <folder>/requirements-X.txt -> .venvs/<folder>-X (a tool of that folder with conflicting pins)
# Frameworks pin conflicting versions, so they never share an environment.
# torch is installed first and pinned with constraints.txt for every install: an unpinned
# "torch" requirement would otherwise pull a CUDA build of a newer torch (several GB).
# An environment is rebuilt only when its requirements (or constraints.txt) change.
#
# usage: tools/envs.sh [name ...]     (default: every environment; "tests" is the runner)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}

# <folder>/requirements-<tool>.txt -> .venvs/<folder>-<tool>: a tool whose pins conflict with its folder's
# (nemo/requirements-run.txt: NeMo-Run).
req_file() {
  case $1 in
    tests) echo requirements.txt ;;
    *-*) echo "${1%%-*}/requirements-${1#*-}.txt" ;;
    *) echo "$1/requirements.txt" ;;
  esac
}

all_names() {
  local req tool
  echo tests
  for req in */requirements.txt */requirements-*.txt; do
    [ -e "$req" ] || continue
    tool=$(basename "$req" .txt)
    if [ "$tool" = requirements ]; then dirname "$req"; else echo "$(dirname "$req")-${tool#requirements-}"; fi
  done
}

# The installer: uv (pinned below) when it can be had, else pip. Both resolve the same pinned requirements
# from the same indexes (uv is given pip's configured index and find-links); uv links packages from its cache
# instead of unpacking every wheel again, so nine environments that each hold torch build in seconds instead
# of minutes (CI builds all of them from scratch). Users' `pip install -r requirements.txt` is still what the
# contract's copy-alone test runs. ENVS_INSTALLER=pip forces pip.
UV_VERSION=0.9.9
uv=""
uv_args=()

# pip's configuration (pip.conf and PIP_* variables) as uv flags: uv reads neither.
pip_index_flags() {
  local key value item
  for key in index-url extra-index-url find-links; do
    value=$("$python" -m pip config get "global.$key" 2>/dev/null || true)
    case $key in
      index-url) value="${PIP_INDEX_URL:-$value}" ;;
      extra-index-url) value="$value ${PIP_EXTRA_INDEX_URL:-}" ;;
      find-links) value="$value ${PIP_FIND_LINKS:-}" ;;
    esac
    for item in $value; do
      uv_args+=("--$key" "$item")
    done
  done
}

setup_installer() {
  [ "${ENVS_INSTALLER:-uv}" = uv ] || return 0
  local boot=.venvs/.uv
  if [ ! -x "$boot/bin/uv" ] || [ "$("$boot/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    rm -rf "$boot"
    if ! { "$python" -m venv "$boot" &&
      "$boot/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>&1 |
      { grep -v "is ignored: it is neither a file nor a directory" || true; }; } || [ ! -x "$boot/bin/uv" ]; then
      echo "envs: uv $UV_VERSION not installable, building with pip"
      return 0
    fi
  fi
  uv=$boot/bin/uv
  # unsafe-best-match: pick the best version over every index, as pip does (uv's default stops at the first).
  uv_args=(--quiet --index-strategy unsafe-best-match)
  pip_index_flags
}

# Install into a venv with the chosen installer, quietly.
install() {
  local venv=$1
  shift
  if [ -n "$uv" ]; then
    "$uv" pip install --python "$venv/bin/python" "${uv_args[@]}" "$@"
    return
  fi
  # pip: drop the noise of index locations that don't exist on this box.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# The framework environments: always under the torch pin.
pip_install() {
  local venv=$1
  shift
  install "$venv" -c constraints.txt "$@"
}

build() {
  local name=$1 req venv stamp want start
  req=$(req_file "$name")
  [ -f "$req" ] || { echo "envs: no $req for environment '$name'" >&2; return 1; }
  venv=.venvs/$name
  stamp=$venv/.requirements.sha256
  want=$(cat "$req" constraints.txt | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "envs: $venv is up to date"
    return 0
  fi
  start=$SECONDS
  echo "envs: building $venv from $req"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # A folder without torch (jax/) skips it; every other one gets the pinned torch first.
  if ! grep -q '^torch==' "$req"; then
    pip_install "$venv" -r "$req"
    echo "$want" >"$stamp"
    echo "envs: built $venv (no torch) in $((SECONDS - start)) s"
    return 0
  fi
  pip_install "$venv" torch
  pip_install "$venv" -r "$req"
  # Fail now, not in the middle of a test run, if the pin did not hold.
  "$venv/bin/python" - <<'PY'
import importlib.metadata as md
want = [line.split("==")[1].strip() for line in open("constraints.txt") if line.startswith("torch==")][0]
have = md.version("torch").split("+")[0]
assert have == want, f"torch {have} installed, constraints.txt pins {want}"
PY
  echo "$want" >"$stamp"
  echo "envs: built $venv in $((SECONDS - start)) s"
}

# tools/envs.sh --install-into VENV REQUIREMENTS (absolute paths): REQUIREMENTS alone, without constraints.txt,
# into an existing VENV, with this script's installer: the contract's copy-alone test (a folder copied alone).
if [ "${1:-}" = --install-into ]; then
  [ $# -eq 3 ] || { echo "usage: tools/envs.sh --install-into VENV REQUIREMENTS" >&2; exit 2; }
  mkdir -p .venvs
  setup_installer
  install "$2" -r "$3"
  exit 0
fi

if [ $# -eq 0 ]; then
  mapfile -t names < <(all_names)
else
  names=("$@")
fi
mkdir -p .venvs
setup_installer
for name in "${names[@]}"; do
  build "$name"
done
