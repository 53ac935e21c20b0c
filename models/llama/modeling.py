"""LLaMA decoder in Flax NNX (GLaMM's Vicuna-7B), built for token pruning.

Functional surface (B batch, T new tokens, D hidden, S cache slots, V vocab):
- `model.embed(ids [B,T] int) -> [B,T,D]`: token embeddings, separate from the decoder so visual
  tokens can be spliced in as embeddings.
- `model(embeds [B,T,D], positions [B,T], *, cache=None, cache_write_index=None, key_valid=None)
  -> (hidden [B,T,D], new_cache)`: all layers plus the final RMSNorm (GLaMM reads [SEG] states from
  this post-norm hidden).
- `model.run_layers(x, positions, start, end, ...)`: layers `[start, end)` only, no final norm, for
  in-LLM pruning (run `[0,K)`, prune, run `[K,L)` on the shorter sequence with its own cache).
- `model.final_norm(x)`, `model.logits(hidden) -> [B,T,V] float32`.
- `model.init_cache(batch, length, start, end) -> KVCache`; `model.layer_query_key(i, x, positions)`
  gives layer i's post-RoPE q/k on its *input* (PyramidDrop scoring), and
  `run_layers(..., return_qk=True)` gives the last layer's own q/k (FastV scoring).

Positions are explicit per token ([B,T] int, gaps allowed), so pruned tokens keep their original
RoPE phases. Attention is causal by position *in the sequence/cache* (slot), not by position id,
and masked by boolean key-valid masks (padding, pruned tokens); see `cache.py`.

The layer loop is a Python loop over `nnx.List` entries, not `lax.scan`: under jit the layers are
unrolled, which lets a decode step stream each layer's weights once (performance_notes.md).
For inference, `models.llama.fuse.fuse_projections(model)` replaces each layer's q/k/v and
gate/up matrices by one concatenated matrix each (`qkv_proj`, `gate_up_proj`); checkpoints and
conversion keep the separate HF layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import cudnn
from models.llama.cache import KVCache, attention_mask, query_slots, write_rows
from models.llama.config import LlamaConfig
from models.sharding import param, with_names

_kernel_init = nnx.initializers.lecun_normal()


def _dense(cfg: LlamaConfig, d_in: int, d_out: int, names: tuple[str, str], rngs: nnx.Rngs):
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=with_names(_kernel_init, *names), rngs=rngs)


class RMSNorm(nnx.Module):
  """HF LLaMA RMSNorm: statistics and scaling in fp32, cast back to the input dtype, × weight."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = param(jnp.ones((dim,), param_dtype), "norm")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.weight[...].astype(x.dtype) * y


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotate-half RoPE tables for explicit positions [B,T] -> (cos, sin) [B,T,Dh] float32.

  The frequency vector is repeated (concat(freqs, freqs)), the HF convention: dims i and i+Dh/2 form
  a rotation pair.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,T,H,Dh] rotated by cos/sin [B,T,Dh]: x·cos + rotate_half(x)·sin."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class LlamaAttention(nnx.Module):
  """Multi-head / grouped-query self-attention with RoPE and an optional per-layer KV buffer."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    d, hq, hkv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q_proj = _dense(cfg, d, hq, ("embed", "q_heads_x_dim"), rngs)
    self.k_proj = _dense(cfg, d, hkv, ("embed", "kv_heads_x_dim"), rngs)
    self.v_proj = _dense(cfg, d, hkv, ("embed", "kv_heads_x_dim"), rngs)
    self.o_proj = _dense(cfg, hq, d, ("q_heads_x_dim", "embed"), rngs)
    self.qkv_proj = None   # [D, Hq*Dh + 2*Hkv*Dh] after `models.llama.fuse.fuse_projections`
    self.attention_impl = cfg.attention_impl

  def backend(self, num_queries: int, dtype) -> str:
    """`jax.nn.dot_product_attention`'s implementation for a call with `num_queries` new tokens
    (`models.cudnn.attention_backend`): by default cuDNN flash for the prefill on an NVIDIA GPU,
    whose XLA path would write 7.4 GB of fp32 logits per layer for 640 tokens at batch 128."""
    return cudnn.attention_backend(self.attention_impl, dtype, self.head_dim, num_queries)

  def _qkv(self, x: jax.Array):
    """Pre-RoPE q [B,T,Hq,Dh], k and v [B,T,Hkv,Dh] of x [B,T,D] (one matmul when fused)."""
    b, t, _ = x.shape
    hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    if self.qkv_proj is not None:
      qkv = self.qkv_proj(x)
      q, k, v = qkv[..., :hq], qkv[..., hq:hq + hkv], qkv[..., hq + hkv:]
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    return (q.reshape(b, t, self.num_heads, self.head_dim),
            k.reshape(b, t, self.num_kv_heads, self.head_dim),
            v.reshape(b, t, self.num_kv_heads, self.head_dim))

  def query_key(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Post-RoPE q [B,T,Hq,Dh] and k [B,T,Hkv,Dh] of the (already normalised) input x [B,T,D]."""
    q, k, _ = self._qkv(x)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

  def __call__(self, x, cos, sin, mask, kv=None, write_index=None, prefix=False, key_limit=None,
               key_lengths=None):
    """x [B,T,D] (normalised); mask [B,1,T,S] bool; kv: None or (k, v) buffers [B,S,Hkv,Dh] with
    write_index [B]; prefix (static): the new tokens sit at slots [0, T) (no cache, or written at
    the static index 0); key_limit (static int or None): attend over slots [0, key_limit) only;
    key_lengths: None, or with `prefix` [B] int, row b's keys valid on slots [0, key_lengths[b])
    exactly (right padding), which then replaces `mask`.
    Returns (out [B,T,D], new (k, v) buffers or None, (q, k) of the new tokens)."""
    b, t, _ = x.shape
    q, k, v = self._qkv(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is None:
      keys, values, new_kv = k, v, None
    else:
      keys = write_rows(kv[0], k, write_index)
      values = write_rows(kv[1], v, write_index)
      new_kv = (keys, values)
    if prefix and key_lengths is not None:
      # Causal plus right padding as per-row lengths instead of a dense [B,1,T,T] mask, which
      # cuDNN's flash kernel would read as an additive bias: masking by index is the same
      # attention, 1.6x faster for Vicuna's 640-token prefill on an H100
      # (`python -m eval.llm_attention_gpu --parts lengths`). With a cache, the kernel reads the
      # whole buffer: every slot from T on is beyond each row's length (and above the causal
      # diagonal), so it is skipped, and the buffer needs no copy of its strided first T slots.
      # (XLA's path, on CPU and TPU, computes those masked logits: S/T more, ~10% for GCG.)
      mask = None
    elif prefix:
      # Causal by slot, queries at slots [0, T) see no later slot: only the first T keys matter,
      # and the mask is lower-triangular, whose upper blocks a flash kernel skips (`is_causal`
      # ANDs the same triangle into `mask`, so XLA computes the same).
      keys, values, mask = keys[:, :t], values[:, :t], mask[..., :t]
    elif key_limit is not None:
      # A decode step whose queries sit below `key_limit`: later slots are invisible (causal by
      # slot), so they need not be read.
      keys, values, mask = keys[:, :key_limit], values[:, :key_limit], mask[..., :key_limit]
    if not prefix:
      key_lengths = None
    # GQA is handled by dot_product_attention (Hq a multiple of Hkv); softmax runs in fp32.
    out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask,
                                       is_causal=prefix, key_value_seq_lengths=key_lengths,
                                       implementation=self.backend(t, q.dtype))
    return self.o_proj(out.reshape(b, t, -1)), new_kv, (q, k)


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _dense(cfg, d, m, ("embed", "mlp"), rngs)
    self.up_proj = _dense(cfg, d, m, ("embed", "mlp"), rngs)
    self.down_proj = _dense(cfg, m, d, ("mlp", "embed"), rngs)
    self.gate_up_proj = None   # [D, 2M] after `models.llama.fuse.fuse_projections`

  def __call__(self, x):
    if self.gate_up_proj is not None:
      gu = self.gate_up_proj(x)
      m = gu.shape[-1] // 2
      return self.down_proj(jax.nn.silu(gu[..., :m]) * gu[..., m:])
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(·))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(cfg, rngs=rngs)
    self.mlp = LlamaMLP(cfg, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)

  def __call__(self, x, cos, sin, mask, kv=None, write_index=None, prefix=False, key_limit=None,
               key_lengths=None):
    a, new_kv, qk = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, write_index,
                                   prefix, key_limit, key_lengths)
    x = x + a
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_kv, qk


