"""Merging OMG-LLaVA's LoRA adapters into the InternLM2 base weights (omg_llava.md §1.6, §2.2-2.3).

OMG-LLaVA's `.pth` holds only what was trained: the LoRA factors (adapter name `default` kept in
the key), the resized `tok_embeddings` and `output` (92548 rows, trained fully), the projectors
and, for the GCG/refseg fine-tunes, a copy of the mask decoder. The frozen base LLM comes from the
`internlm2-chat-7b` safetensors under plain HF names. peft's forward for a wrapped linear is

  y = x W^T + scale * (x A^T) B^T,   A = lora_A [r, in], B = lora_B [out, r], scale = alpha / r

(dropout is the identity at inference), so the merged weight is W + scale * B @ A. The release
uses r = 512, alpha = 256: scale 0.5.

Key names (prefix `llm.base_model.model.`):
  <prefix>model.layers.3.attention.wqkv.lora_A.default.weight   [r, in]
  <prefix>model.layers.3.attention.wqkv.lora_B.default.weight   [out, r]
  <prefix>model.layers.3.attention.wqkv.base_layer.weight       (peft >= 0.7 base; the .pth has
                                                                none: the frozen base is not saved)
  <prefix>output.weight or <prefix>output.base_layer.weight     [V, D]
The base key of a LoRA pair is its HF name: `model.layers.3.attention.wqkv.weight`, `output.weight`.

Targets: XTuner's `find_all_linear_names` takes every nn.Linear except `lm_head`/`output_layer`,
i.e. `wqkv, wo, w1, w2, w3` and (EXPECTED, InternLM2's head is named `output`) `output`. Pairs are
taken from whatever the checkpoint holds, so both cases work.

The wqkv factors are merged in the fused layout; the table's split (models/llama/internlm2_params)
is a row selection, so merge-then-split equals split-then-merge.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import numpy as np

from models.llama.internlm2_params import OMG_LLM_PREFIX
from models.param_tables import to_numpy

LORA_TARGET_MODULES: tuple[str, ...] = ("wqkv", "wo", "w1", "w2", "w3", "output")
DEFAULT_LORA_ALPHA = 256.0  # LoraConfig(r=512, lora_alpha=256) in every OMG-LLaVA finetune config

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def lora_scale(lora_a: np.ndarray, alpha: float = DEFAULT_LORA_ALPHA) -> float:
  """peft's scaling alpha / r, with the rank r read from lora_A's shape [r, in]."""
  if np.ndim(lora_a) != 2:
    raise ValueError(f"lora_A must be 2-D [r, in], got shape {np.shape(lora_a)}")
  return float(alpha) / np.shape(lora_a)[0]


def merge_lora(base, lora_a, lora_b, scale: float) -> np.ndarray:
  """W + scale * B @ A for base W [out, in], A [r, in], B [out, r] -> [out, in] **float32**.

  Inputs of any float dtype (numpy, jax or torch, bf16 included) are widened to float32 and the
  product and sum run in float32, so the only rounding to a storage dtype (e.g. bf16) happens once,
  when the merged weight is loaded into the model.
  """
  w, a, b = (np.asarray(to_numpy(t), np.float32) for t in (base, lora_a, lora_b))
  if w.ndim != 2 or a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"merge_lora expects 2-D base [out,in], lora_A [r,in], lora_B [out,r]; got "
                     f"{w.shape}, {a.shape}, {b.shape}")
  if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or b.shape[1] != a.shape[0]:
    raise ValueError(f"merge_lora: shapes do not chain: base {w.shape} (out, in), lora_A {a.shape} "
                     f"(r, in), lora_B {b.shape} (out, r)")
  # In place on the product: one [out, in] temporary (1.5 GB for the 92548 x 4096 head) instead
  # of three; the same float32 operations, so the result is bit-identical to w + scale * (b @ a).
  out = b @ a
  out *= np.float32(scale)
  out += w
  return out


def lora_pairs(keys: Iterable[str], prefix: str = OMG_LLM_PREFIX, adapter: str | None = "default"
               ) -> dict[str, tuple[str, str]]:
  """{HF base key: (lora_A key, lora_B key)} for the LoRA keys among `keys` (others are ignored).

  `model.layers.3.attention.wqkv.weight` <- `<prefix>model.layers.3.attention.wqkv.lora_A.default.weight`
  and its `lora_B`. `adapter=None` accepts keys with or without an adapter name.

  Raises:
    ValueError: listing together every A without a B, B without an A, key with another adapter
      name, LoRA key outside `prefix`, or unreadable `lora_` key.
  """
  pairs, errors = pair_lora_keys(keys, prefix, adapter)
  if errors:
    raise ValueError(f"LoRA keys do not pair up ({len(errors)} problems):\n  "
                     + "\n  ".join(errors))
  return pairs


def pair_lora_keys(keys: Iterable[str], prefix: str = OMG_LLM_PREFIX,
                   adapter: str | None = "default"
                   ) -> tuple[dict[str, tuple[str, str]], list[str]]:
  """`lora_pairs` without raising: (the complete pairs, one message per problem key), for
  converters that report every problem of a checkpoint together."""
  found: dict[str, dict[str, str]] = {}
  errors: list[str] = []
  for key in sorted(keys):
    if ".lora_" not in key:
      continue
    m = _LORA_KEY.fullmatch(key)
    if m is None:
      errors.append(f"{key!r}: not a `<module>.lora_A|B[.<adapter>].weight` key")
      continue
    if adapter is not None and m["adapter"] != adapter:
      errors.append(f"{key!r}: adapter {m['adapter']!r}, expected {adapter!r}")
      continue
    if not m["module"].startswith(prefix):
      errors.append(f"{key!r}: LoRA key outside the LLM prefix {prefix!r}")
      continue
    base = m["module"][len(prefix):] + ".weight"
    slot = found.setdefault(base, {})
    if m["ab"] in slot:
      errors.append(f"{key!r}: second lora_{m['ab']} for {base!r} (also {slot[m['ab']]!r})")
      continue
    slot[m["ab"]] = key
  for base, slot in found.items():
    for have, want in (("A", "B"), ("B", "A")):
      if have in slot and want not in slot:
        errors.append(f"{slot[have]!r}: lora_{have} without lora_{want} (target {base!r})")
  pairs = {base: (slot["A"], slot["B"]) for base, slot in sorted(found.items())
           if "A" in slot and "B" in slot}
  return pairs, errors


def merged_llm_state(base_state: Mapping[str, object], omg_state: Mapping[str, object], *,
                     alpha: float = DEFAULT_LORA_ALPHA, prefix: str = OMG_LLM_PREFIX
                     ) -> Iterator[tuple[str, object]]:
  """The OMG-LLaVA LLM under HF InternLM2 names, one tensor at a time: (key, array).

  `base_state`: the internlm2-chat-7b weights (HF names; values may be lazy, read on access).
  `omg_state`: the OMG-LLaVA `.pth` state_dict (other components' keys are ignored).
  Non-LoRA LLM keys of `omg_state` (`tok_embeddings`, `output`, any `.base_layer.weight`) replace
  the base tensor of the same HF name (the resized 92548-row embedding and head); each LoRA pair is
  merged into its (possibly replaced) base weight (float32, `merge_lora`). Untouched base tensors
  pass through unchanged. Feed the result to `load_state_dict(model, dict(...),
  internlm2_table(cfg))` or a streaming writer.

  Raises:
    ValueError: unpaired LoRA keys (see `lora_pairs`), or a LoRA target missing from the base.
  """
  pairs = lora_pairs(omg_state.keys(), prefix)
  overrides = {}
  for key in omg_state:
    if key.startswith(prefix) and ".lora_" not in key:
      overrides[key[len(prefix):].replace(".base_layer.", ".")] = key
  missing = sorted(k for k in pairs if k not in base_state and k not in overrides)
  if missing:
    raise ValueError(f"LoRA targets with no base weight: {missing}")
  seen = set()
  for key in list(base_state) + [k for k in overrides if k not in base_state]:
    if key in seen:
      continue
    seen.add(key)
    value = omg_state[overrides[key]] if key in overrides else base_state[key]
    if key in pairs:
      a_key, b_key = pairs[key]
      a = to_numpy(omg_state[a_key])
      try:
        value = merge_lora(value, a, omg_state[b_key], lora_scale(a, alpha))
      except ValueError as e:
        raise ValueError(f"merging {a_key!r} / {b_key!r} into {key!r}: {e}") from None
    yield key, value
