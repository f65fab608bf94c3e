"""The border bias of zero-padded 3×3 scoring, measured (docs/models.md, "The papers'
numbers and ours").

Every off-diagonal Ω×Ω block keeps its best k entries by the 3×3-filtered logits; the
filter is zero-padded at the block's border (docs/spec.md §3, step 2), so a corner entry sums 4 logits
and 5 zeros, an edge entry 6 and 3 zeros, an interior one 9. Over random inputs this
script counts the fraction of entries kept by where they sit in their block (corner, edge,
interior), for the box filter and the centre-only kernel (no neighbours, no padding), with
zero-mean logits and with positively leaning ones (tokens x = noise + λ·√d·u sharing a
common unit direction u, as ViT features do; λ = 0, 0.25, 0.5, 1), and where the class token (token 0, chunk 0, position 0) is kept.

    python tools/border_bias.py [--trials 20] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from bspf_ext.ops import block_mask
from bspf_ext.ops.geometry import box_score_kernel

N, HEAD_DIM, HEADS, BLOCK, KEEP = 197, 64, 6, 16, 0.5


def positions(n: int, block: int):
    """(N, N) masks of off-diagonal entries at block corners, edges and interiors, and of the
    class token's row (query 0 against the other chunks' keys)."""
    starts = list(range(0, n, block))
    kind = torch.full((n, n), -1)
    for i, a0 in enumerate(starts):
        for j, b0 in enumerate(starts):
            if i == j:
                continue
            r, c = min(block, n - a0), min(block, n - b0)
            rows = torch.arange(r)
            cols = torch.arange(c)
            on_row = (rows == 0) | (rows == r - 1)
            on_col = (cols == 0) | (cols == c - 1)
            kind[a0:a0 + r, b0:b0 + c] = on_row[:, None].long() + on_col[None, :].long()  # 2 corner, 1 edge, 0 in
    cls = torch.zeros(n, n, dtype=torch.bool)
    cls[0, block:] = True
    return {"corner": kind == 2, "edge": kind == 1, "interior": kind == 0, "class token row": cls}


def measure(trials: int, seed: int, lean: float, kernel) -> dict:
    """Fractions kept; "mean logit / std": of the scaled logits x_i·x_j/√d, i ≠ j."""
    generator = torch.Generator().manual_seed(seed)
    places = positions(N, BLOCK)
    kept = {name: 0.0 for name in places}
    kept["mean"] = kept["std"] = 0.0
    for _ in range(trials):
        x = torch.randn(2, HEADS, N, HEAD_DIM, generator=generator)
        if lean:
            common = torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator)
            x = x + lean * common / common.norm(dim=-1, keepdim=True) * HEAD_DIM**0.5
        mask = block_mask(x, kernel, block_size=BLOCK, keep_ratio=KEEP).float()
        logits = (x @ x.transpose(-1, -2)) * HEAD_DIM**-0.5
        off = ~torch.eye(N, dtype=torch.bool)
        kept["mean"] += logits[..., off].mean().item() / trials
        kept["std"] += logits[..., off].std().item() / trials
        for name, where in places.items():
            kept[name] += mask[..., where].mean().item() / trials
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    center = torch.zeros(3, 3)
    center[1, 1] = 1.0
    kernels = {"box 3×3 (zero-padded)": box_score_kernel(), "centre only": center}
    print(f"N = {N}, Ω = {BLOCK}, keep_ratio = {KEEP}, head_dim = {HEAD_DIM}, {args.trials} × 2 × {HEADS} random "
          f"(batch, head) inputs, seed {args.seed}; fraction of off-diagonal entries kept")
    header = f"{'scoring':24s} {'logits (mean±std)':18s} {'corner':>7s} {'edge':>7s} {'interior':>9s} {'class token row':>16s}"
    print(header)
    print("-" * len(header))
    for lean in (0.0, 0.25, 0.5, 1.0):
        for name, kernel in kernels.items():
            kept = measure(args.trials, args.seed, lean, kernel)
            logits = f"{kept['mean']:.2f} ± {kept['std']:.2f}"
            print(f"{name:24s} {logits:18s} {100 * kept['corner']:6.1f}% {100 * kept['edge']:6.1f}% "
                  f"{100 * kept['interior']:8.1f}% {100 * kept['class token row']:15.1f}%")


if __name__ == "__main__":
    main()
