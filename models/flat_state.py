"""A module's state as a flat list of arrays, for calling jitted functions cheaply.

Why: a jitted call flattens its arguments on every call. An `nnx.State` is flattened node by node
through Python callbacks; for GLaMM-7B's 1,284 arrays that costs ~4 ms per call on the host,
while a plain list of the same arrays costs ~0.15 ms (measured on this repo's 2-core CPU machine,
`jax.jit(lambda s: 0)` called with each). At batch 1 a GCG call dispatches twice, and a benchmark
of one decode step would time the flattening as much as the step. Entry points therefore take
the leaves and rebuild the module inside the trace from a static, hashable `FlatModelDef`.

    fdef, leaves = split_flat(model)
    @functools.partial(jax.jit, static_argnames="fdef")
    def f(fdef, leaves, x):
      return fdef.merge(leaves)(x)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class FlatModelDef:
  """The static half of `split_flat`: the NNX graph definition and the state's tree structure.
  Hashable, so it can be a static argument of `jax.jit`."""
  graphdef: Any
  treedef: Any

  def state(self, leaves):
    """The `nnx.State` whose leaves are `leaves` (a list in `split_flat`'s order)."""
    if len(leaves) != self.treedef.num_leaves:
      raise ValueError(f"expected {self.treedef.num_leaves} state arrays, got {len(leaves)}")
    return jax.tree.unflatten(self.treedef, leaves)

  def merge(self, leaves):
    """The module rebuilt from `leaves` (works inside and outside a trace)."""
    return nnx.merge(self.graphdef, self.state(leaves))


def split_flat(module) -> tuple[FlatModelDef, list]:
  """module -> (FlatModelDef, list of its state arrays)."""
  graphdef, state = nnx.split(module)
  return flatten_state(graphdef, state)


def flatten_state(graphdef, state) -> tuple[FlatModelDef, list]:
  """(graphdef, nnx.State) -> (FlatModelDef, list of the state's arrays)."""
  leaves, treedef = jax.tree.flatten(state)
  return FlatModelDef(graphdef, treedef), leaves
