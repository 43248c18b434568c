"""Reads a samhost run's TensorBoard event files with TensorBoard's own EventAccumulator and
compares every scalar with the run's metrics.jsonl (issue #19 item 3).

    python benches/peer/tensorboard_read.py RUN_DIR

Needs the `tensorboard` package (a scratch venv outside the repository). Prints the tags, the
number of scalars, and the largest difference against metrics.jsonl (values are float32 in the
event file); exits 1 on a mismatch.
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    run = sys.argv[1]
    acc = EventAccumulator(f"{run}/tb")
    acc.Reload()
    tags = acc.Tags()["scalars"]
    got = {(t, e.step): e.value for t in tags for e in acc.Scalars(t)}
    want = {}
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            step = r["step"] if r["step"] > 0 else r["epoch"]
            for k, v in r.items():
                if k not in ("tag", "step", "epoch", "time") and isinstance(v, (int, float)):
                    want[(f"{r['tag']}/{k}", step)] = float(v)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    worst = max((abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in want if k in got), default=0.0)
    print(f"TensorBoard read {len(got)} scalars under {len(tags)} tags ({', '.join(sorted(tags))})")
    print(f"metrics.jsonl has {len(want)}; missing {len(missing)}, extra {len(extra)}, largest relative difference {worst:.2e}")
    if missing or extra or worst > 1e-6:
        sys.exit(1)


if __name__ == "__main__":
    main()
