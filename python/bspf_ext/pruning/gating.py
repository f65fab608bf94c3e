"""SViT selective gating: a small MLP before a transformer block picks the tokens the
block updates; the others keep their features and may be picked again by later gates.

    x ← M ⊙ Block(x, M) + (1 − M) ⊙ x,     M ∈ {0, 1}^N from the gate.

Training samples M with a hard Gumbel-softmax (straight-through gradient, so the gate
learns); inference takes the argmax, gathers the kept tokens of every image, runs the
block on them alone and scatters the results back. docs/pruning.md says exactly what
the block's attention sees in each mode.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Optional

import torch
from torch import nn

from ._checks import check_bool, check_float, check_int, check_mask, check_positive_float, check_tokens
from .tokens import gather_kept, gather_tokens, kept_indices, scatter_kept

KEEP = 1  # channel of the gate's two logits that means "process this token"


class SelectiveGate(nn.Module):
    """Per-token keep/prune decision: LayerNorm → Linear(C, C/4) → GELU → Linear(C/4, 2).

    forward(x (B, N, C)) → mask (B, N) in x's dtype holding exactly 0.0 or 1.0 (1 = keep).
    Training: a hard Gumbel-softmax sample with temperature tau; the forward value is the
    one-hot sample and the gradient that of the soft sample (straight-through). Inference:
    keep where the keep logit beats the prune logit. With has_class_token the first token
    is always kept. init_keep_logit sets the initial bias gap, so a gate put into a
    trained dense model starts by keeping most tokens (2.0: ≈ 88 % in training).
    """

    def __init__(self, dim: int, *, hidden_dim: Optional[int] = None, tau: float = 1.0,
                 init_keep_logit: float = 2.0, has_class_token: bool = True):
        super().__init__()
        dim = check_int("dim", dim, low=1)
        hidden_dim = max(dim // 4, 1) if hidden_dim is None else check_int("hidden_dim", hidden_dim, low=1)
        self.dim = dim
        self.tau = check_positive_float("tau", tau)
        init_keep_logit = check_float("init_keep_logit", init_keep_logit)
        self.has_class_token = check_bool("has_class_token", has_class_token)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 2)
        )
        with torch.no_grad():
            self.mlp[-1].bias.zero_()
            self.mlp[-1].bias[KEEP] = float(init_keep_logit)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tau={self.tau}, has_class_token={self.has_class_token}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) logits: channel 1 keep, channel 0 prune."""
        check_tokens("x", x, has_class_token=self.has_class_token)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have C = dim = {self.dim} channels, got shape {tuple(x.shape)}")
        return self.mlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x).float()
        if self.training:
            # Gumbel-max sample, made differentiable through the tempered softmax.
            gumbels = -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + gumbels) / self.tau, dim=-1)[..., KEEP]
            hard = (soft > 0.5).to(soft.dtype)  # two classes: the argmax is the larger half
            # hard + (soft − soft) is exactly hard in the forward, with soft's gradient.
            keep = hard + (soft - soft.detach())
        else:
            keep = (logits[..., KEEP] > logits[..., 1 - KEEP]).to(logits.dtype)
        if self.has_class_token:
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep[:, 1:]], dim=1)
        return keep.to(x.dtype)


def takes_key_mask(block: nn.Module) -> bool:
    """Whether block.forward accepts `key_mask`: a (B, N) bool, True = the token may be
    attended to. Such a block must let no query attend to a token whose key_mask is False.
    A block may say so itself with a `supports_key_mask` attribute (bspf_ext's ViT blocks
    do: only their dense-attention blocks can hide keys)."""
    supported = getattr(block, "supports_key_mask", None)
    if supported is not None:
        return bool(supported)
    try:
        parameters = inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return False
    return "key_mask" in parameters


def masked_block_update(block: nn.Module, x: torch.Tensor, mask: torch.Tensor, *,
                        pass_key_mask: bool) -> torch.Tensor:
    """The training path: M ⊙ block(x) + (1 − M) ⊙ x over the full sequence.

    mask (B, N) holds 0/1 values and may carry a gradient (the gate's straight-through
    sample). With pass_key_mask the block gets key_mask = mask > 0, so pruned tokens are
    hidden from attention (SViT's zeroed attention columns); without it the block sees
    every token. Pruned tokens keep their features exactly: 0 ⊙ y + 1 ⊙ x = x.
    """
    check_tokens("x", x)
    check_mask("mask", mask.detach(), x.shape[0], x.shape[1])
    updated = block(x, key_mask=mask.detach() > 0) if pass_key_mask else block(x)
    weight = mask.to(updated.dtype).unsqueeze(-1)
    return weight * updated + (1 - weight) * x


