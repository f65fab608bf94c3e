"""Similarity-based patch pruning (bspf_ext.pruning.similarity)."""

import math

import pytest
import torch
from torch import nn

from bspf_ext.pruning import (
    SimilarityPatchPruning,
    SimilarityPrunedBlocks,
    patch_similarity,
    redundancy_scores,
    similarity_keep_mask,
    similarity_prune,
)


def _tokens(batch=3, num_patches=16, dim=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 + num_patches, dim, generator=gen, dtype=dtype)


def _explicit_scores(patches):
    """Mean cosine similarity to the other patches, straight from the P×P matrix."""
    unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sim = unit @ unit.transpose(1, 2)
    num = patches.shape[1]
    off_diagonal = sim.masked_fill(torch.eye(num, dtype=torch.bool), 0)
    return off_diagonal.sum(-1) / (num - 1)


def test_redundancy_scores_equal_the_explicit_similarity_matrix():
    patches = _tokens(num_patches=20)[:, 1:]
    patches[1, 3] = 0  # a zero patch is similar to nothing
    scores = redundancy_scores(patches)
    torch.testing.assert_close(scores, _explicit_scores(patches), rtol=0, atol=1e-12)
    assert scores[1, 3] == 0
    sim = patch_similarity(patches)
    assert sim.shape == (3, 20, 20)
    torch.testing.assert_close(sim, sim.transpose(1, 2))


def test_redundancy_scores_in_float32_and_half_match_float64():
    patches = _tokens(num_patches=196, dim=64)[:, 1:]
    exact = _explicit_scores(patches)
    torch.testing.assert_close(redundancy_scores(patches.float()).double(), exact, rtol=0, atol=1e-5)
    half = patches.half()
    torch.testing.assert_close(redundancy_scores(half).double(), _explicit_scores(half.double()), rtol=0, atol=1e-5)


def test_single_patch_scores_zero():
    assert redundancy_scores(torch.randn(2, 1, 4)).tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("num_patches", [1, 7, 16, 49])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0])
def test_fixed_keep_ratio_is_honoured_exactly(num_patches, keep_ratio):
    tokens = _tokens(num_patches=num_patches)
    kept, indices = similarity_prune(tokens, keep_ratio)
    expected = 1 + math.ceil(keep_ratio * num_patches - 1e-9)
    assert kept.shape == (3, expected, 8) and indices.shape == (3, expected)
    assert (indices[:, 0] == 0).all(), "the class token is always kept"
    assert (indices[:, 1:] > indices[:, :-1]).all(), "indices ascend"
    torch.testing.assert_close(kept, tokens[torch.arange(3)[:, None], indices], rtol=0, atol=0)


def test_kept_patches_are_the_least_redundant():
    tokens = _tokens(num_patches=30)
    _, indices = similarity_prune(tokens, 0.4)
    scores = redundancy_scores(tokens[:, 1:])
    for b in range(3):
        kept = set((indices[b, 1:] - 1).tolist())
        expected = set(torch.argsort(scores[b])[:12].tolist())
        assert kept == expected


def test_without_class_token_nothing_is_forced():
    tokens = _tokens(num_patches=10)
    # Make token 0 the most redundant: a copy of the mean direction of the others.
    tokens[:, 0] = tokens[:, 1:].mean(dim=1) * 10
    _, with_cls = similarity_prune(tokens, 0.5)
    _, without = similarity_prune(tokens, 0.5, has_class_token=False)
    assert (with_cls[:, 0] == 0).all()
    assert without.shape == (3, math.ceil(0.5 * 11))
    assert not (without == 0).any(), "the most redundant token is pruned when it is not a class token"


