"""SAM ViT image encoder (`segment_anything.modeling.ImageEncoderViT`), channels-last.

pixels [B, img, img, 3] -> patch conv -> + pos_embed -> blocks (windowed or global attention with
decomposed relative positions) -> neck (conv1x1, LayerNorm2d, conv3x3, LayerNorm2d)
-> image embedding [B, img/patch, img/patch, out_chans].

Attention (`SamImageEncoderConfig.attention_impl`): by default `jax.nn.dot_product_attention` on
[B, T, N, D] slices of the fused qkv projection. On an NVIDIA GPU in bf16/fp16 the relative-position
term is folded into wider q/k heads and cuDNN's flash kernel runs it with no O(T^2) tensor in
memory (`fold_rel_pos`); elsewhere XLA runs it with the term as an additive fp32 bias. Softmax is
fp32 in both; activations keep their dtype. "einsum" keeps the reference's 6-D formulation. On the
GPU, windowed blocks run as one Pallas kernel instead (`models.sam.window_kernel`): no padded map,
no window copies, no folded heads.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from models import cudnn, sharding
from models.activations import gelu_exact
from models.sam import layers, window_kernel
from models.sam.config import SAM_ATTENTION_IMPLS, SamImageEncoderConfig
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
# Attention paths: the relative-position term as factors, as a bias, or folded into the heads.

def rel_pos_terms(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, h: int, w: int
                  ) -> tuple[jax.Array, jax.Array]:
  """The two factors of the decomposed relative-position bias, from tokens in attention layout.

  Args:
    q: unscaled queries [B, T, N, D], T = h * w tokens in row-major order.
    rel_pos_h, rel_pos_w: tables [Lh, D], [Lw, D] (resized by `get_rel_pos` when needed).
  Returns:
    rel_h [B, T, N, h] (query . R_h[query row, key row]) and rel_w [B, T, N, w] (likewise for
    columns), accumulated in fp32 and returned in fp32.
  """
  b, t, n, d = q.shape
  r_h = get_rel_pos(h, h, rel_pos_h).astype(q.dtype)   # [h, h, D]
  r_w = get_rel_pos(w, w, rel_pos_w).astype(q.dtype)   # [w, w, D]
  q4 = q.reshape(b, h, w, n, d)
  f32 = jnp.float32
  rel_h = jnp.einsum("bhwnd,hkd->bhwnk", q4, r_h, preferred_element_type=f32)
  rel_w = jnp.einsum("bhwnd,wkd->bhwnk", q4, r_w, preferred_element_type=f32)
  return rel_h.reshape(b, t, n, h), rel_w.reshape(b, t, n, w)


def fold_rel_pos(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array, rel_w: jax.Array,
                 h: int, w: int, scale: float, multiple: int = 8
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Folds the scale and the decomposed relative-position bias into wider heads, so an attention
  kernel without a bias input (and without an O(T^2) bias tensor) computes the same logits.

  The bias of query t and key s is rel_h[t, row(s)] + rel_w[t, col(s)]: a product of [rel_h,
  rel_w] with the one-hot row and column indicators of s. So with
    q' = [scale * q, rel_h, rel_w, 0],   k' = [k, onehot(row(s)), onehot(col(s)), 0],
    v' = [v, 0]
  q'.k' = scale * q.k + rel_h[t, row(s)] + rel_w[t, col(s)] exactly, and softmax(q' k'^T) v' is
  the reference output in its first D channels. The head dim grows from D to D + h + w, padded
  with zeros to a multiple of `multiple` (cuDNN wants multiples of 8): 80 -> 112 for ViT-H's
  14x14 windows, 80 -> 208 for its 64x64 global blocks.

  Args:
    q, k, v: [B, T, N, D], T = h * w; rel_h [B, T, N, h]; rel_w [B, T, N, w] (`rel_pos_terms`).
  Returns:
    q', k', v' [B, T, N, D'] in q's dtype; call attention with scale 1 and keep [..., :D].
  """
  b, t, n, d = q.shape
  dt = q.dtype
  pad = (-(d + h + w)) % multiple
  keys = np.arange(t)
  onehot = np.concatenate([keys[:, None] // w == np.arange(h)[None],
                           keys[:, None] % w == np.arange(w)[None],
                           np.zeros((t, pad), bool)], axis=1)        # [T, h + w + pad], static
  onehot = jnp.broadcast_to(jnp.asarray(onehot, dt)[None, :, None], (b, t, n, h + w + pad))
  # The scale multiplies in fp32 and rounds once (as PyTorch's bf16 `q * scale` does), rather than
  # rounding the scale itself to bf16 first.
  q_scaled = (q.astype(jnp.float32) * scale).astype(dt)
  q2 = jnp.concatenate([q_scaled, rel_h.astype(dt), rel_w.astype(dt),
                        jnp.zeros((b, t, n, pad), dt)], axis=-1)
  k2 = jnp.concatenate([k, onehot], axis=-1)
  v2 = jnp.concatenate([v, jnp.zeros((b, t, n, h + w + pad), dt)], axis=-1)
  return q2, k2, v2


