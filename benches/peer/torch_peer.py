#!/usr/bin/env python3
"""Times PyTorch CPU eager on exactly the models, batch sizes and optimizer settings of samhost's
speed benchmark (`cargo bench --bench speed`), and prints samhost/PyTorch ratios.

Not run by CI. PyTorch is large (about 5 GB with its CUDA dependencies): install it in a scratch
virtual environment outside the repository, then run

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch
    cargo bench --bench speed                 # writes target/speed.json
    /tmp/torchenv/bin/python benches/peer/torch_peer.py --samhost target/speed.json

Settings mirrored from samhost: SGD(lr=0.01, momentum=0.9); SAM with rho=0.05, the ascent norm
over all parameters, BatchNorm running statistics frozen in the second pass; cross-entropy; the
median of the timed steps after two warm-up steps; 1 and 2 threads.

Paired rounds (`--paired BIN --rounds 3`): for each model and thread count, each round times
PyTorch and then samhost's benchmark child (`BIN --child`, one process per round, the binary that
`cargo bench --bench speed --no-run` names), in alternating order, seconds apart, so that other
tenants' load falls on both sides of a ratio instead of on one side's whole run. Each round prints
its ratios (samhost's SAM/SGD as the median over its steps of each SAM step over the train step
timed just before it; "x floor" as the benchmark prints it, and "pair", the median of each train
step over one pass of the floor's products timed right after it); the summary gives each ratio's
range (min-max) over the rounds:

    cargo bench --bench speed --no-run 2>&1 | grep Executable   # target/release/deps/speed-<hash>
    /tmp/torchenv/bin/python benches/peer/torch_peer.py --paired target/release/deps/speed-<hash> \\
        --models resnet20,resnet32,wrn-16-8 --rounds 3
"""

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class Cnn(nn.Module):
    """Per stage a 3x3 conv (padding 1) + ReLU + 2x2 max-pool; hidden linear + ReLU; classifier."""

    def __init__(self, channels=(32, 64, 128), hidden=256, classes=10, inp=(3, 32, 32)):
        super().__init__()
        convs, c, h, w = [], inp[0], inp[1], inp[2]
        for out in channels:
            convs.append(nn.Conv2d(c, out, 3, padding=1))
            c, h, w = out, h // 2, w // 2
        self.convs = nn.ModuleList(convs)
        self.hidden = nn.Linear(c * h * w, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.out(F.relu(self.hidden(x.flatten(1))))


class BasicBlockA(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = c_out - c_in
        self.stride = stride

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.stride != 1 or self.pad:
            x = x[:, :, :: self.stride, :: self.stride]
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(h + x)


class CifarResNet(nn.Module):
    def __init__(self, depth=20, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c = [], 16
        for g, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlockA(c, width, 2 if g > 0 and i == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(x.mean((2, 3)))


class WideBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.short = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (x if self.short is None else self.short(a))


class WideResNet(nn.Module):
    def __init__(self, depth=16, k=8, classes=10):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, c = [], 16
        for g, width in enumerate((16 * k, 32 * k, 64 * k)):
            for i in range(n):
                blocks.append(WideBlock(c, width, 2 if g > 0 and i == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.bn1 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.blocks(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class VitLayer(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-12)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d, eps=1e-12)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Vit(nn.Module):
    def __init__(self, image=224, patch=16, d=384, depth=12, heads=6, mlp=1536, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, d))
        self.layers = nn.Sequential(*[VitLayer(d, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.layers(x))[:, 0])


# name -> (constructor, input shape, batch, timed steps); the same rows as samhost's benchmark.
MODELS = {
    "mlp": (lambda: Mlp([3072, 512, 512, 10]), (3, 32, 32), 128, 10),
    "cnn": (lambda: Cnn(), (3, 32, 32), 128, 10),
    "resnet20": (lambda: CifarResNet(20), (3, 32, 32), 128, 10),
    "resnet32": (lambda: CifarResNet(32), (3, 32, 32), 128, 5),
    "wrn-16-8": (lambda: WideResNet(16, 8), (3, 32, 32), 16, 10),
    "wrn-b128": (lambda: WideResNet(16, 8), (3, 32, 32), 128, 3),
    "vit-s16": (lambda: Vit(), (3, 224, 224), 8, 5),
}


def set_bn_momentum(model, momentum):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


def sgd_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sam_step(model, opt, x, y, rho=0.05):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad * p.grad).sum() for p in params))
        scale = rho / (norm + 1e-12)
        es = []
        for p in params:
            e = p.grad * scale
            p.add_(e)
            es.append(e)
    opt.zero_grad(set_to_none=True)
    set_bn_momentum(model, 0.0)
    F.cross_entropy(model(x), y).backward()
    set_bn_momentum(model, 0.1)
    with torch.no_grad():
        for p, e in zip(params, es):
            p.sub_(e)
    opt.step()


def time_model(name, threads):
    make, shape, batch, steps = MODELS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make()
    model.train()
    x = torch.randn(batch, *shape)
    y = torch.arange(batch) % 10
    row = {"model": name, "threads": threads, "batch": batch}
    for kind, step in (("train_step", sgd_step), ("sam_step", sam_step)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(2):
            step(model, opt, x, y)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step(model, opt, x, y)
            times.append((time.perf_counter() - t) * 1e3)
        row[kind] = statistics.median(times)
    return row


def samhost_row(binary, name, threads):
    """One run of samhost's benchmark child for one model and thread count: its JSON row."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), SAMHOST_BENCH_MODELS=name)
    out = subprocess.run([binary, "--child"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {binary} --child failed for {name} at {threads} thread(s):\n{out.stderr}")
    rows = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if len(rows) != 1:
        raise SystemExit(f"error: {binary} --child printed {len(rows)} rows for {name}, expected 1")
    return rows[0]


def rng(values):
    return f"{min(values):.2f}-{max(values):.2f}"


def paired(args):
    """Alternating rounds of PyTorch and samhost per model and thread count; ratios per round."""
    print(f"torch {torch.__version__}; samhost {args.paired}; {args.rounds} paired rounds, order alternating")
    print(f"{'model':<10} {'thr':>3} {'round':>5} {'first':>7} {'torch sgd':>9} {'ours sgd':>8} {'sgd ratio':>9}"
          f" {'torch sam':>9} {'ours sam':>8} {'sam ratio':>9} {'ours sam/sgd':>12} {'x floor':>7} {'pair':>5}")
    summary = []
    for name in args.models.split(","):
        for t in (int(v) for v in args.threads.split(",")):
            sgd, sam, ours_ratio, floor, floor_pair = [], [], [], [], []
            for r in range(args.rounds):
                if r % 2 == 0:
                    theirs, ours = time_model(name, t), samhost_row(args.paired, name, t)
                else:
                    ours, theirs = samhost_row(args.paired, name, t), time_model(name, t)
                sgd.append(ours["train_step"] / theirs["train_step"])
                sam.append(ours["sam_step"] / theirs["sam_step"])
                ours_ratio.append(ours.get("sam_over_sgd", ours["sam_step"] / ours["train_step"]))
                floor.append(ours["train_step"] / ours["floor_ms"])
                floor_pair.append(ours.get("x_floor_paired", float("nan")))
                print(f"{name:<10} {t:>3} {r + 1:>5} {'torch' if r % 2 == 0 else 'ours':>7}"
                      f" {theirs['train_step']:>9.1f} {ours['train_step']:>8.1f} {sgd[-1]:>9.2f}"
                      f" {theirs['sam_step']:>9.1f} {ours['sam_step']:>8.1f} {sam[-1]:>9.2f}"
                      f" {ours_ratio[-1]:>12.2f} {floor[-1]:>7.2f} {floor_pair[-1]:>5.2f}", flush=True)
            summary.append((name, t, sgd, sam, ours_ratio, floor, floor_pair))
    print(f"\nsummary (min-max over {args.rounds} paired rounds; ratio = samhost / PyTorch)")
    print(f"{'model':<10} {'thr':>3} {'sgd ratio':>10} {'sam ratio':>10} {'ours sam/sgd':>12} {'x floor':>10}"
          f" {'x floor pair':>12}")
    for name, t, sgd, sam, ours_ratio, floor, floor_pair in summary:
        print(f"{name:<10} {t:>3} {rng(sgd):>10} {rng(sam):>10} {rng(ours_ratio):>12} {rng(floor):>10}"
              f" {rng(floor_pair):>12}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samhost", help="JSON written by `cargo bench --bench speed` (target/speed.json)")
    ap.add_argument("--paired", metavar="BIN", help="samhost's speed benchmark binary: paired rounds (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds per model and thread count")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    if args.paired:
        paired(args)
        return
    ours = {}
    if args.samhost:
        with open(args.samhost) as f:
            for r in json.load(f):
                ours[(r["model"], r["threads"])] = r
    print(f"torch {torch.__version__}")
    hdr = f"{'model':<10} {'thr':>3} {'batch':>5} {'torch sgd ms':>12} {'torch sam ms':>12} {'sam/sgd':>7}"
    if ours:
        hdr += f" {'ours sgd ms':>11} {'ours sam ms':>11} {'sgd ratio':>9} {'sam ratio':>9}"
    print(hdr)
    for name in args.models.split(","):
        for t in (int(v) for v in args.threads.split(",")):
            r = time_model(name, t)
            line = (
                f"{name:<10} {t:>3} {r['batch']:>5} {r['train_step']:>12.2f} {r['sam_step']:>12.2f}"
                f" {r['sam_step'] / r['train_step']:>7.2f}"
            )
            o = ours.get((name, t))
            if o:
                line += (
                    f" {o['train_step']:>11.2f} {o['sam_step']:>11.2f}"
                    f" {o['train_step'] / r['train_step']:>9.2f} {o['sam_step'] / r['sam_step']:>9.2f}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
