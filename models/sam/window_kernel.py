"""SAM's windowed attention as one Pallas (Triton) kernel that reads the unpadded token map.

The XLA path of a windowed block (`Block._windowed_attention` with a folded cuDNN call) pads the
64x64 qkv map to 70x70, cuts 25 windows (a transpose of all 3 * 1280 channels), folds the
relative positions into wider q/k heads (two concatenations), runs flash attention and undoes the
windowing (another transpose and a crop): on an H100 that glue costs more than the attention
itself. This kernel does all of it on chip, one program per (image, window, head, block of
window rows):

  * q, k and v are gathered straight from the unpadded qkv map [B, H, W, 3, N, D]; a key in the
    window's zero padding (outside the map) is the qkv bias, exactly what the reference's
    zero-padded tokens project to, and keys outside the window (the tile's power-of-two slack)
    are masked;
  * the decomposed relative-position bias comes from each query's products with the stacked
    tables (`rel_pos_table`), which the kernel computes itself (or XLA does:
    `rel_pos_products`); it is added as two small matmuls against one-hot key rows and columns,
    or, with one key row per step, as that row's term broadcast plus the column terms as they
    are;
  * softmax in fp32, online over blocks of key rows (FlashAttention-2's loop, pipelined by
    Triton across the blocks);
  * the output is scattered back to [B, H, W, N, D], so the crop and the inverse transpose vanish.

A global block is the same computation with the whole map as one window (`Attention` with
"pallas"). Triton tensors have power-of-two sides, so a window of side w sits in a tile of side
`next_power_of_2(w)` (14 -> 16) and the head dim is handled in power-of-two chunks (80 = 64 + 16).
`interpret=True` runs the same kernel on any backend (the CPU tests check it against the einsum
path); compiled, it needs an NVIDIA GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.sam.resize import resize_linear

# Far below any logit, finite so a fully masked row (never produced here) could not give NaN.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def tile_side(window: int) -> int:
  """Side of the power-of-two tile a window of side `window` is computed in (14 -> 16)."""
  return 1 << max(0, (window - 1).bit_length())


def head_dim_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
  """(start, size) chunks of power-of-two sizes >= 16 covering `head_dim` (80 -> (0, 64), (64,
  16)); Triton's matmuls want power-of-two operands with at least 16 along the contraction."""
  if head_dim % 16:
    raise ValueError(f"window_kernel: head dim {head_dim} is not a multiple of 16")
  chunks, start = [], 0
  for bit in reversed(range(head_dim.bit_length())):
    size = 1 << bit
    if head_dim - start >= size >= 16:
      chunks.append((start, size))
      start += size
  return tuple(chunks)


