"""OMG-Seg's Mask2Former decoder (`Mask2FormerVideoSemSamHead`, image mode) and its [SEG] mask path.

Spec: /work/shared/specs/omg_llava.md sections 1.3 and 1.7. Everything is channels-last:
mask features [B, Hm, Wm, C] (stride 4), memories [B, h_i, w_i, C] for levels i = 0, 1, 2
(strides 32, 16, 8: low resolution first, as the pixel decoder returns them).

Per decoder step (10 heads around 9 layers):
  head(q):  mask_pred = einsum(mask_embed(post_norm(q)), mask_features)            [B, Q, Hm, Wm]
            attn_mask = sigmoid(bilinear_resize(mask_pred, next memory size)) < 0.5   (True = masked)
  layer i:  attention rows that are fully masked are unmasked, then
            x = LN(x + MHA(q=x+query_pos, k=mem_l+key_pos, v=mem_l, mask))   l = i % 3,
            x = LN(x + MHA(q=k=x+query_pos, v=x)),  x = LN(x + FFN(x))
            where mem_l = memory level l + level_embed[l] and key_pos = sine_3d of its size.
Only the last head's class logits are needed (GCG reads the final predictions), so the
classification branch runs once, after layer 9; the mask branch runs after every layer because
it drives the next attention mask.

The attention is `torch.nn.MultiheadAttention` maths with the packed `in_proj` kept as one
[C, 3C] kernel (columns q | k | v), so the checkpoint table stays one-to-one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding
from models.omg_seg.positional import sine_3d
from models.sam.layers import LayerNorm, Linear, Mlp


@dataclasses.dataclass(frozen=True)
class Mask2FormerConfig:
  """Sizes of the OMG-Seg Mask2Former head.

  Attributes:
    num_queries: learned object queries (300).
    num_layers: transformer decoder layers (9).
    embed_dim: query / memory / mask-feature width C (256).
    num_heads: attention heads (8).
    ffn_dim: decoder FFN hidden width (2048).
    num_levels: memory levels cycled through by the layers (3).
    num_classes: foreground classes (133 = 80 thing + 53 stuff); one background logit is appended.
    cls_embed_dim: width of the fixed class text embeddings (768, CLIP ConvNeXt-L).
    logit_scale: the class logits are multiplied by exp(logit_scale) (log(1/0.01)).
    ln_eps: epsilon of every LayerNorm of the head (torch default 1e-5).
    llm_decoder: also build `transformer_decoder_llm` / `mask_embed_llm`, the fine-tuned copies
      the GCG / refseg checkpoints carry for [SEG] decoding (spec 1.7 step 4).
  """
  num_queries: int = 300
  num_layers: int = 9
  embed_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_levels: int = 3
  num_classes: int = 133
  cls_embed_dim: int = 768
  logit_scale: float = 4.6052
  ln_eps: float = 1e-5
  llm_decoder: bool = True

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"Mask2FormerConfig: embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.embed_dim % 4:
      # sine_3d(num_feats = C / 2) needs an even num_feats.
      raise ValueError(f"Mask2FormerConfig: embed_dim {self.embed_dim} must be a multiple of 4")

  @classmethod
  def omg(cls, **kw) -> "Mask2FormerConfig":
    """OMG-Seg ConvNeXt-L head as used by OMG-LLaVA."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> "Mask2FormerConfig":
    """A small head for parity tests."""
    base = dict(num_queries=12, num_layers=3, embed_dim=32, num_heads=4, ffn_dim=64,
                num_levels=3, num_classes=5, cls_embed_dim=16)
    base.update(kw)
    return cls(**base)


# ------------------------------------------------------------------------------------------------
# Functional pieces.

