#!/usr/bin/env bash
# Prints the hash of the files that decide whether `cargo build --features cuda` must be proven again:
# the manifest and lock file, the CUDA build script, this file, and every tracked source file under
# src/ that has code behind `feature = "cuda"` or `feature = "nccl"` (tests are not part of that build). scripts/cuda_build.sh stores it in .ci/cuda-stamp after a successful
# build; .ci/run rebuilds with CUDA when the stored hash differs from this one.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  printf '%s\n' Cargo.toml Cargo.lock scripts/cuda_build.sh .ci/cuda-stamp.sh
  git grep -l -e 'feature = "cuda"' -e 'feature = "nccl"' -- 'src/*.rs' | sort
} | while read -r f; do
  printf '%s ' "$f"
  sha256sum <"$f"
done | sha256sum | cut -d' ' -f1
