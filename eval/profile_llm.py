"""Where the LLM's GPU time goes in GCG: kernel times of the prefill and of the decode loop.

Builds GLaMM-7B with random bf16 weights (`--tiny`: the test composition) as the benchmark does
(`eval.bench_jax.Bench`: fused projections unless `--no-fuse-projections`), lowers the prefill and
the `DECODE_LOOP_STEPS`-step decode loop of one method at one batch (`eval.bench_jax.lower_llm`:
random prompt embeddings with the visual span at the GCG offset), runs each a few times under
`jax.profiler` and sums the device events by kernel and by kind (matmul, attention, other; see
`eval.profile_sam.kind_of`). The decode loop is also set against its floor: (LLM weights + the KV
cache) per step over the copy bandwidth measured in the same run. Writes `llm_profile.json`:

  python -m eval.profile_llm --out OUT --batch 128 --no-fuse-projections
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> dict:
  # Before jax is imported, as `eval.bench` does: a batch-128 unpruned KV cache is 47 GB.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")
  import jax
  import jax.numpy as jnp
  from eval import bench_common as common
  from eval import bench_flops as flops
  from eval.bench import ATTENTION_IMPLS
  from eval.bench_jax import DECODE_LOOP_STEPS, Bench, _copy_bandwidth
  from eval.profile_sam import profile_calls

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--method", default="none", choices=common.METHOD_NAMES)
  p.add_argument("--reduction", type=float, default=0.9)
  p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                 help="CLIP and LLM attention backend (`models.cudnn`)")
  p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--calls", type=int, default=2, help="profiled calls of each program")
  p.add_argument("--tiny", action="store_true", help="test-sized model (CPU smoke run)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  red = 0.0 if a.method == "none" else a.reduction
  bw = _copy_bandwidth((1 << 20) if a.tiny else (2 << 30), 5)   # before the model takes memory
  config = common.with_attention(common.bench_config(a.tiny), a.attention)
  lay = common.layout(config, a.tiny)
  bench = Bench(config, lay, argparse.Namespace(fuse_projections=a.fuse_projections))
  data, lowered = bench.lower_llm(a.batch, a.method, red)
  st = bench.state
  prefill = lowered["prefill"]().compile()
  loop = lowered["decode_loop"]().compile()
  d = data
  token = jnp.full((a.batch,), 5, jnp.int32)
  box = {}

  def run_loop():
    if "caches" not in box:   # made after the prefill's profile: one cache in memory at a time
      box["caches"], _, box["next_pos"] = prefill(st, d["embeds"], d["pos"], d["valid"],
                                                  d["vmask"])
    nxt, box["caches"] = loop(st, token, box["caches"], box["next_pos"])
    return nxt

  def wall_ms(fn, n=3):
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
      y = fn()
    jax.block_until_ready(y)
    return (time.perf_counter() - t0) / n * 1e3

  kv = flops.kv_cache_bytes(config.llm, d["plan"].bounds, d["lengths"], lay.new_tokens, a.batch)
  floor_ms = (flops.llm_weight_bytes(config.llm) + kv) / bw * 1e3
  res = dict(device=str(jax.devices()[0]), batch=a.batch, method=a.method, reduction=red,
             fuse_projections=a.fuse_projections, attention=a.attention,
             copy_gbps=bw / 1e9, kv_cache_gb=kv / 1e9, decode_floor_ms_per_step=floor_ms)
  run_prefill = lambda: prefill(st, d["embeds"], d["pos"], d["valid"], d["vmask"])[1]  # noqa: E731
  for name, fn, steps in (("prefill", run_prefill, 1), ("decode_loop", run_loop, DECODE_LOOP_STEPS)):
    ms = wall_ms(fn)
    kinds, top, device_ms = profile_calls(fn, a.calls, f"{name}_trace_", keep=40)
    res[name] = dict(ms_per_call=ms, steps=steps, ms_per_step=ms / steps,
                     device_ms_per_call=device_ms, kinds_ms_per_call=kinds, top=top)
    print(f"{name}: {ms:.1f} ms per call ({ms / steps:.2f} per step), device {device_ms:.1f}; "
          + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()), flush=True)
    for r in top[:15]:
      print(f"  {r['ms_per_call']:8.2f} ms x{r['count_per_call']:5.0f}  {r['hlo_op'][:30]:30s} "
            f"{r['kernel'][:70]}", flush=True)
  res["decode_loop"]["of_floor"] = res["decode_loop"]["ms_per_step"] / floor_ms
  print(f"decode: {res['decode_loop']['ms_per_step']:.2f} ms per step, floor {floor_ms:.2f} "
        f"({res['decode_loop']['of_floor']:.2f}x)")
  path = os.path.join(a.out, "llm_profile.json")
  with open(path + ".tmp", "w") as fh:
    json.dump(res, fh, indent=1)
  os.replace(path + ".tmp", path)
  return res


if __name__ == "__main__":
  main()
