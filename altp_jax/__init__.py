"""altp_jax: fixed-shape, jit-compiled visual-token pruning for grounded vision-language models.

ALTP as described in the paper (arXiv 2503.23959); settings the paper does not publish are options,
whose defaults are the spec's candidates until our ablation picks them (docs/ALTP.md). FastV and
PyramidDrop follow their authors' code. Every selection keeps a static number `k` of tokens and returns `[..., k]` ascending indices, so it can
be jit-compiled, vmapped and sharded inside a larger JAX program.
"""

from altp_jax.altp import ALTPConfig, altp_budgets, altp_keep_mask, altp_select
from altp_jax.attention_scores import cls_attention_scores, last_query_index, last_query_scores
from altp_jax.baselines import grid_indices, grid_select, random_select, topk_select
from altp_jax.connectivity import enforce_connectivity
from altp_jax.connectivity_device import (connected_components, enforce_connectivity_device,
                                          num_connected_segments)
from altp_jax.fastv import FastVConfig, fastv_select, keep_count
from altp_jax.gather import gather_kept, kept_positions, sequence_keep_mask, visual_values
from altp_jax.pipeline import device_keep_indices, keep_indices
from altp_jax.pyramid_drop import (PyramidSchedule, default_schedule, schedule_for_target,
                                   select_surviving)
from altp_jax.ranking import keep_mask, priority
from altp_jax.slic_device import num_centres, rgb_to_lab, slic
from altp_jax.superpixels import patch_detail, slic_labels, token_labels

__all__ = [
    "ALTPConfig", "altp_budgets", "altp_keep_mask", "altp_select",
    "cls_attention_scores", "last_query_index", "last_query_scores",
    "grid_indices", "grid_select", "random_select", "topk_select",
    "enforce_connectivity",
    "connected_components", "enforce_connectivity_device", "num_connected_segments",
    "FastVConfig", "fastv_select", "keep_count",
    "gather_kept", "kept_positions", "sequence_keep_mask", "visual_values",
    "device_keep_indices", "keep_indices",
    "PyramidSchedule", "default_schedule", "schedule_for_target", "select_surviving",
    "keep_mask", "priority",
    "num_centres", "rgb_to_lab", "slic",
    "patch_detail", "slic_labels", "token_labels",
]