class LlamaForCausalLM(nnx.Module):
  """LLaMA decoder + untied lm_head. Parameter paths mirror HF without the `model.` prefix:
  `embed_tokens.embedding`, `layers[i].self_attn.q_proj.kernel`, `layers[i].mlp.up_proj.kernel`,
  `layers[i].input_layernorm.weight`, `norm.weight`, `lm_head.kernel` (kernels are [in, out])."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=with_names(nnx.initializers.normal(0.02), "vocab", "embed"), rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
    self.lm_head = _dense(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs)

  # -- pieces -------------------------------------------------------------------------------------

  def embed(self, ids: jax.Array) -> jax.Array:
    """Token ids [B,T] int -> embeddings [B,T,D] in the compute dtype."""
    return self.embed_tokens(ids)

  def final_norm(self, x: jax.Array) -> jax.Array:
    """The model's last RMSNorm, [B,T,D] -> [B,T,D]."""
    return self.norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Post-norm hidden [B,T,D] -> logits [B,T,V] float32 (lm_head in the compute dtype)."""
    return self.lm_head(hidden).astype(jnp.float32)

  def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B,T,Dh] float32 for positions [B,T]."""
    return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

  def init_cache(self, batch: int, length: int, start: int = 0, end: int | None = None,
                 dtype=None) -> KVCache:
    """An empty KVCache of `length` slots for layers `[start, end)` (default: all layers)."""
    end = self.config.num_layers if end is None else end
    self._check_range(start, end)
    return KVCache.create(batch, length, end - start, self.config.num_kv_heads,
                          self.config.head_dim, self.config.dtype if dtype is None else dtype)

  def layer_query_key(self, layer: int, x: jax.Array, positions: jax.Array):
    """Post-RoPE (q [B,T,Hq,Dh], k [B,T,Hkv,Dh]) that layer `layer` would compute from its input x
    [B,T,D] (input_layernorm, q/k projections, RoPE at `positions` [B,T]): the PyramidDrop score
    inputs at a stage boundary."""
    cos, sin = self.rope(positions)
    blk = self.layers[layer]
    return blk.self_attn.query_key(blk.input_layernorm(x), cos, sin)

  # -- forward ------------------------------------------------------------------------------------

  def run_layers(self, x: jax.Array, positions: jax.Array, start: int = 0, end: int | None = None,
                 *, cache: KVCache | None = None, cache_write_index=None,
                 key_valid: jax.Array | None = None, return_qk: bool = False,
                 key_limit: int | None = None, valid_is_prefix: bool = False):
    """Runs decoder layers `[start, end)` (static ints) on hidden states x [B,T,D].

    Args:
      x: [B,T,D] input hidden states of layer `start` (embeddings when start == 0).
      positions: [B,T] int RoPE position ids; any values (gaps, repeats) are allowed.
      cache: None (attend within the T tokens), or a KVCache of this range (end - start layers,
        S slots). The new tokens' k/v are written at slots `cache_write_index[b] + t` and the
        queries attend over the whole cache.
      cache_write_index: int or [B] int, required with `cache`; the caller keeps it + T <= S.
      key_valid: [B,T] bool, False for tokens nobody may attend to (padding, pruned tokens);
        default all True. With a cache it is written into `cache.valid` at the same slots.
      key_limit: static int; attention reads only cache slots [0, key_limit). The caller keeps
        every new token's slot below it (then no later slot is visible anyway): decode steps
        early in a long generation skip the still-empty tail of the cache.
      valid_is_prefix: static; the caller guarantees each row's `key_valid` is True on slots
        [0, n_b) and False after (right padding, no holes). A prefill (no cache, or written at
        slot 0) then masks attention by these lengths rather than by a dense mask, which cuDNN's
        flash kernel runs faster. A promise, not checked: with holes, the lengths (counts of
        valid slots) would mask the wrong keys.
      return_qk: also return layer `end-1`'s own post-RoPE (q [B,T,Hq,Dh], k [B,T,Hkv,Dh]) of the
        new tokens (FastV score; with a cache, all keys are `new_cache.k[-1]` [B,S,Hkv,Dh]).

    Returns:
      (x [B,T,D] output of layer end-1 (no final norm), new_cache or None) and, with return_qk,
      a third element (q, k).
    """
    cfg = self.config
    end = cfg.num_layers if end is None else end
    self._check_range(start, end)
    b, t, d = x.shape
    if d != cfg.hidden_size:
      raise ValueError(f"run_layers: x has hidden size {d}, config says {cfg.hidden_size}")
    if positions.shape != (b, t):
      raise ValueError(f"run_layers: positions shape {positions.shape} != (B, T) = {(b, t)}")
    key_valid = jnp.ones((b, t), jnp.bool_) if key_valid is None else key_valid.astype(jnp.bool_)
    if key_valid.shape != (b, t):
      raise ValueError(f"run_layers: key_valid shape {key_valid.shape} != (B, T) = {(b, t)}")

    if cache is None:
      index = None
      valid = key_valid
    else:
      if cache.num_layers != end - start or cache.batch != b:
        raise ValueError(f"run_layers: cache has {cache.num_layers} layers and batch "
                         f"{cache.batch}; layers [{start},{end}) and batch {b} need "
                         f"{end - start} and {b}")
      if cache_write_index is None:
        raise ValueError("run_layers: cache_write_index is required when a cache is given")
      if t > cache.length:
        raise ValueError(f"run_layers: {t} new tokens do not fit a cache of {cache.length} slots")
      if key_limit is not None and not 0 < key_limit <= cache.length:
        raise ValueError(f"run_layers: key_limit {key_limit} outside a cache of {cache.length} "
                         f"slots")
      index = jnp.broadcast_to(jnp.asarray(cache_write_index, jnp.int32), (b,))
      valid = write_rows(cache.valid, key_valid, index)
    mask = attention_mask(query_slots(b, t, index), valid)
    cos, sin = self.rope(positions)
    # Statically known to start at slot 0 (a prefill): attention can be cut to a causal T x T.
    prefix = cache is None or (isinstance(cache_write_index, int) and cache_write_index == 0)
    key_lengths = None
    if prefix and valid_is_prefix:
      key_lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)

    new_k, new_v, qk = [], [], None
    for i in range(start, end):
      kv = None if cache is None else (cache.k[i - start], cache.v[i - start])
      x, kv, qk = self.layers[i](x, cos, sin, mask, kv, index, prefix, key_limit, key_lengths)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid)
    return (x, new_cache, qk) if return_qk else (x, new_cache)

  def __call__(self, embeds: jax.Array, positions: jax.Array, *, cache: KVCache | None = None,
               cache_write_index=None, key_valid: jax.Array | None = None):
    """All layers + final norm: embeds [B,T,D], positions [B,T] -> (hidden [B,T,D], new_cache).

    See `run_layers` for `cache`, `cache_write_index` and `key_valid`.
    """
    x, new_cache = self.run_layers(embeds, positions, 0, self.config.num_layers, cache=cache,
                                   cache_write_index=cache_write_index, key_valid=key_valid)
    return self.final_norm(x), new_cache

  def _check_range(self, start: int, end: int):
    if not (isinstance(start, int) and isinstance(end, int)
            and 0 <= start < end <= self.config.num_layers):
      raise ValueError(f"layer range [{start}, {end}) must be static ints within "
                       f"[0, {self.config.num_layers}]")
