"""Pictures: the keep mask a BSPF layer chooses for an image, how much each patch is used
as a key across layers and heads, and accuracy against FLOPs for a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..nn import BlockSymmetricAttention

__all__ = ["keep_masks", "token_usage", "load_image", "draw_image_report", "draw_comparison"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def keep_masks(model: torch.nn.Module, image: Tensor) -> list[Tensor]:
    """The keep mask of every BSPF layer for one image (C, H, W): a list of (heads, N, N) bool."""
    layers = [m for m in model.modules() if isinstance(m, BlockSymmetricAttention)]
    if not layers:
        raise ValueError("the model has no BSPF attention layer to draw")
    captured: list[Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: captured.append(module.keep_mask(args[0])[0]))
        for layer in layers
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(image[None].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [mask.cpu() for mask in captured]


def token_usage(masks: Sequence[Tensor]) -> Tensor:
    """Fraction of queries that keep each token as a key, averaged over layers and heads: (N,)."""
    return torch.stack([mask.float().mean(dim=-2).mean(dim=0) for mask in masks]).mean(dim=0)


def load_image(path, image_size: int, in_chans: int = 1) -> Tensor:
    """An image file as a (in_chans, image_size, image_size) float tensor in [0, 1]."""
    import matplotlib.image as mpimg

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        array = mpimg.imread(str(path))
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports "not a PNG file" as a SyntaxError
        raise ValueError(f"image {path} is unreadable (not an image, or truncated): {error}") from error
    image = torch.as_tensor(array, dtype=torch.float32)
    if image.max() > 1.0:
        image = image / 255.0
    if image.dim() == 2:
        image = image[..., None]
    image = image[..., :3].permute(2, 0, 1)  # drop alpha
    if in_chans == 1:
        image = image.mean(dim=0, keepdim=True)
    elif image.shape[0] == 1:
        image = image.expand(in_chans, -1, -1)
    return torch.nn.functional.interpolate(image[None], size=(image_size, image_size), mode="bilinear")[0].clamp(0, 1)


def _draw_mask(ax, mask: Tensor, title: str) -> None:
    ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")


def _draw_usage(ax, image: Tensor, usage: Tensor) -> None:
    """The patch tokens' usage as a heatmap laid over the image (the class token left out)."""
    grid = int(round((usage.numel() - 1) ** 0.5))
    extent = (0, grid, grid, 0)
    ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", extent=extent)
    ax.imshow(usage[1:].reshape(grid, grid).numpy(), cmap="viridis", alpha=0.6, extent=extent)
    ax.set_title("how often each patch is kept as a key")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_image_report(model, image: Tensor, path, *, title: str = "", layer: int = 0, head: int = 0) -> Path:
    """Three panels: the image, one layer/head's keep mask, and the token-usage heatmap."""
    plt = _pyplot()
    masks = keep_masks(model, image)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(masks):
        raise ValueError(f"layer must be a BSPF layer index in [0, {len(masks)}), got {layer!r}")
    heads = masks[layer].shape[0]
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
        raise ValueError(f"head must be a head index in [0, {heads}), got {head!r}")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
    axes[0].set_title("input")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    _draw_mask(axes[1], masks[layer][head], f"keep mask, BSPF layer {layer}, head {head} (black: kept)")
    _draw_usage(axes[2], image, token_usage(masks))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def draw_comparison(rows: Sequence[dict], path, *, model=None, image: Tensor | None = None, title: str = "") -> Path:
    """Accuracy against attention FLOPs for each run; with a BSPF model and an image, also its
    keep mask and token usage."""
    plt = _pyplot()
    panels = 3 if model is not None and image is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    for index, row in enumerate(rows):
        point = (row["attention_flops"] / 1e6, 100 * row["accuracy"])
        ax.scatter(*point, s=40)
        # Alternate label sides so runs with nearly equal results stay readable.
        ax.annotate(row["name"], point, fontsize=8, xytext=(5, 4 if index % 2 == 0 else -10),
                    textcoords="offset points")
    ax.set_xlabel("attention MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy against attention FLOPs")
    ax.grid(alpha=0.3)
    if panels == 3:
        masks = keep_masks(model, image)
        _draw_mask(axes[0, 1], masks[0][0], "BSPF keep mask, layer 0, head 0 (black: kept)")
        _draw_usage(axes[0, 2], image, token_usage(masks))
    return _save(fig, path)
