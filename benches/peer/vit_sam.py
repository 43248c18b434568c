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

Paired rounds: with `--samhost-bin BIN` (the binary `cargo bench --bench sam --no-run` names,
target/release/deps/sam-<hash>) each round times PyTorch's three settings and then samhost's
(one `BIN --bench` process per round, `SAMHOST_BENCH_PART=probe`, one round), in alternating
order, seconds apart, so that other tenants' load falls on both sides of a ratio; each round
prints samhost/PyTorch ratios and the summary their ranges over the rounds:

    /tmp/torchenv/bin/python benches/peer/vit_sam.py --sizes 56 112 224 --batch 32 --threads 2 \\
        --attn sdpa --samhost-bin target/release/deps/sam-<hash>

With `--pair steps` the pairing is finer: samhost's benchmark runs as a server
(`SAMHOST_BENCH_PROBE_SERVE=1`, one process per size) and, per setting, after 2 warm-up steps on
each side, single PyTorch steps and single samhost steps alternate (`--steps` pairs, the order
alternating); it prints the medians, the ratio of the medians and the range and median of the
per-pair ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--sizes", type=int, nargs="+", default=[56], help="image sizes (px)")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"],
                    help="transformers attention implementations to time")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--samhost-bin", help="samhost's sam benchmark binary: paired rounds (see above)")
parser.add_argument("--pair", choices=["rounds", "steps"], default="rounds",
                    help="with --samhost-bin: pair whole rounds, or single steps (see above)")
parser.add_argument("--steps", type=int, default=9, help="paired steps per setting with --pair steps")
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


def once(f):
    """Milliseconds one call of `f` takes."""
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1e3


def timed(f, warmup=2, reps=3):
    for _ in range(warmup):
        f()
    return statistics.median(once(f) for _ in range(reps))


def rng(v, digits=1):
    return f"{min(v):.{digits}f}-{max(v):.{digits}f}"


def setup(size, attn):
    """The seeded model, a batch of N(0, 1) images and labels i % 10."""
    torch.manual_seed(3)
    model = build(size, attn)
    x = torch.randn(args.batch, 3, size, size)
    y = torch.arange(args.batch) % 10
    return model, x, y


def torch_round(model, x, y):
    """PyTorch's forward pass, probe SAM step and full SAM step (ms, medians of 3)."""
    set_trainable(model, probe=False)
    fwd = timed(lambda: model(pixel_values=x).logits)
    params = set_trainable(model, probe=True)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    probe = timed(lambda: sam_step(model, opt, params, x, y))
    params = set_trainable(model, probe=False)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    full = timed(lambda: sam_step(model, opt, params, x, y))
    return fwd, probe, full


def samhost_env(size, **extra):
    """The environment of samhost's probe benchmark at `size` px with this run's batch and threads."""
    return dict(os.environ, SAMHOST_BENCH_PART="probe", SAMHOST_BENCH_PROBE_SIZE=str(size),
                SAMHOST_BENCH_PROBE_BATCH=str(args.batch), RAYON_NUM_THREADS=str(args.threads), **extra)


def samhost_round(size):
    """One round of samhost's probe benchmark in its own process: (forward, probe, full) in ms."""
    env = samhost_env(size, SAMHOST_BENCH_PROBE_ROUNDS="1")
    out = subprocess.run([args.samhost_bin, "--bench"], env=env, capture_output=True, text=True)
    rows = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("ROUND ")]
    if out.returncode != 0 or len(rows) != 1:
        raise SystemExit(f"error: {args.samhost_bin} (probe, {size} px) failed:\n{out.stdout}{out.stderr}")
    return rows[0]["forward"], rows[0]["probe"], rows[0]["full"]


