"""The device mesh: built from a command-line spec, checked against the model, used to pin arrays.

- `parse_mesh_spec("data=2,fsdp=-1,tensor=4", num_devices)` -> {"data": 2, "fsdp": 1, "tensor": 4}
  (at most one -1, inferred from the device count; omitted axes are 1).
- `make_mesh(spec, devices=None)`: a `("data", "fsdp", "tensor")` mesh with Auto axis types (GSPMD
  propagates shardings from the parameters and the pinned activations; jax 0.10's default axis
  type, Explicit, would demand an out_sharding on every contraction over a sharded dimension).
- `check_divisible(config, mesh, batch)`: one error naming every shape the mesh does not divide
  (LLM heads and KV heads over `tensor`, batch over `data` x `fsdp`), before anything compiles.
- `constrain(x, names)`: `with_sharding_constraint` by logical names (`models.sharding` table), a
  no-op without a mesh; `ACT_*`/`CACHE_*` name the main activations and the KV cache.
- `cache_shardings(cache, mesh)` / `shard_cache(cache, mesh)`: the KV cache with batch over
  `data` x `fsdp` and KV heads over `tensor`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from models.sharding import LOGICAL_RULES, MESH_AXES, logical_spec

# Logical names of the main activations (see the table in models/sharding.py).
ACT_TOKENS = ("batch", "length")                           # ids, positions, masks [B, L]
ACT_HIDDEN = ("batch", "length", "act_embed")              # LLM / projector states [B, L, D]
ACT_LOGITS = ("batch", "length", "act_vocab")              # [B, L, V]
ACT_PIXELS = ("batch", "act_spatial", "act_spatial", None)  # images [B, H, W, 3]
ACT_SAM_EMBED = ("batch", "act_spatial", "act_spatial", "act_embed")   # [B, h, w, C]
ACT_MASKS = ("batch", "act_masks", "act_spatial", "act_spatial")       # [B, S, H, W]
ACT_BATCH = ("batch",)                                     # per-row scalars [B]
CACHE_KV = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")   # [B, S, Hkv, Dh]
CACHE_VALID = ("cache_batch", "cache_length")              # [B, S]


class MeshError(ValueError):
  """A mesh spec that cannot be built, or a mesh that does not fit the model or the batch."""


def parse_mesh_spec(text: str, num_devices: int | None = None) -> dict[str, int]:
  """`"data=D,fsdp=F,tensor=T"` -> {axis: size} in MESH_AXES order.

  Axes may be omitted (size 1) and one may be -1 (inferred so the product is `num_devices`,
  default `jax.device_count()`). The product must equal the device count.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise MeshError(f"mesh spec {text!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                      f"{', '.join(MESH_AXES)}")
    if name in sizes:
      raise MeshError(f"mesh spec {text!r}: axis {name!r} given twice")
    try:
      size = int(value)
    except ValueError:
      raise MeshError(f"mesh spec {text!r}: size {value!r} of {name!r} is not an integer") from None
    if size == 0 or size < -1:
      raise MeshError(f"mesh spec {text!r}: size of {name!r} must be positive or -1, got {size}")
    sizes[name] = size
  inferred = [a for a, s in sizes.items() if s == -1]
  if len(inferred) > 1:
    raise MeshError(f"mesh spec {text!r}: only one axis may be -1, got {', '.join(inferred)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if inferred:
    if num_devices % known:
      raise MeshError(f"mesh spec {text!r}: {num_devices} devices are not a multiple of the "
                      f"other axes' product {known}, so {inferred[0]}=-1 cannot be inferred")
    sizes[inferred[0]] = num_devices // known
  out = {a: sizes.get(a, 1) for a in MESH_AXES}
  if math.prod(out.values()) != num_devices:
    raise MeshError(f"mesh spec {text!r}: data x fsdp x tensor = "
                    f"{' x '.join(str(out[a]) for a in MESH_AXES)} = {math.prod(out.values())}, "
                    f"but there are {num_devices} devices")
  return out


def make_mesh(spec: str | Mapping[str, int] | Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all).

  `spec`: a CLI string for `parse_mesh_spec`, a {axis: size} dict, or (data, fsdp, tensor).
  Device order comes from `jax.make_mesh` (topology-aware: `tensor`, the minor axis, lands on the
  fastest links, e.g. the GPUs of one NVLink domain).
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(spec, str):
    sizes = parse_mesh_spec(spec, len(devices))
  elif isinstance(spec, Mapping):
    sizes = parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()), len(devices))
  else:
    if len(spec) != len(MESH_AXES):
      raise MeshError(f"mesh shape {tuple(spec)} must give {len(MESH_AXES)} sizes {MESH_AXES}")
    sizes = parse_mesh_spec(",".join(f"{a}={s}" for a, s in zip(MESH_AXES, spec)), len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)


