#!/usr/bin/env python3
"""PyTorch side of the noisy-label peer comparison (issue #16 item 2): SGD against SAM on MNIST with
40% symmetric label noise, an MLP 784-512-512-10, the protocol of benches/peer/noisy_mlp.rhai.

Not run by CI. Install PyTorch in a scratch virtual environment outside the repository, then run

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu  # or plain `pip install torch`
    /tmp/torchenv/bin/pip install safetensors numpy
    /tmp/torchenv/bin/python benches/peer/noisy_mlp.py --data /work/shared/data/mnist --seeds 1 2 3 4 5 \
        --out /tmp/noisy_mlp_torch.json

benches/peer/noisy_mlp.sh runs this and samhost seed by seed and prints the comparison table.

Protocol: train.safetensors / test.safetensors (`images` u8 [N,1,28,28], `labels` u8 [N]); pixels / 255,
flattened, no augmentation; exactly round(0.4 N) training examples chosen uniformly without replacement,
each label changed to a uniformly drawn other class (clean labels kept); nn.Linear default init; SGD
lr 0.05, momentum 0.9, weight_decay 5e-4 (coupled, torch.optim.SGD), batch 128, reshuffled every epoch,
drop_last, constant lr, 40 epochs, cross-entropy. SAM (Foret et al.): e = rho g / ||g|| with the global
L2 norm over all parameters (rho 0.05), the gradient at w + e, w restored, the base SGD step with that
gradient. OMP_WAIT_POLICY defaults to PASSIVE (set before torch is imported). Reported per seed: the mean clean test accuracy of the last 5 epochs and the final
noisy_part_fit (the share of the corrupted training examples predicted as their noisy label).
"""

import argparse
import json
import os
import statistics
import time

# GNU OpenMP's spinning workers slow a 2-thread run on 2 shared cores by 10x or more whenever another
# process runs (measured 9 ms against 135 ms a step); passive waiting keeps the timing meaningful.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file


class Mlp(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Sam:
    """SAM around a base optimizer: ascend to w + rho g/||g||, take the gradient there, restore w,
    let the base optimizer step (its weight decay included) with that gradient."""

    def __init__(self, params, base, rho=0.05):
        self.params = [p for p in params if p.requires_grad]
        self.base = base
        self.rho = rho

    def zero_grad(self):
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        scale = self.rho / (norm + 1e-12)
        self.e = []
        for p in self.params:
            e = p.grad * scale if p.grad is not None else torch.zeros_like(p)
            p.add_(e)
            self.e.append(e)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p, e in zip(self.params, self.e):
            p.sub_(e)
        self.e = None
        self.base.step()
        self.zero_grad()


def load(path):
    d = load_file(path)
    x = torch.from_numpy(d["images"].astype(np.float32) / 255.0).reshape(len(d["labels"]), -1)
    y = torch.from_numpy(d["labels"].astype(np.int64))
    return x, y


def symmetric_noise(labels, rate, classes, seed):
    """Exactly round(rate N) labels, chosen uniformly without replacement, each moved to a uniformly
    drawn other class. Returns (noisy labels, mask of the corrupted examples)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    k = int(round(rate * n))
    idx = rng.choice(n, size=k, replace=False)
    noisy = labels.clone()
    shift = torch.from_numpy(rng.integers(1, classes, size=k))
    noisy[idx] = (labels[idx] + shift) % classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


@torch.no_grad()
def predict(model, x):
    model.eval()
    return model(x).argmax(1)


def run(method, seed, args, xtr, ytr_noisy, ytr_clean, mask, xte, yte):
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Mlp([784, 512, 512, 10])
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sam = Sam(model.parameters(), base, rho=args.rho) if method == "sam" else None
    order = torch.Generator().manual_seed(seed)
    n = len(ytr_noisy)
    steps = n // args.batch
    accs, losses = [], []
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for s in range(steps):
            b = perm[s * args.batch : (s + 1) * args.batch]
            x, y = xtr[b], ytr_noisy[b]
            loss = F.cross_entropy(model(x), y)
            base.zero_grad(set_to_none=True)
            loss.backward()
            if sam is None:
                base.step()
            else:
                sam.first_step()
                F.cross_entropy(model(x), y).backward()
                sam.second_step()
            total += loss.item()
        losses.append(total / steps)
        accs.append((predict(model, xte) == yte).float().mean().item())
    pred = predict(model, xtr)
    last = accs[-args.last :]
    return {
        "method": method,
        "seed": seed,
        "last5": sum(last) / len(last),
        "final": accs[-1],
        "noisy_part_fit": (pred[mask] == ytr_noisy[mask]).float().mean().item(),
        "clean_part_accuracy": (pred[~mask] == ytr_clean[~mask]).float().mean().item(),
        "noise_rate": mask.float().mean().item(),
        "secs": time.perf_counter() - t0,
        "accs": accs,
        "train_loss": losses,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/mnist", help="folder with train/test.safetensors")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=["sgd", "sam"], choices=["sgd", "sam"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--last", type=int, default=5, help="epochs averaged for the reported accuracy")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    xtr, ytr = load(f"{args.data}/train.safetensors")
    xte, yte = load(f"{args.data}/test.safetensors")
    results = []
    for seed in args.seeds:
        ytr_noisy, mask = symmetric_noise(ytr, args.noise, 10, seed)
        for method in args.methods:
            r = run(method, seed, args, xtr, ytr_noisy, ytr, mask, xte, yte)
            results.append(r)
            print(
                f"RESULT {method} seed={seed} last5={r['last5']:.4f} final={r['final']:.4f} "
                f"noisy_part_fit={r['noisy_part_fit']:.4f} clean_part_accuracy={r['clean_part_accuracy']:.4f} "
                f"secs={r['secs']:.1f}",
                flush=True,
            )
    summary = {}
    for method in args.methods:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        s = {}
        for key in ("last5", "noisy_part_fit", "secs"):
            v = [r[key] for r in rs]
            s[key] = {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
        summary[method] = s
        print(
            f"SUMMARY {method} seeds={len(rs)} last5 {s['last5']['mean']:.4f} "
            f"({s['last5']['min']:.4f}-{s['last5']['max']:.4f}) noisy_part_fit {s['noisy_part_fit']['mean']:.4f} "
            f"({s['noisy_part_fit']['min']:.4f}-{s['noisy_part_fit']['max']:.4f}) secs {s['secs']['mean']:.1f}"
        )
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
