"""Small building blocks shared by the SAM modules: linear maps, LayerNorm, MLPs, buffers.

All layers work channels-last. Parameters carry logical axis names (`models/sharding.py`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding


# Random weights are only placeholders until a checkpoint is loaded; a plain normal traces small.
_CONV_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


class Buffer(nnx.Variable):
  """A non-trainable array that is read from the checkpoint (a PyTorch `register_buffer`)."""


class Linear(nnx.Module):
  """y = x . kernel + bias, with multi-dimensional input and output feature shapes.

  `kernel` has shape `in_shape + out_shape`; the last `len(in_shape)` axes of `x` are contracted.
  Splitting a PyTorch Linear's output into e.g. (3, heads, head_dim) this way keeps the memory
  order of the PyTorch weight (`[out, in]` transposed, then reshaped C-order).

  Args:
    in_shape: feature shape consumed, e.g. `(1280,)` or `(heads, head_dim)`.
    out_shape: feature shape produced, e.g. `(3, heads, head_dim)`.
    names: logical axis names, one per kernel axis (`len(in_shape) + len(out_shape)`).
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
               names: Sequence[str | None], *, use_bias: bool = True, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    if len(names) != len(in_shape) + len(out_shape):
      raise ValueError(f"Linear {in_shape}->{out_shape}: got {len(names)} axis names {names}")
    self.n_in = len(in_shape)
    n_out = len(out_shape)
    # Zero initialisers get no key: every `rngs.params()` call updates an RNG counter, which is
    # slow inside `nnx.eval_shape` of a large model (flax re-inspects the traced counter).
    init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=tuple(range(self.n_in)),
        out_axis=tuple(range(self.n_in, self.n_in + n_out)))
    self.kernel = nnx.Param(sharding.with_names(init, *names)(
        rngs.params(), in_shape + out_shape, param_dtype))
    self.bias = nnx.data(None)  # data, so a Param may replace it
    if use_bias:
      self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, *names[self.n_in:])(
          None, out_shape, param_dtype))

  def __call__(self, x: jax.Array, add_bias: bool = True) -> jax.Array:
    """x [..., *in_shape] -> [..., *out_shape]; `add_bias=False` leaves the bias to the caller."""
    y = jnp.tensordot(x, self.kernel[...], axes=self.n_in)
    if add_bias and self.bias is not None:
      y = y + self.bias[...]
    return y


def layer_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """torch `nn.LayerNorm` over the last axis (biased variance), statistics and affine in fp32;
  returns float32 (callers cast)."""
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  y = centred * jax.lax.rsqrt(var + eps)
  return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with biased variance (both `nn.LayerNorm` and SAM's `LayerNorm2d`,
  which normalises the channel axis of NCHW: the last axis in our NHWC layout).

  Statistics are computed in fp32 whatever the input dtype; the output has the input dtype.
  """

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
    del rngs  # deterministic init: ones and zeros, as PyTorch
    self.eps = eps
    self.scale = nnx.Param(sharding.with_names(nnx.initializers.ones, "norm")(
        None, (dim,), param_dtype))
    self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, "norm")(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm_f32(x, self.scale[...], self.bias[...], self.eps).astype(x.dtype)


class MlpBlock(nnx.Module):
  """`lin2(act(lin1(x)))`: SAM's `MLPBlock` (GELU in the encoder, ReLU in the two-way
  transformer)."""

  def __init__(self, dim: int, mlp_dim: int, act: Callable[[jax.Array], jax.Array], *,
               embed_name: str, mlp_name: str, rngs: nnx.Rngs):
    self.act = act
    self.lin1 = Linear(dim, mlp_dim, (embed_name, mlp_name), rngs=rngs)
    self.lin2 = Linear(mlp_dim, dim, (mlp_name, embed_name), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.lin2(self.act(self.lin1(x)))


class Mlp(nnx.Module):
  """`num_layers` Linear layers with ReLU between them: SAM's mask-decoder `MLP` (no sigmoid)."""

  def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *,
               rngs: nnx.Rngs):
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nnx.List([
        Linear(d_in, d_out, ("vis_embed", None), rngs=rngs)
        for d_in, d_out in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class Conv(nnx.Module):
  """2-D convolution, NHWC activations and an HWIO kernel (PyTorch `nn.Conv2d` is OIHW).

  Like PyTorch (and unlike a textbook convolution) this is a cross-correlation: no kernel flip.
  """

  def __init__(self, in_chans: int, out_chans: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, use_bias: bool = True, names: Sequence[str | None] = (
                   "kernel_h", "kernel_w", "conv_in", "conv_out"), rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.stride = stride
    self.padding = padding
    self.kernel = nnx.Param(sharding.with_names(_CONV_INIT, *names)(
        rngs.params(), (kernel_size, kernel_size, in_chans, out_chans), param_dtype))
    self.bias = nnx.data(None)  # data, so a Param may replace it
    if use_bias:
      self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, names[-1])(
          None, (out_chans,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_chans] -> [B, H', W', out_chans]."""
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), ((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class ConvTranspose2x2(nnx.Module):
  """`nn.ConvTranspose2d(kernel_size=2, stride=2)`: each input pixel paints its own 2x2 block.

  With kernel == stride the blocks do not overlap, so out[n, 2i+a, 2j+b, o] =
  bias[o] + sum_c x[n, i, j, c] * kernel[a, b, c, o]; an einsum and a reshape, with no kernel
  flip to get wrong. `kernel` is stored [kh, kw, in, out] (PyTorch stores [in, out, kh, kw]).
  """

  def __init__(self, in_chans: int, out_chans: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.kernel = nnx.Param(sharding.with_names(
        _CONV_INIT, "kernel_h", "kernel_w", "conv_in", "conv_out")(
            rngs.params(), (2, 2, in_chans, out_chans), param_dtype))
    self.bias = nnx.Param(sharding.with_names(nnx.initializers.zeros, "conv_out")(
        None, (out_chans,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_chans] -> [B, 2H, 2W, out_chans]."""
    b, h, w, _ = x.shape
    y = jnp.einsum("bijc,pqco->bipjqo", x, self.kernel[...])
    return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...]
