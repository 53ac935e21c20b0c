"""Analytic FLOP and byte counts for the GLaMM GCG benchmark (issue 5). Pure Python, no device.

A multiply-add counts 2 FLOPs. Only matrix products are counted (linear layers, attention's two
products, convolutions); norms, softmax, activations, RoPE, gathers and the pruning selections
are left out (each is < 1% of an image's total at GLaMM-7B sizes). Per image:

CLIP ViT (P = (S/p)^2 patches, n = P + 1 tokens, width Dv, MLP Fv, `layers` layers run):
    2*P*(3*p^2)*Dv  +  layers * [2*n*4*Dv^2 + 4*n^2*Dv + 4*n*Dv*Fv]
mm_projector (N visual tokens, LLM width D):            2*N*(Dv*D + D*D)
LLaMA, one token through one layer (linear part):       lin = 2*(D*Hq*Dh + 2*D*Hkv*Dh + Hq*Dh*D + 3*D*F)
    attention of one query over c keys:                 4*c*Hq*Dh
  prefill, stage s with t_s tokens and l_s layers (causal: query i sees i keys):
                                                        l_s * [t_s*lin + 4*Hq*Dh*t_s*(t_s+1)/2]
  + lm_head on the last prompt token:                   2*D*V
  decode step j = 1..G-1 (G new tokens; the first comes from the prefill), stage s:
                                                        l_s * [lin + 4*Hq*Dh*(t_s + j)] (+ 2*D*V)
SAM ViT image encoder (g = img/p grid, width E, MLP M, window w, padded grid gp = ceil(g/w)*w):
    patch 2*g^2*(3*p^2)*E; per windowed block: 2*gp^2*4*E^2 (qkv, proj on padded windows)
    + 4*(gp/w)^2*w^4*E (attention) + 4*gp^2*w*E (decomposed rel-pos) + 4*g^2*E*M (MLP);
    per global block the same with w = gp = g; neck 2*g^2*E*C + 2*g^2*9*C^2.
SAM mask decoder, per prompt ([SEG]) with nt = 2 + num_mask_tokens... tokens, n_i = g^2 image
    tokens, width C, cross-attention width Ci = C / downsample, MLP Mm, depth Ld:
    per layer: self-attn 2*nt*4*C^2 + 4*nt^2*C; token->image 2*nt*C*Ci*2 + 4*n_i*C*Ci + 4*nt*n_i*Ci;
    MLP 4*nt*C*Mm; image->token 2*n_i*C*Ci*2 + 4*nt*C*Ci + 4*n_i*nt*Ci; final token->image as a
    token->image block; upscaling 2*(2g)^2*C*(C/4) + 2*(4g)^2*(C/4)*(C/8); mask product
    2*(4g)^2*(C/8)*K (K mask tokens); hypernetwork and IoU MLPs 2*K*(2*C^2 + C*C/8) + 2*(2*C^2 + C*K).

KV cache bytes (per batch): sum over stages of l_s * 2 (k, v) * B * (t_s + G) * Hkv * Dh * bytes;
`generate` allocates exactly this (stage caches of `t_s + max_new_tokens` slots).

Bytes a step must move at least (for the bandwidth fraction): the weights it uses once (the
embedding table counts one row per token, i.e. nothing) plus the KV cache it reads.
"""

from __future__ import annotations

import math
from typing import Sequence


