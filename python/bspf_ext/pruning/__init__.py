"""Token-reduction methods to compare with BSPF, for the same ViT models.

* Similarity-based patch pruning (training-free): `similarity_prune`,
  `SimilarityPatchPruning`, `SimilarityPrunedBlocks`; its random baseline `random_prune`,
  `RandomPatchPruning`.
* SViT selective gating: `SelectiveGate`, `GatedBlock`, the keep-ratio losses and
  `gate_statistics`.

docs/pruning.md describes both and the choices made where the papers are vague.
"""

from .gating import (
    SelectiveGate,
    GatedBlock,
    gate_blocks,
    gathered_block_update,
    masked_block_update,
    takes_key_mask,
)
from .losses import dynamic_keep_ratio_loss, fixed_keep_ratio_loss, svit_keep_targets
from .random_pruning import RandomPatchPruning, random_keep_indices, random_prune
from .similarity import (
    SimilarityPatchPruning,
    SimilarityPrunedBlocks,
    compose_indices,
    grid_positions,
    patch_similarity,
    redundancy_scores,
    similarity_keep_mask,
    similarity_prune,
)
from .stats import GateStatistics, gate_masks, gate_statistics
from .tokens import gather_kept, gather_tokens, kept_indices, scatter_kept

__all__ = [
    "similarity_prune",
    "similarity_keep_mask",
    "redundancy_scores",
    "patch_similarity",
    "grid_positions",
    "compose_indices",
    "SimilarityPatchPruning",
    "SimilarityPrunedBlocks",
    "random_prune",
    "random_keep_indices",
    "RandomPatchPruning",
    "SelectiveGate",
    "GatedBlock",
    "gate_blocks",
    "masked_block_update",
    "gathered_block_update",
    "takes_key_mask",
    "dynamic_keep_ratio_loss",
    "fixed_keep_ratio_loss",
    "svit_keep_targets",
    "gate_masks",
    "gate_statistics",
    "GateStatistics",
    "gather_kept",
    "gather_tokens",
    "kept_indices",
    "scatter_kept",
]
