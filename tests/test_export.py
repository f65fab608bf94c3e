"""torch.export and ONNX export of a BSPF ViT (docs/export.md).

The ONNX tests need onnx and onnxscript (the `onnx` extra, part of `test`): they skip without
them, except in CI (.ci/run sets BSPF_REQUIRE_OPTIONAL=1), where a missing package fails.
"""

import os

import pytest
import torch

from bspf_ext import models

REQUIRED = os.environ.get("BSPF_REQUIRE_OPTIONAL") == "1"


def _model():
    torch.manual_seed(0)
    return models.vit_tiny("bspf", img_size=32, patch_size=8, depth=2, block_size=4, num_classes=10).eval()


def _images(b):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


def _bspf_nodes(graph):
    return [node for node in graph.nodes if node.op == "call_function" and str(node.target).startswith("bspf_ext.")]


@pytest.fixture(scope="module")
def exported():
    model = _model()
    batch = torch.export.Dim("batch", min=1, max=256)
    return model, torch.export.export(model, (_images(2),), dynamic_shapes={"images": {0: batch}})


def test_exported_program_holds_the_op_and_matches_eager(exported):
    model, program = exported
    assert [str(n.target) for n in _bspf_nodes(program.graph)] == ["bspf_ext.forward.default"] * 2
    with torch.no_grad():
        for b in (2, 1, 7):  # the batch is dynamic
            x = _images(b)
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_exported_program_saves_and_loads(exported, tmp_path):
    model, program = exported
    torch.export.save(program, tmp_path / "vit.pt2")
    loaded = torch.export.load(tmp_path / "vit.pt2")
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


def test_export_for_training_keeps_the_backward():
    # The op's autograd survives export: the exported module trains like the eager one.
    model = _model().train()
    program = torch.export.export(model, (_images(2),))
    module = program.module()
    x = _images(2)
    module(x).square().mean().backward()
    model(x).square().mean().backward()
    exported_grads = dict(module.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(exported_grads[name].grad, p.grad, rtol=1e-5, atol=1e-6)


def _onnx():
    if REQUIRED:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    else:
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    from bspf_ext import onnx_export

    return onnx_export


def test_onnx_export_has_one_custom_node_per_layer_and_runs(tmp_path):
    onnx_export = _onnx()
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = _model()
    onnx_export.export_onnx(model, (_images(2),), tmp_path / "vit.onnx")
    proto = onnx.load(tmp_path / "vit.onnx")
    onnx.checker.check_model(proto)
    custom = [n for n in proto.graph.node if n.domain == onnx_export.DOMAIN]
    assert [n.op_type for n in custom] == [onnx_export.OP_TYPE] * 2
    assert {n.domain for n in proto.graph.node} == {"", onnx_export.DOMAIN}  # the rest is standard ONNX
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attributes == {"block_size": 4, "keep_ratio": 0.5, "fuse": 1, "scale": pytest.approx(64**-0.5)}
    assert len(custom[0].output) == 1
    # onnx's reference runtime, with the node computed by bspf_ext, gives the eager output.
    session = ReferenceEvaluator(proto, new_ops=[onnx_export.ReferenceOp])
    x = _images(2)
    (got,) = session.run(None, {session.input_names[0]: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_without_onnx_says_what_to_install(monkeypatch):
    import sys

    from bspf_ext import onnx_export

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ImportError, match=r"bspf_ext\[onnx\]"):
        onnx_export.onnx_translation_table()