def test_class_token_never_pruned_even_when_most_redundant():
    tokens = torch.ones(2, 9, 4, dtype=torch.float64)
    tokens[:, 1:] += 0.1 * torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for keep_ratio in (0.0, 0.3, 1.0):
        mask = similarity_keep_mask(tokens, keep_ratio)
        assert mask[:, 0].all()
    kept, indices = similarity_prune(tokens, 0.0)
    assert indices.tolist() == [[0], [0]]
    torch.testing.assert_close(kept, tokens[:, :1])


def test_keep_everything_is_the_identity():
    tokens = _tokens()
    kept, indices = similarity_prune(tokens, 1.0)
    torch.testing.assert_close(kept, tokens, rtol=0, atol=0)
    assert (indices == torch.arange(17)).all()


def test_ties_go_to_the_smaller_index():
    tokens = torch.ones(1, 1 + 10, 4)  # every patch identical: all scores tie
    _, indices = similarity_prune(tokens, 0.3)
    assert indices.tolist() == [[0, 1, 2, 3]]


def test_deterministic_and_differentiable_in_the_kept_tokens():
    tokens = _tokens().requires_grad_()
    kept, indices = similarity_prune(tokens, 0.5)
    kept2, indices2 = similarity_prune(tokens, 0.5)
    assert torch.equal(indices, indices2) and torch.equal(kept, kept2)
    kept.sum().backward()
    grad_rows = tokens.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, similarity_keep_mask(tokens.detach(), 0.5))


def test_score_tokens_decide_while_tokens_are_gathered():
    tokens = _tokens()
    other = _tokens(seed=5)
    kept, indices = similarity_prune(tokens, 0.5, score_tokens=other)
    _, expected = similarity_prune(other, 0.5)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(kept, tokens[torch.arange(3)[:, None], indices])


def test_threshold_keeps_the_patches_at_or_below_it():
    tokens = _tokens(num_patches=25)
    scores = redundancy_scores(tokens[:, 1:])
    threshold = float(scores.median())
    mask = similarity_keep_mask(tokens, threshold=threshold)
    assert mask[:, 0].all()
    assert torch.equal(mask[:, 1:], scores <= threshold)
    counts = mask[:, 1:].sum(1)
    assert len(set(counts.tolist())) > 1, "the count adapts per image"


def test_threshold_keeps_at_least_min_keep():
    tokens = _tokens(num_patches=12)
    mask = similarity_keep_mask(tokens, threshold=-2.0, min_keep=3)  # no score is below -1
    assert (mask[:, 1:].sum(1) == 3).all()
    assert torch.equal(mask, similarity_keep_mask(tokens, 3 / 12))
    none = similarity_keep_mask(tokens, threshold=-2.0, min_keep=0)
    assert none.sum().item() == 3 and none[:, 0].all()


def test_threshold_module_keeps_the_batch_largest_count():
    tokens = _tokens(num_patches=25)
    scores = redundancy_scores(tokens[:, 1:])
    threshold = float(scores.median())
    layer = SimilarityPatchPruning(threshold=threshold)
    kept = layer(tokens)
    own = (scores <= threshold).sum(1)
    assert torch.equal(layer.last_counts, own)
    assert kept.shape == (3, 1 + int(own.max()), 8)
    # every image keeps its own threshold set plus its next least redundant patches
    for b in range(3):
        kept_patches = set((layer.last_indices[b, 1:] - 1).tolist())
        assert set(torch.nonzero(scores[b] <= threshold).flatten().tolist()) <= kept_patches
        assert kept_patches == set(torch.argsort(scores[b], stable=True)[: int(own.max())].tolist())
    single = SimilarityPatchPruning(threshold=threshold)(tokens[1:2])
    assert single.shape[1] == 1 + int(own[1]), "at batch size 1 the count is the image's own"


def test_module_fixed_ratio_matches_the_function():
    tokens = _tokens()
    layer = SimilarityPatchPruning(0.5)
    kept, indices = similarity_prune(tokens, 0.5)
    torch.testing.assert_close(layer(tokens), kept, rtol=0, atol=0)
    assert torch.equal(layer.last_indices, indices)
    assert list(layer.parameters()) == []


