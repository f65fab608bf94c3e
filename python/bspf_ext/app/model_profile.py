"""Where a whole model's inference time goes, by kind of operation
(`bspf-ext bench --model M --profile`): the attention operator, the matrix products of the
projections and the MLP, copies and casts, GELU, layer norms, additions, and the rest.

Each variant is profiled with torch.profiler over a few forwards at one batch size; an
operation's self time (excluding the operations it calls) goes to its kind, so every
millisecond is counted once. The numbers are per forward, in ms. Profiling slows small
operations a little, so the totals run above the timed latencies of `model_bench`; the
split between kinds is what to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .model_bench import VARIANTS, _check_model_name, _parse_device, build_variant, cpu_threads, machine

__all__ = ["KINDS", "kind_of", "profile_models", "format_profile", "run"]

# kind -> the operations (torch.profiler names) it holds; everything else is "other".
KINDS = {
    "attention op": ("bspf_ext::forward", "aten::_scaled_dot_product_flash_attention_for_cpu",
                     "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                     "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"),
    "matmul (projections, MLP)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                                  "aten::linear"),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous",
                         "aten::cat", "aten::constant_pad_nd", "aten::fill_", "aten::zero_"),
    "gelu": ("aten::gelu",),
    "layer norm": ("aten::native_layer_norm", "aten::layer_norm"),
    "residual adds": ("aten::add", "aten::add_"),
}
_KIND_OF = {name: kind for kind, names in KINDS.items() for name in names}


def kind_of(op_name: str) -> str:
    """The kind a profiled operation's time counts under."""
    return _KIND_OF.get(op_name, "other")


def profile_models(model: str = "deit_small", batch: int = 8, *, variants: Sequence[str] = VARIANTS,
                   device: str = "cpu", img_size: int = 224, rounds: int = 2, warmup: int = 1, block_size: int = 16,
                   keep_ratio: float = 0.5, depth=None) -> dict:
    """{variant: {kind: ms per forward}} (dense always included), from `rounds` profiled
    forwards after `warmup` untimed ones, under torch.inference_mode."""
    from torch.profiler import ProfilerActivity, profile

    _check_model_name(model)
    torch_device = _parse_device(device)
    if torch_device.type != "cpu":
        raise ValueError(f"--profile splits CPU time; device must be the CPU, got {device!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(batch))
    result = {}
    for name in dict.fromkeys(["dense", *variants]):
        torch.manual_seed(0)
        net = build_variant(model, name, img_size=img_size, block_size=block_size, keep_ratio=keep_ratio, depth=depth)
        with torch.inference_mode():
            for _ in range(warmup):
                net(images)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(rounds):
                    net(images)
        kinds = dict.fromkeys([*KINDS, "other"], 0.0)
        for event in prof.key_averages():
            kinds[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / rounds
        kinds["total"] = sum(kinds.values())
        result[name] = kinds
    return result


def format_profile(profile: dict) -> str:
    """A markdown table: one row per kind, one column per variant (ms per forward)."""
    names = list(profile)
    kinds = [*KINDS, "other", "total"]
    lines = ["| ms per forward | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for kind in kinds:
        cells = " | ".join(f"{profile[name][kind]:.1f}" for name in names)
        lines.append(f"| {kind} | {cells} |")
    return "\n".join(lines)


def run(model: str, batch: int, out, *, threads: Optional[int] = None, **options) -> dict:
    """profile_models (with `threads` CPU threads, default torch's), then profile.json and
    profile.md in `out`."""
    with cpu_threads(threads):
        profile = profile_models(model, batch, **options)
        info = machine()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "options": {"model": model, "batch": batch, **options}, "ms_per_forward": profile}
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_profile(profile)
    (out / "profile.md").write_text(table + "\n")
    return {"table": table, "out": str(out), **result}
