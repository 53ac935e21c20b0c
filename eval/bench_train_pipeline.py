"""Is synthetic training limited by its input pipeline or by the device? (issue 9)

Times, for the `small` training preset (or `--preset micro` on a CPU):
  pipeline_ms_per_batch[w]  `prefetch_batches` alone with w worker processes (no training),
                            ms per batch after the first;
  step_ms_host_batch        the jitted training step fed one host (numpy) batch, as training
                            feeds it (host-to-device copy included);
  step_ms_device_batch      the same step on a batch already on the device.
Training runs at the larger of the pipeline and host-batch step times. Scenes are generated into
`--data` first (resumable). Writes `train_pipeline.json` to `--out`:

  python -m eval.bench_train_pipeline --out OUT --data /tmp/pipeline_data
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import jax


def _mean_step_ms(step, state, batch, reps: int):
  state, aux = step(state, batch)          # compile / warm-up
  jax.block_until_ready(aux)
  t0 = time.perf_counter()
  for _ in range(reps):
    state, aux = step(state, batch)
  jax.block_until_ready(aux)
  return state, (time.perf_counter() - t0) / reps * 1e3


def main(argv: Sequence[str] | None = None) -> dict:
  from eval import scenes
  from eval import train_synthetic as ts
  from eval.synthetic_data import SyntheticGCGData, prefetch_batches
  from eval.tokenizer import load_tokenizer

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--data", required=True, help="scene folder (generated if absent)")
  p.add_argument("--scenes", type=int, default=1024)
  p.add_argument("--preset", choices=sorted(ts.PRESETS), default="small")
  p.add_argument("--workers", default="8,15", help="comma list of worker-process counts")
  p.add_argument("--batches", type=int, default=25, help="batches per pipeline measurement")
  p.add_argument("--reps", type=int, default=20, help="timed training steps")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  t0 = time.perf_counter()
  scenes.write_dataset(a.data, {"train": a.scenes}, 0, workers=os.cpu_count() or 1,
                       progress=False)
  res = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "preset": a.preset,
         "data_generation_s": time.perf_counter() - t0}
  cfg = ts.PRESETS[a.preset]()
  tok_dir = os.path.join(a.data, "tokenizer")
  tok = load_tokenizer(tok_dir)
  gcfg = cfg.glamm_config(len(tok))
  data = SyntheticGCGData(a.data, "train", tok, clip_size=cfg.image_size,
                          sam_size=cfg.sam_image_size, num_visual_tokens=gcfg.num_visual_tokens,
                          max_masks=cfg.max_masks, max_answer_tokens=cfg.max_answer_tokens)
  res["batch_size"] = cfg.batch_size
  res["pipeline_ms_per_batch"] = {}
  for w in (int(x) for x in a.workers.split(",")):
    batches = prefetch_batches(data, cfg.batch_size, 0, a.batches + 1, cfg.seed, workers=w,
                               tokenizer_dir=tok_dir)
    next(batches)                          # worker start-up
    t = time.perf_counter()
    n = sum(1 for _ in batches)
    res["pipeline_ms_per_batch"][w] = (time.perf_counter() - t) / n * 1e3
  st = ts.StepStatics(cfg.ce_weight, cfg.bce_weight, cfg.dice_weight, data.sam_input_size(),
                      data.image_hw)
  graphdef, state = ts.init_state(cfg, len(tok))

  def step(s, b):
    return ts.train_step(graphdef, s, b, st, cfg.fast_compile)
  batch = data.batch(range(cfg.batch_size))
  state, res["step_ms_host_batch"] = _mean_step_ms(step, state, batch, a.reps)
  state, res["step_ms_device_batch"] = _mean_step_ms(step, state, jax.device_put(batch), a.reps)
  with open(os.path.join(a.out, "train_pipeline.json"), "w") as f:
    json.dump(res, f, indent=2)
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
