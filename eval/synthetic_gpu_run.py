"""One-process GPU job: generate the synthetic scenes (if absent), train the small GLaMM on them
within a time limit, and write a JSON summary. Re-running it with the same --out continues both the
data (resumable writer) and the training (Orbax checkpoints), so a long run fits several
time-limited device sessions.

  python -m eval.synthetic_gpu_run --out DIR --train 20000 --val 256 --test 1000 \\
      --steps 6000 --time-limit 540

DIR/data: the scenes (eval/scenes.py layout); DIR/run: the training workdir
(eval/train_synthetic.py); DIR/summary.json: device, data generation time, parameter count,
steady-state step time (from the log's timestamps, compile excluded), the last train/val rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import jax

from eval import scenes
from eval.train_synthetic import PRESETS, _override, read_log, train


def steady_step_time(rows: list[dict]) -> float | None:
  """Seconds per step between the second and the last train log line of the latest session
  (the first line of a session carries the compile)."""
  rows = [r for r in rows if r.get("kind") == "train"]
  if not rows:
    return None
  session = [r for r in rows if r.get("session") == rows[-1].get("session")]
  if len(session) < 3:
    return None
  a, b = session[1], session[-1]
  return (b["time"] - a["time"]) / max(b["step"] - a["step"], 1)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--train", type=int, default=20000)
  p.add_argument("--val", type=int, default=256)
  p.add_argument("--test", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--steps", type=int)
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  p.add_argument("--time-limit", type=float, default=540.0)
  p.add_argument("--export", default=None,
                 help="also write the inference checkpoint (eval/synthetic_checkpoint.py) here")
  a = p.parse_args(argv)
  t_start = time.time()
  data = os.path.join(a.out, "data")
  scenes.write_dataset(data, {"train": a.train, "val": a.val, "test": a.test}, a.seed,
                       workers=a.gen_workers, progress=False)
  gen_s = time.time() - t_start
  items = list(a.set) + ([f"steps={a.steps}"] if a.steps is not None else [])
  cfg = _override(PRESETS[a.preset](), items)
  workdir = os.path.join(a.out, "run")
  result = train(cfg, data, workdir, time_limit_s=max(a.time_limit - gen_s, 1.0))
  summary = {
      "device": str(jax.devices()[0]), "data_counts": {"train": a.train, "val": a.val,
                                                       "test": a.test},
      "data_generation_s": gen_s, "params": result["params"], "steps_done": result["step"],
      "steps_planned": cfg.steps,
      "batch_size": cfg.batch_size,
      "steady_step_time_s": steady_step_time(read_log(os.path.join(workdir, "log.jsonl"))),
      "last_train": result["last_train"], "last_val": result["last_val"],
      "wall_s": time.time() - t_start}
  with open(os.path.join(workdir, "config.json")) as f:
    summary["config"] = json.load(f)
  if a.export:
    from eval.synthetic_checkpoint import export_model
    from flax import nnx
    model = nnx.merge(result["graphdef"], result["state"])[0]
    export_model(model, os.path.join(workdir, "tokenizer"), a.export, train_config=cfg.to_dict(),
                 step=result["step"])
  with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps({k: summary[k] for k in ("device", "steps_done", "steady_step_time_s")}))
  return summary


if __name__ == "__main__":
  main()
