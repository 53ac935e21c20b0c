"""Applying a keep decision to a sequence: masks, static-length gathers and position ids.

The language model sees a sequence of `T` slots of which the `N` visual slots are marked by
`visual_mask`. A selection over the `N` visual tokens becomes a keep mask over all `T` slots (text is
never dropped), and a stable gather shortens every row to the same static length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from altp_jax import ranking


def sequence_keep_mask(visual_mask: jax.Array, visual_keep: jax.Array) -> jax.Array:
  """Keep mask over the whole sequence from a keep mask over the visual tokens.

  Args:
    visual_mask: [B, T] bool, True on the N visual slots of each row (in raster order); every row
      must have exactly N of them (data: rows with fewer use only the first visual_keep entries).
    visual_keep: [B, N] bool over the visual tokens.

  Returns:
    [B, T] bool: True on every non-visual slot and on kept visual slots.
  """
  n = visual_keep.shape[-1]
  vis_index = jnp.clip(jnp.cumsum(visual_mask.astype(jnp.int32), axis=-1) - 1, 0, n - 1)
  kept_vis = jnp.take_along_axis(visual_keep, vis_index, axis=-1)
  return jnp.where(visual_mask, kept_vis, True)


def visual_values(x: jax.Array, visual_mask: jax.Array, n: int) -> jax.Array:
  """The values of the `n` visual slots of each row, in order: [B, T, ...] -> [B, n, ...].

  Used to read per-visual-token scores (e.g. FastV's last-query attention) off a sequence.
  """
  order = _stable_order(visual_mask)[:, :n]
  return _take(x, order)


def _stable_order(keep):
  t = keep.shape[-1]
  iota = jnp.arange(t, dtype=jnp.int32)
  return jnp.argsort(jnp.where(keep, iota, t + iota), axis=-1)


def _take(x, order):
  idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def gather_kept(x: jax.Array, keep: jax.Array, length: int):
  """Shortens every row to the static `length` kept slots, in their original order.

  Args:
    x: [B, T, ...] values (hidden states, ids, masks).
    keep: [B, T] bool; every row should keep exactly `length` slots.
    length: static output length, <= T.

  Returns:
    `(y, index, valid)`: y [B, length, ...]; index [B, length] int32 source slot of each output
    slot; valid [B, length] bool, False where a row kept fewer than `length` slots (those trailing
    slots then hold dropped tokens, which the caller must mask out).
  """
  t = keep.shape[-1]
  if not 1 <= length <= t:
    raise ValueError(f"length={length} must be in [1, T={t}]")
  if x.shape[:2] != keep.shape:
    raise ValueError(f"x of shape {x.shape} does not match keep of shape {keep.shape}")
  order = _stable_order(keep)[:, :length]
  return _take(x, order), order.astype(jnp.int32), jnp.take_along_axis(keep, order, axis=1)


def kept_positions(keep: jax.Array, index: jax.Array, mode: str = "original",
                   positions: jax.Array | None = None) -> jax.Array:
  """Position ids of the gathered slots.

  Args:
    keep: [B, T] bool keep mask used for the gather.
    index: [B, L] source slots returned by `gather_kept`.
    mode: `original` (each kept token keeps its position: RoPE phases unchanged, gaps remain, as
      FastV) or `compact` (renumbered 0.. over kept slots, as PyramidDrop).
    positions: [B, T] positions before the gather (default `arange(T)`).

  Returns:
    [B, L] int32 position ids.
  """
  b, t = keep.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if mode == "original":
    return jnp.take_along_axis(positions.astype(jnp.int32), index, axis=1)
  if mode == "compact":
    first = positions[:, :1].astype(jnp.int32)
    compact = first + jnp.cumsum(keep.astype(jnp.int32), axis=-1) - 1
    return jnp.take_along_axis(compact, index, axis=1)
  raise ValueError(f"mode={mode!r}; expected 'original' or 'compact'")


def keep_mask(keep_idx: jax.Array, n: int) -> jax.Array:
  """Index form to mask form: [..., k] int -> [..., n] bool."""
  return ranking.keep_mask(keep_idx, n)
