"""Superpixels for ALTP's Detail Density Capture: host SLIC, token labels, patch detail.

`slic_labels` wraps `skimage.segmentation.slic` with the contract every back end shares:
`image [H, W, 3] -> labels [H, W]` int32 in `[0, max_segments)`. `token_labels` (JAX) turns pixel
labels into one superpixel id per visual token of an `h x w` grid. The device SLIC in
`altp_jax.slic_device` has the same contract, so the two are interchangeable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from altp_jax import ranking


def as_rgb_float(image, name: str = "image") -> np.ndarray:
  """Validates an image and returns it as float32 RGB in [0, 1], shape [H, W, 3].

  Accepted: uint8 (0..255) or float (0..1) arrays shaped [H, W, 3] (RGB), [H, W, 4] (RGBA: the
  alpha channel is dropped, as PIL's `convert("RGB")` does), [H, W] or [H, W, 1] (grayscale:
  replicated to three channels). Anything else raises a ValueError naming the problem.
  """
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3:
    raise ValueError(f"{name} must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape "
                     f"{arr.shape}")
  c = arr.shape[-1]
  if c == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif c == 4:
    arr = arr[..., :3]
  elif c != 3:
    raise ValueError(f"{name} has {c} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)")
  if arr.shape[0] < 2 or arr.shape[1] < 2:
    raise ValueError(f"{name} of shape {arr.shape} is too small for superpixels")
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / 255.0
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"{name} contains NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"float {name} must be in [0, 1]; found values in [{lo:.3g}, {hi:.3g}] "
                       "(pass uint8 for 0..255 data)")
    return arr.astype(np.float32)
  raise ValueError(f"{name} has dtype {arr.dtype}; expected uint8 (0..255) or float (0..1)")


def _merge_excess(labels: np.ndarray, max_segments: int) -> np.ndarray:
  """Merges the smallest segments into their longest-bordering neighbour until few enough remain."""
  labels = labels.copy()
  while True:
    ids, counts = np.unique(labels, return_counts=True)
    if len(ids) <= max_segments:
      return labels
    victim = ids[np.argmin(counts)]
    mask = labels == victim
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    neighbours = labels[grown & ~mask]
    target = np.bincount(neighbours).argmax() if neighbours.size else ids[ids != victim][0]
    labels[mask] = target


def slic_labels(image, *, n_segments: int, compactness: float = 10.0, sigma: float = 0.0,
                max_segments: int | None = None, enforce_connectivity: bool = True,
                max_num_iter: int = 10) -> np.ndarray:
  """Host SLIC superpixels (scikit-image), remapped to a static id range.

  Args:
    image: [H, W, 3] RGB (or grayscale / RGBA, see `as_rgb_float`), uint8 or float in [0, 1].
    n_segments: approximate number of superpixels SLIC aims for.
    compactness, sigma, enforce_connectivity, max_num_iter: as `skimage.segmentation.slic`
      (Lab colour space).
    max_segments: static bound `G_max` on the ids (default `2 * n_segments`). If SLIC returns more
      segments, the smallest are merged into their longest-bordering neighbour.

  Returns:
    [H, W] int32 labels, consecutive ids in `[0, number of segments)` with that number <=
    `max_segments`, numbered in raster order of first appearance.
  """
  from skimage.segmentation import slic  # local: importing skimage.segmentation costs ~1 s

  if n_segments < 1:
    raise ValueError(f"n_segments={n_segments} must be >= 1")
  max_segments = 2 * n_segments if max_segments is None else max_segments
  if max_segments < 1:
    raise ValueError(f"max_segments={max_segments} must be >= 1")
  rgb = as_rgb_float(image)
  raw = slic(rgb, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
             enforce_connectivity=enforce_connectivity, max_num_iter=max_num_iter,
             channel_axis=-1, convert2lab=True)
  raw = _merge_excess(raw, max_segments)
  # Consecutive ids in raster order of first appearance: deterministic and backend-independent.
  _, first = np.unique(raw.ravel(), return_index=True)
  order = np.argsort(first)
  remap = np.zeros(raw.max() + 1, np.int32)
  remap[np.unique(raw.ravel())[order]] = np.arange(len(order), dtype=np.int32)
  return remap[raw]


def _check_grid(shape, grid):
  h, w = grid
  height, width = shape[-2], shape[-1]
  if h < 1 or w < 1 or height % h or width % w:
    raise ValueError(f"image of {height}x{width} pixels does not split into a {h}x{w} token grid "
                     f"(the patch size must be a whole number of pixels)")
  return height // h, width // w


def _token_labels_single(labels, *, grid, num_segments, mode):
  h, w = grid
  ph, pw = labels.shape[0] // h, labels.shape[1] // w
  labels = jnp.clip(labels.astype(jnp.int32), 0, num_segments - 1)
  if mode == "center":
    return labels[ph // 2::ph, pw // 2::pw].reshape(h * w)
  ty = jnp.arange(labels.shape[0]) // ph
  tx = jnp.arange(labels.shape[1]) // pw
  token = ty[:, None] * w + tx[None, :]
  # One-hot pooling as a scatter-add into [N * G] counts: memory O(N G), not O(H W G).
  counts = jax.ops.segment_sum(jnp.ones(labels.size, jnp.int32),
                               (token * num_segments + labels).ravel(), h * w * num_segments)
  return jnp.argmax(counts.reshape(h * w, num_segments), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("grid", "num_segments", "mode"))
def _token_labels(labels, *, grid, num_segments, mode):
  fn = functools.partial(_token_labels_single, grid=grid, num_segments=num_segments, mode=mode)
  return ranking.batched(fn, (2,))(labels)


def token_labels(labels, grid: tuple[int, int], num_segments: int,
                 mode: str = "majority") -> jax.Array:
  """One superpixel id per visual token.

  Args:
    labels: [..., H, W] int pixel superpixel ids in `[0, num_segments)` (clipped under jit).
    grid: static `(h, w)` token grid; `H` and `W` must be multiples of `h` and `w` (GLaMM: 336
      pixels, 24x24 tokens of 14x14 pixels).
    num_segments: static bound `G_max` on the ids.
    mode: `majority` (the most frequent id in the token's patch, ties to the smallest id) or
      `center` (the id of the patch's centre pixel).

  Returns:
    [..., h * w] int32 token labels in raster order.
  """
  from altp_jax import _checks

  labels = jnp.asarray(labels)
  if labels.ndim < 2:
    raise ValueError(f"labels must be [..., H, W]; got shape {labels.shape}")
  if mode not in ("majority", "center"):
    raise ValueError(f"mode={mode!r}; expected 'majority' or 'center'")
  _check_grid(labels.shape, grid)
  _checks.check_labels_in_range(labels, num_segments)
  return _token_labels(labels, grid=tuple(grid), num_segments=int(num_segments), mode=mode)


def patch_detail(image, grid: tuple[int, int]) -> np.ndarray:
  """Mean Sobel gradient magnitude of each token's patch: ALTP's `pixel_detail` density input.

  Args:
    image: [H, W, 3] (see `as_rgb_float`).
    grid: `(h, w)` token grid dividing the image.

  Returns:
    [h * w] float32.
  """
  from skimage.color import rgb2gray
  from skimage.filters import sobel

  rgb = as_rgb_float(image)
  ph, pw = _check_grid(rgb.shape[:2], grid)
  mag = sobel(rgb2gray(rgb)).astype(np.float32)
  h, w = grid
  return mag.reshape(h, ph, w, pw).mean(axis=(1, 3)).reshape(h * w)


def patch_detail_device(images: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """`patch_detail` in JAX for a batch: images [B, H, W, 3] in [0, 1] -> [B, h * w] float32.

  The same measure as the host version (skimage's `rgb2gray` then `sobel`: per axis a central
  difference [1, 0, -1] smoothed by [1/4, 1/2, 1/4] across, 'reflect' (= numpy 'symmetric')
  borders, magnitude sqrt((gx^2 + gy^2) / 2)), so it can run inside a jitted pipeline.
  """
  ph, pw = _check_grid(images.shape[1:3], grid)
  x = images.astype(jnp.float32)
  gray = x[..., 0] * 0.2125 + x[..., 1] * 0.7154 + x[..., 2] * 0.0721
  g = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="symmetric")

  def smooth(a, axis):
    n = a.shape[axis] - 2
    sl = lambda s: jax.lax.slice_in_dim(a, s, s + n, axis=axis)
    return 0.25 * sl(0) + 0.5 * sl(1) + 0.25 * sl(2)

  def diff(a, axis):
    n = a.shape[axis] - 2
    return (jax.lax.slice_in_dim(a, 2, 2 + n, axis=axis)
                  - jax.lax.slice_in_dim(a, 0, n, axis=axis))

  gy = smooth(diff(g, 1), 2)
  gx = smooth(diff(g, 2), 1)
  mag = jnp.sqrt((gx * gx + gy * gy) / 2.0)
  b = images.shape[0]
  h, w = grid
  return mag.reshape(b, h, ph, w, pw).mean(axis=(2, 4)).reshape(b, h * w)
