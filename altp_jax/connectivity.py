"""Optional host connectivity pass for device superpixels (NumPy + scikit-image, not jittable).

The device SLIC (`altp_jax.slic_device.slic`) has no connectivity pass: a label may cover several
disconnected pieces. `enforce_connectivity` does what skimage's SLIC does afterwards: every
4-connected piece becomes its own segment, and pieces smaller than `min_size_factor` times the
mean segment size are merged into a neighbour. Differences from skimage's fix-up: a small piece
joins the neighbour it shares the longest border with (skimage: the last neighbour its flood fill
touched), and an optional `max_segments` bound merges the smallest pieces until it holds, so the
output keeps the static id range `[0, G_max)` of the ALTP contract.
"""

from __future__ import annotations

import numpy as np


def _adjacency(comp: np.ndarray, n: int) -> np.ndarray:
  """[n, n] count of 4-neighbour pixel pairs between components (symmetric, zero diagonal)."""
  pairs = [(comp[1:, :], comp[:-1, :]), (comp[:, 1:], comp[:, :-1])]
  adj = np.zeros((n, n), np.int64)
  for a, b in pairs:
    diff = a != b
    np.add.at(adj, (a[diff], b[diff]), 1)
  return adj + adj.T


def _consecutive(labels: np.ndarray) -> np.ndarray:
  """Renumbers ids to 0..n-1 in raster order of first appearance."""
  ids, first = np.unique(labels.ravel(), return_index=True)
  remap = np.zeros(ids.max() + 1, np.int32)
  remap[ids[np.argsort(first)]] = np.arange(len(ids), dtype=np.int32)
  return remap[labels]


def _enforce_single(labels: np.ndarray, min_size: int, max_segments: int | None) -> np.ndarray:
  from skimage.measure import label as connected_components

  # background=-1 never occurs, so every pixel belongs to a component of equal labels.
  comp = connected_components(labels, connectivity=1, background=-1) - 1
  while True:
    comp = _consecutive(comp)
    n = int(comp.max()) + 1
    sizes = np.bincount(comp.ravel(), minlength=n)
    order = np.argsort(sizes, kind="stable")
    to_merge = [int(c) for c in order if sizes[c] < min_size]
    if max_segments is not None and n - len(to_merge) > max_segments:
      to_merge = [int(c) for c in order[:n - max_segments]]
    if n == 1 or not to_merge:
      return comp
    adj = _adjacency(comp, n)
    parent = np.arange(n)

    def find(c):
      while parent[c] != c:
        c = parent[c]
      return c

    for c in to_merge:  # smallest first
      if not adj[c].any():
        continue
      target = find(int(np.argmax(adj[c])))
      if target != find(c):
        parent[find(c)] = target
    roots = np.array([find(c) for c in range(n)])
    if np.array_equal(roots, np.arange(n)):
      return comp  # nothing could merge (cannot happen for a connected image grid)
    comp = roots[comp]


def enforce_connectivity(labels, *, num_centres: int | None = None, min_size_factor: float = 0.5,
                         max_segments: int | None = None) -> np.ndarray:
  """Makes every superpixel one 4-connected region, merging pieces that are too small.

  Args:
    labels: [..., H, W] int superpixel ids (e.g. from `slic_device.slic`, moved to the host).
    num_centres: the number of SLIC centres; the minimum size is
      `int(min_size_factor * H * W / num_centres)` (skimage's rule). Default: the number of
      distinct ids in each image.
    min_size_factor: skimage's `min_size_factor`.
    max_segments: if given, the smallest segments are also merged until at most this many remain.

  Returns:
    [..., H, W] int32 labels, consecutive ids in raster order of first appearance, each a
    4-connected region.
  """
  labels = np.asarray(labels)
  if labels.ndim < 2:
    raise ValueError(f"labels must be [..., H, W]; got shape {labels.shape}")
  if max_segments is not None and max_segments < 1:
    raise ValueError(f"max_segments={max_segments} must be >= 1")
  h, w = labels.shape[-2:]
  flat = labels.reshape((-1, h, w))
  out = np.empty(flat.shape, np.int32)
  for i, lab in enumerate(flat):
    g = num_centres if num_centres is not None else len(np.unique(lab))
    if g < 1:
      raise ValueError(f"num_centres={g} must be >= 1")
    out[i] = _enforce_single(lab, int(min_size_factor * h * w / g), max_segments)
  return out.reshape(labels.shape)
