"""Token importance from attention, without ever forming a T x T matrix.

FastV scores the visual tokens by the attention the *last prompt token* pays them at layer K-1;
PyramidDrop does the same with the next stage's first layer (its input norm, q/k projections and
RoPE applied to the current hidden states). Both reduce to one query row per sequence, so the cost
is O(T * d) per head instead of the O(T^2) attention matrix the reference code materialises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def last_query_index(valid: jax.Array) -> jax.Array:
  """Index of the last valid token of each right-padded row.

  Args:
    valid: [B, T] bool, True on real tokens (right padding).

  Returns:
    [B] int32, `sum(valid) - 1`: the last prompt token, whose attention FastV/PDrop read.
  """
  return jnp.sum(valid.astype(jnp.int32), axis=-1) - 1


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """Gathers `x[b, index[b]]`: [B, T, ...] and [B] -> [B, ...]."""
  idx = index.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def last_query_scores(q_last: jax.Array, keys: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Attention probabilities of one query row per sequence, averaged over heads.

  The softmax runs in float32 over every valid key (system, visual and text tokens alike, as in the
  FastV and PyramidDrop code: no renormalisation over the visual span), then the probabilities are
  averaged over the query heads.

  Args:
    q_last: [B, Hq, Dh] the query of the scoring token (post-RoPE).
    keys: [B, T, Hkv, Dh] the keys of the same layer (post-RoPE). `Hq` must be a multiple of `Hkv`
      (grouped-query attention: query head h reads key head h // (Hq // Hkv)).
    key_valid: [B, T] bool; False keys (padding, future tokens, pruned tokens) get probability 0.

  Returns:
    [B, T] float32 probabilities; each row sums to 1 over its valid keys.
  """
  if q_last.ndim != 3 or keys.ndim != 4:
    raise ValueError(f"q_last must be [B,Hq,Dh] and keys [B,T,Hkv,Dh]; got {q_last.shape} and "
                     f"{keys.shape}")
  b, hq, dh = q_last.shape
  kb, t, hkv, kdh = keys.shape
  if kb != b or kdh != dh:
    raise ValueError(f"q_last {q_last.shape} and keys {keys.shape} disagree on batch or head_dim")
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
  if key_valid.shape != (b, t):
    raise ValueError(f"key_valid has shape {key_valid.shape}; expected {(b, t)}")
  group = hq // hkv
  q = q_last.astype(jnp.float32).reshape(b, hkv, group, dh)
  logits = jnp.einsum("bhgd,bthd->bhgt", q, keys.astype(jnp.float32)) / jnp.sqrt(
      jnp.float32(dh))
  logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  # A row with no valid key would be NaN; define it as zero attention.
  probs = jnp.where(key_valid[:, None, None, :], probs, 0.0)
  return probs.mean(axis=(1, 2))


def cls_attention_scores(attn_probs: jax.Array, num_prefix: int = 1) -> jax.Array:
  """ALTP's default pre-LLM score: the CLS query's attention to the patch keys, mean over heads.

  Args:
    attn_probs: [B, H, 1 + N, 1 + N] (or only the CLS row, [B, H, 1 + N]) attention probabilities
      of the vision tower's selected layer, CLS first.
    num_prefix: number of non-patch tokens at the front (1 for CLIP's CLS).

  Returns:
    [B, N] float32 scores of the N patches.
  """
  row = attn_probs[:, :, 0, :] if attn_probs.ndim == 4 else attn_probs
  return row[:, :, num_prefix:].astype(jnp.float32).mean(axis=1)
