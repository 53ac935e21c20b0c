"""Multi-scale deformable attention (mmcv `MultiScaleDeformableAttention`) with a gather-based
bilinear sampler instead of the CUDA `ms_deform_attn` kernel.

Sampling follows `F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`, which
is what mmcv's CPU path calls and what the CUDA kernel computes: a location (x, y) in [0, 1] of a
level of size (H_l, W_l) is the pixel coordinate (x * W_l - 0.5, y * H_l - 0.5); each of the four
neighbouring pixels contributes its bilinear weight if it lies inside the map and zero otherwise.

All levels are flattened into one value sequence (level-start offsets are static), so one
`take_along_axis` per query chunk gathers every level x point x neighbour tap; there is no Python
loop over levels or tokens. Queries are processed in chunks of a static size (`query_chunk`) under
`lax.map`, so 21,504 full-size queries never build a [Nq, heads, levels * points * 4, head_dim]
tensor at once.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from models.omg_seg.vision_layers import Linear

SpatialShapes = Sequence[tuple[int, int]]


def _check_shapes(spatial_shapes: SpatialShapes) -> tuple[tuple[int, int], ...]:
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  if not shapes or any(h < 1 or w < 1 for h, w in shapes):
    raise ValueError(f"deformable attention: bad spatial_shapes {spatial_shapes}")
  return shapes


def reference_points(spatial_shapes: SpatialShapes) -> np.ndarray:
  """Pixel-centre reference points of every token of every level, levels in the given order.

  Returns:
    [sum_l H_l * W_l, 2] float32, row-major within a level, each row ((x + 0.5) / W_l,
    (y + 0.5) / H_l) (mmdet `MlvlPointGenerator` offset 0.5 divided by the level size; valid ratios
    are 1 for unpadded inputs).
  """
  rows = []
  for h, w in _check_shapes(spatial_shapes):
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    rows.append(np.stack([(xs.ravel() + np.float32(0.5)) / np.float32(w),
                          (ys.ravel() + np.float32(0.5)) / np.float32(h)], axis=-1))
  return np.concatenate(rows, axis=0)


def ms_deform_attn_core(value: jax.Array, spatial_shapes: SpatialShapes,
                        sampling_locations: jax.Array, attention_weights: jax.Array) -> jax.Array:
  """Bilinear sampling of every level at every location, weighted and summed (no projections).

  Args:
    value: [B, Nv, heads, D], levels concatenated in `spatial_shapes` order (Nv = sum H_l W_l).
    spatial_shapes: static ((H_0, W_0), ...), L levels.
    sampling_locations: [B, Nq, heads, L, P, 2], (x, y) normalised to [0, 1] (outside is allowed:
      taps outside the map contribute zero).
    attention_weights: [B, Nq, heads, L, P].
  Returns:
    [B, Nq, heads * D] in float32 (mmcv `multi_scale_deformable_attn_pytorch`).
  """
  shapes = _check_shapes(spatial_shapes)
  b, nv, heads, d = value.shape
  if nv != sum(h * w for h, w in shapes):
    raise ValueError(f"deformable attention: value has {nv} tokens, spatial_shapes {shapes} give "
                     f"{sum(h * w for h, w in shapes)}")
  _, nq, _, n_lvl, n_pts, _ = sampling_locations.shape
  if n_lvl != len(shapes) or attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"deformable attention: locations {sampling_locations.shape}, weights "
                     f"{attention_weights.shape}, {len(shapes)} levels")
  hs = np.array([h for h, _ in shapes], np.float32)[:, None]          # [L, 1]
  ws = np.array([w for _, w in shapes], np.float32)[:, None]
  starts = np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int32)[:, None]
  loc = sampling_locations.astype(jnp.float32)
  # Pixel coordinates, align_corners=False: pixel i covers [i, i + 1) in units of loc * size.
  x = loc[..., 0] * ws - 0.5                                          # [B, Nq, heads, L, P]
  y = loc[..., 1] * hs - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  taps_x = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)               # [B, Nq, heads, L, P, 4]
  taps_y = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  bil = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
  ws4, hs4 = ws[..., None], hs[..., None]                             # [L, 1, 1]
  inside = (taps_x >= 0) & (taps_x <= ws4 - 1) & (taps_y >= 0) & (taps_y <= hs4 - 1)
  weight = jnp.where(inside, bil, 0.0) * attention_weights.astype(jnp.float32)[..., None]
  # Clip before the integer cast so far-away locations cannot overflow; their weight is zero.
  ix = jnp.clip(taps_x, 0, ws4 - 1).astype(jnp.int32)
  iy = jnp.clip(taps_y, 0, hs4 - 1).astype(jnp.int32)
  index = starts[..., None] + iy * ws4.astype(np.int32) + ix          # [B, Nq, heads, L, P, 4]
  taps = n_lvl * n_pts * 4
  index = index.reshape(b, nq, heads, taps).transpose(0, 2, 1, 3).reshape(b, heads, nq * taps)
  weight = weight.reshape(b, nq, heads, taps).transpose(0, 2, 1, 3)   # [B, heads, Nq, taps]
  v = value.transpose(0, 2, 1, 3)                                     # [B, heads, Nv, D]
  sampled = jnp.take_along_axis(v, index[..., None], axis=2)          # [B, heads, Nq * taps, D]
  sampled = sampled.reshape(b, heads, nq, taps, d)
  out = jnp.einsum("bhqtd,bhqt->bqhd", sampled, weight.astype(sampled.dtype),
                   preferred_element_type=jnp.float32)
  return out.reshape(b, nq, heads * d)


def _as_ref(ref: jax.Array | np.ndarray, nq: int) -> jax.Array:
  """Reference points as [B or 1, Nq, L or 1, 2]."""
  ref = jnp.asarray(ref, jnp.float32)
  if ref.ndim == 2:
    ref = ref[None, :, None, :]
  elif ref.ndim == 3:
    ref = ref[:, :, None, :]
  if ref.ndim != 4 or ref.shape[1] != nq or ref.shape[-1] != 2:
    raise ValueError(f"deformable attention: reference_points must be [Nq, 2], [B, Nq, 2] or "
                     f"[B, Nq, L, 2] with Nq={nq}, got {ref.shape}")
  return ref


class MultiScaleDeformableAttention(nnx.Module):
  """mmcv `MultiScaleDeformableAttention` (batch_first, 2-d reference points, no dropout).

  out = output_proj(sample(value_proj(value))) + query, where the sampling offsets and attention
  weights come from query + query_pos, and the weights are a softmax over the L * P entries of
  each head. Parameter names follow the checkpoint (`sampling_offsets`, `attention_weights`,
  `value_proj`, `output_proj`).
  """

  def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, *,
               query_chunk: int | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if embed_dims % num_heads:
      raise ValueError(f"MultiScaleDeformableAttention: embed_dims {embed_dims} not divisible by "
                       f"num_heads {num_heads}")
    self.embed_dims, self.num_heads = embed_dims, num_heads
    self.num_levels, self.num_points = num_levels, num_points
    self.query_chunk, self.dtype = query_chunk, dtype
    dt = dict(dtype=dtype, param_dtype=param_dtype)
    n = num_heads * num_levels * num_points
    self.sampling_offsets = Linear(embed_dims, n * 2, ("vis_embed", None), rngs=rngs, **dt)
    self.attention_weights = Linear(embed_dims, n, ("vis_embed", None), rngs=rngs, **dt)
    self.value_proj = Linear(embed_dims, embed_dims, ("vis_embed", None), rngs=rngs, **dt)
    self.output_proj = Linear(embed_dims, embed_dims, (None, "vis_embed"), rngs=rngs, **dt)

  def _attend(self, q: jax.Array, identity: jax.Array, ref: jax.Array, value: jax.Array,
              shapes: tuple[tuple[int, int], ...]) -> jax.Array:
    """q, identity [B, n, C]; ref [B or 1, n, L or 1, 2]; value [B, Nv, heads, D] -> [B, n, C]."""
    b, n, _ = q.shape
    h, lv, p = self.num_heads, self.num_levels, self.num_points
    # Offsets, weights and locations in float32: a bf16 location is off by a pixel at 128 px.
    off = self.sampling_offsets(q, jnp.float32).reshape(b, n, h, lv, p, 2)
    logits = self.attention_weights(q, jnp.float32).reshape(b, n, h, lv * p)
    attn = jax.nn.softmax(logits, axis=-1).reshape(b, n, h, lv, p)
    # offset / (W_l, H_l): offsets are in pixels of each level.
    norm = np.array([[w, h_] for h_, w in shapes], np.float32)[:, None, :]  # [L, 1, 2]
    loc = ref[:, :, None, :, None, :] + off / norm
    out = ms_deform_attn_core(value, shapes, loc, attn)
    return self.output_proj(out).astype(self.dtype) + identity.astype(self.dtype)

  def __call__(self, query: jax.Array, *, reference_points: jax.Array | np.ndarray,
               spatial_shapes: SpatialShapes, value: jax.Array | None = None,
               query_pos: jax.Array | None = None) -> jax.Array:
    """Deformable attention with the residual added.

    Args:
      query: [B, Nq, C] (also the residual identity).
      reference_points: [Nq, 2], [B, Nq, 2] or [B, Nq, L, 2], (x, y) in [0, 1].
      spatial_shapes: static ((H_l, W_l), ...) of the L value levels.
      value: [B, Nv, C], levels concatenated; default `query` (without `query_pos`, as mmcv).
      query_pos: [B, Nq, C] or None, added to the query for offsets and weights only.
    Returns:
      [B, Nq, C].
    """
    shapes = _check_shapes(spatial_shapes)
    if len(shapes) != self.num_levels:
      raise ValueError(f"MultiScaleDeformableAttention: {len(shapes)} spatial shapes for "
                       f"{self.num_levels} levels")
    if query.ndim != 3 or query.shape[-1] != self.embed_dims:
      raise ValueError(f"MultiScaleDeformableAttention: query must be [B, Nq, {self.embed_dims}], "
                       f"got {query.shape}")
    value = query if value is None else value
    b, nq, c = query.shape
    ref = _as_ref(reference_points, nq)
    q = query if query_pos is None else query + query_pos
    v = self.value_proj(value).reshape(b, value.shape[1], self.num_heads, c // self.num_heads)
    chunk = self.query_chunk
    if chunk is None or chunk >= nq:
      return self._attend(q, query, ref, v, shapes)
    # Pad the queries to a multiple of the chunk and map over chunks (a sequential loop in XLA).
    n_chunks = -(-nq // chunk)
    pad = n_chunks * chunk - nq

    def split(x):
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
      return jnp.moveaxis(x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]), 1, 0)

    outs = jax.lax.map(lambda xs: self._attend(xs[0], xs[1], xs[2], v, shapes),
                       (split(q), split(query), split(ref)))
    outs = jnp.moveaxis(outs, 0, 1).reshape(b, n_chunks * chunk, c)
    return outs[:, :nq]
