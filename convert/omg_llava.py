"""OMG-LLaVA conversion: five release files -> one Orbax model directory (convert/writer.py layout).

`python -m convert omg_llava --internlm DIR --omg-llava FILE.pth --omg-seg omg_seg_convl.pth
[--openclip FILE] --class-embed convnext_large_d_320_CocoPanopticOVDataset.pth --out DIR
[--dtype bfloat16]`

The key mapping is data (convert/omg_llava_table.py); this module adds the two readers the
release needs beyond convert/readers.py and the config checks:

- `MergedInternLM2`: the InternLM2 weights as the model sees them, one tensor at a time. It streams
  the base `internlm2-chat-7b/` safetensors and, for each tensor, takes the OMG-LLaVA .pth's
  replacement if there is one (the resized 92548-row `tok_embeddings` / `output`), then adds that
  weight's LoRA pair (`W + alpha / r * B @ A` in float32, convert/lora.py) before the table splits
  the fused wqkv. The base's own embedding and head are never read. Problems (unpaired or
  misshapen LoRA factors, a LoRA target the base lacks, a missing replacement, two keys replacing
  the same weight) are collected and reported with the pipeline's other problems.
- `ClassEmbedFile`: the class-embedding `.pth`, one tensor [133, P, 768] saved bare, read as the
  single key `class_embed`.

Memory: one tensor at a time, plus the group being written (at most one LLM layer), plus the
merge of the 92548 x 4096 head (a 1.5 GB float32 product). The `.pth` files are memory-mapped
and every page read is dropped again, so a 7B conversion fits a 24 GB machine.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import pickle
import time
from typing import Callable, Iterator, Mapping

import numpy as np

from convert.lora import DEFAULT_LORA_ALPHA, lora_scale, merge_lora, pair_lora_keys
from convert.readers import Checkpoint, CheckpointError, TensorInfo, _drop_pages, torch_to_numpy
from models.llama.config import LlamaConfig
from models.llama.internlm2_params import OMG_LLM_PREFIX

# OMG_LLaVA._add_special_tokens adds [SEG], <p>, </p>, <region> before resizing the embedding.
ADDED_TOKENS = 4
_FLOAT = ("bfloat16", "float16", "float32", "float64")
# Replacements the release .pth must carry (HF names): trained fully, resized to the new vocab.
REPLACED = ("model.tok_embeddings.weight", "output.weight")
# The shipped config's dynamic-NTK entry; XTuner swaps in plain RoPE, so it is ignored (§1.6).
ACCEPTED_ROPE_SCALING = ({"type": "dynamic", "factor": 2.0},
                         {"rope_type": "dynamic", "factor": 2.0})


class MergedInternLM2:
  """InternLM2 base weights with OMG-LLaVA's replacements and merged LoRA, under HF names.

  A checkpoint for `convert.pipeline`: `path`, `metadata()` (shapes after replacement and
  merging; merged weights are float32), `iter_tensors(want)` and `problems()`.

  Args:
    base: the internlm2-chat-7b checkpoint (HF names).
    omg: the OMG-LLaVA .pth; only its keys under `prefix` are read here.
    alpha: LoRA alpha (the scale is alpha / r, r read from each lora_A).
  """

  def __init__(self, base: Checkpoint, omg: Checkpoint, alpha: float = DEFAULT_LORA_ALPHA,
               prefix: str = OMG_LLM_PREFIX):
    self.base, self.omg, self.alpha, self.prefix = base, omg, alpha, prefix
    self.path = f"{base.path} + {os.path.basename(omg.path)}[{prefix}*]"
    self._meta: dict[str, TensorInfo] | None = None
    self._problems: list[str] = []
    self.pairs: dict[str, tuple[str, str]] = {}
    self.overrides: dict[str, str] = {}

  def _scan(self) -> None:
    base_meta, omg_meta = self.base.metadata(), self.omg.metadata()
    name = os.path.basename(self.omg.path)
    llm_keys = [k for k in omg_meta if k.startswith(self.prefix)]
    pairs, errors = pair_lora_keys(llm_keys, self.prefix, "default")
    problems = [f"{name}: {e}" for e in errors]
    overrides: dict[str, str] = {}
    for key in llm_keys:
      if ".lora_" in key:
        continue
      hf = key[len(self.prefix):].replace(".base_layer.", ".")
      if hf in overrides:
        problems.append(f"{name}: {overrides[hf]!r} and {key!r} both replace {hf!r}")
        continue
      overrides[hf] = key
    for hf in REPLACED:
      if hf not in overrides:
        alt = (f" or {self.prefix}{hf[:-len('.weight')]}.base_layer.weight"
               if hf == "output.weight" else "")
        have = base_meta.get(hf)
        problems.append(
            f"{name}: no {self.prefix}{hf}{alt}: the release .pth carries the resized "
            f"({ADDED_TOKENS} added tokens) version that replaces the base's"
            + (f" {have.shape}" if have is not None else ""))
    meta = dict(base_meta)
    meta.update({hf: omg_meta[k] for hf, k in overrides.items()})
    for hf, (a_key, b_key) in pairs.items():
      a, b = omg_meta[a_key], omg_meta[b_key]
      if hf not in meta:
        problems.append(f"{name}: {a_key!r} / {b_key!r}: LoRA target {hf!r} is neither in the "
                        f"base checkpoint nor replaced by the .pth")
        continue
      w = meta[hf]
      bad_dtype = [f"{k!r} is {i.dtype}" for k, i in ((a_key, a), (b_key, b))
                   if i.dtype not in _FLOAT]
      if bad_dtype:
        problems.append(f"{name}: LoRA factors must be float: {', '.join(bad_dtype)}")
        continue
      if (len(a.shape) != 2 or len(b.shape) != 2 or len(w.shape) != 2 or a.shape[0] < 1
          or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or b.shape[1] != a.shape[0]):
        problems.append(f"{name}: LoRA shapes do not chain for {hf!r} {w.shape} (out, in): "
                        f"{a_key!r} {a.shape} should be (r, {w.shape[-1] if w.shape else '?'}), "
                        f"{b_key!r} {b.shape} should be ({w.shape[0] if w.shape else '?'}, r)")
        continue
      meta[hf] = TensorInfo(tuple(w.shape), "float32", w.file)   # merged in float32
    self.pairs = pairs
    self.overrides = overrides
    self._problems = problems
    self._meta = meta

  def metadata(self) -> dict[str, TensorInfo]:
    if self._meta is None:
      self._scan()
    return self._meta

  def problems(self) -> list[str]:
    self.metadata()
    return list(self._problems)

  def iter_tensors(self, want: Callable[[str], bool] | None = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, array) one at a time: base tensors in file order (LoRA merged in float32), then
    the replacements (merged too when they have a pair)."""
    if self._problems or self._meta is None:
      raise CheckpointError(f"{self.path}: not converted (problems: {self.problems()})")
    take = (lambda k: True) if want is None else want
    omg_files = {self.omg.metadata()[k].file for ab in self.pairs.values() for k in ab}
    omg_files |= {self.omg.metadata()[k].file for k in self.overrides.values()}
    if len(omg_files) > 1:
      raise CheckpointError(f"{self.omg.path}: LLM keys spread over several files")
    sd = self.omg._open_bin(next(iter(omg_files))) if omg_files else {}
    try:
      for key, array in self.base.iter_tensors(
          want=lambda k: k not in self.overrides and take(k)):
        if key in self.pairs:
          array = self._merge(key, array, sd)
        yield key, array
        del array
      for hf, key in self.overrides.items():
        if not take(hf):
          continue
        t = sd[key]
        array = torch_to_numpy(t)
        if hf in self.pairs:
          array = self._merge(hf, array, sd)
        yield hf, array
        del array
        _drop_pages(t)
        del t
    finally:
      del sd
      gc.collect()

  def _merge(self, key: str, base: np.ndarray, sd: Mapping) -> np.ndarray:
    a_key, b_key = self.pairs[key]
    ta, tb = sd[a_key], sd[b_key]
    a, b = torch_to_numpy(ta), torch_to_numpy(tb)
    try:
      out = merge_lora(base, a, b, lora_scale(a, self.alpha))
    except ValueError as e:   # shapes were checked from the metadata; this is a changed file
      raise CheckpointError(f"merging {a_key!r} / {b_key!r} into {key!r}: {e}") from None
    del a, b
    for t in (ta, tb):
      _drop_pages(t)
    return out


