"""Fine-tuning from dense (TrainConfig.init_from, `bspf-ext train --init-from`) and the
approximation metric of converted layers (bspf_ext.models.approximation)."""

from pathlib import Path

import pytest
import torch

from bspf_ext.app.build import build_model, load_dataset
from bspf_ext.app.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from bspf_ext.app.cli import main
from bspf_ext.app.config import TrainConfig
from bspf_ext.app.train import train
from bspf_ext.models import approximation_errors, format_approximation_table


def _tiny(out_dir, **changes) -> TrainConfig:
    base = dict(dataset="digit-pairs", image_size=16, patch_size=4, train_size=64, test_size=32, model="micro",
                block_size=4, epochs=1, batch_size=32, device="cpu", out_dir=str(out_dir))
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    """A trained dense run, and a copy of it with W_k set to W_q in every layer (where the
    conversion is exact)."""
    root = tmp_path_factory.mktemp("dense")
    config = _tiny(root / "dense", attention="dense")
    train(config, progress=False, log=lambda m: None)
    state = load_checkpoint(root / "dense")
    tied = dict(state, model=dict(state["model"]), config=config.replace(out_dir=str(root / "tied")).to_dict())
    for key, value in state["model"].items():
        if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3, dim=0)
            tied["model"][key] = torch.cat([q, q, v], dim=0)
    (root / "tied").mkdir()
    save_checkpoint(tied, root / "tied" / CHECKPOINT)
    return root / "dense", root / "tied"


def _dense_model(run: Path):
    state = load_checkpoint(run)
    config = TrainConfig.from_dict(state["config"])
    data = load_dataset(config)
    model = build_model(config, data.num_classes, data.in_chans)
    model.load_state_dict(state["model"])
    return model.eval(), data


@pytest.mark.parametrize("scoring", ["learned", "box", "center"])
@pytest.mark.parametrize("qk_init", ["spectral", "mean", "q"])
def test_converted_model_starts_where_dense_is_exact(dense_runs, tmp_path, scoring, qk_init):
    _, tied = dense_runs
    dense, data = _dense_model(tied)
    config = _tiny(tmp_path, attention="bspf", keep_ratio=1.0, scoring=scoring, qk_init=qk_init, init_from=str(tied))
    converted = build_model(config, data.num_classes, data.in_chans, initialise=True).eval()
    images = data.test.tensors[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(converted(images), dense(images), atol=2e-5, rtol=1e-4)
    # without `initialise` (evaluation, demo) the model is the seed's, not the dense one's
    fresh = build_model(config, data.num_classes, data.in_chans).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(images), dense(images), atol=1e-3)


def test_train_starts_from_the_converted_weights_and_trains(dense_runs, tmp_path):
    dense_run, _ = dense_runs
    config = _tiny(tmp_path / "ft", attention="bspf", init_from=str(dense_run), lr=1e-12, weight_decay=0.0)
    data = load_dataset(config)
    start = build_model(config, data.num_classes, data.in_chans, initialise=True).state_dict()
    train(config, progress=False, log=lambda m: None)
    after = load_checkpoint(tmp_path / "ft")["model"]
    assert start.keys() == after.keys()
    for key in start:  # a step of lr 1e-12 moves nothing visibly: the run began at the conversion
        torch.testing.assert_close(after[key], start[key], atol=1e-9, rtol=0)
    dense_state = load_checkpoint(dense_run)["model"]
    torch.testing.assert_close(after["blocks.0.attn.v.weight"], dense_state["blocks.0.attn.qkv.weight"].chunk(3)[2])

    config = config.replace(out_dir=str(tmp_path / "ft2"), lr=1e-3, epochs=2)
    result = train(config, progress=False, log=lambda m: None)
    assert len(result["history"]) == 2 and result["config"]["init_from"] == str(dense_run)
    moved = load_checkpoint(tmp_path / "ft2")["model"]
    assert not torch.allclose(moved["blocks.0.attn.qk.weight"], start["blocks.0.attn.qk.weight"])


