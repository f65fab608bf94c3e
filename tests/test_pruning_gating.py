"""SViT selective gating (bspf_ext.pruning.gating, losses, stats, tokens)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bspf_ext.pruning import (
    GatedBlock,
    SelectiveGate,
    dynamic_keep_ratio_loss,
    fixed_keep_ratio_loss,
    gate_blocks,
    gate_masks,
    gate_statistics,
    gather_kept,
    gathered_block_update,
    masked_block_update,
    scatter_kept,
    svit_keep_targets,
    takes_key_mask,
)

DIM = 16


class MaskableBlock(nn.Module):
    """A pre-norm transformer block whose attention hides tokens with key_mask False."""

    def __init__(self, dim=DIM, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, key_mask=None):
        batch, num, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, num, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, num, dim))
        return x + self.mlp(self.norm2(x))


class PlainBlock(nn.Module):
    """The same block with no way to be told which tokens are pruned."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.inner = MaskableBlock(dim)

    def forward(self, x):
        return self.inner(x)


def _setup(seed=0, batch=4, num=13, dtype=torch.float64):
    torch.manual_seed(seed)
    x = torch.randn(batch, num, DIM, dtype=dtype)
    block = MaskableBlock().to(dtype)
    # every image keeps a different number of tokens; image 3 keeps everything
    mask = torch.rand(batch, num) < torch.tensor([0.2, 0.5, 0.8, 1.01])[:, None]
    mask[:, 0] = True
    return x, block, mask


def _per_image_reference(block, x, mask):
    """Each image's kept tokens through the block on their own, written back in place."""
    out = x.clone()
    for b in range(x.shape[0]):
        kept = mask[b].nonzero().squeeze(1)
        if len(kept):
            out[b, kept] = block(x[b : b + 1, kept])[0]
    return out


# ---------------------------------------------------------------- the gate


