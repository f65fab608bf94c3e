"""Scratch memory that cannot be had: MemoryError, no crash or hang, and the next call right.

Each case runs in a child process whose address space is capped (RLIMIT_AS) a little above
what it has mapped: the op's N×N scratch then cannot be allocated, whether a pair is
computed by one thread or by a team of threads (csrc/cpu/dispatch.cpp, pairs_together:
every worker reserves inside the team, and a team any of whose workers could not computes
nothing). Not in tools/sanitize_cpu.sh's list: AddressSanitizer aborts on a failed
allocation instead of returning null.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")

CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch, bspf_ext

    threads, entry = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)

    def cap_address_space(extra_mib):
        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (extra_mib << 20), resource.RLIM_INFINITY))

    generator = torch.Generator().manual_seed(0)
    if entry == "backward":
        # The forward fits (one 64 MiB square); the backward's three more squares do not.
        n = 4096
        qk, v, grad_out = (torch.randn(1, 1, n, 64, generator=generator) for _ in range(3))
        _, *saved = torch.ops.bspf_ext.forward(qk, v, bspf_ext.reference.box_score_kernel(torch.float32), 16,
                                              0.5, True, 0.125)
        cap_address_space(100)
        call = lambda: torch.ops.bspf_ext.backward(grad_out, qk, v, *saved, 16, True, 0.125)
    else:
        # The saved buffers fit (~130 MiB); the 1 GiB square does not.
        n = 16384
        qk, v = (torch.randn(1, 1, n, 64, generator=generator) for _ in range(2))
        cap_address_space(600)
        if entry == "block_mask":
            call = lambda: bspf_ext.block_mask(qk, block_size=16)
        else:
            call = lambda: bspf_ext.block_symmetric_attention(qk, v, block_size=16)
    try:
        call()
    except MemoryError:
        pass
    else:
        raise SystemExit("no MemoryError")

    # The pooled scratch is still sound: a small call with these threads gives one thread's bits.
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    qk, v = (torch.randn(1, 1, 197, 64, generator=generator) for _ in range(2))
    together = bspf_ext.block_symmetric_attention(qk, v, block_size=16)
    torch.set_num_threads(1)
    alone = bspf_ext.block_symmetric_attention(qk, v, block_size=16)
    if not torch.equal(together, alone):
        raise SystemExit("the call after the MemoryError differs from one thread's")
    print("ok")
    """
)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("entry", ["forward", "block_mask", "backward"])
def test_scratch_that_cannot_be_allocated_raises_memory_error(threads, entry):
    env = {k: v for k, v in os.environ.items() if k != "BSPF_CPU_CAPABILITY"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(threads), entry], capture_output=True, text=True,
                           timeout=300, env=env)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stdout + child.stderr
