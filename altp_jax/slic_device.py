"""SLIC superpixels on the accelerator: a fixed-shape, jit-compiled JAX SLIC.

Same contract as the host back end (`altp_jax.superpixels.slic_labels`): images `[..., H, W, 3]`
to labels `[..., H, W]` int32 in `[0, G_max)`, so ALTP's Detail Density Capture can run inside
one jitted program. It follows scikit-image's `slic` conventions wherever a fixed shape allows:

* Input: uint8 (0..255) or float (0..1), rescaled per image to [0, 1] by its min and max (skimage
  does this so that `compactness` does not depend on the input range), then converted to CIE Lab
  exactly as `skimage.color.rgb2lab` (sRGB, D65, 2-degree observer). Optional Gaussian smoothing
  of the Lab image (`sigma`, scipy's `reflect` border, truncate 4), as skimage.
* Centres: skimage's grid (`skimage.util.regular_grid` on the image shape), so `G_max =
  num_centres(H, W, n_segments)` and centre `i * nx + j` starts at grid node `(i, j)`.
* Distance: `d_lab^2 / compactness^2 + d_xy^2 / S^2`, S the grid step (skimage's scaling; the
  same ordering as `d_lab^2 + (compactness / S)^2 d_xy^2`). The first assignment ignores colour
  (skimage starts the centre colours at zero, which has the same effect), then `num_iterations`
  assignments in total, the centres being updated between them; the last assignment is returned.
  Ties go to the lower centre id, as in skimage.

Where it differs, on purpose:

* Local window. skimage lets each centre claim pixels inside a `±2S` box around it. Here each
  pixel compares only the centres of the `(2 radius + 1)^2` grid nodes around its own grid cell
  (`radius=1`: the 3x3 neighbourhood, the natural fixed-shape form of SLIC's window). A centre
  keeps its grid slot while it moves, so a pixel never sees a centre more than `radius + 1/2`
  cells away.
* Empty centres. A centre that wins no pixel keeps its previous position and colour (skimage
  divides 0 by 0 and the centre drops out for good, as a NaN).
* No connectivity pass inside `slic`: a superpixel may be split into several pieces, and small
  islands survive. `altp_jax.connectivity_device.enforce_connectivity_device` is skimage's fix-up
  on the device (the image -> keep-indices pipeline runs it by default: it moves ALTP keep sets
  a lot), `altp_jax.connectivity.enforce_connectivity` a host variant.
* No early stop: always `num_iterations` assignments (skimage stops when nothing changes, which
  only happens after convergence, so the results agree).

Layout, for speed on GPU: no `[H*W, G]` distance matrix and no scatter. The image is padded to a
whole number of `step x step` blocks, block `(r, c)` belonging to grid cell `(min(r, ny-1),
min(c, nx-1))`. A pixel computes its distance to the `K = (2 radius + 1)^2` candidate centres of its
block only (`[B, nby, step, nbx, step, K]`, fused by XLA into the argmin). The centre update sums
`[1, y, x, L, a, b]` per block and per candidate slot with one small batched contraction, and each
centre then adds up the K slots that point at it with K static shifted slices. Memory and work are
O(B H W K).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# skimage.color.colorconv: sRGB (D65) to XYZ, and the D65 2-degree reference white.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float32)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)


@dataclasses.dataclass(frozen=True)
class SlicGrid:
  """The static centre grid and block layout for one image size (all Python ints).

  Attributes:
    height, width: image size in pixels.
    start_y, start_x, step_y, step_x: grid node `(i, j)` sits at pixel
      `(start_y + i * step_y, start_x + j * step_x)`, as `skimage.util.regular_grid`.
    ny, nx: number of grid nodes per axis; `num_centres = ny * nx` is `G_max`.
    step: skimage's spatial scale S (the larger grid step).
    pad_top, pad_left: padding in front of the image so blocks line up with grid cells.
    nby, nbx: number of `step_y x step_x` blocks covering the padded image (`>= ny, nx`).
  """

  height: int
  width: int
  start_y: int
  start_x: int
  step_y: int
  step_x: int
  ny: int
  nx: int
  step: float
  pad_top: int
  pad_left: int
  nby: int
  nbx: int

  @property
  def num_centres(self) -> int:
    return self.ny * self.nx


def slic_grid(height: int, width: int, n_segments: int) -> SlicGrid:
  """skimage's SLIC grid for an `height x width` image and `n_segments` requested superpixels."""
  from skimage.util import regular_grid  # host-side, trace time only

  if height < 1 or width < 1:
    raise ValueError(f"image size {height}x{width} must be positive")
  if n_segments < 1:
    raise ValueError(f"n_segments={n_segments} must be >= 1")
  # skimage treats a 2-D image as a volume of depth 1 and grids that.
  _, sl_y, sl_x = regular_grid((1, height, width), n_segments)
  start_y, step_y = int(sl_y.start or 0), int(sl_y.step or 1)
  start_x, step_x = int(sl_x.start or 0), int(sl_x.step or 1)
  ny = len(range(start_y, height, step_y))
  nx = len(range(start_x, width, step_x))
  # Block r spans padded rows [r*step, (r+1)*step); with pad = step//2 - start its middle is
  # grid row r, i.e. a block holds the pixels nearest to its grid node (up to half a pixel).
  pad_top = max(step_y // 2 - start_y, 0)
  pad_left = max(step_x // 2 - start_x, 0)
  nby = max(-(-(height + pad_top) // step_y), ny)
  nbx = max(-(-(width + pad_left) // step_x), nx)
  return SlicGrid(height=height, width=width, start_y=start_y, start_x=start_x, step_y=step_y,
                  step_x=step_x, ny=ny, nx=nx, step=float(max(step_y, step_x, 1)),
                  pad_top=pad_top, pad_left=pad_left, nby=nby, nbx=nbx)


def num_centres(height: int, width: int, n_segments: int) -> int:
  """`G_max` of the device SLIC: the number of grid centres (labels lie in `[0, G_max)`)."""
  return slic_grid(height, width, n_segments).num_centres


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """CIE Lab of sRGB in [0, 1], as `skimage.color.rgb2lab` (D65, 2 degrees).

  Args:
    rgb: [..., 3] float in [0, 1].

  Returns:
    [..., 3] float32 (L in [0, 100]).
  """
  rgb = rgb.astype(jnp.float32)
  lin = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  xyz = jnp.einsum("...c,dc->...d", lin, _XYZ_FROM_RGB, precision=jax.lax.Precision.HIGHEST)
  t = xyz / _D65_WHITE
  # jnp.cbrt of the clamped value: the other branch is selected where t is small or negative.
  f = jnp.where(t > 0.008856, jnp.cbrt(jnp.maximum(t, 0.008856)), 7.787 * t + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _to_unit_rgb(images: jax.Array) -> jax.Array:
  """uint8/uint16 or float images [..., C] (C in 1, 3, 4) -> float32 RGB [..., 3] in [0, 1]."""
  c = images.shape[-1]
  if c == 1:
    images = jnp.repeat(images, 3, axis=-1)
  elif c == 4:
    images = images[..., :3]  # alpha dropped, as PIL's convert("RGB")
  elif c != 3:
    raise ValueError(f"images have {c} channels on the last axis (shape {images.shape}); expected "
                     "3 (RGB), 1 (grayscale) or 4 (RGBA)")
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / float(jnp.iinfo(images.dtype).max)
  return images.astype(jnp.float32)


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian over axes 0 and 1 of [H, W, C], as scipy.ndimage (reflect, truncate 4)."""
  radius = int(4.0 * sigma + 0.5)
  if radius == 0:
    return x
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  for axis in (0, 1):
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    # scipy's "reflect" is numpy's "symmetric"; repeat padding for kernels wider than the image.
    xp = x
    while xp.shape[axis] < n + 2 * radius:
      need = min(n + 2 * radius - xp.shape[axis], 2 * xp.shape[axis])
      grow = [(0, 0)] * x.ndim
      grow[axis] = (-(-need // 2), need // 2)
      xp = jnp.pad(xp, grow, mode="symmetric")
    off = (xp.shape[axis] - (n + 2 * radius)) // 2
    xp = jax.lax.slice_in_dim(xp, off, off + n + 2 * radius, axis=axis)
    x = sum(float(w) * jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i, w in enumerate(taps))
  return x


def _offsets(radius: int) -> np.ndarray:
  """[K, 2] candidate offsets (di, dj) in row-major order, so ties go to the lower centre id."""
  r = np.arange(-radius, radius + 1)
  return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


def _fold(x: jax.Array, n: int, axis: int) -> jax.Array:
  """Sums the entries at index >= n-1 along `axis` into index n-1 (extra blocks -> last cell)."""
  if x.shape[axis] == n:
    return x
  head = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
  tail = jax.lax.slice_in_dim(x, n - 1, x.shape[axis], axis=axis).sum(axis=axis, keepdims=True)
  return jnp.concatenate([head, tail], axis=axis)


def _slic_single(lab: jax.Array, *, grid: SlicGrid, compactness: float, num_iterations: int,
                 radius: int, window_box: bool) -> jax.Array:
  """SLIC of one Lab image [H, W, 3] float32 -> labels [H, W] int32 in [0, ny * nx)."""
  g = grid
  sy, sx = g.step_y, g.step_x
  hp, wp = g.nby * sy, g.nbx * sx
  offsets = _offsets(radius)
  k = len(offsets)
  inv_s2 = 1.0 / (g.step * g.step)
  inv_m2 = 1.0 / (compactness * compactness)

  # Pixels in block layout [nby, sy, nbx, sx, 3]; padded pixels carry zero weight.
  lab_p = jnp.pad(lab, ((g.pad_top, hp - g.height - g.pad_top),
                        (g.pad_left, wp - g.width - g.pad_left), (0, 0)), mode="edge")
  pix = lab_p.reshape(g.nby, sy, g.nbx, sx, 3)
  ys_np = (np.arange(hp) - g.pad_top).reshape(g.nby, sy)
  xs_np = (np.arange(wp) - g.pad_left).reshape(g.nbx, sx)
  valid = jnp.asarray(((ys_np >= 0) & (ys_np < g.height))[:, :, None, None]
                      & ((xs_np >= 0) & (xs_np < g.width))[None, None], jnp.float32)
  ys = jnp.asarray(ys_np, jnp.float32)
  xs = jnp.asarray(xs_np, jnp.float32)

  # Candidate k of cell (i, j) is centre (i + di_k, j + dj_k); static validity [ny, nx, K].
  ci = np.arange(g.ny)[:, None, None] + offsets[None, None, :, 0]
  cj = np.arange(g.nx)[None, :, None] + offsets[None, None, :, 1]
  cand_ok = (ci >= 0) & (ci < g.ny) & (cj >= 0) & (cj < g.nx)
  cand_id = np.where(cand_ok, ci * g.nx + cj, 0).astype(np.int32)
  row_of_block = np.minimum(np.arange(g.nby), g.ny - 1)
  col_of_block = np.minimum(np.arange(g.nbx), g.nx - 1)
  cand_penalty = jnp.asarray(np.where(cand_ok, 0.0, np.inf)[row_of_block][:, col_of_block],
                             jnp.float32)                                     # [nby, nbx, K]
  cand_id_blocks = jnp.asarray(cand_id[row_of_block][:, col_of_block])        # [nby, nbx, K]

  def candidates(centres):
    """[ny, nx, 5] centres -> [nby, nbx, K, 5] the candidate centres of every block."""
    cp = jnp.pad(centres, ((radius, radius), (radius, radius), (0, 0)))
    cand = jnp.stack([cp[radius + di:radius + di + g.ny, radius + dj:radius + dj + g.nx]
                      for di, dj in offsets], axis=2)
    return cand[row_of_block][:, col_of_block]

  def assign(centres, colour_weight, prev_slot):
    """Index in [0, K) of each pixel's nearest candidate, [nby, sy, nbx, sx]."""
    cand = candidates(centres)
    dy = ys[:, :, None, None, None] - cand[:, None, :, None, :, 0]            # [nby, sy, nbx, 1, K]
    dx = xs[None, None, :, :, None] - cand[:, None, :, None, :, 1]            # [nby, 1, nbx, sx, K]
    d_col = jnp.sum((pix[..., None, :] - cand[:, None, :, None, :, 2:]) ** 2, axis=-1)
    dist = (dy * dy + dx * dx) * inv_s2 + colour_weight * inv_m2 * d_col
    penalty = cand_penalty[:, None, :, None, :]
    if window_box:
      # skimage's window: centre (cy, cx) reaches rows int(cy - 2 sy) .. int(cy + 2 sy + 1) - 1.
      cy, cx = cand[:, None, :, None, :, 0], cand[:, None, :, None, :, 1]
      in_y = (ys[:, :, None, None, None] >= jnp.trunc(cy - 2 * sy)) & (
          ys[:, :, None, None, None] < jnp.trunc(cy + 2 * sy + 1))
      in_x = (xs[None, None, :, :, None] >= jnp.trunc(cx - 2 * sx)) & (
          xs[None, None, :, :, None] < jnp.trunc(cx + 2 * sx + 1))
      penalty = jnp.where(in_y & in_x, penalty, jnp.inf)
    dist = dist + penalty
    slot = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    # A pixel outside every candidate's window keeps its label, as in skimage.
    return jnp.where(jnp.isfinite(jnp.min(dist, axis=-1)), slot, prev_slot)

  def update(slot, centres):
    """Means of [y, x, L, a, b] over each centre's pixels; empty centres stay where they were."""
    onehot = (slot[..., None] == jnp.arange(k)).astype(jnp.float32) * valid[..., None]
    feats = jnp.concatenate([
        jnp.ones_like(pix[..., :1]),
        jnp.broadcast_to(ys[:, :, None, None, None], pix.shape[:-1] + (1,)),
        jnp.broadcast_to(xs[None, None, :, :, None], pix.shape[:-1] + (1,)),
        pix], axis=-1)                                                      # [nby, sy, nbx, sx, 6]
    sums = jnp.einsum("asbtk,asbtf->abkf", onehot, feats,
                      precision=jax.lax.Precision.HIGHEST)                  # [nby, nbx, K, 6]
    sums = _fold(_fold(sums, g.ny, 0), g.nx, 1)                             # [ny, nx, K, 6]
    sp = jnp.pad(sums, ((radius, radius), (radius, radius), (0, 0), (0, 0)))
    # Centre (i, j) collects slot k of cell (i - di_k, j - dj_k).
    total = sum(sp[radius - di:radius - di + g.ny, radius - dj:radius - dj + g.nx, idx]
                for idx, (di, dj) in enumerate(offsets))                    # [ny, nx, 6]
    count = total[..., :1]
    return jnp.where(count > 0, total[..., 1:] / jnp.maximum(count, 1.0), centres)

  gy = g.start_y + g.step_y * np.arange(g.ny)
  gx = g.start_x + g.step_x * np.arange(g.nx)
  centres0 = jnp.asarray(np.concatenate([
      np.broadcast_to(gy[:, None, None], (g.ny, g.nx, 1)),
      np.broadcast_to(gx[None, :, None], (g.ny, g.nx, 1)),
      np.zeros((g.ny, g.nx, 3))], axis=-1), jnp.float32)

  # The nearest grid node is always a candidate inside its window, so prev_slot is never used here.
  slot = assign(centres0, 0.0, jnp.full(valid.shape, k // 2, jnp.int32))

  def body(_, carry):
    slot, centres = carry
    centres = update(slot, centres)
    return assign(centres, 1.0, slot), centres

  slot, _ = jax.lax.fori_loop(0, num_iterations - 1, body, (slot, centres0))
  # Slot -> centre id, back to image layout, padding cropped.
  labels = jnp.take_along_axis(
      jnp.broadcast_to(cand_id_blocks[:, None, :, None, :], slot.shape + (k,)),
      slot[..., None], axis=-1)[..., 0]
  labels = labels.reshape(hp, wp)
  return labels[g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]


def _check_options(n_segments, compactness, num_iterations, sigma, radius):
  if n_segments < 1:
    raise ValueError(f"n_segments={n_segments} must be >= 1")
  if not compactness > 0:
    raise ValueError(f"compactness={compactness} must be > 0")
  if num_iterations < 1:
    raise ValueError(f"num_iterations={num_iterations} must be >= 1")
  if sigma < 0:
    raise ValueError(f"sigma={sigma} must be >= 0")
  if radius < 1:
    raise ValueError(f"radius={radius} must be >= 1 (1 is SLIC's 3x3 neighbourhood)")


@functools.partial(jax.jit, static_argnames=("n_segments", "compactness", "num_iterations",
                                             "sigma", "radius", "window_box", "rescale"))
def slic(images: jax.Array, *, n_segments: int, compactness: float = 10.0,
         num_iterations: int = 10, sigma: float = 0.0, radius: int = 1,
         window_box: bool = True, rescale: bool = True) -> jax.Array:
  """Device SLIC superpixels.

  Args:
    images: [..., H, W, C] RGB (C=3; C=1 grayscale and C=4 RGBA are accepted as in the host
      back end), uint8/uint16 or float in [0, 1].
    n_segments: requested number of superpixels (static); the grid has
      `num_centres(H, W, n_segments)` centres, as skimage's.
    compactness: colour/space balance (skimage's meaning; higher = squarer superpixels).
    num_iterations: number of assignments (skimage's `max_num_iter`), static.
    sigma: Gaussian smoothing of the Lab image, in pixels (0 = none, skimage's default).
    radius: candidate neighbourhood of grid cells per pixel: 1 = 3x3 (default), 2 = 5x5.
    window_box: also apply skimage's window (a centre reaches pixels within 2 grid steps on each
      axis; a pixel no candidate reaches keeps its previous label).
    rescale: rescale each image to [0, 1] by its min and max first, as skimage does.

  Returns:
    [..., H, W] int32 labels in `[0, num_centres(H, W, n_segments))`. Not every id need occur and
    a superpixel need not be connected (no connectivity pass; see module docstring).
  """
  _check_options(n_segments, compactness, num_iterations, sigma, radius)
  if images.ndim < 3:
    raise ValueError(f"images must be [..., H, W, C]; got shape {images.shape}")
  lead = images.shape[:-3]
  h, w = images.shape[-3:-1]
  grid = slic_grid(h, w, n_segments)
  rgb = _to_unit_rgb(images).reshape((-1, h, w, 3))
  if rescale:
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    rgb = jnp.where(hi > lo, (rgb - lo) / jnp.where(hi > lo, hi - lo, 1.0), rgb - lo)
  lab = rgb_to_lab(rgb)
  if sigma > 0:
    lab = jax.vmap(lambda x: _gaussian_blur(x, sigma))(lab)
  fn = functools.partial(_slic_single, grid=grid, compactness=float(compactness),
                         num_iterations=int(num_iterations), radius=int(radius),
                         window_box=bool(window_box))
  return jax.vmap(fn)(lab).reshape(lead + (h, w))
