"""OMG-Seg Mask2Former head checkpoint names -> `Mask2FormerDecoder` parameter paths (a table in
the `models/param_tables.py` format).

Keys are relative to the OMG-Seg root (`omg_seg_convl.pth`'s `state_dict`; inside OMG-LLaVA
checkpoints strip the `visual_encoder.` prefix first). Only the decoder part of `panoptic_head`
is covered; `panoptic_head.pixel_decoder.*` belongs to the pixel-decoder table.

Layout notes:
- `{self,cross}_attn.attn.in_proj_weight` [3C, C] (q; k; v stacked) stays packed: it becomes the
  [C, 3C] kernel `in_proj.kernel` (one transpose), and `MultiheadAttention` slices the columns.
- torch `nn.Sequential` MLPs number their Linear layers 0, 2, 4 (ReLUs between); ours are
  `layers.0..2`.
- mmcv `FFN`: `ffn.layers.0.0` is the first Linear, `ffn.layers.1` the second.

Skipped keys (target None), unused in GCG inference:
- `iou_embed.*`: the IoU head's output is dropped by `predict` (spec 1.3).
- `mask_tokens.weight`, `pb_embedding.weight`, `pos_linear.*`: box / point prompt queries
  (`enable_box_query` is forced on, so they exist in the file, but image and [SEG] decoding never
  read them).
- `cls_embed` never appears: it is a non-persistent buffer, passed to the decoder as an array.
"""

from __future__ import annotations

from models.param_tables import Table, identity, linear_weight

_H = r"panoptic_head\."
_DEC = r"(transformer_decoder(?:_llm)?)"
_LAYER = _H + _DEC + r"\.layers\.(\d+)\."


def _sequential_mlp(src: str, dst: str) -> Table:
  """Rows of a torch Sequential(Linear, ReLU, Linear, ReLU, Linear) -> `Mlp.layers.{0,1,2}`."""
  rows = []
  for i, j in ((0, 0), (2, 1), (4, 2)):
    rows.append((_H + src + rf"\.{i}\.weight", f"{dst}.layers.{j}.kernel", linear_weight))
    rows.append((_H + src + rf"\.{i}\.bias", f"{dst}.layers.{j}.bias", identity))
  return tuple(rows)


MASK2FORMER_DECODER_TABLE: Table = (
    # Decoder layers (`transformer_decoder` and the fine-tuned `transformer_decoder_llm` copy).
    (_LAYER + r"(self_attn|cross_attn)\.attn\.in_proj_weight", r"\1.layers.\2.\3.in_proj.kernel",
     linear_weight),
    (_LAYER + r"(self_attn|cross_attn)\.attn\.in_proj_bias", r"\1.layers.\2.\3.in_proj.bias",
     identity),
    (_LAYER + r"(self_attn|cross_attn)\.attn\.out_proj\.weight", r"\1.layers.\2.\3.out_proj.kernel",
     linear_weight),
    (_LAYER + r"(self_attn|cross_attn)\.attn\.out_proj\.bias", r"\1.layers.\2.\3.out_proj.bias",
     identity),
    (_LAYER + r"ffn\.layers\.0\.0\.weight", r"\1.layers.\2.ffn.fc1.kernel", linear_weight),
    (_LAYER + r"ffn\.layers\.0\.0\.bias", r"\1.layers.\2.ffn.fc1.bias", identity),
    (_LAYER + r"ffn\.layers\.1\.weight", r"\1.layers.\2.ffn.fc2.kernel", linear_weight),
    (_LAYER + r"ffn\.layers\.1\.bias", r"\1.layers.\2.ffn.fc2.bias", identity),
    (_LAYER + r"norms\.(\d)\.weight", r"\1.layers.\2.norms.\3.scale", identity),
    (_LAYER + r"norms\.(\d)\.bias", r"\1.layers.\2.norms.\3.bias", identity),
    (_H + _DEC + r"\.post_norm\.weight", r"\1.post_norm.scale", identity),
    (_H + _DEC + r"\.post_norm\.bias", r"\1.post_norm.bias", identity),
    # Learned queries and level embedding (nn.Embedding weights, used as is).
    (_H + r"(query_feat|query_embed|level_embed)\.weight", r"\1", identity),
    # Heads.
    *_sequential_mlp("mask_embed", "mask_embed"),
    *_sequential_mlp("mask_embed_llm", "mask_embed_llm"),
    *_sequential_mlp("cls_proj", "cls_proj"),
    (_H + r"mask_pooling_proj\.0\.weight", "mask_pooling_proj.norm.scale", identity),
    (_H + r"mask_pooling_proj\.0\.bias", "mask_pooling_proj.norm.bias", identity),
    (_H + r"mask_pooling_proj\.1\.weight", "mask_pooling_proj.linear.kernel", linear_weight),
    (_H + r"mask_pooling_proj\.1\.bias", "mask_pooling_proj.linear.bias", identity),
    # Unused in GCG inference (see the module docstring).
    (_H + r"iou_embed\.\d\.(weight|bias)", None, identity),
    (_H + r"(mask_tokens|pb_embedding)\.weight", None, identity),
    (_H + r"pos_linear\.(weight|bias)", None, identity),
)
