"""Agreement metrics between two segmentations of one image (NumPy, host).

`reference` plays the ground truth (in the SLIC report: the host skimage segmentation), `labels`
the segmentation under test (the device SLIC). All take [H, W] integer label maps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boundaries(labels: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels with a 4-neighbour of another label (both sides of every edge)."""
  labels = np.asarray(labels)
  b = np.zeros(labels.shape, bool)
  dv = labels[1:, :] != labels[:-1, :]
  dh = labels[:, 1:] != labels[:, :-1]
  b[1:, :] |= dv
  b[:-1, :] |= dv
  b[:, 1:] |= dh
  b[:, :-1] |= dh
  return b


def boundary_recall(labels: np.ndarray, reference: np.ndarray, tolerance: int = 2) -> float:
  """Share of the reference's boundary pixels within `tolerance` px (chessboard) of a boundary
  of `labels`. 1.0 when the reference has no boundary."""
  ref_b = boundaries(reference)
  if not ref_b.any():
    return 1.0
  near = ndimage.maximum_filter(boundaries(labels).astype(np.uint8), size=2 * tolerance + 1) > 0
  return float((near & ref_b).sum() / ref_b.sum())


def _contingency(labels, reference):
  _, a = np.unique(np.asarray(labels).ravel(), return_inverse=True)
  _, b = np.unique(np.asarray(reference).ravel(), return_inverse=True)
  table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
  np.add.at(table, (a, b), 1)
  return table  # [segments of labels, segments of reference]


def undersegmentation_error(labels: np.ndarray, reference: np.ndarray) -> float:
  """Neubert & Protzel's corrected under-segmentation error, in [0, 1] (0 = every segment of
  `labels` lies inside one reference segment): mean over pixels of
  sum_ref sum_{s overlapping ref} min(|s & ref|, |s - ref|) / N."""
  table = _contingency(labels, reference)
  sizes = table.sum(axis=1, keepdims=True)
  leak = np.minimum(table, sizes - table)
  return float(leak[table > 0].sum() / table.sum())


def achievable_segmentation_accuracy(labels: np.ndarray, reference: np.ndarray) -> float:
  """Share of pixels labelled right when each segment of `labels` takes its majority reference
  segment (1.0 = `labels` refines `reference`)."""
  table = _contingency(labels, reference)
  return float(table.max(axis=1).sum() / table.sum())


def num_segments(labels: np.ndarray) -> int:
  """Number of distinct ids in use."""
  return int(len(np.unique(labels)))


def jaccard(a, b) -> float:
  """|a & b| / |a | b| of two index sets (1.0 when both are empty)."""
  a, b = set(np.asarray(a).ravel().tolist()), set(np.asarray(b).ravel().tolist())
  return 1.0 if not (a | b) else len(a & b) / len(a | b)
