"""The compiled core stands alone: it imports without torch and reports its CPU path."""

import subprocess
import sys


def test_compiled_module_imports_without_torch():
    # Block torch entirely; bspf_ext._C must still load (it does not link libtorch).
    code = (
        "import sys, importlib.util, pathlib\n"
        "sys.modules['torch'] = None\n"
        "spec = importlib.util.find_spec('bspf_ext')\n"
        "folder = pathlib.Path(spec.submodule_search_locations[0])\n"
        "path = next(folder.glob('_C*.so'))\n"
        "module_spec = importlib.util.spec_from_file_location('bspf_ext._C', path)\n"
        "module = importlib.util.module_from_spec(module_spec)\n"
        "module_spec.loader.exec_module(module)\n"
        "print(module.capability())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"scalar", "avx2", "avx512"}


def test_kernels_run_on_their_own_threads_without_torch():
    # Without torch there is no OpenMP runtime in the process, so the CPU kernels run on
    # std::threads; they must give bit for bit what they give on torch's OpenMP team.
    import numpy as np
    import torch

    import bspf_ext

    rng = np.random.default_rng(0)
    qk = rng.standard_normal((2, 3, 37, 5))
    v = rng.standard_normal((2, 3, 37, 4))
    expected = bspf_ext.block_symmetric_attention(torch.from_numpy(qk), torch.from_numpy(v), block_size=8)
    code = (
        "import sys, importlib.util, pathlib, json\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "spec = importlib.util.find_spec('bspf_ext')\n"
        "path = next(pathlib.Path(spec.submodule_search_locations[0]).glob('_C*.so'))\n"
        "module_spec = importlib.util.spec_from_file_location('bspf_ext._C', path)\n"
        "C = importlib.util.module_from_spec(module_spec)\n"
        "module_spec.loader.exec_module(C)\n"
        "qk = np.array(json.loads(sys.argv[1])); v = np.array(json.loads(sys.argv[2]))\n"
        "b, h, n, d = qk.shape; chunks = -(-n // 8)\n"
        "kernel = np.full(9, 1 / 9)\n"
        "out = np.empty((b, h, n, v.shape[-1])); words = np.empty((b, h, n, chunks), np.uint64)\n"
        "match = np.empty((b, h, n), np.int32); stats = [np.empty((b, h, n)) for _ in range(3)]\n"
        "p = C.Problem(); p.dtype = C.DType.float64; p.batch, p.heads, p.seqlen, p.head_dim = qk.shape\n"
        "p.value_dim = v.shape[-1]; p.block_size = 8; p.scale = d ** -0.5; p.fuse = True\n"
        "s = C.Saved(); s.mask_words = words.ctypes.data; s.match = match.ctypes.data\n"
        "s.rho, s.lse, s.log_row_sum = (t.ctypes.data for t in stats)\n"
        "f = C.ForwardParams(); f.p = p; f.keep_ratio = 0.5; f.saved = s; f.num_threads = 2\n"
        "f.qk, f.qk_stride = qk.ctypes.data, [x // 8 for x in qk.strides]\n"
        "f.v, f.v_stride = v.ctypes.data, [x // 8 for x in v.strides]\n"
        "f.score_kernel = kernel.ctypes.data; f.out = out.ctypes.data\n"
        "C.forward(f)\n"
        "print(json.dumps(out.tolist()))\n"
    )
    import json

    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(qk.tolist()), json.dumps(v.tolist())], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    got = torch.tensor(json.loads(result.stdout), dtype=torch.float64)
    assert torch.equal(got, expected)
