"""Total orders on token scores, the building block every selection shares.

Scores are real data: they can tie (uniform attention), be constant, or be NaN. All selections in
this package therefore rank by a *priority*: a permutation of `0..N-1` where a higher value is
better. Ties break toward the lower token index and NaN ranks below everything (including -inf),
so the same input gives the same keep set on every backend, and `lax.top_k` over priorities never
sees a tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def priority(scores: jax.Array) -> jax.Array:
  """Distinct integer priorities from scores, for one sequence.

  Args:
    scores: [N] float scores, higher = more important. NaN is treated as the lowest value; equal
      scores are ordered by index (lower index wins).

  Returns:
    [N] int32, a permutation of 0..N-1 (N-1 for the best token).
  """
  n = scores.shape[-1]
  s = jnp.asarray(scores, jnp.float32)
  # NaN -> -inf sorts last among finite values; -inf/NaN ties still break by index (stable sort).
  s = jnp.where(jnp.isnan(s), -jnp.inf, s)
  order = jnp.argsort(-s, stable=True)                     # best first
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return (n - 1) - rank


def top_k_indices(prio: jax.Array, k: int) -> jax.Array:
  """The `k` highest-priority indices of one sequence, sorted ascending (raster order).

  Args:
    prio: [N] distinct integer priorities (see `priority`).
    k: static number kept, 1 <= k <= N.

  Returns:
    [k] int32 distinct indices, ascending.
  """
  _, idx = jax.lax.top_k(prio, k)
  return jnp.sort(idx.astype(jnp.int32))


def keep_mask(keep_idx: jax.Array, n: int) -> jax.Array:
  """Index form to mask form: [..., k] int -> [..., n] bool."""
  one_hot = keep_idx[..., :, None] == jnp.arange(n, dtype=keep_idx.dtype)
  return jnp.any(one_hot, axis=-2)


def batched(fn, core_ndims: tuple[int, ...]):
  """Lifts a single-sequence function to arbitrary leading batch dims by flatten + vmap.

  `core_ndims[i]` is the number of trailing (per-sequence) dims of positional argument i; `None`
  arguments are passed through unbatched. The first argument defines the batch shape.
  """

  def wrapped(*args):
    lead = args[0].shape[: args[0].ndim - core_ndims[0]]
    flat_args, axes = [], []
    for a, nd in zip(args, core_ndims):
      if a is None:
        flat_args.append(None)
        axes.append(None)
      else:
        flat_args.append(a.reshape((-1,) + a.shape[a.ndim - nd:]))
        axes.append(0)
    if not lead:
      out = fn(*[None if a is None else a[0] for a in flat_args])
      return out
    out = jax.vmap(fn, in_axes=tuple(axes))(*flat_args)
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)

  return wrapped
