"""Random patch pruning, the baseline for similarity pruning: the same counts and shapes,
the class token kept, deterministic under a seed."""

import pytest
import torch

from bspf_ext import pruning
from bspf_ext.ops.geometry import keep_count


@pytest.mark.parametrize("keep_ratio", [0.0, 0.25, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("has_class_token", [True, False])
def test_same_count_and_shapes_as_similarity(keep_ratio, has_class_token):
    tokens = torch.randn(3, 1 + 49, 8)
    kept, indices = pruning.random_prune(tokens, keep_ratio, has_class_token=has_class_token,
                                         generator=torch.Generator().manual_seed(0))
    sim_kept, sim_indices = pruning.similarity_prune(tokens, keep_ratio, has_class_token=has_class_token)
    assert kept.shape == sim_kept.shape and indices.shape == sim_indices.shape
    first = 1 if has_class_token else 0
    assert indices.shape[1] == first + keep_count(keep_ratio, 1, tokens.shape[1] - first)
    assert torch.equal(kept, tokens.gather(1, indices[..., None].expand(-1, -1, 8)))
    for row in indices:  # ascending, distinct, in range
        if row.numel():
            assert torch.all(row[1:] > row[:-1]) and row.min() >= 0 and row.max() < tokens.shape[1]
    if has_class_token:
        assert torch.all(indices[:, 0] == 0) and torch.all(indices[:, 1:] > 0)


def test_layer_keeps_the_class_token_and_matches_similarity_layer_shapes():
    tokens = torch.randn(4, 17, 6)
    layer = pruning.RandomPatchPruning(0.5, seed=3)
    out = layer(tokens, score_tokens=tokens)
    reference = pruning.SimilarityPatchPruning(0.5)(tokens)
    assert out.shape == reference.shape == (4, 1 + 8, 6)
    assert torch.equal(out[:, 0], tokens[:, 0])
    assert torch.equal(layer.last_counts, torch.full((4,), 8))
    assert torch.all(layer.last_indices[:, 0] == 0)


def test_deterministic_under_a_seed_and_differs_across_seeds_and_images():
    tokens = torch.randn(8, 65, 4)
    a, b, c = (pruning.RandomPatchPruning(0.5, seed=s) for s in (7, 7, 8))
    first_a, first_b = a(tokens), b(tokens)
    c(tokens)
    assert torch.equal(first_a, first_b) and torch.equal(a.last_indices, b.last_indices)
    assert not torch.equal(a.last_indices, c.last_indices)
    assert not all(torch.equal(a.last_indices[0], row) for row in a.last_indices[1:])  # per image
    second = a(tokens)  # the sequence of draws goes on ...
    assert not torch.equal(second, first_a)
    a.reset()  # ... and starts again
    assert torch.equal(a(tokens), first_a)
    # the draw does not depend on torch's global generator
    torch.manual_seed(123)
    assert torch.equal(pruning.RandomPatchPruning(0.5, seed=7)(tokens), first_a)


def test_uniform_over_patches():
    counts = torch.zeros(16)
    layer = pruning.RandomPatchPruning(0.25, seed=0)
    for _ in range(50):
        layer(torch.randn(40, 17, 2))
        counts += torch.bincount(layer.last_indices[:, 1:].reshape(-1) - 1, minlength=16)
    expected = 50 * 40 * 4 / 16
    assert torch.all((counts - expected).abs() < 0.15 * expected)


def test_progressive_stages_in_pruned_blocks():
    blocks = [torch.nn.Identity() for _ in range(3)]
    stack = pruning.SimilarityPrunedBlocks(blocks, {1: pruning.RandomPatchPruning(0.5, seed=1)})
    tokens = torch.randn(2, 17, 4)
    out = stack(tokens)
    assert out.shape == (2, 9, 4) and torch.all(stack.last_indices[:, 0] == 0)
    assert torch.equal(out, tokens.gather(1, stack.last_indices[..., None].expand(-1, -1, 4)))
