"""Embedded datasets: deterministic, no download, and the pair task is truly long-range."""

import pytest
import torch

from bspf_ext.app import data


def test_digits_shapes_and_determinism():
    a, b = data.load("digits", image_size=16, seed=3), data.load("digits", image_size=16, seed=3)
    images, labels = a.train.tensors
    assert images.shape[1:] == (1, 16, 16) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(images, b.train.tensors[0]) and torch.equal(labels, b.train.tensors[1])
    assert not torch.equal(labels, data.load("digits", image_size=16, seed=4).train.tensors[1])


def test_digit_pairs_balanced_and_far_apart():
    ds = data.load("digit-pairs", image_size=32, seed=0, train_size=800, test_size=200)
    images, labels = ds.train.tensors
    assert ds.num_classes == 4 and images.shape == (800, 1, 32, 32)
    counts = torch.bincount(labels, minlength=4)
    assert (counts > 150).all() and (counts < 250).all()
    # Ink only in the top-left and bottom-right quadrants: the two halves of the evidence are far apart.
    assert images[..., :16, 16:].sum() == 0 and images[..., 16:, :16].sum() == 0
    assert (images[..., :16, :16].flatten(1).sum(1) > 0).all()
    assert (images[..., 16:, 16:].flatten(1).sum(1) > 0).all()


def test_digit_pairs_classes():
    ds = data.load("digit-pairs", image_size=16, train_size=300, test_size=30, classes=(3, 5, 8))
    assert ds.num_classes == 9
    assert set(ds.train.tensors[1].tolist()) == set(range(9))
    with pytest.raises(ValueError, match="classes"):
        data.load("digit-pairs", classes=(3,))


def test_unknown_dataset_and_bad_size():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="image_size"):
        data.load("digit-pairs", image_size=8)
