"""Channels-last building blocks of the OMG-Seg vision modules: Linear, Conv, LayerNorm, GroupNorm.

Weights are stored in `param_dtype` and used in the compute `dtype`; normalisation statistics are
always float32 (the output has the compute dtype). Every parameter carries logical axis names
(`models/sharding.py`); the vision widths are replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding
from models.sam.layers import layer_norm_f32

# Random weights are placeholders until a checkpoint is loaded.
_FAN_IN = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


class Linear(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel [d_in, d_out] (torch weight transposed)."""

  def __init__(self, d_in: int, d_out: int, names: Sequence[str | None] = ("vis_embed", None), *,
               use_bias: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = nnx.Param(sharding.with_names(_FAN_IN, *names)(
        rngs.params(), (d_in, d_out), param_dtype))
    self.bias = nnx.data(None)  # data, so a Param may replace it
    if use_bias:
      self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, names[1])(
          None, (d_out,), param_dtype))

  def __call__(self, x: jax.Array, dtype: Any = None) -> jax.Array:
    """x [..., d_in] -> [..., d_out] in `dtype` (default: the layer's compute dtype)."""
    dtype = self.dtype if dtype is None else dtype
    y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class Conv(nnx.Module):
  """PyTorch `nn.Conv2d` on NHWC activations with an HWIO kernel (cross-correlation, no flip).

  `groups` = in_chans gives the depthwise conv (kernel [kh, kw, 1, out]).
  """

  def __init__(self, in_chans: int, out_chans: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, groups: int = 1, use_bias: bool = True,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if in_chans % groups or out_chans % groups:
      raise ValueError(f"Conv: in {in_chans} / out {out_chans} channels not divisible by "
                       f"groups {groups}")
    self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype
    names = ("kernel_h", "kernel_w", "conv_in", "conv_out")
    self.kernel = nnx.Param(sharding.with_names(_FAN_IN, *names)(
        rngs.params(), (kernel_size, kernel_size, in_chans // groups, out_chans), param_dtype))
    self.bias = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, "conv_out")(
          None, (out_chans,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, in_chans] -> [B, H', W', out_chans]."""
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
        ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, biased variance (torch `nn.LayerNorm`, and timm `LayerNorm2d`,
  which normalises NCHW channels: the last axis here)."""

  def __init__(self, dim: int, *, eps: float, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(sharding.with_names(nnx.initializers.ones, "norm")(
        None, (dim,), param_dtype))
    self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, "norm")(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm_f32(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch `nn.GroupNorm` on NHWC: statistics over (H, W, C / groups) per sample and group."""

  def __init__(self, num_groups: int, dim: int, *, eps: float, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    if dim % num_groups:
      raise ValueError(f"GroupNorm: {dim} channels not divisible by {num_groups} groups")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    self.scale = nnx.Param(sharding.with_names(nnx.initializers.ones, "norm")(
        None, (dim,), param_dtype))
    self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, "norm")(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    centred = g - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)
