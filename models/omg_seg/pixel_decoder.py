"""mmdet `MSDeformAttnPixelDecoder` (OMG-Seg `panoptic_head.pixel_decoder`), channels-last.

feats (strides 4, 8, 16, 32) ->
  input_convs[i] (1x1 conv + bias, GN) on strides 32, 16, 8 (i = 0, 1, 2: low resolution first)
  -> tokens flattened low-res first, + sine 2-D position + level_encoding[i]
  -> encoder: `num_layers` post-norm layers (deformable attn + res -> LN -> FFN(ReLU) + res -> LN)
  -> memories (encoder output per level, low -> high resolution)
FPN tail: lateral_convs[0] (1x1 conv, no bias, GN) on stride 4 + bilinear upsample (align_corners
False) of the stride-8 memory -> output_convs[0] (3x3 conv, no bias, GN, ReLU) -> mask_feature
(1x1 conv + bias) -> mask features [B, H/4, W/4, out_channels].
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from models import sharding
from models.omg_seg import positional
from models.omg_seg.config import PixelDecoderConfig
from models.omg_seg.ms_deform_attn import MultiScaleDeformableAttention, reference_points
from models.omg_seg.vision_layers import Conv, GroupNorm, LayerNorm, Linear


def resize_bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """torch `F.interpolate(mode='bilinear', align_corners=False)` of NHWC `x` to `hw`.

  `antialias=False` matters: jax's default antialiases when downsampling; torch does not.
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, hw[0], hw[1], c), method="bilinear", antialias=False)


class ConvGN(nnx.Module):
  """mmcv `ConvModule`: conv (`conv`) + GroupNorm (`gn`) + optional ReLU."""

  def __init__(self, c_in: int, c_out: int, kernel_size: int, cfg: PixelDecoderConfig, *,
               use_bias: bool, relu: bool, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.conv = Conv(c_in, c_out, kernel_size, padding=kernel_size // 2, use_bias=use_bias,
                     rngs=rngs, **dt)
    self.gn = GroupNorm(cfg.gn_groups, c_out, eps=cfg.gn_eps, **dt)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.gn(self.conv(x))
    return jax.nn.relu(y) if self.relu else y


class Ffn(nnx.Module):
  """mmcv `FFN` (2 fcs, ReLU, identity added): x + fc2(relu(fc1(x)))."""

  def __init__(self, cfg: PixelDecoderConfig, *, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.fc1 = Linear(cfg.feat_channels, cfg.ffn_dim, ("vis_embed", "vis_mlp"), rngs=rngs, **dt)
    self.fc2 = Linear(cfg.ffn_dim, cfg.feat_channels, ("vis_mlp", "vis_embed"), rngs=rngs, **dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.fc2(jax.nn.relu(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """mmdet `DeformableDetrTransformerEncoderLayer` (post-norm, no dropout at inference)."""

  def __init__(self, cfg: PixelDecoderConfig, *, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.self_attn = MultiScaleDeformableAttention(
        cfg.feat_channels, cfg.num_heads, cfg.num_levels, cfg.num_points,
        query_chunk=cfg.query_chunk, rngs=rngs, **dt)
    self.norm0 = LayerNorm(cfg.feat_channels, eps=cfg.ln_eps, **dt)
    self.ffn = Ffn(cfg, rngs=rngs)
    self.norm1 = LayerNorm(cfg.feat_channels, eps=cfg.ln_eps, **dt)

  def __call__(self, x: jax.Array, pos: jax.Array, ref: np.ndarray,
               shapes: tuple[tuple[int, int], ...]) -> jax.Array:
    """x, pos [B, N, C] -> [B, N, C]."""
    x = self.norm0(self.self_attn(x, query_pos=pos, reference_points=ref, spatial_shapes=shapes))
    return self.norm1(self.ffn(x))


class MSDeformAttnPixelDecoder(nnx.Module):
  """Pixel decoder: backbone maps -> (mask features, multi-scale memories)."""

  def __init__(self, cfg: PixelDecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c = cfg.feat_channels
    n_in = len(cfg.in_channels)
    # Encoder levels from the lowest resolution up: backbone indices n_in-1, ..., n_in-num_levels.
    self.encoder_levels = tuple(range(n_in - 1, n_in - cfg.num_levels - 1, -1))
    self.input_convs = nnx.List([
        ConvGN(cfg.in_channels[i], c, 1, cfg, use_bias=True, relu=False, rngs=rngs)
        for i in self.encoder_levels])
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.level_encoding = nnx.Param(sharding.with_names(
        nnx.initializers.normal(1.0), None, "vis_embed")(
            rngs.params(), (cfg.num_levels, c), cfg.param_dtype))
    # FPN levels not in the encoder, from the lowest resolution down to stride 4.
    self.fpn_levels = tuple(range(n_in - cfg.num_levels - 1, -1, -1))
    self.lateral_convs = nnx.List([
        ConvGN(cfg.in_channels[i], c, 1, cfg, use_bias=False, relu=False, rngs=rngs)
        for i in self.fpn_levels])
    self.output_convs = nnx.List([
        ConvGN(c, c, 3, cfg, use_bias=False, relu=True, rngs=rngs) for _ in self.fpn_levels])
    self.mask_feature = Conv(c, cfg.out_channels, 1, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, feats: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """feats: backbone maps [B, H_i, W_i, in_channels[i]], strides 4, 8, 16, 32.

    Returns:
      mask_features [B, H_0, W_0, out_channels] (stride 4), and the `num_levels` encoder outputs
      [B, h_l, w_l, feat_channels], low -> high resolution (strides 32, 16, 8).
    """
    cfg = self.cfg
    if len(feats) != len(cfg.in_channels):
      raise ValueError(f"MSDeformAttnPixelDecoder: expected {len(cfg.in_channels)} feature maps, "
                       f"got {len(feats)}")
    for i, f in enumerate(feats):
      if f.ndim != 4 or f.shape[-1] != cfg.in_channels[i]:
        raise ValueError(f"MSDeformAttnPixelDecoder: feature {i} must be [B, H, W, "
                         f"{cfg.in_channels[i]}], got {f.shape}")
    b = feats[0].shape[0]
    tokens, pos, shapes = [], [], []
    for i, lvl in enumerate(self.encoder_levels):
      x = self.input_convs[i](feats[lvl])                         # [B, h, w, C]
      h, w = x.shape[1:3]
      shapes.append((h, w))
      tokens.append(x.reshape(b, h * w, -1))
      p = positional.sine_2d(h, w, cfg.num_pos_feats) + self.level_encoding[i].astype(jnp.float32)
      pos.append(p.reshape(1, h * w, -1))
    shapes = tuple(shapes)
    x = jnp.concatenate(tokens, axis=1)
    pos = jnp.broadcast_to(jnp.concatenate(pos, axis=1), x.shape).astype(cfg.dtype)
    # One reference point per token of its own level, used for every level.
    ref = reference_points(shapes)
    for layer in self.layers:
      x = layer(x, pos, ref, shapes)
    memories, start = [], 0
    for h, w in shapes:
      memories.append(x[:, start:start + h * w].reshape(b, h, w, -1))
      start += h * w
    y = memories[-1]
    for i, lvl in enumerate(self.fpn_levels):
      lateral = self.lateral_convs[i](feats[lvl])
      y = self.output_convs[i](lateral + resize_bilinear(y, lateral.shape[1:3]).astype(
          lateral.dtype))
    return self.mask_feature(y), memories