def resolve_attention_impl(impl: str, dtype, head_dim: int, grid: tuple[int, int],
                           use_rel_pos: bool, *, windowed: bool = False) -> str:
  """The concrete attention path for `impl` (see `SAM_ATTENTION_IMPLS`) on a `grid` token map
  (a window when `windowed`): "pallas", the kernel of `models.sam.window_kernel`, for windows
  with "auto" and "pallas_window" and for every square map with "pallas", where the kernel
  compiles (`window_kernel.supported`: NVIDIA GPU, 16-bit); otherwise "auto" is "cudnn_folded"
  where cuDNN flash takes the folded head dim, else "xla_bias"; "cudnn_mixed" is "cudnn_folded"
  where folding widens the heads by at most half, else "cudnn_bias" (folding costs attention
  FLOPs in proportion to the width, a bias costs an O(T^2) tensor in memory: cheap for 14x14
  windows, 537 MB per image and global block at 64x64)."""
  if impl in ("auto", "pallas_window", "pallas"):
    kernel_runs = grid[0] == grid[1] and window_kernel.supported(dtype, head_dim, grid[0])
    if kernel_runs and (windowed or impl == "pallas"):
      return "pallas"
    impl = "auto"
  if impl not in ("auto", "cudnn_mixed"):
    return impl
  folded = head_dim + (grid[0] + grid[1] if use_rel_pos else 0)
  folded += (-folded) % 8
  if impl == "cudnn_mixed":
    return "cudnn_folded" if 2 * folded <= 3 * head_dim else "cudnn_bias"
  return "cudnn_folded" if folded <= cudnn.flash_head_dim_limit(dtype) else "xla_bias"


# ------------------------------------------------------------------------------------------------
# Modules.