class ClassEmbedFile:
  """The class-embedding `.pth`: one tensor [num_classes, P, dim] (torch.save of a bare tensor; a
  dict holding exactly one tensor is accepted too), exposed as the single key `class_embed`."""

  KEY = "class_embed"

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if not os.path.isfile(self.path):
      raise CheckpointError(f"{self.path}: no such class-embedding file")
    self._info: TensorInfo | None = None

  def _load(self):
    import torch
    try:
      obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"{self.path}: torch.load(weights_only=True) refused the pickle "
                            f"({first}); expected one saved tensor") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
      raise CheckpointError(f"{self.path}: cannot read as a PyTorch checkpoint (truncated or "
                            f"corrupt?): {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
      tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
      if len(tensors) != 1 or len(obj) != 1:
        raise CheckpointError(f"{self.path}: expected one tensor [num_classes, P, dim], got a dict "
                              f"with keys {sorted(map(str, obj))[:10]}")
      obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
      raise CheckpointError(f"{self.path}: expected one tensor [num_classes, P, dim], got "
                            f"{type(obj).__name__}")
    return obj

  def metadata(self) -> dict[str, TensorInfo]:
    if self._info is None:
      from convert.readers import _dtype_name
      t = self._load()
      self._info = TensorInfo(tuple(t.shape), _dtype_name(t.dtype), self.path)
      del t
    return {self.KEY: self._info}

  def iter_tensors(self, want=None):
    if want is not None and not want(self.KEY):
      return
    t = self._load()
    yield self.KEY, torch_to_numpy(t)
    del t


# ------------------------------------------------------------------------------------------------
# Config checks.

def check_internlm2_config(cfg: Mapping, llm: LlamaConfig, added_tokens: int = ADDED_TOKENS
                           ) -> list[str]:
  """Differences between internlm2-chat-7b's `config.json` and the decoder the model builds.

  The .pth's embedding and head have `added_tokens` more rows than the base vocabulary. The
  dynamic-NTK `rope_scaling` of the shipped config is accepted and ignored (XTuner replaces the
  rotary embedding with plain RoPE); any other scaling is an error.
  """
  problems = []

  def want(field, value, have_default=None, close=False):
    if field not in cfg:
      if have_default is None:
        problems.append(f"{field}: missing (expected {value})")
      return
    got = cfg[field]
    ok = (isinstance(got, (int, float)) and not isinstance(got, bool)
          and math.isclose(float(got), float(value), rel_tol=1e-9)) if close else got == value
    if not ok:
      problems.append(f"{field}: {got!r}, the model expects {value!r}")

  want("hidden_size", llm.hidden_size)
  want("num_hidden_layers", llm.num_layers)
  want("num_attention_heads", llm.num_heads)
  want("num_key_value_heads", llm.num_kv_heads)
  want("intermediate_size", llm.intermediate_size)
  want("vocab_size", llm.vocab_size - added_tokens)
  want("rope_theta", llm.rope_theta, close=True)
  want("rms_norm_eps", llm.rms_norm_eps, close=True)
  want("bias", False, have_default=True)
  want("tie_word_embeddings", False, have_default=True)
  want("hidden_act", "silu", have_default=True)
  want("model_type", "internlm2", have_default=True)
  if cfg.get("num_attention_heads") and cfg.get("hidden_size"):
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim", hd) != llm.head_dim:
      problems.append(f"head_dim: {cfg.get('head_dim', hd)}, the model expects {llm.head_dim}")
  scaling = cfg.get("rope_scaling")
  if scaling is not None and scaling not in ACCEPTED_ROPE_SCALING:
    problems.append(f"rope_scaling: {scaling!r}; only none or the shipped dynamic-NTK "
                    f"{ACCEPTED_ROPE_SCALING[0]} (ignored: XTuner runs plain RoPE) are supported")
  return problems


# ------------------------------------------------------------------------------------------------
# Conversion.

SIZES = ("omg_llava_7b", "tiny")


@dataclasses.dataclass(frozen=True)
class OmgPlan:
  """A validated conversion: the model config, the sources in reading order, the step of every
  source key, the model's variables (path -> (shape, dtype)) and facts for the manifest."""
  config: object
  sources: list
  steps: dict
  expected: dict
  notes: dict


def plan_omg_llava(hf_config: Mapping, base, omg, seg, class_embed, openclip=None, *,
                   dtype: str = "bfloat16", size: str = "omg_llava_7b") -> OmgPlan:
  """Checks every source against the model and maps every key; reads metadata only.

  Args:
    hf_config: internlm2-chat-7b's config.json.
    base, omg, seg, openclip: checkpoints (`convert.readers.Checkpoint` or anything with `path`,
      `metadata()` and, to be converted, `iter_tensors(want)`): internlm2-chat-7b, the OMG-LLaVA
      .pth, omg_seg_convl.pth, the optional OpenCLIP weights.
    class_embed: the class-embedding file (`ClassEmbedFile` or alike, key `class_embed`).
    dtype: the LLM's dtype; size: "omg_llava_7b" or "tiny".
  Raises:
    ConversionError: listing every problem (config fields, LoRA pairing and shapes, unknown,
      missing and misshapen keys of all sources).
  """
  import jax.numpy as jnp

  from convert import omg_llava_table as table
  from convert import pipeline
  from models.omg_llava.config import OMGLLaVAConfig
  from models.omg_llava.modeling import abstract_omg_llava

  if size not in SIZES:
    raise ValueError(f"size {size!r}: expected one of {SIZES}")
  # What sizes the model beyond the named config: P of the class embedding, and whether the .pth
  # has the decoder's `_llm` copies (GCG / refseg fine-tunes) or not (the general fine-tune).
  cls_shape = class_embed.metadata()[ClassEmbedFile.KEY].shape
  p = cls_shape[1] if len(cls_shape) == 3 else 1
  jdt = jnp.dtype(dtype)
  config = (OMGLLaVAConfig.omg_llava_7b(llm_dtype=jdt, llm_param_dtype=jdt, num_class_prototypes=p)
            if size == "omg_llava_7b" else OMGLLaVAConfig.tiny(num_class_prototypes=p, dtype=jdt))
  llm_copies = any(table.is_llm_copy_key(k) for k in omg.metadata())
  if not llm_copies:
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder,
                                                                     llm_decoder=False))
  problems = [f"internlm2 config.json: {e}" for e in check_internlm2_config(hf_config, config.llm)]
  merged = MergedInternLM2(base, omg)
  problems += merged.problems()
  seg_has_backbone = any(k.startswith("backbone.") for k in seg.metadata())
  sources = [
      pipeline.Source("internlm2+lora", merged, table.llm_rules(config.llm)),
      pipeline.Source("omg_llava", omg, table.omg_llava_rules()),
      pipeline.Source("omg_seg", seg, table.omg_seg_rules(with_backbone=seg_has_backbone)),
  ]
  backbone_from = "omg_seg"
  if not seg_has_backbone:
    if openclip is None:
      problems.append(f"omg_seg: {seg.path} has no backbone.* keys and no --openclip file was "
                      "given: the ConvNeXt backbone (backbone.stem.*, backbone.layer1-4.*) has no "
                      "source")
    else:
      sources.append(pipeline.Source("openclip", openclip, table.openclip_rules()))
      backbone_from = "openclip"
  sources.append(pipeline.Source("class_embed", class_embed, table.class_embed_rules()))
  expected = variable_specs(abstract_omg_llava(config))
  steps = pipeline.plan(sources, {q: s for q, (s, _) in expected.items()}, problems)
  notes = {
      "backbone_from": backbone_from,
      "llm_decoder_copies": llm_copies,
      "replaced_from_omg_llava": sorted(merged.overrides),
      "lora_merged": sorted(merged.pairs),
      "lora_alpha": merged.alpha,
      "num_class_prototypes": p,
  }
  return OmgPlan(config, sources, steps, expected, notes)


