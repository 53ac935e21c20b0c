"""CLIP ViT vision tower in Flax NNX (GLaMM's `openai/clip-vit-large-patch14-336`).

Token layout: index 0 is CLS, then the `grid x grid` patches in row-major order (B batch,
N = grid² patches, D hidden). Input images are channels-last: pixels [B, H, W, 3], already
CLIP-normalised (HF processors give [B, 3, H, W]: transpose with (0, 2, 3, 1)).

- `model(pixels, num_layers=None, cls_attention_layer=None) -> CLIPVisionOutput`: the HF
  `hidden_states` tuple (index 0 = `pre_layrnorm(embeddings)`, index i = output of encoder layer
  i-1), computed only up to `num_layers` layers, and optionally one layer's CLS→patch attention.
- `model.features(pixels, select_layer=-2) -> (patches [B,N,D], cls_attention [B,N])`: what
  GLaMM/LLaVA feed the projector (`hidden_states[select_layer]`, CLS dropped), and ALTP's default
  score: the attention probabilities of the CLS query over the patch keys in the layer that produced
  that hidden state, averaged over heads (softmax over all 1+N keys, no renormalisation).
- `model.pool(last_hidden)`: HF's `pooler_output` (post_layernorm of CLS); GLaMM does not use it.

Parameter paths mirror HF's `vision_model.*` names without the prefix (`embeddings.patch_embedding`,
`pre_layrnorm`, `encoder.layers[i].self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, `post_layernorm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import cudnn
from models.clip.config import CLIPVisionConfig
from models.sharding import with_names

_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


@struct.dataclass
class CLIPVisionOutput:
  """hidden_states: tuple of [B, 1+N, D] (embeddings after pre_layrnorm, then each layer run);
  cls_attention: [B, N] float32 or None."""
  hidden_states: tuple[jax.Array, ...]
  cls_attention: jax.Array | None = None

  @property
  def last_hidden_state(self) -> jax.Array:
    return self.hidden_states[-1]


def _dense(cfg, d_in, d_out, names, rngs):
  return nnx.Linear(d_in, d_out, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=with_names(_kernel_init, *names),
                    bias_init=with_names(_zeros, names[1]), rngs=rngs)


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, scale_init=with_names(_ones, "vis_embed"),
                       bias_init=with_names(_zeros, "vis_embed"), rngs=rngs)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x · sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nnx.Module):
  """Patch conv (no bias) + learned CLS + learned absolute positions (no interpolation)."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(1.0)(rngs.params(), (d,), cfg.param_dtype),
        sharding=("vis_embed",), eager_sharding=False)
    self.patch_embedding = nnx.Conv(
        cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=with_names(_kernel_init, "kernel_h", "kernel_w", "conv_in", "vis_embed"),
        rngs=rngs)
    self.position_embedding = nnx.Embed(
        cfg.num_positions, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=with_names(nnx.initializers.normal(0.02), "pos", "vis_embed"), rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, C] -> [B, 1+N, D]."""
    cfg = self.cfg
    b, h, w, c = pixels.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"CLIP vision tower expects pixels [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}] (channels last), got {pixels.shape}")
    patches = self.patch_embedding(pixels.astype(cfg.dtype))  # [B, g, g, D]
    patches = patches.reshape(b, cfg.num_patches, cfg.hidden_size)  # row-major, as HF flatten(2)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(cfg.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(cfg.dtype)[None]


class CLIPAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biases; can also return the CLS query's probs."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    d = cfg.hidden_size
    self.q_proj = _dense(cfg, d, d, ("vis_embed", None), rngs)
    self.k_proj = _dense(cfg, d, d, ("vis_embed", None), rngs)
    self.v_proj = _dense(cfg, d, d, ("vis_embed", None), rngs)
    self.out_proj = _dense(cfg, d, d, (None, "vis_embed"), rngs)
    self.attention_impl = cfg.attention_impl

  def __call__(self, x: jax.Array, return_cls_probs: bool = False):
    """x [B,S,D] -> (out [B,S,D], CLS-query probabilities [B,H,S] float32 or None)."""
    b, s, d = x.shape
    split = lambda y: y.reshape(b, s, self.num_heads, self.head_dim)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    # Scale 1/sqrt(Dh), softmax in fp32 (inside the flash kernel on an NVIDIA GPU).
    impl = cudnn.attention_backend(self.attention_impl, q.dtype, self.head_dim, s)
    out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    cls_probs = None
    if return_cls_probs:
      # Only the CLS row: [B,H,S], never the S x S matrix.
      logits = jnp.einsum("bhd,bshd->bhs", q[:, 0].astype(jnp.float32), k.astype(jnp.float32))
      cls_probs = jax.nn.softmax(logits * self.head_dim ** -0.5, axis=-1)
    return self.out_proj(out.reshape(b, s, d)), cls_probs


class CLIPMLP(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.hidden_act = cfg.hidden_act
    self.fc1 = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("vis_embed", "vis_mlp"), rngs)
    self.fc2 = _dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("vis_mlp", "vis_embed"), rngs)

  def __call__(self, x):
    h = self.fc1(x)
    h = quick_gelu(h) if self.hidden_act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
    return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(·))."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(cfg, rngs=rngs)
    self.layer_norm1 = _layer_norm(cfg, rngs)
    self.mlp = CLIPMLP(cfg, rngs=rngs)
    self.layer_norm2 = _layer_norm(cfg, rngs)

  def __call__(self, x, return_cls_probs: bool = False):
    a, cls_probs = self.self_attn(self.layer_norm1(x), return_cls_probs)
    x = x + a
    return x + self.mlp(self.layer_norm2(x)), cls_probs


class CLIPEncoder(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class CLIPVisionModel(nnx.Module):
  """CLIP vision transformer (HF `vision_model`): embeddings, pre_layrnorm, encoder,
  post_layernorm."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
    self.pre_layrnorm = _layer_norm(config, rngs)
    self.encoder = CLIPEncoder(config, rngs=rngs)
    self.post_layernorm = _layer_norm(config, rngs)

  def __call__(self, pixels: jax.Array, *, num_layers: int | None = None,
               cls_attention_layer: int | None = None) -> CLIPVisionOutput:
    """Runs the first `num_layers` encoder layers (static; default all) on pixels [B,H,W,C].

    `cls_attention_layer` (static, 0-based encoder layer < num_layers): also return that layer's
    CLS→patch attention, mean over heads, [B, N] float32.
    """
    n = self.config.num_layers if num_layers is None else num_layers
    if not 0 <= n <= self.config.num_layers:
      raise ValueError(f"num_layers={n} outside [0, {self.config.num_layers}]")
    if cls_attention_layer is not None and not 0 <= cls_attention_layer < n:
      raise ValueError(f"cls_attention_layer={cls_attention_layer} is not one of the {n} layers "
                       "run")
    x = self.pre_layrnorm(self.embeddings(pixels))
    hidden, cls_attention = [x], None
    for i in range(n):
      x, probs = self.encoder.layers[i](x, return_cls_probs=(i == cls_attention_layer))
      if probs is not None:
        cls_attention = probs.mean(axis=1)[:, 1:]
      hidden.append(x)
    return CLIPVisionOutput(hidden_states=tuple(hidden), cls_attention=cls_attention)

  def features(self, pixels: jax.Array, select_layer: int = -2):
    """GLaMM's visual features: (hidden_states[select_layer] without CLS [B,N,D], cls_attention of
    the layer that produced it [B,N] float32). Layers after the selected one are not run."""
    total = self.config.num_layers + 1
    index = select_layer % total if -total <= select_layer < total else None
    if not index:  # None (out of range) or 0 (embeddings: no attention layer behind it)
      raise ValueError(f"select_layer={select_layer} must pick an encoder layer's output, i.e. one "
                       f"of hidden_states[1..{total - 1}] (or -1..-{total - 1})")
    out = self(pixels, num_layers=index, cls_attention_layer=index - 1)
    return out.hidden_states[index][:, 1:], out.cls_attention

  def pool(self, last_hidden: jax.Array) -> jax.Array:
    """HF `pooler_output`: post_layernorm of the CLS token of [B,1+N,D] -> [B,D]."""
    return self.post_layernorm(last_hidden[:, 0])
