"""Putting a model and its inputs on a mesh.

- `place_model(model, mesh)`: an in-memory model (e.g. freshly initialised in a test) moved onto
  the mesh with `plan_param_shardings`. Checkpoints are restored straight into place instead
  (`convert.load.load_glamm(dir, mesh=...)`), never through this.
- `put_global(x, names, mesh)`: a host array holding the *global* batch, split by logical names
  (one process, or every process holding the same data).
- `from_process_local(x, names, mesh)`: each process passes only its own rows (its image shard);
  the result is the global array, rows ordered by process index.
- `to_host(x)`: a global array gathered to every process as numpy.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from models.mesh import sharding_for
from models.sharding import plan_param_shardings, summarize_replicated


def place_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """The model's variables moved to their planned shardings on `mesh` (returns a new module)."""
  graphdef, state = nnx.split(model)
  shardings, report = plan_param_shardings(state, mesh)
  if report:
    logging.warning("replicating dimensions the mesh does not divide:\n  %s",
                    "\n  ".join(summarize_replicated(report)))
  flat_sh = dict(shardings.flat_state())
  placed = nnx.State.from_flat_path(
      [(p, v.replace(jax.device_put(v.get_value(), flat_sh[p].get_value())))
       for p, v in state.flat_state()])
  return nnx.merge(graphdef, placed)


def put_global(x, names: Sequence[str | None], mesh: jax.sharding.Mesh) -> jax.Array:
  """A host array of the global shape placed by logical `names` (each device gets its block)."""
  x = np.asarray(x)
  return jax.device_put(x, sharding_for(names, mesh, x.shape))


def from_process_local(x, names: Sequence[str | None], mesh: jax.sharding.Mesh,
                       global_rows: int | None = None) -> jax.Array:
  """The global array whose rows (axis 0) are the concatenation of every process's `x`.

  Each process passes the same number of rows (pad the last shard); `global_rows` defaults to
  rows x process_count.
  """
  x = np.asarray(x)
  rows = x.shape[0] * jax.process_count() if global_rows is None else global_rows
  shape = (rows,) + x.shape[1:]
  return jax.make_array_from_process_local_data(sharding_for(names, mesh, shape), x, shape)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array as numpy on every process."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
