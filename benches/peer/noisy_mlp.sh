#!/usr/bin/env bash
# Noisy-label peer comparison (issue #16 item 2): samhost (benches/peer/noisy_mlp.rhai) against
# PyTorch (benches/peer/noisy_mlp.py) on MNIST with 40% symmetric label noise, MLP 784-512-512-10,
# SGD and SAM, seeds 1..5. The two sides run interleaved (per seed and method, one after the other,
# the first alternating with the seed) so they see the same machine load; 2 threads each.
# Prints a markdown table of the mean (min-max) over seeds of the last-5-epoch clean test accuracy,
# the final noisy_part_fit and the time per run (whole process, and training alone).
#
# Run from the repository root, after `cargo build --release`:
#     benches/peer/noisy_mlp.sh
# Settings (environment): SAMHOST (target/release/samhost), PY (/tmp/torchenv/bin/python, a venv with
# torch, safetensors, numpy; see noisy_mlp.py), DATA (../shared/data/mnist), SEEDS ("1 2 3 4 5"),
# EPOCHS (40), METHODS ("sgd sam"), OUT (a fresh folder for the logs, the JSON files and table.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

SAMHOST=${SAMHOST:-target/release/samhost}
PY=${PY:-/tmp/torchenv/bin/python}
DATA=${DATA:-../shared/data/mnist}
SEEDS=${SEEDS:-"1 2 3 4 5"}
EPOCHS=${EPOCHS:-40}
METHODS=${METHODS:-"sgd sam"}
OUT=${OUT:-$(mktemp -d /tmp/noisy_mlp.XXXXXX)}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE

results="$OUT/results.txt"
: >"$results"

now() { date +%s.%N; }

run_samhost() { # seed method
    local t0 t1 line
    t0=$(now)
    "$SAMHOST" run benches/peer/noisy_mlp.rhai --seed "$1" --set epochs="$EPOCHS" \
        --set data="$DATA" --set methods="[\"$2\"]" --runs-dir "$OUT/runs" --quiet >"$OUT/samhost-$2-$1.log" 2>&1
    t1=$(now)
    line=$(grep '^RESULT ' "$OUT/samhost-$2-$1.log")
    echo "samhost $line wall=$(echo "$t1 - $t0" | bc)" | tee -a "$results"
}

run_torch() { # seed method
    local t0 t1 line
    t0=$(now)
    "$PY" benches/peer/noisy_mlp.py --data "$DATA" --seeds "$1" --epochs "$EPOCHS" --methods "$2" --threads 2 \
        --out "$OUT/torch-$2-$1.json" >"$OUT/torch-$2-$1.log" 2>&1
    t1=$(now)
    line=$(grep '^RESULT ' "$OUT/torch-$2-$1.log")
    echo "torch $line wall=$(echo "$t1 - $t0" | bc)" | tee -a "$results"
}

for seed in $SEEDS; do
    for method in $METHODS; do
        if ((seed % 2)); then
            run_samhost "$seed" "$method"
            run_torch "$seed" "$method"
        else
            run_torch "$seed" "$method"
            run_samhost "$seed" "$method"
        fi
    done
done

python3 - "$results" "$EPOCHS" >"$OUT/table.md" <<'EOF'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    side, _, method, *kv = line.split()
    d = dict(x.split("=", 1) for x in kv if "=" in x and not x.startswith("accs="))
    rows.setdefault((method, side), []).append({k: float(v) for k, v in d.items() if re.fullmatch(r"[-0-9.e+]+", v)})

def cell(method, side, key, digits=4):
    rs = rows.get((method, side), [])
    if not rs:
        return "-"
    v = [r[key] for r in rs]
    return f"{sum(v) / len(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"

methods = sorted({m for m, _ in rows}, key=lambda m: ["sgd", "sam"].index(m) if m in ["sgd", "sam"] else 9)
n = max(len(v) for v in rows.values())
print(f"MNIST 6000/1000, 40% symmetric noise, MLP 784-512-512-10, {sys.argv[2]} epochs, {n} seeds; mean (min-max) over seeds\n")
print("| method | samhost last-5 clean acc | PyTorch last-5 clean acc | samhost noisy_part_fit | PyTorch noisy_part_fit | samhost wall s/run | PyTorch wall s/run | samhost train s/run | PyTorch train s/run |")
print("|---|---|---|---|---|---|---|---|---|")
for m in methods:
    print(f"| {m} | {cell(m, 'samhost', 'last5')} | {cell(m, 'torch', 'last5')} | {cell(m, 'samhost', 'noisy_part_fit')} "
          f"| {cell(m, 'torch', 'noisy_part_fit')} | {cell(m, 'samhost', 'wall', 1)} | {cell(m, 'torch', 'wall', 1)} "
          f"| {cell(m, 'samhost', 'secs', 1)} | {cell(m, 'torch', 'secs', 1)} |")
print("\nwall: the whole process (PyTorch's includes importing torch); train: model creation to the final evaluation.")
EOF
echo
cat "$OUT/table.md"
echo
echo "logs, JSON and table.md in $OUT"
