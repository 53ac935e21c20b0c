"""Dump where every GLaMM parameter goes on given meshes (a golden file for tests, a memory plan).

  python -m models.sharding_dump --out tests/golden/glamm_tiny_partition_specs.json
  python -m models.sharding_dump --config glamm_7b --mesh 1,2,4 --mesh 1,1,8 --out plan.json

Needs no devices and no memory: the model is abstract (`nnx.eval_shape`) and specs come from the
mesh shape alone. JSON: {"config", "meshes": {"data=D,fsdp=F,tensor=T": {"specs": {path: spec},
"replicated": [dimension the mesh does not divide, ...], "param_bytes_per_device": n}},
"logical": {path: [logical names]}}; a spec is a list with one entry per dimension: null
(whole), an axis name, or a list of axis names.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Sequence

from flax import nnx

from models.sharding import (MESH_AXES, bytes_per_device, plan_param_specs,
                             summarize_replicated)

# The equality-test meshes of the tiny model (tests/test_sharded_equality.py).
DEFAULT_MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4))


@functools.lru_cache(maxsize=4)
def abstract_state(config) -> nnx.State:
  """The abstract state of GLaMM(config) (cached: tracing the 7B initialisers takes seconds)."""
  from models.glamm.modeling import abstract_glamm
  return nnx.state(abstract_glamm(config))


def _spec_json(spec, ndim: int) -> list:
  entries = list(spec) + [None] * (ndim - len(spec))
  return [list(e) if isinstance(e, tuple) else e for e in entries]


def mesh_key(shape: Sequence[int]) -> str:
  return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))


def dump(config_name: str = "tiny", meshes: Sequence[Sequence[int]] = DEFAULT_MESHES) -> dict:
  """The JSON-ready plan of `GLaMMConfig.<config_name>()` on each mesh shape."""
  from models.glamm.config import GLaMMConfig
  from models.sharding import _names_of

  state = abstract_state(getattr(GLaMMConfig, config_name)())
  flat = list(state.flat_state())
  key = lambda path: ".".join(map(str, path))
  out = {"config": config_name, "meshes": {},
         "logical": {key(p): list(_names_of(v)) for p, v in flat}}
  for shape in meshes:
    sizes = dict(zip(MESH_AXES, shape))
    specs, report = plan_param_specs(state, sizes)
    out["meshes"][mesh_key(shape)] = {
        "specs": {key(p): _spec_json(specs[p], len(v.shape)) for p, v in flat},
        "replicated": summarize_replicated(report),
        "param_bytes_per_device": bytes_per_device(state, specs, sizes),
    }
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--config", default="tiny", choices=["tiny", "glamm_7b"])
  parser.add_argument("--mesh", action="append", default=None,
                      help="data,fsdp,tensor sizes (repeatable); default: the test meshes")
  args = parser.parse_args(argv)
  meshes = DEFAULT_MESHES if not args.mesh else [
      tuple(int(s) for s in m.split(",")) for m in args.mesh]
  for m in meshes:
    if len(m) != len(MESH_AXES) or min(m) < 1:
      parser.error(f"--mesh {','.join(map(str, m))}: need three positive sizes data,fsdp,tensor")
  result = dump(args.config, meshes)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
    f.write("\n")
  for name, m in result["meshes"].items():
    print(f"{name}: {m['param_bytes_per_device'] / 2**30:.3f} GiB of parameters per device, "
          f"{len(m['replicated'])} replicated cases")
  return result


if __name__ == "__main__":
  main()
