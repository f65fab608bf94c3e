"""`bspf-ext study`: the demo's models (demo.py, all variants by default) trained over K
seeds, with each model's mean, sample standard deviation and 95% t-interval of the test
accuracy, the per-seed values in results.json, a table and a figure with error bars.

Seed s trains every model with seed s (weights, data order, and the digit-pairs data set,
which is composed from the seed too), so the spread covers all of them. Runs go to
out/seed-<s>/<model>; an interrupted study continues where it stopped (finished runs are
only evaluated again). The reading rule: two models differ only where their 95% intervals
do not overlap (`separated`), which is conservative for a difference of means.
"""

from __future__ import annotations

import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._checks import check_int
from . import demo

__all__ = ["T_975", "t_interval", "summarise", "separated", "format_study_table", "draw_study", "run"]

# The 0.975 quantile of Student's t with df = 1 … 30 degrees of freedom (two-sided 95%).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_interval(values) -> dict:
    """mean, std (n − 1), and the 95% t-interval mean ± t·std/√n of the values (n >= 2; with
    one value the interval is that value, and std NaN)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "low": mean, "high": mean}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    half = t * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def summarise(per_seed: dict) -> list[dict]:
    """{model: [row per seed]} -> one summary per model: accuracy statistics, FLOPs (mean)."""
    out = []
    for name, rows in per_seed.items():
        accuracies = [row["accuracy"] for row in rows]
        summary = {"name": name, "accuracies": accuracies, "seeds": [row["seed"] for row in rows],
                   **t_interval(accuracies)}
        for key in ("attention_flops", "model_flops", "train_seconds"):
            summary[key] = sum(row[key] for row in rows) / len(rows)
        out.append(summary)
    return out


def separated(a: dict, b: dict) -> bool:
    """Whether the 95% intervals of two summaries do not overlap."""
    return a["low"] > b["high"] or b["low"] > a["high"]


def format_study_table(summaries: list[dict]) -> str:
    header = ["model", "mean acc", "std", "95% interval", "min-max", "attn MFLOPs/img"]
    lines = [header]
    for s in summaries:
        lines.append([
            s["name"], f"{100 * s['mean']:.1f}%", "-" if math.isnan(s["std"]) else f"{100 * s['std']:.1f}",
            f"[{100 * s['low']:.1f}, {100 * s['high']:.1f}]",
            f"{100 * min(s['accuracies']):.1f}-{100 * max(s['accuracies']):.1f}",
            f"{s['attention_flops'] / 1e6:.2f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    render = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    n = summaries[0]["n"] if summaries else 0
    return "\n".join([render(lines[0]), "  ".join("-" * w for w in widths)] + [render(line) for line in lines[1:]]
                     + [f"test accuracy over {n} seeds; 95% interval: mean ± t(0.975, n-1)·std/√n"])


def format_separations(summaries: list[dict]) -> str:
    """Every pair of models whose intervals separate, the better one first."""
    pairs = []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1:]:
            if separated(a, b):
                better, worse = (a, b) if a["mean"] > b["mean"] else (b, a)
                pairs.append(f"{better['name']} > {worse['name']}")
    return "\n".join(pairs) if pairs else "(no pair of intervals separates)"


def draw_study(summaries: list[dict], path, *, title: str = "") -> Path:
    """Mean accuracy per model with its 95% interval as error bars, and the seeds as dots."""
    from .viz import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(summaries) + 2), 4.5))
    for x, s in enumerate(summaries):
        ax.errorbar([x], [100 * s["mean"]], yerr=[[100 * (s["mean"] - s["low"])], [100 * (s["high"] - s["mean"])]],
                    fmt="o", capsize=6, color="C0")
        ax.scatter([x + 0.15] * len(s["accuracies"]), [100 * a for a in s["accuracies"]], s=10, color="C1", alpha=0.7)
    ax.set_xticks(range(len(summaries)))
    ax.set_xticklabels([s["name"] for s in summaries], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "mean and 95% interval over seeds (dots: the seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(out_dir="runs/study", *, seeds: int = 5, epochs=None, device: str = "auto", variants=None,
        quick: bool = False, threads=None, only_seeds=None, progress: bool = True, log=print) -> list[dict]:
    """Trains the models over seeds 0 … seeds-1 and writes results.json, table.txt and
    study.png under out_dir. Returns the per-model summaries. With `only_seeds`, trains just
    those seeds and writes no summary (to spread one study over processes; a last call
    without it gathers them)."""
    check_int("seeds", seeds, low=1)
    epochs = demo.RECIPE_EPOCHS if epochs is None else check_int("epochs", epochs, low=1)
    if threads is not None:
        torch.set_num_threads(check_int("threads", threads, low=1))
    names = demo.check_variants(demo.ALL_VARIANTS if variants is None else variants)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"bspf-ext study: {len(names)} models × {seeds} seeds, {epochs} epochs (threads: {torch.get_num_threads()})")
    started = time.perf_counter()
    if only_seeds is not None:
        for seed in only_seeds:
            log(f"seed {check_int('only_seeds', seed, low=0)}:")
            demo.run_variants(out_dir / f"seed-{seed}", names, epochs=epochs, seed=seed, device=device, quick=quick,
                              progress=progress, resume=True, log=log)
        return []
    per_seed = {name: [] for name in names}
    for seed in range(seeds):
        log(f"seed {seed}:")
        rows, _ = demo.run_variants(out_dir / f"seed-{seed}", names, epochs=epochs, seed=seed, device=device,
                                    quick=quick, progress=progress, resume=True, log=log)
        for row in rows:
            per_seed[row["name"]].append(dict(row, seed=seed))
    summaries = summarise({name: per_seed[name] for name in names})
    table = format_study_table(summaries)
    separations = format_separations(summaries)
    info = {"machine": _machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "threads": torch.get_num_threads(), "seconds": time.perf_counter() - started, "seeds": seeds,
            "epochs": epochs, "quick": quick,
            "recipe": demo.base_config(out_dir, epochs, 0, device, quick).to_dict()}
    (out_dir / "results.json").write_text(json.dumps({"info": info, "models": summaries, "per_seed": per_seed},
                                                     indent=2) + "\n")
    (out_dir / "table.txt").write_text(table + "\n\nseparated at 95%:\n" + separations + "\n")
    figure = draw_study(summaries, out_dir / "study.png",
                        title=f"digit-pairs, {seeds} seeds: mean and 95% interval (dots: seeds)")
    log("")
    log(table)
    log("\nseparated at 95%:\n" + separations)
    log(f"\nwrote {figure}, {out_dir / 'results.json'} ({info['seconds']:.0f} s in all)")
    return summaries
