#!/usr/bin/env bash
# Build Horovod 0.28.1 for torch 2.13 (PyTorch + Gloo; NCCL where asked) and keep the wheel, so a machine builds
# it once.
#
# Why a build at all: Horovod's last release (0.28.1, June 2023) compiles horovod/torch as C++14, and torch >= 2.1
# headers need C++17 (horovod/horovod#3996). Upstream fixed it after the release: PR #3998 (commit 3a31d933,
# merged 2024-08-31, "Build Pytorch (and Gloo) with C++17 for >= 2.1.0"). This script applies exactly that commit
# (horovod-0.28.1-pr3998-cxx17.patch, from `git format-patch`) to PyPI's source distribution of 0.28.1. Without
# the Gloo half of the patch the link fails with "multiple definition of gloo::rendezvous::Store::kDefaultTimeout".
#
# usage: tools/horovod/build_wheel.sh [WHEEL_DIR]      (default: .venvs/.wheels; prints the wheel's path)
#   On a GPU cluster, with a CUDA build of torch 2.13 and nvcc/NCCL on the node (module load ...):
#     HOROVOD_GPU_OPERATIONS=NCCL tools/horovod/build_wheel.sh
#   Any other HOROVOD_* build variable you set is passed through (HOROVOD_WITH_MPI=1 with an MPI on PATH, ...).
# Measured on 2 cores (x86_64, gcc 12, cmake 3.25): 4 min 16 s in all, 3 min 35 s of it the build; 2.3 GB peak memory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
wheels=${1:-$root/.venvs/.wheels}
python=${PYTHON:-python3}
version=0.28.1
sdist_sha256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0  # PyPI's horovod-0.28.1.tar.gz
patch_file=$here/horovod-$version-pr3998-cxx17.patch

mkdir -p "$wheels"
wheels=$(cd "$wheels" && pwd)
for cached in "$wheels"/horovod-"$version"-*.whl; do
  if [ -e "$cached" ]; then
    echo "$cached"
    exit 0
  fi
done

command -v cmake >/dev/null || { echo "error: cmake (>= 3.13) is needed to build Horovod" >&2; exit 2; }
command -v c++ >/dev/null || { echo "error: a C++17 compiler (c++, gcc >= 8) is needed to build Horovod" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A build environment of its own: torch pinned as every folder pins it (constraints.txt), never a newer CUDA build.
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt" \
  torch setuptools wheel packaging cloudpickle psutil pyyaml cffi 2>&1 |
  { grep -v "is ignored: it is neither a file nor a directory" || true; }

"$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  "horovod==$version" -d "$work" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "$sdist_sha256  $work/horovod-$version.tar.gz" | sha256sum --check --quiet
tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
patch -p1 --quiet -d "$work/horovod-$version" <"$patch_file"

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1
[ -n "${HOROVOD_WITH_MPI:-}" ] || export HOROVOD_WITHOUT_MPI=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
start=$SECONDS
"$work/venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps \
  -w "$wheels" "$work/horovod-$version" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  echo "error: the Horovod build failed (the last 40 lines of its log are above)" >&2
  exit 1
}
echo "horovod $version built in $((SECONDS - start)) s" >&2
ls "$wheels"/horovod-"$version"-*.whl
