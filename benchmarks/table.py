"""Prints the markdown table of docs/performance.md: for every shape, dense SDPA and
bspf_ext at every block size, forward and forward+backward, timed interleaved within
each round (as the gate does) so that load from other jobs hits all of them alike.
The ratio column is the median of the per-round ratios bspf / SDPA.

    python benchmarks/table.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import BLOCK_SIZES, MODES, SHAPES, interleaved_medians, make_inputs, shape_id, workload  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, load before {os.getloadavg()[0]:.2f}")
    print("| shape (B, H, N, D) | mode | SDPA ms | " + " | ".join(f"Ω={b} ms (ratio)" for b in BLOCK_SIZES) + " |")
    print("|---|---|---:|" + "---:|" * len(BLOCK_SIZES))
    for shape in SHAPES:
        inputs = make_inputs(shape)
        for mode in MODES:
            fns = {"sdpa": workload("sdpa", mode, inputs)}
            fns.update({b: workload("bspf", mode, inputs, b) for b in BLOCK_SIZES})
            timed = interleaved_medians(fns, rounds=args.rounds)
            cells = [f"{timed['median_s'][b] * 1e3:.2f} ({timed['ratio_to_sdpa'][b]:.2f})" for b in BLOCK_SIZES]
            print(f"| {shape_id(shape)} | {mode} | {timed['median_s']['sdpa'] * 1e3:.2f} | " + " | ".join(cells) + " |",
                  flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