class Attention(nnx.Module):
  """Multi-head self-attention over a 2-D token map, with decomposed relative positions.

  Paths (`impl`, all the same maths; see `SAM_ATTENTION_IMPLS`):
    einsum: the reference's formulation, 6-D logits [B, N, H, W, H, W] with the relative terms
      added, softmax in the activation dtype.
    xla_bias / cudnn_bias: `jax.nn.dot_product_attention` on [B, T, N, D] slices of the fused qkv
      projection, the relative-position term as an additive bias [B, N, T, T]; logits and softmax
      in fp32 (XLA) or inside cuDNN's flash kernel.
    xla_folded / cudnn_folded: the relative-position term folded into wider q/k heads
      (`fold_rel_pos`): no bias tensor, so cuDNN's flash kernel never reads an O(T^2) array.
    pallas: `kernel_attention`, one Pallas kernel from the unpadded qkv map to the output.
    auto, cudnn_mixed, pallas_window: resolved per call by `resolve_attention_impl`.

  Args:
    rel_size: (H, W) the relative-position tables are sized for (window or full grid).
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, use_rel_pos: bool,
               rel_size: tuple[int, int], rngs: nnx.Rngs, impl: str = "auto"):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = self.head_dim ** -0.5
    self.impl = impl
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
    if resolve_attention_impl(self.impl, x.dtype, self.head_dim, (h, w),
                              self.use_rel_pos) == "pallas":
      return self.proj(self.kernel_attention(x, h))       # the whole map as one window
    return self.proj(self.attend(self.qkv(x)))

  def kernel_attention(self, x: jax.Array, window: int) -> jax.Array:
    """Attention inside `window` x `window` windows of the unpadded map (zero padding at the
    bottom/right, as the reference pads) by one Pallas kernel; a padding token is the qkv bias
    inside the kernel. x: [B, H, W, dim] -> [B, H, W, N, D], before `proj`."""
    qkv = self.qkv(x)                                               # [B, H, W, 3, N, D]
    bias = (self.qkv.bias[...] if self.qkv.bias is not None
            else jnp.zeros(qkv.shape[3:], qkv.dtype))
    rel = None
    if self.use_rel_pos:
      rel = window_kernel.rel_pos_table(self.rel_pos_h[...], self.rel_pos_w[...], window,
                                        qkv.dtype)
    return window_kernel.window_attention(qkv, bias, rel, window=window, scale=self.scale)

  def attend(self, qkv: jax.Array) -> jax.Array:
    """The attention between the two projections: qkv [B, H, W, 3, N, D] -> [B, H, W, N, D]."""
    b, h, w = qkv.shape[:3]
    impl = resolve_attention_impl(self.impl, qkv.dtype, self.head_dim, (h, w), self.use_rel_pos)
    if impl == "einsum":
      return self._einsum_attention(qkv)
    # [B, T, 3, N, D] is a free reshape; q/k/v are strided slices in the [B, T, N, D] layout that
    # dot_product_attention takes, so no head transposes are needed on the way in or out.
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    backend = impl.split("_")[0]
    if not self.use_rel_pos:
      out = jax.nn.dot_product_attention(q, k, v, scale=self.scale, implementation=backend)
    elif impl.endswith("_folded"):
      rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h[...], self.rel_pos_w[...], h, w)
      q2, k2, v2 = fold_rel_pos(q, k, v, rel_h, rel_w, h, w, self.scale)
      # cuDNN can keep v at its own width (v2 is then dead code, which XLA drops).
      out = cudnn.flash_attention_narrow_values(q2, k2, v, 1.0) if backend == "cudnn" else None
      if out is None:
        out = jax.nn.dot_product_attention(q2, k2, v2, scale=1.0,
                                           implementation=backend)[..., :self.head_dim]
    else:
      rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h[...], self.rel_pos_w[...], h, w)
      # bias[b, n, t, (r, c)] = rel_h[b, t, n, r] + rel_w[b, t, n, c]; fp32 for XLA, where it is
      # added to fp32 logits (and fused into their producer), the activation dtype for cuDNN.
      bias = (rel_h.transpose(0, 2, 1, 3)[..., :, None]
              + rel_w.transpose(0, 2, 1, 3)[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
      if backend == "cudnn":
        bias = bias.astype(q.dtype)
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=self.scale,
                                         implementation=backend)
    return out.reshape(b, h, w, self.num_heads, self.head_dim)

  def _einsum_attention(self, qkv: jax.Array) -> jax.Array:
    """The original path: qkv [B, H, W, 3, N, D] -> attention output [B, H, W, N, D]."""
    b, h, w = qkv.shape[:3]
    q, k, v = (jnp.moveaxis(qkv[..., i, :, :], 3, 1) for i in range(3))  # [B, N, H, W, D]
    logits = jnp.einsum("bnhwd,bnuvd->bnhwuv", q * self.scale, k)
    if self.use_rel_pos:
      logits = add_decomposed_rel_pos(logits, q, self.rel_pos_h[...], self.rel_pos_w[...])
    logits = logits.reshape(b, self.num_heads, h * w, h * w)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bnkd->bqnd", probs, v.reshape(b, self.num_heads, h * w, self.head_dim))
    return out.reshape(b, h, w, self.num_heads, self.head_dim)


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
        rel_size=input_size if window_size == 0 else (window_size, window_size), rngs=rngs,
        impl=config.attention_impl)
    self.norm2 = layers.LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
    self.mlp = layers.MlpBlock(dim, config.mlp_dim, gelu_exact, embed_name="vis_embed",
                               mlp_name="vis_mlp", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, dim], any H and W."""
    shortcut = x
    x = self.norm1(x)
    x = self._windowed_attention(x) if self.window_size > 0 else self.attn(x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))

  def _windowed_attention(self, x: jax.Array) -> jax.Array:
    """The reference's attention inside zero-padded windows, with the two per-token projections
    applied to the H x W tokens only: a zero padding token's qkv is exactly the qkv bias and its
    output is cropped away, so padding the bias-free product and adding the bias afterwards, and
    projecting after the crop, is the same arithmetic on H*W instead of Hp*Wp tokens (4096
    instead of 4900 for ViT-H's 64x64 map in 14x14 windows); or all of it in one kernel
    (`Attention.kernel_attention`) where `resolve_attention_impl` picks it. x: [B, H, W, dim] ->
    same."""
    b, h, w, _ = x.shape
    attn = self.attn
    ws = self.window_size
    if resolve_attention_impl(attn.impl, x.dtype, attn.head_dim, (ws, ws), attn.use_rel_pos,
                              windowed=True) == "pallas":
      return attn.proj(attn.kernel_attention(x, ws))
    qkv = attn.qkv(x, add_bias=False)                               # [B, H, W, 3, N, D]
    head_shape = qkv.shape[3:]
    windows, pad_hw = window_partition(qkv.reshape(b, h, w, -1), self.window_size)
    windows = windows.reshape(windows.shape[:3] + head_shape)
    if attn.qkv.bias is not None:
      windows = windows + attn.qkv.bias[...]
    out = attn.attend(windows)                                      # [B * nW, ws, ws, N, D]
    out = window_unpartition(out.reshape(out.shape[:3] + (-1,)), self.window_size, pad_hw, (h, w))
    return attn.proj(out.reshape(b, h, w, *head_shape[1:]))


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

  def set_attention_impl(self, impl: str) -> None:
    """Switches every block's attention path (one of `SAM_ATTENTION_IMPLS`; same maths, another
    kernel), e.g. on a module merged inside a jitted benchmark; parameters are untouched."""
    if impl not in SAM_ATTENTION_IMPLS:
      raise ValueError(f"ImageEncoder.set_attention_impl: {impl!r} is not one of "
                       f"{', '.join(SAM_ATTENTION_IMPLS)}")
    for block in self.blocks:
      block.attn.impl = impl

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