def clip_flops(vision, layers: int | None = None) -> int:
  """FLOPs of one image through the CLIP tower (`vision`: a CLIPVisionConfig); `layers` run."""
  p, dv, fv = vision.patch_size, vision.hidden_size, vision.intermediate_size
  num_p = (vision.image_size // p) ** 2
  n = num_p + 1
  layers = vision.num_layers if layers is None else layers
  per_layer = 2 * n * 4 * dv * dv + 4 * n * n * dv + 4 * n * dv * fv
  return 2 * num_p * 3 * p * p * dv + layers * per_layer


def projector_flops(num_visual: int, vision_width: int, llm_width: int) -> int:
  return 2 * num_visual * (vision_width * llm_width + llm_width * llm_width)


def llm_linear_flops_per_token_layer(llm) -> int:
  """Linear FLOPs of one token through one LLaMA layer (`llm`: a LlamaConfig)."""
  d, f = llm.hidden_size, llm.intermediate_size
  hq, hkv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
  return 2 * (d * hq + 2 * d * hkv + hq * d + 3 * d * f)


def _attn(llm, queries_keys: int) -> int:
  return 4 * queries_keys * llm.num_heads * llm.head_dim


def stage_layers(bounds: Sequence[tuple[int, int]]) -> list[int]:
  return [end - start for start, end in bounds]


def prefill_flops(llm, bounds, stage_lengths) -> int:
  """One prompt through every stage (`stage_lengths[s]` tokens in stage s) + lm_head once."""
  lin = llm_linear_flops_per_token_layer(llm)
  total = 0
  for l_s, t_s in zip(stage_layers(bounds), stage_lengths):
    total += l_s * (t_s * lin + _attn(llm, t_s * (t_s + 1) // 2))
  return total + 2 * llm.hidden_size * llm.vocab_size


def decode_step_flops(llm, bounds, stage_lengths, step: int) -> int:
  """Decode step `step` (1-based: the token at slot t_s + step - 1 attends to t_s + step keys)."""
  lin = llm_linear_flops_per_token_layer(llm)
  total = 2 * llm.hidden_size * llm.vocab_size
  for l_s, t_s in zip(stage_layers(bounds), stage_lengths):
    total += l_s * (lin + _attn(llm, t_s + step))
  return total


def generate_flops(llm, bounds, stage_lengths, new_tokens: int) -> int:
  """Prefill + `new_tokens - 1` decode steps."""
  return prefill_flops(llm, bounds, stage_lengths) + sum(
      decode_step_flops(llm, bounds, stage_lengths, j) for j in range(1, new_tokens))


def sam_encoder_flops(enc) -> int:
  """One image through the SAM ViT image encoder (`enc`: a SamImageEncoderConfig)."""
  g, e, p, c = enc.grid_size, enc.embed_dim, enc.patch_size, enc.out_chans
  m = enc.mlp_dim
  total = 2 * g * g * 3 * p * p * e
  for i in range(enc.depth):
    w = enc.block_window_size(i) or g
    gp = math.ceil(g / w) * w
    windows = (gp // w) ** 2
    total += 2 * gp * gp * 4 * e * e + 4 * windows * w ** 4 * e
    if enc.use_rel_pos:
      total += 4 * gp * gp * w * e
    total += 4 * g * g * e * m
  return total + 2 * g * g * e * c + 2 * g * g * 9 * c * c


def mask_decoder_flops(sam) -> int:
  """One [SEG] prompt (one sparse token) through the SAM mask decoder (`sam`: a SamConfig)."""
  dec, g = sam.mask_decoder, sam.image_encoder.grid_size
  c, k = dec.transformer_dim, dec.num_mask_tokens
  ci, mm = c // dec.attention_downsample_rate, dec.transformer_mlp_dim
  nt, ni = 1 + k + 1, g * g   # IoU token, mask tokens, the text prompt
  t2i = 2 * nt * c * ci * 2 + 4 * ni * c * ci + 4 * nt * ni * ci
  i2t = 2 * ni * c * ci * 2 + 4 * nt * c * ci + 4 * ni * nt * ci
  layer = 2 * nt * 4 * c * c + 4 * nt * nt * c + t2i + 4 * nt * c * mm + i2t
  up = 2 * (2 * g) ** 2 * c * (c // 4) + 2 * (4 * g) ** 2 * (c // 4) * (c // 8)
  heads = 2 * (4 * g) ** 2 * (c // 8) * k + 2 * k * (2 * c * c + c * c // 8) + 2 * (2 * c * c + c * k)
  return dec.transformer_depth * layer + t2i + up + heads


def gcg_flops(config, bounds, stage_lengths, new_tokens: int, segs: int,
              num_visual_projected: int | None = None, clip_layers: int | None = None) -> dict:
  """FLOPs of one image's GCG (`config`: a GLaMMConfig), by part, and the total."""
  n = config.num_visual_tokens if num_visual_projected is None else num_visual_projected
  if clip_layers is None:   # hidden_states[-2] needs num_layers - 1 layers
    sel = config.vision_select_layer
    clip_layers = config.vision.num_layers + 1 + sel if sel < 0 else sel
  parts = dict(
      clip=clip_flops(config.vision, clip_layers),
      projector=projector_flops(n, config.vision.hidden_size, config.llm.hidden_size),
      prefill=prefill_flops(config.llm, bounds, stage_lengths),
      decode=generate_flops(config.llm, bounds, stage_lengths, new_tokens)
      - prefill_flops(config.llm, bounds, stage_lengths),
      sam_encoder=sam_encoder_flops(config.sam.image_encoder),
      mask_decoder=segs * mask_decoder_flops(config.sam),
      text_hidden_fcs=segs * 2 * (config.llm.hidden_size ** 2
                                  + config.llm.hidden_size * config.text_out_dim))
  parts["total"] = sum(parts.values())
  return parts


def kv_cache_bytes(llm, bounds, stage_lengths, new_tokens: int, batch: int,
                   bytes_per_value: int = 2) -> int:
  """Bytes of the stage KV caches `generate` allocates (see module docstring)."""
  per_slot = 2 * llm.num_kv_heads * llm.head_dim * bytes_per_value
  return sum(l_s * batch * (t_s + new_tokens) * per_slot
             for l_s, t_s in zip(stage_layers(bounds), stage_lengths))


def llm_weight_bytes(llm, bytes_per_value: int = 2) -> int:
  """Bytes of the LLM weights a decode step reads (all layers, final norm, lm_head; no embedding
  table: one row per token is gathered)."""
  d = llm.hidden_size
  per_layer = llm_linear_flops_per_token_layer(llm) // 2 + 2 * d
  return (llm.num_layers * per_layer + d + d * llm.vocab_size) * bytes_per_value


def decode_step_bytes(llm, bounds, stage_lengths, new_tokens: int, batch: int,
                      bytes_per_value: int = 2) -> int:
  """Least bytes of one decode step: weights once + the whole fixed-size KV cache (the JAX
  step attends over every slot with a mask)."""
  return (llm_weight_bytes(llm, bytes_per_value)
          + kv_cache_bytes(llm, bounds, stage_lengths, new_tokens, batch, bytes_per_value))


def fractions(flops: float, nbytes: float, seconds: float, matmul_flops_per_s: float,
              copy_bytes_per_s: float) -> dict:
  """Achieved rates and their fractions of the measured ceilings."""
  return dict(tflops=flops / seconds / 1e12, frac_matmul=flops / seconds / matmul_flops_per_s,
              gbps=nbytes / seconds / 1e9, frac_copy=nbytes / seconds / copy_bytes_per_s)
