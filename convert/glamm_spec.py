"""The released checkpoints' key scheme at full size, as data (glamm.md §2.4; 968 GLaMM keys).

Used to validate the conversion table against the real key set without the 16 GB download
(`plan` works on metadata only) and to synthesise a checkpoint of the right size for the memory
benchmark. Stored dtypes follow glamm.md §2.2: LLM, projector and region encoder bf16; SAM and
text_hidden_fcs fp32 (the merge script re-creates them in fp32); RoPE buffers fp32.
"""

from __future__ import annotations

from typing import Iterator

Spec = tuple[str, tuple[int, ...], str]   # (key, shape, dtype name)


def glamm_7b_keys(vocab: int = 32007, d: int = 4096, layers: int = 32, mlp: int = 11008
                  ) -> Iterator[Spec]:
  """GLaMM-GCG's state dict in `GLaMMForCausalLM.state_dict()` order (vision tower dropped)."""
  bf, f32 = "bfloat16", "float32"
  yield "model.embed_tokens.weight", (vocab, d), bf
  for i in range(layers):
    p = f"model.layers.{i}."
    for n in "qkvo":
      yield p + f"self_attn.{n}_proj.weight", (d, d), bf
    yield p + "self_attn.rotary_emb.inv_freq", (64,), f32
    yield p + "mlp.gate_proj.weight", (mlp, d), bf
    yield p + "mlp.up_proj.weight", (mlp, d), bf
    yield p + "mlp.down_proj.weight", (d, mlp), bf
    yield p + "input_layernorm.weight", (d,), bf
    yield p + "post_attention_layernorm.weight", (d,), bf
  yield "model.norm.weight", (d,), bf
  yield "model.mm_projector.0.weight", (d, 1024), bf
  yield "model.mm_projector.0.bias", (d,), bf
  yield "model.mm_projector.2.weight", (d, d), bf
  yield "model.mm_projector.2.bias", (d,), bf
  yield from _region_encoder(bf)
  yield from _sam_vit_h(f32)
  yield "model.text_hidden_fcs.0.0.weight", (d, d), f32
  yield "model.text_hidden_fcs.0.0.bias", (d,), f32
  yield "model.text_hidden_fcs.0.2.weight", (256, d), f32
  yield "model.text_hidden_fcs.0.2.bias", (256,), f32
  yield "lm_head.weight", (vocab, d), bf


def _region_encoder(dt: str) -> Iterator[Spec]:
  p = "model.region_encoder."
  for i in range(4):
    yield p + f"mlvl_fuse.input_conv.{i}.weight", (1024, 1026, 1, 1), dt
    yield p + f"mlvl_fuse.input_conv.{i}.bias", (1024,), dt
  for i in range(5):
    yield p + f"mlvl_fuse.fuse_convs.{i}.conv.weight", (1024, 1024, 3, 3), dt
    yield p + f"mlvl_fuse.fuse_convs.{i}.gn.weight", (1024,), dt
    yield p + f"mlvl_fuse.fuse_convs.{i}.gn.bias", (1024,), dt
  for i in range(4):
    yield p + f"roi_align.pconvs.{i}.weight", (1024, 1024, 3, 3), dt
    yield p + f"roi_align.pconvs.{i}.bias", (1024,), dt
  for i, (shape_w, shape_b) in {0: ((256, 4), (256,)), 2: ((256,), (256,)),
                                3: ((1024, 256), (1024,)), 5: ((1024,), (1024,))}.items():
    yield p + f"roi_align.pos_embedd.{i}.weight", shape_w, dt
    yield p + f"roi_align.pos_embedd.{i}.bias", shape_b, dt
  yield p + "roi_align.updims.weight", (4096, 1024), dt
  yield p + "roi_align.updims.bias", (4096,), dt
  yield p + "roi_align.flatten_linear.weight", (1024, 200704), dt
  yield p + "roi_align.flatten_linear.bias", (1024,), dt


