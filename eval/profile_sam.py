"""Where the SAM image encoder's GPU time goes: kernel times from one `jax.profiler` trace.

Builds the SAM ViT-H encoder of GLaMM-7B with random bf16 weights (`--tiny`: the test-sized one),
runs `--batch` images a few times under the profiler and sums the device events of the trace by
kernel name, then by kind (matmul: cuBLAS/CUTLASS GEMMs and XLA's GEMM fusions; attention: cuDNN
flash kernels; other: elementwise, layout and reduction fusions). Writes `sam_profile.json` to
`--out` (wall-clock ms per call, device ms per call, kinds, the 60 largest kernels):

  python -m eval.profile_sam --out OUT --batch 8
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp

MATMUL_MARKS = ("gemm", "nvjet", "cutlass", "xmma", "cublas")
ATTENTION_MARKS = ("sdpa", "flash", "fmha")


def kind_of(kernel: str) -> str:
  k = kernel.lower()
  if any(m in k for m in ATTENTION_MARKS):
    return "attention"
  if any(m in k for m in MATMUL_MARKS):
    return "matmul"
  return "other"


def device_kernel_times(trace_events: list[dict]) -> tuple[dict, float]:
  """({(hlo_op, kernel): [total_us, count]}, total_us) over the events of the device processes
  (every process when the trace has no device, e.g. on a CPU)."""
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in trace_events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in names.items() if "/device:" in n} or set(names)
  agg: dict = collections.defaultdict(lambda: [0.0, 0])
  total = 0.0
  for e in trace_events:
    if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
      key = (e.get("args", {}).get("hlo_op") or e.get("name", ""), e.get("name", "")[:100])
      agg[key][0] += e["dur"]
      agg[key][1] += 1
      total += e["dur"]
  return agg, total


def profile_calls(call, calls: int, prefix: str = "trace_", keep: int = 60):
  """Runs `call()` `calls` times under `jax.profiler.trace` and sums the trace's device events:
  (ms per call by kind, the `keep` largest kernels as dicts {hlo_op, kernel, ms_per_call,
  count_per_call}, device ms per call). `call` must already be compiled (warm)."""
  trace_dir = tempfile.mkdtemp(prefix=prefix)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      y = call()
    jax.block_until_ready(y)
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"profile: the profiler wrote no trace JSON under {trace_dir}")
  with gzip.open(files[0]) as fh:
    events = json.load(fh)
  events = events["traceEvents"] if isinstance(events, dict) else events
  agg, total = device_kernel_times(events)
  kinds: dict = collections.defaultdict(float)
  for (_, kernel), (us, _) in agg.items():
    kinds[kind_of(kernel)] += us / calls / 1e3
  top = sorted(agg.items(), key=lambda kv: -kv[1][0])[:keep]
  return (dict(kinds),
          [{"hlo_op": op, "kernel": k, "ms_per_call": us / calls / 1e3,
            "count_per_call": n / calls} for (op, k), (us, n) in top],
          total / calls / 1e3)


def main(argv: Sequence[str] | None = None) -> dict:
  from flax import nnx
  from eval import bench_common as common
  from eval.bench_jax import build_model
  from models.sam.image_encoder import ImageEncoder

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--attention", default="auto", help="SAM attention path (SAM_ATTENTION_IMPLS)")
  p.add_argument("--calls", type=int, default=3, help="profiled calls")
  p.add_argument("--tiny", action="store_true", help="the test-sized encoder (CPU smoke run)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  cfg = common.with_sam_attention(common.bench_config(a.tiny), a.attention).sam.image_encoder
  graphdef, state = build_model(cfg, ImageEncoder)
  x = jax.random.normal(jax.random.key(0), (a.batch, cfg.img_size, cfg.img_size, 3), jnp.bfloat16)
  f = jax.jit(lambda s, px: nnx.merge(graphdef, s)(px))
  jax.block_until_ready(f(state, x))
  t0 = time.perf_counter()
  for _ in range(5):
    y = f(state, x)
  jax.block_until_ready(y)
  ms = (time.perf_counter() - t0) / 5 * 1e3
  kinds, top, total = profile_calls(lambda: f(state, x), a.calls, "sam_trace_")
  res = {"device": str(jax.devices()[0]), "batch": a.batch, "attention": a.attention,
         "ms_per_call": ms, "ms_per_image": ms / a.batch,
         "device_ms_per_call": total, "kinds_ms_per_call": kinds, "top": top}
  with open(os.path.join(a.out, "sam_profile.json"), "w") as fh:
    json.dump(res, fh, indent=1)
  print(json.dumps({k: res[k] for k in ("device", "batch", "ms_per_image", "device_ms_per_call",
                                        "kinds_ms_per_call")}))
  for r in res["top"][:25]:
    print(f"{r['ms_per_call']:8.2f} ms x{r['count_per_call']:4.0f}  {r['kernel']}")
  return res


if __name__ == "__main__":
  main()