def _mean_nearest_distance(indices, side):
    rows, cols = indices // side, indices % side
    points = torch.stack([rows, cols], -1).double()
    dist = torch.cdist(points, points) + torch.eye(len(indices)) * 1e9
    return dist.min(1).values.mean().item()


def test_diversity_zero_is_plain_selection_and_positive_spreads_the_kept_patches():
    side = 8
    gen = torch.Generator().manual_seed(3)
    patches = 0.05 * torch.randn(1, side * side, 16, generator=gen, dtype=torch.float64) + 1.0
    # The top-left 4x4 corner is textured (least redundant), everything else near-uniform.
    corner = [r * side + c for r in range(4) for c in range(4)]
    patches[0, corner] = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    tokens = torch.cat([torch.zeros(1, 1, 16, dtype=torch.float64), patches], 1)

    _, plain = similarity_prune(tokens, 0.25)
    _, zero = similarity_prune(tokens, 0.25, diversity=0.0)
    assert torch.equal(plain, zero)
    assert set((plain[0, 1:] - 1).tolist()) == set(corner), "without the term the kept patches cluster"

    _, spread = similarity_prune(tokens, 0.25, diversity=2.0, grid_size=(side, side))
    assert spread.shape == plain.shape and spread[0, 0] == 0
    assert (spread[:, 1:] > spread[:, :-1]).all()
    kept = spread[0, 1:] - 1
    assert _mean_nearest_distance(kept, side) > _mean_nearest_distance(plain[0, 1:] - 1, side)
    assert len(set(kept.tolist()) - set(corner)) > 4, "the diversity term reaches outside the cluster"

    # positions give the same answer as the grid they describe
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    _, by_positions = similarity_prune(tokens, 0.25, diversity=2.0, positions=torch.stack([rows, cols], 1).float())
    assert torch.equal(by_positions, spread)


def test_constructed_image_prunes_the_uniform_background_before_the_textured_object():
    torch.manual_seed(0)
    image = torch.full((1, 3, 64, 64), 0.5)
    image[:, :, 16:48, 24:56] = torch.rand(1, 3, 32, 32)  # a textured object of 4x4 patches
    embed = nn.Conv2d(3, 32, kernel_size=8, stride=8)  # a ViT patch projection, 8x8 grid
    with torch.no_grad():
        patches = embed(image).flatten(2).transpose(1, 2)  # (1, 64, 32)
    tokens = torch.cat([torch.zeros(1, 1, 32), patches], 1)
    grid_rows, grid_cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    is_object = ((grid_rows >= 2) & (grid_rows < 6) & (grid_cols >= 3) & (grid_cols < 7)).flatten()

    _, indices = similarity_prune(tokens, 16 / 64)
    kept = torch.zeros(64, dtype=torch.bool)
    kept[indices[0, 1:] - 1] = True
    assert torch.equal(kept, is_object), "exactly the object survives at its own size"
    _, indices = similarity_prune(tokens, 0.5)
    assert set(torch.nonzero(is_object).flatten().tolist()) <= set((indices[0, 1:] - 1).tolist())


class _Shift(nn.Module):
    """A stand-in block that changes every token the same way, so origins stay checkable."""

    def forward(self, x):
        return x + 1.0


def test_progressive_pruning_tracks_original_indices():
    tokens = _tokens(num_patches=36)
    model = SimilarityPrunedBlocks([_Shift() for _ in range(4)], {0: 0.75, 2: 0.5, 4: 0.5})
    out = model(tokens)
    patches = 36
    for ratio in (0.75, 0.5, 0.5):
        patches = math.ceil(ratio * patches - 1e-9)
    assert out.shape == (3, 1 + patches, 8)
    indices = model.last_indices
    assert (indices[:, 0] == 0).all() and (indices[:, 1:] > indices[:, :-1]).all()
    torch.testing.assert_close(out, tokens[torch.arange(3)[:, None], indices] + 4.0)
    # the first stage is plain pre-transformer pruning
    _, first = similarity_prune(tokens, 0.75)
    assert set(indices[0].tolist()) <= set(first[0].tolist())


