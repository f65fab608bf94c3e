"""The paper's FLOPs beside the library's counter (docs/models.md, "The papers' numbers and
ours"): DeiT-T/S at 224 px, Ω = 16, dense, chunk and BSPF at keep ratios 0.4-0.9, in
multiply-accumulates (the library counts operations, a multiply-add as 2: divided by 2 here
to compare with the paper's G), with and without the attention core.

    python tools/paper_flops.py
"""

from bspf_ext.models import ViTConfig, count_flops
from bspf_ext.models.vit import SIZES

# The paper's Table 6/7 (G, as papers quote FLOPs: multiply-accumulates).
PAPER = {"DeiT-T": {"dense": 1.3, 0.4: 0.5, 0.5: 0.6, 0.6: 0.6, 0.7: 0.7, 0.8: 0.9, 0.9: 1.1},
         "DeiT-S": {"dense": 4.6, 0.4: 2.3, 0.5: 2.4, 0.6: 2.7, 0.7: 3.5, 0.8: 3.7, 0.9: 4.0}}


def gmac(config: ViTConfig) -> tuple[float, float]:
    counted = count_flops(config)
    core = sum(layer.parts.get("attention core", 0) for layer in counted.layers)
    return counted.total / 2e9, (counted.total - core) / 2e9


def main() -> None:
    print(f"{'model':8s} {'attention':10s} {'keep':>5s} {'paper G':>8s} {'ours G':>7s} {'ours, core free':>16s} "
          f"{'core share':>11s}")
    for name, size in (("DeiT-T", "tiny"), ("DeiT-S", "small")):
        dim, depth, heads = SIZES[size]
        rows = [("dense", None), ("chunk", None)] + [("bspf", r) for r in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
        for attention, keep in rows:
            config = ViTConfig(embed_dim=dim, depth=depth, num_heads=heads, attention=attention,
                               keep_ratio=0.5 if keep is None else keep)
            total, free = gmac(config)
            paper = PAPER[name].get("dense" if attention == "dense" else keep)
            paper = "-" if paper is None or attention == "chunk" else f"{paper:.1f}"
            print(f"{name:8s} {attention:10s} {'-' if keep is None else f'{keep:.1f}':>5s} {paper:>8s} {total:7.2f} "
                  f"{free:16.2f} {100 * (total - free) / total:10.1f}%")


if __name__ == "__main__":
    main()