def supported(dtype, head_dim: int, window: int) -> bool:
  """Whether the compiled kernel runs here: a CUDA GPU (Triton), a 16-bit dtype, a head dim that
  splits into Triton-sized chunks and a window of side <= 64 (ViT-H/L/B's 14x14 windows, and
  their 64x64 maps attended globally as one window)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if jax.default_backend() != "gpu" or not getattr(jax.devices()[0], "compute_capability", None):
    return False
  return head_dim % 16 == 0 and 2 <= window <= 64


def rel_pos_table(rel_pos_h: jax.Array, rel_pos_w: jax.Array, window: int, dtype) -> jax.Array:
  """The two relative-position tables of a windowed block stacked, [2 * span (+ zero rows up to a
  power of two), D], span = 2 * window - 1: tables of another length are linearly resized to span
  rows first, as `get_rel_pos` does. Row r of the first table pairs query row i with key row
  i - r + window - 1; likewise the second table for columns."""
  span = 2 * window - 1
  tables = [t if t.shape[0] == span else resize_linear(t, span, axis=0)
            for t in (rel_pos_h, rel_pos_w)]
  table = jnp.concatenate(tables, axis=0).astype(dtype)                  # [2 * span, D]
  return jnp.pad(table, ((0, _products_width(window) - 2 * span), (0, 0)))


def _products_width(window: int) -> int:
  """Columns of the per-query products with `rel_pos_table` (a power of two >= 2 * span)."""
  return tile_side(2 * (2 * window - 1))


def rel_pos_products(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array, window: int
                     ) -> jax.Array:
  """Every query's products with every row of `rel_pos_table`, computed by XLA on the unpadded
  map (the kernel's other mode computes them itself): the kernel gathers the reference's
  rel_h[t, r] = q_t . R_h[row(t) - r + window - 1] (and rel_w likewise) from them.

  Args:
    q: unscaled queries [B, H, W, N, D] (with the qkv bias).
    rel_pos_h, rel_pos_w: the block's tables [L, D].
  Returns:
    [B, H, W, N, P] in q's dtype (accumulated in fp32 and rounded once, as the reference's bf16
    einsum does), P = `_products_width(window)`.
  """
  table = rel_pos_table(rel_pos_h, rel_pos_w, window, q.dtype)
  out = jnp.einsum("bhwnd,rd->bhwnr", q, table, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _dot(a: jax.Array, b: jax.Array, contract_b: int = 0) -> jax.Array:
  """a [M, K] times b [K, N] (or b [N, K] with contract_b=1), accumulated in fp32."""
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _window_attention_kernel(*refs, h: int, w: int, window: int, rows: int, key_rows: int,
                             scale: float, rel_mode: str | None, compiled: bool):
  """One (image, window, head, block of `rows` window rows) program; see the module docstring.
  refs: qkv, bias, then by `rel_mode`: None: out; "products": products, out; "table": table, out,
  products (an output the kernel writes and reads back). `compiled`: False when interpreted."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  table_ref = None
  if rel_mode is None:
    (qkv_ref, bias_ref, out_ref), rel_ref = refs, None
  elif rel_mode == "products":
    qkv_ref, bias_ref, rel_ref, out_ref = refs
  else:
    qkv_ref, bias_ref, table_ref, out_ref, rel_ref = refs
  tile = tile_side(window)
  dtype = out_ref.dtype
  chunks = head_dim_chunks(out_ref.shape[-1])
  b, win, head, block = (pl.program_id(i) for i in range(4))
  windows_per_row = -(-w // window)
  y0 = (win // windows_per_row) * window
  x0 = (win % windows_per_row) * window

  # Queries: `rows` window rows of `tile` columns, flattened row-major.
  qi = jnp.arange(rows * tile, dtype=jnp.int32)
  q_row = block * rows + qi // tile
  q_col = qi % tile
  q_ok = (q_row < window) & (q_col < window) & (y0 + q_row < h) & (x0 + q_col < w)
  # Masked query lanes point past the map: were they clamped onto it, two lanes of a store would
  # share an address (harmless on the GPU, where masked lanes never touch memory, but an
  # interpreted masked store writes back whatever it read there).
  q_y = jnp.where(q_ok, y0 + q_row, h)
  q_x = jnp.where(q_ok, x0 + q_col, w)
  slot = jnp.arange(tile, dtype=jnp.int32)

  def gather(part: int, ys, xs, ok, start: int, size: int):
    """q/k/v channels [start, start + size) of the tokens (ys, xs); padding tokens get the bias
    (zero for queries, whose padded rows are never stored)."""
    ch = jnp.arange(start, start + size, dtype=jnp.int32)
    x = plgpu.load(qkv_ref.at[b, ys[:, None], xs[:, None], part, head, ch[None, :]],
                   mask=ok[:, None], other=0.0)
    if part == 0:
      return x
    bias = plgpu.load(bias_ref.at[part, head, ch])
    return jnp.where(ok[:, None], x, bias[None, :].astype(x.dtype))

  q_raw = [gather(0, q_y, q_x, q_ok, start, size) for start, size in chunks]
  # The scale multiplies in fp32 and rounds once, as the reference's bf16 `q * scale` does.
  qs = [(q.astype(jnp.float32) * scale).astype(dtype) for q in q_raw]
  q_ok2 = q_ok[:, None]
  if table_ref is not None:
    # This program's queries times every table row, rounded once (the reference's bf16 einsum),
    # parked in the products output and gathered back below: a barrier orders the store before
    # the loads of other threads of this program; no other program reads these rows.
    width = table_ref.shape[0]
    products = None
    for q, (start, size) in zip(q_raw, chunks):
      ch = jnp.arange(start, start + size, dtype=jnp.int32)
      part = _dot(q, plgpu.load(table_ref.at[jnp.arange(width)[:, None], ch[None, :]]),
                  contract_b=1)
      products = part if products is None else products + part
    columns = jnp.arange(width, dtype=jnp.int32)
    plgpu.store(rel_ref.at[b, q_y[:, None], q_x[:, None], head, columns[None, :]],
                products.astype(dtype), mask=q_ok2)
    if compiled:        # the interpreter runs one program's lanes in order anyway
      plgpu.debug_barrier()
  if rel_ref is not None:
    # rel_h[t, r] = q_t . R_h[row(t) - r + window - 1], gathered from the products with every
    # table row; likewise rel_w with columns, from the second table.
    span = 2 * window - 1
    at_query = (b, q_y[:, None], q_x[:, None], head)
    rel_ok = q_ok2 & (slot[None, :] < window)
    shift = window - 1 - slot[None, :]
    rel_w = plgpu.load(rel_ref.at[at_query + (span + q_col[:, None] + shift,)], mask=rel_ok,
                       other=0.0)
    if key_rows > 1:
      rel_h = plgpu.load(rel_ref.at[at_query + (q_row[:, None] + shift,)], mask=rel_ok,
                         other=0.0)
    else:
      rel_w = rel_w.astype(jnp.float32)   # added to every step's logits as it is

  def key_block(j, carry):
    """Online softmax over keys `key_rows` window rows at a time (FlashAttention-2's loop)."""
    accs, top, total = carry
    ki = jnp.arange(key_rows * tile, dtype=jnp.int32)
    k_row = j * key_rows + ki // tile
    k_col = ki % tile
    k_in_window = (k_row < window) & (k_col < window)
    k_in_map = k_in_window & (y0 + k_row < h) & (x0 + k_col < w)
    k_y = jnp.minimum(y0 + k_row, h - 1)
    k_x = jnp.minimum(x0 + k_col, w - 1)
    logits = None
    for q, (start, size) in zip(qs, chunks):
      part = _dot(q, gather(1, k_y, k_x, k_in_map, start, size), contract_b=1)
      logits = part if logits is None else logits + part
    if rel_ref is not None and key_rows > 1:
      # rel_h[t, row(s)] + rel_w[t, col(s)] as products with one-hot key rows and columns
      # (exact: one nonzero term per sum, accumulated in fp32).
      logits += _dot(rel_h, (slot[:, None] == k_row[None, :]).astype(dtype))
      logits += _dot(rel_w, (slot[:, None] == k_col[None, :]).astype(dtype))
    elif rel_ref is not None:
      # One key row j per step: its keys are the tile's columns in order, so the column term is
      # rel_w itself and the row term one column, rel_h[t, j], read from the products.
      rel_h_j = plgpu.load(rel_ref.at[b, q_y, q_x, head, q_row + (window - 1) - j],
                           mask=q_ok & (j < window), other=0.0)
      logits += rel_w + rel_h_j.astype(jnp.float32)[:, None]
    logits = jnp.where(k_in_window[None, :], logits, _MASKED)
    new_top = jnp.maximum(top, jnp.max(logits, axis=1))
    rescale = jnp.exp(top - new_top)
    probs = jnp.exp(logits - new_top[:, None])
    total = total * rescale + jnp.sum(probs, axis=1)
    probs = probs.astype(dtype)
    accs = tuple(acc * rescale[:, None] + _dot(probs, gather(2, k_y, k_x, k_in_map, start, size))
                 for acc, (start, size) in zip(accs, chunks))
    return accs, new_top, total

  m = rows * tile
  init = (tuple(jnp.zeros((m, size), jnp.float32) for _, size in chunks),
          jnp.full((m,), _MASKED, jnp.float32), jnp.zeros((m,), jnp.float32))
  accs, _, total = jax.lax.fori_loop(0, -(-window // key_rows), key_block, init)
  for acc, (start, size) in zip(accs, chunks):
    ch = jnp.arange(start, start + size, dtype=jnp.int32)
    plgpu.store(out_ref.at[b, q_y[:, None], q_x[:, None], head, ch[None, :]],
                (acc / total[:, None]).astype(dtype), mask=q_ok2)


def default_launch(window: int) -> dict:
  """Launch parameters measured fastest on an H100 (`python -m eval.window_kernel_gpu`): ViT-H's
  14x14 windows, and a 64x64 map attended globally as one window."""
  if tile_side(window) <= 16:
    return dict(rows=8, key_rows=2, num_warps=4, num_stages=4)
  return dict(rows=1, key_rows=1, num_warps=4, num_stages=3)


def window_attention(qkv: jax.Array, qkv_bias: jax.Array, rel: jax.Array | None, *,
                     window: int, scale: float, interpret: bool | None = None,
                     **launch) -> jax.Array:
  """Attention inside zero-padded `window` x `window` windows of a token map, as SAM's windowed
  blocks compute it, without materialising the padded map or the windows.

  Args:
    qkv: [B, H, W, 3, N, D], the projections of the unpadded map, bias included.
    qkv_bias: [3, N, D], the projection's bias (what a zero padding token projects to).
    rel: the relative positions: `rel_pos_table` [P, D] (the kernel multiplies its queries with
      it), its products with every query from `rel_pos_products` [B, H, W, N, P], or None.
    window: window side (the map's side for global attention); scale: the logit scale.
    interpret: run the kernel through JAX's interpreter (default: where the backend is not a
      GPU).
    launch: overrides of `default_launch(window)`: rows, window rows per program (the query
      block is rows * tile tokens); key_rows, window rows of keys per step of the online softmax
      (both powers of two, capped at the tile); num_warps, num_stages (Triton).
  Returns:
    [B, H, W, N, D] attention output in qkv's dtype.
  """
  b, h, w, three, n, d = qkv.shape
  if three != 3 or qkv_bias.shape != (3, n, d):
    raise ValueError(f"window_attention: qkv {qkv.shape} / bias {qkv_bias.shape} are not "
                     f"[B, H, W, 3, N, D] / [3, N, D]")
  width = _products_width(window)
  if rel is not None and rel.shape not in ((width, d), (b, h, w, n, width)):
    raise ValueError(f"window_attention: rel {rel.shape} is neither a table {(width, d)} nor "
                     f"products {(b, h, w, n, width)}")
  unknown = set(launch) - {"rows", "key_rows", "num_warps", "num_stages"}
  if unknown:
    raise TypeError(f"window_attention: unknown launch parameters {sorted(unknown)}")
  launch = {**default_launch(window), **launch}
  return _window_attention(qkv, qkv_bias, rel, window=window, scale=scale, interpret=interpret,
                           **launch)


@functools.partial(jax.jit, static_argnames=("window", "scale", "rows", "key_rows", "num_warps",
                                             "num_stages", "interpret"))
def _window_attention(qkv, qkv_bias, rel, *, window, scale, rows, key_rows, num_warps,
                      num_stages, interpret):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  b, h, w, _, n, d = qkv.shape
  tile = tile_side(window)
  width = _products_width(window)
  out_shapes = [jax.ShapeDtypeStruct((b, h, w, n, d), qkv.dtype)]
  if rel is None:
    rel_mode, rel = None, ()
  elif rel.ndim == 2:
    rel_mode, rel = "table", (rel.astype(qkv.dtype),)
    out_shapes.append(jax.ShapeDtypeStruct((b, h, w, n, width), qkv.dtype))
  else:
    rel_mode, rel = "products", (rel,)
  rows, key_rows = min(rows, tile), min(key_rows, tile)     # small windows: one block of each
  for name, r in (("rows", rows), ("key_rows", key_rows)):
    if r & (r - 1):
      raise ValueError(f"window_attention: {name} {r} must be a power of two <= the tile {tile}")
  head_dim_chunks(d)   # raises for a head dim Triton cannot chunk
  windows = -(-h // window) * -(-w // window)
  grid = (b, windows, n, -(-window // rows))
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  kernel = functools.partial(_window_attention_kernel, h=h, w=w, window=window, rows=rows,
                             key_rows=key_rows, scale=scale, rel_mode=rel_mode,
                             compiled=not interpret)
  outs = pl.pallas_call(
      kernel, out_shape=out_shapes, grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="sam_window_attention",
  )(qkv, qkv_bias.astype(qkv.dtype), *rel)
  return outs[0]
