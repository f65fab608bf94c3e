"""A user's mistake on the bspf-ext command line ends with one line on stderr,
"bspf-ext <command>: error: ...", and exit status 2 — no traceback."""

import json
import subprocess
import sys

import pytest
import torch

from bspf_ext.app.cli import main

TINY = ["--dataset", "digit-pairs", "--image-size", "16", "--patch-size", "4", "--train-size", "64",
        "--test-size", "32", "--block-size", "4", "--batch-size", "32", "--device", "cpu", "--epochs", "1"]
TRAIN = ["train", *TINY, "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained BSPF run and a dense one, and broken files of every kind the command reads."""
    folder = tmp_path_factory.mktemp("cli-errors")
    assert main([*TRAIN, "--attention", "bspf", "--out-dir", str(folder / "bspf")]) == 0
    assert main([*TRAIN, "--attention", "dense", "--out-dir", str(folder / "dense")]) == 0
    whole = (folder / "bspf" / "checkpoint.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, folder / "other.pt")
    (folder / "malformed.json").write_text('{"epochs": 1,')
    (folder / "list.json").write_text("[1, 2]")
    (folder / "unknown.json").write_text('{"epochz": 1}')
    (folder / "wrong-type.json").write_text('{"epochs": "3"}')
    (folder / "not-an-image.png").write_text("hello")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.imsave(folder / "image.png", np.random.default_rng(0).random((20, 20)), cmap="gray")
    image = (folder / "image.png").read_bytes()
    (folder / "truncated.png").write_bytes(image[: len(image) // 2])
    return folder


def run_cli(argv, capsys):
    """(exit status, stderr) of main(argv); argparse's own errors exit through SystemExit."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


# (arguments with {dir} for the fixture's folder, what the one line must say)
FAILURES = [
    (["train", "--config", "{dir}/malformed.json"], "is not valid JSON: Expecting property name"),
    (["train", "--config", "{dir}/list.json"], "must hold a JSON object of TrainConfig fields, got list"),
    (["train", "--config", "{dir}/unknown.json"], "unknown config keys ['epochz']"),
    (["train", "--config", "{dir}/wrong-type.json"], "epochs must be an int >= 1, got str '3'"),
    (["train", "--config", "{dir}/missing.json"], "no config file at"),
    (["train", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["train", "--keep-ratio", "2"], "keep_ratio must be a float in [0, 1], got 2.0"),
    (["train", "--epochs", "0"], "epochs must be an int >= 1, got 0"),
    (["train", "--attention", "sparse"], "attention must be one of"),
    (["train", "--device", "gpu7"], "device must be 'auto' or a torch device"),
    ([*TRAIN, "--patch-size", "5"], "img_size (16) must be a multiple of patch_size (5)"),
    ([*TRAIN, "--out-dir", "{dir}/bspf", "--keep-ratio", "0.25", "--resume"], "different config"),
    (["eval", "{dir}/missing"], "no checkpoint at"),
    (["eval", "{dir}/truncated.pt"], "unreadable (truncated or corrupt?)"),
    (["eval", "{dir}/empty.pt"], "unreadable (truncated or corrupt?)"),
    (["eval", "{dir}/other.pt"], "is not a bspf-ext training checkpoint"),
    (["eval", "{dir}/bspf", "--split", "validation"], "argument --split: invalid choice"),
    (["viz", *TINY, "--image", "{dir}/not-an-image.png"], "unreadable (not an image, or truncated)"),
    (["viz", *TINY, "--image", "{dir}/truncated.png"], "unreadable (not an image, or truncated)"),
    (["viz", *TINY, "--image", "{dir}/missing.png"], "no image file at"),
    (["viz", "--checkpoint", "{dir}/truncated.pt"], "unreadable (truncated or corrupt?)"),
    (["viz", "--checkpoint", "{dir}/dense"], "viz draws BSPF keep masks"),
    (["viz", "--checkpoint", "{dir}/bspf", "--sample", "100000"], "--sample must be a test sample index in [0, 32)"),
    (["viz", "--checkpoint", "{dir}/bspf", "--layer", "9", "--out", "{dir}/x.png"], "layer must be a BSPF layer index"),
    (["viz", "--checkpoint", "{dir}/bspf", "--head", "4", "--out", "{dir}/x.png"], "head must be a head index in [0, 4)"),
    (["viz", "--sample", "-1"], "argument --sample: expected an int >= 0, got -1"),
    (["bench", "--seqlen", "0"], "argument --seqlen: expected an int >= 1, got 0"),
    (["bench", "--block-size", "65"], "argument --block-size: expected an int in [1, 64], got 65"),
    (["bench", "--keep-ratio", "nan"], "argument --keep-ratio: expected a number in [0, 1], got nan"),
    (["bench", "--model", "deit_small", "--batch", "1,0"], "argument --batch: expected an int >= 1, got 0"),
    (["bench", "--model", "deit_huge"], "argument --model: invalid choice: 'deit_huge'"),
    (["bench", "--model", "deit_tiny", "--seqlen", "64"], "--seqlen: operator-benchmark shape flags"),
    (["bench", "--batch", "1,8"], "--batch takes one size for the operator benchmark"),
    (["bench", "--variants", "bspf"], "--variants is a model-benchmark flag: it needs --model"),
    (["bench", "--threads", "1"], "--threads is a model-benchmark flag: it needs --model"),
    (["bench", "--model", "deit_tiny", "--img-size", "40"], "img_size (40) must be a multiple of patch_size (16)"),
    (["demo", "--epochs", "0"], "argument --epochs: expected an int >= 1, got 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, says", FAILURES, ids=[" ".join(a[:3]) + f" [{i}]" for i, (a, _) in enumerate(FAILURES)])
def test_user_error_is_one_line_and_status_2(files, capsys, argv, says):
    status, err = run_cli([a.replace("{dir}", str(files)) for a in argv], capsys)
    assert status == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("bspf-ext") and ": error: " in err, err
    assert says in err, err


def test_through_the_installed_entry_point_no_traceback(files):
    # The same as the table, in a real process: nothing else reaches stderr.
    for argv in (["train", "--config", str(files / "malformed.json")], ["eval", str(files / "truncated.pt")]):
        result = subprocess.run([sys.executable, "-m", "bspf_ext", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"bspf-ext {argv[0]}: error: ")


def test_results_are_written_atomically(files):
    # results.json is published like the checkpoint: no temporary file is left behind.
    assert json.loads((files / "bspf" / "results.json").read_text())["epochs"] == 1
    assert not list((files / "bspf").glob("*.tmp"))
