"""GLaMM's two small MLPs around the LLM (glamm.md §1.2, §1.7).

- `MMProjector`: CLIP patch features [B,N,Dv] -> LLM embeddings [B,N,D]:
  Linear(Dv→D) → GELU (exact, erf) → Linear(D→D), both with bias (HF `mm_projector.0` / `.2`).
- `TextHiddenFcs`: the LLM's post-norm hidden state before a [SEG] token [..., D] -> SAM prompt
  embedding [..., Ds]: Linear(D→D) → ReLU → Linear(D→Ds) → Dropout(0.0), i.e. no dropout at all
  (HF `text_hidden_fcs.0.0` / `.0.2`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.activations import gelu_exact
from models.sharding import with_names

_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Widths of GLaMM's projectors: vision features (Dv), LLM hidden (D), SAM prompt (Ds)."""
  vision_hidden_size: int
  llm_hidden_size: int
  seg_embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def glamm_7b(cls, **overrides) -> "ProjectorConfig":
    """CLIP ViT-L (1024) -> Vicuna-7B (4096) -> SAM prompt (out_dim 256 in GLaMM's config.json)."""
    return cls(**{**dict(vision_hidden_size=1024, llm_hidden_size=4096, seg_embed_dim=256),
                  **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "ProjectorConfig":
    """Matches `CLIPVisionConfig.tiny()` (64) and `LlamaConfig.tiny()` (64)."""
    return cls(**{**dict(vision_hidden_size=64, llm_hidden_size=64, seg_embed_dim=16), **overrides})


def _dense(cfg, d_in, d_out, names, rngs):
  return nnx.Linear(d_in, d_out, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=with_names(_kernel_init, *names),
                    bias_init=with_names(_zeros, names[1]), rngs=rngs)


class MMProjector(nnx.Module):
  """[..., Dv] -> [..., D]: linear_1 → GELU(erf) → linear_2."""

  def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs):
    self.linear_1 = _dense(cfg, cfg.vision_hidden_size, cfg.llm_hidden_size, ("vis_embed", "mlp"),
                           rngs)
    self.linear_2 = _dense(cfg, cfg.llm_hidden_size, cfg.llm_hidden_size, ("mlp", "embed"), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(gelu_exact(self.linear_1(x)))


class TextHiddenFcs(nnx.Module):
  """[..., D] -> [..., Ds]: fc1 → ReLU → fc2 (the trailing Dropout(0.0) is the identity)."""

  def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs):
    self.fc1 = _dense(cfg, cfg.llm_hidden_size, cfg.llm_hidden_size, ("embed", "mlp"), rngs)
    self.fc2 = _dense(cfg, cfg.llm_hidden_size, cfg.seg_embed_dim, ("mlp", None), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(x)))
