"""The LLM's and CLIP's two attention backends side by side on an NVIDIA GPU: cuDNN flash vs XLA.

`models.llama` runs multi-token calls (the prefill) through cuDNN flash attention by default on an
NVIDIA GPU in bf16 (`LlamaConfig.attention_impl="auto"`) and one-token decode steps through XLA.
The CLIP tower does the same. This checks and times that choice on the prefill shapes generation
uses: 640 new tokens written at slot 0 of a 704-slot buffer, masked as
`models.llama.cache.attention_mask` masks them (causal by slot; right padding; keys dropped by
pruning), for Vicuna-7B heads (32 x 128) and InternLM2-7B's grouped heads (32 query, 8 key/value
heads); and on CLIP ViT-L/14-336's unmasked 577 tokens (16 x 64).

1. `jax.nn.dot_product_attention` with implementation "xla" and "cudnn" in bf16, each against an
   fp32 XLA reference (relative L2 and max abs error over the non-padding queries), and the median
   time of each at batch `--batch`.
2. The decoder's prefill mask two ways at batch `--lengths-batch`: a dense [B,1,T,T] mask with
   `is_causal`, and per-row key lengths (what `run_layers(..., valid_is_prefix=True)` passes for
   right-padded prompts), per backend: errors against fp32, the two against each other, times.
3. Two bf16 decoder layers of `LlamaForCausalLM` at Vicuna-7B width run as a cached prefill once
   per backend; hidden states and the cache's keys against the same layers in fp32 (XLA).

Writes OUT/llm_attention.json. GPU only (cuDNN does not run elsewhere):

  python -m eval.llm_attention_gpu --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import bench_common as common

PREFILL, SLOTS = 640, 704


def masks(key, batch: int, t: int, s: int):
  """(mask [B,1,T,S] bool, query_real [B,T] bool): prompt lengths in [T/2, T] (right padding) and
  ~10% of the slots dropped as pruned, causal by slot as the decoder builds it."""
  from models.llama.cache import attention_mask, query_slots
  k1, k2 = jax.random.split(key)
  lengths = jax.random.randint(k1, (batch,), t // 2, t + 1)
  slot = jnp.arange(s)[None, :]
  kept = jax.random.uniform(k2, (batch, s)) > 0.1
  key_valid = (slot < lengths[:, None]) & kept
  mask = attention_mask(query_slots(batch, t, 0), key_valid)
  return mask, key_valid[:, :t]


def errors(got, want, rows) -> dict:
  """Relative L2 and max abs error of got vs want (fp32) over the rows where `rows` [B,T] holds."""
  g = np.asarray(got, np.float32)[np.asarray(rows)]
  w = np.asarray(want, np.float32)[np.asarray(rows)]
  return dict(rel_l2=float(np.linalg.norm(g - w) / np.linalg.norm(w)),
              max_abs=float(np.abs(g - w).max()))


# (name, queries, keys, query heads, key/value heads, head dim, masked like a prefill, is_causal).
# "_prefix": what the decoder runs for a prefill written at slot 0 (keys cut to the T new slots,
# `is_causal` so the flash kernel skips the upper triangle; the mask still drops padding/pruned).
SHAPES = (("vicuna_7b_prefill", PREFILL, SLOTS, 32, 32, 128, True, False),
          ("vicuna_7b_prefill_prefix", PREFILL, PREFILL, 32, 32, 128, True, True),
          ("internlm2_7b_prefill_prefix", PREFILL, PREFILL, 32, 8, 128, True, True),
          ("clip_l14_336", 577, 577, 16, 16, 64, False, False))


def attention_rows(batch: int, repeats: int) -> list[dict]:
  out = []
  for name, t, s, hq, hkv, dh, masked, causal in SHAPES:
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (batch, t, hq, dh), jnp.float32)
    k = jax.random.normal(kk, (batch, s, hkv, dh), jnp.float32)
    v = jax.random.normal(kv, (batch, s, hkv, dh), jnp.float32)
    mask, rows = masks(km, batch, t, s) if masked else (None, jnp.ones((batch, t), bool))
    ref = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, mask=m, is_causal=causal, implementation="xla"))(q, k, v, mask)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    row = dict(shape=name, batch=batch, queries=t, keys=s, q_heads=hq, kv_heads=hkv, head_dim=dh,
               is_causal=causal)
    for impl in ("xla", "cudnn"):
      f = jax.jit(lambda q, k, v, m, impl=impl: jax.nn.dot_product_attention(
          q, k, v, mask=m, is_causal=causal, implementation=impl))
      got = f(qb, kb, vb, mask)
      t = common.median_ms(lambda: f(qb, kb, vb, mask), jax.block_until_ready, repeats)
      row[impl] = dict(errors(got, ref, rows), ms=t["ms"])
    row["speedup"] = row["xla"]["ms"] / row["cudnn"]["ms"]
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def lengths_rows(batch: int, repeats: int) -> list[dict]:
  """The decoder's prefill attention (Vicuna heads, 640 tokens at slot 0, right padding, causal)
  masked two ways: a dense [B,1,T,T] mask, and per-row key lengths (`run_layers(...,
  valid_is_prefix=True)`), per backend, against fp32 and against each other."""
  kq, kk, kv, kl = jax.random.split(jax.random.key(3), 4)
  shape = (batch, PREFILL, 32, 128)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kv))
  # Half the rows full, the rest right-padded to [T/2, T] tokens.
  lengths = jax.random.randint(kl, (batch,), PREFILL // 2, PREFILL + 1).at[:batch // 2].set(PREFILL)
  from models.llama.cache import attention_mask, query_slots
  valid = jnp.arange(PREFILL)[None, :] < lengths[:, None]
  mask = attention_mask(query_slots(batch, PREFILL, 0), valid)
  ref_rows = min(batch, 8)
  ref = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
      q, k, v, mask=m, is_causal=True, implementation="xla"))(
          q[:ref_rows], k[:ref_rows], v[:ref_rows], mask[:ref_rows])
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = []
  for impl in ("xla", "cudnn"):
    dense = jax.jit(lambda q, k, v, m, impl=impl: jax.nn.dot_product_attention(
        q, k, v, mask=m, is_causal=True, implementation=impl))
    by_length = jax.jit(lambda q, k, v, n, impl=impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=n, implementation=impl))
    got_dense, got_length = dense(qb, kb, vb, mask), by_length(qb, kb, vb, lengths)
    row = dict(what="prefill_mask_vs_lengths", impl=impl, batch=batch, queries=PREFILL,
               q_heads=32, head_dim=128,
               dense_mask=dict(errors(got_dense[:ref_rows], ref, valid[:ref_rows]),
                               ms=common.median_ms(lambda: dense(qb, kb, vb, mask),
                                                   jax.block_until_ready, repeats)["ms"]),
               key_lengths=dict(errors(got_length[:ref_rows], ref, valid[:ref_rows]),
                                ms=common.median_ms(lambda: by_length(qb, kb, vb, lengths),
                                                    jax.block_until_ready, repeats)["ms"]),
               max_abs_between=errors(got_length, got_dense, valid)["max_abs"])
    row["speedup"] = row["dense_mask"]["ms"] / row["key_lengths"]["ms"]
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def layer_rows(batch: int) -> list[dict]:
  """Two Vicuna-width layers as a cached bf16 prefill per backend, against fp32."""
  from flax import nnx
  from models.llama.config import LlamaConfig
  from models.llama.modeling import LlamaForCausalLM

  cfg32 = LlamaConfig.vicuna_7b(num_layers=2, vocab_size=256)
  m32 = LlamaForCausalLM(cfg32, rngs=nnx.Rngs(0))
  graph32, state32 = nnx.split(m32)
  key = jax.random.key(1)
  x = 0.5 * jax.random.normal(key, (batch, PREFILL, cfg32.hidden_size), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(PREFILL, dtype=jnp.int32), (batch, PREFILL))
  mask, rows = masks(jax.random.key(2), batch, PREFILL, SLOTS)
  valid = rows   # the slots written by the prefill: right padding and pruned keys invalid

  # Right padding only (no pruned holes): what a gather-mode prefill passes with
  # `valid_is_prefix=True`, so that the cuDNN kernel masks by key lengths over the whole buffer.
  lengths = jnp.where(jnp.arange(batch) % 2 == 0, PREFILL, PREFILL // 2 + 7)
  padded = jnp.arange(PREFILL)[None, :] < lengths[:, None]

  def run(graph, state, x, impl, valid=valid, valid_is_prefix=False):
    m = nnx.merge(graph, state)
    for layer in m.layers:
      layer.self_attn.attention_impl = impl
    cache = m.init_cache(batch, SLOTS)
    h, cache = m.run_layers(x, pos, cache=cache, cache_write_index=0, key_valid=valid,
                            valid_is_prefix=valid_is_prefix)
    return h, cache.k[-1][:, :PREFILL]

  want_h, want_k = jax.jit(lambda s, x: run(graph32, s, x, "xla"))(state32, x)
  want_padded = jax.jit(lambda s, x: run(graph32, s, x, "xla", padded))(state32, x)
  cfg16 = LlamaConfig.vicuna_7b(num_layers=2, vocab_size=256, dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16)
  graph16, _ = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg16, rngs=nnx.Rngs(0))))
  state16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state32)
  out = []
  for impl in ("xla", "cudnn"):
    h, k = jax.jit(lambda s, x, impl=impl: run(graph16, s, x, impl))(state16,
                                                                      x.astype(jnp.bfloat16))
    row = dict(what="two_vicuna_layers_prefill", batch=batch, impl=impl,
               hidden=errors(h, want_h, rows), last_layer_keys=errors(k, want_k, rows))
    out.append(row)
    print(json.dumps(row), flush=True)
  h, k = jax.jit(lambda s, x: run(graph16, s, x, "cudnn", padded, True))(state16,
                                                                         x.astype(jnp.bfloat16))
  row = dict(what="two_vicuna_layers_prefill_key_lengths", batch=batch, impl="cudnn",
             hidden=errors(h, want_padded[0], padded),
             last_layer_keys=errors(k, want_padded[1], padded))
  out.append(row)
  print(json.dumps(row), flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=16, help="attention batch (timed)")
  p.add_argument("--layer-batch", type=int, default=4)
  p.add_argument("--lengths-batch", type=int, default=128,
                 help="batch of the dense-mask vs key-lengths prefill comparison")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--parts", default="attention,lengths,layers",
                 help="comma list of attention, lengths, layers")
  args = p.parse_args(argv)
  parts = set(args.parts.split(","))
  if parts - {"attention", "lengths", "layers"}:
    raise SystemExit(f"llm_attention_gpu: unknown --parts {sorted(parts)}")
  if jax.default_backend() != "gpu":
    raise SystemExit(f"llm_attention_gpu: needs an NVIDIA GPU for cuDNN; this backend is "
                     f"{jax.default_backend()!r}")
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  result = dict(device=dev.device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"),
                attention=(attention_rows(args.batch, args.repeats)
                           if "attention" in parts else []),
                lengths=(lengths_rows(args.lengths_batch, args.repeats)
                         if "lengths" in parts else []),
                layers=layer_rows(args.layer_batch) if "layers" in parts else [])
  path = os.path.join(args.out, "llm_attention.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
