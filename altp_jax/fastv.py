"""FastV ("An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764) as fixed-shape pieces.

Layers `0..K-1` run on the full sequence; the last prompt token's attention at layer `K-1` (mean
over heads, softmax over all keys) scores the visual tokens; the top `k` are kept for layers
`K..L-1`, in original order, with their original position ids. Selection happens once, at
prefill; decode steps attend to the same subset (the KV-cache variant of the reference code).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from altp_jax import _checks
from altp_jax import attention_scores
from altp_jax import baselines
from altp_jax import gather
from altp_jax import ranking

ROUNDINGS = ("round", "floor")


def keep_count(n: int, reduction: float, rounding: str = "round") -> int:
  """Tokens kept when a fraction `reduction` of `n` is dropped.

  `round` is FastV-HF's `round(n * (1 - R))` (58 of 576 at 90%); `floor` is PyramidDrop's
  `int(n * ratio)` (57 of 576). The result is at least 1.
  """
  if not 0.0 <= reduction < 1.0:
    raise ValueError(f"reduction={reduction} must be in [0, 1): the fraction of tokens dropped")
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r}; expected one of {ROUNDINGS}")
  kept = n * (1.0 - reduction)
  # The epsilon keeps float noise (576 * 0.1 = 57.6000000001) from moving a floor.
  k = int(round(kept)) if rounding == "round" else int(math.floor(kept + 1e-9))
  return max(1, k)


@dataclasses.dataclass(frozen=True)
class FastVConfig:
  """FastV settings. `layer` is K (tokens are dropped before layer K, scored at K-1);
  `reduction` the fraction of visual tokens dropped; `positions` `original` as the reference."""

  layer: int = 2
  reduction: float = 0.5
  rounding: str = "round"
  positions: str = "original"

  def __post_init__(self):
    if self.layer < 1:
      raise ValueError(f"FastVConfig.layer={self.layer} must be >= 1: the score needs layer K-1 "
                       "(use random_select or grid_select for K=0)")
    keep_count(1, self.reduction, self.rounding)  # validates both
    if self.positions not in ("original", "compact"):
      raise ValueError(f"FastVConfig.positions={self.positions!r}")

  def kept(self, n: int) -> int:
    return keep_count(n, self.reduction, self.rounding)


def fastv_select(q_last: jax.Array, keys: jax.Array, key_valid: jax.Array,
                 visual_mask: jax.Array, n: int, k: int) -> jax.Array:
  """FastV's keep set from layer K-1's last-query attention.

  Args:
    q_last: [B, Hq, Dh] post-RoPE query of each row's last prompt token at layer K-1.
    keys: [B, T, Hkv, Dh] post-RoPE keys of layer K-1.
    key_valid: [B, T] bool, keys the last token may attend to (non-padding, causal).
    visual_mask: [B, T] bool, the N visual slots of each row.
    n: number of visual tokens per row.
    k: static number of visual tokens kept.

  Returns:
    [B, k] int32 ascending indices into the N visual tokens.
  """
  k = _checks.check_k(k, n)
  scores = attention_scores.last_query_scores(q_last, keys, key_valid)   # [B, T]
  return baselines.topk_select(gather.visual_values(scores, visual_mask, n), k)


def visual_keep_mask(keep_idx: jax.Array, n: int) -> jax.Array:
  """[B, k] visual indices -> [B, N] bool."""
  return ranking.keep_mask(keep_idx, n)
