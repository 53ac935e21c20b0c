"""Orbax output, one checkpoint per group of parameters, written as soon as a group is complete.

On-disk layout of a converted model directory:

  OUT/
    config.json              the JAX model configuration (`GLaMMConfig.to_dict()`)
    manifest.json            format tag, dtype, sources, and for every group its parameters
                             (path relative to the model, shape, dtype, source key)
    params/<group>/          one Orbax `StandardCheckpointer` checkpoint (OCDBT) per group; its tree
                             is the nested dict of the group's parameters, e.g. group
                             `llm.layers.7` holds {"self_attn": {"q_proj": {"kernel": [D, D]}}, ...}
    tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json (copied)
    source_config.json, clip_config.json   the checkpoints' own config files, for provenance

Groups are the units of streaming: a converter never holds more than the groups still waiting for a
tensor (normally one) plus the one Orbax is writing. Tensors of a group that stays incomplete past
`spill_bytes` (keys far apart in the source files) go to `.npy` files under the output directory
and are memory-mapped back when the group is written, so memory stays bounded in any key order.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp

FORMAT = "altp-jax-orbax-groups/1"
PARAMS_DIR = "params"
MANIFEST = "manifest.json"

Path = tuple  # parameter path: str and int parts, e.g. ("llm", "layers", 7, "mlp", "up_proj", "kernel")


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def nest(flat: Mapping[tuple, object]) -> dict:
  """{("a", 0, "b"): x} -> {"a": {"0": {"b": x}}} (Orbax trees use string keys)."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(str(p), {})
    node[str(path[-1])] = value
  return out


def unnest(tree: Mapping, rel_paths: list[tuple]) -> dict[tuple, object]:
  """Inverse of `nest` for the known relative paths."""
  out = {}
  for rel in rel_paths:
    node = tree
    for p in rel:
      node = node[str(p)]
    out[rel] = node
  return out


class GroupWriter:
  """Collects converted arrays and writes each group as an Orbax checkpoint once it is complete.

  Args:
    out_dir: the (temporary) output directory; must exist.
    expected: parameter path -> (shape, numpy dtype) for every parameter to write.
    group_of: parameter path -> (group name, path within the group).
    spill_bytes: pending (incomplete-group) bytes above which new pending arrays go to disk.
  """

  def __init__(self, out_dir: str, expected: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
               group_of: Callable[[Path], tuple[str, tuple]], *, spill_bytes: int = 1 << 30):
    self.out_dir = os.path.abspath(out_dir)
    self.params_dir = os.path.join(self.out_dir, PARAMS_DIR)
    os.makedirs(self.params_dir, exist_ok=True)
    self.expected = dict(expected)
    self.group_of = group_of
    self.members: dict[str, set[Path]] = {}
    for path in self.expected:
      self.members.setdefault(group_of(path)[0], set()).add(path)
    self.pending: dict[str, dict[Path, np.ndarray]] = {}
    self.pending_bytes = 0
    self.spill_bytes = spill_bytes
    self.spilled = 0
    self.written: dict[str, list[dict]] = {}
    self.sources: dict[Path, str] = {}
    self._checkpointer = ocp.StandardCheckpointer()
    self._in_flight = False

  def add(self, path: Path, array: np.ndarray, source_key: str) -> None:
    """Stores one converted parameter; writes its group when this was the group's last member."""
    shape, dtype = self.expected[path]
    if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
      raise ValueError(f"{path_str(path)}: got {array.shape} {array.dtype}, expected {shape} "
                       f"{np.dtype(dtype)} (converter bug)")
    group = self.group_of(path)[0]
    bucket = self.pending.setdefault(group, {})
    if path in bucket or group in self.written:
      raise ValueError(f"{path_str(path)} written twice (second source key {source_key!r})")
    self.sources[path] = source_key
    if len(bucket) + 1 < len(self.members[group]) and self.pending_bytes > self.spill_bytes:
      array = self._spill(path, array)
    else:
      array = np.ascontiguousarray(array)
    bucket[path] = array
    if not isinstance(array, np.memmap):
      self.pending_bytes += array.nbytes
    if len(bucket) == len(self.members[group]):
      self._write(group)

  def _spill(self, path: Path, array: np.ndarray) -> np.ndarray:
    spill_dir = os.path.join(self.out_dir, "_spill")
    os.makedirs(spill_dir, exist_ok=True)
    file = os.path.join(spill_dir, f"{self.spilled}.npy")
    self.spilled += 1
    mm = np.lib.format.open_memmap(file, mode="w+", dtype=array.dtype, shape=array.shape)
    mm[...] = array
    mm.flush()
    del mm
    return np.load(file, mmap_mode="r")

  def _write(self, group: str) -> None:
    bucket = self.pending.pop(group)
    rel = {self.group_of(p)[1]: a for p, a in bucket.items()}
    # One save in flight at a time: wait for the previous group, so at most two groups are held.
    self._checkpointer.wait_until_finished()
    self._checkpointer.save(os.path.join(self.params_dir, group), nest(rel))
    self.pending_bytes -= sum(a.nbytes for a in bucket.values() if not isinstance(a, np.memmap))
    self.written[group] = [
        {"path": path_str(self.group_of(p)[1]), "shape": list(a.shape), "dtype": str(a.dtype),
         "source": self.sources[p]}
        for p, a in sorted(bucket.items(), key=lambda kv: path_str(kv[0]))]

  def finish(self, extra_manifest: Mapping | None = None) -> None:
    """Waits for the last save, checks every group was written, writes manifest.json."""
    self._checkpointer.wait_until_finished()
    self._checkpointer.close()
    missing = sorted(g for g in self.members if g not in self.written)
    if missing:
      detail = [f"{g}: missing {sorted(path_str(p) for p in self.members[g] - set(self.pending.get(g, {})))}"
                for g in missing]
      raise ValueError("conversion ended with incomplete parameter groups (converter bug):\n  "
                       + "\n  ".join(detail))
    spill_dir = os.path.join(self.out_dir, "_spill")
    if os.path.isdir(spill_dir):
      import shutil
      shutil.rmtree(spill_dir)
    manifest = {"format": FORMAT, **(extra_manifest or {}),
                "groups": {g: self.written[g] for g in sorted(self.written)}}
    with open(os.path.join(self.out_dir, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)

  def close(self) -> None:
    """Releases the checkpointer after a failure (no manifest written)."""
    try:
      self._checkpointer.wait_until_finished()
    finally:
      self._checkpointer.close()
