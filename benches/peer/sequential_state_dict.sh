#!/usr/bin/env bash
# State-dict cross-check for models written in the script (issue #21): PyTorch writes the
# state_dict of an nn.Sequential (benches/peer/sequential_state_dict.py), samhost loads it into the
# same network built with sequential([...]) (benches/peer/sequential_state_dict.rhai) and compares
# PyTorch's logits; samhost trains it four SAM steps and saves it; PyTorch loads that with
# load_state_dict(strict=True) and compares samhost's logits. Prints both differences.
#
# Run from the repository root, after `cargo build --release`:
#     benches/peer/sequential_state_dict.sh
# Settings (environment): SAMHOST (target/release/samhost), PY (/tmp/torchenv/bin/python, a venv
# with torch and safetensors), OUT (a fresh folder for the files).
set -euo pipefail
cd "$(dirname "$0")/../.."
SAMHOST=${SAMHOST:-target/release/samhost}
PY=${PY:-/tmp/torchenv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/sequential_state_dict.XXXXXX)}
mkdir -p "$OUT"
"$PY" benches/peer/sequential_state_dict.py torch "$OUT"
"$SAMHOST" run benches/peer/sequential_state_dict.rhai --quiet --set out="$OUT"
"$PY" benches/peer/sequential_state_dict.py check "$OUT"