def test_gate_is_a_two_layer_mlp_from_c_to_c_over_4_to_2():
    gate = SelectiveGate(DIM)
    linears = [m for m in gate.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(DIM, DIM // 4), (DIM // 4, 2)]


@pytest.mark.parametrize("training", [True, False])
def test_gate_mask_is_hard_and_keeps_the_class_token(training):
    torch.manual_seed(0)
    gate = SelectiveGate(DIM, init_keep_logit=-3.0).train(training)  # prunes most tokens
    x = torch.randn(5, 40, DIM)
    mask = gate(x)
    assert mask.shape == (5, 40) and mask.dtype == x.dtype
    assert ((mask == 0) | (mask == 1)).all()
    assert (mask[:, 0] == 1).all()
    assert mask[:, 1:].mean() < 0.5
    if training:
        assert mask[:, 1:].mean() > 0, "a sample keeps some tokens with probability 1 - sigmoid(3)"
    no_cls = SelectiveGate(DIM, init_keep_logit=-30.0, has_class_token=False).train(training)
    assert (no_cls(x) == 0).all()


def test_inference_takes_the_argmax():
    torch.manual_seed(0)
    gate = SelectiveGate(DIM, init_keep_logit=0.0).eval()
    x = torch.randn(3, 20, DIM)
    logits = gate.logits(x)
    expected = (logits[..., 1] > logits[..., 0]).float()
    expected[:, 0] = 1
    assert torch.equal(gate(x), expected)
    assert torch.equal(gate(x), gate(x)), "inference is deterministic"


def test_training_samples_keep_with_the_gumbel_probability():
    torch.manual_seed(0)
    gate = SelectiveGate(DIM, init_keep_logit=1.0, has_class_token=False).train()
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()  # every token: keep logit 1, prune logit 0
    rate = gate(torch.randn(8, 2000, DIM)).mean().item()
    assert abs(rate - 1 / (1 + math.exp(-1.0))) < 0.01  # 16000 samples: 4 standard errors ≈ 0.01


def test_gate_receives_gradients_in_training():
    torch.manual_seed(0)
    for block in (MaskableBlock(), PlainBlock()):
        gated = GatedBlock(block, DIM).train()
        x = torch.randn(3, 10, DIM)
        out = gated(x)
        assert gated.last_mask.requires_grad
        out.square().sum().backward()  # the task loss alone reaches the gate
        for name, p in gated.gate.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert gated.gate.mlp[-1].weight.grad.abs().sum() > 0
        gated.zero_grad()
        gated(x)
        dynamic_keep_ratio_loss(gate_masks(gated), 0.5).backward()  # and so does the ratio loss
        assert gated.gate.mlp[-1].weight.grad.abs().sum() > 0


# ------------------------------------------------------- gather and scatter


def test_gather_scatter_round_trip_with_ragged_counts():
    x, _, mask = _setup()
    mask[1] = False  # an image that keeps nothing
    padded, indices, valid = gather_kept(x, mask)
    counts = mask.sum(1)
    assert padded.shape == (4, int(counts.max()), DIM)
    assert torch.equal(valid.sum(1), counts)
    for b in range(4):
        kept = mask[b].nonzero().squeeze(1)
        assert torch.equal(indices[b, : len(kept)], kept)
        assert torch.equal(padded[b, : len(kept)], x[b, kept])
        assert (padded[b, len(kept) :] == 0).all()
    assert torch.equal(scatter_kept(x, padded, indices, valid), x)
    moved = scatter_kept(x, padded + 1.0, indices, valid)
    assert torch.equal(moved[mask], x[mask] + 1.0) and torch.equal(moved[~mask], x[~mask])


def test_scatter_is_differentiable_in_both_inputs():
    x, _, mask = _setup()
    x.requires_grad_()
    padded, indices, valid = gather_kept(x, mask)
    updated = (2 * padded).detach().requires_grad_()
    scatter_kept(x, updated, indices, valid).sum().backward()
    assert torch.equal(x.grad, (~mask).to(x.dtype)[..., None].expand_as(x))
    assert torch.equal(updated.grad, valid.to(x.dtype)[..., None].expand_as(updated))


# ---------------------------------------------------- the two modes agree


@pytest.mark.parametrize("pass_key_mask", [True, False])
def test_gathered_update_runs_each_image_on_its_kept_tokens_only(pass_key_mask):
    x, block, mask = _setup()
    mask[2, 1:] = False  # only the class token survives here
    with torch.no_grad():
        out = gathered_block_update(block, x, mask, pass_key_mask=pass_key_mask)
        expected = _per_image_reference(block, x, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out[~mask], x[~mask]), "pruned tokens keep their features"


def test_gathered_update_of_an_image_that_keeps_nothing_is_the_identity():
    x, block, mask = _setup()
    mask[1] = False
    for pass_key_mask in (True, False):
        with torch.no_grad():
            out = gathered_block_update(block, x, mask, pass_key_mask=pass_key_mask)
        assert torch.equal(out[1], x[1])
        torch.testing.assert_close(out, _per_image_reference(block, x, mask), rtol=0, atol=1e-12)


def test_masked_update_with_key_mask_equals_inference_on_kept_tokens():
    """With a block that takes key_mask the training path computes, for the kept tokens,
    exactly what inference computes on the gathered ones."""
    x, block, mask = _setup()
    with torch.no_grad():
        trained = masked_block_update(block, x, mask.to(x.dtype), pass_key_mask=True)
        inferred = gathered_block_update(block, x, mask, pass_key_mask=True)
    torch.testing.assert_close(trained, inferred, rtol=0, atol=1e-12)
    assert torch.equal(trained[~mask], x[~mask])


def test_masked_update_of_a_plain_block_sees_the_pruned_tokens():
    """The documented difference: a plain block cannot hide pruned tokens in training."""
    x, block, mask = _setup()
    plain = PlainBlock()
    plain.inner = block
    with torch.no_grad():
        trained = masked_block_update(plain, x, mask.to(x.dtype), pass_key_mask=False)
        inferred = gathered_block_update(plain, x, mask, pass_key_mask=False)
    partial = mask.sum(1) < mask.shape[1]
    assert not torch.allclose(trained[partial][mask[partial]], inferred[partial][mask[partial]])
    torch.testing.assert_close(trained[~partial], inferred[~partial], rtol=0, atol=1e-12)
    assert torch.equal(trained[~mask], x[~mask])


@pytest.mark.parametrize("block_type", [MaskableBlock, PlainBlock])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_equals_training_when_nothing_is_pruned(block_type, dtype):
    torch.manual_seed(0)
    gated = GatedBlock(block_type().to(dtype), DIM, init_keep_logit=100.0).to(dtype)
    x = torch.randn(3, 11, DIM, dtype=dtype)
    trained = gated.train()(x)
    assert (gated.last_mask == 1).all()
    with torch.no_grad():
        inferred = gated.eval()(x)
    assert (gated.last_mask == 1).all()
    assert torch.equal(trained, inferred)
    assert torch.equal(inferred, gated.block(x))


def test_gated_block_inference_with_ragged_counts_matches_per_image_runs():
    torch.manual_seed(1)
    for block in (MaskableBlock(), PlainBlock()):
        gated = GatedBlock(block, DIM, init_keep_logit=0.0).eval()
        x = torch.randn(6, 17, DIM)
        with torch.no_grad():
            out = gated(x)
        mask = gated.last_mask > 0
        assert len(set(mask.sum(1).tolist())) > 1, "the images keep different numbers of tokens"
        assert mask[:, 0].all()
        with torch.no_grad():
            expected = _per_image_reference(gated.block, x, mask)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[~mask], x[~mask])


def test_key_mask_is_detected_from_the_forward_signature():
    assert takes_key_mask(MaskableBlock())
    assert not takes_key_mask(PlainBlock())
    assert GatedBlock(MaskableBlock(), DIM).pass_key_mask
    assert not GatedBlock(PlainBlock(), DIM).pass_key_mask
    assert not GatedBlock(MaskableBlock(), DIM, pass_key_mask=False).pass_key_mask


def test_pruned_tokens_can_be_reactivated_by_a_later_gate():
    torch.manual_seed(0)
    first = GatedBlock(MaskableBlock(), DIM, init_keep_logit=0.0)
    second = GatedBlock(MaskableBlock(), DIM, init_keep_logit=100.0)  # keeps everything
    model = nn.Sequential(first, second).eval()
    with torch.no_grad():
        model(torch.randn(2, 9, DIM))
    stats = gate_statistics(model)
    pruned_first = first.last_mask[:, 1:] == 0
    assert pruned_first.any()
    assert stats.reactivation[0] == 1.0, "every token the first gate pruned is processed again"
    assert math.isnan(stats.reactivation[1])


# ----------------------------------------------------------------- losses


def test_loss_values_by_hand():
    # layer 0: image 0 keeps 3/4, image 1 keeps 1/4 → batch usage 1/2
    # layer 1: image 0 keeps 1/4, image 1 keeps 1/4 → batch usage 1/4
    masks = [torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]]), torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]])]
    targets = [0.5, 0.5]
    assert dynamic_keep_ratio_loss(masks, targets).item() == pytest.approx((0.0 + 0.25**2) / 2)
    fixed = ((0.25**2 + 0.25**2) + (0.25**2 + 0.25**2)) / 4
    assert fixed_keep_ratio_loss(masks, targets).item() == pytest.approx(fixed)
    stacked = torch.stack(masks)
    assert dynamic_keep_ratio_loss(stacked, 0.5) == dynamic_keep_ratio_loss(masks, targets)
    assert fixed_keep_ratio_loss(stacked, 0.5) == fixed_keep_ratio_loss(masks, targets)


