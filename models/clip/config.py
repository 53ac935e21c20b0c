"""CLIP vision tower configuration (GLaMM's ViT-L/14 @ 336 and a tiny test size)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from models.cudnn import check_impl


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of a CLIP ViT vision tower (HF `CLIPVisionModel` layout).

  Tokens: 1 CLS + (image_size / patch_size)^2 patches. `dtype` is the compute dtype,
  `param_dtype` the storage dtype of the weights.
  """
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Runtime choice, not a checkpoint property (`models.cudnn.ATTENTION_IMPLS`): "auto" is cuDNN
  # flash attention on an NVIDIA GPU in bf16/fp16, XLA elsewhere.
  attention_impl: str = "auto"

  def __post_init__(self):
    check_impl("CLIPVisionConfig", self.attention_impl)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")
    if self.hidden_act not in ("quick_gelu", "gelu"):
      raise ValueError(f"CLIPVisionConfig: unsupported hidden_act {self.hidden_act!r}")

  @property
  def grid(self) -> int:
    """Patches per side (24 for ViT-L/14 @ 336)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def clip_vit_l14_336(cls, **overrides) -> "CLIPVisionConfig":
    """`openai/clip-vit-large-patch14-336` (glamm.md §1.1): 577 tokens, 24 layers, quick_gelu."""
    base = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return cls(**{**base, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "CLIPVisionConfig":
    """A 4x4-patch tower for CPU tests."""
    base = dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                num_layers=3, num_heads=4, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return cls(**{**base, **overrides})
