"""The torch-free C++ entry points (bspf_ext._C) check their params themselves
(csrc/include/bspf/validate.h, shared with the CUDA entry points): a bad field raises
ValueError naming it, before any kernel reads a pointer. The Python layer's checks are
bypassed here on purpose."""

import math

import pytest
import torch

from bspf_ext import _C, reference
from bspf_ext.ops import params as _params
from bspf_ext.ops.library import allocate_forward

B, H, N, D, DV, BLOCK = 1, 2, 20, 4, 3, 8


@pytest.fixture
def tensors():
    """Valid inputs, forward outputs and backward outputs; they must outlive the params."""
    generator = torch.Generator().manual_seed(0)
    qk = torch.randn(B, H, N, D, generator=generator)
    v = torch.randn(B, H, N, DV, generator=generator)
    outputs = allocate_forward(qk, v, BLOCK)
    kernel = _params.score_kernel_buffer(reference.box_score_kernel(qk.dtype), qk.dtype)
    return dict(qk=qk, v=v, outputs=outputs, kernel=kernel, grad_out=torch.ones_like(v), grad_qk=torch.empty_like(qk),
                grad_v=torch.empty_like(v))


def forward_params(t):
    out, *saved = t["outputs"]
    return _params.forward_params(
        _C, t["qk"], t["v"], t["kernel"], BLOCK, 0.5, True, 0.5, out, _params.saved(_C, *saved), 1
    )


def backward_params(t):
    _, *saved = t["outputs"]
    return _params.backward_params(
        _C, t["grad_out"], t["qk"], t["v"], _params.saved(_C, *saved), BLOCK, True, 0.5,
        t["grad_qk"], t["grad_v"], 1,
    )


def set_problem(params, field, value):
    p = params.p
    setattr(p, field, value)
    params.p = p


def set_saved(params, field, value):
    s = params.saved
    setattr(s, field, value)
    params.saved = s


# (what is set, the words the error must contain). Each row starts from valid params.
PROBLEM_CASES = [
    ("batch", -1, "p.batch must be >= 0"),
    ("heads", -3, "p.heads must be >= 0"),
    ("seqlen", -1, "p.seqlen must be >= 0"),
    ("head_dim", 0, "p.head_dim must be >= 1"),
    ("value_dim", -1, "p.value_dim must be >= 0"),
    ("block_size", 0, r"p.block_size must be in \[1, 64\]"),
    ("block_size", 65, r"p.block_size must be in \[1, 64\]"),
    ("scale", math.inf, "p.scale must be finite"),
    ("scale", math.nan, "p.scale must be finite"),
    ("batch", 2**40, "overflows int64"),
]


@pytest.mark.parametrize("field, value, words", PROBLEM_CASES, ids=[f"{c[0]}={c[1]}" for c in PROBLEM_CASES])
@pytest.mark.parametrize("entry", ["mask", "forward", "backward"])
def test_bad_problem_raises_value_error(tensors, entry, field, value, words):
    params = backward_params(tensors) if entry == "backward" else forward_params(tensors)
    set_problem(params, field, value)
    if field == "batch" and value == 2**40:
        set_problem(params, "seqlen", 2**20)  # B·H·N² = 2^81
    with pytest.raises(ValueError, match=words):
        getattr(_C, entry)(params)


FORWARD_CASES = [
    ("keep_ratio", -0.1, r"keep_ratio must be in \[0, 1\]"),
    ("keep_ratio", 1.5, r"keep_ratio must be in \[0, 1\]"),
    ("keep_ratio", math.nan, r"keep_ratio must be in \[0, 1\]"),
    ("num_threads", -1, "num_threads must be >= 0"),
    ("qk_stride", [-1, 0, 0, 0], r"qk_stride\[0\] must be >= 0"),
    ("v_stride", [0, 0, -4, 0], r"v_stride\[2\] must be >= 0"),
    ("qk", 0, "qk is null"),
    ("score_kernel", 0, "score_kernel is null"),
    ("v", 0, "v is null"),
    ("out", 0, "out is null"),
]


@pytest.mark.parametrize("field, value, words", FORWARD_CASES, ids=[f"{c[0]}={c[1]}" for c in FORWARD_CASES])
def test_bad_forward_params_raise_value_error(tensors, field, value, words):
    params = forward_params(tensors)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=words):
        _C.forward(params)


@pytest.mark.parametrize("field", ["mask_words", "match", "rho", "lse", "log_row_sum"])
def test_null_saved_buffer_raises_value_error(tensors, field):
    for entry, make in [("forward", forward_params), ("backward", backward_params)]:
        params = make(tensors)
        set_saved(params, field, 0)
        with pytest.raises(ValueError, match=f"saved.{field} is null"):
            getattr(_C, entry)(params)


