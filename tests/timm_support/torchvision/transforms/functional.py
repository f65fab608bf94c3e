"""Stand-in for torchvision.transforms.functional: InterpolationMode (timm.data.transforms
builds its interpolation tables from it at import time), with torchvision's values."""

from enum import Enum

from .._missing import module_getattr


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


__getattr__ = module_getattr(__name__)
