"""Speed of the device SLIC (per image, batch 1..256) against the host SLIC (skimage).

Also times the device connectivity pass alone (`connectivity_device.enforce_connectivity_device`
on device SLIC labels) and the full image -> keep-indices program with and without it.

Runs everything in one process on the default JAX backend and writes `slic_bench.json` to
`--out`. On a GPU machine:

  python -m eval.bench_slic --out results/gpu
  python -m eval.slic_report --bench-gpu results/gpu/slic_bench.json   # fills docs/SUPERPIXELS.md

Device timings are wall-clock medians of `--reps` calls after one warm-up (compile) call, inputs
already on the device, each call ended by `block_until_ready`. The host path is skimage's `slic`
with its connectivity pass (`altp_jax.superpixels.slic_labels`), one image at a time, on the
scikit-image photos at the same size.
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

from altp_jax import altp, connectivity_device, pipeline, slic_device, superpixels
from eval import slic_photos


def _time(fn, *args, reps):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times), min(times)


def _ints(text):
  return [int(v) for v in text.split(",") if v]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for slic_bench.json")
  parser.add_argument("--size", type=int, default=336)
  parser.add_argument("--batches", default="1,8,64,256")
  parser.add_argument("--n-segments", default="29,196",
                      help="29 = ALTP's default at k=58 (coverage 0.5); 196 = 14x14 superpixels")
  parser.add_argument("--radii", default="1,2", help="device SLIC neighbourhoods (1 = 3x3)")
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--host-images", type=int, default=9, help="photos timed on the host")
  parser.add_argument("--pipeline-batch", type=int, default=64,
                      help="batch for the full image -> keep-indices program (0: skip)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  photos = [img for _, img in slic_photos.load(args.size)]
  dev = jax.devices()[0]
  result = {
      "backend": jax.default_backend(), "device_kind": dev.device_kind,
      "num_devices": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
      "cpu_count": os.cpu_count(), "size": args.size, "iterations": args.iterations,
      "reps": args.reps, "device_slic": [], "host_slic": [], "connectivity": [],
      "pipeline": [],
  }

  for n_seg in _ints(args.n_segments):
    t_host = []
    for img in photos[: args.host_images]:
      t0 = time.perf_counter()
      superpixels.slic_labels(img, n_segments=n_seg, max_num_iter=args.iterations)
      t_host.append(time.perf_counter() - t0)
    row = {"n_segments": n_seg, "images": len(t_host),
           "ms_per_image_median": 1e3 * statistics.median(t_host),
           "ms_per_image_mean": 1e3 * statistics.fmean(t_host)}
    result["host_slic"].append(row)
    print("host", row, flush=True)

    for radius in _ints(args.radii):
      fn = jax.jit(lambda x, n_seg=n_seg, radius=radius: slic_device.slic(
          x, n_segments=n_seg, num_iterations=args.iterations, radius=radius))
      for b in _ints(args.batches):
        batch = np.stack([photos[i % len(photos)] for i in range(b)])
        x = jax.device_put(jnp.asarray(batch))
        compile_s, med, best = _time(fn, x, reps=args.reps)
        row = {"n_segments": n_seg, "num_centres": slic_device.num_centres(
            args.size, args.size, n_seg), "radius": radius, "batch": b,
               "compile_s": compile_s, "ms_per_batch_median": 1e3 * med,
               "ms_per_image_median": 1e3 * med / b, "ms_per_image_best": 1e3 * best / b}
        result["device_slic"].append(row)
        print("device", row, flush=True)
        if radius == max(_ints(args.radii)):
          # The connectivity pass alone, on this batch's device SLIC labels.
          labels = jax.block_until_ready(fn(x))
          g = slic_device.num_centres(args.size, args.size, n_seg)
          conn = jax.jit(lambda l, g=g: connectivity_device.enforce_connectivity_device(
              l, num_centres=g))
          compile_s, med, best = _time(conn, labels, reps=args.reps)
          row = {"n_segments": n_seg, "num_centres": g, "batch": b, "compile_s": compile_s,
                 "ms_per_batch_median": 1e3 * med, "ms_per_image_median": 1e3 * med / b,
                 "ms_per_image_best": 1e3 * best / b}
          result["connectivity"].append(row)
          print("connectivity", row, flush=True)

  if args.pipeline_batch:
    b, k, grid = args.pipeline_batch, 58, (24, 24)
    cfg = altp.ALTPConfig(density="score_mass")
    batch = np.stack([photos[i % len(photos)] for i in range(b)])
    x = jax.device_put(jnp.asarray(batch))
    scores = jax.device_put(jax.random.uniform(jax.random.key(0), (b, grid[0] * grid[1])))
    for radius, connectivity in [(r, c) for r in _ints(args.radii) for c in (False, True)]:
      fn = jax.jit(lambda x, s, radius=radius, connectivity=connectivity:
                   pipeline.device_keep_indices(x, s, k=k, grid=grid, config=cfg, radius=radius,
                                                connectivity=connectivity))
      compile_s, med, best = _time(fn, x, scores, reps=args.reps)
      row = {"what": "device_keep_indices (SLIC [+ connectivity] + token labels + altp_select)",
             "k": k, "n_segments": cfg.n_segments(k), "radius": radius,
             "connectivity": connectivity, "batch": b,
             "compile_s": compile_s, "ms_per_batch_median": 1e3 * med,
             "ms_per_image_median": 1e3 * med / b}
      result["pipeline"].append(row)
      print("pipeline", row, flush=True)

  path = os.path.join(args.out, "slic_bench.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", path)


if __name__ == "__main__":
  main()
