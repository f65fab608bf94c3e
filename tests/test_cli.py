"""The bspf-ext command: every subcommand on a tiny configuration."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bspf_ext.app.cli import main

TINY = ["--dataset", "digit-pairs", "--image-size", "16", "--patch-size", "4", "--train-size", "64",
        "--test-size", "32", "--block-size", "4", "--batch-size", "32", "--device", "cpu", "--epochs", "1"]


def test_train_eval_viz(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--attention", "bspf", "--out-dir", str(run), "--no-progress"]) == 0
    assert '"test_accuracy"' in capsys.readouterr().out
    assert (run / "checkpoint.pt").exists() and (run / "results.json").exists()

    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == json.loads((run / "results.json").read_text())["test_accuracy"]

    png = tmp_path / "viz.png"
    assert main(["viz", "--checkpoint", str(run), "--sample", "3", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_train_from_config_file_with_resume(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dataset": "digit-pairs", "image_size": 16, "patch_size": 4, "train_size": 64,
                                  "test_size": 32, "block_size": 4, "batch_size": 32, "device": "cpu",
                                  "epochs": 1, "attention": "chunk", "out_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert main(["train", "--config", str(config), "--epochs", "2", "--resume", "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]


def test_viz_on_an_image_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = tmp_path / "input.png"
    plt.imsave(image, np.random.default_rng(0).random((40, 40)), cmap="gray")
    png = tmp_path / "viz.png"
    assert main(["viz", *TINY, "--attention", "bspf", "--image", str(image), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in ["dense", "chunk", "bspf", "dense + similarity pruning", "dense + random pruning"]:
        assert name in printed
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "results.json").read_text())) == 5


def test_bench(capsys):
    assert main(["bench", "--batch", "1", "--heads", "2", "--seqlen", "40", "--head-dim", "8", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "bspf" in printed and "dense sdpa" in printed and "forward+backward" in printed


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--attention", "sparse"]) == 2


def test_python_dash_m_and_torchrun_ddp(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bspf_ext", "train", *TINY,
               "--attention", "bspf", "--out-dir", str(tmp_path / "ddp"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert saved["world_size"] == 2
    version = subprocess.run([sys.executable, "-m", "bspf_ext", "--help"], capture_output=True, text=True)
    assert version.returncode == 0 and "demo" in version.stdout
