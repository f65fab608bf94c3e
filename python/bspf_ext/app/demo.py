"""`bspf-ext demo`: train small ViTs from scratch with dense, chunk and BSPF attention (and
the paper's ablations) on the long-range digit-pairs task, print a table and draw a figure.

The variants and the code that trains them for one seed (`run_variants`) are shared with
`bspf-ext study` (study.py), which runs them over several seeds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..ops import cpu_capability
from .build import apply_pruning, build_model, load_dataset, resolve_device
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .evaluate import accuracy, flops_summary
from .train import train

# name -> the config changes from the demo's base config. Each is trained from scratch.
VARIANTS = {
    "dense": dict(attention="dense"),
    "chunk": dict(attention="chunk"),
    "bspf": dict(attention="bspf"),  # scoring="learned": θ trained through the surrogate (docs/spec.md §4a)
    "bspf box": dict(attention="bspf", scoring="box"),
    "bspf one-token": dict(attention="bspf", scoring="center"),
    "bspf no-fusion": dict(attention="bspf", fuse=False),
    "svit gating": dict(attention="dense", pruning="svit"),
}

# name -> (the trained variant it starts from, the changes): evaluated without training.
TRAINING_FREE = {
    "dense + similarity pruning": ("dense", dict(pruning="similarity")),
    "dense + random pruning": ("dense", dict(pruning="random")),
}

# name -> (the trained dense variant whose weights it starts from, the changes): converted
# (init_from, qk_init "spectral") and fine-tuned with the recipe for half its epochs.
FINE_TUNED = {
    "bspf from dense": ("dense", dict(attention="bspf")),
}

# What `bspf-ext demo` runs by default (three trainings, kept under 5 minutes on 2 cores);
# `--variants` picks others, and `bspf-ext study` runs all of them over seeds.
DEMO_VARIANTS = ("dense", "chunk", "bspf", "dense + similarity pruning", "dense + random pruning")
ALL_VARIANTS = tuple(VARIANTS) + tuple(FINE_TUNED) + tuple(TRAINING_FREE)


# The training recipe (measured over seeds by `bspf-ext study`: README, "demo"): epochs of
# the full-size run; warm-up and gradient clipping are in base_config.
RECIPE_EPOCHS = 10


def base_config(out_dir: Path, epochs: int, seed: int, device: str, quick: bool = False) -> TrainConfig:
    if quick:  # a smoke run of the whole pipeline in seconds; its accuracies mean nothing
        return TrainConfig(dataset="digit-pairs", image_size=16, patch_size=4, train_size=64, test_size=32,
                           model="micro", block_size=4, epochs=1, batch_size=32, seed=seed, device=device,
                           out_dir=str(out_dir))
    return TrainConfig(
        dataset="digit-pairs",
        image_size=32,
        patch_size=4,
        train_size=4000,
        test_size=1500,
        model="micro",
        block_size=16,
        keep_ratio=0.5,
        epochs=epochs,
        batch_size=32,  # many small steps: the pair task has a plateau that few large steps may not leave
        lr=1e-3,
        warmup_epochs=2.0,
        clip_grad_norm=1.0,
        seed=seed,
        device=device,
        out_dir=str(out_dir),
    )


def format_table(rows: list[dict]) -> str:
    header = ["model", "test acc", "attn MFLOPs/img", "model MFLOPs/img", "images/s", "train s"]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["name"],
                f"{100 * row['accuracy']:.1f}%",
                f"{row['attention_flops'] / 1e6:.2f}",
                f"{row['model_flops'] / 1e6:.2f}",
                f"{row['images_per_second']:.0f}" if row["images_per_second"] else "-",
                f"{row['train_seconds']:.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    render = lambda line: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
    return "\n".join([render(lines[0]), "  ".join("-" * w for w in widths)] + [render(line) for line in lines[1:]])


def _row(name: str, result: dict) -> dict:
    return {
        "name": name,
        "accuracy": result["test_accuracy"],
        "attention_flops": result["attention_flops"],
        "model_flops": result["model_flops"],
        "images_per_second": result["images_per_second"],
        "train_seconds": result["train_seconds"],
    }


def check_variants(names) -> list:
    names = list(names)
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(ALL_VARIANTS)}")
    sources = {**TRAINING_FREE, **FINE_TUNED}
    missing = [sources[n][0] for n in names if n in sources and sources[n][0] not in names]
    if missing:
        raise ValueError(f"the training-free and fine-tuned variants need {sorted(set(missing))} in the run too")
    # sources first, in the order given
    return [n for n in names if n in VARIANTS] + [n for n in names if n not in VARIANTS]


def variant_config(name: str, out_dir: Path, epochs: int, seed: int, device: str, quick: bool,
                   configs: dict) -> TrainConfig:
    """The config a trained variant runs with (configs: the variants already trained)."""
    config = base_config(out_dir / name.replace(" ", "-"), epochs, seed, device, quick)
    if name in FINE_TUNED:
        source, changes = FINE_TUNED[name]
        return config.replace(label=name, init_from=configs[source].out_dir, epochs=max(1, (epochs + 1) // 2),
                              **changes)
    return config.replace(label=name, **VARIANTS[name])


def run_variants(out_dir: Path, names, *, epochs: int, seed: int, device: str = "auto", quick: bool = False,
                 progress: bool = True, resume: bool = False, log=print) -> tuple[list, dict]:
    """Trains (or evaluates, for the training-free ones) each named variant at one seed under
    out_dir: (table rows in order, {trained name: its config}). With `resume`, a run whose
    checkpoint is there continues (a finished one is only evaluated again)."""
    names = check_variants(names)
    rows, configs = {}, {}
    for name in names:
        if name in TRAINING_FREE:
            source, changes = TRAINING_FREE[name]
            result = _training_free(name, configs[source], changes)
        else:
            config = variant_config(name, out_dir, epochs, seed, device, quick, configs)
            result = train(config, resume=resume, progress=progress, log=lambda message: None)
            configs[name] = config
        rows[name] = _row(name, result)
        log(f"  {name:28s} test accuracy {100 * result['test_accuracy']:5.1f}%  ({result['train_seconds']:.0f} s)")
    return [rows[n] for n in names], configs


def _training_free(name: str, trained: TrainConfig, changes: dict) -> dict:
    """Applies a training-free method to an already trained model and evaluates it."""
    config = trained.replace(label=name, **changes)
    data = load_dataset(config)
    device = resolve_device(config.device)
    model = build_model(trained, data.num_classes, data.in_chans)
    model.load_state_dict(load_checkpoint(Path(trained.out_dir))["model"])
    model = apply_pruning(model, config).to(device)
    measured = accuracy(model, data.test, device)
    result = {"test_accuracy": measured["accuracy"], "images_per_second": measured["images_per_second"],
              "train_seconds": 0.0}
    result.update(flops_summary(model, config, data.test, device))
    return result


def run(out_dir="runs/demo", *, epochs: int = RECIPE_EPOCHS, seed: int = 0, device: str = "auto", variants=None,
        quick: bool = False, progress: bool = True, log=print) -> list[dict]:
    out_dir = Path(out_dir)
    names = check_variants(DEMO_VARIANTS if variants is None else variants)
    log(f"bspf-ext demo: {len(names)} micro ViTs on digit-pairs (CPU path: {cpu_capability()}, "
        f"threads: {torch.get_num_threads()})")
    started = time.perf_counter()
    rows, configs = run_variants(out_dir, names, epochs=epochs, seed=seed, device=device, quick=quick,
                                 progress=progress, log=log)

    table = format_table(rows)
    log("")
    log(table)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "table.txt").write_text(table + "\n")

    figure = out_dir / "demo.png"
    model = image = None
    if "bspf" in configs:
        config = configs["bspf"]
        data = load_dataset(config)
        model = build_model(config, data.num_classes, data.in_chans)
        model.load_state_dict(load_checkpoint(Path(config.out_dir))["model"])
        image = data.test.tensors[0][0]
    from .viz import draw_comparison

    draw_comparison(rows, figure, model=model, image=image, title="digit-pairs: accuracy against attention FLOPs")
    log(f"\nwrote {figure}, {out_dir / 'results.json'} ({time.perf_counter() - started:.0f} s in all)")
    return rows