def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[..., H, W] -> [..., h, w]: `F.interpolate(mode='bilinear', align_corners=False)`.

  `antialias=False` is what makes `jax.image.resize` match torch when down-sampling (the JAX
  default low-pass filters and differs by O(1)); up-sampling is the same either way.
  """
  return jax.image.resize(x, x.shape[:-2] + tuple(size), "bilinear", antialias=False)


def attention_mask(mask_pred: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, Q, Hm, Wm] mask logits -> [B, Q, h*w] bool, True = masked (probability below 0.5).

  Rows masked everywhere are *not* reset here; `reset_empty_rows` does that before each layer,
  as the reference does.
  """
  small = resize_bilinear(mask_pred, size)
  # sigmoid < 0.5 as the reference writes it (not `< 0`): identical except where the fp32 sigmoid
  # of a tiny negative logit rounds to 0.5, which then also stays unmasked here.
  return (jax.nn.sigmoid(small) < 0.5).reshape(small.shape[:2] + (-1,))


def reset_empty_rows(mask: jax.Array) -> jax.Array:
  """[..., K] bool, True = masked: rows masked at every key are unmasked entirely (a query whose
  mask is empty attends to the whole memory instead of producing NaNs)."""
  full = jnp.all(mask, axis=-1, keepdims=True)
  return mask & ~full


