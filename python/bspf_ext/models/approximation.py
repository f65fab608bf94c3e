"""How well a converted BSPF layer approximates itself without pruning: the approximation
metric of docs/models.md ("Conversion from dense checkpoints").

For a trained dense model and a batch of images, every attention layer's input x_l is
recorded from the dense forward pass. Each layer is converted (attention_from_dense, W_qk
by `qk_init`) and run on x_l at keep_ratio 1 (y¹, nothing pruned) and at keep_ratio r
(yʳ); the metric is the relative error ‖yʳ − y¹‖_F / ‖y¹‖_F over the batch, for every r,
fusion on/off and scoring kind. It isolates what the pruning costs from what the
conversion costs (W_q ≠ W_k is not representable by one W_qk): the latter is reported
separately as ‖y¹ − y_dense‖_F / ‖y_dense‖_F. No training anywhere: these are the layers as
converted, the shape of the paper's Tables 6 (scoring) and 7 (keep ratio).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._checks import check_choice
from ..nn import SCORINGS, DenseAttention
from ..ops.validation import check_block_size, check_keep_ratio
from .convert import QK_INITS, attention_from_dense
from .vit import VisionTransformer

__all__ = ["KEEP_RATIOS", "attention_inputs", "approximation_errors", "format_approximation_table"]

KEEP_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@torch.no_grad()
def attention_inputs(model: VisionTransformer, images: Tensor) -> list:
    """The input of every block's attention layer (after its norm) in a forward pass of `model`."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a bspf_ext VisionTransformer, got {type(model).__name__}")
    recorded, hooks = [], []
    for block in model.blocks:
        hooks.append(block.attn.register_forward_hook(lambda module, args, out: recorded.append(args[0].detach())))
    try:
        model.eval()
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


@torch.no_grad()
def approximation_errors(
    model: VisionTransformer,
    images: Tensor,
    *,
    keep_ratios: Sequence[float] = KEEP_RATIOS,
    fuses: Iterable[bool] = (True, False),
    scorings: Iterable[str] = SCORINGS,
    block_size: int = 16,
    qk_init: str = "spectral",
) -> dict:
    """{"conversion": [per layer: ‖y¹ − y_dense‖/‖y_dense‖], "rows": [{layer, scoring, fuse,
    keep_ratio, relative_error}]} for a dense `model` (every block dense) on `images`.
    The "learned" scoring is taken at its initialisation (θ = 0), as converted."""
    keep_ratios = [check_keep_ratio(r, "keep_ratios") for r in keep_ratios]
    scorings = [check_choice("scorings", s, SCORINGS) for s in scorings]
    fuses = [bool(f) for f in fuses]
    check_block_size(block_size)
    check_choice("qk_init", qk_init, QK_INITS)
    layers = [block.attn for block in model.blocks]
    if not all(isinstance(attn, DenseAttention) for attn in layers):
        raise ValueError("approximation_errors needs a dense model (every block's attention a DenseAttention)")
    inputs = attention_inputs(model, images)
    conversion, rows = [], []
    for index, (attn, x) in enumerate(zip(layers, inputs)):
        dense_out = attn(x)
        for scoring in scorings:
            for fuse in fuses:
                converted = attention_from_dense(attn, qk_init=qk_init, block_size=block_size, keep_ratio=1.0,
                                                 fuse=fuse, scoring=scoring).eval()
                full = converted(x)
                if scoring == scorings[0] and fuse == fuses[0]:
                    conversion.append(_relative(full, dense_out))
                for ratio in keep_ratios:
                    converted.keep_ratio = ratio
                    rows.append({"layer": index, "scoring": scoring, "fuse": fuse, "keep_ratio": ratio,
                                 "relative_error": _relative(converted(x), full)})
    return {"conversion": conversion, "rows": rows, "keep_ratios": keep_ratios, "scorings": scorings,
            "fuses": fuses, "block_size": block_size, "qk_init": qk_init, "num_images": int(images.shape[0])}


def format_approximation_table(result: dict) -> str:
    """Rows: keep ratios; columns: scoring × fusion; cells: the mean over layers of the
    relative error against keep_ratio 1 (and the per-layer range)."""
    columns = [(s, f) for s in result["scorings"] for f in result["fuses"]]
    header = ["keep ratio"] + [f"{s} {'fused' if f else 'no-fusion'}" for s, f in columns]
    lines = [header]
    for ratio in result["keep_ratios"]:
        line = [f"{ratio:.1f}"]
        for scoring, fuse in columns:
            errors = [r["relative_error"] for r in result["rows"]
                      if r["keep_ratio"] == ratio and r["scoring"] == scoring and r["fuse"] == fuse]
            line.append(f"{100 * sum(errors) / len(errors):.1f}% ({100 * min(errors):.0f}-{100 * max(errors):.0f})")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    render = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    conversion = ", ".join(f"{100 * e:.1f}%" for e in result["conversion"])
    return "\n".join(
        [render(lines[0]), "  ".join("-" * w for w in widths)] + [render(line) for line in lines[1:]]
        + ["", f"cells: mean over the {len(result['conversion'])} layers of ‖y_r − y_1‖/‖y_1‖ (min-max over layers), "
               f"{result['num_images']} images, block size {result['block_size']}, qk_init {result['qk_init']!r}",
           f"conversion itself (keep 1 vs the dense layer), per layer: {conversion}"]
    )
