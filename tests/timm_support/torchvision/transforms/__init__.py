"""Stand-in for torchvision.transforms: `ToTensor` (timm.data.transforms subclasses it) and
the `functional` submodule. The classes refuse to be instantiated: data pipelines need
the real torchvision."""

from .._missing import module_getattr, placeholder
from . import functional  # noqa: F401  (timm: `import torchvision.transforms.functional as F`)

ToTensor = placeholder(__name__, "ToTensor")

__getattr__ = module_getattr(__name__)
