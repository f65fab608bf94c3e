"""Training, checkpoints, resume and evaluation on a tiny configuration."""

import json

import pytest
import torch

from bspf_ext.app.build import apply_pruning, build_model, load_dataset
from bspf_ext.app.checkpoints import load_checkpoint
from bspf_ext.app.config import TrainConfig
from bspf_ext.app.evaluate import evaluate, flops_summary
from bspf_ext.app.train import train


def tiny(tmp_path, **changes) -> TrainConfig:
    config = TrainConfig(
        dataset="digit-pairs", image_size=16, patch_size=4, train_size=96, test_size=48, model="micro",
        attention="bspf", block_size=4, epochs=2, batch_size=32, lr=1e-3, seed=0, device="cpu",
        out_dir=str(tmp_path / "run"),
    )
    return config.replace(**changes)


def quiet(_message):
    pass


def test_train_writes_checkpoint_and_results(tmp_path):
    result = train(tiny(tmp_path), progress=False, log=quiet)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved["test_accuracy"] == result["test_accuracy"]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["attention_flops"] > 0 and result["model_flops"] > result["attention_flops"]
    state = load_checkpoint(run)
    assert state["epoch"] == 2 and state["config"]["attention"] == "bspf"


def test_same_seed_same_model(tmp_path):
    a = train(tiny(tmp_path, out_dir=str(tmp_path / "a")), progress=False, log=quiet)
    b = train(tiny(tmp_path, out_dir=str(tmp_path / "b")), progress=False, log=quiet)
    assert a["history"] == [dict(h, seconds=h2["seconds"]) for h, h2 in zip(b["history"], a["history"])]
    wa, wb = load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_continues_exactly(tmp_path):
    whole = train(tiny(tmp_path, out_dir=str(tmp_path / "whole")), progress=False, log=quiet)

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(message):
        if "epoch 1/2" in message:
            raise Interrupted

    config = tiny(tmp_path, out_dir=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        train(config, progress=False, log=stop_after_first_epoch)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    messages = []
    resumed = train(config, resume=True, progress=False, log=messages.append)
    assert any("resuming" in m for m in messages)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    wa, wb = load_checkpoint(tmp_path / "whole")["model"], load_checkpoint(tmp_path / "cut")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny(tmp_path, epochs=1), progress=False, log=quiet)
    with pytest.raises(ValueError, match="different config"):
        train(tiny(tmp_path, epochs=1, keep_ratio=0.25), resume=True, progress=False, log=quiet)


def test_evaluate_matches_training_result(tmp_path):
    result = train(tiny(tmp_path, attention="dense", epochs=1), progress=False, log=quiet)
    evaluated = evaluate(tmp_path / "run", device="cpu")
    assert evaluated["accuracy"] == result["test_accuracy"]
    assert evaluated["model_flops"] == result["model_flops"]


def test_config_validation_and_json(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(attention="sparse")
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig(model="giant")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": 3, "keep_ratio": 0.25}))
    loaded = TrainConfig.from_json(path)
    assert loaded.epochs == 3 and loaded.keep_ratio == 0.25


def test_svit_gating_trains_towards_its_keep_ratio(tmp_path):
    config = tiny(tmp_path, attention="dense", pruning="svit", prune_keep_ratio=0.5, epochs=2)
    result = train(config, progress=False, log=quiet)
    tokens = result["mean_tokens_per_block"]
    assert tokens[0] == 17  # block 0 is not gated
    assert all(1 <= t <= 17 for t in tokens[1:])
    evaluated = evaluate(tmp_path / "run", device="cpu")
    assert evaluated["accuracy"] == result["test_accuracy"]


def test_similarity_pruning_is_training_free_and_cheaper(tmp_path):
    dense_config = tiny(tmp_path, attention="dense", epochs=1)
    dense = train(dense_config, progress=False, log=quiet)
    data = load_dataset(dense_config)
    model = build_model(dense_config, data.num_classes, data.in_chans)
    model.load_state_dict(load_checkpoint(tmp_path / "run")["model"])
    pruned_config = dense_config.replace(pruning="similarity", prune_keep_ratio=0.5)
    pruned = apply_pruning(model, pruned_config)
    summary = flops_summary(pruned, pruned_config)
    assert summary["model_flops"] < dense["model_flops"]
    assert summary["attention_flops"] < dense["attention_flops"]
    # 16 patches at keep ratio 0.5 leave 8 patches and the class token in every block.
    from bspf_ext.models import count_flops

    assert summary["model_flops"] == count_flops(pruned.config, tokens=[9] * pruned.config.depth).total
    logits = pruned(data.test.tensors[0][:4])
    assert logits.shape == (4, data.num_classes)
