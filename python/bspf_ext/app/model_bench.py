"""Whole-model throughput: images/s and latency of a ViT/DeiT with dense, chunk or BSPF
attention, or with SViT token gating, across batch sizes (`bspf-ext bench --model ...`).

Every variant is the same architecture at the same image size with random weights (speed
does not depend on training, except SViT's: see below), run under torch.inference_mode.
Per batch size, the variants are warmed up, then timed in turn within every round
(`interleaved_medians`), so a noisy neighbour slows them all alike; the table gives the
median latency of one batch, images/s from it, and the median per-round time ratio to
dense attention as a speed-up.

SViT's speed depends on how many tokens its trained gates keep. An untrained gate keeps
almost everything, so here each gate keeps exactly SViT's default target fraction of the
tokens (svit_keep_targets: 0.7, 0.49, 0.343 over blocks 3-11 of 12), those with the
largest keep-logit margin: the token counts a trained SViT runs on, with the gates' own cost.
"""

from __future__ import annotations

import json
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import models
from ..models.vit import SIZES
from ..pruning import GatedBlock, SelectiveGate, svit_keep_targets
from ..pruning.gating import KEEP
from .bench import interleaved_medians

__all__ = ["MODELS", "VARIANTS", "build_variant", "benchmark_models", "format_table", "draw_throughput", "run"]

MODELS = tuple(f"{family}_{size}" for family in ("deit", "vit") for size in SIZES)
VARIANTS = ("dense", "chunk", "bspf", "svit")
SVIT_FIRST_GATED = 3  # SViT gates blocks 3 ... depth-1 (0-based) of a 12-block ViT


class FixedRatioGate(SelectiveGate):
    """A SelectiveGate that, at inference, keeps exactly `keep_ratio` of the tokens (the
    class token and those with the largest keep-minus-prune logit margin)."""

    def __init__(self, dim: int, keep_ratio: float, **options):
        super().__init__(dim, **options)
        self.keep_ratio = keep_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        logits = self.logits(x).float()
        margin = logits[..., KEEP] - logits[..., 1 - KEEP]
        if self.has_class_token:
            margin[:, 0] = float("inf")
        count = max(1, round(self.keep_ratio * x.shape[1]))
        keep = torch.zeros_like(margin)
        keep.scatter_(1, margin.topk(count, dim=1).indices, 1.0)
        return keep.to(x.dtype)


def _check_model_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
    return name


def build_variant(model: str, variant: str, *, img_size: int = 224, block_size: int = 16, keep_ratio: float = 0.5,
                  num_classes: int = 1000, depth: Optional[int] = None) -> torch.nn.Module:
    """One benchmark model, in eval mode, on the CPU. `depth` overrides the block count (tests)."""
    _check_model_name(model)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    builder = getattr(models, model)
    attention = "dense" if variant == "svit" else variant
    extra = {} if depth is None else {"depth": depth}
    vit = builder(attention, img_size=img_size, block_size=block_size, keep_ratio=keep_ratio,
                  num_classes=num_classes, **extra)
    if variant == "svit":
        blocks = list(vit.blocks)
        gated = list(range(min(SVIT_FIRST_GATED, len(blocks) - 1), len(blocks)))
        targets = dict(zip(gated, svit_keep_targets(len(gated), stages=min(3, len(gated)))))
        dim = vit.config.embed_dim
        vit.blocks = torch.nn.Sequential(*(
            GatedBlock(block, dim, gate=FixedRatioGate(dim, targets[i])) if i in targets else block
            for i, block in enumerate(blocks)
        ))
    return vit.eval()


def _parse_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    return parsed


def benchmark_models(model: str = "deit_small", batches: Sequence[int] = (1, 8, 32, 64), *,
                     variants: Sequence[str] = VARIANTS, device: str = "cpu", img_size: int = 224,
                     rounds: int = 5, warmup: int = 1, block_size: int = 16, keep_ratio: float = 0.5,
                     depth: Optional[int] = None, progress: bool = True) -> list[dict]:
    """Rows of {model, batch, variant, latency_ms, images_per_s, speedup_vs_dense} per batch
    size and variant (dense is always timed, as the reference of the speed-up)."""
    _check_model_name(model)
    torch_device = _parse_device(device)
    variants = list(dict.fromkeys(["dense", *variants]))
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"variants must be among {list(VARIANTS)}, got {name!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be positive ints, got {list(batches)!r}")
    built = {}
    for name in variants:
        torch.manual_seed(0)
        built[name] = build_variant(model, name, img_size=img_size, block_size=block_size, keep_ratio=keep_ratio,
                                    depth=depth).to(torch_device)
    sync = (lambda: torch.cuda.synchronize(torch_device)) if torch_device.type == "cuda" else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(variants) * (warmup + rounds), desc=f"bench {model}", unit="batch")
    rows = []
    try:
        for batch in batches:
            images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
            images = images.to(torch_device)

            def timed(net, label):
                def call():
                    net(images)
                    if bar is not None:
                        bar.set_postfix_str(f"batch {batch}, {label}", refresh=False)
                        bar.update()
                return call

            with torch.inference_mode():
                result = interleaved_medians({name: timed(built[name], name) for name in variants},
                                             rounds, warmup=warmup, sync=sync)
            for name in variants:
                seconds = result["median_s"][name]
                rows.append({
                    "model": model, "batch": batch, "variant": name, "latency_ms": 1e3 * seconds,
                    "images_per_s": batch / seconds, "speedup_vs_dense": 1.0 / result["ratio_to_dense"][name],
                })
    finally:
        if bar is not None:
            bar.close()
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table: one row per (model, batch, variant)."""
    lines = ["| model | batch | variant | latency (ms / batch) | images/s | speed-up vs dense |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['batch']} | {row['variant']} | {row['latency_ms']:.1f} | "
                     f"{row['images_per_s']:.1f} | {row['speedup_vs_dense']:.2f}× |")
    return "\n".join(lines)


def draw_throughput(rows: Sequence[dict], path, *, title: str = "") -> Path:
    """Images/s against batch size, one line per variant (and model)."""
    from .viz import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key in dict.fromkeys((row["model"], row["variant"]) for row in rows):
        points = sorted((row["batch"], row["images_per_s"]) for row in rows if (row["model"], row["variant"]) == key)
        ax.plot(*zip(*points), marker="o", label=" ".join(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(title or "whole-model throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


@contextmanager
def cpu_threads(threads: Optional[int]):
    """torch's CPU thread count set to `threads` (None: left as it is) inside, restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(model: str, batches: Sequence[int], out, *, threads: Optional[int] = None, **options) -> dict:
    """benchmark_models (with `threads` CPU threads, default torch's), then results.json,
    table.md and throughput.png in `out`."""
    with cpu_threads(threads):
        rows = benchmark_models(model, batches, **options)
        info = machine()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "options": {"model": model, "batches": list(batches), **options}, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    device = options.get("device", "cpu")
    draw_throughput(rows, out / "throughput.png", title=f"{model}, {options.get('img_size', 224)} px, {device}")
    return {"table": table, "out": str(out), **result}
