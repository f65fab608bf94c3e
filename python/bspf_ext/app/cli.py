"""The `bspf-ext` command (also `python -m bspf_ext`): demo, study, train, eval, viz, bench, approx.

A user's mistake (a bad flag or config file, a missing or damaged checkpoint, an unreadable
image) ends the command with one line on stderr, "bspf-ext <command>: error: ...", and exit
status 2 — never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["main"]

# bspf_ext.app.model_bench.MODELS, spelled out so --help needs no torch import.
MODEL_BENCH_MODELS = ("deit_tiny", "deit_small", "deit_base", "vit_tiny", "vit_small", "vit_base")

# What a user's mistake raises once the arguments are parsed (the checks name the argument).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError, ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the usage block it normally prints first is left to --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(low: int, high: int | None = None):
    """An argparse type: an int in [low, high] (no upper bound when high is None)."""
    expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; a flag left out keeps the config file's (or default) value."""
    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "attention_layers":
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, metavar="LAYER",
                                help="blocks that use --attention (default: all)")
        elif f.name == "prune_layers":
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, metavar="LAYER",
                                help="similarity/random: prune before these blocks (default: 0); "
                                     "svit: gate these blocks (default: all but the first)")
        elif f.name == "prune_targets":
            parser.add_argument(flag, dest=f.name, type=float, nargs="+", default=None, metavar="RATIO",
                                help="svit: one keep-ratio target per gated block (default: --prune-keep-ratio)")
        else:
            kind = {int: int, float: float}.get(hint, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {f.default})")


def _read_config_file(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no config file at {path}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise TypeError(f"config file {path} must hold a JSON object of TrainConfig fields, got {type(values).__name__}")
    return values


def _config_from_args(args) -> "TrainConfig":
    from .config import TrainConfig

    values = _read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    return TrainConfig.from_dict(values)


def _cmd_demo(args) -> int:
    from . import demo

    epochs = demo.RECIPE_EPOCHS if args.epochs is None else args.epochs
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    demo.run(args.out, epochs=epochs, seed=args.seed, device=args.device, variants=args.variants,
             quick=args.quick, progress=not args.no_progress)
    return 0


def _cmd_train(args) -> int:
    from .train import train

    config = _config_from_args(args)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result:
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "config")}, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.checkpoint, device=args.device, dataset_split=args.split)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _cmd_viz(args) -> int:
    from . import viz
    from .build import build_model, load_dataset
    from .checkpoints import load_checkpoint
    from .config import TrainConfig

    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        config = TrainConfig.from_dict(state["config"])
    else:
        config = _config_from_args(args)
        state = None
    if config.attention != "bspf":
        raise ValueError(f"viz draws BSPF keep masks; the model's attention is {config.attention!r}")
    data = load_dataset(config)
    model = build_model(config, data.num_classes, data.in_chans)
    if state is not None:
        model.load_state_dict(state["model"])
    if args.image:
        image = viz.load_image(args.image, config.image_size, data.in_chans)
        title = f"{args.image}"
    else:
        if args.sample >= len(data.test):
            raise ValueError(f"--sample must be a test sample index in [0, {len(data.test)}), got {args.sample}")
        image = data.test.tensors[0][args.sample]
        title = f"{config.dataset} test sample {args.sample} (label {int(data.test.tensors[1][args.sample])})"
    path = viz.draw_image_report(model, image, args.out, title=title, layer=args.layer, head=args.head)
    print(f"wrote {path}")
    return 0


# The operator benchmark's shape flags and their defaults (None: not given).
_OPERATOR_FLAGS = {"heads": 6, "seqlen": 197, "head_dim": 64, "forward_only": False}