def test_svit_default_targets():
    assert svit_keep_targets() == pytest.approx([0.7] * 3 + [0.49] * 3 + [0.343] * 3)
    assert svit_keep_targets(6, 0.5, 2) == pytest.approx([0.5] * 3 + [0.25] * 3)


def _train_gate(ratio_loss, seed=0, steps=300):
    """Half the images are 'simple' (tokens near one point), half 'complex' (tokens near
    another, worth keeping). A stand-in task loss rewards processing the complex tokens;
    the ratio loss asks for half of all tokens. Returns the keep ratio of every image,
    averaged over 100 fresh training-mode samples, and in inference."""
    torch.manual_seed(seed)
    batch, num = 8, 24
    complex_image = torch.arange(batch) % 2 == 1
    gate = SelectiveGate(DIM, init_keep_logit=0.0, has_class_token=False)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.03)
    direction = torch.randn(DIM)

    def sample():
        x = 0.5 * torch.randn(batch, num, DIM)
        x[complex_image] += direction
        x[~complex_image] -= direction
        return x

    for step in range(steps):
        if step == steps * 2 // 3:  # settle: smaller steps average out the sampling noise
            optimizer.param_groups[0]["lr"] = 0.003
        mask = gate.train()(sample())
        task = -(mask * complex_image[:, None]).mean()
        loss = task + 4.0 * ratio_loss([mask], 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        sampled = torch.stack([gate.train()(sample()).mean(dim=1) for _ in range(100)]).mean(0)
        inferred = gate.eval()(sample()).mean(dim=1)
    return sampled, inferred, complex_image


def test_dynamic_ratio_is_met_on_average_and_fixed_ratio_per_image():
    sampled, inferred, complex_image = _train_gate(dynamic_keep_ratio_loss)
    for per_image in (sampled, inferred):
        assert abs(per_image.mean().item() - 0.5) < 0.05, "the batch as a whole keeps the target"
        assert (per_image[complex_image] > 0.9).all() and (per_image[~complex_image] < 0.1).all(), (
            "complex images keep more tokens than simple ones"
        )
    # Fixed: each image is pulled to the target on its own. The task pays 1/(B·N) per
    # complex token and the loss 4·2·(u_b − t)/(B·N), so complex images settle at
    # t + 1/8 and simple ones at t: close together, where the dynamic loss split them.
    sampled, _, _ = _train_gate(fixed_keep_ratio_loss)
    torch.testing.assert_close(sampled[~complex_image], torch.full((4,), 0.5), rtol=0, atol=0.05)
    torch.testing.assert_close(sampled[complex_image], torch.full((4,), 0.625), rtol=0, atol=0.05)


# --------------------------------------------------------------- statistics


def test_statistics_of_given_masks():
    masks = torch.tensor(
        [
            [[1, 0, 0, 1], [1, 1, 0, 0]],  # layer 0
            [[0, 1, 0, 1], [1, 1, 1, 1]],  # layer 1
            [[0, 0, 0, 1], [0, 0, 0, 0]],  # layer 2
        ],
        dtype=torch.float32,
    )
    stats = gate_statistics(masks)
    torch.testing.assert_close(stats.keep_ratio, torch.tensor([0.5, 0.75, 0.125]))
    torch.testing.assert_close(stats.keep_ratio_per_image, torch.tensor([[0.5, 0.5], [0.5, 1.0], [0.25, 0.0]]))
    assert stats.token_usage.tolist() == [[1, 1, 0, 3], [2, 2, 1, 1]]
    # layer 0 pruned 4 tokens; tokens (0,1), (1,2), (1,3) come back later
    # layer 1 pruned 2 tokens; none comes back;  layer 2 is the last
    torch.testing.assert_close(stats.reactivation[:2], torch.tensor([0.75, 0.0]))
    assert stats.reactivation[2] == 0.0


def test_gate_masks_in_block_order_without_the_class_token():
    torch.manual_seed(0)
    blocks = gate_blocks([MaskableBlock() for _ in range(4)], DIM, gated=[1, 3])
    assert [type(b).__name__ for b in blocks] == ["MaskableBlock", "GatedBlock", "MaskableBlock", "GatedBlock"]
    model = nn.Sequential(*blocks).train()
    model(torch.randn(2, 7, DIM))
    masks = gate_masks(model)
    assert len(masks) == 2 and all(m.shape == (2, 6) for m in masks)
    assert masks[0] is not masks[1]
    full = gate_masks(model, include_class_token=True)
    assert torch.equal(full[1][:, 1:], masks[1]) and (full[1][:, 0] == 1).all()


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: SelectiveGate(0), ValueError),
        (lambda: SelectiveGate(DIM, tau=0.0), ValueError),
        (lambda: SelectiveGate(DIM, hidden_dim=0), ValueError),
        (lambda: SelectiveGate(DIM)(torch.randn(2, 5, DIM + 1)), ValueError),
        (lambda: SelectiveGate(DIM)(torch.randn(5, DIM)), ValueError),
        (lambda: GatedBlock("block", DIM), TypeError),
        (lambda: GatedBlock(PlainBlock(), DIM, pass_key_mask="yes"), TypeError),
        (lambda: masked_block_update(PlainBlock(), torch.randn(2, 5, DIM), torch.full((2, 5), 0.5), pass_key_mask=False), ValueError),
        (lambda: gathered_block_update(PlainBlock(), torch.randn(2, 5, DIM), torch.ones(2, 4), pass_key_mask=False), ValueError),
        (lambda: gathered_block_update(PlainBlock(), torch.randn(2, 5, DIM), torch.ones(2, 5, dtype=torch.long), pass_key_mask=False), TypeError),
        (lambda: dynamic_keep_ratio_loss([], 0.5), ValueError),
        (lambda: dynamic_keep_ratio_loss([torch.ones(2, 3)], [0.5, 0.5]), ValueError),
        (lambda: fixed_keep_ratio_loss([torch.ones(2, 3)], 1.5), ValueError),
        (lambda: fixed_keep_ratio_loss([torch.ones(3)], 0.5), ValueError),
        (lambda: gate_blocks([PlainBlock()], DIM, gated=[1]), ValueError),
        (lambda: gate_masks(nn.Sequential(GatedBlock(PlainBlock(), DIM))), RuntimeError),
        (lambda: gate_statistics([]), ValueError),
        (lambda: svit_keep_targets(3, 0.7, 4), ValueError),
    ],
)
def test_bad_input_is_a_clear_error(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("attention", ["dense", "bspf"])
def test_gates_in_a_bspf_ext_vit(attention):
    from bspf_ext import models

    torch.manual_seed(0)
    dense = models.vit_tiny(attention, img_size=32, patch_size=8, depth=3, num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = dense(images)
    blocks = list(dense.blocks)
    dense.blocks = nn.Sequential(*gate_blocks(blocks, 192, gated=[1, 2], init_keep_logit=100.0))
    with torch.no_grad():
        assert torch.equal(dense(images), expected), "gates that keep everything change nothing"

    model = models.vit_tiny(attention, img_size=32, patch_size=8, depth=3, num_classes=10)
    model.blocks = nn.Sequential(*gate_blocks(model.blocks, 192, gated=[1, 2], init_keep_logit=0.0))
    loss = model.train()(images).square().mean() + 4 * dynamic_keep_ratio_loss(gate_masks(model), [0.7, 0.5])
    loss.backward()
    assert model.blocks[1].gate.mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        logits = model.eval()(images)
        counts = gate_statistics(model).keep_ratio_per_image
        assert len(set(counts[0].tolist())) > 1, "the images keep different numbers of tokens"
        for b in range(4):  # a ragged batch gives each image what it gets alone
            torch.testing.assert_close(model(images[b : b + 1])[0], logits[b], rtol=1e-4, atol=1e-5)