def test_cli_init_from_and_its_errors(dense_runs, tmp_path, capsys):
    dense_run, _ = dense_runs
    out = tmp_path / "cli"
    args = ["train", "--dataset", "digit-pairs", "--image-size", "16", "--train-size", "64", "--test-size", "32",
            "--block-size", "4", "--epochs", "1", "--device", "cpu", "--no-progress", "--attention", "bspf",
            "--qk-init", "mean"]
    assert main(args + ["--init-from", str(dense_run), "--out-dir", str(out)]) == 0
    assert load_checkpoint(out)["config"]["init_from"] == str(dense_run)
    capsys.readouterr()
    # a BSPF run is no source; neither is a run of another image size; nor a missing one
    assert main(args + ["--init-from", str(out), "--out-dir", str(tmp_path / "x")]) == 2
    assert "must be a dense run" in capsys.readouterr().err
    assert main(args[:4] + ["32"] + args[5:] + ["--init-from", str(dense_run), "--out-dir", str(tmp_path / "y")]) == 2
    assert "image_size" in capsys.readouterr().err
    assert main(args + ["--init-from", str(tmp_path / "none"), "--out-dir", str(tmp_path / "z")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_approximation_errors(dense_runs, tmp_path, capsys):
    dense_run, tied = dense_runs
    model, data = _dense_model(dense_run)
    images = data.test.tensors[0][:8]
    result = approximation_errors(model, images, keep_ratios=(0.4, 0.9, 1.0), block_size=4)
    assert len(result["conversion"]) == 4 and len(result["rows"]) == 4 * 3 * 2 * 3
    errors = {(r["layer"], r["scoring"], r["fuse"], r["keep_ratio"]): r["relative_error"] for r in result["rows"]}
    assert all(errors[(l, s, f, 1.0)] == 0.0 for l in range(4) for s in ("learned", "box", "center") for f in (True, False))
    assert all(errors[(l, s, f, 0.4)] > 0 for l in range(4) for s in ("box", "center") for f in (True, False))
    # learned scoring at its initialisation (θ = 0) is the box filter
    assert all(errors[(l, "learned", f, r)] == errors[(l, "box", f, r)] for l in range(4) for f in (True, False)
               for r in (0.4, 0.9))
    assert "keep ratio" in format_approximation_table(result)
    tied_model, _ = _dense_model(tied)
    assert max(approximation_errors(tied_model, images, keep_ratios=(0.5,), block_size=4)["conversion"]) < 1e-5

    assert main(["approx", "--init-from", str(dense_run), "--images", "8", "--block-size", "4",
                 "--out", str(tmp_path / "approx")]) == 0
    assert (tmp_path / "approx" / "approx.json").exists() and "no-fusion" in (tmp_path / "approx" / "table.txt").read_text()


def test_svit_paper_recipe_from_dense(dense_runs, tmp_path):
    """SViT's recipe as options: gates on the last block(s), per-layer targets, λ = 4, from dense."""
    dense_run, _ = dense_runs
    config = _tiny(tmp_path / "svit", attention="dense", pruning="svit", prune_layers=[2, 3], prune_targets=[0.7, 0.49],
                   prune_loss_weight=4.0, init_from=str(dense_run), lr=1e-12, weight_decay=0.0)
    result = train(config, progress=False, log=lambda m: None)
    after = load_checkpoint(tmp_path / "svit")["model"]
    dense_state = load_checkpoint(dense_run)["model"]
    assert any(".gate." in key for key in after)
    for key, value in dense_state.items():  # the dense weights, under the gated blocks' names where wrapped
        match = [k for k in after if k == key or k.replace(".block.", ".") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(after[match[0]], value, atol=1e-9, rtol=0)
    assert result["config"]["prune_targets"] == [0.7, 0.49]
    with pytest.raises(ValueError, match="one keep ratio per gated block"):
        train(config.replace(prune_layers=None, out_dir=str(tmp_path / "bad")), progress=False, log=lambda m: None)