def _llm_config(config):
  return getattr(config, "llm", config)


def check_divisible(config, mesh: jax.sharding.Mesh | Mapping[str, int], batch: int | None = None):
  """Raises `MeshError` naming every shape the mesh cannot split evenly.

  Checked: the LLM's attention heads and KV heads over `tensor` (tensor parallelism splits whole
  heads; fewer KV heads than tensor devices would need KV replication, which this model does not
  do), and, when given, the global `batch` over `data` x `fsdp`. `config`: a GLaMMConfig or a
  LlamaConfig. Dimensions that may fall back to replication (vocab, small vision widths) are not
  errors: `models.sharding.plan_param_shardings` reports them.
  """
  sizes = dict(mesh.shape) if isinstance(mesh, jax.sharding.Mesh) else dict(mesh)
  llm = _llm_config(config)
  tensor = sizes.get("tensor", 1)
  rows = sizes.get("data", 1) * sizes.get("fsdp", 1)
  problems = []
  if llm.num_heads % tensor:
    problems.append(f"LLM attention heads: {llm.num_heads} heads do not divide over tensor="
                    f"{tensor}")
  if llm.num_kv_heads % tensor:
    problems.append(f"LLM KV heads: {llm.num_kv_heads} KV heads do not divide over tensor="
                    f"{tensor}" + (" (fewer KV heads than tensor devices)"
                                   if llm.num_kv_heads < tensor else ""))
  if batch is not None and batch % rows:
    problems.append(f"batch: {batch} rows do not divide over data x fsdp = "
                    f"{sizes.get('data', 1)} x {sizes.get('fsdp', 1)} = {rows}; use a multiple "
                    f"of {rows} (pad the last batch)")
  if problems:
    shape = ", ".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)
    raise MeshError(f"mesh ({shape}) does not fit: " + "; ".join(problems))


# -- activations and the KV cache --------------------------------------------------------------------

