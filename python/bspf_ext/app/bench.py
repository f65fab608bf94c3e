"""Timing that survives noisy shared machines, and a quick comparison of the operator with
dense attention at one shape (`bspf-ext bench`).

Candidates are timed in turn within every round and medians reported, so a noisy
neighbour slows all of them alike and the ratios stay meaningful. The benchmark suites
and the CI gate in benchmarks/ use the same two helpers.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import block_symmetric_attention
from ..reference import block_symmetric_attention as reference_attention

__all__ = ["time_call", "interleaved_medians", "compare_with_dense", "format_rows"]


def time_call(fn: Callable[[], None], calls: int = 1, sync: Optional[Callable[[], None]] = None) -> float:
    """Seconds per call, over `calls` back-to-back calls (`sync` waits for a device, if any)."""
    if sync:
        sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - start) / calls


def interleaved_medians(fns: dict, rounds: int, calls: int = 1, warmup: int = 1, sync=None) -> dict:
    """Median seconds per call of each callable, timed in turn within every round so that
    a noisy neighbour slows them all alike; also the median of the per-round ratios to
    fns' first entry (robust to load that changes between rounds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, calls, sync))
    first = next(iter(fns))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(t, times[first])) for name, t in times.items()
    }
    return {"median_s": medians, "ratio_to_" + first: ratios}


def compare_with_dense(*, batch=8, heads=6, seqlen=197, head_dim=64, block_size=16, keep_ratio=0.5,
                       repeats=20, device="cpu", backward=True, dtype=torch.float32, with_reference=True) -> list[dict]:
    """Median milliseconds of BSPF, dense SDPA and (optionally, a few rounds: it is slow)
    the reference, each with its median per-round ratio to dense SDPA."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    qk = torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(qk)
    grad = torch.randn_like(qk)

    def run(attention, with_grad):
        def go():
            if not with_grad:
                with torch.no_grad():
                    attention(qk, v)
                return
            a, b = qk.detach().requires_grad_(), v.detach().requires_grad_()
            torch.autograd.backward(attention(a, b), grad)
        return go

    candidates = {
        "dense sdpa": lambda a, b: F.scaled_dot_product_attention(a, a, b),
        "bspf": lambda a, b: block_symmetric_attention(a, b, block_size=block_size, keep_ratio=keep_ratio),
    }
    reference = lambda a, b: reference_attention(a, b, block_size=block_size, keep_ratio=keep_ratio)
    rows = []
    for mode in ["forward"] + (["forward+backward"] if backward else []):
        fns = {name: run(fn, mode != "forward") for name, fn in candidates.items()}
        main = interleaved_medians(fns, repeats, sync=sync)
        timed = [(name, main) for name in fns]
        if with_reference:  # slow: a few rounds of its own, still against dense
            slow = {"dense sdpa": fns["dense sdpa"], "reference": run(reference, mode != "forward")}
            timed.append(("reference", interleaved_medians(slow, max(3, repeats // 5), sync=sync)))
        for name, result in timed:
            rows.append({"mode": mode, "name": name, "ms": 1e3 * result["median_s"][name],
                         "vs_dense": result["ratio_to_dense sdpa"][name]})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'mode':18s} {'candidate':12s} {'median ms':>10s} {'x dense':>8s}"]
    for row in rows:
        lines.append(f"{row['mode']:18s} {row['name']:12s} {row['ms']:10.3f} {row['vs_dense']:8.2f}")
    return "\n".join(lines)
