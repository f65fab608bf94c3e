"""The emulated GPU itself (tools/cuda_emulation): warp intrinsics against their
definitions in the CUDA C++ Programming Guide, barriers, the reports of divergent
collectives and barriers, launch limits, shared memory, schedules, and the host side of
csrc/cuda/mma.cuh's tensor-core fragments."""

import random

import pytest
import torch

from cuda_emulation.probe import FULL, EmulatedCudaError, probe  # noqa: F401  (fixture)

pytestmark = pytest.mark.cuda_emulated

LAUNCH_FAILURE, INVALID_VALUE, INVALID_CONFIGURATION = 719, 1, 9
UNDEFINED = 0xFFFFFFFF  # what the emulator returns for a value a GPU leaves undefined


def values():
    return [(lane * 7 + 3) * 0x01010101 & FULL for lane in range(32)]


# -------------------------------------------------------------------- shuffles

def guide_source(op: str, lane: int, arg: int, width: int) -> int:
    """The lane whose value `lane` receives, as the Programming Guide words it: lanes form
    groups of `width`; shfl reads lane srcLane % width of the group; up/down read `delta`
    lanes before/after within the group, else their own; xor reads lane ^ laneMask unless
    that lies in a later group (then its own)."""
    base = lane // width * width
    if op == "shfl":
        return base + arg % width
    if op == "shfl_up":
        return lane - arg if lane - base >= arg else lane
    if op == "shfl_down":
        return lane + arg if lane - base + arg < width else lane
    j = lane ^ arg
    return lane if j >= base + width else j


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("op", ["shfl", "shfl_up", "shfl_down", "shfl_xor"])
def test_shuffles_follow_the_programming_guide(probe, op, width):
    rng = random.Random(f"{op}{width}")
    vals = values()
    arg_sets = [[k] * 32 for k in range(0, 33, 3)] + [[rng.randrange(32) for _ in range(32)] for _ in range(4)]
    for args in arg_sets:
        got = probe.warp_op(op, vals, args=args, width=width)
        expected = [vals[guide_source(op, lane, args[lane], width)] for lane in range(32)]
        assert got == expected, (op, width, args)


def test_butterfly_sum_reaches_every_lane(probe):
    # warp_sum in csrc/cuda/common.cuh: xor 16, 8, 4, 2, 1; by hand: each step pairs lanes.
    vals = list(range(1, 33))
    for offset in (16, 8, 4, 2, 1):
        got = probe.warp_op("shfl_xor", vals, args=[offset] * 32)
        vals = [v + g for v, g in zip(vals, got)]
    assert vals == [sum(range(1, 33))] * 32


def test_wide_shuffle_moves_eight_bytes(probe):
    vals = values()
    got = probe.warp_op("shfl_xor64", vals, args=[5] * 32)
    assert got == [(vals[lane ^ 5] << 32) | (~vals[lane ^ 5] & FULL) for lane in range(32)]


def test_partial_mask_shuffle_and_a_source_outside_the_mask(probe):
    vals = values()
    half = 0x0000FFFF
    got = probe.warp_op("shfl", vals, args=[3] * 32, active=half, mask=half)
    assert got[:16] == [vals[3]] * 16 and got[16:] == [None] * 16
    # Lanes 0-15 read lane 20, which is not in the mask: undefined on a GPU.
    got = probe.warp_op("shfl", vals, args=[20] * 32, active=half, mask=half)
    assert got[:16] == [UNDEFINED] * 16


# ----------------------------------------------------------------------- votes

@pytest.mark.parametrize("seed", range(6))
def test_votes_match_and_reduce_on_random_masks(probe, seed):
    rng = random.Random(seed)
    mask = FULL if seed == 0 else rng.getrandbits(32) | 1
    lanes = [lane for lane in range(32) if mask >> lane & 1]
    preds = [rng.random() < 0.5 for _ in range(32)]
    if seed == 1:
        preds = [True] * 32
    ballot = sum(1 << lane for lane in lanes if preds[lane])
    pv = [int(p) * (lane + 1) for lane, p in enumerate(preds)]  # any nonzero value counts
    on = dict(active=mask, mask=mask)
    assert probe.warp_op("ballot", pv, **on) == [ballot if mask >> lane & 1 else None for lane in range(32)]
    assert {probe.warp_op("any", pv, **on)[lane] for lane in lanes} == {int(ballot != 0)}
    assert {probe.warp_op("all", pv, **on)[lane] for lane in lanes} == {int(ballot == mask)}

    groups = [rng.randrange(3) for _ in range(32)]
    got = probe.warp_op("match_any", groups, **on)
    for lane in lanes:
        assert got[lane] == sum(1 << k for k in lanes if groups[k] == groups[lane])
    same = [9] * 32
    for vals, all_equal in [(same, True), (groups, len({groups[k] for k in lanes}) == 1)]:
        got = probe.warp_op("match_all", vals, **on)
        assert {got[lane] for lane in lanes} == {(1 << 32 | mask) if all_equal else 0}

    nums = [rng.getrandbits(32) for _ in range(32)]
    chosen = [nums[lane] for lane in lanes]
    signed = [n - (1 << 32) if n >> 31 else n for n in chosen]
    expected = {
        "reduce_add": sum(chosen) & FULL, "reduce_min": min(chosen), "reduce_max": max(chosen),
        "reduce_min_signed": min(signed) & FULL, "reduce_max_signed": max(signed) & FULL,
        "reduce_and": FULL, "reduce_or": 0, "reduce_xor": 0,
    }
    for n in chosen:
        expected["reduce_and"] &= n
        expected["reduce_or"] |= n
        expected["reduce_xor"] ^= n
    for op, want in expected.items():
        assert {probe.warp_op(op, nums, **on)[lane] for lane in lanes} == {want}, op


