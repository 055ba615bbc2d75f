#!/usr/bin/env bash
# System tools the test suite uses besides Python packages: shellcheck (lint) and, for the Slurm tests,
# Slurm itself (installed by slurm_templates/local_cluster/start.sh when the suite starts the cluster).
# Installs with apt-get when running as root; otherwise says what is missing and lets the tests decide
# (skip locally, fail in CI).
set -euo pipefail

missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
else
  echo "system-deps: missing ${missing[*]} (install with: sudo apt-get install ${missing[*]})" >&2
fi
