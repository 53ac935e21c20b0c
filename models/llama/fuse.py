"""Fused projections for decoding: one matmul for q/k/v and one for gate/up per layer.

Why: at batch 1 a decode step is a chain of matrix-vector products that stream the weights once.
Seven per layer (q, k, v, o, gate, up, down) each pay a launch and a tail; concatenating q/k/v
([D, Hq*Dh + 2*Hkv*Dh]) and gate/up ([D, 2M]) leaves four. Measured on an H100 with Vicuna-7B
shapes, 32 steps in one `fori_loop`: 5.28 -> 5.07 ms per step (docs/PERFORMANCE.md).

`fuse_projections(llm)` rewrites a `LlamaForCausalLM` in place, layer by layer (the old matrices
are dropped as each fused one is made, so peak memory grows by one layer's projections). The
fused kernels are named ("embed", None): sharded like the others over `fsdp`, replicated over
`tensor`, so fuse only where the mesh has no tensor axis (`should_fuse`). Checkpoints, conversion
and parity tests use the unfused layout; fusion is an inference-time step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.sharding import param


class FusedLinear(nnx.Module):
  """y = x @ kernel in `dtype` (as `nnx.Linear` without bias computes it); kernel [D_in, D_out]."""

  def __init__(self, kernel: jax.Array, dtype):
    self.kernel = param(kernel, "embed", None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel[...]
    dtype = self.dtype or jnp.result_type(x, k)
    return jax.lax.dot_general(x.astype(dtype), k.astype(dtype),
                               (((x.ndim - 1,), (0,)), ((), ())))


def _concat(linears) -> jax.Array:
  for lin in linears:
    if getattr(lin, "bias", None) is not None:
      raise ValueError("fuse_projections: projections with a bias are not supported")
  return jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)


def fuse_projections(llm) -> None:
  """In place: every layer's q/k/v and gate/up projections become one `FusedLinear` each.
  Idempotent. See the module docstring for when to use it."""
  for layer in llm.layers:
    att, mlp = layer.self_attn, layer.mlp
    if att.qkv_proj is None:
      # nnx.data: the attribute was created static (None) in __init__.
      att.qkv_proj = nnx.data(FusedLinear(_concat([att.q_proj, att.k_proj, att.v_proj]),
                                          att.q_proj.dtype))
      att.q_proj = att.k_proj = att.v_proj = None
    if mlp.gate_up_proj is None:
      mlp.gate_up_proj = nnx.data(FusedLinear(_concat([mlp.gate_proj, mlp.up_proj]),
                                              mlp.gate_proj.dtype))
      mlp.gate_proj = mlp.up_proj = None


def fuse_split(graphdef, state):
  """`fuse_projections` on the `.llm` of the model (graphdef, state) describe; returns the fused
  model's (graphdef, state). For callers that hold a split model (benchmarks)."""
  model = nnx.merge(graphdef, state)
  fuse_projections(model.llm)
  return nnx.split(model)


def should_fuse(mesh) -> bool:
  """True unless `mesh` splits the model over `tensor` (fused kernels are not head-aligned)."""
  return mesh is None or dict(mesh.shape).get("tensor", 1) == 1
