"""SAM prompt encoder (`segment_anything.modeling.PromptEncoder`), channels-last, plus GLaMM's
text-embedding prompt.

GLaMM (LISA lineage) adds `text_embeds`: the [SEG] hidden states after `text_hidden_fcs`,
[N, 1, C], appended to the sparse prompts; with no mask input the dense prompt is `no_mask_embed`
broadcast over the image-embedding grid.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from models import sharding
from models.activations import gelu_exact
from models.sam import layers
from models.sam.config import SamPromptEncoderConfig


class PositionEmbeddingRandom(nnx.Module):
  """Random-Fourier positional encoding: [x, y] in [0, 1]^2 -> [sin(2 pi c G), cos(2 pi c G)],
  with c = 2 [x, y] - 1 and G = `positional_encoding_gaussian_matrix` [2, C/2] (a checkpoint
  buffer, so it is a `Buffer`, not a trainable `Param`)."""

  def __init__(self, num_pos_feats: int, *, scale: float = 1.0, rngs: nnx.Rngs):
    gauss = scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
    self.positional_encoding_gaussian_matrix = layers.Buffer(
        gauss, sharding=(None, None), eager_sharding=False)

  def _encode(self, coords: jax.Array) -> jax.Array:
    """coords [..., 2] (x, y) normalised to [0, 1] -> [..., C] (C/2 sines, then C/2 cosines)."""
    coords = 2 * coords - 1
    coords = coords @ self.positional_encoding_gaussian_matrix[...].astype(coords.dtype)
    coords = (2 * math.pi) * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def dense(self, size: tuple[int, int]) -> jax.Array:
    """Encoding of the pixel centres of an (H, W) grid -> [H, W, C]."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)   # [H, W, (x, y)]
    return self._encode(grid)

  def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """coords [B, N, 2] (x, y) in pixels of an image of `image_size` (H, W) -> [B, N, C]."""
    coords = coords.astype(jnp.float32)
    x = coords[..., 0] / image_size[1]
    y = coords[..., 1] / image_size[0]
    return self._encode(jnp.stack([x, y], axis=-1))


class PromptEncoder(nnx.Module):
  """Encodes points, boxes, masks and GLaMM text embeddings for the mask decoder."""

  def __init__(self, config: SamPromptEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    dim = c.embed_dim
    self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
    emb_init = nnx.initializers.normal(1.0)   # nn.Embedding's N(0, 1)

    self.point_embeddings = nnx.List([_embedding(1, dim, emb_init, rngs)
                                      for _ in range(c.num_point_embeddings)])
    self.not_a_point_embed = _embedding(1, dim, emb_init, rngs)
    self.no_mask_embed = _embedding(1, dim, emb_init, rngs)
    quarter = c.mask_in_chans // 4
    # mask_downscaling: conv2x2/2, LayerNorm2d, GELU, conv2x2/2, LayerNorm2d, GELU, conv1x1.
    self.mask_conv1 = layers.Conv(1, quarter, 2, stride=2, rngs=rngs)
    self.mask_norm1 = layers.LayerNorm(quarter, eps=1e-6, rngs=rngs)
    self.mask_conv2 = layers.Conv(quarter, c.mask_in_chans, 2, stride=2, rngs=rngs)
    self.mask_norm2 = layers.LayerNorm(c.mask_in_chans, eps=1e-6, rngs=rngs)
    self.mask_conv3 = layers.Conv(c.mask_in_chans, dim, 1, rngs=rngs)

  def dense_pe(self) -> jax.Array:
    """`get_dense_pe()`: positional encoding of the image-embedding grid, [1, H, W, C]."""
    return self.pe_layer.dense(self.config.image_embedding_size)[None]

  def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
    """points [B, N, 2] (x, y) in input-image pixels, labels [B, N] (1 foreground, 0 background,
    -1 padding) -> [B, N (+1 if pad), C]."""
    points = points.astype(jnp.float32) + 0.5   # shift to the pixel centre
    if pad:
      b = points.shape[0]
      points = jnp.concatenate([points, jnp.zeros((b, 1, 2), points.dtype)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
    pe = self.pe_layer.with_coords(points, self.config.input_image_size)
    lab = labels[..., None]
    return jnp.where(
        lab == -1, self.not_a_point_embed[...][0],
        jnp.where(lab == 0, pe + self.point_embeddings[0][...][0],
                  jnp.where(lab == 1, pe + self.point_embeddings[1][...][0], pe)))

  def embed_boxes(self, boxes: jax.Array) -> jax.Array:
    """boxes [B, 4] (x0, y0, x1, y1) in input-image pixels -> corner embeddings [B, 2, C]."""
    coords = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
    pe = self.pe_layer.with_coords(coords, self.config.input_image_size)
    corners = jnp.concatenate([self.point_embeddings[2][...], self.point_embeddings[3][...]], 0)
    return pe + corners

  def embed_masks(self, masks: jax.Array) -> jax.Array:
    """masks [B, 4H, 4W, 1] (low-res mask logits) -> dense embeddings [B, H, W, C]."""
    x = gelu_exact(self.mask_norm1(self.mask_conv1(masks)))
    x = gelu_exact(self.mask_norm2(self.mask_conv2(x)))
    return self.mask_conv3(x)

  def __call__(self, points: tuple[jax.Array, jax.Array] | None = None,
               boxes: jax.Array | None = None, masks: jax.Array | None = None,
               text_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sparse [B, T, C] and dense [B, H, W, C] prompt embeddings.

    Sparse order: points (padded with a not-a-point when there are no boxes), box corners, text
    embeddings [B, T_text, C] (GLaMM). Batch size: the first of points, boxes, masks, text that is
    given, else 1.
    """
    c = self.config
    dim = c.embed_dim
    if points is not None:
      bs = points[0].shape[0]
    elif boxes is not None:
      bs = boxes.shape[0]
    elif masks is not None:
      bs = masks.shape[0]
    elif text_embeds is not None:
      bs = text_embeds.shape[0]
    else:
      bs = 1
    parts = []
    if points is not None:
      parts.append(self.embed_points(points[0], points[1], pad=boxes is None))
    if boxes is not None:
      parts.append(self.embed_boxes(boxes))
    if text_embeds is not None:
      if text_embeds.ndim != 3 or text_embeds.shape[-1] != dim:
        raise ValueError(f"PromptEncoder: text_embeds must be [B, T, {dim}], got "
                         f"{text_embeds.shape}")
      parts.append(text_embeds.astype(jnp.float32))
    sparse = (jnp.concatenate(parts, axis=1) if parts
              else jnp.zeros((bs, 0, dim), jnp.float32))
    if masks is not None:
      dense = self.embed_masks(masks)
    else:
      h, w = c.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed[...].reshape(1, 1, 1, dim), (bs, h, w, dim))
    return sparse, dense


def _embedding(num: int, dim: int, init, rngs: nnx.Rngs) -> nnx.Param:
  """An `nn.Embedding(num, dim)` table as a plain [num, dim] parameter."""
  return nnx.Param(sharding.with_names(init, None, "vis_embed")(rngs.params(), (num, dim)))
