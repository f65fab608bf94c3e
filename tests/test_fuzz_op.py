"""A fuzz of the public op on CPU: shapes, strides, block sizes, keep_ratio anywhere in
[0, 1], scales tiny, huge and negative, both dtypes, every CPU path this CPU runs, one or
two threads (two threads share a pair where pairs are fewer than threads), and a few draws
with N up to 2048. Every draw must give finite output and gradients equal to the reference
with the kernel's own discrete choices (SPEC §6), and a symmetric mask.

tools/sanitize_cpu.sh runs this file under ASan and UBSan as well: the draws are what
the sanitizers see.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bspf_ext
from bspf_ext import reference
from support import GRAD_RTOL, OUTPUT_RTOL, kernel_choices, random_inputs

LAYOUTS = ["contiguous", "transposed", "expanded", "strided", "narrowed"]
# Multiples of D^-1/2: tiny (every logit ~0, the softmax uniform), ordinary, huge (logits
# in the thousands), and their negatives (the logits' sign flips, the mask stays symmetric).
SCALE_FACTORS = [1e-30, 1e-6, 0.5, 1.0, 30.0, 1e3, -1e-6, -1.0, -1e3]
# "auto" is the best vector path (AVX-512 where the CPU has it); AVX2 forced where it runs.
PATHS = ["auto", "scalar"] + (["avx2"] if bspf_ext.cpu_capability() in ("avx2", "avx512") else [])
# Value widths around the vector paths' cases: under a vector, whole vectors, the 64-wide
# A·V walk, and past it.
WIDE_DIMS = [15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 80, 128, 129]


@st.composite
def problems(draw, min_n=0, max_n=200):
    return dict(
        b=draw(st.integers(1, 2)),
        h=draw(st.integers(1, 2)),
        n=draw(st.integers(min_n, max_n)),
        d=draw(st.one_of(st.integers(1, 48), st.sampled_from(WIDE_DIMS))),
        dv=draw(st.one_of(st.integers(1, 12), st.sampled_from(WIDE_DIMS))),
        block_size=draw(st.integers(1, 64)),
        keep_ratio=draw(st.floats(0.0, 1.0)),
        scale_factor=draw(st.sampled_from(SCALE_FACTORS)),
        fuse=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        path=draw(st.sampled_from(PATHS)),
        threads=draw(st.sampled_from([1, 2])),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


def laid_out(p):
    """qk and v of the drawn sizes in the drawn memory layout (the op takes any strides)."""
    b, h, n, d, dv, dtype, seed = p["b"], p["h"], p["n"], p["d"], p["dv"], p["dtype"], p["seed"]
    layout = p["layout"]
    if layout == "transposed":  # (B, N, H, D) memory, as a projection's output
        qk, v = random_inputs(b, n, h, d, dv, dtype=dtype, seed=seed)
        return qk.transpose(1, 2), v.transpose(1, 2)
    if layout == "expanded":  # stride 0 over the batch
        qk, v = random_inputs(1, h, n, d, dv, dtype=dtype, seed=seed)
        return qk.expand(b, h, n, d), v.expand(b, h, n, dv)
    if layout == "strided":  # every other element of the feature dims
        qk, v = random_inputs(b, h, n, 2 * d, 2 * dv, dtype=dtype, seed=seed)
        return qk[..., ::2], v[..., 1::2]
    if layout == "narrowed":  # a window of a longer sequence
        qk, v = random_inputs(b, h, n + 3, d, dv, dtype=dtype, seed=seed)
        return qk[:, :, 2 : n + 2], v[:, :, 1 : n + 1]
    return random_inputs(b, h, n, d, dv, dtype=dtype, seed=seed)


def conditioned_rtol(qk, scale) -> float:
    """SPEC §6's tolerance of qk's dtype, or one rounding of the largest |logit| when that is
    larger (tests/test_extreme_logits.py explains why huge logits condition the problem)."""
    if qk.numel() == 0:
        return 0.0
    qk64 = qk.double()
    largest = abs(scale) * (qk64 @ qk64.transpose(-1, -2)).abs().max().item()
    return max(OUTPUT_RTOL[qk.dtype], torch.finfo(qk.dtype).eps * largest)


@contextmanager
def cpu_path(path, threads):
    """Forces a path ("scalar", "avx2"), or lets dispatch choose ("auto": the best vector
    path for float32 where the CPU has one), on `threads` threads."""
    before, threads_before = os.environ.get("BSPF_CPU_CAPABILITY"), torch.get_num_threads()
    if path == "auto":
        os.environ.pop("BSPF_CPU_CAPABILITY", None)
    else:
        os.environ["BSPF_CPU_CAPABILITY"] = path
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        if before is None:
            os.environ.pop("BSPF_CPU_CAPABILITY", None)
        else:
            os.environ["BSPF_CPU_CAPABILITY"] = before


def check_draw(p, *, gradients=True):
    qk, v = laid_out(p)
    scale = p["scale_factor"] * p["d"] ** -0.5
    options = dict(block_size=p["block_size"], keep_ratio=p["keep_ratio"], fuse=p["fuse"], scale=scale)
    with cpu_path(p["path"], p["threads"]):
        out, mask, match = kernel_choices(qk, v, None, **options)
        assert out.shape == (*qk.shape[:3], v.shape[-1])
        assert torch.isfinite(out).all()
        assert torch.equal(mask, mask.transpose(-1, -2)), "the mask is decided once per pair of blocks"
        expected = reference.block_symmetric_attention(qk.double(), v.double(), mask=mask, match=match, **options)
        rtol = conditioned_rtol(qk, scale)
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=rtol)
        if not gradients:
            return
        grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(p["seed"]))
        a, b = qk.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
        got = torch.autograd.grad(bspf_ext.block_symmetric_attention(a, b, **options), (a, b), grad.to(qk.dtype))
    for name, g in zip(("grad_qk", "grad_v"), got):
        assert torch.isfinite(g).all(), name
    a64, b64 = qk.double().requires_grad_(), v.double().requires_grad_()
    out64 = reference.block_symmetric_attention(a64, b64, mask=mask, match=match, **options)
    wanted = torch.autograd.grad(out64, (a64, b64), grad, allow_unused=True)
    slack = gradient_slack(p, qk, v, grad, scale)
    for name, g, e, extra in zip(("grad_qk", "grad_v"), got, wanted, slack):
        e = torch.zeros_like(g, dtype=torch.float64) if e is None else e
        magnitude = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
        tol = GRAD_RTOL[qk.dtype]
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * magnitude + extra,
                                   msg=lambda m: f"{name}: {m}")


def gradient_slack(p, qk, v, grad, scale):
    """What one rounding of the logits in qk's dtype moves the gradients by, at most.

    The kernels round each logit (ε ≤ γ_D·|scale|·max‖qk_i‖² relative on exp(L - lse)); the
    backward recomputes them as its forward did, but that rounding stays.
    Through dS = P ⊙ (dP - δ) that moves grad_qk by up to 2·|scale|·ε·max|g|·max|v|·max|qk|
    and grad_v, a column sum of P ⊙ g, by up to N·ε·max|g|. Negligible at ordinary logits
    (ε ~ 1e-6 in float32, 1e-13 in float64); at logits in the thousands it is all float32
    can promise, far above the gradients of a saturated softmax themselves.
    """
    if qk.numel() == 0:
        return 0.0, 0.0
    # The standard bound on a D-term dot product's rounding: γ_D = D·eps of Σ|q_k·q_k|.
    norm2 = qk.double().pow(2).sum(-1).max().item()
    eps = (p["d"] + 1) * torch.finfo(qk.dtype).eps * abs(scale) * norm2
    g, vv, q = grad.abs().max().item(), v.abs().max().item(), qk.abs().max().item()
    return 2 * abs(scale) * eps * g * vv * q, p["n"] * eps * g


# Small draws are cheap: more of them than the profile's default, never fewer.
@settings(max_examples=max(300, settings.default.max_examples))
@given(problems())
def test_fuzz_forward_and_backward(p):
    check_draw(p)


@settings(max_examples=max(4, settings.default.max_examples // 10))
@given(problems(min_n=1025, max_n=2048).map(lambda p: {**p, "b": 1, "h": 1, "d": min(p["d"], 16)}))
def test_fuzz_long_sequences(p):
    # The reference's N × N float64 matrices bound the draws: one (b, h) pair, D ≤ 16.
    check_draw(p, gradients=p["dtype"] == torch.float32)
