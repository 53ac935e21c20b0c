"""The Pallas windowed-attention kernel (`models.sam.window_kernel`), run through JAX's Pallas
interpreter on the CPU, against SAM's windowed attention written the reference's way: zero-pad the
bias-free qkv map, cut windows, add the bias, 6-D einsum logits with the decomposed relative
positions, softmax, un-window and crop. The whole-encoder parity against segment-anything with
this kernel is `test_sam_parity.test_image_encoder_matches_reference_with_window_padding`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.sam import image_encoder as ie
from models.sam import window_kernel as wk


def _reference(qkv_no_bias, bias, rel_pos_h, rel_pos_w, window, scale):
  b, h, w, _, n, d = qkv_no_bias.shape
  windows, pad_hw = ie.window_partition(qkv_no_bias.reshape(b, h, w, -1), window)
  windows = windows.reshape(windows.shape[:3] + (3, n, d)) + bias
  q, k, v = (jnp.moveaxis(windows[..., i, :, :], 3, 1) for i in range(3))   # [B', N, ws, ws, D]
  logits = jnp.einsum("bnhwd,bnuvd->bnhwuv", q * scale, k)
  if rel_pos_h is not None:
    logits = ie.add_decomposed_rel_pos(logits, q, rel_pos_h, rel_pos_w)
  t = window * window
  probs = jax.nn.softmax(logits.reshape(-1, n, t, t), axis=-1)
  out = jnp.einsum("bnqk,bnkd->bqnd", probs, v.reshape(-1, n, t, d))
  out = ie.window_unpartition(out.reshape(-1, window, window, n * d), window, pad_hw, (h, w))
  return out.reshape(b, h, w, n, d)


@pytest.mark.parametrize("h, w, window, d, rows, key_rows, rel", [
    (10, 9, 4, 48, 2, 1, "table"),     # both sides pad; head dim in chunks of 32 + 16; one key
                                       # row per step (the bias broadcast, not one-hot matmuls)
    (10, 9, 4, 48, 2, 1, "products"),  # the same with the table products from XLA
    (10, 9, 4, 48, 4, 4, "table"),     # one program per window, one key block (one-hot bias)
    (7, 12, 7, 16, 8, 2, "table"),     # window 7 in a tile of 8: masked tile slack, rows past it
    (6, 6, 3, 32, 2, 2, None),         # no relative positions
    (8, 8, 8, 32, 2, 1, "table"),      # a global block: the whole map as one window
    (8, 8, 8, 32, 4, 2, "table"),      # ... with two key rows per step (one-hot bias path)
])
def test_kernel_matches_padded_windows(h, w, window, d, rows, key_rows, rel):
  rng = np.random.default_rng(window * 100 + d)
  n, scale = 2, d ** -0.5
  qkv = jnp.asarray(rng.normal(size=(2, h, w, 3, n, d)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(3, n, d)), jnp.float32)   # what padding keys project to
  tables = [jnp.asarray(rng.normal(0, 0.3, (2 * window - 1, d)), jnp.float32) if rel else None
            for _ in range(2)]
  want = _reference(qkv, bias, *tables, window, scale)
  full = qkv + bias
  if rel == "table":
    rel = wk.rel_pos_table(*tables, window, jnp.float32)
  elif rel == "products":
    rel = wk.rel_pos_products(full[:, :, :, 0], *tables, window)
  got = wk.window_attention(full, bias, rel, window=window, scale=scale, rows=rows,
                            key_rows=key_rows, interpret=True)
  assert got.shape == (2, h, w, n, d)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)


def test_rel_pos_products_resize_tables_like_get_rel_pos():
  # A table of another length is linearly resized to 2 * window - 1 rows, as the reference does.
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 4, 4, 1, 16)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(11, 16)), jnp.float32)
  got = wk.rel_pos_products(q, table, table, 4)                        # [1, 4, 4, 1, 16]
  pairs = ie.get_rel_pos(4, 4, table)              # [4, 4, 16]: (i, j) is resized row i - j + 3
  resized = jnp.concatenate([pairs[:, 3], pairs[3, 2::-1]])           # rows 0..6
  want = jnp.einsum("bhwnd,rd->bhwnr", q, resized)
  assert got.shape == (1, 4, 4, 1, 16)                   # 2 * 7 rows, zero-padded to 16
  np.testing.assert_allclose(np.asarray(got[..., :7]), np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got[..., 7:14]), np.asarray(want), atol=1e-5)
  assert not np.asarray(got[..., 14:]).any()


def test_kernel_rejects_what_it_cannot_tile():
  assert wk.head_dim_chunks(80) == ((0, 64), (64, 16))
  assert wk.tile_side(14) == 16 and wk.tile_side(8) == 8
  with pytest.raises(ValueError, match="head dim 40 is not a multiple of 16"):
    wk.head_dim_chunks(40)
  qkv = jnp.zeros((1, 8, 8, 3, 1, 16))
  with pytest.raises(ValueError, match="rows 3 must be a power of two"):
    wk.window_attention(qkv, jnp.zeros((3, 1, 16)), None, window=4, scale=1.0, rows=3)
  with pytest.raises(ValueError, match=r"rel \(1, 8, 8, 1, 5\) is neither a table"):
    wk.window_attention(qkv, jnp.zeros((3, 1, 16)), jnp.zeros((1, 8, 8, 1, 5)), window=4,
                        scale=1.0)
  assert not wk.supported(jnp.float32, 80, 14)            # fp32: the XLA paths keep parity
  assert not wk.supported(jnp.bfloat16, 80, 14) or jax.default_backend() == "gpu"