def test_syncwarp_on_part_of_a_warp(probe):
    got = probe.warp_op("syncwarp", values(), active=0x00FF00FF, mask=0x00FF00FF)
    assert [g for g in got if g is not None] == [1] * 16


# --------------------------------------------------------------------- barriers

@pytest.mark.parametrize("threads", [128, 100])
def test_reducing_barriers(probe, threads):
    rng = random.Random(threads)
    for preds in ([1] * threads, [0] * threads, [int(rng.random() < 0.3) for _ in range(threads)]):
        count = sum(preds)
        assert probe.barrier_reduce(0, preds) == [count] * threads
        assert probe.barrier_reduce(1, preds) == [int(count == threads)] * threads
        assert probe.barrier_reduce(2, preds) == [int(count > 0)] * threads


def test_exited_threads_count_as_arrived_at_syncthreads(probe):
    # Threads 64-127 return before the barrier (allowed on Volta and later).
    out = probe.scenario("syncthreads_after_exit")
    assert out[:64] == [1] * 64 and out[64:128] == [-99] * 64


# ------------------------------------------------------------- what is reported

@pytest.mark.parametrize(
    "scenario, words",
    [
        ("shfl_with_exited_lanes", ["divergent __shfl_xor_sync", "thread 16", "exited", "lanes 0-15 wait"]),
        ("shfl_against_ballot", ["divergent __ballot_sync", "lane 0 waits at __shfl_sync"]),
        ("shfl_against_syncthreads", ["divergent __shfl_sync", "reached __syncthreads", "lanes 0-15 wait"]),
        ("syncthreads_at_two_lines", ["divergent __syncthreads", "threads 0-63 wait at probe.cpp:"]),
        ("mask_without_caller", ["__shfl_sync", "mask 0x00000002", "does not name"]),
        ("widths_differ", ["divergent __shfl_xor_sync", "another width"]),
        ("width_not_power_of_two", ["width must be a power of two"]),
        ("trap_in_thread", ["thread 5", "__trap()"]),
    ],
)
def test_divergence_is_reported_not_waited_out(probe, scenario, words):
    with pytest.raises(EmulatedCudaError) as failure:
        probe.scenario(scenario)
    assert failure.value.code == LAUNCH_FAILURE
    for word in words:
        assert word in failure.value.message, failure.value.message


def test_disjoint_masks_shuffle_independently(probe):
    out = probe.scenario("disjoint_masks")
    assert out[:16] == [15] * 16 and out[16:32] == [16] * 16


@pytest.mark.parametrize(
    "scenario, code, words",
    [
        ("shared_64k_without_attribute", INVALID_VALUE, ["65536 bytes", "limit of 49152", "cudaFuncSetAttribute"]),
        ("shared_above_optin", INVALID_VALUE, ["232449", "232448"]),
        ("launch_above_optin", INVALID_VALUE, ["232464 bytes", "limit of 232448"]),
        ("block_too_large", INVALID_CONFIGURATION, ["(2048, 1, 1)"]),
        ("grid_y_too_large", INVALID_CONFIGURATION, ["(1, 65536, 1)"]),
    ],
)
def test_launch_limits_are_a_gpus(probe, scenario, code, words):
    with pytest.raises(EmulatedCudaError) as failure:
        probe.scenario(scenario)
    assert failure.value.code == code
    for word in words:
        assert word in failure.value.message, failure.value.message


def test_raised_shared_memory_limit_allows_the_launch(probe):
    assert probe.scenario("shared_64k_with_attribute")[:32] == [1] * 32


def test_unwritten_shared_memory_reads_as_nan(probe):
    assert probe.scenario("read_unwritten_shared")[:64] == [1] * 64


def test_schedules_expose_a_missing_barrier(probe, monkeypatch):
    # Thread 40 reads what thread 0 writes. Index order happens to run thread 0 first;
    # shuffled orders must not always, while the barrier makes every order agree.
    seen = set()
    for seed in range(12):
        monkeypatch.setenv("BSPF_EMULATION_SCHEDULE", str(seed))
        seen.add(probe.scenario("shared_unsynced")[0])
        assert probe.scenario("shared_synced")[0] == 42
    assert seen == {42, -1}  # -1: the 0xFF bytes of unwritten shared memory


# --------------------------------------------------------------- warp exchange

@pytest.mark.parametrize("nbytes", [1, 3, 24, 64])
def test_warp_exchange_gives_every_lane_all_values(probe, nbytes):
    got = probe.exchange(nbytes)
    src = torch.arange(32).reshape(1, 32, 1)
    expected = ((src * 31 + torch.arange(nbytes).reshape(1, 1, -1)) & 0xFF).expand(32, 32, nbytes)
    assert torch.equal(got.long(), expected)


# ------------------------------------------------------------------------- mma

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_fragment_layout_on_exact_integers(probe, dtype):
    # Small integers: every product and sum is exact, so any misplaced element shows.
    a = (torch.arange(256).reshape(16, 16) % 13 - 6).to(dtype)
    b = (torch.arange(128).reshape(16, 8) % 7 - 3).to(dtype)
    c = torch.arange(128, dtype=torch.float32).reshape(16, 8)
    d = probe.mma(a, b, c)
    assert torch.equal(d.double(), a.double() @ b.double() + c.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_mma_matches_a_float64_product(probe, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    d = probe.mma(a, b, c).double()
    a64, b64, c64 = a.double(), b.double(), c.double()
    expected = a64 @ b64 + c64
    # fp32 accumulation: products of 16-bit values are exact, each of the 16 sums rounds once.
    bound = 17 * 2.0**-24 * (a64.abs() @ b64.abs() + c64.abs())
    assert ((d - expected).abs() <= bound).all(), (d - expected).abs().max()
