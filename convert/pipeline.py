"""Plan and run a streaming conversion: validate every key first, then convert tensor by tensor.

`plan` reads only metadata (key names, shapes, dtypes) and reports every unmatched, missing or
misshapen key in one error, before anything is written. `run` then streams the tensors through
their transforms into a `GroupWriter`; keys that are skipped are never read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from convert.glamm_table import Rule, map_key
from convert.readers import Checkpoint
from convert.writer import GroupWriter, path_str

_FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


class ConversionError(ValueError):
  """The checkpoint does not fit the model; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One checkpoint to read: a name for messages, its reader, rules, and a key normaliser."""
  name: str
  checkpoint: Checkpoint
  rules: Sequence[Rule]
  normalize: Callable[[str], str] = lambda k: k


@dataclasses.dataclass(frozen=True)
class Step:
  path: tuple
  rule: Rule
  nbytes: int


def _shape_after(rule: Rule, shape: tuple[int, ...], dtype: str, target: tuple[int, ...]):
  """The shape `rule.transform` produces, computed on a zero-stride array (nothing allocated)."""
  dummy = np.broadcast_to(np.zeros((), np.float32), shape)
  return tuple(rule.transform(dummy, target).shape)


def plan(sources: Sequence[Source], expected: dict[tuple, tuple[int, ...]]
         ) -> dict[tuple[str, str], Step | None]:
  """Maps every (source name, key) to a Step (or None for a deliberate skip).

  Raises:
    ConversionError: listing all unknown keys, keys mapping to no parameter, parameters filled
      twice, non-float tensors, shape mismatches, and parameters no key fills.
  """
  errors: list[str] = []
  steps: dict[tuple[str, str], Step | None] = {}
  filled: dict[tuple, str] = {}
  for src in sources:
    for key, info in src.checkpoint.metadata().items():
      where = f"{src.name}: {key} {info.shape}"
      try:
        mapped = map_key(src.normalize(key), src.rules)
      except KeyError:
        errors.append(f"{where}: unknown key (no rule maps or skips it)")
        continue
      if mapped is None:
        steps[(src.name, key)] = None
        continue
      path, rule = mapped
      target = path_str(path)
      if path not in expected:
        errors.append(f"{where} -> {target}: the model has no such parameter")
        continue
      if path in filled:
        errors.append(f"{where} -> {target}: already filled by {filled[path]}")
        continue
      filled[path] = f"{src.name}: {key}"
      if info.dtype not in _FLOAT_DTYPES:
        errors.append(f"{where} -> {target}: dtype {info.dtype} is not a float type")
        continue
      want = tuple(expected[path])
      try:
        got = _shape_after(rule, info.shape, info.dtype, want)
      except ValueError as e:
        errors.append(f"{where} -> {target}: {rule.transform_name} cannot map it to the model's "
                      f"{want}: {e}")
        continue
      if got != want:
        errors.append(f"{where} -> {target}: shape {got} after {rule.transform_name}, "
                      f"the model expects {want}")
        continue
      steps[(src.name, key)] = Step(path, rule, int(np.prod(info.shape, dtype=np.int64)))
  for path in sorted(set(expected) - set(filled), key=path_str):
    errors.append(f"model parameter {path_str(path)} {tuple(expected[path])}: no checkpoint key "
                  "fills it (missing key)")
  if errors:
    names = ", ".join(f"{s.name}={s.checkpoint.path}" for s in sources)
    raise ConversionError(f"checkpoint does not match the model ({len(errors)} problems; "
                          f"{names}):\n  " + "\n  ".join(errors))
  return steps


def run(sources: Sequence[Source], steps: dict[tuple[str, str], Step | None],
        writer: GroupWriter, dtype: np.dtype, progress: bool = True) -> None:
  """Streams every mapped tensor through its transform, cast to `dtype`, into `writer`."""
  itemsize = np.dtype(dtype).itemsize
  total = sum(s.nbytes * itemsize for s in steps.values() if s is not None)
  with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
            disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
    for src in sources:
      for key, array in _mapped_tensors(src, steps):
        step = steps[(src.name, key)]
        shape, _ = writer.expected[step.path]
        out = step.rule.transform(array, tuple(shape))
        out = np.array(out, dtype=dtype, order="C")   # one copy: cast + contiguous, off the mmap
        del array
        bar.set_postfix_str(f"{src.name}: {os.path.basename(key)}"[-48:], refresh=False)
        writer.add(step.path, out, f"{src.name}: {key}")
        bar.update(out.nbytes)
        del out


def _mapped_tensors(src: Source, steps):
  for key, array in src.checkpoint.iter_tensors(
      want=lambda k: steps.get((src.name, k), 0) is not None):
    if (src.name, key) not in steps:
      raise ConversionError(f"{src.name}: {key} appeared while reading but not in the metadata "
                            "pass (checkpoint changed during conversion?)")
    if steps[(src.name, key)] is not None:
      yield key, array
