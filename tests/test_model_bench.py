"""`bspf-ext bench --model`: whole-model throughput across batch sizes (tiny sizes, 1 round)."""

import json

import torch

from bspf_ext.app import model_bench
from bspf_ext.app.cli import main
from bspf_ext.nn import BlockSymmetricAttention, ChunkAttention, DenseAttention
from bspf_ext.pruning import GatedBlock


def test_variants_are_the_models_they_name():
    kinds = {"dense": DenseAttention, "chunk": ChunkAttention, "bspf": BlockSymmetricAttention}
    for variant, kind in kinds.items():
        model = model_bench.build_variant("deit_tiny", variant, img_size=32, depth=2)
        assert all(type(block.attn) is kind for block in model.blocks) and not model.training
    svit = model_bench.build_variant("deit_small", "svit", img_size=64)
    gated = [i for i, block in enumerate(svit.blocks) if isinstance(block, GatedBlock)]
    assert gated == list(range(3, 12))
    with torch.inference_mode():
        svit(torch.randn(2, 3, 64, 64))
    # 17 tokens; SViT's targets 0.7, 0.49, 0.343 over three stages of three gates.
    kept = [int(svit.blocks[i].last_mask[b].sum()) for i in gated for b in range(2)]
    assert kept == [12] * 6 + [8] * 6 + [6] * 6


def test_run_writes_table_json_and_plot(tmp_path):
    result = model_bench.run("deit_tiny", [1, 2], tmp_path, img_size=32, rounds=1, warmup=0, depth=2,
                             variants=["bspf", "svit"], progress=False)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(b, v) for b in (1, 2) for v in ("dense", "bspf", "svit")]
    assert all(r["images_per_s"] > 0 and r["latency_ms"] > 0 for r in rows)
    assert all(r["speedup_vs_dense"] == 1.0 for r in rows if r["variant"] == "dense")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| model | batch |") and table.count("\n") == 2 + len(rows)
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert result["machine"]["torch"] == torch.__version__


def test_cli_model_bench(tmp_path, capsys):
    argv = ["bench", "--model", "deit_tiny", "--batch", "1,2", "--img-size", "32", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["threads"] == 1
    out = capsys.readouterr().out
    assert "| deit_tiny | 2 | svit |" in out and "throughput.png" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.md", "throughput.png"]
