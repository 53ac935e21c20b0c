"""Configurations of the OMG-Seg vision trunk (OpenCLIP ConvNeXt) and its pixel decoder (mmdet
`MSDeformAttnPixelDecoder`), as used by OMG-LLaVA (spec omg_llava.md 1.1, 1.2).

`dtype` is the compute dtype; parameters are stored in `param_dtype`. Normalisation statistics,
softmaxes and deformable-attention sampling locations are computed in float32 whatever `dtype` is.
`.large()` / `.omg()` are the release sizes; `.tiny()` is small enough for CPU parity tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
  """timm ConvNeXt trunk: stem conv 4x4/4 + LN2d, then 4 stages (stages 2-4 start with LN2d +
  conv 2x2/2). Outputs have strides 4, 8, 16, 32 and `dims` channels."""
  depths: tuple[int, ...] = (3, 3, 27, 3)
  dims: tuple[int, ...] = (192, 384, 768, 1536)
  in_chans: int = 3
  mlp_ratio: int = 4
  kernel_size: int = 7          # depthwise conv of each block (padding kernel_size // 2)
  ln_eps: float = 1e-6          # timm default for every ConvNeXt LayerNorm / LayerNorm2d
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.depths) != 4 or len(self.dims) != 4:
      raise ValueError(f"ConvNeXtConfig: need 4 stages, got depths {self.depths}, dims {self.dims}")
    if min(self.depths) < 1 or min(self.dims) < 1:
      raise ValueError(f"ConvNeXtConfig: depths {self.depths} and dims {self.dims} must be >= 1")
    if self.kernel_size % 2 != 1:
      raise ValueError(f"ConvNeXtConfig: kernel_size {self.kernel_size} must be odd")

  @classmethod
  def large(cls, **kw) -> "ConvNeXtConfig":
    """ConvNeXt-L (OpenCLIP `convnext_large_d_320` trunk)."""
    return cls(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **kw)

  @classmethod
  def tiny(cls, **kw) -> "ConvNeXtConfig":
    """A CPU-test size with the same structure."""
    return cls(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), **kw)


@dataclasses.dataclass(frozen=True)
class PixelDecoderConfig:
  """mmdet `MSDeformAttnPixelDecoder` with a `Mask2FormerTransformerEncoder` of post-norm
  deformable-attention layers.

  `in_channels` / `strides` list all backbone levels, high resolution first (strides 4..32). The
  encoder runs on the last `num_levels` of them; the remaining ones go through the FPN tail.
  """
  in_channels: tuple[int, ...] = (192, 384, 768, 1536)
  strides: tuple[int, ...] = (4, 8, 16, 32)
  feat_channels: int = 256      # = out_channels of the mask features
  out_channels: int = 256
  num_heads: int = 8
  num_levels: int = 3           # encoder levels (strides 32, 16, 8)
  num_points: int = 4
  num_layers: int = 6
  ffn_dim: int = 1024
  gn_groups: int = 32
  gn_eps: float = 1e-5          # torch GroupNorm default
  ln_eps: float = 1e-5          # mmdet encoder norms are nn.LayerNorm (torch default eps)
  num_pos_feats: int = 128      # SinePositionalEncoding(num_feats=128): 2 * 128 = feat_channels
  query_chunk: int | None = 4096  # deformable-attention queries per chunk (None: all at once)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.in_channels) != len(self.strides):
      raise ValueError(f"PixelDecoderConfig: {len(self.in_channels)} in_channels vs "
                       f"{len(self.strides)} strides")
    if not 1 <= self.num_levels < len(self.in_channels):
      # The FPN tail needs at least one level outside the encoder (the stride-4 map).
      raise ValueError(f"PixelDecoderConfig: num_levels {self.num_levels} must be in "
                       f"[1, {len(self.in_channels) - 1}]")
    if self.feat_channels % self.num_heads:
      raise ValueError(f"PixelDecoderConfig: feat_channels {self.feat_channels} not divisible by "
                       f"num_heads {self.num_heads}")
    for name in ("feat_channels", "out_channels"):
      if getattr(self, name) % self.gn_groups:
        raise ValueError(f"PixelDecoderConfig: {name} {getattr(self, name)} not divisible by "
                         f"gn_groups {self.gn_groups}")
    if 2 * self.num_pos_feats != self.feat_channels:
      raise ValueError(f"PixelDecoderConfig: 2 * num_pos_feats ({2 * self.num_pos_feats}) must "
                       f"equal feat_channels ({self.feat_channels})")
    if self.query_chunk is not None and self.query_chunk < 1:
      raise ValueError(f"PixelDecoderConfig: query_chunk {self.query_chunk} must be >= 1 or None")

  @property
  def head_dim(self) -> int:
    return self.feat_channels // self.num_heads

  @classmethod
  def omg(cls, **kw) -> "PixelDecoderConfig":
    """OMG-Seg / OMG-LLaVA: ConvNeXt-L inputs, 256 channels, 6 layers, 8 heads, 3 levels."""
    return cls(**kw)

  @classmethod
  def tiny(cls, in_channels: tuple[int, ...] = (8, 16, 32, 64), **kw) -> "PixelDecoderConfig":
    """A CPU-test size matching `ConvNeXtConfig.tiny()` outputs."""
    kw = {"feat_channels": 32, "out_channels": 32, "num_heads": 4, "gn_groups": 4,
          "num_layers": 2, "ffn_dim": 64, "num_pos_feats": 16, "query_chunk": None, **kw}
    return cls(in_channels=tuple(in_channels), **kw)
