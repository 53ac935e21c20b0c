"""Static argument checks shared by the selection functions.

Everything here runs at trace time on shapes and Python ints, so a bad call fails before any
compilation with a message that names the argument, its value and what was expected.
"""

from __future__ import annotations

import operator

import jax
import numpy as np


def check_k(k, n: int, what: str = "k") -> int:
  """Returns `k` as an int, raising if it is not a Python int in [1, n]."""
  try:
    k = operator.index(k)
  except TypeError:
    raise TypeError(
        f"{what} must be a static Python int (the number of tokens kept), got {type(k).__name__}"
        " — under jit, mark it static (static_argnames) rather than passing a traced value"
    ) from None
  if k <= 0:
    raise ValueError(f"{what}={k} must be >= 1: at least one token has to be kept")
  if k > n:
    raise ValueError(f"{what}={k} exceeds the number of tokens N={n}")
  return k


def check_trailing(name: str, x, n: int, axis_from_end: int = 1):
  """Raises if `x.shape[-axis_from_end]` is not `n`."""
  if x.ndim < axis_from_end or x.shape[x.ndim - axis_from_end] != n:
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected N={n} tokens on axis "
                     f"{-axis_from_end}")


def check_batch(name: str, x, batch_shape: tuple[int, ...], core_ndim: int):
  """Raises if the leading (batch) dims of `x` differ from `batch_shape`."""
  got = tuple(x.shape[: x.ndim - core_ndim])
  if got != tuple(batch_shape):
    raise ValueError(f"{name} has batch shape {got} but the scores have {tuple(batch_shape)}")


def is_concrete(x) -> bool:
  """True when `x` holds values we can inspect now (not a tracer inside jit/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def check_labels_in_range(labels, num_segments: int, name: str = "labels"):
  """Raises on labels outside [0, num_segments) when they are concrete.

  Under jit the values are unknown; the selection functions then clip them into range (documented
  in their docstrings), so a bad label can merge superpixels but never index out of bounds.
  """
  if not is_concrete(labels):
    return
  arr = np.asarray(labels)
  if arr.size == 0:
    return
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= num_segments:
    raise ValueError(f"{name} must lie in [0, {num_segments}); found values in [{lo}, {hi}]")
