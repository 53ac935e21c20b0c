"""Selection-time benchmark of the pruning methods (not a test).

    python -m eval.bench_selection --out out/bench_selection [--quick]

Times, per image, the jitted selections for N in {576, 1024, 4096} visual tokens and batch in
{1, 8, 64, 256}: ALTP (score-mass density, and dispersion density on D-dim features), top-k by
score (FastV/PyramidDrop's rule), FastV's last-query score over a 32-head layer, random and grid;
plus host SLIC per 336x336 image. Each number is the median of repeated calls after a warm-up
(compile) call, with `block_until_ready`. It also checks that repeated calls with the same static
shapes never recompile. Results go to `DIR/bench_selection.json` and `DIR/bench_selection.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import altp_jax
from altp_jax import altp as altp_mod


def _synthetic(b, n, d, seed):
  """Scores, blocky superpixel labels (~n/8 regions of a square grid) and features."""
  side = int(round(np.sqrt(n)))
  rng = np.random.default_rng(seed)
  blocks = max(1, side // 3)
  yy, xx = np.divmod(np.arange(n), side)
  base = (yy * blocks // side) * blocks + (xx * blocks // side)
  labels = np.broadcast_to(base, (b, n)).astype(np.int32)
  scores = rng.random((b, n), dtype=np.float32)
  feats = rng.standard_normal((b, n, d), dtype=np.float32)
  return scores, labels, feats, blocks * blocks


def _bench(fn, args_list, repeats):
  jax.block_until_ready(fn(*args_list[0]))
  times = []
  for i in range(repeats):
    args = args_list[i % len(args_list)]      # rotate inputs so caches do not flatter us
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run(out_dir, ns=(576, 1024, 4096), batches=(1, 8, 64, 256), feat_dim=256, repeats=20):
  from tqdm import tqdm

  os.makedirs(out_dir, exist_ok=True)
  dev = jax.devices()[0]
  rows = []
  cfg_mass = altp_jax.ALTPConfig(density="score_mass")
  cfg_disp = altp_jax.ALTPConfig(density="dispersion")
  combos = [(n, b) for n in ns for b in batches]
  for n, b in tqdm(combos, desc="shapes"):
    k = altp_jax.keep_count(n, 0.9)
    inputs = [_synthetic(b, n, feat_dim, s) for s in range(3)]
    g = inputs[0][3]
    dev_inputs = [tuple(jax.device_put(x) for x in inp[:3]) for inp in inputs]
    t_len, heads, dh = n + 64, 32, 128
    rng = np.random.default_rng(0)
    q = jax.device_put(rng.standard_normal((b, heads, dh), dtype=np.float32).astype(jnp.bfloat16))
    keys = jax.device_put(rng.standard_normal((b, t_len, heads, dh),
                                              dtype=np.float32).astype(jnp.bfloat16))
    valid = jnp.ones((b, t_len), bool)
    methods = {
        "altp_score_mass": (jax.jit(lambda s, l, f: altp_jax.altp_select(
            s, l, k, config=cfg_mass, num_segments=g)), dev_inputs),
        "altp_dispersion": (jax.jit(lambda s, l, f: altp_jax.altp_select(
            s, l, k, config=cfg_disp, features=f, num_segments=g)), dev_inputs),
        "topk": (jax.jit(lambda s, l, f: altp_jax.topk_select(s, k)), dev_inputs),
        "random": (jax.jit(lambda s, l, f: altp_jax.random_select(jax.random.key(0), (b,), n, k)),
                   dev_inputs),
        "grid": (jax.jit(lambda s, l, f: altp_jax.grid_select((int(np.sqrt(n)),) * 2, k, (b,))),
                 dev_inputs),
        "fastv_score": (jax.jit(altp_jax.last_query_scores), [(q, keys, valid)]),
    }
    for name, (fn, args_list) in methods.items():
      sec = _bench(fn, args_list, repeats)
      rows.append(dict(method=name, n=n, batch=b, k=k, ms_per_call=sec * 1e3,
                       ms_per_image=sec * 1e3 / b))
  # No recompilation with the same static shapes and new data.
  s, l, f, g = _synthetic(64, 576, 8, 11)
  altp_jax.altp_select(s, l, 58, config=cfg_mass, num_segments=g)
  before = altp_mod._select._cache_size()
  for seed in range(12, 17):
    s, l, f, _ = _synthetic(64, 576, 8, seed)
    altp_jax.altp_select(s, l, 58, config=cfg_mass, num_segments=g)
  recompiles = altp_mod._select._cache_size() - before
  # Host SLIC per image.
  from eval.demo import load_photo
  img = load_photo("astronaut")
  slic_times = []
  for _ in range(5):
    t0 = time.perf_counter()
    altp_jax.slic_labels(img, n_segments=29)
    slic_times.append(time.perf_counter() - t0)
  result = dict(device=str(dev), platform=dev.platform, device_kind=dev.device_kind,
                jax=jax.__version__, host=platform.node(), date=time.strftime("%Y-%m-%d"),
                rows=rows, recompiles_after_warmup=recompiles,
                host_slic_ms_per_image=statistics.median(slic_times) * 1e3, feat_dim=feat_dim)
  with open(os.path.join(out_dir, "bench_selection.json.tmp"), "w") as fh:
    json.dump(result, fh, indent=1)
  os.replace(os.path.join(out_dir, "bench_selection.json.tmp"),
             os.path.join(out_dir, "bench_selection.json"))
  md = markdown(result)
  with open(os.path.join(out_dir, "bench_selection.md"), "w") as fh:
    fh.write(md)
  return result, md


def markdown(result):
  rows = result["rows"]
  methods = list(dict.fromkeys(r["method"] for r in rows))
  lines = [f"Device: {result['device_kind']} ({result['platform']}), jax {result['jax']}, "
           f"{result['date']}. Milliseconds per image (median; k = 10% of N; features D = "
           f"{result['feat_dim']}).", "",
           "| N | batch | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
  for n in sorted({r["n"] for r in rows}):
    for b in sorted({r["batch"] for r in rows}):
      vals = {r["method"]: r["ms_per_image"] for r in rows if r["n"] == n and r["batch"] == b}
      if vals:
        lines.append(f"| {n} | {b} | " + " | ".join(f"{vals[m]:.4f}" for m in methods) + " |")
  lines += ["", f"Host SLIC (scikit-image, 336x336): {result['host_slic_ms_per_image']:.1f} ms "
            f"per image. Recompilations after warm-up with new data: "
            f"{result['recompiles_after_warmup']}."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.bench_selection",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", default="out/bench_selection")
  p.add_argument("--quick", action="store_true", help="N=576 and batch 1, 8 only (smoke run)")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--feat-dim", type=int, default=256)
  p.add_argument("--ns", default="576,1024,4096", help="token counts N")
  p.add_argument("--batches", default="1,8,64,256")
  a = p.parse_args(argv)
  kw = dict(ns=tuple(int(x) for x in a.ns.split(",")),
            batches=tuple(int(x) for x in a.batches.split(",")))
  if a.quick:
    kw = dict(ns=(576,), batches=(1, 8))
  _, md = run(a.out, repeats=a.repeats, feat_dim=a.feat_dim, **kw)
  print(md)


if __name__ == "__main__":
  main()
