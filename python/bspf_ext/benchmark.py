"""Quick timing of the operator against dense attention at one shape (`bspf-ext bench`).

Candidates are interleaved round by round and medians reported, so a noisy shared machine
slows all of them alike and the ratios stay meaningful. The pytest-benchmark suites in
benchmarks/ are the full measurements.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ._ops import block_symmetric_attention
from .reference import block_symmetric_attention as reference_attention

__all__ = ["compare_with_dense", "format_rows"]


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return measure


def compare_with_dense(*, batch=8, heads=6, seqlen=197, head_dim=64, block_size=16, keep_ratio=0.5,
                       repeats=20, device="cpu", backward=True, dtype=torch.float32, with_reference=True) -> list[dict]:
    """Median seconds of BSPF, dense SDPA and (optionally) the reference, with ratios to dense."""
    device = torch.device(device)
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

    bspf = lambda a, b: block_symmetric_attention(a, b, block_size=block_size, keep_ratio=keep_ratio)
    dense = lambda a, b: F.scaled_dot_product_attention(a, a, b)
    ref = lambda a, b: reference_attention(a, b, block_size=block_size, keep_ratio=keep_ratio)
    candidates = {"bspf": bspf, "dense sdpa": dense}
    if with_reference:
        candidates["reference"] = ref
    modes = ["forward"] + (["forward+backward"] if backward else [])
    measure = _timer(device)
    rows = []
    for mode in modes:
        fns = {name: run(fn, mode != "forward") for name, fn in candidates.items()}
        for fn in fns.values():
            fn()  # warm-up
        times = {name: [] for name in fns}
        for round_ in range(repeats):
            for name, fn in fns.items():
                if name == "reference" and round_ >= max(3, repeats // 5):
                    continue  # the reference is slow; a few rounds suffice
                times[name].append(measure(fn))
        dense_median = statistics.median(times["dense sdpa"])
        for name, ts in times.items():
            median = statistics.median(ts)
            rows.append({"mode": mode, "name": name, "ms": 1e3 * median, "vs_dense": median / dense_median})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'mode':18s} {'candidate':12s} {'median ms':>10s} {'x dense':>8s}"]
    for row in rows:
        lines.append(f"{row['mode']:18s} {row['name']:12s} {row['ms']:10.3f} {row['vs_dense']:8.2f}")
    return "\n".join(lines)