def _sam_vit_h(dt: str) -> Iterator[Spec]:
  p = "model.grounding_encoder.image_encoder."
  yield p + "patch_embed.proj.weight", (1280, 3, 16, 16), dt
  yield p + "patch_embed.proj.bias", (1280,), dt
  yield p + "pos_embed", (1, 64, 64, 1280), dt
  for b in range(32):
    q = p + f"blocks.{b}."
    rel = 127 if b in (7, 15, 23, 31) else 27
    yield q + "norm1.weight", (1280,), dt
    yield q + "norm1.bias", (1280,), dt
    yield q + "attn.rel_pos_h", (rel, 80), dt
    yield q + "attn.rel_pos_w", (rel, 80), dt
    yield q + "attn.qkv.weight", (3840, 1280), dt
    yield q + "attn.qkv.bias", (3840,), dt
    yield q + "attn.proj.weight", (1280, 1280), dt
    yield q + "attn.proj.bias", (1280,), dt
    yield q + "norm2.weight", (1280,), dt
    yield q + "norm2.bias", (1280,), dt
    yield q + "mlp.lin1.weight", (5120, 1280), dt
    yield q + "mlp.lin1.bias", (5120,), dt
    yield q + "mlp.lin2.weight", (1280, 5120), dt
    yield q + "mlp.lin2.bias", (1280,), dt
  yield p + "neck.0.weight", (256, 1280, 1, 1), dt
  yield p + "neck.1.weight", (256,), dt
  yield p + "neck.1.bias", (256,), dt
  yield p + "neck.2.weight", (256, 256, 3, 3), dt
  yield p + "neck.3.weight", (256,), dt
  yield p + "neck.3.bias", (256,), dt

  p = "model.grounding_encoder.prompt_encoder."
  yield p + "pe_layer.positional_encoding_gaussian_matrix", (2, 128), dt
  for i in range(4):
    yield p + f"point_embeddings.{i}.weight", (1, 256), dt
  yield p + "not_a_point_embed.weight", (1, 256), dt
  yield p + "mask_downscaling.0.weight", (4, 1, 2, 2), dt
  yield p + "mask_downscaling.0.bias", (4,), dt
  yield p + "mask_downscaling.1.weight", (4,), dt
  yield p + "mask_downscaling.1.bias", (4,), dt
  yield p + "mask_downscaling.3.weight", (16, 4, 2, 2), dt
  yield p + "mask_downscaling.3.bias", (16,), dt
  yield p + "mask_downscaling.4.weight", (16,), dt
  yield p + "mask_downscaling.4.bias", (16,), dt
  yield p + "mask_downscaling.6.weight", (256, 16, 1, 1), dt
  yield p + "mask_downscaling.6.bias", (256,), dt
  yield p + "no_mask_embed.weight", (1, 256), dt

  p = "model.grounding_encoder.mask_decoder."
  yield p + "iou_token.weight", (1, 256), dt
  yield p + "mask_tokens.weight", (4, 256), dt

  def attn(q: str, inner: int):
    for n in "qkv":
      yield q + f"{n}_proj.weight", (inner, 256), dt
      yield q + f"{n}_proj.bias", (inner,), dt
    yield q + "out_proj.weight", (256, inner), dt
    yield q + "out_proj.bias", (256,), dt

  for j in range(2):
    q = p + f"transformer.layers.{j}."
    yield from attn(q + "self_attn.", 256)
    yield q + "norm1.weight", (256,), dt
    yield q + "norm1.bias", (256,), dt
    yield from attn(q + "cross_attn_token_to_image.", 128)
    yield q + "norm2.weight", (256,), dt
    yield q + "norm2.bias", (256,), dt
    yield q + "mlp.lin1.weight", (2048, 256), dt
    yield q + "mlp.lin1.bias", (2048,), dt
    yield q + "mlp.lin2.weight", (256, 2048), dt
    yield q + "mlp.lin2.bias", (256,), dt
    yield q + "norm3.weight", (256,), dt
    yield q + "norm3.bias", (256,), dt
    yield q + "norm4.weight", (256,), dt
    yield q + "norm4.bias", (256,), dt
    yield from attn(q + "cross_attn_image_to_token.", 128)
  yield from attn(p + "transformer.final_attn_token_to_image.", 128)
  yield p + "transformer.norm_final_attn.weight", (256,), dt
  yield p + "transformer.norm_final_attn.bias", (256,), dt
  yield p + "output_upscaling.0.weight", (256, 64, 2, 2), dt
  yield p + "output_upscaling.0.bias", (64,), dt
  yield p + "output_upscaling.1.weight", (64,), dt
  yield p + "output_upscaling.1.bias", (64,), dt
  yield p + "output_upscaling.3.weight", (64, 32, 2, 2), dt
  yield p + "output_upscaling.3.bias", (32,), dt
  for i in range(4):
    for j, (o, n) in enumerate(((256, 256), (256, 256), (32, 256))):
      yield p + f"output_hypernetworks_mlps.{i}.layers.{j}.weight", (o, n), dt
      yield p + f"output_hypernetworks_mlps.{i}.layers.{j}.bias", (o,), dt
  for j, (o, n) in enumerate(((256, 256), (256, 256), (4, 256))):
    yield p + f"iou_prediction_head.layers.{j}.weight", (o, n), dt
    yield p + f"iou_prediction_head.layers.{j}.bias", (o,), dt


