"""Read PyTorch / Hugging Face checkpoints one tensor at a time.

Supported layouts (a directory, or a single file):
- `model.safetensors.index.json` + `*.safetensors` shards, or a single `model.safetensors`;
- `pytorch_model.bin.index.json` + `*.bin` shards (the GLaMM release), or a single `pytorch_model.bin`.

`.bin` files are opened with `torch.load(map_location="cpu", weights_only=True, mmap=True)`:
weights_only refuses pickles that would run code, and mmap leaves the data on disk until a tensor
is touched. Shards are visited one after the other and each is closed (unmapped) before the next is
opened, so the resident set holds at most one shard's pages plus what the caller keeps.

`metadata()` reads every key's shape and dtype without touching tensor data (pickle / header
only), so a converter can validate the whole checkpoint before writing anything.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pickle
from typing import Callable, Iterator

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Shape and dtype (numpy name, e.g. "bfloat16", "float32") of one stored tensor."""
  shape: tuple[int, ...]
  dtype: str
  file: str


_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def torch_to_numpy(t) -> np.ndarray:
  """A torch CPU tensor as a numpy array without widening: bfloat16 becomes `ml_dtypes.bfloat16`.

  Shares memory with the tensor when possible (an mmap-backed tensor stays on disk until read).
  """
  import torch  # local: torch is only needed for conversion
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _dtype_name(torch_dtype) -> str:
  import torch
  if torch_dtype == torch.bfloat16:
    return "bfloat16"
  return str(torch.empty((), dtype=torch_dtype).numpy().dtype)


