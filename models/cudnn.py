"""Where cuDNN's flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) can run.

Shared by the SAM encoder (windowed/global blocks), the CLIP tower and the LLaMA decoder
(multi-token calls), which choose it by default where it runs and fall back to XLA elsewhere (CPU,
TPU, fp32, ROCm). XLA's path writes fp32 logits [B, H, T, S] to memory and reads them back for the
softmax; the flash kernel keeps them on chip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flash_head_dim_limit(dtype) -> int:
  """Largest head dim cuDNN flash attention takes here for `dtype`; 0 where it cannot run (not an
  NVIDIA GPU backend, or not bf16/fp16). Hopper and later take 256, older GPUs 128 (the limits
  `jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention` enforces)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return 0
  if jax.default_backend() != "gpu":
    return 0
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:     # e.g. a ROCm "gfx90a": no cuDNN there
    return 0
  return 256 if major >= 9 else 128


def flash_runs(dtype, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes heads of `head_dim` in `dtype` on this backend (the head
  dim must also be a multiple of 8)."""
  return head_dim % 8 == 0 and head_dim <= flash_head_dim_limit(dtype)


# The `attention_impl` choices of the CLIP and LLaMA configs (SAM has its own, with folded paths).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def check_impl(owner: str, impl: str) -> None:
  """A ValueError naming `owner` (a config class) when `impl` is not one of ATTENTION_IMPLS."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"{owner}: attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")


def attention_backend(impl: str, dtype, head_dim: int, num_queries: int) -> str:
  """`jax.nn.dot_product_attention`'s implementation for `impl` (one of ATTENTION_IMPLS): "auto"
  is cuDNN flash for calls with more than one query where it runs, else XLA. A one-query call (a
  decode step) has tiny logits and is bound by reading the keys, which XLA does once."""
  if impl != "auto":
    return impl
  return "cudnn" if num_queries > 1 and flash_runs(dtype, head_dim) else "xla"


def flash_attention_narrow_values(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """cuDNN flash attention of q, k [B, T, N, Dqk] and v [B, S, N, Dv] with Dv != Dqk, or None
  where this JAX and cuDNN cannot run it (checked while tracing).

  `jax.nn.dot_product_attention` asks for one head dim; cuDNN 9.10+ on Hopper takes a value head
  dim of its own. Folded relative positions (`models.sam.image_encoder.fold_rel_pos`) widen only
  q and k, so the values keep their 80 channels instead of being zero-padded to 112 / 208: less
  P.V work, and no padded copy of v and no crop of the output. Calls JAX's cuDNN module directly
  (not public API), so any failure to build the call falls back to the caller's padded path.
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    return fa.dot_product_attention(q, k, v, scale=scale)
  except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError):
    return None