def mask_pool(mask_features: jax.Array, mask_pred: jax.Array) -> jax.Array:
  """Mean of `mask_features` [B, H, W, C] over the pixels where `mask_pred` [B, Q, H, W] > 0.

  The denominator carries the reference's +1e-8, so an empty mask pools to zeros.
  Returns [B, Q, C].
  """
  m = (mask_pred > 0).astype(mask_features.dtype)
  denom = jnp.sum(m, axis=(-2, -1), keepdims=True) + 1e-8
  return jnp.einsum("bhwc,bqhw->bqc", mask_features, m / denom)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`F.normalize(x, dim=-1)`: x / max(||x||, eps)."""
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(n, eps)


# ------------------------------------------------------------------------------------------------
# Modules.

class MultiheadAttention(nnx.Module):
  """`torch.nn.MultiheadAttention` (batch_first, no dropout) with mmcv's residual.

  `in_proj` holds the packed [C, 3C] kernel (columns: q | k | v, i.e. torch's `in_proj_weight`
  [3C, C] transposed) and its [3C] bias.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.dim = dim
    self.in_proj = Linear(dim, 3 * dim, ("vis_embed", None), rngs=rngs)
    self.out_proj = Linear(dim, dim, (None, "vis_embed"), rngs=rngs)

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """query [B, Lq, C], key / value [B, Lk, C] (positions already added), mask [B, Lq, Lk] bool
    (True = masked; no row may be fully masked) -> attention output [B, Lq, C] (no residual)."""
    c, h = self.dim, self.num_heads
    d = c // h
    w = self.in_proj.kernel[...]
    b = self.in_proj.bias[...]
    q = query @ w[:, :c] + b[:c]
    k = key @ w[:, c:2 * c] + b[c:2 * c]
    v = value @ w[:, 2 * c:] + b[2 * c:]
    split = lambda t: t.reshape(t.shape[:2] + (h, d))
    q, k, v = split(q), split(k), split(v)
    # torch scales q before the product.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(d)), k)
    if mask is not None:
      scores = jnp.where(mask[:, None], -jnp.inf, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(query.shape[:2] + (c,))
    return self.out_proj(out)


class FFN(nnx.Module):
  """mmcv `FFN`: Linear -> ReLU -> Linear (keys `ffn.layers.0.0`, `ffn.layers.1`)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = Linear(dim, hidden, ("vis_embed", "vis_mlp"), rngs=rngs)
    self.fc2 = Linear(hidden, dim, ("vis_mlp", "vis_embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(x)))


class DecoderLayer(nnx.Module):
  """mmdet `Mask2FormerTransformerDecoderLayer` (post-norm: cross-attn, self-attn, FFN)."""

  def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
    c = cfg.embed_dim
    self.cross_attn = MultiheadAttention(c, cfg.num_heads, rngs=rngs)
    self.self_attn = MultiheadAttention(c, cfg.num_heads, rngs=rngs)
    self.ffn = FFN(c, cfg.ffn_dim, rngs=rngs)
    self.norms = nnx.List([LayerNorm(c, eps=cfg.ln_eps, rngs=rngs) for _ in range(3)])

  def __call__(self, x: jax.Array, query_pos: jax.Array, memory: jax.Array, key_pos: jax.Array,
               cross_mask: jax.Array | None) -> jax.Array:
    """x, query_pos [B, Q, C]; memory [B, K, C] (level embedding added); key_pos [K, C] or
    [B, K, C]; cross_mask [B, Q, K] bool (True = masked, empty rows already reset) -> [B, Q, C]."""
    x = self.norms[0](x + self.cross_attn(x + query_pos, memory + key_pos, memory, cross_mask))
    qk = x + query_pos
    x = self.norms[1](x + self.self_attn(qk, qk, x))
    return self.norms[2](x + self.ffn(x))


class TransformerDecoder(nnx.Module):
  """mmdet `Mask2FormerTransformerDecoder`: `layers` and the final `post_norm`."""

  def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.post_norm = LayerNorm(cfg.embed_dim, eps=cfg.ln_eps, rngs=rngs)


def _mask_mlp(cfg: Mask2FormerConfig, out_dim: int, rngs: nnx.Rngs) -> Mlp:
  c = cfg.embed_dim
  return Mlp(c, c, out_dim, 3, rngs=rngs)


class MaskPoolingProj(nnx.Module):
  """`mask_pooling_proj`: Sequential(LayerNorm, Linear) (keys `.0`, `.1`)."""

  def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
    self.norm = LayerNorm(cfg.embed_dim, eps=cfg.ln_eps, rngs=rngs)
    self.linear = Linear(cfg.embed_dim, cfg.embed_dim, ("vis_embed", None), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(self.norm(x))


class Mask2FormerDecoder(nnx.Module):
  """OMG-Seg's Mask2Former head after the pixel decoder (image mode, no box queries).

  Parameters (checkpoint names in `models/omg_seg/params_decoder.py`): `query_feat`,
  `query_embed` [Q, C], `level_embed` [L, C], `transformer_decoder`, `mask_embed`, `cls_proj`,
  `mask_pooling_proj` and, with `cfg.llm_decoder`, `transformer_decoder_llm` / `mask_embed_llm`.
  The class text embeddings are not parameters: `__call__` takes them as an array.
  """

  def __init__(self, cfg: Mask2FormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, q, lv = cfg.embed_dim, cfg.num_queries, cfg.num_levels
    emb = nnx.initializers.normal(1.0)
    self.query_feat = nnx.Param(sharding.with_names(emb, None, "vis_embed")(
        rngs.params(), (q, c), jnp.float32))
    self.query_embed = nnx.Param(sharding.with_names(emb, None, "vis_embed")(
        rngs.params(), (q, c), jnp.float32))
    self.level_embed = nnx.Param(sharding.with_names(emb, None, "vis_embed")(
        rngs.params(), (lv, c), jnp.float32))
    self.transformer_decoder = TransformerDecoder(cfg, rngs=rngs)
    self.mask_embed = _mask_mlp(cfg, c, rngs)
    self.cls_proj = _mask_mlp(cfg, cfg.cls_embed_dim, rngs)
    self.mask_pooling_proj = MaskPoolingProj(cfg, rngs=rngs)
    self.transformer_decoder_llm = nnx.data(None)
    self.mask_embed_llm = nnx.data(None)
    if cfg.llm_decoder:
      self.transformer_decoder_llm = TransformerDecoder(cfg, rngs=rngs)
      self.mask_embed_llm = _mask_mlp(cfg, c, rngs)

  # -- shared pieces ------------------------------------------------------------------------------

  def _check_inputs(self, mask_features: jax.Array, memories: Sequence[jax.Array]) -> None:
    c, lv = self.cfg.embed_dim, self.cfg.num_levels
    if mask_features.ndim != 4 or mask_features.shape[-1] != c:
      raise ValueError(f"Mask2FormerDecoder: mask_features must be [B, Hm, Wm, {c}], got "
                       f"{mask_features.shape}")
    if len(memories) != lv:
      raise ValueError(f"Mask2FormerDecoder: expected {lv} memory levels, got {len(memories)}")
    for i, m in enumerate(memories):
      if m.ndim != 4 or m.shape[-1] != c:
        raise ValueError(f"Mask2FormerDecoder: memory level {i} must be [B, h, w, {c}], got "
                         f"{m.shape}")

  def _check_class_embed(self, class_embed: jax.Array) -> None:
    cfg = self.cfg
    if class_embed.ndim != 3 or class_embed.shape[0] != cfg.num_classes or \
        class_embed.shape[2] != cfg.cls_embed_dim:
      raise ValueError(f"Mask2FormerDecoder: class_embed must be [{cfg.num_classes}, P, "
                       f"{cfg.cls_embed_dim}], got {class_embed.shape}")

  def _levels(self, memories: Sequence[jax.Array]):
    """[(memory + level_embed [B, h*w, C], key_pos [h*w, C], (h, w))] per level."""
    c = self.cfg.embed_dim
    out = []
    for i, m in enumerate(memories):
      b, h, w, _ = m.shape
      mem = m.reshape(b, h * w, c) + self.level_embed[...][i]
      pos = sine_3d(h, w, c // 2).reshape(h * w, c).astype(m.dtype)
      out.append((mem, pos, (h, w)))
    return out

  def _run(self, decoder: TransformerDecoder, mask_embed: Mlp, query: jax.Array,
           query_pos: jax.Array, mask_features: jax.Array, memories: Sequence[jax.Array]
           ) -> tuple[jax.Array, jax.Array]:
    """The 9 masked-attention layers with a mask head around each.

    Returns (query after the last layer, before post_norm [B, Q, C]; last mask logits
    [B, Q, Hm, Wm]).
    """
    levels = self._levels(memories)
    nl = len(levels)

    def head(x, size):
      mask_pred = jnp.einsum("bqc,bhwc->bqhw", mask_embed(decoder.post_norm(x)), mask_features)
      return mask_pred, attention_mask(mask_pred, size)

    _, mask = head(query, levels[0][2])
    x = query
    for i, layer in enumerate(decoder.layers):
      mem, pos, _ = levels[i % nl]
      x = layer(x, query_pos, mem, pos, reset_empty_rows(mask))
      mask_pred, mask = head(x, levels[(i + 1) % nl][2])
    return x, mask_pred

  def classify(self, query: jax.Array, mask_pred: jax.Array, mask_features: jax.Array,
               class_embed: jax.Array) -> jax.Array:
    """Open-vocabulary class logits of the sphere-cls head.

    Args:
      query: [B, Q, C] decoder output before post_norm.
      mask_pred: [B, Q, Hm, Wm] mask logits of the same step.
      mask_features: [B, Hm, Wm, C].
      class_embed: [K, P, D] unit-norm class text embeddings (K = num_classes, P prototypes).
    Returns:
      [B, Q, K + 1] logits; the last (background) column is exactly 0, as the reference's zero
      background prototype gives.
    """
    cfg = self.cfg
    self._check_class_embed(class_embed)
    normed = self.transformer_decoder.post_norm(query)
    pooled = self.mask_pooling_proj(mask_pool(mask_features, mask_pred))
    emb = l2_normalize(self.cls_proj(pooled + normed))
    logits = jnp.max(jnp.einsum("bqd,kpd->bqkp", emb, class_embed.astype(emb.dtype)), axis=-1)
    logits = jnp.exp(jnp.float32(cfg.logit_scale)).astype(emb.dtype) * logits
    return jnp.concatenate([logits, jnp.zeros(logits.shape[:-1] + (1,), logits.dtype)], axis=-1)

  # -- entry points -------------------------------------------------------------------------------

  def __call__(self, mask_features: jax.Array, memories: Sequence[jax.Array],
               class_embed: jax.Array) -> dict[str, jax.Array]:
    """Panoptic queries of one image batch.

    Args:
      mask_features: [B, Hm, Wm, C] (stride 4).
      memories: 3 arrays [B, h_i, w_i, C], strides 32, 16, 8.
      class_embed: [num_classes, P, cls_embed_dim] fixed class text embeddings.
    Returns:
      dict with `query_feat_last` [B, Q, C] (after layer 9, before post_norm), `query_pos`
      [B, Q, C] (the learned query_embed, broadcast), `cls_logits` [B, Q, num_classes + 1] and
      `mask_logits` [B, Q, Hm, Wm] of the last step.
    """
    self._check_inputs(mask_features, memories)
    self._check_class_embed(class_embed)
    b = mask_features.shape[0]
    dtype = mask_features.dtype
    q = jnp.broadcast_to(self.query_feat[...].astype(dtype), (b,) + self.query_feat.shape)
    qpos = jnp.broadcast_to(self.query_embed[...].astype(dtype), (b,) + self.query_embed.shape)
    x, mask_pred = self._run(self.transformer_decoder, self.mask_embed, q, qpos, mask_features,
                             memories)
    cls = self.classify(x, mask_pred, mask_features, class_embed)
    return dict(query_feat_last=x, query_pos=qpos, cls_logits=cls, mask_logits=mask_pred)

  def forward_llm_seg(self, query_content: jax.Array, query_pos: jax.Array,
                      mask_features: jax.Array, memories: Sequence[jax.Array],
                      batch_idx: jax.Array | None = None) -> jax.Array:
    """Mask logits of [SEG] queries (spec 1.7): one query per [SEG], each its own batch element.

    Uses `transformer_decoder_llm` / `mask_embed_llm` when the config builds them, otherwise the
    main decoder (the reference falls back the same way without `require_omg_decoder`).

    Args:
      query_content: [N, C] (first half of projector_text2vision's output).
      query_pos: [N, C] (second half).
      mask_features: [B, Hm, Wm, C] cached from the image pass.
      memories: 3 arrays [B, h_i, w_i, C] cached from the image pass.
      batch_idx: [N] int, the image of each [SEG]. Without it B must be N (already gathered) or
        1 (broadcast to every [SEG]).
    Returns:
      [N, Hm, Wm] mask logits (the last of the 10 predictions).
    """
    self._check_inputs(mask_features, memories)
    c = self.cfg.embed_dim
    if query_content.ndim != 2 or query_content.shape[-1] != c or \
        query_pos.shape != query_content.shape:
      raise ValueError(f"forward_llm_seg: query_content and query_pos must both be [N, {c}], got "
                       f"{query_content.shape} and {query_pos.shape}")
    n = query_content.shape[0]
    if batch_idx is not None:
      if batch_idx.shape != (n,):
        raise ValueError(f"forward_llm_seg: batch_idx must be [{n}], got {batch_idx.shape}")
      mask_features = mask_features[batch_idx]
      memories = [m[batch_idx] for m in memories]
    else:
      b = mask_features.shape[0]
      if b == 1 and n != 1:
        mask_features = jnp.broadcast_to(mask_features, (n,) + mask_features.shape[1:])
        memories = [jnp.broadcast_to(m, (n,) + m.shape[1:]) for m in memories]
      elif b != n:
        raise ValueError(f"forward_llm_seg: {n} queries but batch {b} features; pass batch_idx")
    decoder, mask_embed = self.transformer_decoder, self.mask_embed
    if self.transformer_decoder_llm is not None:
      decoder, mask_embed = self.transformer_decoder_llm, self.mask_embed_llm
    dtype = mask_features.dtype
    _, mask_pred = self._run(decoder, mask_embed, query_content[:, None].astype(dtype),
                             query_pos[:, None].astype(dtype), mask_features, memories)
    return mask_pred[:, 0]