class Checkpoint:
  """An ordered list of checkpoint files, each holding a flat `name -> tensor` dict.

  Args:
    path: a directory in one of the layouts above, or a single `.bin` / `.pt` / `.pth` /
      `.safetensors` file.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.index: dict[str, str] | None = None   # key -> file from an index json
    if os.path.isdir(self.path):
      self.files = self._files_in_dir(self.path)
    elif os.path.isfile(self.path):
      self.files = [self.path]
    else:
      raise CheckpointError(f"{self.path}: no such checkpoint file or directory")
    self._metadata: dict[str, TensorInfo] | None = None

  def _files_in_dir(self, d: str) -> list[str]:
    for name in _INDEX_FILES:
      p = os.path.join(d, name)
      if os.path.exists(p):
        try:
          with open(p) as f:
            weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
          raise CheckpointError(f"{p}: not a valid index file (needs a 'weight_map' object): "
                                f"{e}") from e
        files = list(dict.fromkeys(weight_map.values()))   # first-seen order, deduplicated
        missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
        if missing:
          raise CheckpointError(f"{p}: shard file(s) listed in the index are missing: {missing}")
        self.index = {k: os.path.join(d, v) for k, v in weight_map.items()}
        return [os.path.join(d, f) for f in sorted(files)]   # shard names sort in order
    for name in _SINGLE_FILES:
      p = os.path.join(d, name)
      if os.path.isfile(p):
        return [p]
    raise CheckpointError(f"{d}: no checkpoint found (looked for {', '.join(_INDEX_FILES)}, "
                          f"{', '.join(_SINGLE_FILES)})")

  # -- reading ------------------------------------------------------------------------------------

  @staticmethod
  def _is_safetensors(file: str) -> bool:
    return file.endswith(".safetensors")

  def _open_bin(self, file: str) -> dict:
    import torch
    try:
      sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"{file}: torch.load(weights_only=True) refused the pickle ({first}). Only plain "
          "state dicts of tensors are accepted: an arbitrary pickle can run code when loaded."
      ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
      raise CheckpointError(f"{file}: cannot read as a PyTorch zip checkpoint (truncated or "
                            f"corrupt?): {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
      sd = sd["state_dict"]
    if not isinstance(sd, dict):
      raise CheckpointError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
      raise CheckpointError(f"{file}: entries that are not (str -> tensor): {bad[:20]}")
    return sd

  def _file_metadata(self, file: str) -> dict[str, TensorInfo]:
    if self._is_safetensors(file):
      from safetensors import safe_open
      out = {}
      try:
        with safe_open(file, framework="pt") as f:
          for k in f.keys():
            s = f.get_slice(k)
            out[k] = TensorInfo(tuple(s.get_shape()), _safetensors_dtype(s.get_dtype()), file)
      except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read safetensors header (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
      return out
    sd = self._open_bin(file)
    out = {k: TensorInfo(tuple(v.shape), _dtype_name(v.dtype), file) for k, v in sd.items()}
    del sd
    gc.collect()
    return out

  def metadata(self) -> dict[str, TensorInfo]:
    """Every key's shape, dtype and file, without reading tensor data. Checks the index against
    the shards (keys listed but absent, or present in a shard the index does not name)."""
    if self._metadata is None:
      meta: dict[str, TensorInfo] = {}
      dup: list[str] = []
      for file in self.files:
        for k, info in self._file_metadata(file).items():
          if k in meta:
            dup.append(f"{k} (in {os.path.basename(meta[k].file)} and {os.path.basename(file)})")
          meta[k] = info
      errors = [f"key stored twice: {d}" for d in dup]
      if self.index is not None:
        for k, f in self.index.items():
          if k not in meta:
            errors.append(f"{k}: listed in the index for {os.path.basename(f)} but not stored there")
          elif meta[k].file != f:
            errors.append(f"{k}: index says {os.path.basename(f)}, found in "
                          f"{os.path.basename(meta[k].file)}")
        errors += [f"{k}: stored in {os.path.basename(meta[k].file)} but not in the index"
                   for k in meta if k not in self.index]
      if errors:
        raise CheckpointError(f"{self.path}: {len(errors)} inconsistencies between the index and "
                              "the shards:\n  " + "\n  ".join(errors))
      self._metadata = meta
    return self._metadata

  def iter_tensors(self, want: Callable[[str], bool] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) for every stored tensor (or those `want(key)` accepts: the others are never
    read), file by file, one tensor at a time.

    The arrays may be views of memory-mapped file data: copy or transform them before the next
    file is opened (the previous file is unmapped then).
    """
    for file in self.files:
      if self._is_safetensors(file):
        from safetensors import safe_open
        try:
          with safe_open(file, framework="pt") as f:
            for k in f.keys():
              if want is None or want(k):
                yield k, torch_to_numpy(f.get_tensor(k))
        except CheckpointError:
          raise
        except GeneratorExit:
          raise
        except Exception as e:
          raise CheckpointError(f"{file}: error reading tensors: {type(e).__name__}: {e}") from e
      else:
        sd = self._open_bin(file)
        keys = list(sd)
        for k in keys:
          t = sd.pop(k)
          if want is not None and not want(k):
            continue
          try:
            arr = torch_to_numpy(t)
          except RuntimeError as e:
            raise CheckpointError(f"{file}: cannot read tensor {k!r}: {e}") from e
          yield k, arr
          del arr
          _drop_pages(t)   # the caller has copied what it needs; give the pages back
          del t
        del sd
        gc.collect()   # drop the last references to the mapping so its pages leave the RSS


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def _drop_pages(t) -> None:
  """Unmaps the resident pages of an mmap-backed tensor (madvise DONTNEED), so reading a shard
  does not leave the whole file in this process's RSS. The mapping is private and read-only in
  practice, so a later access would simply fault the same bytes back in from the page cache."""
  try:
    import ctypes
    storage = t.untyped_storage()
    ptr, n = storage.data_ptr(), storage.nbytes()
    if not ptr or n < _PAGE:
      return
    start = ptr & ~(_PAGE - 1)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(ptr + n - start),
                 ctypes.c_int(_MADV_DONTNEED))
  except (OSError, AttributeError):   # not Linux / no libc: only a memory optimisation
    pass


def _safetensors_dtype(name: str) -> str:
  return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool"}.get(name, name.lower())