def _cmd_bench(args) -> int:
    if args.model is not None:
        return _cmd_model_bench(args)
    from . import bench

    for flag in ("variants", "img_size", "warmup", "out", "threads", "profile"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is a model-benchmark flag: it needs --model")
    batch = [8] if args.batch is None else args.batch
    if len(batch) != 1:
        raise ValueError(f"--batch takes one size for the operator benchmark (several need --model), got {args.batch}")
    shape = {name: default if getattr(args, name) in (None, False) else getattr(args, name)
             for name, default in _OPERATOR_FLAGS.items()}
    print(bench.format_rows(bench.compare_with_dense(
        batch=batch[0], heads=shape["heads"], seqlen=shape["seqlen"], head_dim=shape["head_dim"],
        block_size=args.block_size, keep_ratio=args.keep_ratio, repeats=args.repeats or 20,
        device=args.device, backward=not shape["forward_only"])))
    return 0


def _cmd_model_bench(args) -> int:
    from . import model_bench

    given = [name for name in _OPERATOR_FLAGS if getattr(args, name) not in (None, False)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: operator-benchmark shape flags, not used with --model")
    result = model_bench.run(
        args.model, args.batch or [1, 8, 32, 64], args.out or "runs/bench", variants=args.variants or list(model_bench.VARIANTS),
        device=args.device, img_size=args.img_size or 224, rounds=args.repeats or 5,
        warmup=1 if args.warmup is None else args.warmup, block_size=args.block_size, keep_ratio=args.keep_ratio,
        threads=args.threads, progress=not args.no_progress)
    print(result["table"])
    print(f"wrote {result['out']}/results.json, table.md, throughput.png")
    if args.profile is not None:
        from . import model_profile

        profiled = model_profile.run(
            args.model, args.profile, result["out"], variants=args.variants or list(model_bench.VARIANTS),
            device=args.device, img_size=args.img_size or 224, block_size=args.block_size,
            keep_ratio=args.keep_ratio, threads=args.threads)
        print(f"\nWhere the time goes at batch {args.profile} (torch.profiler, self time by kind, ms per forward):\n")
        print(profiled["table"])
        print(f"wrote {profiled['out']}/profile.json, profile.md")
    return 0


def _int_list(text: str) -> list:
    """An argparse type: comma-separated ints >= 1, e.g. 1,8,32."""
    parse = _int_in(1)
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return [parse(part) for part in parts]


def _cmd_approx(args) -> int:
    from .build import build_model, load_dataset
    from .checkpoints import load_checkpoint
    from .config import TrainConfig
    from ..models import approximation_errors, format_approximation_table

    state = load_checkpoint(args.init_from)
    config = TrainConfig.from_dict(state["config"])
    if config.attention != "dense" or config.pruning == "svit":
        raise ValueError(f"--init-from must be a dense run without SViT gates; {args.init_from} has attention "
                         f"{config.attention!r}, pruning {config.pruning!r}")
    data = load_dataset(config.replace(pruning="none"))
    model = build_model(config.replace(pruning="none"), data.num_classes, data.in_chans)
    model.load_state_dict(state["model"])
    images = data.test.tensors[0][: args.images]
    result = approximation_errors(model, images, keep_ratios=args.keep_ratios, block_size=args.block_size or
                                  config.block_size, qk_init=args.qk_init)
    result["source"] = str(args.init_from)
    table = format_approximation_table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "approx.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'approx.json'}, {out / 'table.txt'}")
    return 0


def _cmd_study(args) -> int:
    from . import study

    study.run(args.out, seeds=args.seeds, epochs=args.epochs, device=args.device, variants=args.variants,
              quick=args.quick, threads=args.threads, only_seeds=args.only_seeds, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bspf-ext", description="BSPF attention for vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train dense, chunk and BSPF micro ViTs (and ablations), compare, draw")
    demo.add_argument("--out", default="runs/demo", help="folder for checkpoints, results and the figure")
    demo.add_argument("--epochs", type=_int_in(1), default=None, help="(default: the recipe's)")
    demo.add_argument("--seed", type=_int_in(0), default=0)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--variants", nargs="+", default=None, help="a subset of the runs, by name")
    demo.add_argument("--threads", type=_int_in(1), default=None,
                      help="torch threads (default: torch's; 1 is fastest on a shared machine)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run on tiny data")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    study = sub.add_parser("study", help="the demo's models over several seeds: mean, std, 95%% intervals, figure")
    study.add_argument("--out", default="runs/study", help="folder for the runs, results.json, table and figure")
    study.add_argument("--seeds", type=_int_in(1), default=5, help="how many seeds (0 … K-1) per model")
    study.add_argument("--epochs", type=_int_in(1), default=None, help="(default: the demo's recipe)")
    study.add_argument("--device", default="auto")
    study.add_argument("--variants", nargs="+", default=None, help="a subset of the models, by name")
    study.add_argument("--threads", type=_int_in(1), default=None,
                       help="torch threads (default: torch's; 1 is fastest on a shared machine)")
    study.add_argument("--only-seeds", type=_int_in(0), nargs="+", default=None,
                       help="train just these seeds and write no summary (to spread a study over processes)")
    study.add_argument("--quick", action="store_true", help="a smoke run on tiny data; its numbers mean nothing")
    study.add_argument("--no-progress", action="store_true")
    study.set_defaults(func=_cmd_study)

    train = sub.add_parser("train", help="train one model from a config (JSON file and/or flags)")
    train.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    train.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt if present")
    train.add_argument("--no-progress", action="store_true")
    _add_config_flags(train)
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="accuracy, throughput and FLOPs of a checkpoint")
    ev.add_argument("checkpoint", help="checkpoint file or the run's out_dir")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--split", choices=["test", "train"], default="test")
    ev.add_argument("--json", help="also write the result to this file")
    ev.set_defaults(func=_cmd_eval)

    viz = sub.add_parser("viz", help="keep mask and token usage of a BSPF model for an image")
    viz.add_argument("--checkpoint", help="a trained BSPF checkpoint (default: an untrained model from the flags)")
    viz.add_argument("--image", help="an image file (PNG); default: an embedded test sample")
    viz.add_argument("--sample", type=_int_in(0), default=0, help="index of the embedded test sample")
    viz.add_argument("--layer", type=_int_in(0), default=0, help="which BSPF layer's mask to draw")
    viz.add_argument("--head", type=_int_in(0), default=0)
    viz.add_argument("--out", default="bspf-viz.png")
    viz.add_argument("--config", help="JSON config for the untrained model")
    _add_config_flags(viz)
    viz.set_defaults(func=_cmd_viz)

    approx = sub.add_parser("approx", help="relative output error of converted BSPF layers against keep_ratio 1")
    approx.add_argument("--init-from", required=True, help="a trained dense run (its out_dir or checkpoint)")
    approx.add_argument("--images", type=_int_in(1), default=256, help="test images to measure on")
    approx.add_argument("--keep-ratios", type=_ratio, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    approx.add_argument("--block-size", type=_int_in(1, 64), default=None, help="(default: the dense run's)")
    approx.add_argument("--qk-init", choices=["spectral", "mean", "q", "k"], default="spectral")
    approx.add_argument("--out", default="runs/approx", help="folder for approx.json and table.txt")
    approx.set_defaults(func=_cmd_approx)

    bench = sub.add_parser("bench", help="time the operator against dense attention at one shape, or with "
                                          "--model whole models (dense, chunk, bspf, svit) across batch sizes")
    bench.add_argument("--model", choices=MODEL_BENCH_MODELS, default=None,
                       help="benchmark this whole model instead of the operator (see docs/performance.md)")
    bench.add_argument("--batch", type=_int_list, default=None, metavar="B[,B...]",
                       help="batch size (default 8); with --model a list (default 1,8,32,64)")
    bench.add_argument("--heads", type=_int_in(1), default=None, help="operator shape (default 6)")
    bench.add_argument("--seqlen", type=_int_in(1), default=None, help="operator shape (default 197)")
    bench.add_argument("--head-dim", type=_int_in(1), default=None, help="operator shape (default 64)")
    bench.add_argument("--block-size", type=_int_in(1, 64), default=16)
    bench.add_argument("--keep-ratio", type=_ratio, default=0.5)
    bench.add_argument("--repeats", type=_int_in(1), default=None, help="timed rounds (default 20; --model: 5)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--forward-only", action="store_true", help="operator only: no backward")
    bench.add_argument("--variants", nargs="+", choices=("dense", "chunk", "bspf", "svit"), default=None,
                       help="--model: which models (default all; dense is always timed)")
    bench.add_argument("--img-size", type=_int_in(16), default=None, help="--model: image size (default 224)")
    bench.add_argument("--profile", type=_int_in(1), default=None, metavar="B",
                       help="--model: also split each model's time by kind of operation (attention op, "
                            "matmuls, copies, ...) at batch size B, with torch.profiler (profile.md)")
    bench.add_argument("--warmup", type=_int_in(0), default=None, help="--model: untimed calls per model (default 1)")
    bench.add_argument("--out", default=None, help="--model: folder for results.json, table.md, throughput.png "
                                                   "(default runs/bench)")
    bench.add_argument("--threads", type=_int_in(1), default=None,
                       help="--model: CPU threads (default torch's; 1 is steadier on a loaded machine)")
    bench.add_argument("--no-progress", action="store_true", help="--model: no progress bar")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the exception's text holds
        print(f"bspf-ext {args.command}: error: {message}", file=sys.stderr)
        return 2
