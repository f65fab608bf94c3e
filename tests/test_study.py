"""bspf-ext study: statistics over seeds, results.json with the per-seed values, table,
figure; resumable. And the demo's variants it shares."""

import json
import math

import pytest

from bspf_ext.app import demo, study
from bspf_ext.app.cli import main


def test_t_interval():
    s = study.t_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))  # t(0.975, 2) = 4.303
    five = study.t_interval([0.9, 0.92, 0.94, 0.96, 0.98])
    assert five["high"] - five["mean"] == pytest.approx(2.776 * five["std"] / math.sqrt(5))
    one = study.t_interval([0.5])
    assert one["low"] == one["high"] == 0.5 and math.isnan(one["std"])
    assert study.separated({"low": 0.9, "high": 0.95}, {"low": 0.5, "high": 0.89})
    assert not study.separated({"low": 0.9, "high": 0.95}, {"low": 0.5, "high": 0.91})


def test_variants_are_checked():
    with pytest.raises(ValueError, match="unknown variants"):
        demo.check_variants(["dense", "sparse"])
    with pytest.raises(ValueError, match=r"need \['dense'\]"):
        demo.check_variants(["bspf from dense"])
    assert demo.check_variants(["dense + random pruning", "dense"]) == ["dense", "dense + random pruning"]


def test_quick_study_and_resume(tmp_path, capsys):
    names = ["dense", "bspf", "bspf from dense", "dense + random pruning"]
    assert main(["study", "--quick", "--seeds", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path),
                 "--variants", *names]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == names
    for model in results["models"]:
        assert model["n"] == 2 and len(model["accuracies"]) == 2 and model["low"] <= model["mean"] <= model["high"]
        assert [row["seed"] for row in results["per_seed"][model["name"]]] == [0, 1]
    assert results["info"]["machine"] and results["info"]["seeds"] == 2
    # the fine-tuned run started from its seed's dense run
    config = json.loads((tmp_path / "seed-1" / "bspf-from-dense" / "results.json").read_text())["config"]
    assert config["init_from"] == str(tmp_path / "seed-1" / "dense") and config["seed"] == 1
    assert (tmp_path / "study.png").stat().st_size > 1000 and "95% interval" in (tmp_path / "table.txt").read_text()
    first = results["models"]
    # a second call finds the finished runs and gives the same numbers
    assert main(["study", "--quick", "--seeds", "2", "--no-progress", "--out", str(tmp_path),
                 "--variants", *names]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["models"]
    assert [m["accuracies"] for m in again] == [m["accuracies"] for m in first]
