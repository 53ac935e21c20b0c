"""SAM mask decoder (`MaskDecoder` with its `TwoWayTransformer`), channels-last.

tokens = [iou_token, mask_tokens (4), sparse prompts (T)] attend to the image embedding (+ dense
prompt) through a two-way transformer; the image side is upscaled 4x by two 2x2 transposed convs
and dotted with per-mask-token hypernetwork outputs to give low-res mask logits.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding
from models.activations import gelu_exact
from models.sam import layers
from models.sam.config import SamMaskDecoderConfig


class Attention(nnx.Module):
  """Multi-head attention whose q/k/v projections map `dim` -> `dim / downsample_rate`.

  logits = (q . k^T) / sqrt(head_dim) (divided after the product, as the reference does).
  """

  def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, rngs: nnx.Rngs):
    internal = dim // downsample_rate
    if internal % num_heads:
      raise ValueError(f"mask_decoder.Attention: internal dim {internal} (= {dim} / "
                       f"{downsample_rate}) is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = internal // num_heads
    names = ("vis_embed", "heads", "head_dim")
    self.q_proj = layers.Linear(dim, (num_heads, self.head_dim), names, rngs=rngs)
    self.k_proj = layers.Linear(dim, (num_heads, self.head_dim), names, rngs=rngs)
    self.v_proj = layers.Linear(dim, (num_heads, self.head_dim), names, rngs=rngs)
    self.out_proj = layers.Linear((num_heads, self.head_dim), dim,
                                  ("heads", "head_dim", "vis_embed"), rngs=rngs)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [B, Nq, dim], k and v [B, Nk, dim] -> [B, Nq, dim]."""
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)        # [B, N, heads, head_dim]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    probs = jax.nn.softmax(logits, axis=-1)
    return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v))


class TwoWayAttentionBlock(nnx.Module):
  """Self-attention on tokens, token->image cross-attention, token MLP, image->token
  cross-attention; post-norm after each. The first block's self-attention sees no positional
  encoding and has no residual (`skip_first_layer_pe`)."""

  def __init__(self, config: SamMaskDecoderConfig, skip_first_layer_pe: bool, *, rngs: nnx.Rngs):
    c = config
    dim, heads, eps = c.transformer_dim, c.transformer_num_heads, c.transformer_norm_eps
    self.skip_first_layer_pe = skip_first_layer_pe
    self.self_attn = Attention(dim, heads, rngs=rngs)
    self.norm1 = layers.LayerNorm(dim, eps=eps, rngs=rngs)
    self.cross_attn_token_to_image = Attention(dim, heads, c.attention_downsample_rate, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=eps, rngs=rngs)
    self.mlp = layers.MlpBlock(dim, c.transformer_mlp_dim, jax.nn.relu, embed_name="vis_embed",
                               mlp_name="vis_mlp", rngs=rngs)
    self.norm3 = layers.LayerNorm(dim, eps=eps, rngs=rngs)
    self.norm4 = layers.LayerNorm(dim, eps=eps, rngs=rngs)
    self.cross_attn_image_to_token = Attention(dim, heads, c.attention_downsample_rate, rngs=rngs)

  def __call__(self, queries, keys, query_pe, key_pe):
    """queries/query_pe [B, T, C], keys/key_pe [B, HW, C] -> (queries, keys)."""
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

    queries = self.norm3(queries + self.mlp(queries))

    q, k = queries + query_pe, keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  """`depth` two-way blocks, then a final token->image attention and LayerNorm."""

  def __init__(self, config: SamMaskDecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.layers = nnx.List([TwoWayAttentionBlock(c, skip_first_layer_pe=(i == 0), rngs=rngs)
                            for i in range(c.transformer_depth)])
    self.final_attn_token_to_image = Attention(
        c.transformer_dim, c.transformer_num_heads, c.attention_downsample_rate, rngs=rngs)
    self.norm_final_attn = layers.LayerNorm(c.transformer_dim, eps=c.transformer_norm_eps,
                                            rngs=rngs)

  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """image_embedding, image_pe [B, H, W, C]; point_embedding [B, T, C]
    -> (tokens [B, T, C], image tokens [B, HW, C])."""
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = image_pe.reshape(b, h * w, c)
    queries = point_embedding
    for layer in self.layers:
      queries, keys = layer(queries, keys, point_embedding, key_pe)
    q, k = queries + point_embedding, keys + key_pe
    queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
    return queries, keys


class MaskDecoder(nnx.Module):
  """`MaskDecoder`: tokens + image embedding -> low-res mask logits and IoU predictions."""

  def __init__(self, config: SamMaskDecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    dim = c.transformer_dim
    emb_init = sharding.with_names(nnx.initializers.normal(1.0), None, "vis_embed")
    self.iou_token = nnx.Param(emb_init(rngs.params(), (1, dim)))
    self.mask_tokens = nnx.Param(emb_init(rngs.params(), (c.num_mask_tokens, dim)))
    self.transformer = TwoWayTransformer(c, rngs=rngs)
    self.upscale_conv1 = layers.ConvTranspose2x2(dim, dim // 4, rngs=rngs)
    self.upscale_norm = layers.LayerNorm(dim // 4, eps=c.upscale_norm_eps, rngs=rngs)
    self.upscale_conv2 = layers.ConvTranspose2x2(dim // 4, dim // 8, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List([
        layers.Mlp(dim, dim, dim // 8, 3, rngs=rngs) for _ in range(c.num_mask_tokens)])
    self.iou_prediction_head = layers.Mlp(dim, c.iou_head_hidden_dim, c.num_mask_tokens,
                                          c.iou_head_depth, rngs=rngs)

  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
               sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
               multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """Predicts masks.

    Args:
      image_embeddings: [B_img, H, W, C]; each image is repeated once per prompt set
        (`repeat_interleave` in the reference; GLaMM has B_img = 1).
      image_pe: [1, H, W, C] dense positional encoding.
      sparse_prompt_embeddings: [N, T, C] (GLaMM: T = 1, the projected [SEG] state).
      dense_prompt_embeddings: [N, H, W, C].
      multimask_output: False keeps mask 0 only (GLaMM), True keeps masks 1..3.
    Returns:
      masks [N, K, 4H, 4W] low-res logits (K = 1 or 3) and iou_pred [N, K].
    """
    n = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0)
    output_tokens = jnp.broadcast_to(output_tokens[None], (n,) + output_tokens.shape)
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)],
                             axis=1)

    src = jnp.repeat(image_embeddings, n, axis=0) + dense_prompt_embeddings
    pos_src = jnp.repeat(image_pe, n, axis=0)
    b, h, w, c = src.shape
    hs, src = self.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + self.config.num_mask_tokens, :]

    src = src.reshape(b, h, w, c)
    up = gelu_exact(self.upscale_norm(self.upscale_conv1(src)))
    up = gelu_exact(self.upscale_conv2(up))                     # [N, 4H, 4W, C/8]
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i, :])
                          for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)
    masks = jnp.einsum("nkc,nhwc->nkhw", hyper_in, up)           # [N, num_mask_tokens, 4H, 4W]
    iou_pred = self.iou_prediction_head(iou_token_out)

    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice], iou_pred[:, mask_slice]