def convert_omg_llava(internlm_dir: str, omg_llava: str, omg_seg: str, class_embed: str,
                      out_dir: str, *, openclip: str | None = None, dtype: str = "bfloat16",
                      size: str = "omg_llava_7b", overwrite: bool = False,
                      progress: bool = True) -> dict:
  """Converts the OMG-LLaVA release files to an Orbax model directory at `out_dir`.

  `dtype` is the storage (and compute) dtype of the LLM; the vision path and projectors stay
  float32 as in the original (`OMGLLaVAConfig.omg_llava_7b`). Every key, shape and dtype of all
  sources is checked before anything is written (one error lists every problem); the output
  appears only when the conversion succeeded. Returns a small summary.
  """
  from convert import omg_llava_table as table
  from convert import pipeline
  from convert.cli import _close_quietly, _read_json, copy_tokenizer_files, write_model_dir
  from convert.writer import GroupWriter

  t0 = time.time()
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
  hf_cfg = _read_json(os.path.join(internlm_dir, "config.json"))
  plan = plan_omg_llava(hf_cfg, Checkpoint(internlm_dir), Checkpoint(omg_llava),
                        Checkpoint(omg_seg), ClassEmbedFile(class_embed),
                        None if openclip is None else Checkpoint(openclip), dtype=dtype, size=size)
  if openclip is not None and plan.notes["backbone_from"] != "openclip":
    logging.warning("omg_seg_convl.pth has backbone.* keys: --openclip %s is not read", openclip)
  steps = plan.steps
  # The .pth's LLM keys are read through the merged source, not skipped: leave them off the list.
  skipped = sorted(f"{s}: {k}" for (s, k), st in steps.items()
                   if st is None and not (s == "omg_llava" and k.startswith(OMG_LLM_PREFIX)))

  def fill(tmp: str) -> None:
    writer = GroupWriter(tmp, plan.expected, table.group_of)
    try:
      pipeline.run(plan.sources, steps, writer, progress=progress)
      writer.finish({"model": "omg_llava", "dtype": dtype, "size": size,
                     "sources": {"internlm": os.path.abspath(internlm_dir),
                                 "omg_llava": os.path.abspath(omg_llava),
                                 "omg_seg": os.path.abspath(omg_seg),
                                 "openclip": openclip and os.path.abspath(openclip),
                                 "class_embed": os.path.abspath(class_embed)},
                     **plan.notes,
                     "skipped": skipped})
    except BaseException:
      _close_quietly(writer)
      raise
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(plan.config.to_dict(), f, indent=1)
    with open(os.path.join(tmp, "source_config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=1)
    copy_tokenizer_files(internlm_dir, tmp)

  write_model_dir(out_dir, fill, overwrite=overwrite)
  n = sum(1 for s in steps.values() if s is not None)
  return {"seconds": time.time() - t0, "tensors": n, "skipped": len(skipped),
          "lora_merged": len(plan.notes["lora_merged"]),
          "parameters": int(sum(math.prod(s) for s, _ in plan.expected.values())),
          "out": out_dir, **{k: v for k, v in plan.notes.items() if k != "lora_merged"}}


def variable_specs(model) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
  """Path -> (shape, numpy dtype) of every variable a checkpoint fills (parameters and the
  class-embedding buffer)."""
  from flax import nnx
  out = {}
  for path, var in nnx.state(model).flat_state():
    value = var.get_value()
    out[path] = (tuple(value.shape), np.dtype(value.dtype))
  return out
