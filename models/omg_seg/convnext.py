"""OpenCLIP / timm ConvNeXt trunk (OMG-Seg `backbone`), channels-last.

pixels [B, H, W, 3] -> stem (conv 4x4/4 + LN2d) -> layer1 .. layer4 -> four maps
[B, H/4, W/4, C0], [B, H/8, W/8, C1], [B, H/16, W/16, C2], [B, H/32, W/32, C3].
Stage k >= 2 starts with LN2d + conv 2x2/2. Block: depthwise 7x7 -> LN -> Linear C->4C -> exact
GELU -> Linear 4C->C -> * gamma -> + residual (drop-path is identity at inference). Attribute names
follow the OMG checkpoint (`backbone.stem.{0,1}`, `backbone.layer{k}.downsample.{0,1}`,
`backbone.layer{k}.blocks.{j}.*`; `models/omg_seg/params_vision.py` maps them).
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding
from models.activations import gelu_exact
from models.omg_seg.config import ConvNeXtConfig
from models.omg_seg.vision_layers import Conv, LayerNorm, Linear


class Stem(nnx.Module):
  """conv 4x4 stride 4 (bias) + LayerNorm2d: [B, H, W, 3] -> [B, H/4, W/4, C0]."""

  def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.conv = Conv(cfg.in_chans, cfg.dims[0], 4, stride=4, rngs=rngs, **dt)
    self.norm = LayerNorm(cfg.dims[0], eps=cfg.ln_eps, **dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class Downsample(nnx.Module):
  """LayerNorm2d + conv 2x2 stride 2 (bias): [B, H, W, C_in] -> [B, H/2, W/2, C_out]."""

  def __init__(self, c_in: int, c_out: int, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.norm = LayerNorm(c_in, eps=cfg.ln_eps, **dt)
    self.conv = Conv(c_in, c_out, 2, stride=2, rngs=rngs, **dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.norm(x))


class Block(nnx.Module):
  """timm `ConvNeXtBlock` (conv_mlp=False, layer scale): [B, H, W, C] -> [B, H, W, C]."""

  def __init__(self, dim: int, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    k = cfg.kernel_size
    self.conv_dw = Conv(dim, dim, k, padding=k // 2, groups=dim, rngs=rngs, **dt)
    self.norm = LayerNorm(dim, eps=cfg.ln_eps, **dt)
    self.fc1 = Linear(dim, cfg.mlp_ratio * dim, ("vis_embed", "vis_mlp"), rngs=rngs, **dt)
    self.fc2 = Linear(cfg.mlp_ratio * dim, dim, ("vis_mlp", "vis_embed"), rngs=rngs, **dt)
    # timm's layer-scale init is 1e-6; the checkpoint overwrites it.
    self.gamma = sharding.param(jnp.full((dim,), 1e-6, cfg.param_dtype), "vis_embed")
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.fc2(gelu_exact(self.fc1(self.norm(self.conv_dw(x)))))
    return x.astype(self.dtype) + y * self.gamma[...].astype(self.dtype)


class Stage(nnx.Module):
  """One ConvNeXt stage: optional `downsample`, then `blocks`."""

  def __init__(self, index: int, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    dim = cfg.dims[index]
    # Stage 1 has no downsample (the stem already gives stride 4 and dims[0] channels).
    self.downsample = (Downsample(cfg.dims[index - 1], dim, cfg, rngs=rngs) if index > 0
                       else nnx.data(None))
    self.blocks = nnx.List([Block(dim, cfg, rngs=rngs) for _ in range(cfg.depths[index])])

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.downsample is not None:
      x = self.downsample(x)
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """ConvNeXt trunk returning the four stage outputs (all stages computed, no head)."""

  def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.stem = Stem(cfg, rngs=rngs)
    self.layer1 = Stage(0, cfg, rngs=rngs)
    self.layer2 = Stage(1, cfg, rngs=rngs)
    self.layer3 = Stage(2, cfg, rngs=rngs)
    self.layer4 = Stage(3, cfg, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """pixels [B, H, W, in_chans] (H, W multiples of 32) -> stride 4, 8, 16, 32 maps
    [B, H/4, W/4, C0], [B, H/8, W/8, C1], [B, H/16, W/16, C2], [B, H/32, W/32, C3]."""
    if pixels.ndim != 4 or pixels.shape[-1] != self.cfg.in_chans:
      raise ValueError(f"ConvNeXt: expected pixels [B, H, W, {self.cfg.in_chans}], got "
                       f"{pixels.shape}")
    if pixels.shape[1] % 32 or pixels.shape[2] % 32:
      raise ValueError(f"ConvNeXt: H, W must be multiples of 32, got {pixels.shape[1:3]}")
    x = self.stem(pixels)
    outs = []
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = stage(x)
      outs.append(x)
    return tuple(outs)
