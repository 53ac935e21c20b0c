"""GPU benchmark of the NNX LLaMA decoder and CLIP tower at GLaMM sizes (not a test).

    python -m eval.bench_llm_decode --out out/bench_llm_decode [--tiny]

Random bf16 weights at Vicuna-7B / CLIP-L/336 shapes. Times (median of repeats after a compile
call, `block_until_ready`): CLIP forward to layer -2 with the CLS attention; LLM prefill of
576 visual + 64 text tokens; one greedy decode step (embed → 32 layers → lm_head → argmax) with a
704-slot cache donated to the step; and the FastV-style step whose layers [0,2) use the full cache
and layers [2,32) a cache holding 58 visual tokens. The decode floor is (weight bytes + cache
bytes read) / measured device copy bandwidth. Writes DIR/bench_llm_decode.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.clip.config import CLIPVisionConfig
from models.clip.modeling import CLIPVisionModel
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM


def _time(fn, repeats):
  out = fn()  # compile + warm-up
  jax.block_until_ready(out)
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3


def _copy_bandwidth(nbytes, repeats):
  """Device copy bandwidth in bytes/s (read + write counted once each)."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  ms = _time(lambda: copy(x), repeats)
  return 2 * x.nbytes / (ms / 1e3)


def _init(build):
  """Random parameters created directly on the device (no host copy of 13 GB)."""
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.state(build()))()
  return graphdef, state


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--batches", default="1,8,32")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  dt = jnp.bfloat16
  if args.tiny:
    lcfg = LlamaConfig.tiny(dtype=dt, param_dtype=dt)
    vcfg = CLIPVisionConfig.tiny(dtype=dt, param_dtype=dt)
    n_vis, n_txt, n_keep, n_new = 16, 8, 4, 4
  else:
    lcfg = LlamaConfig.vicuna_7b(dtype=dt, param_dtype=dt)
    vcfg = CLIPVisionConfig.clip_vit_l14_336(dtype=dt, param_dtype=dt)
    n_vis, n_txt, n_keep, n_new = 576, 64, 58, 64
  batches = [int(b) for b in args.batches.split(",")]
  results = dict(device=str(jax.devices()[0]), platform=platform.platform(),
                 jax=jax.__version__, tiny=args.tiny, rows=[])

  bw = _copy_bandwidth(1 << 30 if not args.tiny else 1 << 20, args.repeats)
  results["copy_bandwidth_GBps"] = bw / 1e9

  # CLIP to layer -2 with the CLS attention.
  vdef, vstate = _init(lambda: CLIPVisionModel(vcfg, rngs=nnx.Rngs(0)))
  clip_fn = jax.jit(lambda s, p: nnx.merge(vdef, s).features(p, select_layer=-2))
  for b in batches:
    px = jnp.zeros((b, vcfg.image_size, vcfg.image_size, 3), dt)
    results["rows"].append(dict(what="clip_features", batch=b,
                                ms=_time(lambda: clip_fn(vstate, px), args.repeats)))
  del vstate

  ldef, lstate = _init(lambda: LlamaForCausalLM(lcfg, rngs=nnx.Rngs(0)))
  wbytes = _nbytes(lstate)
  results["llm_weight_GB"] = wbytes / 1e9
  prompt = n_vis + n_txt
  slots = prompt + n_new

  @functools.partial(jax.jit, donate_argnums=(3,))
  def prefill(state, embeds, pos, cache):
    m = nnx.merge(ldef, state)
    hidden, cache = m(embeds, pos, cache=cache, cache_write_index=0)
    return jnp.argmax(m.logits(hidden[:, -1:]), -1), cache

  @functools.partial(jax.jit, donate_argnums=(3,))
  def step(state, ids, pos, cache, index):
    m = nnx.merge(ldef, state)
    hidden, cache = m(m.embed(ids), pos, cache=cache, cache_write_index=index)
    return jnp.argmax(m.logits(hidden), -1).astype(jnp.int32), cache

  @functools.partial(jax.jit, donate_argnums=(3, 4))
  def fastv_step(state, ids, pos, cache_a, cache_b, index_a, index_b):
    m = nnx.merge(ldef, state)
    h, cache_a = m.run_layers(m.embed(ids), pos, 0, 2, cache=cache_a, cache_write_index=index_a)
    h, cache_b = m.run_layers(h, pos, 2, lcfg.num_layers, cache=cache_b, cache_write_index=index_b)
    return jnp.argmax(m.logits(m.final_norm(h)), -1).astype(jnp.int32), cache_a, cache_b

  for b in batches:
    pos = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (b, prompt))
    embeds = jnp.zeros((b, prompt, lcfg.hidden_size), dt)
    state = {"cache": nnx.merge(ldef, lstate).init_cache(b, slots)}

    def run_prefill():
      nxt, state["cache"] = prefill(lstate, embeds, pos, state["cache"])
      return nxt
    ms = _time(run_prefill, args.repeats)
    results["rows"].append(dict(what="prefill", batch=b, tokens=prompt, ms=ms))

    ids = jnp.zeros((b, 1), jnp.int32)
    p1 = jnp.full((b, 1), prompt, jnp.int32)
    idx = jnp.full((b,), prompt, jnp.int32)

    def run_step():
      nxt, state["cache"] = step(lstate, ids, p1, state["cache"], idx)
      return nxt
    ms = _time(run_step, args.repeats)
    cbytes = _nbytes(state["cache"])
    floor = (wbytes + cbytes) / bw * 1e3
    results["rows"].append(dict(what="decode_step", batch=b, cache_slots=slots, ms=ms,
                                floor_ms=floor, ratio=ms / floor))
    del state

    short = slots - (n_vis - n_keep)
    st = {"a": nnx.merge(ldef, lstate).init_cache(b, slots, 0, 2),
          "b": nnx.merge(ldef, lstate).init_cache(b, short, 2, lcfg.num_layers)}
    idx_b = jnp.full((b,), prompt - (n_vis - n_keep), jnp.int32)

    def run_fastv():
      nxt, st["a"], st["b"] = fastv_step(lstate, ids, p1, st["a"], st["b"], idx, idx_b)
      return nxt
    ms = _time(run_fastv, args.repeats)
    cbytes = _nbytes(st["a"]) + _nbytes(st["b"])
    floor = (wbytes + cbytes) / bw * 1e3
    results["rows"].append(dict(what="fastv_decode_step", batch=b, cache_slots=[slots, short],
                                ms=ms, floor_ms=floor, ratio=ms / floor))
    del st

  path = os.path.join(args.out, "bench_llm_decode.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  for r in results["rows"]:
    print(r)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