def clip_l14_336_keys(dtype: str = "float32", with_text: bool = True) -> Iterator[Spec]:
  """`openai/clip-vit-large-patch14-336` vision keys (transformers 4.x names), plus a few of the
  text tower's keys that a full CLIPModel checkpoint also holds (skipped by the converter)."""
  v, d = "vision_model.", 1024
  yield v + "embeddings.class_embedding", (d,), dtype
  yield v + "embeddings.patch_embedding.weight", (d, 3, 14, 14), dtype
  yield v + "embeddings.position_embedding.weight", (577, d), dtype
  yield v + "embeddings.position_ids", (1, 577), "int64"
  yield v + "pre_layrnorm.weight", (d,), dtype
  yield v + "pre_layrnorm.bias", (d,), dtype
  for i in range(24):
    q = v + f"encoder.layers.{i}."
    for n in ("k", "v", "q", "out"):
      yield q + f"self_attn.{n}_proj.weight", (d, d), dtype
      yield q + f"self_attn.{n}_proj.bias", (d,), dtype
    yield q + "layer_norm1.weight", (d,), dtype
    yield q + "layer_norm1.bias", (d,), dtype
    yield q + "mlp.fc1.weight", (4096, d), dtype
    yield q + "mlp.fc1.bias", (4096,), dtype
    yield q + "mlp.fc2.weight", (d, 4096), dtype
    yield q + "mlp.fc2.bias", (d,), dtype
    yield q + "layer_norm2.weight", (d,), dtype
    yield q + "layer_norm2.bias", (d,), dtype
  yield v + "post_layernorm.weight", (d,), dtype
  yield v + "post_layernorm.bias", (d,), dtype
  if with_text:
    yield "text_model.embeddings.token_embedding.weight", (49408, 768), dtype
    yield "text_model.final_layer_norm.weight", (768,), dtype
    yield "visual_projection.weight", (768, d), dtype
    yield "text_projection.weight", (768, 768), dtype
    yield "logit_scale", (), dtype


GLAMM_7B_CONFIG = {
    # The fields of MBZUAI/GLaMM-GCG's config.json that the converter reads (glamm.md §2.3).
    "architectures": ["GLaMMForCausalLM"], "model_type": "llava", "vocab_size": 32007,
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 4096, "mm_hidden_size": 1024, "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "out_dim": 256, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bbox_token_idx": 32002,
}

CLIP_L14_336_CONFIG = {
    # openai/clip-vit-large-patch14-336's config.json (CLIPConfig): only the vision part matters.
    "model_type": "clip",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768},
}
