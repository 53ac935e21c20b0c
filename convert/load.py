"""Load a converted model directory into an NNX module, placing every array where it belongs.

Restore targets are `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))` built from
the abstract model's logical axis names (`models.sharding.param_shardings`), so Orbax reads each
device's slice straight from disk: no full host copy of the model is ever made. By default
everything is replicated on the first device.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
from flax import nnx
import numpy as np
import orbax.checkpoint as ocp

from convert.writer import FORMAT, MANIFEST, PARAMS_DIR, nest, path_str, unnest
from models.sharding import MESH_AXES, param_shardings


def default_mesh() -> jax.sharding.Mesh:
  """A (1, 1, 1) mesh over the first device: every parameter replicated there."""
  return jax.make_mesh((1, 1, 1), MESH_AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def read_manifest(model_dir: str) -> dict:
  path = os.path.join(model_dir, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{model_dir}: no {MANIFEST}; not a converted model directory "
                            "(python -m convert ...)") from None
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, this loader reads {FORMAT!r}")
  return manifest


def restore_into(abstract: nnx.Module, model_dir: str, group_of, *, mesh=None, shardings=None,
                 dtype: Any = None) -> nnx.Module:
  """Restores the groups of `model_dir` into the variables of the abstract module `abstract`.

  Args:
    abstract: the model from `nnx.eval_shape` (shapes and logical axis names, no data).
    group_of: parameter path -> (group, path within the group), as used when writing.
    mesh: mesh for the logical-name rules (default: `default_mesh()`).
    shardings: a state of `NamedSharding`s matching `nnx.state(abstract)`; overrides `mesh`.
    dtype: cast every parameter to this dtype while reading (default: the stored dtype).
  Raises:
    ValueError: the stored parameters do not match the model (lists every difference).
  """
  manifest = read_manifest(model_dir)
  graphdef, state = nnx.split(abstract)
  flat_vars = dict(state.flat_state())
  if shardings is None:
    mesh = mesh if mesh is not None else default_mesh()
    flat_sh = fit_shardings(flat_vars, _flat(param_shardings(state, mesh)), strict=False)
  else:
    flat_sh = fit_shardings(flat_vars, _flat(shardings), strict=True)

  by_group: dict[str, dict[tuple, tuple]] = {}
  for path in flat_vars:
    group, rel = group_of(path)
    by_group.setdefault(group, {})[rel] = path
  errors = []
  stored = manifest["groups"]
  for group in sorted(set(by_group) - set(stored)):
    errors.append(f"group {group}: in the model, not in the checkpoint")
  for group in sorted(set(stored) - set(by_group)):
    errors.append(f"group {group}: in the checkpoint, not in the model")
  targets: dict[str, dict[tuple, jax.ShapeDtypeStruct]] = {}
  for group, entries in stored.items():
    if group not in by_group:
      continue
    want = by_group[group]
    have = {tuple(int(p) if p.isdigit() else p for p in e["path"].split(".")): e for e in entries}
    for rel in sorted(set(want) - set(have), key=path_str):
      errors.append(f"{group}.{path_str(rel)}: not in the checkpoint")
    for rel in sorted(set(have) - set(want), key=path_str):
      errors.append(f"{group}.{path_str(rel)}: in the checkpoint, not in the model")
    targets[group] = {}
    for rel in set(want) & set(have):
      var, entry = flat_vars[want[rel]], have[rel]
      if tuple(entry["shape"]) != tuple(var.shape):
        errors.append(f"{group}.{path_str(rel)}: stored {tuple(entry['shape'])}, model "
                      f"{tuple(var.shape)}")
        continue
      dt = np.dtype(dtype) if dtype is not None else _np_dtype(entry["dtype"])
      targets[group][rel] = jax.ShapeDtypeStruct(tuple(var.shape), dt,
                                                 sharding=flat_sh[want[rel]])
  if errors:
    raise ValueError(f"{model_dir}: checkpoint does not match the model ({len(errors)} "
                     "problems):\n  " + "\n  ".join(errors))

  values: dict[tuple, jax.Array] = {}
  with ocp.StandardCheckpointer() as ckptr:
    for group, target in targets.items():
      restored = ckptr.restore(os.path.join(os.path.abspath(model_dir), PARAMS_DIR, group),
                               nest(target))
      for rel, value in unnest(restored, list(target)).items():
        values[by_group[group][rel]] = value
  new_state = nnx.State.from_flat_path(
      [(p, var.replace(values[p])) for p, var in flat_vars.items()])
  return nnx.merge(graphdef, new_state)


def fit_shardings(flat_vars: dict, flat_shardings, *, strict: bool) -> dict:
  """Path -> NamedSharding, checking each array dimension divides evenly over its mesh axes.

  With `strict=False` (shardings derived from the logical rules) an indivisible dimension is
  replicated instead, e.g. GLaMM's vocabulary of 32007 rows on a `tensor` axis of 4, and one
  warning lists them; with `strict=True` (shardings passed by the caller) it is an error.
  """
  out, bad = {}, []
  for path, v in flat_shardings:
    sh = v.get_value() if isinstance(v, nnx.Variable) else v
    shape = tuple(flat_vars[path].shape)
    spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
    for dim, axes in enumerate(spec):
      if axes is None:
        continue
      n = int(np.prod([sh.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
      if shape[dim] % n:
        bad.append(f"{path_str(path)} {shape}: dim {dim} ({shape[dim]}) over {axes} ({n} devices)")
        spec[dim] = None
    out[path] = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec),
                                           memory_kind=sh.memory_kind)
  if bad and strict:
    raise ValueError("shardings do not divide these parameters evenly:\n  " + "\n  ".join(bad))
  if bad:
    logging.warning("replicating indivisible dimensions instead of sharding them:\n  %s",
                    "\n  ".join(bad))
  return out


def _flat(tree):
  if isinstance(tree, nnx.State):
    return list(tree.flat_state())
  raise TypeError(f"shardings must be an nnx.State of NamedSharding (param_shardings(...)), got "
                  f"{type(tree).__name__}")


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def load_glamm(model_dir: str, mesh: jax.sharding.Mesh | None = None, shardings=None,
               dtype: Any = None):
  """A `models.glamm.GLaMM` from a directory written by `python -m convert glamm`.

  Args:
    model_dir: the converted directory (config.json, manifest.json, params/).
    mesh: mesh for the logical axis rules; default: replicated on the first device.
    shardings: `nnx.State` of `NamedSharding`s for every variable (e.g. `param_shardings(state,
      mesh, rules)` with custom rules); overrides `mesh`.
    dtype: cast the parameters to this dtype while restoring (default: as stored).
  """
  from convert.glamm_table import group_of
  from models.glamm.config import GLaMMConfig
  from models.glamm.modeling import abstract_glamm

  with open(os.path.join(model_dir, "config.json")) as f:
    config = GLaMMConfig.from_dict(json.load(f))
  return restore_into(abstract_glamm(config), model_dir, group_of, mesh=mesh,
                      shardings=shardings, dtype=dtype)


def load_omg_llava(model_dir: str, mesh: jax.sharding.Mesh | None = None, shardings=None,
                   dtype: Any = None):
  """A `models.omg_llava.modeling.OMGLLaVA` from a directory written by `python -m convert
  omg_llava`, every array (the class-embedding buffer included) restored straight into its
  `NamedSharding` from the logical axis names.

  Args:
    model_dir: the converted directory (config.json, manifest.json, params/).
    mesh: mesh for the logical axis rules; default: replicated on the first device.
    shardings: `nnx.State` of `NamedSharding`s for every variable; overrides `mesh`.
    dtype: cast every array to this dtype while restoring (default: as stored, i.e. the LLM in
      the conversion's --dtype and the vision path and projectors in float32).
  """
  from convert.omg_llava_table import group_of
  from models.omg_llava.config import OMGLLaVAConfig
  from models.omg_llava.modeling import abstract_omg_llava

  with open(os.path.join(model_dir, "config.json")) as f:
    config = OMGLLaVAConfig.from_dict(json.load(f))
  return restore_into(abstract_omg_llava(config), model_dir, group_of, mesh=mesh,
                      shardings=shardings, dtype=dtype)
