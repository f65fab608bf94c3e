"""The BSPF operator: constants and geometry (geometry.py, a leaf), argument checks
(validation.py), the torch.library ops (library.py), the params structs the compiled
kernels take (params.py), which compiled modules are present (backends.py), the CPU and
CUDA glue (cpu.py, cuda.py) and the public functions (api.py).

Importing this package registers the ops and their CPU kernels, and the CUDA kernels when
the package was built with nvcc.
"""

from . import cpu  # noqa: F401  (registers the CPU kernels)
from .api import block_mask, block_symmetric_attention
from .backends import cpu_capability, has_cuda_build

if has_cuda_build():
    from . import cuda  # noqa: F401  (registers the CUDA kernels)

__all__ = ["block_symmetric_attention", "block_mask", "cpu_capability", "has_cuda_build"]
