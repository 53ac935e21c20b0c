"""Logical axis names for parameters and activations, and the one table mapping them to the mesh.

Every parameter of every model carries logical axis names (e.g. `("embed", "mlp")`) as metadata;
nothing in the model code names a mesh axis. `LOGICAL_RULES` maps each logical name to mesh axes of
the `("data", "fsdp", "tensor")` mesh, so changing the parallelism is a change of this table (or of
the mesh shape), never of model code.

Variables are created with `eager_sharding=False`: the names are logical, and placement happens when
a state is restored or initialised with explicit `NamedSharding`s.

Two resolutions of the names:
- `param_shardings(state, mesh)`: the table applied as written (what the names ask for).
- `plan_param_shardings(state, mesh)`: the table applied where the mesh divides the dimension; a
  dimension that does not divide is replicated instead and listed in the returned report. This is
  what restoring and the sharded runs use. In GLaMM-7B it concerns only the vocabulary (32007 =
  3 x 10669 rows divide no tensor axis > 1; embed_tokens and lm_head then keep their `fsdp` split of
  the embedding dimension and cost 2 x 32007 x 4096 / fsdp values per device), and the tiny SAM's
  2 heads on a tensor axis of 4. Shapes that *must* divide (LLM heads, KV heads, batch) are checked
  up front with a clear error by `models.mesh.check_divisible`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes: None (replicated), one axis name, or a tuple of axis names (the
# dimension is split over their product, major to minor).
LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    # -- Parameters: LLM (Vicuna-7B), projectors. Megatron-style tensor parallelism (column-split
    # q/k/v/gate/up over `tensor`, row-split o/down) with the model width split over `fsdp`.
    ("vocab", "tensor"),           # replicated instead when the vocab does not divide (32007)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads_x_dim", "tensor"),   # fused [heads * head_dim] output of q/k/v projections
    ("kv_heads_x_dim", "tensor"),
    ("heads", "tensor"),           # SAM attention heads (image encoder 16, mask decoder 8)
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # -- Parameters: vision towers (CLIP-L 0.3 B, SAM ViT-H 0.6 B). Their widths are replicated:
    # they are small next to the LLM, and their activations are batch-parallel anyway; only the
    # MLP hidden width and SAM's heads are split over `tensor`.
    ("vis_embed", None),
    ("vis_mlp", "tensor"),
    ("pos", None),
    ("conv_in", None),
    ("conv_out", None),
    ("kernel_h", None),
    ("kernel_w", None),
    # -- Activations (models.mesh.constrain). FSDP is data parallelism with sharded weights, so
    # the batch is split over both `data` and `fsdp`.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_vocab", "tensor"),
    ("act_spatial", None),         # SAM image-embedding grid h, w
    ("act_masks", None),           # [SEG] masks per image
    # -- KV cache (models.llama.cache.KVCache): k/v [B, S, Hkv, Dh], valid [B, S].
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def with_names(init, *names: str | None):
  """Wraps an initializer so the created `nnx.Param` carries logical axis `names`."""
  return nnx.with_metadata(init, sharding=tuple(names), eager_sharding=False)


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """An `nnx.Param` holding `value` with logical axis `names` (one per dimension)."""
  if len(names) != value.ndim:
    raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {names}")
  return nnx.Param(value, sharding=tuple(names), eager_sharding=False)


# -- resolving names --------------------------------------------------------------------------------

def _axes_tuple(axes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axes_of(name: str | None, rules: Sequence[tuple[str, object]] = LOGICAL_RULES
                 ) -> tuple[str, ...]:
  """Mesh axes of one logical name (() for replicated). Unknown names are an error: the table must
  cover every name a model uses."""
  if name is None:
    return ()
  for logical, axes in rules:
    if logical == name:
      return _axes_tuple(axes)
  raise KeyError(f"logical axis name {name!r} has no rule in the sharding table "
                 f"(models/sharding.py LOGICAL_RULES)")


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_spec(names: Sequence[str | None], mesh_shape: Mapping[str, int] | None = None,
                 shape: Sequence[int] | None = None,
                 rules: Sequence[tuple[str, object]] = LOGICAL_RULES
                 ) -> tuple[PartitionSpec, list[tuple[int, str, tuple[str, ...]]]]:
  """PartitionSpec for one array with logical axis `names`.

  With `shape` and `mesh_shape`, a dimension whose size does not divide over its mesh axes is
  replicated; those are returned as (dim, name, axes). Mesh axes not in `mesh_shape` are dropped
  (e.g. a mesh without `fsdp`).
  Raises:
    ValueError: one mesh axis would split two dimensions of the same array.
  """
  entries, dropped, used = [], [], {}
  for dim, name in enumerate(names):
    axes = mesh_axes_of(name, rules)
    if mesh_shape is not None:
      axes = tuple(a for a in axes if a in mesh_shape)
    if axes and shape is not None and mesh_shape is not None:
      n = math.prod(mesh_shape[a] for a in axes)
      if shape[dim] % n:
        dropped.append((dim, name, axes))
        axes = ()
    for a in axes:
      if a in used:
        raise ValueError(f"logical names {tuple(names)}: mesh axis {a!r} would split both dim "
                         f"{used[a]} and dim {dim}")
      used[a] = dim
    entries.append(_spec_entry(axes))
  return PartitionSpec(*entries), dropped


def _names_of(var) -> tuple:
  # flax 0.12 stores `sharding=` metadata under "out_sharding".
  md = var.get_metadata() if isinstance(var, nnx.Variable) else {}
  names = md.get("out_sharding", md.get("sharding"))
  if names is None:
    raise ValueError(f"variable of shape {getattr(var, 'shape', '?')} has no logical axis names")
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class Replicated:
  """One parameter dimension the rules would shard but the mesh does not divide."""
  path: tuple
  shape: tuple[int, ...]
  dim: int
  name: str
  axes: tuple[str, ...]
  devices: int

  def __str__(self):
    return (f"{'.'.join(map(str, self.path))} {self.shape}: dim {self.dim} ({self.name}, "
            f"{self.shape[self.dim]}) over {'x'.join(self.axes)} ({self.devices} devices)")


def _state_specs(state: nnx.State, mesh_shape, fit: bool, rules):
  """(State of PartitionSpec mirroring `state`, [Replicated])."""
  report: list[Replicated] = []

  def one(path, var):
    names = _names_of(var)
    if len(names) != len(var.shape):
      raise ValueError(f"{'.'.join(map(str, path))}: {len(names)} axis names {names} for shape "
                       f"{var.shape}")
    spec, dropped = logical_spec(names, mesh_shape, var.shape if fit else None, rules)
    for dim, name, axes in dropped:
      report.append(Replicated(tuple(path), tuple(var.shape), dim, name, axes,
                               math.prod(mesh_shape[a] for a in axes)))
    return var.replace(spec)

  flat = [(p, one(p, v)) for p, v in state.flat_state()]
  return nnx.State.from_flat_path(flat), report


def _to_named(spec_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  return nnx.State.from_flat_path(
      [(p, v.replace(NamedSharding(mesh, v.get_value()))) for p, v in spec_state.flat_state()])


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, object]] = LOGICAL_RULES) -> nnx.State:
  """`NamedSharding` for every leaf of an (abstract) NNX state, the table applied as written (no
  divisibility check; see `plan_param_shardings`)."""
  specs, _ = _state_specs(state, dict(mesh.shape), False, rules)
  return _to_named(specs, mesh)


def plan_param_shardings(state: nnx.State, mesh: jax.sharding.Mesh,
                         rules: Sequence[tuple[str, object]] = LOGICAL_RULES
                         ) -> tuple[nnx.State, list[Replicated]]:
  """(State of `NamedSharding`, [Replicated]): the table where the mesh divides each dimension,
  replication where it does not (each such dimension reported)."""
  specs, report = _state_specs(state, dict(mesh.shape), True, rules)
  return _to_named(specs, mesh), report


def plan_param_specs(state: nnx.State, mesh_shape: Mapping[str, int],
                     rules: Sequence[tuple[str, object]] = LOGICAL_RULES
                     ) -> tuple[dict[tuple, PartitionSpec], list[Replicated]]:
  """Path -> PartitionSpec as `plan_param_shardings` would place it, from the mesh *shape* only
  (no devices needed: golden dumps and full-size planning)."""
  specs, report = _state_specs(state, dict(mesh_shape), True, rules)
  return {p: v.get_value() for p, v in specs.flat_state()}, report


def summarize_replicated(report: Iterable[Replicated]) -> list[str]:
  """The report with stacked layers folded (`llm.layers.*...`), one line per distinct case."""
  lines: dict[str, int] = {}
  for r in report:
    path = tuple("*" if isinstance(p, int) else p for p in r.path)
    key = str(dataclasses.replace(r, path=path))
    lines[key] = lines.get(key, 0) + 1
  return [f"{k}" + (f"  [x{n}]" if n > 1 else "") for k, n in sorted(lines.items())]


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: Mapping[str, int]
                ) -> tuple[int, ...]:
  """The per-device block shape of an array of `shape` placed with `spec`."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  return tuple(d // math.prod(mesh_shape[a] for a in _axes_tuple(e))
               for d, e in zip(shape, entries))


def bytes_per_device(state: nnx.State, specs: Mapping[tuple, PartitionSpec],
                     mesh_shape: Mapping[str, int]) -> int:
  """Parameter bytes each device holds under `specs` (every device holds the same amount)."""
  total = 0
  for path, var in state.flat_state():
    block = shard_shape(var.shape, specs[path], mesh_shape)
    total += math.prod(block) * jax.numpy.dtype(var.dtype).itemsize
  return total
