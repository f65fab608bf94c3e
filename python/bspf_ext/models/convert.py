"""From dense checkpoints to BSPF: timm-format ViT/DeiT state_dicts and dense attention modules.

A dense layer has separate W_q, W_k (in `qkv`); a BSPF layer has one W_qk. How W_qk is
made from W_q and W_k (`qk_init`):

* "spectral" (default): per head, the best rank-d positive semidefinite approximation of
  the symmetric part of the dense logit form. Dense logits are x_iᵀ W_qᵀ W_k x_j; BSPF
  logits are x_iᵀ W_qkᵀ W_qk x_j, always symmetric and positive semidefinite. With
  S = (W_qᵀ W_k + W_kᵀ W_q)/2 = U Λ Uᵀ, W_qk = diag(√max(λ, 0)) Uᵀ over the d largest
  eigenvalues, which minimises ‖W_qkᵀ W_qk − S‖_F over all d-row W_qk (Eckart–Young on
  the PSD part). A bias is handled exactly by appending it to W as a column (x -> [x, 1]).
  When W_q = W_k it reproduces the dense logits exactly (W_qk is W_q up to a rotation of
  the head's d dimensions, which changes no logit and no cosine). It needs no qk_norm (a
  rotation does not commute with a per-dimension norm) and is refused when one is present.
* "mean": W_qk = (W_q + W_k)/2, b_qk = (b_q + b_k)/2, norms averaged likewise.
* "q" / "k": W_qk = W_q (or W_k) and its bias and norm.

The value and output projections are copied unchanged. `theta` (the score kernel's raw
parameter) is not in dense checkpoints; the BSPF layer keeps its own (θ = 0, the box filter,
when freshly built).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int
from ..nn import BlockSymmetricAttention
from .vit import VisionTransformer

__all__ = [
    "QK_INITS",
    "shared_qk_projection",
    "convert_attention_state",
    "attention_from_dense",
    "convert_state_dict",
    "load_timm_state_dict",
    "resample_pos_embed",
]

QK_INITS = ("spectral", "mean", "q", "k")


def _check_qk_init(qk_init: str) -> None:
    check_choice("qk_init", qk_init, QK_INITS)


def _spectral_head(w_q: Tensor, w_k: Tensor) -> Tensor:
    """(d, C') W with WᵀW the best rank-d PSD approximation of sym(W_qᵀ W_k)."""
    d = w_q.shape[0]
    symmetric = 0.5 * (w_q.T @ w_k + w_k.T @ w_q)
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)  # ascending
    top = eigenvalues[-d:].clamp_min(0).flip(0)
    vectors = eigenvectors[:, -d:].flip(1)
    return top.sqrt()[:, None] * vectors.T


