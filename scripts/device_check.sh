#!/usr/bin/env bash
# The GPU check, in one command, for a machine with an NVIDIA GPU and no Rust toolchain.
#
# 1. Here, on a build machine (no GPU needed):  scripts/device_check.sh --prepare
#    builds with scripts/cuda_build.sh --tests --archs 90 (CUDA 13.0, Hopper) and packs the CUDA test binary
#    and the device benchmark, stripped and compressed, into .device/ (ignored by git).
# 2. There, from the repository root with .device/ beside it:  scripts/device_check.sh
#    - prints the GPU, the driver and where the CUDA 13 libraries were found (cuBLAS, cuRAND, NVRTC
#      and the runtime come from the machine's own NVIDIA wheels or toolkit);
#    - runs every CUDA test variant (`test_device!` tests ending in _cuda, and the CPU-against-GPU
#      SAM step comparison: f32 within 1e-4, bf16 within twice its bf16 bound);
#    - prints ms per step for the cnn, ResNet-32, WRN-16-8 and ViT-B/16 at 224, train_step and
#      sam_step, f32 and bf16.
#    Everything it prints is also written to $OUT/device_check.log when OUT is set.
# Budget: about 5 minutes of GPU time with start-up; each stage has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
pack=.device

if [ "${1:-}" = "--prepare" ]; then
  set -e
  scripts/cuda_build.sh --tests --archs 90
  rm -rf "$pack" && mkdir -p "$pack"
  newest() { ls -t "$@" 2>/dev/null | grep -v '\.d$' | head -1; }
  it="$(newest target/cuda/release/deps/it-*)"
  bench="$(newest target/cuda/release/deps/device-*)"
  [ -n "$it" ] && [ -n "$bench" ] || { echo "error: device_check: test or bench binary missing under target/cuda" >&2; exit 1; }
  strip -o "$pack/it" "$it"
  strip -o "$pack/device-bench" "$bench"
  tar -C "$pack" -cJf "$pack/bins.tar.xz" it device-bench
  rm "$pack/it" "$pack/device-bench"
  grep -q '^/.device/$' .git/info/exclude 2>/dev/null || echo '/.device/' >>.git/info/exclude
  ls -l "$pack"
  echo "device_check: ready; on the GPU machine run scripts/device_check.sh (carry .device)" >&2
  exit 0
fi

log="${OUT:-/tmp}/device_check.log"
exec > >(tee "$log") 2>&1
start=$(date +%s)
stage() { echo; echo "== $1 ($(($(date +%s) - start)) s)"; }

stage "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || echo "nvidia-smi failed"

stage "binaries"
[ -f "$pack/bins.tar.xz" ] || { echo "error: $pack/bins.tar.xz is missing: run scripts/device_check.sh --prepare first"; exit 1; }
bin="$(mktemp -d)"
tar -C "$bin" -xJf "$pack/bins.tar.xz"
# The CUDA 13 libraries: next to the driver, in a toolkit, or in NVIDIA's Python wheels.
libdirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  found="$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets /usr/lib/x86_64-linux-gnu /opt /usr/local/lib /usr/lib/python3* \
    -name "$lib" 2>/dev/null | head -1)"
  if [ -z "$found" ]; then
    echo "warning: $lib not found on this machine"
  else
    echo "$lib: $found"
    libdirs="$libdirs:$(dirname "$found")"
  fi
done
[ -d /usr/local/nvidia/lib64 ] && libdirs="$libdirs:/usr/local/nvidia/lib64"
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$bin/it" | grep -E 'not found|cuda|cublas|curand|nvrtc' || true

stage "CUDA test variants"
# The CUDA variants only: names ending in _cuda, and the comparison tests with cuda in their name.
timeout 150 "$bin/it" cuda --test-threads 1 --nocapture
tests_rc=$?
echo "tests exit code: $tests_rc"

stage "benchmark (ms per step, median)"
SAMHOST_BENCH_DEVICE=cuda:0 SAMHOST_BENCH_STEPS="${SAMHOST_BENCH_STEPS:-10}" timeout 150 "$bin/device-bench"
bench_rc=$?
echo "benchmark exit code: $bench_rc"

stage "done"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
