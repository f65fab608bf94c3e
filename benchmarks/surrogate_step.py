"""Times one training step of the demo's micro-ViT (BSPF attention in every block) with a
learned scorer (the score kernel's surrogate gradient, docs/spec.md §4a) against the box
scorer (no gradient for W), in one process, interleaved round by round, on 1 CPU thread by
default. The ratio learned / box is the cost of the surrogate.

    python benchmarks/surrogate_step.py [--rounds 20] [--threads 1] [--device cpu|cuda]

Uses only public names, so it runs on any build (e.g. an older installation's venv).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import bspf_ext
from bspf_ext.models.vit import ViTConfig, VisionTransformer

# The demo's micro-ViT on 32×32 images in 4×4 patches (65 tokens), block 16, keep 0.5.
MICRO = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
             attention="bspf", block_size=16, keep_ratio=0.5)
BATCH = 32


def make_step(scoring: str, device: torch.device):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**MICRO, scoring=scoring)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(2)).to(device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = {name: make_step(name, device) for name in ("box", "learned")}
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, bspf_ext from {bspf_ext.__file__}, {args.threads} thread(s), "
          f"{args.rounds} rounds, device {args.device}, CPU path {bspf_ext.cpu_capability()}")
    for name, ms in median.items():
        print(f"  scoring={name:8s} median step {ms:8.2f} ms")
    print(f"  learned / box = {median['learned'] / median['box']:.2f}")


if __name__ == "__main__":
    main()
