"""transformers side of the DINOv2 cross-check (issue #15 item 7); run by benches/peer/dinov2_check.sh.

Step `write OUT`: a small random Dinov2ForImageClassification (LayerScale, biases and the mask token
moved off their initial values) saved with save_pretrained to OUT/cls, its backbone as a Dinov2Model
to OUT/base (the layout of the Hub's facebook/dinov2-*), an input batch at the checkpoint's 28 px and
one at 56 px, with the eval-mode logits for both (transformers interpolates the position embeddings
at every forward; samhost once, at load, with image_size).

Step `check OUT`: loads OUT/samhost_saved (written by samhost's m.save after SAM steps) with
Dinov2ForImageClassification.from_pretrained and compares its logits with samhost's.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model


def main():
    step, out = sys.argv[1], sys.argv[2]
    if step == "write":
        torch.manual_seed(0)
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                           image_size=28, patch_size=14, num_labels=3, layerscale_value=0.5)
        m = Dinov2ForImageClassification(cfg).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lambda1" in n:
                    p.uniform_(0.2, 1.5)
                elif "bias" in n:
                    p.normal_(0, 0.1)
                elif "mask_token" in n:
                    p.normal_(0, 1)
        m.save_pretrained(f"{out}/cls")
        m.dinov2.save_pretrained(f"{out}/base")
        x28, x56 = torch.randn(2, 3, 28, 28), torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            y28, y56 = m(pixel_values=x28).logits, m(pixel_values=x56).logits
        save_file({"x28": x28, "y28": y28, "x56": x56, "y56": y56}, f"{out}/io.safetensors")
        print(f"transformers: wrote {out}/cls, {out}/base and the logits at 28 and 56 px")
    else:
        m = Dinov2ForImageClassification.from_pretrained(f"{out}/samhost_saved").eval()
        io = load_file(f"{out}/samhost_io.safetensors")
        with torch.no_grad():
            y = m(pixel_values=io["x"]).logits
        diff = (y - io["logits"]).abs().max().item()
        print(f"transformers on samhost's saved folder: max |logit diff| {diff:.3e} (max |logit| {y.abs().max().item():.3f})")


if __name__ == "__main__":
    main()