def test_mask_needs_only_the_mask_words(tensors):
    params = forward_params(tensors)
    params.v = params.out = 0
    for field in ["match", "rho", "lse", "log_row_sum"]:
        set_saved(params, field, 0)
    _C.mask(params)  # the mask entry reads neither v nor the other saved buffers
    set_saved(params, "mask_words", 0)
    with pytest.raises(ValueError, match="saved.mask_words is null"):
        _C.mask(params)


BACKWARD_CASES = [
    ("num_threads", -2, "num_threads must be >= 0"),
    ("grad_out_stride", [0, -1, 0, 0], r"grad_out_stride\[1\] must be >= 0"),
    ("qk", 0, "qk is null"),
    ("v", 0, "v is null"),
    ("grad_out", 0, "grad_out is null"),
    ("grad_qk", 0, "grad_qk is null"),
    ("grad_v", 0, "grad_v is null"),
]


@pytest.mark.parametrize("field, value, words", BACKWARD_CASES, ids=[f"{c[0]}={c[1]}" for c in BACKWARD_CASES])
def test_bad_backward_params_raise_value_error(tensors, field, value, words):
    params = backward_params(tensors)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=words):
        _C.backward(params)


def test_empty_problem_reads_no_pointer():
    # Nothing to compute: every pointer may be null, the sizes must still be valid.
    params = _C.ForwardParams()
    params.p.batch, params.p.heads, params.p.seqlen, params.p.head_dim = 0, 2, 5, 4
    _C.mask(params)
    _C.forward(params)
    backward = _C.BackwardParams()
    backward.p.batch, backward.p.heads, backward.p.seqlen, backward.p.head_dim = 2, 2, 0, 4
    _C.backward(backward)
    backward.p.block_size = 0
    with pytest.raises(ValueError, match="p.block_size"):
        _C.backward(backward)


def test_valid_params_run_and_match_the_op(tensors):
    # The fixture's params are valid: the checks let them through to the kernels.
    _C.forward(forward_params(tensors))
    out = tensors["outputs"][0]
    expected = reference.block_symmetric_attention(
        tensors["qk"].double(), tensors["v"].double(), block_size=BLOCK, keep_ratio=0.5, scale=0.5
    )
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)
    _C.backward(backward_params(tensors))
    assert torch.isfinite(tensors["grad_qk"]).all() and torch.isfinite(tensors["grad_v"]).all()


def test_all_fields_constructors_fill_every_field(tensors):
    """The structs' all-fields constructors (what the op's Python layer uses) set each
    field to what was passed, as setting the fields one by one does."""
    t = tensors
    out, mask_words, match, rho, lse, log_row_sum = t["outputs"]
    v = t["v"].transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous layout
    fp = _params.forward_params(_C, t["qk"], v, t["kernel"], BLOCK, 0.25, False, 0.5,
                                out, _params.saved(_C, mask_words, match, rho, lse, log_row_sum), 2)
    assert (fp.p.dtype, fp.p.batch, fp.p.heads, fp.p.seqlen) == (_C.DType.float32, B, H, N)
    assert (fp.p.head_dim, fp.p.value_dim, fp.p.block_size, fp.p.scale, fp.p.fuse) == (D, DV, BLOCK, 0.5, False)
    assert (fp.keep_ratio, fp.num_threads) == (0.25, 2)
    assert (fp.qk, list(fp.qk_stride)) == (t["qk"].data_ptr(), list(t["qk"].stride()))
    assert (fp.v, list(fp.v_stride)) == (v.data_ptr(), list(v.stride()))
    assert (fp.score_kernel, fp.out) == (t["kernel"].data_ptr(), out.data_ptr())
    s = fp.saved
    assert [s.mask_words, s.match, s.rho, s.lse, s.log_row_sum] == [
        x.data_ptr() for x in (mask_words, match, rho, lse, log_row_sum)]

    bp = backward_params(t)
    assert (bp.grad_out, list(bp.grad_out_stride)) == (t["grad_out"].data_ptr(), list(t["grad_out"].stride()))
    assert (bp.qk, bp.v, list(bp.v_stride)) == (t["qk"].data_ptr(), t["v"].data_ptr(), list(t["v"].stride()))
    assert (bp.grad_qk, bp.grad_v, bp.num_threads) == (t["grad_qk"].data_ptr(), t["grad_v"].data_ptr(), 1)
    assert bp.saved.mask_words == mask_words.data_ptr()
