"""The full OMG-LLaVA key mapping, as data: part tables composed with the release's prefixes.

Sources (omg_llava.md §2) and where their keys go (model paths are attributes of
`models.omg_llava.modeling.OMGLLaVA`):

  `--internlm` internlm2-chat-7b/ safetensors (HF names), with the `--omg-llava` .pth's LLM
  keys merged in as they stream (convert/omg_llava.py `MergedInternLM2`; the LoRA factors are added
  to the base weight before the wqkv split):
    model.tok_embeddings / model.layers.* / model.norm / output
                                                   -> llm.*          (models/llama/internlm2_params)
  `--omg-llava` .pth (`OMG_LLaVA.state_dict()`, optionally under {'state_dict': ...}):
    llm.base_model.model.*                         -> (read by the merged LLM source above)
    projector.model.*                              -> projector.*    (models/omg_llava/projector.py)
    projector_text2vision.model.*                  -> text2vision.*
    visual_encoder.panoptic_head.{transformer_decoder_llm,mask_embed_llm}.*
                                                   -> decoder.*      (models/omg_seg/params_decoder)
  `--omg-seg` omg_seg_convl.pth (mmengine {'state_dict': ...}):
    backbone.*                                     -> backbone.*     (models/omg_seg/params_vision)
    panoptic_head.pixel_decoder.*                  -> pixel_decoder.*
    panoptic_head.* (the Mask2Former head)         -> decoder.*
  `--openclip` (only when omg_seg_convl.pth has no `backbone.*` key):
    visual.trunk.{stem,stages}.*                   -> backbone.*
  `--class-embed` convnext_large_d_320_CocoPanopticOVDataset.pth (one tensor [133, P, 768]):
    class_embed                                    -> class_embed    (a non-Param buffer)

Skipped on purpose (the part tables' `None` rows and `OMG_LLAVA_SKIPS`), never read:
  panoptic_head.iou_embed.*                        IoU head, its output is dropped (§1.3)
  panoptic_head.{mask_tokens,pb_embedding}.weight, panoptic_head.pos_linear.*
                                                   box / point prompt queries, unused for GCG
  backbone.head.*                                  OpenCLIP head (open-vocabulary path, disabled)
  model.layers.*.attention.rotary_emb.inv_freq     RoPE buffers (recomputed, plain RoPE theta 1e6)
  everything in an OpenCLIP file but visual.trunk.{stem,stages}.* (text tower, CLIP head, ...)
The internlm2-chat-7b `model.tok_embeddings.weight` / `output.weight` (92544 rows) are not read
either: the .pth's resized 92548-row versions replace them (`MergedInternLM2`).

Documented alternatives accepted (omg_llava.md §8, EXPECTED/UNVERIFIED there):
- the head as `llm.base_model.model.output.weight` or `...output.base_layer.weight`, with or
  without a LoRA pair on it (merged when present);
- omg_seg_convl.pth with `backbone.*` (then `--openclip` is not read) or without it (then the
  backbone comes from `--openclip`);
- a .pth with the `_llm` decoder copies (GCG / refseg fine-tunes: `Mask2FormerConfig.llm_decoder`)
  or without any of them (the general fine-tune: the model is built with `llm_decoder=False`, and
  [SEG] decoding uses the frozen decoder, as the reference does without `require_omg_decoder`);
- any P in the class-embedding tensor (it sizes the model's buffer).
Any other key fails the conversion, named with every other problem (convert/pipeline.plan).
"""

from __future__ import annotations

import re

from convert.glamm_table import Rule, _from_param_table
from models.llama.config import LlamaConfig
from models.llama.internlm2_params import OMG_LLM_PREFIX, internlm2_table
from models.omg_llava.projector import OMG_PROJECTOR_TABLE, TEXT_TO_VISION_TABLE
from models.omg_seg.params_decoder import MASK2FORMER_DECODER_TABLE
from models.omg_seg.params_vision import (OMG_BACKBONE_TABLE, OMG_PIXEL_DECODER_TABLE,
                                          OPENCLIP_BACKBONE_TABLE)
from models.param_tables import identity

# The fine-tuned decoder copies OMG-LLaVA's .pth carries (under `visual_encoder.`); OMG-Seg itself
# has none. The decoder table matches both copies; these lookaheads split it between the sources.
_LLM_COPIES = r"panoptic_head\.(?:transformer_decoder_llm|mask_embed_llm)\."
VISUAL_ENCODER_PREFIX = "visual_encoder."
CLASS_EMBED_KEY = "class_embed"

