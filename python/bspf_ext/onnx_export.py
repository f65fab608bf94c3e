"""ONNX export of models with BSPF attention: the operator as one custom-domain node.

`export_onnx(model, args, path)` runs `torch.onnx.export(..., dynamo=True)` with a
translation for `bspf_ext::forward` that emits one node

    bspf_ext::BlockSymmetricAttention(qk, v, score_kernel) -> out        (opset bspf_ext, version 1)
      attributes: block_size (int), keep_ratio (float), fuse (int 0/1), scale (float)

with the operator's inputs and output as in docs/spec.md (qk, v: (B, H, N, d) and
(B, H, N, d_v); score_kernel: (3, 3); out like v). Everything else in the model is standard
ONNX. No ONNX runtime ships this op: a runtime needs a kernel for it (the CPU one is in
csrc/cpu); `ReferenceOp` is one for onnx's Python ReferenceEvaluator, which runs the node
through bspf_ext itself (for checking an exported file, not for speed). See docs/export.md.

Needs `onnx` and `onnxscript` (pip install "bspf_ext[onnx]"); they are imported here only.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["DOMAIN", "OP_TYPE", "register_onnx_schema", "onnx_translation_table", "export_onnx", "ReferenceOp"]

DOMAIN = "bspf_ext"
OP_TYPE = "BlockSymmetricAttention"
VERSION = 1


def _onnx():
    try:
        import onnx
        import onnxscript
    except ImportError as error:
        raise ImportError('ONNX export needs onnx and onnxscript (pip install "bspf_ext[onnx]")') from error
    return onnx, onnxscript


def register_onnx_schema() -> None:
    """Registers the node's schema with onnx (once per process), so onnxscript can build it
    and onnx.checker can check a model that holds it."""
    onnx, _ = _onnx()
    if onnx.defs.has(OP_TYPE, VERSION, DOMAIN):
        return
    schema = onnx.defs.OpSchema
    onnx.defs.register_schema(schema(
        OP_TYPE, DOMAIN, VERSION,
        doc="BSPF attention (bspf_ext, docs/spec.md): symmetric logits from one shared q/k, "
            "per-block pruning of off-diagonal blocks, fusion of pruned probability.",
        inputs=[schema.FormalParameter("qk", "T"), schema.FormalParameter("v", "T"),
                schema.FormalParameter("score_kernel", "T")],
        outputs=[schema.FormalParameter("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"],
                           "floating-point tensors")],
        attributes=[
            schema.Attribute("block_size", schema.AttrType.INT, "tokens per block (Ω)"),
            schema.Attribute("keep_ratio", schema.AttrType.FLOAT, "fraction of each off-diagonal block kept"),
            schema.Attribute("fuse", schema.AttrType.INT, "1: fuse pruned probability, 0: drop it"),
            schema.Attribute("scale", schema.AttrType.FLOAT, "logit scale"),
        ],
    ))


def onnx_translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export(dynamo=True): bspf_ext::forward -> the node."""
    _, onnxscript = _onnx()
    register_onnx_schema()
    from . import ops  # noqa: F401  (registers torch.ops.bspf_ext)

    custom = onnxscript.values.Opset(domain=DOMAIN, version=VERSION)
    op = onnxscript.opset18

    def bspf_forward(qk, v, score_kernel, block_size: int, keep_ratio: float, fuse: bool, scale: float):
        out = custom.BlockSymmetricAttention(
            qk, v, score_kernel, block_size=block_size, keep_ratio=keep_ratio, fuse=int(fuse), scale=scale
        )
        # The op's five other outputs (the choices and row statistics its backward reads) are
        # unused in inference: distinct placeholders, which the exporter's optimiser removes.
        rows = op.Shape(qk, end=3)
        return (out,) + tuple(op.ConstantOfShape(rows) for _ in range(5))

    return {torch.ops.bspf_ext.forward.default: bspf_forward}


def export_onnx(model: torch.nn.Module, args: tuple, path=None, **export_kwargs):
    """torch.onnx.export(model, args, path, dynamo=True) with the BSPF node; returns the
    ONNXProgram. `export_kwargs` go to torch.onnx.export (e.g. dynamic_shapes, opset_version)."""
    table = onnx_translation_table()
    table.update(export_kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, args, path, dynamo=True, custom_translation_table=table, **export_kwargs)


def __getattr__(name: str):
    if name == "ReferenceOp":
        return _reference_op()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _reference_op():
    """The node for onnx.reference.ReferenceEvaluator(model, new_ops=[ReferenceOp]),
    computed by bspf_ext on the CPU."""
    _onnx()
    from onnx.reference.op_run import OpRun

    from .ops import block_symmetric_attention

    class ReferenceOp(OpRun):
        op_domain = DOMAIN

        def _run(self, qk, v, score_kernel, block_size=None, keep_ratio=None, fuse=None, scale=None):
            out = block_symmetric_attention(
                torch.tensor(qk), torch.tensor(v), torch.tensor(score_kernel), block_size=int(block_size),
                keep_ratio=float(keep_ratio), fuse=bool(fuse), scale=float(scale),
            )
            return (out.numpy(),)

    ReferenceOp.__name__ = ReferenceOp.__qualname__ = OP_TYPE  # OpRun finds the op by class name
    return ReferenceOp