def shared_qk_projection(
    w_q: Tensor,
    w_k: Tensor,
    b_q: Optional[Tensor] = None,
    b_k: Optional[Tensor] = None,
    *,
    num_heads: int,
    qk_init: str = "spectral",
) -> tuple[Tensor, Optional[Tensor]]:
    """(W_qk, b_qk) for a BSPF layer from a dense layer's (W_q, W_k, b_q, b_k); see the module doc."""
    _check_qk_init(qk_init)
    for name, value in (("w_q", w_q), ("w_k", w_k), ("b_q", b_q), ("b_k", b_k)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_int("num_heads", num_heads, low=1)
    if w_q.shape != w_k.shape or w_q.dim() != 2:
        raise ValueError(f"w_q and w_k must be matrices of one shape, got {tuple(w_q.shape)} and {tuple(w_k.shape)}")
    if (b_q is None) != (b_k is None):
        raise ValueError("b_q and b_k must both be given or both be None")
    if qk_init == "q":
        return w_q.clone(), None if b_q is None else b_q.clone()
    if qk_init == "k":
        return w_k.clone(), None if b_k is None else b_k.clone()
    if qk_init == "mean":
        return 0.5 * (w_q + w_k), None if b_q is None else 0.5 * (b_q + b_k)

    out_dim, in_dim = w_q.shape
    if out_dim % num_heads:
        raise ValueError(f"the projection's {out_dim} outputs must split into num_heads ({num_heads}) heads")
    # Append the bias as a column, so x -> [x, 1] makes the affine map linear.
    a_q, a_k = w_q.double(), w_k.double()
    if b_q is not None:
        a_q = torch.cat([a_q, b_q.double()[:, None]], dim=1)
        a_k = torch.cat([a_k, b_k.double()[:, None]], dim=1)
    d = out_dim // num_heads
    heads = [_spectral_head(a_q[h * d : (h + 1) * d], a_k[h * d : (h + 1) * d]) for h in range(num_heads)]
    a_qk = torch.cat(heads, dim=0).to(w_q.dtype)
    if b_q is None:
        return a_qk, None
    return a_qk[:, :in_dim].contiguous(), a_qk[:, in_dim].contiguous()


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def convert_attention_state(state: Mapping[str, Tensor], num_heads: int, qk_init: str = "spectral") -> dict:
    """A dense attention layer's state (`qkv.*`, `q_norm.*`, `k_norm.*`, `norm.*`, `proj.*`)
    as a BlockSymmetricAttention state (`qk.*`, `v.*`, `qk_norm.*`, `norm.*`, `proj.*`)."""
    _check_qk_init(qk_init)
    if "qkv.weight" not in state:
        raise ValueError(f"state must hold 'qkv.weight' (a dense attention layer's state); got keys {sorted(state)}")
    w_q, w_k, w_v = state["qkv.weight"].chunk(3, dim=0)
    bias = state.get("qkv.bias")
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    q_norm, k_norm = _strip(state, "q_norm."), _strip(state, "k_norm.")
    if q_norm and qk_init == "spectral":
        raise ValueError(
            "qk_init='spectral' rotates each head's dimensions, which a per-dimension q/k norm does not "
            "allow; use qk_init='mean', 'q' or 'k' for a layer with qk_norm"
        )
    w_qk, b_qk = shared_qk_projection(w_q, w_k, b_q, b_k, num_heads=num_heads, qk_init=qk_init)

    out = {"qk.weight": w_qk, "v.weight": w_v.clone()}
    if b_qk is not None:
        out["qk.bias"], out["v.bias"] = b_qk, b_v.clone()
    for name, q_value in q_norm.items():
        k_value = k_norm[name]
        chosen = {"mean": 0.5 * (q_value + k_value), "q": q_value, "k": k_value}[qk_init]
        out[f"qk_norm.{name}"] = chosen.clone()
    for prefix in ("norm.", "proj."):
        out.update({prefix + k: v.clone() for k, v in _strip(state, prefix).items()})
    return out


def attention_from_dense(attn: nn.Module, *, qk_init: str = "spectral", **bspf_kwargs) -> BlockSymmetricAttention:
    """A BlockSymmetricAttention with the weights of a dense attention module (timm's
    `Attention` or bspf_ext's `DenseAttention`), on the same device and dtype.

    `bspf_kwargs` are BlockSymmetricAttention's own options (block_size, keep_ratio, fuse,
    scoring). attn_drop must be 0 in the source (BSPF cannot drop attention probabilities).
    """
    for name in ("qkv", "proj", "num_heads"):
        if not hasattr(attn, name):
            raise TypeError(f"{type(attn).__name__} is not a dense attention module: it has no {name!r}")
    dim = attn.qkv.in_features
    if getattr(attn, "gate", None) is not None:
        raise ValueError("a gated attention (timm's gated=True) has no BSPF counterpart")
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim or attn.proj.out_features != dim:
        raise ValueError(
            "only attention whose heads span the model width (attn_head_dim, dim_out unset) converts; got "
            f"qkv {attn.qkv.in_features}->{attn.qkv.out_features}, proj {attn.proj.in_features}->{attn.proj.out_features}"
        )
    attn_drop = getattr(getattr(attn, "attn_drop", None), "p", 0.0)
    proj_drop = getattr(getattr(attn, "proj_drop", None), "p", 0.0)
    q_norm = getattr(attn, "q_norm", nn.Identity())
    norm = getattr(attn, "norm", nn.Identity())
    has_qk_norm, has_scale_norm = not isinstance(q_norm, nn.Identity), not isinstance(norm, nn.Identity)
    head_dim = dim // attn.num_heads

    def norm_layer(width: int) -> nn.Module:
        # Copies of the source's own norm modules (the weights are loaded below).
        return copy.deepcopy(q_norm if has_qk_norm and width == head_dim else norm)

    module = BlockSymmetricAttention(
        dim,
        attn.num_heads,
        qkv_bias=attn.qkv.bias is not None,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        qk_norm=has_qk_norm,
        scale_norm=has_scale_norm,
        proj_bias=attn.proj.bias is not None,
        norm_layer=norm_layer if (has_qk_norm or has_scale_norm) else None,
        **bspf_kwargs,
    )
    scale = getattr(attn, "scale", None)
    if scale is not None:
        module.scale = float(scale)
    state = convert_attention_state(attn.state_dict(), attn.num_heads, qk_init)
    if module.theta is not None:
        state["theta"] = module.theta.detach().clone()
    weight = attn.qkv.weight
    module.to(device=weight.device, dtype=weight.dtype)  # before loading, so nothing is rounded
    module.load_state_dict(state)
    return module


def resample_pos_embed(pos_embed: Tensor, grid_size: int, num_prefix_tokens: int = 1) -> Tensor:
    """(1, P + G², C) position embedding resampled bicubically to a grid_size² patch grid."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if old == grid_size:
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _unwrap(state_dict: Mapping) -> dict:
    """Checkpoints often hold the weights under 'model' or 'state_dict', or with a 'module.' prefix."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"state_dict must map names to tensors, got {key!r}: {type(value).__name__}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# Parts of timm ViTs that bspf_ext's VisionTransformer does not have: (what, how to spot it).
_TIMM_ONLY = (
    ("a distillation token (dist_token, head_dist: a distilled DeiT)", lambda keys: "dist_token" in keys),
    ("register tokens (reg_token)", lambda keys: "reg_token" in keys),
    ("LayerScale (blocks.*.ls1/ls2: DeiT III, DINOv2, ...)",
     lambda keys: any(re.match(r"blocks\.\d+\.ls[12]\.", k) for k in keys)),
    ("qk_norm (blocks.*.attn.q_norm/k_norm)", lambda keys: any(re.match(r"blocks\.\d+\.attn\.[qk]_norm\.", k) for k in keys)),
    ("no class token", lambda keys: "pos_embed" in keys and "cls_token" not in keys),
    ("average or attention pooling (fc_norm, attn_pool)",
     lambda keys: any(k.startswith(("fc_norm.", "attn_pool.")) for k in keys)),
    ("a pre-norm (norm_pre)", lambda keys: any(k.startswith("norm_pre.") for k in keys)),
)


def _check_timm_architecture(source: Mapping) -> None:
    """A clear refusal of a timm checkpoint whose architecture the built-in ViT does not have
    (rather than a list of unexpected keys, or a shape error on the way there)."""
    keys = set(source)
    found = [what for what, spotted in _TIMM_ONLY if spotted(keys)]
    if found:
        raise ValueError(
            f"state_dict is of a timm ViT with {', '.join(found)}, which bspf_ext's VisionTransformer "
            "(class token, token pooling) does not have; build that model with timm and swap its "
            "attention with bspf_ext.swap.timm instead"
        )


def _check_model(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a bspf_ext VisionTransformer (bspf_ext.models.vit_*), got {type(model).__name__}")


def convert_state_dict(
    state_dict: Mapping, model: nn.Module, *, qk_init: str = "spectral", skip_head: bool = False
) -> dict:
    """A timm-format ViT/DeiT state_dict rewritten for `model` (a bspf_ext VisionTransformer):
    BSPF blocks get W_qk per `qk_init`, pos_embed is resampled to the model's patch grid,
    and with `skip_head` the classifier head is the model's own (for a new number of classes)."""
    _check_model(model)
    _check_qk_init(qk_init)
    check_bool("skip_head", skip_head)
    source = _unwrap(state_dict)
    _check_timm_architecture(source)
    target = model.state_dict()
    out = {}
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}.attn."
        layer = _strip(source, prefix)
        if isinstance(block.attn, BlockSymmetricAttention):
            if "qkv.weight" not in layer:
                raise ValueError(f"state_dict has no {prefix + 'qkv.weight'!r}: not a timm-format ViT/DeiT state_dict "
                                 f"of this model's depth ({len(model.blocks)} blocks)")
            layer = convert_attention_state(layer, block.attn.num_heads, qk_init)
            if block.attn.theta is not None:
                layer["theta"] = target[prefix + "theta"]
        out.update({prefix + k: v for k, v in layer.items()})
    for key, value in source.items():
        if key.startswith("blocks.") and ".attn." in key:
            continue
        out[key] = value
    if "pos_embed" in out and out["pos_embed"].shape != target["pos_embed"].shape:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.config.grid_size)
    if skip_head:
        out.update({k: v for k, v in target.items() if k.startswith("head.")})
        out = {k: v for k, v in out.items() if not k.startswith("head.") or k in target}
    for key, value in out.items():
        if key in target and target[key].shape != value.shape:
            hint = " (pass skip_head=True to keep the model's own head)" if key.startswith("head.") else ""
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target[key].shape)}{hint}"
            )
    return out


def load_timm_state_dict(
    model: nn.Module, state_dict: Mapping, *, qk_init: str = "spectral", skip_head: bool = False
) -> nn.Module:
    """Loads a timm-format ViT/DeiT state_dict into a bspf_ext VisionTransformer whatever its
    attention layers (dense and chunk layers load as they are, BSPF layers are converted);
    strict: a missing or unexpected key is a ValueError. Returns the model."""
    converted = convert_state_dict(state_dict, model, qk_init=qk_init, skip_head=skip_head)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        problems = [f"{what} keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(f"state_dict does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(converted)
    return model
