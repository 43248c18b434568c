#!/usr/bin/env bash
# DINOv2 cross-check against transformers (issue #15 item 7): transformers writes a random
# Dinov2ForImageClassification and its Dinov2Model backbone (benches/peer/dinov2_check.py),
# samhost loads both with from_pretrained and compares transformers' logits at the checkpoint's size
# and at 56 px (benches/peer/dinov2_check.rhai), trains four SAM steps and saves; transformers
# loads the saved folder and compares samhost's logits.
#
# Run from the repository root, after `cargo build --release`:
#     benches/peer/dinov2_check.sh
# Settings (environment): SAMHOST (target/release/samhost), PY (/tmp/torchenv/bin/python, a venv
# with torch, transformers and safetensors), OUT (a fresh folder for the files).
set -euo pipefail
cd "$(dirname "$0")/../.."
SAMHOST=${SAMHOST:-target/release/samhost}
PY=${PY:-/tmp/torchenv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/dinov2_check.XXXXXX)}
mkdir -p "$OUT"
"$PY" benches/peer/dinov2_check.py write "$OUT" 2>&1 | grep -v "Writing model shards"
"$SAMHOST" run benches/peer/dinov2_check.rhai --quiet --set out="$OUT"
"$PY" benches/peer/dinov2_check.py check "$OUT" 2>&1 | grep -v "Loading weights"
