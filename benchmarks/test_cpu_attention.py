"""Forward and forward+backward timings of dense SDPA, bspf_ext and the reference on the
CPU, float32, at torch's thread count. Ratios are printed by conftest.py."""

from __future__ import annotations

import pytest

from conftest import record
from workloads import BLOCK_SIZES, MODES, SHAPES, TARGET_BLOCK_SIZE, make_inputs, shape_id, time_call, workload

# The reference is ~50x slower: timed at the ViT-size shapes only.
REFERENCE_SHAPES = SHAPES[:2]


def _rounds(fn) -> int:
    """About a second of timing per benchmark, 3 to 30 rounds."""
    return max(3, min(30, int(1.0 / max(time_call(fn), 1e-6))))


def _bench(benchmark, fn):
    benchmark.pedantic(fn, rounds=_rounds(fn), iterations=1, warmup_rounds=1)


# Dense first: the bspf benchmarks that follow report their ratio to it.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sdpa(benchmark, shape, mode):
    benchmark.group = f"{shape_id(shape)} {mode}"
    _bench(benchmark, workload("sdpa", mode, make_inputs(shape)))
    record(benchmark, "sdpa", shape, None, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=shape_id)
def test_reference(benchmark, shape, mode):
    benchmark.group = f"{shape_id(shape)} {mode}"
    _bench(benchmark, workload("reference", mode, make_inputs(shape), TARGET_BLOCK_SIZE))
    record(benchmark, "reference", shape, TARGET_BLOCK_SIZE, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bspf(benchmark, shape, block_size, mode):
    benchmark.group = f"{shape_id(shape)} {mode}"
    _bench(benchmark, workload("bspf", mode, make_inputs(shape), block_size))
    record(benchmark, "bspf", shape, block_size, mode)
