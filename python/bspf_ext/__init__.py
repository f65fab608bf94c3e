"""bspf_ext: Block-based Symmetric Pruning and Fusion (BSPF) attention for vision transformers."""

from . import _cpu_ops  # noqa: F401  (registers the CPU kernels)
from . import reference
from . import pruning  # noqa: F401  (bspf_ext.pruning: the token-reduction methods BSPF is compared with)
from ._backends import cpu_capability, has_cuda_build, load_cuda_kernels
from ._ops import block_mask, block_symmetric_attention
from .nn import BlockSymmetricAttention
from . import models, patch  # noqa: E402  (they build on the names above)

load_cuda_kernels()  # registers the CUDA kernels when the package was built with nvcc

__version__ = "0.1.0"

__all__ = [
    "block_symmetric_attention",
    "block_mask",
    "BlockSymmetricAttention",
    "models",
    "patch",
    "reference",
    "cpu_capability",
    "has_cuda_build",
]
