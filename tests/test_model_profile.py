"""`bspf-ext bench --model M --profile B`: each model's time split by kind of operation."""

import json

import pytest
import torch

from bspf_ext.app import model_profile
from bspf_ext.app.cli import main


def test_kinds_of_operations():
    assert model_profile.kind_of("bspf_ext::forward") == "attention op"
    assert model_profile.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention op"
    assert model_profile.kind_of("aten::addmm") == "matmul (projections, MLP)"
    assert model_profile.kind_of("aten::copy_") == "copies and casts"
    assert model_profile.kind_of("aten::gelu") == "gelu"
    assert model_profile.kind_of("aten::some_new_op") == "other"


def test_profile_splits_every_variant():
    profile = model_profile.profile_models("deit_tiny", 2, variants=["bspf", "chunk"], img_size=32, rounds=1,
                                           warmup=0, depth=2)
    assert list(profile) == ["dense", "bspf", "chunk"]
    for kinds in profile.values():
        assert list(kinds) == [*model_profile.KINDS, "other", "total"]
        assert all(ms >= 0 for ms in kinds.values())
        assert kinds["total"] == pytest.approx(sum(ms for kind, ms in kinds.items() if kind != "total"))
        assert kinds["attention op"] > 0 and kinds["matmul (projections, MLP)"] > 0
    table = model_profile.format_profile(profile)
    assert table.startswith("| ms per forward | dense | bspf | chunk |") and "| total |" in table


def test_profile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        model_profile.profile_models("deit_tiny", 0, img_size=32, depth=1)
    with pytest.raises(ValueError, match="model"):
        model_profile.profile_models("resnet50", 1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            model_profile.profile_models("deit_tiny", 1, device="cuda")


def test_cli_profile(tmp_path, capsys):
    argv = ["bench", "--model", "deit_tiny", "--batch", "1", "--img-size", "32", "--repeats", "1", "--warmup", "0",
            "--variants", "bspf", "--profile", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Where the time goes at batch 2" in out and "profile.md" in out
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["options"]["batch"] == 2 and set(result["ms_per_forward"]) == {"dense", "bspf"}
    assert (tmp_path / "profile.md").read_text().startswith("| ms per forward |")
    assert (tmp_path / "results.json").exists()  # the timed table as without --profile


def test_profile_needs_model(capsys):
    assert main(["bench", "--profile", "2"]) == 2
    assert "--profile is a model-benchmark flag" in capsys.readouterr().err
