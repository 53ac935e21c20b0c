"""OMG-LLaVA's projectors around the LLM (omg_llava.md §1.5, §2.3).

- `OMGProjector` (release `projector.model.*`, XTuner `Naive_Proj` with depth 2, exact GELU, bias):
  - pixel-centric tokens [.., Dp=6656] (space-to-depth CLIP 6144 + perception prior 512):
    `model_feat` = Linear(Dp→D) → GELU → Linear(D→D);
  - object-centric tokens: query features [.., Dq=512] (content 256 + pos 256):
    `query_proj` Linear(Dq→Dh=6144), then `model` = Linear(Dh→D) → GELU → Linear(D→D);
  - `seperate_embed` [1, D] (the release's spelling) between the two groups.
  Per image the LLM sees `[HW pixel tokens ; separator ; valid object tokens in ascending query
  index]`; a query is valid when its attention mask is not all True (`valid_queries`).
- `TextToVision` (release `projector_text2vision.model.*`): the post-norm hidden of a [SEG] token
  [.., D] -> decoder query [.., 512] (content 256 ; pos 256): Linear(D→512) → GELU → Linear(512→512).

The original keeps both in fp32, hence the fp32 defaults here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.activations import gelu_exact
from models.param_tables import Table, identity, linear_weight
from models.sharding import param, with_names

_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class OMGProjectorConfig:
  """Widths: pixel token features (Dp), query features (Dq), query_proj output (Dh), LLM hidden
  (D), [SEG] -> decoder query (Ds)."""
  pixel_dim: int
  query_dim: int
  query_hidden: int
  llm_hidden_size: int
  text2vision_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def omg_llava_7b(cls, **overrides) -> "OMGProjectorConfig":
    """ProjectorConfig_OMG_LLaVA(query_channels=256, feat_channels=1536, pixel_shuffle_ratio=2,
    llm_hidden_size=4096): Dp = 1536*4 + 2*256 = 6656, Dq = 2*256, Dh = 1536*4 = 6144."""
    return cls(**{**dict(pixel_dim=6656, query_dim=512, query_hidden=6144, llm_hidden_size=4096,
                         text2vision_dim=512), **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "OMGProjectorConfig":
    """Matches `LlamaConfig.internlm2_tiny()` (hidden 64)."""
    return cls(**{**dict(pixel_dim=40, query_dim=16, query_hidden=24, llm_hidden_size=64,
                         text2vision_dim=16), **overrides})


def _dense(cfg, d_in, d_out, names, rngs):
  return nnx.Linear(d_in, d_out, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=with_names(_kernel_init, *names),
                    bias_init=with_names(_zeros, names[1]), rngs=rngs)


def valid_queries(attention_mask: jax.Array) -> jax.Array:
  """Naive_Proj's validity rule: attention_mask [B,Q,HW] (True/1 = masked) -> [B,Q] bool, True
  where the query's mask is not all set (`mask.sum(-1) < HW`)."""
  hw = attention_mask.shape[-1]
  return jnp.sum(attention_mask.astype(jnp.int32), axis=-1) < hw


