"""The emulator's software __half and __nv_bfloat16 (tools/cuda_emulation/include) round
exactly as cuda_fp16.h / cuda_bf16.h do: checked against torch's float16/bfloat16
conversions (round to nearest even) bit for bit, on ties, subnormals, overflow and
special values, and for the directed modes against the two neighbours of each value."""

import numpy as np
import pytest
import torch

from cuda_emulation.probe import probe  # noqa: F401  (fixture)

pytestmark = pytest.mark.cuda_emulated

FORMATS = {
    # name, torch dtype, exponent bits, stored mantissa bits
    "half": (torch.float16, 5, 10),
    "bfloat16": (torch.bfloat16, 8, 7),
}
CANONICAL_NAN = 0x7FFF  # what CUDA's float → fp16/bf16 conversions return for any NaN


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def floats_from_bits(bits) -> torch.Tensor:
    return torch.tensor(np.asarray(bits, dtype=np.uint32).view(np.int32)).view(torch.float32)


def values_16bit(dtype) -> torch.Tensor:
    """Every 16-bit pattern as the format's values."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)


def test_float_conversion_from_16_bits_is_exact(probe):
    for kind, dtype in [("half2float", torch.float16), ("bfloat162float", torch.bfloat16)]:
        src = values_16bit(dtype)
        got = probe.convert(kind, src, torch.float32)
        expected = src.float()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32)), kind  # -0 included


def interesting_floats(fmt: str) -> torch.Tensor:
    """Random bit patterns, every tie between neighbouring 16-bit values and its float32
    neighbours, the subnormal and overflow boundaries, zeros, infinities and NaNs."""
    dtype, exp_bits, mant_bits = FORMATS[fmt]
    gen = np.random.default_rng(0)
    random = gen.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    finite = values_16bit(dtype).float()
    finite = finite[torch.isfinite(finite)].double().unique()  # sorted
    ties = ((finite[1:] + finite[:-1]) / 2).float()  # exact in float32 (one more bit)
    assert torch.equal(ties.double(), (finite[1:] + finite[:-1]) / 2)
    ties_bits = ties.view(torch.int32)
    around = torch.cat([ties_bits - 1, ties_bits, ties_bits + 1]).view(torch.float32)
    max_finite = finite.max().item()
    ulp_top = 2.0 ** (2 ** (exp_bits - 1) - 1 - mant_bits)
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), max_finite, max_finite + ulp_top / 2,
                          max_finite + ulp_top / 4, 3.4e38, -3.4e38, 1e-45, -1e-45, 1.17549435e-38, 2.0**-24, 2.0**-25,
                          2.0**-25 * 1.5, 2.0**-26, 6.1e-5, 65504.0, 65519.99, 65520.0, 65536.0, 1e5],
                         dtype=torch.float64).float()
    nan_payloads = floats_from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA00000])
    return torch.cat([floats_from_bits(random), around, -around, edges, nan_payloads])


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_to_nearest_even_matches_torch(probe, fmt):
    dtype = FORMATS[fmt][0]
    x = interesting_floats(fmt)
    got = probe.convert(f"float2{'half' if fmt == 'half' else 'bfloat16'}_rn", x, dtype)
    expected = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.equal(bits16(got)[~nan], bits16(expected)[~nan])
    assert (bits16(got)[nan] == CANONICAL_NAN).all()


def _neighbours(fmt: str, x: torch.Tensor):
    """For each finite x: the format's largest value ≤ x and smallest value ≥ x, with ±inf
    as the neighbours beyond the largest finite value (so that IEEE's directed roundings
    are exactly "lo", "hi" and "toward zero")."""
    values = values_16bit(FORMATS[fmt][0]).double()
    ladder = values[~torch.isnan(values)].unique()  # sorted, -inf … +inf, ±0 merged
    xd = x.double()
    hi = ladder[torch.searchsorted(ladder, xd, side="left")]
    lo = ladder[torch.searchsorted(ladder, xd, side="right") - 1]
    rn = x.to(FORMATS[fmt][0]).double()
    assert ((rn == lo) | (rn == hi)).all()  # torch's round-to-nearest is one of the two
    return lo, hi


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["rz", "rd", "ru"])
def test_directed_rounding_picks_the_right_neighbour(probe, fmt, mode):
    dtype = FORMATS[fmt][0]
    x = interesting_floats(fmt)
    x = x[torch.isfinite(x)]
    got = probe.convert(f"float2{'half' if fmt == 'half' else 'bfloat16'}_{mode}", x, dtype).double()
    lo, hi = _neighbours(fmt, x)
    expected = {"rd": lo, "ru": hi, "rz": torch.where(x.double() >= 0, lo, hi)}[mode]
    mismatch = got != expected
    assert not mismatch.any(), (
        f"{x[mismatch][:5].tolist()} -> {got[mismatch][:5].tolist()}, expected {expected[mismatch][:5].tolist()}"
    )


def test_special_values_bit_patterns(probe):
    # Spot checks written down from IEEE binary16 / bfloat16, independent of torch.
    x = torch.tensor([65504.0, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, -0.0, 1.0 + 2.0**-11,
                      1.0 + 3 * 2.0**-11], dtype=torch.float32)
    half = bits16(probe.convert("float2half_rn", x, torch.float16)).tolist()
    assert half == [0x7BFF, 0x7C00, 0x0001, 0x0000, 0x0001, 0x8000, 0x3C00, 0x3C02]
    y = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.3895314e38, 3.4e38, float("nan"), 1e-40], dtype=torch.float32)
    bf16 = bits16(probe.convert("float2bfloat16_rn", y, torch.bfloat16)).tolist()
    assert bf16 == [0x3F80, 0x3F82, 0x7F7F, 0x7F80, CANONICAL_NAN, 0x0001]