# Keys of the OMG-LLaVA .pth that another source consumes (not skipped: `MergedInternLM2` reads
# and validates them, merging LoRA factors and replacing the embedding and head).
OMG_LLAVA_SKIPS: tuple[str, ...] = (re.escape(OMG_LLM_PREFIX) + r".*",)


def _only(rules: list[Rule], lookahead: str) -> list[Rule]:
  """`rules` restricted to keys that also match the lookahead `lookahead` (at the key start)."""
  return [Rule(re.compile(lookahead + r.pattern.pattern), r.target, r.transform, r.transform_name)
          for r in rules]


def llm_rules(llm: LlamaConfig) -> list[Rule]:
  """Rules for the merged InternLM2 source (HF names, LoRA already merged) -> `llm.*`."""
  return _from_param_table(internlm2_table(llm), "", "llm.")


def omg_llava_rules() -> list[Rule]:
  """Rules for the OMG-LLaVA .pth: projectors, the `_llm` decoder copies, LLM keys consumed by the
  merged LLM source. Anything else is an unknown key."""
  rules = [Rule(re.compile(p), None, None, "read by the merged LLM source")
           for p in OMG_LLAVA_SKIPS]
  rules += _from_param_table(OMG_PROJECTOR_TABLE, "", "projector.")
  rules += _from_param_table(TEXT_TO_VISION_TABLE, "", "text2vision.")
  rules += _only(_from_param_table(MASK2FORMER_DECODER_TABLE, VISUAL_ENCODER_PREFIX, "decoder."),
                 rf"(?={re.escape(VISUAL_ENCODER_PREFIX)}{_LLM_COPIES})")
  return rules


def omg_seg_rules(with_backbone: bool = True) -> list[Rule]:
  """Rules for omg_seg_convl.pth's `state_dict`: backbone (unless it comes from OpenCLIP), pixel
  decoder, Mask2Former head (the `_llm` copies only come from the OMG-LLaVA .pth)."""
  rules = _from_param_table(OMG_BACKBONE_TABLE, "", "backbone.") if with_backbone else []
  rules += _from_param_table(OMG_PIXEL_DECODER_TABLE, "", "pixel_decoder.")
  rules += _only(_from_param_table(MASK2FORMER_DECODER_TABLE, "", "decoder."),
                 rf"(?!{_LLM_COPIES})")
  return rules


def openclip_rules() -> list[Rule]:
  """Rules for an OpenCLIP `convnext_large_d_320` state dict: the trunk -> `backbone.*`."""
  return _from_param_table(OPENCLIP_BACKBONE_TABLE, "", "backbone.")


def class_embed_rules() -> list[Rule]:
  """The class-embedding file, read as the single key `class_embed` -> the model's buffer."""
  return _from_param_table(((re.escape(CLASS_EMBED_KEY), "class_embed", identity),), "", "")


def is_llm_copy_key(key: str) -> bool:
  """True for the .pth's `visual_encoder.panoptic_head.{transformer_decoder_llm,mask_embed_llm}.*`
  keys (the [SEG] decoder copies)."""
  return re.match(re.escape(VISUAL_ENCODER_PREFIX) + _LLM_COPIES, key) is not None


# Streaming groups: one per LLM layer; the embedding, head and norm, the backbone stages, and the
# decoder's sub-modules one group each (two path levels); pixel decoder, projectors and the class
# embedding one group each. A top-level leaf (`class_embed`, `decoder.query_feat`) lives in the
# group of its parent path under its own name.
STACKS: tuple[tuple, ...] = (("llm", "layers"),)
_TWO_LEVEL = ("llm", "backbone", "decoder")


def group_of(path: tuple) -> tuple[str, tuple]:
  """(group name, path within the group) of a model parameter path."""
  for stack in STACKS:
    n = len(stack)
    if path[:n] == stack and len(path) > n and isinstance(path[n], int):
      return ".".join(map(str, path[:n + 1])), path[n + 1:]
  n = 2 if path[0] in _TWO_LEVEL and len(path) > 2 else 1
  return ".".join(map(str, path[:n])), (path[n:] or path[-1:])