class OMGProjector(nnx.Module):
  """Visual-encoder outputs -> LLM visual embeddings (see the module docstring)."""

  def __init__(self, cfg: OMGProjectorConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d = cfg.llm_hidden_size
    self.query_proj = _dense(cfg, cfg.query_dim, cfg.query_hidden, ("vis_embed", "vis_mlp"), rngs)
    self.query_fc1 = _dense(cfg, cfg.query_hidden, d, ("vis_embed", "mlp"), rngs)
    self.query_fc2 = _dense(cfg, d, d, ("mlp", "embed"), rngs)
    self.pixel_fc1 = _dense(cfg, cfg.pixel_dim, d, ("vis_embed", "mlp"), rngs)
    self.pixel_fc2 = _dense(cfg, d, d, ("mlp", "embed"), rngs)
    # nn.Embedding(1, D) in the original (N(0, 1) init); only its single row is ever used.
    self.seperate_embed = param(
        jax.random.normal(rngs.params(), (1, d), cfg.param_dtype), None, "embed")

  def pixel_tokens(self, pixel_feats: jax.Array) -> jax.Array:
    """`model_feat`: [..., Dp] -> [..., D]."""
    return self.pixel_fc2(gelu_exact(self.pixel_fc1(pixel_feats)))

  def object_tokens(self, query_feats: jax.Array) -> jax.Array:
    """`query_proj` then `model`: [..., Dq] -> [..., D] (every query, valid or not)."""
    return self.query_fc2(gelu_exact(self.query_fc1(self.query_proj(query_feats))))

  def separator(self) -> jax.Array:
    """The separator embedding [D] in the compute dtype."""
    return self.seperate_embed[0].astype(self.config.dtype)

  def __call__(self, pixel_feats: jax.Array, query_feats: jax.Array, query_valid: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Fixed-shape visual tokens per image.

    Args:
      pixel_feats: [B, HW, Dp] pixel-centric features.
      query_feats: [B, Q, Dq] query features.
      query_valid: [B, Q] bool (`valid_queries(attention_mask)`).

    Returns:
      tokens [B, HW+1+Q, D] and valid [B, HW+1+Q] bool. Row b's first HW+1+N_b tokens are the
      original's list entry `cat([pixel tokens, separator, valid object tokens])` (N_b = valid
      queries, ascending query index); the Q-N_b tail is zeros with valid False.
    """
    cfg = self.config
    b, hw, dp = pixel_feats.shape
    bq, q, dq = query_feats.shape
    if (dp, dq) != (cfg.pixel_dim, cfg.query_dim) or bq != b:
      raise ValueError(f"OMGProjector: pixel_feats {pixel_feats.shape} / query_feats "
                       f"{query_feats.shape} do not fit config (Dp {cfg.pixel_dim}, Dq "
                       f"{cfg.query_dim}) with a shared batch")
    if query_valid.shape != (b, q):
      raise ValueError(f"OMGProjector: query_valid shape {query_valid.shape} != (B, Q) = {(b, q)}")
    query_valid = query_valid.astype(jnp.bool_)
    pix = self.pixel_tokens(pixel_feats)
    obj = self.object_tokens(query_feats)
    # Stable sort on "invalid": valid queries first, each group in ascending query index.
    order = jnp.argsort(jnp.logical_not(query_valid).astype(jnp.int32), axis=1, stable=True)
    obj = jnp.take_along_axis(obj, order[..., None], axis=1)
    obj_valid = jnp.take_along_axis(query_valid, order, axis=1)
    obj = jnp.where(obj_valid[..., None], obj, jnp.zeros((), obj.dtype))
    sep = jnp.broadcast_to(self.separator().astype(pix.dtype), (b, 1, pix.shape[-1]))
    tokens = jnp.concatenate([pix, sep, obj.astype(pix.dtype)], axis=1)
    valid = jnp.concatenate([jnp.ones((b, hw + 1), jnp.bool_), obj_valid], axis=1)
    return tokens, valid


class TextToVision(nnx.Module):
  """[SEG] hidden [..., D] -> decoder query [..., Ds]: fc1 → GELU(erf) → fc2."""

  def __init__(self, cfg: OMGProjectorConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.fc1 = _dense(cfg, cfg.llm_hidden_size, cfg.text2vision_dim, ("embed", "vis_mlp"), rngs)
    self.fc2 = _dense(cfg, cfg.text2vision_dim, cfg.text2vision_dim, ("vis_mlp", "vis_embed"),
                      rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.fc2(gelu_exact(self.fc1(hidden)))


def _linear_rows(src: str, dst: str) -> tuple:
  return ((src + r"\.weight", dst + ".kernel", linear_weight),
          (src + r"\.bias", dst + ".bias", identity))


# Release names (`projector.model` is Naive_Proj; nn.Sequential weights at indices 0 and 2).
OMG_PROJECTOR_TABLE: Table = (
    *_linear_rows(r"projector\.model\.query_proj", "query_proj"),
    *_linear_rows(r"projector\.model\.model\.0", "query_fc1"),
    *_linear_rows(r"projector\.model\.model\.2", "query_fc2"),
    *_linear_rows(r"projector\.model\.model_feat\.0", "pixel_fc1"),
    *_linear_rows(r"projector\.model\.model_feat\.2", "pixel_fc2"),
    (r"projector\.model\.seperate_embed\.weight", "seperate_embed", identity),
)

TEXT_TO_VISION_TABLE: Table = (
    *_linear_rows(r"projector_text2vision\.model\.0", "fc1"),
    *_linear_rows(r"projector_text2vision\.model\.2", "fc2"),
)
