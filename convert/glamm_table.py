"""The full GLaMM key mapping, as data: part tables composed with GLaMM's prefixes, plus skips.

Sources and where their keys go (model paths are `models.glamm.GLaMM` attribute paths):

  GLaMM checkpoint (`--glamm`)                      -> model path
    model.embed_tokens / model.layers.* / model.norm / lm_head
                                                    -> llm.*          (models/llama/params.py)
    model.mm_projector.*                            -> mm_projector.* (models/projector_params.py)
    model.text_hidden_fcs.*                         -> text_hidden_fcs.*
    model.grounding_encoder.{image_encoder,prompt_encoder,mask_decoder}.*
                                                    -> grounding_encoder.* (models/sam/params.py)
  CLIP checkpoint (`--clip`, openai/clip-vit-large-patch14-336)
    vision_model.* (transformers 4.x / CLIPModel) or the same names without the prefix
    (a CLIPVisionModel saved by transformers 5.x)   -> vision_tower.* (models/clip/params.py)

Skipped on purpose (GLAMM_SKIPS / the part tables' `None` rows):
  model.region_encoder.*       GPT4RoI region encoder: only used with boxes, never in GCG (§1.8)
  model.layers.*.self_attn.rotary_emb.inv_freq   RoPE buffers, recomputed (theta 10000)
  model.vision_tower.*         CLIP is read from the CLIP repo (the release drops these keys, §2.2)
  text_model.*, visual_projection, text_projection, logit_scale, embeddings.position_ids (CLIP)

Every other key must map to exactly one model parameter, and every parameter must be filled.

Rows are `Rule(pattern, target, transform)`; `transform(array, target_shape) -> array` in our layout.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from models.clip.params import HF_CLIP_VISION_TABLE
from models.llama.params import HF_LLAMA_TABLE
from models.projector_params import MM_PROJECTOR_TABLE, TEXT_HIDDEN_FCS_TABLE
from models.sam import params as sam_params

Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row: keys matching `pattern` go to `target` through `transform(array, target_shape)`.

  A tuple `target` is a split row (one key -> several parameters, e.g. InternLM2's fused wqkv):
  `transform(array, (shape, ...))` then returns a tuple of arrays, one per target, in order.
  """
  pattern: re.Pattern
  target: str | tuple[str, ...] | None   # template(s) with \1-style references; None = skip
  transform: Transform | None
  transform_name: str = ""

  @property
  def split(self) -> bool:
    return isinstance(self.target, tuple)


def _from_param_table(table, prefix: str, target_prefix: str) -> list[Rule]:
  """Rows of a `models.param_tables` table (transform: array -> array), re-rooted: `prefix` is
  prepended to the source patterns and `target_prefix` to the targets."""
  rules = []
  for pattern, target, fn in table:
    full = re.escape(prefix) + pattern
    if target is None:
      tgt = None
    elif isinstance(target, tuple):   # split row
      tgt = tuple(target_prefix + t for t in target)
    else:
      tgt = target_prefix + target
    rules.append(Rule(re.compile(full), tgt, (lambda f: lambda w, shape: f(w))(fn),
                      getattr(fn, "__name__", "transform")))
  return rules


def _from_sam_table(prefix: str, target_prefix: str) -> list[Rule]:
  rules = []
  for pattern, target, name in sam_params.SAM_RULES:
    rules.append(Rule(re.compile(re.escape(prefix) + pattern), target_prefix + target,
                      sam_params.TRANSFORMS[name], name))
  return rules


# Keys in the GLaMM release the port does not use (see the module docstring).
GLAMM_SKIPS: tuple[str, ...] = (
    r"model\.region_encoder\..*",
    r"model\.vision_tower\..*",
)


def glamm_rules() -> list[Rule]:
  """Rules for the GLaMM checkpoint's keys (everything but CLIP)."""
  rules = [Rule(re.compile(p), None, None, "skip") for p in GLAMM_SKIPS]
  rules += _from_param_table(HF_LLAMA_TABLE, "", "llm.")
  rules += _from_param_table(MM_PROJECTOR_TABLE, "", "mm_projector.")
  rules += _from_param_table(TEXT_HIDDEN_FCS_TABLE, "", "text_hidden_fcs.")
  rules += _from_sam_table(sam_params.GLAMM_SAM_PREFIX, "grounding_encoder.")
  return rules


_CLIP_TOP_LEVEL = ("vision_model.", "text_model.", "visual_projection", "text_projection",
                   "logit_scale")


def normalize_clip_key(key: str) -> str:
  """transformers 5.x saves a CLIPVisionModel without the `vision_model.` prefix; add it back."""
  return key if key.startswith(_CLIP_TOP_LEVEL) else "vision_model." + key


def clip_rules() -> list[Rule]:
  """Rules for the CLIP checkpoint's keys, after `normalize_clip_key`."""
  return _from_param_table(HF_CLIP_VISION_TABLE, "", "vision_tower.")


def _path(target: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in target.split("."))


def map_key(key: str, rules: Sequence[Rule]) -> tuple[tuple, Rule] | None:
  """(model path, rule) for `key`, None when a rule skips it. For a split rule (`rule.split`) the
  first element is the tuple of model paths, one per array the transform returns.

  Raises:
    KeyError: no rule matches.
  """
  for rule in rules:
    m = rule.pattern.fullmatch(key)
    if m is None:
      continue
    if rule.target is None:
      return None
    if rule.split:
      return tuple(_path(m.expand(t)) for t in rule.target), rule
    return _path(m.expand(rule.target)), rule
  raise KeyError(key)


# Streaming groups: the layer stacks are written one layer per group; the other parameters one
# group per component (two path levels for the large parts, one for the small projectors).
STACKS: tuple[tuple, ...] = (
    ("llm", "layers"),
    ("vision_tower", "encoder", "layers"),
    ("grounding_encoder", "image_encoder", "blocks"),
)
_TWO_LEVEL = ("llm", "vision_tower", "grounding_encoder")


def group_of(path: tuple) -> tuple[str, tuple]:
  """(group name, path within the group) of a model parameter path."""
  for stack in STACKS:
    n = len(stack)
    if path[:n] == stack and len(path) > n and isinstance(path[n], int):
      return ".".join(map(str, path[:n + 1])), path[n + 1:]
  n = 2 if path[0] in _TWO_LEVEL else 1
  return ".".join(map(str, path[:n])), path[n:]
