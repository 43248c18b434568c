#!/usr/bin/env python3
"""Times PyTorch (+ transformers) CPU eager on the ViT SAM benchmark of samhost's
`benches/support/probe.rs` (`SAMHOST_BENCH_PART=probe cargo bench --bench sam`), which it mirrors:
a ViT-S/14 in DINOv2-small's shape (hidden 384, 12 layers, 6 heads, intermediate 1536, patch 14,
layer_norm_eps 1e-6, 10-class head, random weights), batch 32, random N(0, 1) images, labels
i % 10, and three settings:

  * forward pass: training mode, autograd on (the graph is built, no backward);
  * probe SAM step: every `vit.` parameter has requires_grad False, only the classifier trains;
  * full SAM step: all parameters train.

SAM is the standard two-pass step: the gradient g at w, e = rho * g / ||g|| (rho 0.05, the norm
over the trainable parameters), the gradient at w + e, restore w, then SGD(lr 0.01, momentum 0.9)
steps with the second gradient. Cross-entropy loss. Each timing is the median of 3 after 2
warm-ups; 3 rounds (forward, probe, full in each); min-max ranges over the rounds.

Not run by CI. Install PyTorch and transformers in a scratch virtual environment outside the
repository, then run

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers
    /tmp/torchenv/bin/python benches/peer/vit_sam.py --sizes 56 112 224 --batch 32 --threads 2

and compare with `SAMHOST_BENCH_PART=probe SAMHOST_BENCH_PROBE_SIZE=56 RAYON_NUM_THREADS=2
cargo bench --bench sam` (one size per run).
"""

import argparse
import os
import statistics
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--sizes", type=int, nargs="+", default=[56], help="image sizes (px)")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"],
                    help="transformers attention implementations to time")
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

RHO = 0.05
EPS = 1e-12


def build(size, attn):
    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, patch_size=14, image_size=size, num_labels=10,
                    layer_norm_eps=1e-6)
    model = ViTForImageClassification._from_config(cfg, attn_implementation=attn)
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    return model.train()


def sam_step(model, opt, params, x, y):
    F.cross_entropy(model(pixel_values=x).logits, y).backward()
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        scale = RHO / (norm + EPS)
        es = []
        for p in params:
            e = p.grad * scale
            p.add_(e)
            es.append(e)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(pixel_values=x).logits, y).backward()
    with torch.no_grad():
        for p, e in zip(params, es):
            p.sub_(e)
    opt.step()
    opt.zero_grad(set_to_none=True)


def set_trainable(model, probe):
    for name, p in model.named_parameters():
        p.requires_grad_(not (probe and name.startswith("vit.")))
    return [p for p in model.parameters() if p.requires_grad]


def timed(f, warmup=2, reps=3):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def rng(v):
    return f"{min(v):.1f}-{max(v):.1f}"


def run(size, attn):
    torch.manual_seed(3)
    model = build(size, attn)
    x = torch.randn(args.batch, 3, size, size)
    y = torch.arange(args.batch) % 10
    print(f"ViT-S/14 (transformers, attn {attn}), {size}x{size}, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s): ms (median of 3 after 2 warm-ups), "
          f"{args.rounds} rounds", flush=True)
    fwd, probe, full = [], [], []
    for _ in range(args.rounds):
        set_trainable(model, probe=False)
        fwd.append(timed(lambda: model(pixel_values=x).logits))
        params = set_trainable(model, probe=True)
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        probe.append(timed(lambda: sam_step(model, opt, params, x, y)))
        params = set_trainable(model, probe=False)
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        full.append(timed(lambda: sam_step(model, opt, params, x, y)))
    pr = [p / f for p, f in zip(probe, fwd)]
    fr = [p / f for p, f in zip(full, fwd)]
    print(f"  forward pass (training mode)     {rng(fwd)} ms")
    print(f"  probe SAM step (backbone frozen) {rng(probe)} ms = {rng(pr)} forward passes")
    print(f"  full SAM step                    {rng(full)} ms = {rng(fr)} forward passes", flush=True)


def main():
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    for size in args.sizes:
        for attn in args.attn:
            run(size, attn)


if __name__ == "__main__":
    main()
