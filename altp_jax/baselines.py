"""Baseline selections users compare ALTP against: top-k by score, seeded random, uniform grid.

All return exactly `k` distinct indices per sequence in ascending order, like `altp_select`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from altp_jax import _checks
from altp_jax import ranking


@functools.partial(jax.jit, static_argnames=("k",))
def _topk(scores, *, k):
  fn = lambda s: ranking.top_k_indices(ranking.priority(s), k)  # noqa: E731
  return ranking.batched(fn, (1,))(scores)


def topk_select(scores, k: int) -> jax.Array:
  """The `k` best tokens by score (FastV's and PyramidDrop's selection rule).

  Args:
    scores: [..., N] float; NaN ranks lowest, ties go to the lower index.
    k: static, 1 <= k <= N.

  Returns:
    [..., k] int32 ascending indices.
  """
  scores = jnp.asarray(scores)
  k = _checks.check_k(k, scores.shape[-1])
  return _topk(scores, k=k)


def random_select(key: jax.Array, batch_shape: tuple[int, ...], n: int, k: int) -> jax.Array:
  """`k` of `n` tokens uniformly at random, independently per sequence; the same key gives the
  same result on every backend.

  Args:
    key: a `jax.random` key.
    batch_shape: leading dims of the output.
    n: tokens per sequence.
    k: static number kept.

  Returns:
    [*batch_shape, k] int32 ascending indices.
  """
  k = _checks.check_k(k, n)
  u = jax.random.uniform(key, tuple(batch_shape) + (n,))
  return _topk(u, k=k)


@functools.lru_cache(maxsize=256)
def grid_indices(grid: tuple[int, int], k: int) -> np.ndarray:
  """A spatially uniform set of `k` token indices on an `h x w` grid (static, cached).

  A lattice of `a x b >= k` cell centres with the grid's aspect ratio is laid over the tokens, and
  `k` of its points are taken at even spacing in raster order.

  Returns:
    [k] int32 ascending indices.
  """
  h, w = grid
  k = _checks.check_k(k, h * w)
  a = int(np.clip(round(np.sqrt(k * h / w)), 1, h))
  b = int(np.clip(int(np.ceil(k / a)), 1, w))
  while a * b < k:  # only when clipping bit: grow the dimension with room left
    if a < h:
      a += 1
    else:
      b += 1
  rows = np.floor((np.arange(a) + 0.5) * h / a).astype(np.int64)
  cols = np.floor((np.arange(b) + 0.5) * w / b).astype(np.int64)
  lattice = (rows[:, None] * w + cols[None, :]).ravel()
  pick = np.floor((np.arange(k) + 0.5) * lattice.size / k).astype(np.int64)
  return np.sort(lattice[pick]).astype(np.int32)


def grid_select(grid: tuple[int, int], k: int, batch_shape: tuple[int, ...] = ()) -> jax.Array:
  """`grid_indices` broadcast to `[*batch_shape, k]` (the same cells for every image)."""
  idx = jnp.asarray(grid_indices(tuple(grid), k))
  return jnp.broadcast_to(idx, tuple(batch_shape) + (k,))
