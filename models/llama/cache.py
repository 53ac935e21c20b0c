"""Fixed-size KV cache for a contiguous range of decoder layers.

One `KVCache` serves one static range of layers `[start, end)` of one decoder. In-LLM pruning
(FastV, PyramidDrop) keeps one cache per range: the layers before the pruning point keep the full
sequence, the layers after it a shorter buffer. Shapes never change after creation; what changes is
which slots hold tokens (`valid`) and where the next tokens go (the caller's write index).

Layout (per layer `l` of the range): `k[l]`, `v[l]`: [B, S, Hkv, Dh] (keys are stored post-RoPE,
so gapped position ids need no bookkeeping here); `valid`: [B, S] bool, shared by the layers of the
range: slot `s` of row `b` holds a real token that later queries may attend to.

Attention is causal by *slot*: a query written at slot `i` sees the valid slots `j <= i`. Tokens
are written at slots `write_index[b] + t`, `t = 0..T-1`; the caller keeps `write_index[b] + T <= S`
(JAX clamps out-of-range dynamic slices, which would silently overwrite the last slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  """Per-layer keys/values [B, S, Hkv, Dh] and the slot-valid mask [B, S] of one layer range."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array

  @classmethod
  def create(cls, batch: int, length: int, num_layers: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
    """An empty cache: zeros, every slot invalid."""
    shape = (batch, length, num_kv_heads, head_dim)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               valid=jnp.zeros((batch, length), jnp.bool_))

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def length(self) -> int:
    return self.valid.shape[1]

  @property
  def batch(self) -> int:
    return self.valid.shape[0]


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes `new` [B, T, ...] into `buffer` [B, S, ...] at slots `index[b] .. index[b] + T - 1`.

  `index`: [B] int32. Lowered to a scatter, so a donated buffer is updated in place.
  """
  def one(buf, x, i):
    start = (i,) + (0,) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), start)
  return jax.vmap(one)(buffer, new, index)


def query_slots(batch: int, num_new: int, write_index: jax.Array | int | None) -> jax.Array:
  """The cache slot of every new token, [B, T] int32 (`arange(T)` when there is no cache)."""
  t = jnp.arange(num_new, dtype=jnp.int32)[None, :]
  if write_index is None:
    return jnp.broadcast_to(t, (batch, num_new))
  index = jnp.broadcast_to(jnp.asarray(write_index, jnp.int32), (batch,))
  return index[:, None] + t


def attention_mask(q_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Boolean mask [B, 1, T, S]: key slot `j` is visible to the query at slot `i` iff `j <= i` and
  `key_valid[b, j]`. `q_slots`: [B, T] int; `key_valid`: [B, S] bool."""
  s = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
  causal = s[None, None, :] <= q_slots[:, :, None]
  return (causal & key_valid[:, None, :])[:, None, :, :]
