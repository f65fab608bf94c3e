"""pytest-benchmark suite of the CPU kernels. Run it on purpose (it is not part of the
test run): `pytest benchmarks/ --benchmark-only`. Every bspf_ext timing is reported as a
ratio to dense SDPA (and to the reference) measured in the same session; the summary
table is printed at the end and, with --ratios-json PATH, written out."""

from __future__ import annotations

import json
import platform

import torch

from workloads import MODES, SHAPES, TARGET_RATIO, TARGET_SPEEDUP_OVER_REFERENCE, shape_id

# (impl, shape, block_size or None, mode) -> median seconds, filled by the benchmarks.
MEDIANS: dict = {}


def pytest_addoption(parser):
    parser.addoption("--ratios-json", default=None, help="write the same-run ratio table to this JSON file")


def record(benchmark, impl, shape, block_size, mode):
    """Keeps a benchmark's median for the ratio table; adds the ratios known so far as extra_info."""
    if benchmark.stats is None:  # --benchmark-disable: the bodies ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    MEDIANS[(impl, tuple(shape), block_size, mode)] = median
    dense = MEDIANS.get(("sdpa", tuple(shape), None, mode))
    if impl != "sdpa" and dense:
        benchmark.extra_info["ratio_to_sdpa"] = round(median / dense, 3)
    if impl == "bspf":
        ref = MEDIANS.get(("reference", tuple(shape), block_size, mode))
        if ref:
            benchmark.extra_info["speedup_over_reference"] = round(ref / median, 1)


def ratio_rows():
    rows = []
    def order(item):
        (_impl, shape, block_size, mode), _median = item
        return (SHAPES.index(shape) if shape in SHAPES else len(SHAPES), block_size or 0, MODES.index(mode))

    for (impl, shape, block_size, mode), median in sorted(MEDIANS.items(), key=order):
        if impl != "bspf":
            continue
        dense = MEDIANS.get(("sdpa", shape, None, mode))
        ref = MEDIANS.get(("reference", shape, block_size, mode))
        rows.append({
            "shape": shape_id(shape), "block_size": block_size, "mode": mode,
            "bspf_ms": median * 1e3,
            "sdpa_ms": dense * 1e3 if dense else None,
            "ratio_to_sdpa": median / dense if dense else None,
            "speedup_over_reference": ref / median if ref else None,
        })
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = ratio_rows()
    if not rows:
        return
    tr = terminalreporter
    tr.section("bspf_ext / dense SDPA, same run")
    tr.write_line(f"{'shape':>16} {'Ω':>3} {'mode':>17} {'bspf ms':>9} {'sdpa ms':>9} {'ratio':>6} {'target':>6} {'vs ref':>7}")
    for r in rows:
        ratio = f"{r['ratio_to_sdpa']:.2f}" if r["ratio_to_sdpa"] else "-"
        dense = f"{r['sdpa_ms']:.2f}" if r["sdpa_ms"] else "-"
        ref = f"{r['speedup_over_reference']:.0f}x" if r["speedup_over_reference"] else "-"
        tr.write_line(f"{r['shape']:>16} {r['block_size']:>3} {r['mode']:>17} {r['bspf_ms']:>9.2f} {dense:>9} "
                      f"{ratio:>6} {TARGET_RATIO[r['mode']]:>6} {ref:>7}")
    tr.write_line(f"(targets: ratio <= {TARGET_RATIO}; at least {TARGET_SPEEDUP_OVER_REFERENCE:.0f}x over the reference)")
    path = config.getoption("--ratios-json")
    if path:
        with open(path, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=1)
