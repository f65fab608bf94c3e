"""The FLOPs counter: its counts tied to what the operator keeps and scores."""

import pytest
import torch

import bspf_ext
from bspf_ext import reference
from bspf_ext.models import ViTConfig, count_flops, format_flops_table, vit_tiny
from bspf_ext.models.flops import attention_core_flops, format_attention_breakdown


def _qk(n, d=8, seed=0):
    return torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n, block_size, keep_ratio", [(37, 8, 0.3), (197, 16, 0.5), (20, 7, 0.9), (16, 16, 0.5)])
def test_kept_entries_equal_the_operators_mask(n, block_size, keep_ratio):
    mask = bspf_ext.block_mask(_qk(n), block_size=block_size, keep_ratio=keep_ratio)
    core = attention_core_flops("bspf", n, 8, block_size=block_size, keep_ratio=keep_ratio)
    assert core.kept_entries == int(mask.sum())
    assert core.parts["A·V"] == 2 * 8 * int(mask.sum())


def _fused_entries(qk, block_size, keep_ratio):
    """Entries the operator actually fuses: pruned (i, j) of a matched i whose target is kept."""
    mask = reference.block_mask(qk, block_size=block_size, keep_ratio=keep_ratio)[0, 0]
    match = reference.best_match(qk, block_size=block_size)[0, 0]
    n = qk.shape[-2]
    idx = torch.arange(n)
    cos = torch.nn.functional.cosine_similarity(qk[0, 0], qk[0, 0, match], dim=-1)
    active = (match != idx) & (cos > 0)
    moved = ~mask & mask[match] & active[:, None]
    return int(moved.sum())


@pytest.mark.parametrize("seed", range(3))
def test_fusion_bound_holds(seed):
    n, omega, r = 45, 8, 0.4
    core = attention_core_flops("bspf", n, 8, block_size=omega, keep_ratio=r)
    chunks = -(-n // omega)
    similarity_ops = 2 * n * (chunks - 1)
    bound_entries = (core.parts["fusion (bound)"] - similarity_ops) // 3
    actual = _fused_entries(_qk(n, seed=seed), omega, r)
    assert 0 < actual <= bound_entries
    assert core.upper_bound_parts == ("fusion (bound)",)


def test_scoring_counts_in_block_neighbours():
    """(3r − 2)(3c − 2) multiply-adds per r×c block: count them by brute force."""
    n, omega = 21, 8  # chunks of 8, 8, 5
    sizes = [8, 8, 5]
    brute = 0
    for m, rows in enumerate(sizes):
        for cols in sizes[m + 1 :]:
            brute += sum(
                1
                for i in range(rows)
                for j in range(cols)
                for a in (-1, 0, 1)
                for b in (-1, 0, 1)
                if 0 <= i + a < rows and 0 <= j + b < cols
            )
    assert attention_core_flops("bspf", n, 8, block_size=omega, keep_ratio=0.5).parts["scoring"] == 2 * brute


def test_limits():
    n, d = 50, 16
    dense = attention_core_flops("dense", n, d)
    assert dense.parts["logits"] == n * n * 2 * d and dense.kept_entries == n * n
    full = attention_core_flops("bspf", n, d, block_size=8, keep_ratio=1.0)
    assert full.kept_entries == n * n and full.parts["selection (est.)"] == 0
    none = attention_core_flops("bspf", n, d, block_size=8, keep_ratio=0.0)
    chunk = attention_core_flops("chunk", n, d, block_size=8)
    assert none.kept_entries == chunk.kept_entries == 6 * 64 + 2 * 2
    assert none.parts["scoring"] == none.parts["selection (est.)"] == 0
    no_fuse = attention_core_flops("bspf", n, d, block_size=8, keep_ratio=0.5, fuse=False)
    assert no_fuse.parts["fusion (bound)"] == 0 and no_fuse.upper_bound_parts == ()


def test_bspf_core_is_cheaper_than_dense_at_vit_size():
    dense = attention_core_flops("dense", 197, 64)
    bspf = attention_core_flops("bspf", 197, 64, block_size=16, keep_ratio=0.5)
    # Half the logits (symmetry) and about half of A·V: well under dense, but not free.
    assert 0.5 < bspf.total / dense.total < 0.75


def test_model_totals():
    config = ViTConfig(embed_dim=384, depth=12, num_heads=6)  # ViT-S/16 at 224
    dense = count_flops(config)
    # timm/fvcore quote 4.6 G multiply-accumulates for ViT-S/16; we count 2 per MAC.
    assert 9.0e9 < dense.total < 9.5e9
    assert dense.total == dense.embed + dense.head + sum(layer.total for layer in dense.layers)
    assert count_flops(config, batch_size=4).total == 4 * dense.total
    bspf = count_flops(config.replace(attention="bspf", attention_layers=(0, 1)))
    assert [layer.attention for layer in bspf.layers[:3]] == ["bspf", "bspf", "dense"]
    assert bspf.layers[0].total < dense.layers[0].total and bspf.layers[2].total == dense.layers[2].total
    # BSPF's single q/k projection saves a third of the q/k/v projection work.
    assert bspf.layers[0].parts["q/k/v projections"] * 3 == dense.layers[0].parts["q/k/v projections"] * 2


def test_model_and_config_agree():
    model = vit_tiny("bspf", img_size=32, patch_size=8, depth=2, num_classes=10, block_size=4)
    assert count_flops(model).as_dict() == count_flops(model.config).as_dict()


def test_tables():
    config = ViTConfig(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3)
    dense, bspf = count_flops(config), count_flops(config.replace(attention="bspf"))
    table = format_flops_table(dense, bspf)
    assert "total" in table and "bspf/dense" in table and "upper bound" in table
    assert f"{bspf.total / dense.total:.3f}" in table.splitlines()[-2]
    breakdown = format_attention_breakdown(dense, bspf)
    assert "scoring" in breakdown and "kept entries" in breakdown


def test_bad_arguments():
    with pytest.raises(ValueError):
        attention_core_flops("sparse", 10, 4)
    with pytest.raises(TypeError):
        count_flops(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        count_flops(ViTConfig(), batch_size=0)


def test_token_counts_per_layer():
    from bspf_ext.models import ViTConfig, count_flops

    config = ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=4)
    full = count_flops(config)
    assert count_flops(config, tokens=[config.num_tokens] * 4).total == full.total
    pruned = count_flops(config, tokens=[33, 33, 17, 17])
    assert pruned.total < full.total
    assert pruned.layers[0].total == count_flops(config, tokens=[33] * 4).layers[0].total
    with pytest.raises(ValueError, match="tokens must give 4"):
        count_flops(config, tokens=[10, 10])
    with pytest.raises(ValueError, match="tokens must give"):
        count_flops(config, tokens=[0, 10, 10, 10])
