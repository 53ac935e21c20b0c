"""JSON round trip of the frozen model-config dataclasses (dtypes as names, tuples as lists)."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np


def encode(x):
  """A JSON-ready copy of `dataclasses.asdict(config)`: tuples become lists, dtypes their names."""
  if isinstance(x, dict):
    return {k: encode(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [encode(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return np.dtype(x).name   # a dtype (jnp.float32, jnp.bfloat16, ...)


def decode_dtypes(d: Mapping[str, Any]) -> dict:
  """The `dtype` / `param_dtype` fields of one config dict back to jnp dtypes."""
  return {k: (jnp.dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in d.items()}


def lists_to_tuples(d: Mapping[str, Any]) -> dict:
  """List fields of one config dict back to tuples (frozen dataclasses must stay hashable)."""
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
