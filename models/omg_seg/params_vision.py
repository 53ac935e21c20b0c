"""Checkpoint-name tables for the OMG-Seg vision trunk and pixel decoder (`models/param_tables.py`
format: (regex over the source key, NNX target path template, transform)).

Source names (spec omg_llava.md 2.3):
- OMG-Seg (`omg_seg_convl.pth` `state_dict`; inside OMG-LLaVA prefixed `visual_encoder.`):
  `backbone.stem.{0,1}.*`, `backbone.layer{k}.downsample.{0,1}.*`,
  `backbone.layer{k}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, and
  `panoptic_head.pixel_decoder.{input_convs,encoder.layers,level_encoding,lateral_convs,
  output_convs,mask_feature}.*`.
- OpenCLIP (`open_clip_pytorch_model.bin` of `convnext_large_d_320`): `visual.trunk.stem.*` and
  `visual.trunk.stages.{i}.*` (= `backbone.layer{i+1}.*`).

Targets are paths inside `ConvNeXt` (`models/omg_seg/convnext.py`) and `MSDeformAttnPixelDecoder`
(`models/omg_seg/pixel_decoder.py`). `prefixed` re-roots a table, e.g. for a parent module that
holds the trunk at `backbone` and the decoder at `panoptic_head.pixel_decoder`.
"""

from __future__ import annotations

import re
from typing import Callable

from models.param_tables import Table, conv_weight, identity, linear_weight

# One ConvNeXt stage, keys relative to the stage (timm `ConvNeXtStage`) -> path inside our `Stage`.
_STAGE_ROWS: Table = (
    (r"downsample\.0\.weight", r"downsample.norm.scale", identity),       # LayerNorm2d
    (r"downsample\.0\.bias", r"downsample.norm.bias", identity),
    (r"downsample\.1\.weight", r"downsample.conv.kernel", conv_weight),   # conv 2x2 / 2
    (r"downsample\.1\.bias", r"downsample.conv.bias", identity),
    # depthwise [C, 1, 7, 7] -> [7, 7, 1, C] (HWIO with feature_group_count = C)
    (r"blocks\.(\d+)\.conv_dw\.weight", r"blocks.\1.conv_dw.kernel", conv_weight),
    (r"blocks\.(\d+)\.conv_dw\.bias", r"blocks.\1.conv_dw.bias", identity),
    (r"blocks\.(\d+)\.norm\.weight", r"blocks.\1.norm.scale", identity),
    (r"blocks\.(\d+)\.norm\.bias", r"blocks.\1.norm.bias", identity),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.weight", r"blocks.\1.\2.kernel", linear_weight),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.bias", r"blocks.\1.\2.bias", identity),
    (r"blocks\.(\d+)\.gamma", r"blocks.\1.gamma", identity),             # layer scale [C]
)

_STEM_ROWS: Table = (
    (r"0\.weight", r"stem.conv.kernel", conv_weight),                       # conv 4x4 / 4
    (r"0\.bias", r"stem.conv.bias", identity),
    (r"1\.weight", r"stem.norm.scale", identity),                          # LayerNorm2d
    (r"1\.bias", r"stem.norm.bias", identity),
)


def convnext_table(stem: str, stage: Callable[[int], str]) -> Table:
  """ConvNeXt rows for source keys under the literal prefixes `stem` and `stage(k)` (k = 1..4,
  our `layer{k}`). One row set per stage, because timm counts stages from 0 and OMG from 1."""
  rows = [(re.escape(stem) + p, t, f) for p, t, f in _STEM_ROWS]
  for k in range(1, 5):
    rows += [(re.escape(stage(k)) + p, f"layer{k}." + t, f) for p, t, f in _STAGE_ROWS]
  return tuple(rows)


# Keys relative to the OMG backbone root (`stem.*`, `layer{k}.*`).
CONVNEXT_RULES: Table = convnext_table("stem.", lambda k: f"layer{k}.") + (
    # Unused: the CLIP head (open-vocabulary path only, disabled in OMG-LLaVA).
    (r"head\..*", None, identity),
)

_ATTN_LINEARS = r"(sampling_offsets|attention_weights|value_proj|output_proj)"

# Keys relative to the pixel-decoder root.
PIXEL_DECODER_RULES: Table = (
    (r"input_convs\.(\d+)\.conv\.weight", r"input_convs.\1.conv.kernel", conv_weight),
    (r"input_convs\.(\d+)\.conv\.bias", r"input_convs.\1.conv.bias", identity),
    (r"(input_convs|lateral_convs|output_convs)\.(\d+)\.gn\.weight", r"\1.\2.gn.scale", identity),
    (r"(input_convs|lateral_convs|output_convs)\.(\d+)\.gn\.bias", r"\1.\2.gn.bias", identity),
    (r"(lateral_convs|output_convs)\.(\d+)\.conv\.weight", r"\1.\2.conv.kernel", conv_weight),
    (r"encoder\.layers\.(\d+)\.self_attn\." + _ATTN_LINEARS + r"\.weight",
     r"layers.\1.self_attn.\2.kernel", linear_weight),
    (r"encoder\.layers\.(\d+)\.self_attn\." + _ATTN_LINEARS + r"\.bias",
     r"layers.\1.self_attn.\2.bias", identity),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.weight", r"layers.\1.ffn.fc1.kernel",
     linear_weight),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.bias", r"layers.\1.ffn.fc1.bias", identity),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.weight", r"layers.\1.ffn.fc2.kernel",
     linear_weight),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.bias", r"layers.\1.ffn.fc2.bias", identity),
    (r"encoder\.layers\.(\d+)\.norms\.([01])\.weight", r"layers.\1.norm\2.scale", identity),
    (r"encoder\.layers\.(\d+)\.norms\.([01])\.bias", r"layers.\1.norm\2.bias", identity),
    (r"level_encoding\.weight", r"level_encoding", identity),
    (r"mask_feature\.weight", r"mask_feature.kernel", conv_weight),
    (r"mask_feature\.bias", r"mask_feature.bias", identity),
)


def prefixed(rules: Table, src_prefix: str = "", dst_prefix: str = "") -> Table:
  """`rules` with every pattern under the literal source prefix `src_prefix` (e.g. `backbone.`)
  and every target under `dst_prefix` (e.g. `backbone.`); skip rows stay skips."""
  out = []
  for pattern, target, transform in rules:
    out.append((re.escape(src_prefix) + pattern,
                None if target is None else dst_prefix + target, transform))
  return tuple(out)


# Loading a `ConvNeXt` from OMG-Seg keys (`backbone.*`).
OMG_BACKBONE_TABLE: Table = prefixed(CONVNEXT_RULES, "backbone.")

# Loading an `MSDeformAttnPixelDecoder` from OMG-Seg keys (`panoptic_head.pixel_decoder.*`).
OMG_PIXEL_DECODER_TABLE: Table = prefixed(PIXEL_DECODER_RULES, "panoptic_head.pixel_decoder.")


# Loading a `ConvNeXt` from an OpenCLIP state dict (`visual.trunk.*`; other keys skipped).
OPENCLIP_BACKBONE_TABLE: Table = convnext_table(
    "visual.trunk.stem.", lambda k: f"visual.trunk.stages.{k - 1}.") + (
    # Everything else in an OpenCLIP file (text tower, logit scale, trunk head, CLIP head).
    (r"(?!visual\.trunk\.(stem|stages)\.).*", None, identity),
)