def spec_for(names: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh_shape: Mapping[str, int] | None = None,
             rules=LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec of an activation with logical `names`; with `shape` and `mesh_shape`, a
  dimension the mesh does not divide stays whole (e.g. logits over a 32007-entry vocab)."""
  return logical_spec(names, mesh_shape, shape, rules)[0]


def sharding_for(names: Sequence[str | None], mesh: jax.sharding.Mesh,
                 shape: Sequence[int] | None = None, rules=LOGICAL_RULES) -> NamedSharding:
  """NamedSharding of an activation with logical `names` on `mesh`."""
  return NamedSharding(mesh, spec_for(names, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: jax.sharding.Mesh | None = None,
              rules=LOGICAL_RULES) -> jax.Array:
  """`with_sharding_constraint(x, names -> mesh)`; `mesh` defaults to the one set with
  `jax.set_mesh`; without a mesh it returns x unchanged, so model code runs on one device too."""
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape "
                     f"{x.shape}")
  if mesh is None:
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
      return x
    spec = spec_for(names, x.shape, dict(abstract.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.lax.with_sharding_constraint(x, sharding_for(names, mesh, x.shape, rules))


def cache_shardings(cache, mesh: jax.sharding.Mesh):
  """A KVCache-shaped tree of NamedShardings: k/v by CACHE_KV, valid by CACHE_VALID."""
  kv = lambda a: sharding_for(CACHE_KV, mesh, a.shape)
  return type(cache)(k=tuple(kv(a) for a in cache.k), v=tuple(kv(a) for a in cache.v),
                     valid=sharding_for(CACHE_VALID, mesh, cache.valid.shape))


def constrain_cache(cache, mesh: jax.sharding.Mesh | None = None):
  """The cache pinned to its sharding inside a jitted step (keeps every step's output cache in the
  layout the next step expects, so nothing is resharded between steps)."""
  return type(cache)(k=tuple(constrain(a, CACHE_KV, mesh) for a in cache.k),
                     v=tuple(constrain(a, CACHE_KV, mesh) for a in cache.v),
                     valid=constrain(cache.valid, CACHE_VALID, mesh))


def shard_cache(cache, mesh: jax.sharding.Mesh):
  """Places an (e.g. freshly created) cache on the mesh with `cache_shardings`."""
  return jax.device_put(cache, cache_shardings(cache, mesh))


# -- command line: check a mesh against the model before launching --------------------------------

def kv_cache_bytes_per_device(llm, batch: int, cache_length: int, sizes: Mapping[str, int],
                              itemsize: int = 2) -> int:
  """KV cache bytes per device: k and v [B, S, Hkv, Dh] per layer, batch over data x fsdp, KV
  heads over tensor."""
  rows = batch // (sizes.get("data", 1) * sizes.get("fsdp", 1))
  heads = llm.num_kv_heads // sizes.get("tensor", 1)
  return 2 * llm.num_layers * rows * cache_length * heads * llm.head_dim * itemsize


def main(argv=None) -> dict:
  """`python -m models.mesh --mesh data=-1,tensor=4 --devices 8 --batch 8`: the mesh sizes, the
  divisibility check, and the per-device memory of parameters and KV cache."""
  import argparse
  import json

  from models.glamm.config import GLaMMConfig
  from models.sharding_dump import abstract_state
  from models.sharding import bytes_per_device, plan_param_specs, summarize_replicated

  parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
  parser.add_argument("--mesh", required=True, help="data=D,fsdp=F,tensor=T (one may be -1)")
  parser.add_argument("--devices", type=int, default=None, help="default: jax.device_count()")
  parser.add_argument("--config", default="glamm_7b", choices=["glamm_7b", "tiny"])
  parser.add_argument("--checkpoint", default=None, help="converted dir: read its config.json")
  parser.add_argument("--batch", type=int, default=None, help="global batch (rows)")
  parser.add_argument("--cache-length", type=int, default=1152,
                      help="KV slots per row (GCG: 576 image + ~64 prompt + 512 new tokens)")
  args = parser.parse_args(argv)
  if args.checkpoint:
    import os
    with open(os.path.join(args.checkpoint, "config.json")) as f:
      config = GLaMMConfig.from_dict(json.load(f))
  else:
    config = getattr(GLaMMConfig, args.config)()
  sizes = parse_mesh_spec(args.mesh, args.devices)
  check_divisible(config, sizes, args.batch)
  state = abstract_state(config)
  specs, report = plan_param_specs(state, sizes)
  itemsize = jax.numpy.dtype(config.llm.dtype).itemsize
  out = {"mesh": sizes,
         "param_gib_per_device": bytes_per_device(state, specs, sizes) / 2**30,
         "replicated": summarize_replicated(report)}
  if args.batch:
    out["kv_cache_gib_per_device"] = kv_cache_bytes_per_device(
        config.llm, args.batch, args.cache_length, sizes, itemsize) / 2**30
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
