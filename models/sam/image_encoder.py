"""SAM ViT image encoder (`segment_anything.modeling.ImageEncoderViT`), channels-last.

pixels [B, img, img, 3] -> patch conv -> + pos_embed -> blocks (windowed or global attention with
decomposed relative positions) -> neck (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d)
-> image embedding [B, img/patch, img/patch, out_chans].
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from models import sharding
from models.sam import layers
from models.sam.config import SamImageEncoderConfig
from models.sam.resize import resize_linear


# ------------------------------------------------------------------------------------------------
# Windowing and relative positions (pure functions, tested directly against the reference).

def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """Zero-pads H and W up to multiples of `window` and cuts non-overlapping windows.

  Args:
    x: [B, H, W, C].
    window: window side.
  Returns:
    windows [B * nH * nW, window, window, C] in row-major window order, and the padded (Hp, Wp).
  """
  b, h, w, c = x.shape
  pad_h = (window - h % window) % window   # the height padding goes on axis 1 ...
  pad_w = (window - w % window) % window   # ... the width padding on axis 2 (never swapped)
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
  return x, (hp, wp)


def window_unpartition(windows: jax.Array, window: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: [B * nH * nW, window, window, C] -> [B, H, W, C]."""
  hp, wp = pad_hw
  h, w = hw
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
  return x[:, :h, :w, :]


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative-position embeddings for every (query, key) coordinate pair along one axis.

  Args:
    q_size, k_size: query and key lengths along this axis.
    rel_pos: table [L, D]; linearly resized (PyTorch `mode="linear"`, align_corners=False) to
      2 * max(q_size, k_size) - 1 rows when L differs, as the reference does.
  Returns:
    [q_size, k_size, D]; entry (i, j) is row i - j + k_size - 1 when q_size == k_size (the
    general case scales the shorter side's coordinates).
  """
  max_rel_dist = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] != max_rel_dist:
    rel_pos = resize_linear(rel_pos, max_rel_dist, axis=0)
  # Static float32 coordinate arithmetic as in the reference, truncated to integers (`.long()`).
  f32 = np.float32
  q_coords = np.arange(q_size, dtype=f32)[:, None] * f32(max(k_size / q_size, 1.0))
  k_coords = np.arange(k_size, dtype=f32)[None, :] * f32(max(q_size / k_size, 1.0))
  rel = (q_coords - k_coords) + f32((k_size - 1) * max(q_size / k_size, 1.0))
  return rel_pos[rel.astype(np.int64)]


def add_decomposed_rel_pos(logits: jax.Array, q: jax.Array, rel_pos_h: jax.Array,
                           rel_pos_w: jax.Array) -> jax.Array:
  """Adds the decomposed (MViTv2) relative-position bias to attention logits.

  Args:
    logits: [B, N, H, W, H, W] (query row, query col, key row, key col).
    q: unscaled queries [B, N, H, W, D].
    rel_pos_h, rel_pos_w: tables [Lh, D], [Lw, D].
  Returns:
    logits + q.Rh (broadcast over key columns) + q.Rw (broadcast over key rows), added in that
    order as the reference does.
  """
  h, w = q.shape[2], q.shape[3]
  r_h = get_rel_pos(h, h, rel_pos_h)   # [H, H, D]
  r_w = get_rel_pos(w, w, rel_pos_w)   # [W, W, D]
  rel_h = jnp.einsum("bnhwd,hkd->bnhwk", q, r_h)
  rel_w = jnp.einsum("bnhwd,wkd->bnhwk", q, r_w)
  return logits + rel_h[..., :, None] + rel_w[..., None, :]


# ------------------------------------------------------------------------------------------------
# Modules.

class Attention(nnx.Module):
  """Multi-head self-attention over a 2-D token map, with decomposed relative positions.

  Args:
    rel_size: (H, W) the relative-position tables are sized for (window or full grid).
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, use_rel_pos: bool,
               rel_size: tuple[int, int], rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.qkv = layers.Linear(dim, (3, num_heads, self.head_dim),
                             ("vis_embed", None, "heads", "head_dim"), use_bias=qkv_bias, rngs=rngs)
    self.proj = layers.Linear((num_heads, self.head_dim), dim, ("heads", "head_dim", "vis_embed"),
                              rngs=rngs)
    self.use_rel_pos = use_rel_pos
    if use_rel_pos:
      # Zeros as the reference (rel_pos_zero_init); zero inits take no key (see layers.Linear).
      init = sharding.with_names(nnx.initializers.zeros, "pos", "head_dim")
      self.rel_pos_h = nnx.Param(init(None, (2 * rel_size[0] - 1, self.head_dim)))
      self.rel_pos_w = nnx.Param(init(None, (2 * rel_size[1] - 1, self.head_dim)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, dim] -> [B, H, W, dim]."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x)                                      # [B, H, W, 3, N, D]
    q, k, v = (jnp.moveaxis(qkv[..., i, :, :], 3, 1) for i in range(3))  # [B, N, H, W, D]
    logits = jnp.einsum("bnhwd,bnuvd->bnhwuv", q * self.scale, k)
    if self.use_rel_pos:
      logits = add_decomposed_rel_pos(logits, q, self.rel_pos_h[...], self.rel_pos_w[...])
    logits = logits.reshape(b, self.num_heads, h * w, h * w)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bnkd->bqnd", probs, v.reshape(b, self.num_heads, h * w, self.head_dim))
    return self.proj(out.reshape(b, h, w, self.num_heads, self.head_dim))


class Block(nnx.Module):
  """Pre-norm ViT block; window_size > 0 attends inside zero-padded windows, 0 attends globally.

  Args:
    input_size: token grid (H, W) the global-attention tables are sized for.
  """

  def __init__(self, config: SamImageEncoderConfig, window_size: int,
               input_size: tuple[int, int], *, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.window_size = window_size
    self.norm1 = layers.LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
    self.attn = Attention(
        dim, config.num_heads, qkv_bias=config.qkv_bias, use_rel_pos=config.use_rel_pos,
        rel_size=input_size if window_size == 0 else (window_size, window_size), rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
    self.mlp = layers.MlpBlock(dim, config.mlp_dim, layers.gelu, embed_name="vis_embed",
                               mlp_name="vis_mlp", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, dim], any H and W."""
    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
      h, w = x.shape[1], x.shape[2]
      x, pad_hw = window_partition(x, self.window_size)
      x = self.attn(x)
      x = window_unpartition(x, self.window_size, pad_hw, (h, w))
    else:
      x = self.attn(x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


class ImageEncoder(nnx.Module):
  """`ImageEncoderViT`. Input [B, img, img, in_chans] (normalised, padded), output
  [B, img/patch, img/patch, out_chans]."""

  def __init__(self, config: SamImageEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    self.patch_embed = layers.Conv(
        c.in_chans, c.embed_dim, c.patch_size, stride=c.patch_size,
        names=("kernel_h", "kernel_w", "conv_in", "vis_embed"), rngs=rngs)
    self.pos_embed = nnx.data(None)  # data, so a Param may replace it
    if c.use_abs_pos:
      # A logical name may appear once per array, so only the row axis is called "pos".
      self.pos_embed = nnx.Param(sharding.with_names(
          nnx.initializers.zeros, None, "pos", None, "vis_embed")(
              None, (1, c.grid_size, c.grid_size, c.embed_dim)))
    grid = (c.grid_size, c.grid_size)
    self.blocks = nnx.List([Block(c, c.block_window_size(i), grid, rngs=rngs)
                            for i in range(c.depth)])
    self.neck_conv1 = layers.Conv(c.embed_dim, c.out_chans, 1, use_bias=False, names=(
        "kernel_h", "kernel_w", "vis_embed", "conv_out"), rngs=rngs)
    self.neck_norm1 = layers.LayerNorm(c.out_chans, eps=c.neck_norm_eps, rngs=rngs)
    self.neck_conv2 = layers.Conv(c.out_chans, c.out_chans, 3, padding=1, use_bias=False,
                                  rngs=rngs)
    self.neck_norm2 = layers.LayerNorm(c.out_chans, eps=c.neck_norm_eps, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: [B, H, W, in_chans] -> image embedding [B, H/patch, W/patch, out_chans]."""
    c = self.config
    if pixels.ndim != 4 or pixels.shape[-1] != c.in_chans:
      raise ValueError(f"ImageEncoder: expected NHWC pixels with {c.in_chans} channels, "
                       f"got shape {pixels.shape}")
    x = self.patch_embed(pixels)
    if self.pos_embed is not None:
      if x.shape[1:3] != self.pos_embed.shape[1:3]:
        # The reference adds the table without interpolation, so other grids are an error there too.
        raise ValueError(f"ImageEncoder: token grid {x.shape[1:3]} from pixels {pixels.shape} "
                         f"does not match pos_embed grid {self.pos_embed.shape[1:3]}")
      x = x + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    x = self.neck_norm1(self.neck_conv1(x))
    return self.neck_norm2(self.neck_conv2(x))