def paired(size, attn):
    """Alternating rounds of PyTorch and samhost at one size; samhost/PyTorch ratios per round."""
    model, x, y = setup(size, attn)
    print(f"ViT-S/14 {size}x{size}, batch {args.batch}, {args.threads} thread(s), PyTorch attn {attn}: "
          f"{args.rounds} paired rounds, ms (median of 3 each)", flush=True)
    print(f"  {'round':>5} {'first':>6} {'torch fwd':>9} {'ours fwd':>8} {'torch probe':>11} {'ours probe':>10}"
          f" {'torch full':>10} {'ours full':>9} {'fwd':>5} {'probe':>5} {'full':>5}")
    ratios = []
    for r in range(args.rounds):
        if r % 2 == 0:
            theirs, ours = torch_round(model, x, y), samhost_round(size)
        else:
            ours, theirs = samhost_round(size), torch_round(model, x, y)
        ratios.append([o / t for o, t in zip(ours, theirs)])
        print(f"  {r + 1:>5} {'torch' if r % 2 == 0 else 'ours':>6} {theirs[0]:>9.0f} {ours[0]:>8.0f}"
              f" {theirs[1]:>11.0f} {ours[1]:>10.0f} {theirs[2]:>10.0f} {ours[2]:>9.0f}"
              f" {ratios[-1][0]:>5.2f} {ratios[-1][1]:>5.2f} {ratios[-1][2]:>5.2f}", flush=True)
    cols = list(zip(*ratios))
    print(f"  samhost/PyTorch over {args.rounds} paired rounds: forward {rng(cols[0], 2)}, "
          f"probe SAM step {rng(cols[1], 2)}, full SAM step {rng(cols[2], 2)}", flush=True)


def paired_steps(size, attn):
    """Single PyTorch and samhost steps alternating, per setting; per-pair samhost/PyTorch ratios."""
    model, x, y = setup(size, attn)
    proc = subprocess.Popen([args.samhost_bin, "--bench"], env=samhost_env(size, SAMHOST_BENCH_PROBE_SERVE="1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: {args.samhost_bin} (probe server, {size} px) ended before READY")
        if line.strip() == "READY":
            break

    def ours(request):
        proc.stdin.write(request + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().split()
        if len(answer) != 2 or answer[0] != "MS":
            raise SystemExit(f"error: samhost answered {answer!r} to {request}")
        return float(answer[1])

    print(f"ViT-S/14 {size}x{size}, batch {args.batch}, {args.threads} thread(s), PyTorch attn {attn}: "
          f"{args.steps} paired single steps per setting after 2 warm-ups each, order alternating", flush=True)
    for request in ("forward", "probe", "full"):
        if request == "forward":
            set_trainable(model, probe=False)

            def step():
                model(pixel_values=x).logits
        else:
            params = set_trainable(model, probe=request == "probe")
            opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

            def step(opt=opt, params=params):
                sam_step(model, opt, params, x, y)
        for _ in range(2):
            once(step)
            ours(request)
        theirs, mine = [], []
        for i in range(args.steps):
            if i % 2 == 0:
                theirs.append(once(step))
                mine.append(ours(request))
            else:
                mine.append(ours(request))
                theirs.append(once(step))
        ratios = [o / t for o, t in zip(mine, theirs)]
        med_t, med_o = statistics.median(theirs), statistics.median(mine)
        print(f"  {request:<8} PyTorch {rng(theirs, 0)} ms (median {med_t:.0f}), samhost {rng(mine, 0)} ms "
              f"(median {med_o:.0f}); ratio of medians {med_o / med_t:.2f}; per pair {rng(ratios, 2)} "
              f"(median {statistics.median(ratios):.2f})", flush=True)
    proc.stdin.close()
    proc.wait()


def run(size, attn):
    model, x, y = setup(size, attn)
    print(f"ViT-S/14 (transformers, attn {attn}), {size}x{size}, batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s): ms (median of 3 after 2 warm-ups), "
          f"{args.rounds} rounds", flush=True)
    fwd, probe, full = [], [], []
    for _ in range(args.rounds):
        f, p, s = torch_round(model, x, y)
        fwd.append(f)
        probe.append(p)
        full.append(s)
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
            if args.samhost_bin and args.pair == "steps":
                paired_steps(size, attn)
            elif args.samhost_bin:
                paired(size, attn)
            else:
                run(size, attn)


if __name__ == "__main__":
    main()
