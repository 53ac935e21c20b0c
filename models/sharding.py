"""Logical axis names for parameters and activations, and the one table mapping them to the mesh.

Every parameter of every model carries logical axis names (e.g. `("embed", "mlp")`) as metadata;
nothing in the model code names a mesh axis. `LOGICAL_RULES` maps each logical name to mesh axes of
the `("data", "fsdp", "tensor")` mesh, so changing the parallelism is a change of this table (or of
the mesh shape), never of model code.

Variables are created with `eager_sharding=False`: the names are logical, and placement happens when
a state is restored or initialised with explicit `NamedSharding`s (see `param_shardings`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
from flax import nnx
import jax

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes (tried in order by flax's rule matcher). `None` means replicated.
LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("q_heads_x_dim", "tensor"),   # fused [heads * head_dim] output of q/k/v projections
    ("kv_heads_x_dim", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("vis_embed", None),           # vision-tower widths: small, replicated
    ("vis_mlp", "tensor"),
    ("pos", None),
    # Activations and caches.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
)


def with_names(init, *names: str | None):
  """Wraps an initializer so the created `nnx.Param` carries logical axis `names`."""
  return nnx.with_metadata(init, sharding=tuple(names), eager_sharding=False)


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """An `nnx.Param` holding `value` with logical axis `names` (one per dimension)."""
  if len(names) != value.ndim:
    raise ValueError(f"param of shape {value.shape} needs {value.ndim} axis names, got {names}")
  return nnx.Param(value, sharding=tuple(names), eager_sharding=False)


def logical_to_mesh(spec_tree, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, object]] = LOGICAL_RULES):
  """Maps a tree of logical PartitionSpecs to `NamedSharding`s on `mesh` using `rules`."""
  return nn.logical_to_mesh_sharding(spec_tree, mesh, list(rules))


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Sequence[tuple[str, object]] = LOGICAL_RULES):
  """`NamedSharding` for every leaf of an (abstract) NNX state, from its logical names."""
  return logical_to_mesh(nnx.get_partition_spec(state), mesh, rules)
