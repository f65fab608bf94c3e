"""bspf_ext: Block-based Symmetric Pruning and Fusion (BSPF) attention for vision transformers.

Layers, from the bottom: `ops` (the operator: torch.library registration over the compiled
kernels), `reference` (the oracle it is tested against), `nn` (attention layers), `models`
(ViT/DeiT, conversion, FLOPs), `pruning` (the token-reduction methods BSPF is compared with),
`swap` (putting BSPF into an existing timm model) and `app` (the `bspf-ext` command).
"""

from .nn import BlockSymmetricAttention
from .ops import block_mask, block_symmetric_attention, cpu_capability, has_cuda_build
from . import models, pruning, swap

__version__ = "0.1.0"


def __getattr__(name: str):
    # The reference (the tests' oracle) is loaded on first use: nothing in the library runs it.
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "block_symmetric_attention",
    "block_mask",
    "BlockSymmetricAttention",
    "models",
    "pruning",
    "swap",
    "reference",
    "cpu_capability",
    "has_cuda_build",
]
