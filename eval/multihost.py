"""Evaluation over many hosts that together run one sharded model (`jax.distributed`).

When the model spans hosts (a mesh over every process's devices), every process must run the same
jitted steps in lockstep, each feeding the rows of the global batch that live on its own devices.
The pieces:

- `initialize()`: `jax.distributed.initialize()` when the environment asks for it: explicit
  `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`, or `ALTP_DISTRIBUTED=1`
  (JAX's own cluster detection: TPU pod slices, SLURM, Open MPI), or SLURM/Open MPI variables
  with more than one task; a no-op otherwise (docs/SCALING.md).
- `pending(names, pred_dir)`: images without a prediction file, decided by process 0 (the only
  writer) and broadcast, so every process sees the same list even without a shared file system.
- `schedule(todo, global_batch)`: the global batches, the last padded with None.
- `process_rows(mesh, global_batch)`: the slice of each global batch this process loads (its
  image shard): the rows its devices hold under the batch sharding.
- `write_predictions(pred_dir, records)`: process 0 writes one `{image_id}.json` per image,
  atomically; with outputs gathered to every process (`models.placement.to_host`) this gives one
  set of prediction files. A restart, with any number of processes, continues from `pending`.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from models.mesh import ACT_TOKENS, sharding_for


def initialize() -> None:
  """Joins the process group described by the environment (no-op for a single process)."""
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif (env.get("ALTP_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    jax.distributed.initialize()       # JAX's cluster auto-detection


def prediction_path(pred_dir: str, image_id: str) -> str:
  return os.path.join(pred_dir, f"{image_id}.json")


def pending(names: Sequence[str], pred_dir: str) -> list[str]:
  """`names` (same order on every process) without a prediction file in `pred_dir`, as process 0
  sees it."""
  done = np.zeros(len(names), np.int32)
  if jax.process_index() == 0:
    done[:] = [os.path.exists(prediction_path(pred_dir, n)) for n in names]
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return [n for n, d in zip(names, done) if not d]


def schedule(todo: Sequence[str], global_batch: int) -> list[list[str | None]]:
  """`todo` cut into global batches of `global_batch`, the last padded with None."""
  batches = [list(todo[i:i + global_batch]) for i in range(0, len(todo), global_batch)]
  if batches:
    batches[-1] += [None] * (global_batch - len(batches[-1]))
  return batches


def process_rows(mesh: jax.sharding.Mesh, global_batch: int) -> slice:
  """The contiguous rows of a [global_batch, ...] batch held by this process's devices."""
  sharding = sharding_for(ACT_TOKENS, mesh, (global_batch, 1))
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch, 1)).values():
    rows.update(range(global_batch)[index[0]])
  lo, hi = min(rows), max(rows) + 1
  if hi - lo != len(rows):
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of the batch: not "
                     "contiguous; order the mesh so each process's devices share batch rows")
  return slice(lo, hi)


def write_predictions(pred_dir: str, records: Mapping[str, dict]) -> None:
  """Process 0 writes `{image_id}.json` for each record, atomically (`gcg_output.write_prediction`:
  a crash never leaves a partial prediction for `pending` to mistake for a finished one)."""
  if jax.process_index() != 0:
    return
  from eval.gcg_output import write_prediction
  for image_id, record in records.items():
    if record.get("image_id") != image_id:
      raise ValueError(f"record for {image_id!r} carries image_id {record.get('image_id')!r}")
    write_prediction(pred_dir, record)