def gathered_block_update(block: nn.Module, x: torch.Tensor, mask: torch.Tensor, *,
                          pass_key_mask: bool) -> torch.Tensor:
    """The inference path: run the block on each image's kept tokens only, scatter back.

    With pass_key_mask the kept tokens go through the block in one padded batch with
    key_mask marking the padding. Otherwise images are grouped by how many tokens they
    keep and each group is one exact, unpadded call (a plain block cannot be told about
    padding). Either way an image's kept tokens only ever see each other; pruned tokens
    keep their features; an image that keeps nothing is returned unchanged.
    """
    check_tokens("x", x)
    keep = check_mask("mask", mask.detach(), x.shape[0], x.shape[1])
    counts = keep.sum(dim=1)
    num_tokens = x.shape[1]
    if x.shape[0] == 0 or bool((counts == num_tokens).all()):
        # Nothing pruned: the block sees the same input as in training.
        return block(x, key_mask=keep) if pass_key_mask else block(x)
    if pass_key_mask:
        busy = (counts > 0).nonzero().squeeze(1)
        padded, indices, valid = gather_kept(x[busy], keep[busy])
        updated = block(padded, key_mask=valid)
        out = x.clone()
        out[busy] = scatter_kept(x[busy], updated, indices, valid)
        return out
    out = x.clone()
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().squeeze(1)
        indices = kept_indices(keep[rows], count)
        updated = block(gather_tokens(x[rows], indices))
        out[rows.unsqueeze(1), indices] = updated.to(out.dtype)
    return out


class GatedBlock(nn.Module):
    """A transformer block (any module mapping (B, N, C) → (B, N, C)) behind a SelectiveGate.

    Training: masked_block_update with a Gumbel sample; inference: gathered_block_update
    with the gate's argmax. If the block's forward accepts key_mask (see takes_key_mask),
    pruned tokens are hidden from its attention in training too, and the two modes
    compute the same thing for the kept tokens; a plain block sees the pruned tokens
    as keys in training (docs/pruning.md). The last decision, (B, N) with 0/1 values
    (carrying the gate's gradient in training), is in `last_mask`.
    """

    def __init__(self, block: nn.Module, dim: int, *, gate: Optional[SelectiveGate] = None,
                 has_class_token: bool = True, tau: float = 1.0, init_keep_logit: float = 2.0,
                 pass_key_mask: Optional[bool] = None):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module mapping (B, N, C) to (B, N, C), got {type(block).__name__}")
        self.block = block
        if gate is not None and not isinstance(gate, SelectiveGate):
            raise TypeError(f"gate must be a SelectiveGate or None, got {type(gate).__name__}")
        self.gate = gate if gate is not None else SelectiveGate(
            dim, tau=tau, init_keep_logit=init_keep_logit, has_class_token=has_class_token
        )
        if gate is not None and (gate.dim != check_int("dim", dim, low=1) or gate.has_class_token != has_class_token):
            raise ValueError(
                f"gate disagrees with dim / has_class_token: the gate has dim={gate.dim}, "
                f"has_class_token={gate.has_class_token}; given dim={dim}, has_class_token={has_class_token}"
            )
        self.pass_key_mask = takes_key_mask(block) if pass_key_mask is None else check_bool("pass_key_mask", pass_key_mask)
        self.last_mask: Optional[torch.Tensor] = None

    @property
    def has_class_token(self) -> bool:
        return self.gate.has_class_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.gate(x)
        self.last_mask = mask
        if self.training:
            return masked_block_update(self.block, x, mask, pass_key_mask=self.pass_key_mask)
        return gathered_block_update(self.block, x, mask, pass_key_mask=self.pass_key_mask)


def gate_blocks(blocks: Iterable[nn.Module], dim: int, gated: Iterable[int], **gate_options) -> nn.ModuleList:
    """The blocks with those at the indices `gated` wrapped in GatedBlock(block, dim, **gate_options).

    SViT's default for a 12-block ViT gates blocks 3 … 11 (0-based); see svit_keep_targets.
    """
    blocks = list(blocks)
    if isinstance(gated, (str, bytes)) or not hasattr(gated, "__iter__"):
        raise TypeError(f"gated must be an iterable of block indices, got {type(gated).__name__}")
    gated = set(gated)
    bad = [i for i in gated if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"gated must hold block indices in [0, {len(blocks) - 1}], got {sorted(bad, key=str)}")
    return nn.ModuleList(GatedBlock(b, dim, **gate_options) if i in gated else b for i, b in enumerate(blocks))
