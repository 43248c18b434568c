#!/usr/bin/env bash
# Builds samhost with the `cuda` feature on a machine without a CUDA installation or a GPU.
#
# NVIDIA's compiler, headers and libraries come from PyPI wheels (CUDA 13.0, the version of the
# driver on the GPU machines this project is lent), unpacked once into a cache folder:
#   $SAMHOST_CUDA_CACHE (default ~/.cache/samhost-cuda)/13.0/nvidia/cu13
# The driver library (libcuda.so) is not shipped as a wheel: a link stub with the driver API's
# symbols is generated from cuda.h, as the toolkit's own lib/stubs does; the real driver is found at
# run time.
#
# Usage: scripts/cuda_build.sh [--tests] [--archs "80 90"]
#   Runs `cargo build --release --features cuda,nccl` into target/cuda for each compute capability in
#   turn (default 80, Ampere, then 90, Hopper); the last one's build stays. --tests also builds
#   the test and bench binaries for it (what scripts/device_check.sh runs on a GPU machine).
#   On success it writes .ci/cuda-stamp, the hash of the files that decide whether the CUDA build
#   must be proven again (see .ci/run).
#   `source scripts/cuda_build.sh --env` only sets up the toolkit and exports the variables.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SAMHOST_CUDA_CACHE:-$HOME/.cache/samhost-cuda}/13.0"
toolkit="$cache/nvidia/cu13"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.0.19
  nvidia-nccl-cu13==2.32.3
)

default_archs="80 90"
archs="$default_archs"
build_tests=0
env_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) build_tests=1 ;;
    --archs) archs="$2"; shift ;;
    --env) env_only=1 ;;
    *) echo "error: scripts/cuda_build.sh: unknown argument '$1' (expected --tests, --archs LIST, --env)" >&2; exit 2 ;;
  esac
  shift
done

install_toolkit() {
  if [ "$(cat "$cache/.installed" 2>/dev/null)" = "${wheels[*]}" ]; then
    return
  fi
  rm -rf "$cache"
  echo "cuda_build: installing the CUDA 13.0 compiler and libraries from PyPI into $cache" >&2
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "${wheels[@]}"
  mkdir -p "$cache"
  for w in "$tmp"/*.whl; do
    python3 -m zipfile -e "$w" "$cache"
  done
  rm -rf "$tmp"
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/*
  # The wheels ship versioned libraries only; the linker looks for the plain names.
  for lib in "$toolkit"/lib/lib*.so.* "$cache"/nvidia/nccl/lib/lib*.so.*; do
    local plain="${lib%%.so.*}.so"
    [ -e "$plain" ] || ln -s "$(basename "$lib")" "$plain"
  done
  # Link stub for the driver API: every cu* name in cuda.h, as an empty function, soname libcuda.so.1.
  mkdir -p "$toolkit/lib/stubs"
  grep -o '\bcu[A-Z][A-Za-z0-9_]*' "$toolkit/include/cuda.h" | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$toolkit/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$toolkit/lib/stubs/libcuda.so" "$toolkit/lib/stubs/cuda_stub.c"
  echo "${wheels[*]}" >"$cache/.installed"
}

install_toolkit
export CUDA_HOME="$toolkit"
export PATH="$toolkit/bin:$PATH"
export LIBRARY_PATH="$toolkit/lib:$toolkit/lib/stubs:$cache/nvidia/nccl/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [ "$env_only" = 1 ]; then
  return 0 2>/dev/null || exit 0
fi

cd "$repo"
# One target folder for every architecture: a change of CUDA_COMPUTE_CAP rebuilds candle's kernels
# and the crates above them only. The last architecture's build is the one left in target/cuda.
last="${archs##* }"
for arch in $archs; do
  echo "cuda_build: cargo build --release --features cuda,nccl for sm_$arch" >&2
  CUDA_COMPUTE_CAP="$arch" cargo build --release --features cuda,nccl --target-dir target/cuda
done
if [ "$build_tests" = 1 ]; then
  echo "cuda_build: test and bench binaries for sm_$last" >&2
  CUDA_COMPUTE_CAP="$last" cargo test --release --features cuda --target-dir target/cuda --no-run
  CUDA_COMPUTE_CAP="$last" cargo bench --features cuda --target-dir target/cuda --bench device --no-run
fi

if [ "$archs" = "$default_archs" ]; then
  "$repo/.ci/cuda-stamp.sh" >"$repo/.ci/cuda-stamp"
  echo "cuda_build: ok (sm: $archs); wrote .ci/cuda-stamp" >&2
else
  echo "cuda_build: ok (sm: $archs; .ci/cuda-stamp is written for the default set, $default_archs)" >&2
fi
