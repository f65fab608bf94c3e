"""Peak extra memory of the CPU op: what a forward (with autograd, so its saved buffers are
kept) and a backward add to the process's peak resident set, per (batch, head) pair, at
N = 197, 1024 and 4096 (D = Dv = 64, one thread, so one scratch workspace).

Each measurement runs in a fresh process: ru_maxrss only grows, so the peak before the
call and after it bound what the call itself needed. The inputs and the output are
allocated before the first reading; the forward's number includes the saved buffers
(mask words, match, ρ, lse, log Z) and its scratch, the backward's its scratch and the
two gradients.

    python benchmarks/memory.py [--dtype float32|float64] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
import bspf_ext
torch.set_num_threads(1)
n, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
small = torch.randn(1, 1, 40, 64, dtype=dtype, requires_grad=True)
bspf_ext.block_symmetric_attention(small, small).sum().backward()  # loads everything once
qk = torch.randn(1, 1, n, 64, dtype=dtype, requires_grad=True)
v = torch.randn(1, 1, n, 64, dtype=dtype, requires_grad=True)
grad = torch.ones(1, 1, n, 64, dtype=dtype)
before = peak_mib()
out = bspf_ext.block_symmetric_attention(qk, v, block_size=16)
after_forward = peak_mib()
out.backward(grad)
after_backward = peak_mib()
print(json.dumps({"forward": after_forward - before, "backward": after_backward - after_forward,
                  "path": bspf_ext.cpu_capability() if dtype == torch.float32 else "scalar"}))
"""


def theory_mib(n: int, itemsize: int) -> float:
    """The saved buffers by construction: mask words 8·N·C bytes, match 4·N, ρ, lse and log Z
    N each in the accumulation type."""
    chunks = -(-n // 16)
    return (8 * n * chunks + 4 * n + 3 * itemsize * n) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    itemsize = 4 if args.dtype == "float32" else 8
    lines = [
        f"| N | path | saved buffers (MiB, by construction) | forward peak (MiB) | backward peak (MiB) | N² {args.dtype} (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for n in (197, 1024, 4096):
        result = subprocess.run([sys.executable, "-c", CHILD, str(n), args.dtype], capture_output=True, text=True,
                                check=True)
        r = json.loads(result.stdout)
        lines.append(f"| {n} | {r['path']} | {theory_mib(n, itemsize):.2f} | {r['forward']:.1f} | {r['backward']:.1f} | "
                     f"{n * n * itemsize / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