def test_progressive_pruning_with_diversity_uses_original_positions():
    tokens = _tokens(num_patches=36)
    model = SimilarityPrunedBlocks([nn.Identity(), nn.Identity()], {0: 0.5, 1: 0.5}, diversity=1.0)
    out = model(tokens)
    assert out.shape == (3, 1 + 9, 8)
    torch.testing.assert_close(out, tokens[torch.arange(3)[:, None], model.last_indices])
    # the second stage saw the positions of the first stage's survivors
    first = SimilarityPatchPruning(0.5, diversity=1.0)
    kept = first(tokens)
    grid = torch.stack([torch.arange(6).repeat_interleave(6), torch.arange(6).repeat(6)], 1).float()
    second = SimilarityPatchPruning(0.5, diversity=1.0)
    second(kept, positions=grid[first.last_indices[:, 1:] - 1])
    torch.testing.assert_close(model.last_indices, first.last_indices.gather(1, second.last_indices))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda t: similarity_prune(t, 1.5), ValueError),
        (lambda t: similarity_prune(t, -0.1), ValueError),
        (lambda t: similarity_prune(t, "half"), TypeError),
        (lambda t: similarity_prune(t, None), TypeError),
        (lambda t: similarity_prune(t[0], 0.5), ValueError),
        (lambda t: similarity_prune(t.long(), 0.5), TypeError),
        (lambda t: similarity_prune(t[:, :0], 0.5), ValueError),
        (lambda t: similarity_prune([[1.0]], 0.5), TypeError),
        (lambda t: similarity_keep_mask(t), ValueError),
        (lambda t: similarity_keep_mask(t, 0.5, threshold=0.1), ValueError),
        (lambda t: similarity_keep_mask(t, threshold=float("nan")), TypeError),
        (lambda t: similarity_prune(t, 0.5, diversity=-1.0), ValueError),
        (lambda t: similarity_prune(t, 0.5, diversity=1.0), ValueError),  # 15 patches: no square grid
        (lambda t: similarity_prune(t, 0.5, diversity=1.0, grid_size=(4, 4)), ValueError),
        (lambda t: similarity_prune(t, 0.5, diversity=1.0, positions=torch.zeros(5, 2)), ValueError),
        (lambda t: similarity_prune(t, 0.5, score_tokens=t[:, 1:]), ValueError),
        (lambda t: SimilarityPatchPruning(), ValueError),
        (lambda t: SimilarityPatchPruning(threshold="0.5"), TypeError),
        (lambda t: SimilarityPrunedBlocks([nn.Identity()], {2: 0.5}), ValueError),
        (lambda t: SimilarityPrunedBlocks([nn.Identity()], [0.5]), TypeError),
    ],
)
def test_bad_input_is_a_clear_error(call, error):
    tokens = _tokens(num_patches=15)  # 15 patches: not a square grid
    with pytest.raises(error):
        call(tokens)


@pytest.mark.parametrize("attention", ["dense", "bspf"])
def test_progressive_pruning_in_a_bspf_ext_vit(attention):
    from bspf_ext import models

    torch.manual_seed(0)
    model = models.vit_tiny(attention, img_size=32, patch_size=8, depth=3, num_classes=10).eval()
    model.blocks = SimilarityPrunedBlocks(model.blocks, {0: 0.5, 2: 0.5}, grid_size=(4, 4), diversity=0.5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        assert model.blocks.last_indices.shape == (3, 1 + 4)
        for b in range(3):  # each image is pruned on its own content
            torch.testing.assert_close(model(images[b : b + 1])[0], logits[b], rtol=1e-4, atol=1e-5)
