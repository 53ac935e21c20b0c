"""Checkpoint-name tables: map a reference (PyTorch/HF) state_dict onto an NNX module's parameters.

A table is data: a tuple of `(pattern, target, transform)` rows.
- `pattern`: a regex that must match the whole source key
  (e.g. `model\\.layers\\.(\\d+)\\.mlp\\.up_proj\\.weight`).
- `target`: the NNX parameter path as a dotted template with regex back-references
  (e.g. `layers.\\1.mlp.up_proj.kernel`); purely numeric parts become list indices. `None` means the
  key is known and deliberately skipped (e.g. recomputed RoPE buffers).
- `transform`: a function `np.ndarray -> np.ndarray` from the source layout to ours (see below).

Split rows (one source tensor -> several parameters, e.g. InternLM2's fused `wqkv` -> q/k/v): the
`target` is a tuple of templates and the `transform` returns a tuple of arrays, one per target, in
the same order. Single-target rows are unaffected.

The first matching row wins. `map_key` serves streaming converters (one tensor at a time);
`load_state_dict` fills a live module in one go (tests, small models) and reports every problem at
once: unmatched keys, unknown targets, shape mismatches, and parameters left unfilled.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

Transform = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, ...]"]
Table = Sequence[tuple[str, "str | tuple[str, ...] | None", Transform]]
Path = tuple["str | int", ...]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_weight(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Dense kernel [in, out]."""
  if x.ndim != 2:
    raise ValueError(f"linear_weight expects a 2-D [out, in] weight, got shape {x.shape}")
  return x.T


def conv_weight(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> NNX Conv kernel [kh, kw, in, out]."""
  if x.ndim != 4:
    raise ValueError(f"conv_weight expects a 4-D [out, in, kh, kw] weight, got shape {x.shape}")
  return x.transpose(2, 3, 1, 0)


def _path(target: str) -> tuple[str | int, ...]:
  return tuple(int(p) if p.isdigit() else p for p in target.split("."))


def _match(key: str, table: Table) -> tuple[tuple[Path, ...], Transform, bool] | None:
  """(target paths, transform, is_split) of the first row matching `key`; None if it skips it."""
  for pattern, target, transform in table:
    m = re.fullmatch(pattern, key)
    if m is None:
      continue
    if target is None:
      return None
    if isinstance(target, tuple):
      return tuple(_path(m.expand(t)) for t in target), transform, True
    return (_path(m.expand(target)),), transform, False
  raise KeyError(f"no conversion rule matches source key {key!r}")


def map_key(key: str, table: Table) -> tuple[Path | tuple[Path, ...], Transform] | None:
  """The NNX path and transform for source `key`; `None` if the table skips it.

  For a split row (tuple target) the first element is the tuple of paths, one per array the
  transform returns.

  Raises:
    KeyError: no row of `table` matches `key`.
  """
  matched = _match(key, table)
  if matched is None:
    return None
  paths, transform, split = matched
  return (paths if split else paths[0]), transform


def to_numpy(value) -> np.ndarray:
  """A host array from a numpy array, a jax array or a torch tensor (bf16 widened to fp32)."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def load_state_dict(model: nnx.Module, tensors: Mapping[str, object], table: Table,
                    *, strict: bool = True) -> None:
  """Copies `tensors` (source key -> array) into `model`'s `nnx.Param`s through `table`, in place.

  Values are cast to each parameter's dtype. With `strict`, every parameter must be filled exactly
  once and every source key must match a row; all problems are raised together as one ValueError.
  """
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  flat = {path: leaf for path, leaf in _flatten(pure)}
  errors: list[str] = []
  filled: set[tuple] = set()
  for key, value in tensors.items():
    try:
      mapped = _match(key, table)
    except KeyError as e:
      if strict:
        errors.append(str(e))
      continue
    if mapped is None:
      continue
    paths, transform, split = mapped
    missing = [p for p in paths if p not in flat]
    if missing:
      errors += [f"{key!r} -> {'.'.join(map(str, p))}: no such parameter in "
                 f"{type(model).__name__}" for p in missing]
      continue
    twice = [p for p in paths if p in filled]
    if twice:
      errors += [f"{key!r} -> {'.'.join(map(str, p))}: parameter filled twice" for p in twice]
      continue
    try:
      out = transform(to_numpy(value))
    except ValueError as e:  # layout transforms reject bad shapes with a ValueError
      errors.append(f"{key!r}: {e}")
      continue
    arrs = out if split else (out,)
    if split and (not isinstance(out, tuple) or len(out) != len(paths)):
      errors.append(f"{key!r}: split transform returned {type(out).__name__} "
                    f"{len(out) if isinstance(out, tuple) else ''}, expected a tuple of "
                    f"{len(paths)} arrays")
      continue
    for path, arr in zip(paths, arrs):
      want = flat[path]
      if tuple(arr.shape) != tuple(want.shape):
        errors.append(f"{key!r} -> {'.'.join(map(str, path))}: shape {tuple(arr.shape)} after "
                      f"transform, parameter has {tuple(want.shape)}")
        continue
      _set(pure, path, jnp.asarray(arr, dtype=want.dtype))
      filled.add(path)
  if strict:
    for path in sorted(set(flat) - filled, key=str):
      errors.append(f"parameter {'.'.join(map(str, path))} {tuple(flat[path].shape)} not filled "
                    "by any source key")
  if errors:
    raise ValueError(f"loading {type(model).__name__} failed ({len(errors)} problems):\n  "
                     + "\n  ".join(errors))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value
