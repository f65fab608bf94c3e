"""Embedded image-classification datasets that need no download.

They are built from scikit-learn's bundled 8×8 handwritten digits (1,797 images that ship
inside the scikit-learn package: `pip install "bspf_ext[demo]"`), deterministically from a
seed:

* ``digits`` — one digit per image, upscaled to ``image_size``; 10 classes.
* ``digit-pairs`` — two digits in opposite corners of the canvas (top-left and
  bottom-right); the label names both. The label depends on two far-apart regions, so
  attention confined to chunks of nearby tokens cannot solve it: what BSPF's long-range
  entries buy is measured, not assumed.

The digit images are split into train and test pools before any composition, so test
images are never seen in training, not even as half of a pair.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .._checks import check_float, check_int

__all__ = ["EmbeddedDataset", "DATASETS", "load", "digits", "digit_pairs", "digit_images"]


@dataclass(frozen=True)
class EmbeddedDataset:
    name: str
    train: TensorDataset  # (images (N, 1, S, S) float32 in [0, 1], labels (N,) int64)
    test: TensorDataset
    num_classes: int
    image_size: int
    in_chans: int
    description: str


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: images (1797, 8, 8) float32 in [0, 1], labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded datasets are built from scikit-learn's bundled digits; "
            'install them with: pip install "bspf_ext[demo]"'
        ) from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def _split(count: int, test_fraction: float, generator: torch.Generator):
    order = torch.randperm(count, generator=generator)
    n_test = int(round(count * test_fraction))
    return order[n_test:], order[:n_test]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def _check_common(image_size, minimum: int, seed, test_fraction) -> None:
    """The arguments both datasets take."""
    check_int("image_size", image_size, low=minimum)
    check_int("seed", seed)
    # Both pools need images: a fraction of 0 or 1 would leave one of them empty.
    if not 0.0 < check_float("test_fraction", test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")


def digits(image_size: int = 32, seed: int = 0, test_fraction: float = 0.25) -> EmbeddedDataset:
    """One digit per image, upscaled to image_size × image_size, 10 classes."""
    _check_common(image_size, 8, seed, test_fraction)
    images, labels = digit_images()
    generator = torch.Generator().manual_seed(seed)
    train, test = _split(len(labels), test_fraction, generator)
    big = _resize(images, image_size)
    return EmbeddedDataset(
        name="digits",
        train=TensorDataset(big[train], labels[train]),
        test=TensorDataset(big[test], labels[test]),
        num_classes=10,
        image_size=image_size,
        in_chans=1,
        description=f"handwritten digits upscaled to {image_size}x{image_size}, 10 classes",
    )


def _compose_pairs(images, labels, classes, count, image_size, generator):
    """A digit of `classes` in each of two opposite corners; the label is the pair's index
    first·len(classes) + second."""
    digit_size = image_size * 3 // 8
    jitter = image_size // 8
    small = _resize(images, digit_size)
    by_class = [torch.nonzero(labels == c).flatten() for c in classes]

    def pick(which):
        chosen = torch.empty(count, dtype=torch.int64)
        for c, pool in enumerate(by_class):
            where = torch.nonzero(which == c).flatten()
            chosen[where] = pool[torch.randint(0, len(pool), (len(where),), generator=generator)]
        return chosen

    first_class = torch.randint(0, len(classes), (count,), generator=generator)
    second_class = torch.randint(0, len(classes), (count,), generator=generator)
    first, second = pick(first_class), pick(second_class)
    canvas = torch.zeros(count, 1, image_size, image_size)
    shifts = torch.randint(0, jitter + 1, (count, 4), generator=generator)
    far = image_size - digit_size - jitter
    for i in range(count):
        y, x = int(shifts[i, 0]), int(shifts[i, 1])
        canvas[i, :, y : y + digit_size, x : x + digit_size] = small[first[i]]
        y, x = far + int(shifts[i, 2]), far + int(shifts[i, 3])
        canvas[i, :, y : y + digit_size, x : x + digit_size] = small[second[i]]
    return canvas, first_class * len(classes) + second_class


def digit_pairs(
    image_size: int = 32,
    seed: int = 0,
    train_size: int = 6000,
    test_size: int = 1500,
    test_fraction: float = 0.25,
    classes: tuple = (0, 1),
) -> EmbeddedDataset:
    """Two digits in opposite corners; the label names both (len(classes)² classes).

    Each corner alone can tell at most 1/len(classes) of the label — 50% accuracy with the
    default classes (0, 1) — so a model that cannot connect the two corners is capped there,
    while one that can approaches 100%. With two easy digits the task isolates long-range
    interaction from digit recognition; more classes make recognition harder too.
    """
    _check_common(image_size, 16, seed, test_fraction)
    check_int("train_size", train_size, low=1)
    check_int("test_size", test_size, low=1)
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise TypeError(f"classes must be a sequence of two or more distinct digits 0-9, got {classes!r}")
    classes = tuple(classes)
    if any(isinstance(c, bool) or not isinstance(c, int) for c in classes):
        raise TypeError(f"classes must be a sequence of two or more distinct digits 0-9, got {classes!r}")
    if len(set(classes)) < 2 or not set(classes) <= set(range(10)) or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be two or more distinct digits 0-9, got {classes!r}")
    images, labels = digit_images()
    generator = torch.Generator().manual_seed(seed)
    train_pool, test_pool = _split(len(labels), test_fraction, generator)
    train = _compose_pairs(images[train_pool], labels[train_pool], classes, train_size, image_size, generator)
    test = _compose_pairs(images[test_pool], labels[test_pool], classes, test_size, image_size, generator)
    return EmbeddedDataset(
        name="digit-pairs",
        train=TensorDataset(*train),
        test=TensorDataset(*test),
        num_classes=len(classes) ** 2,
        image_size=image_size,
        in_chans=1,
        description=(
            f"digits {classes} in the top-left and bottom-right corners of a {image_size}x{image_size} "
            "canvas; the label names both (needs long-range attention)"
        ),
    )


DATASETS = {"digits": digits, "digit-pairs": digit_pairs}


def load(name: str, **kwargs) -> EmbeddedDataset:
    """An embedded dataset by name: one of DATASETS."""
    if not isinstance(name, str):
        raise TypeError(f"dataset must be one of {sorted(DATASETS)}, got {type(name).__name__} {name!r}")
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    builder = DATASETS[name]
    unknown = sorted(set(kwargs) - set(inspect.signature(builder).parameters))
    if unknown:
        raise TypeError(f"dataset {name!r} takes no options {unknown}; it takes {list(inspect.signature(builder).parameters)}")
    return builder(**kwargs)
