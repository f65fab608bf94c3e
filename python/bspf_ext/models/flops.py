"""FLOPs of the ViT/DeiT models per layer and per model, counting what the code runs.

Counting rules (docs/models.md says why):
* Every floating-point multiply, add, subtract, divide, max/compare, exp, log and sqrt is
  one operation; a multiply-add is two. Totals are therefore about twice the "GFLOPs"
  (multiply-accumulates) that timm/fvcore tables quote for the same model.
* Dense attention is counted as the textbook algorithm SDPA implements: N² logits,
  a full softmax (max, subtract, exp, sum, divide), N² · Dv for A·V.
* Chunk attention is counted as ChunkAttention runs: ⌈N/Ω⌉ chunks of Ω² (the last padded).
* BSPF attention is counted as the CPU scalar kernel runs: the upper triangle of X Xᵀ
  (diagonal included) once, the 3×3 scores of every upper off-diagonal block with k > 0
  ((3r−2)(3c−2) multiply-adds for an r×c block: out-of-block neighbours are skipped),
  the top-k selection as an ESTIMATE of 3 comparisons per scored entry (introselect's
  expected 2–3.4 n; the kernel skips it when k ≥ r·c), the chunk cosines for ordered
  pairs, the row softmax over all N keys (exp evaluated twice per entry: once for the
  log-sum-exp, once for P), the row sums over all N entries, one divide per kept entry
  and A·V on kept entries only. Fusion depends on the data; it is counted at its UPPER
  BOUND (every pruned entry whose target could be kept: min(r·c − k, r·min(c, k)) per
  block and orientation) and flagged as such.
* Integer and bit work (mask words, popcounts, index arithmetic) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from ..ops.geometry import keep_count
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "AttentionFlops",
    "LayerFlops",
    "ModelFlops",
    "attention_core_flops",
    "count_flops",
    "format_flops_table",
    "format_attention_breakdown",
]

# Expected comparisons per element of std::nth_element (introselect); an estimate.
SELECTION_COMPARISONS_PER_ENTRY = 3
# A LayerNorm per token of width C: mean, variance, normalise, affine ~ 8 operations per element.
LAYERNORM_OPS_PER_ELEMENT = 8


@dataclass
class AttentionFlops:
    """The attention core (after projections) of one (batch, head) pair."""

    kind: str
    parts: dict
    kept_entries: int
    upper_bound_parts: tuple = ()

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class LayerFlops:
    index: int
    attention: str
    parts: dict
    core: AttentionFlops  # per (batch, head) pair; parts["attention core"] is it times B·H

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class ModelFlops:
    label: str
    config: ViTConfig
    batch_size: int
    embed: int
    layers: list = field(default_factory=list)
    head: int = 0

    @property
    def total(self) -> int:
        return self.embed + sum(layer.total for layer in self.layers) + self.head

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "batch_size": self.batch_size,
            "embed": self.embed,
            "head": self.head,
            "total": self.total,
            "layers": [
                {
                    "index": layer.index,
                    "attention": layer.attention,
                    "parts": dict(layer.parts),
                    "total": layer.total,
                    "core_per_head": dict(layer.core.parts),
                    "core_upper_bounds": list(layer.core.upper_bound_parts),
                    "kept_entries_per_head": layer.core.kept_entries,
                }
                for layer in self.layers
            ],
        }


def _chunk_sizes(n: int, block_size: int) -> list:
    full, rest = divmod(n, block_size)
    return [block_size] * full + ([rest] if rest else [])


def _dense_core(n: int, d: int, dv: int, blocks_of: list) -> dict:
    """Textbook attention over independent blocks of rows × keys (one block: dense)."""
    entries = sum(rows * keys for rows, keys in blocks_of)
    return {
        "logits": entries * 2 * d,
        "scale": entries,
        "softmax": 5 * entries,
        "A·V": entries * 2 * dv,
    }


def attention_core_flops(
    kind: str,
    num_tokens: int,
    head_dim: int,
    *,
    value_dim: int | None = None,
    block_size: int = 16,
    keep_ratio: float = 0.5,
    fuse: bool = True,
) -> AttentionFlops:
    """Operations of one (batch, head) pair's attention core: kind 'dense', 'chunk' or 'bspf'."""
    n, d = num_tokens, head_dim
    dv = head_dim if value_dim is None else value_dim
    if kind == "dense":
        return AttentionFlops(kind, _dense_core(n, d, dv, [(n, n)]), n * n)
    sizes = _chunk_sizes(n, block_size)
    if kind == "chunk":
        padded = [(block_size, block_size)] * len(sizes)
        return AttentionFlops(kind, _dense_core(n, d, dv, padded), sum(s * s for s in sizes))
    if kind != "bspf":
        raise ValueError(f"kind must be 'dense', 'chunk' or 'bspf', got {kind!r}")

    scoring = selection = fusion_entries = 0
    kept = sum(s * s for s in sizes)
    for m, rows in enumerate(sizes):
        for cols in sizes[m + 1 :]:
            k = keep_count(keep_ratio, rows, cols)
            entries = rows * cols
            kept += 2 * min(k, entries)
            if k <= 0:
                continue
            scoring += 2 * (3 * rows - 2) * (3 * cols - 2)
            if k < entries:
                selection += SELECTION_COMPARISONS_PER_ENTRY * entries
            pruned = entries - min(k, entries)
            # Both orientations of the block: rows of chunk m into chunk n, and the mirror.
            fusion_entries += min(pruned, rows * min(cols, k)) + min(pruned, cols * min(rows, k))
    chunks = len(sizes)
    parts = {
        "logits": (n * (n + 1) // 2) * (2 * d + 1),
        "scoring": scoring,
        "selection (est.)": selection,
        "matching": n * (2 * d + 1) + sum(s * (s - 1) for s in sizes) * (2 * d + 4) + n,
        # lse: max, subtract, exp, add per entry (+ log, add per row); P: subtract, exp.
        "softmax": 6 * n * n + 2 * n,
        # per fused entry ρ·H·P + target (3); similarity H per (row, other chunk) (2).
        "fusion (bound)": (3 * fusion_entries + 2 * n * max(chunks - 1, 0)) if fuse else 0,
        "normalise": n * n + kept,
        "A·V": kept * 2 * dv,
    }
    return AttentionFlops(kind, parts, kept, ("fusion (bound)",) if fuse else ())


def _linear(tokens: int, fan_in: int, fan_out: int, bias: bool = True) -> int:
    return tokens * fan_out * (2 * fan_in + (1 if bias else 0))


def _layer_flops(config: ViTConfig, index: int, batch_size: int, n: int) -> LayerFlops:
    kind = config.attention_of(index)
    c, heads = config.embed_dim, config.num_heads
    tokens = batch_size * n
    hidden = int(c * config.mlp_ratio)
    core = attention_core_flops(
        kind, n, c // heads, block_size=config.block_size, keep_ratio=config.keep_ratio, fuse=config.fuse
    )
    projections = 2 if kind == "bspf" else 3  # BSPF: one shared q/k projection and v
    parts = {
        "norms+residuals": 2 * tokens * c * LAYERNORM_OPS_PER_ELEMENT + 2 * tokens * c,
        "q/k/v projections": _linear(tokens, c, projections * c, config.qkv_bias),
        "attention core": batch_size * heads * core.total,
        "output projection": _linear(tokens, c, c),
        "mlp": _linear(tokens, c, hidden) + tokens * hidden + _linear(tokens, hidden, c),  # GELU: 1 per element
    }
    return LayerFlops(index, kind, parts, core)


def count_flops(
    model: Union[VisionTransformer, ViTConfig],
    batch_size: int = 1,
    label: str | None = None,
    tokens: Sequence[int] | None = None,
) -> ModelFlops:
    """Operations of one forward pass of a bspf_ext ViT/DeiT (or of its config) on
    `batch_size` images, per layer and in total (see the module doc for the rules).

    `tokens` gives the sequence length each block runs on, for models whose token count
    shrinks (token pruning); None means every block sees all config.num_tokens tokens."""
    config = model.config if isinstance(model, VisionTransformer) else model
    if not isinstance(config, ViTConfig):
        raise TypeError(f"model must be a bspf_ext VisionTransformer or a ViTConfig, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if tokens is None:
        tokens = [config.num_tokens] * config.depth
    tokens = [int(t) for t in tokens]
    if len(tokens) != config.depth or any(not 1 <= t <= config.num_tokens for t in tokens):
        raise ValueError(
            f"tokens must give {config.depth} sequence lengths in [1, {config.num_tokens}], got {tokens!r}"
        )
    c, patches = config.embed_dim, config.grid_size**2
    embed = _linear(batch_size * patches, config.in_chans * config.patch_size**2, c) + batch_size * config.num_tokens * c
    head = batch_size * tokens[-1] * c * LAYERNORM_OPS_PER_ELEMENT  # the final norm runs on every token
    if config.num_classes:
        head += _linear(batch_size, c, config.num_classes)
    layers = [_layer_flops(config, i, batch_size, tokens[i]) for i in range(config.depth)]
    if label is None:
        label = config.attention if config.attention_layers is None else f"{config.attention}@{list(config.attention_layers)}"
    return ModelFlops(label, config, batch_size, embed, layers, head)


def _giga(value: int) -> str:
    return f"{value / 1e9:.4f}"


def format_flops_table(*counts: ModelFlops) -> str:
    """Per-layer and total GFLOPs of several models side by side (e.g. dense and BSPF), with
    the ratio of each to the first."""
    if not counts:
        raise ValueError("format_flops_table needs at least one ModelFlops")
    depth = len(counts[0].layers)
    if any(len(c.layers) != depth for c in counts):
        raise ValueError("the models to compare must have the same depth")
    header = ["layer"] + [f"{c.label} (attn)" for c in counts] + [f"{c.label} GFLOPs" for c in counts]
    header += [f"{c.label}/{counts[0].label}" for c in counts[1:]]
    rows = [["embed", *[""] * len(counts), *[_giga(c.embed) for c in counts], *[f"{c.embed / counts[0].embed:.3f}" for c in counts[1:]]]]
    for i in range(depth):
        layers = [c.layers[i] for c in counts]
        rows.append(
            [str(i)]
            + [layer.attention for layer in layers]
            + [_giga(layer.total) for layer in layers]
            + [f"{layer.total / layers[0].total:.3f}" for layer in layers[1:]]
        )
    rows.append(["norm+head", *[""] * len(counts), *[_giga(c.head) for c in counts], *[f"{c.head / counts[0].head:.3f}" for c in counts[1:]]])
    rows.append(["total", *[""] * len(counts), *[_giga(c.total) for c in counts], *[f"{c.total / counts[0].total:.3f}" for c in counts[1:]]])
    bounds = any(layer.core.upper_bound_parts for c in counts for layer in c.layers)
    note = "\nBSPF fusion is counted at its upper bound; selection is an estimate." if bounds else ""
    return _render(header, rows) + note


def format_attention_breakdown(*counts: ModelFlops, layer: int = 0) -> str:
    """One layer's attention core per (batch, head) pair, part by part, side by side."""
    cores = [c.layers[layer].core for c in counts]
    names = []
    for core in cores:
        names += [name for name in core.parts if name not in names]
    header = ["part"] + [f"{c.label} MFLOPs" for c in counts]
    rows = [[name] + [f"{core.parts.get(name, 0) / 1e6:.4f}" for core in cores] for name in names]
    rows.append(["total"] + [f"{core.total / 1e6:.4f}" for core in cores])
    rows.append(["kept entries"] + [str(core.kept_entries) for core in cores])
    return _render(header, rows)


def _render(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if j else str(v).ljust(w) for j, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
