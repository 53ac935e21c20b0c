"""Linear / bilinear resizing with PyTorch's `F.interpolate(..., align_corners=False)` semantics.

`jax.image.resize` antialiases when shrinking by default and is not specified to match PyTorch's
index arithmetic, so the two taps and their weights are computed here exactly as ATen's CPU kernel
does (`area_pixel_compute_source_index` + `guard_index_and_lambda`), in float32:

  scale = in / out                       (float32)
  src   = max(fma(scale, dst + 0.5, -0.5), 0)   (float32, one rounding)
  lo    = min(floor(src), in - 1);  hi = lo + (lo < in - 1)
  w_hi  = clamp(src - lo, 0, 1);   w_lo = 1 - w_hi

Sizes are static, so indices and weights are NumPy constants; the resize is two gathers and a
weighted sum per axis. Bilinear = the width pass followed by the height pass, which is the same
arithmetic as ATen's `w_lo_h * (row lo) + w_hi_h * (row hi)`. No antialiasing, even when shrinking.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray]:
  """(lo, hi, w_lo, w_hi) for resizing an axis from `in_size` to `out_size` samples."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"linear_taps: sizes must be positive, got in={in_size} out={out_size}")
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  # ATen's build contracts `scale * (dst + 0.5) - 0.5` into one fused multiply-add: the product of
  # two float32 values is exact in float64, so computing there and rounding once reproduces it.
  src = (np.float64(scale) * (dst + f32(0.5)).astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = lo + (lo < in_size - 1).astype(np.int64)
  w_hi = np.clip(src - lo.astype(f32), f32(0.0), f32(1.0)).astype(f32)
  w_lo = (f32(1.0) - w_hi).astype(f32)
  return lo, hi, w_lo, w_hi


def resize_linear(x: jax.Array, out_size: int, axis: int, keep: int | None = None) -> jax.Array:
  """Resizes one axis of `x` like `F.interpolate(mode="linear", align_corners=False)`.

  `keep` returns only the first `keep` output samples (resize-then-crop without computing the
  cropped-away samples; the kept ones are identical).
  """
  axis = axis % x.ndim
  in_size = x.shape[axis]
  keep = out_size if keep is None else keep
  if not 0 < keep <= out_size:
    raise ValueError(f"resize_linear: keep={keep} must be in [1, out_size={out_size}]")
  if in_size == out_size:
    return jax.lax.slice_in_dim(x, 0, keep, axis=axis)  # scale 1: src = dst, the identity
  lo, hi, w_lo, w_hi = (t[:keep] for t in linear_taps(in_size, out_size))
  bshape = [1] * x.ndim
  bshape[axis] = keep
  w_lo = jnp.asarray(w_lo, x.dtype).reshape(bshape)
  w_hi = jnp.asarray(w_hi, x.dtype).reshape(bshape)
  return jnp.take(x, lo, axis=axis) * w_lo + jnp.take(x, hi, axis=axis) * w_hi


def resize_bilinear(x: jax.Array, out_hw: Sequence[int], axes: tuple[int, int] = (-2, -1),
                    keep_hw: Sequence[int] | None = None) -> jax.Array:
  """Bilinear resize of the two spatial `axes` (H, W) of `x` to `out_hw`, PyTorch-exact.

  Matches `F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)` (no antialias)
  for NCHW input with the default `axes=(-2, -1)`; pass `axes=(1, 2)` for NHWC. `keep_hw`
  crops the result to its top-left (h, w) corner without computing the rest.
  """
  out_h, out_w = (int(s) for s in out_hw)
  keep_h, keep_w = (out_h, out_w) if keep_hw is None else (int(s) for s in keep_hw)
  x = resize_linear(x, out_w, axes[1], keep=keep_w)
  return resize_linear(x, out_h, axes[0], keep=keep_h)
