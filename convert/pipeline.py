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
  """How one source key is converted: into `paths` (one model path, or several for a split rule,
  in the order the transform returns its arrays) by `rule`; `nbytes` counts source elements."""
  paths: tuple[tuple, ...]
  rule: Rule
  nbytes: int

  @property
  def path(self) -> tuple:
    """The model path of a one-to-one step."""
    if len(self.paths) != 1:
      raise AttributeError(f"a split step has several paths: {self.paths}")
    return self.paths[0]


def _shapes_after(rule: Rule, shape: tuple[int, ...], targets: tuple[tuple[int, ...], ...]
                  ) -> tuple[tuple[int, ...], ...]:
  """The shape(s) `rule.transform` produces, computed on a zero-stride array (nothing allocated)."""
  dummy = np.broadcast_to(np.zeros((), np.float32), shape)
  if rule.split:
    out = rule.transform(dummy, targets)
    if not isinstance(out, tuple) or len(out) != len(targets):
      raise ValueError(f"split transform returned {type(out).__name__}, expected a tuple of "
                       f"{len(targets)} arrays")
    return tuple(tuple(o.shape) for o in out)
  return (tuple(rule.transform(dummy, targets[0]).shape),)


def plan(sources: Sequence[Source], expected: dict[tuple, tuple[int, ...]],
         problems: Sequence[str] = ()) -> dict[tuple[str, str], Step | None]:
  """Maps every (source name, key) to a Step (or None for a deliberate skip).

  `problems`: errors the caller already found (e.g. a source's own consistency checks); they are
  reported in the same error, first.

  Raises:
    ConversionError: listing all unknown keys, keys mapping to no parameter, parameters filled
      twice, non-float tensors, shape mismatches, and parameters no key fills.
  """
  errors: list[str] = list(problems)
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
      paths = mapped[0] if mapped[1].split else (mapped[0],)
      rule = mapped[1]
      target = ", ".join(path_str(p) for p in paths)
      bad = False
      for path in paths:
        if path not in expected:
          errors.append(f"{where} -> {path_str(path)}: the model has no such parameter")
          bad = True
        elif path in filled:
          errors.append(f"{where} -> {path_str(path)}: already filled by {filled[path]}")
          bad = True
        else:
          filled[path] = f"{src.name}: {key}"
      if bad:
        continue
      if info.dtype not in _FLOAT_DTYPES:
        errors.append(f"{where} -> {target}: dtype {info.dtype} is not a float type")
        continue
      want = tuple(tuple(expected[p]) for p in paths)
      shown = want if rule.split else want[0]
      try:
        got = _shapes_after(rule, info.shape, want)
      except ValueError as e:
        errors.append(f"{where} -> {target}: {rule.transform_name} cannot map it to the model's "
                      f"{shown}: {e}")
        continue
      if got != want:
        errors.append(f"{where} -> {target}: shape {got if rule.split else got[0]} after "
                      f"{rule.transform_name}, the model expects {shown}")
        continue
      steps[(src.name, key)] = Step(tuple(paths), rule, int(np.prod(info.shape, dtype=np.int64)))
  for path in sorted(set(expected) - set(filled), key=path_str):
    errors.append(f"model parameter {path_str(path)} {tuple(expected[path])}: no checkpoint key "
                  "fills it (missing key)")
  if errors:
    names = ", ".join(f"{s.name}={s.checkpoint.path}" for s in sources)
    raise ConversionError(f"checkpoint does not match the model ({len(errors)} problems; "
                          f"{names}):\n  " + "\n  ".join(errors))
  return steps


def run(sources: Sequence[Source], steps: dict[tuple[str, str], Step | None],
        writer: GroupWriter, dtype: np.dtype | None = None, progress: bool = True) -> None:
  """Streams every mapped tensor through its transform into `writer`, each output cast to the
  dtype the writer expects for its parameter (`dtype`, if given, must be that dtype everywhere;
  kept for callers that store one dtype)."""
  if dtype is not None:
    other = {str(d) for _, d in writer.expected.values()} - {str(np.dtype(dtype))}
    if other:
      raise ValueError(f"run(dtype={np.dtype(dtype)}) but the writer expects {sorted(other)}")
  total = sum(s.nbytes * np.dtype(writer.expected[s.paths[0]][1]).itemsize
              for s in steps.values() if s is not None)
  with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
            disable=not progress, mininterval=1.0, dynamic_ncols=True) as bar:
    for src in sources:
      for key, array in _mapped_tensors(src, steps):
        step = steps[(src.name, key)]
        shapes = tuple(tuple(writer.expected[p][0]) for p in step.paths)
        outs = step.rule.transform(array, shapes if step.rule.split else shapes[0])
        if not step.rule.split:
          outs = (outs,)
        del array
        bar.set_postfix_str(f"{src.name}: {os.path.basename(key)}"[-48:], refresh=False)
        for path, out in zip(step.paths, outs):
          # One copy: cast + contiguous, off the mmap.
          out = np.array(out, dtype=writer.expected[path][1], order="C")
          writer.add(path, out, f"{src.name}: {key}")
          bar.update(out.nbytes)
          del out
        del outs


def _mapped_tensors(src: Source, steps):
  for key, array in src.checkpoint.iter_tensors(
      want=lambda k: steps.get((src.name, k), 0) is not None):
    if (src.name, key) not in steps:
      raise ConversionError(f"{src.name}: {key} appeared while reading but not in the metadata "
                            "pass (checkpoint changed during conversion?)")
    if steps[(src.name, key)] is not None:
      yield key, array
