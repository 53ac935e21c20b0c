"""HF CLIP vision state_dict names -> `CLIPVisionModel` parameter paths (a table; see
models/param_tables). Source keys are those of `openai/clip-vit-large-patch14-336`
(`vision_model.*`), or those of a transformers-5 `CLIPVisionModel` (no prefix); the text tower
and the projection heads of a full CLIPModel checkpoint are skipped.
"""

from __future__ import annotations

from models.param_tables import Table, conv_weight, identity, linear_weight

# The hub checkpoint (a CLIPModel) prefixes `vision_model.`; transformers 5's CLIPVisionModel
# state_dict has no prefix; GLaMM's runtime module names it `model.vision_tower.vision_tower.`.
_V = r"(?:(?:model\.vision_tower\.vision_tower\.)?vision_model\.)?"
_LAYER = _V + r"encoder\.layers\.(\d+)\."

HF_CLIP_VISION_TABLE: Table = (
    (_V + r"embeddings\.class_embedding", "embeddings.class_embedding", identity),
    (_V + r"embeddings\.patch_embedding\.weight", "embeddings.patch_embedding.kernel", conv_weight),
    (_V + r"embeddings\.position_embedding\.weight", "embeddings.position_embedding.embedding",
     identity),
    (_V + r"embeddings\.position_ids", None, identity),  # buffer: arange(577)
    (_V + r"(pre_layrnorm|post_layernorm)\.weight", r"\1.scale", identity),
    (_V + r"(pre_layrnorm|post_layernorm)\.bias", r"\1.bias", identity),
    (_LAYER + r"self_attn\.(q|k|v|out)_proj\.weight", r"encoder.layers.\1.self_attn.\2_proj.kernel",
     linear_weight),
    (_LAYER + r"self_attn\.(q|k|v|out)_proj\.bias", r"encoder.layers.\1.self_attn.\2_proj.bias",
     identity),
    (_LAYER + r"(layer_norm1|layer_norm2)\.weight", r"encoder.layers.\1.\2.scale", identity),
    (_LAYER + r"(layer_norm1|layer_norm2)\.bias", r"encoder.layers.\1.\2.bias", identity),
    (_LAYER + r"mlp\.(fc1|fc2)\.weight", r"encoder.layers.\1.mlp.\2.kernel", linear_weight),
    (_LAYER + r"mlp\.(fc1|fc2)\.bias", r"encoder.layers.\1.mlp.\2.bias", identity),
    # A full CLIPModel checkpoint also holds these; the vision tower does not use them.
    (r"(text_model|visual_projection|text_projection|logit_scale)(\..*)?", None, identity),
)
