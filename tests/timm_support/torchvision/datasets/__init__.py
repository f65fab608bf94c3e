"""Stand-in for torchvision.datasets: the classes timm.data.dataset_factory imports
unconditionally, each refusing to be instantiated. The ones timm imports inside
try/except ImportError (Places365, INaturalist, QMNIST, ImageNet) are left out, so timm
records them as unavailable."""

from .._missing import module_getattr, placeholder

CIFAR10 = placeholder(__name__, "CIFAR10")
CIFAR100 = placeholder(__name__, "CIFAR100")
MNIST = placeholder(__name__, "MNIST")
KMNIST = placeholder(__name__, "KMNIST")
FashionMNIST = placeholder(__name__, "FashionMNIST")
ImageFolder = placeholder(__name__, "ImageFolder")

__getattr__ = module_getattr(__name__)
