"""PyTorch side of the state-dict cross-check for models written in the script (issue #21).

Step `torch`: builds an nn.Sequential with the layers samhost's `sequential([...])` mirrors (a
conv stem with BatchNorm, a residual block with a projection shortcut, max-pooling, adaptive average
pooling, flatten, dropout, linear), moves its BatchNorm statistics off their initial values with a few
training-mode passes, and writes OUT/torch.safetensors (its state_dict, num_batches_tracked
included) and OUT/io.safetensors (an input batch and the eval-mode logits).

Step `check`: loads OUT/samhost.safetensors (the weights samhost saved after training the model a few
SAM steps) into a fresh nn.Sequential with load_state_dict(strict=True) and compares its eval-mode
logits with OUT/samhost_logits.safetensors.

Run by benches/peer/sequential_state_dict.sh; needs torch and safetensors (a scratch venv outside
the repository, e.g. /tmp/torchenv).
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Residual(nn.Module):
    """x + body(x), with samhost's tensor names: body layers 0, 1, ..., a projection `shortcut`."""

    def __init__(self, body, shortcut=None):
        super().__init__()
        for i, layer in enumerate(body):
            self.add_module(str(i), layer)
        self.n = len(body)
        self.shortcut = nn.Sequential(*shortcut) if shortcut else None

    def forward(self, x):
        y = x
        for i in range(self.n):
            y = getattr(self, str(i))(y)
        return y + (self.shortcut(x) if self.shortcut is not None else x)


def build():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Residual(
            [nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
             nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)],
            [nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)],
        ),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(16, 5),
    )


def main():
    step, out = sys.argv[1], sys.argv[2]
    if step == "torch":
        torch.manual_seed(0)
        m = build()
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(16, 3, 16, 16))
        m.eval()
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            logits = m(x)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{out}/torch.safetensors")
        save_file({"x": x, "logits": logits}, f"{out}/io.safetensors")
        print(f"torch: wrote {len(m.state_dict())} tensors")
    else:
        m = build()
        m.load_state_dict(load_file(f"{out}/samhost.safetensors"), strict=True)
        m.eval()
        x = load_file(f"{out}/io.safetensors")["x"]
        with torch.no_grad():
            logits = m(x)
        theirs = load_file(f"{out}/samhost_logits.safetensors")["logits"]
        diff = (logits - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        print(f"PyTorch on samhost's trained weights (strict load): max |logit diff| {diff:.3e} (max |logit| {scale:.3f})")


if __name__ == "__main__":
    main()
