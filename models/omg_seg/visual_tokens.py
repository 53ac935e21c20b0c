"""OMG-LLaVA's visual tokens from the OMG-Seg outputs (spec /work/shared/specs/omg_llava.md 1.4).

`pixel_shuffle` turns the stage-4 CLIP map into 2x2 space-to-depth tokens; `perception_prior`
is `OMGSegVisualEncoder.panoptic_postprocess` without the 1024^2 tensor; `visual_tokens` joins
them into what the projector reads.

The reference up-samples the mask logits [Q, M, M] to the image size S (bilinear), applies
P = (0.5 s_q + 0.5) sigmoid(.) there, and down-samples P to the token grid G (bilinear, no
antialias). Both resizes are separable two-tap reads (torch `align_corners=False`):
  out index i of a resize n_in -> n_out reads src = max(0, (i + 0.5) n_in / n_out - 0.5) at
  floor(src) (weight 1 - frac) and min(floor(src) + 1, n_in - 1) (weight frac).
So each grid cell is a weighted sum of P at 2 x 2 image pixels, and P at an image pixel is the
sigmoid of a 2 x 2 bilinear read of the M x M logits: 4 sigmoids per cell and query, independent
of S. For OMG (S = 1024, M = 256, G = 16) the down-sample reads image rows
64 i + 31 and 64 i + 32 with weight 1/2 each, i.e. logit rows 16 i + 7.375 and 16 i + 7.625.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def pixel_shuffle(feat: jax.Array, ratio: int = 2) -> jax.Array:
  """Space-to-depth of a channels-last map (`OMGSegVisualEncoder.pixel_shuffle_feat` + flatten).

  Args:
    feat: [B, H, W, C] (OMG: [B, 32, 32, 1536]); H and W divisible by `ratio`.
  Returns:
    [B, (H/r)(W/r), r*r*C] (OMG: [B, 256, 6144]). Token t = i * (W/r) + j (row-major) holds input
    pixel (r i + rh, r j + rw) at channels (rh * r + rw) * C + c.
  """
  if feat.ndim != 4:
    raise ValueError(f"pixel_shuffle: feat must be [B, H, W, C], got {feat.shape}")
  b, h, w, c = feat.shape
  if h % ratio or w % ratio:
    raise ValueError(f"pixel_shuffle: map {h}x{w} is not divisible by ratio {ratio}")
  x = feat.reshape(b, h // ratio, ratio, w // ratio, ratio, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, rh, rw, C]
  return x.reshape(b, (h // ratio) * (w // ratio), ratio * ratio * c)


@functools.lru_cache(maxsize=32)
def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """Two-tap bilinear read of torch `interpolate(align_corners=False)` for n_in -> n_out.

  Returns (index [n_out, 2] int32, weight [n_out, 2] float32), computed in float32 as torch does.
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  idx = np.stack([i0, i1], axis=-1)
  wgt = np.stack([np.float32(1) - lam, lam], axis=-1).astype(np.float32)
  idx.setflags(write=False)
  wgt.setflags(write=False)
  return idx, wgt


@functools.lru_cache(maxsize=32)
def composite_taps(grid: int, logit_size: int, image_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per axis: how the down-sampled cells read the logits through the up-sampled image.

  Returns:
    down_w [G, 2]: weights of the 2 image pixels each cell reads (down-sample S -> G);
    up [G, 2, M]: row (a) of cell i is the up-sample read of image pixel a of that cell, as a
      dense [M] weight vector (2 non-zeros).
  """
  pix_idx, down_w = _taps(grid, image_size)             # [G, 2]
  up_idx, up_w = _taps(image_size, logit_size)          # [S, 2]
  up = np.zeros((grid, 2, logit_size), np.float32)
  for t in range(2):
    # Both taps may hit the same index at the edge (clamped); add, as the reference's sum does.
    np.add.at(up, (np.arange(grid)[:, None], np.arange(2)[None, :], up_idx[pix_idx, t]),
              up_w[pix_idx, t])
  for a in (down_w, up):
    a.setflags(write=False)  # cached: shared by every caller
  return down_w, up


def downsampled_probs(mask_logits: jax.Array, scale: jax.Array, grid: int,
                      image_size: int | None = None) -> jax.Array:
  """resize_G(scale_q * sigmoid(resize_S(mask_logits))) without the S x S tensor.

  Args:
    mask_logits: [B, Q, M, M] (OMG: M = 256).
    scale: [B, Q] per-query factor applied after the sigmoid (0.5 s_q + 0.5).
    grid: G, the token grid side (OMG: 16).
    image_size: S, the size the reference up-samples to (the padded image side); defaults to
      4 M (mask features are stride 4).
  Returns:
    [B, Q, G, G] float32, equal to the two torch resizes to float32 rounding.
  """
  b, q, m, m2 = mask_logits.shape
  if m != m2:
    raise ValueError(f"downsampled_probs: square mask logits expected, got {mask_logits.shape}")
  s = 4 * m if image_size is None else int(image_size)
  down_w, up = composite_taps(int(grid), m, s)
  down_w = jnp.asarray(down_w)
  up = jnp.asarray(up).reshape(2 * grid, m)              # rows (i, a)
  x = mask_logits.astype(jnp.float32)
  # The up-sample reads as two small matmuls with 2-tap weight matrices (a gather would do too,
  # but XLA:CPU miscompiles the fused gather + weighted sum here). HIGHEST keeps them exact fp32
  # products on GPUs that would otherwise round operands to TF32.
  hi = jax.lax.Precision.HIGHEST
  v = jnp.einsum("km,bqmn->bqkn", up, x, precision=hi)
  v = jnp.einsum("bqkn,ln->bqkl", v, up, precision=hi)      # [B, Q, 2G, 2G]
  p = scale.astype(jnp.float32)[:, :, None, None] * jax.nn.sigmoid(v)
  p = p.reshape(b, q, grid, 2, grid, 2)
  # torch's bilinear combine order: h0 * (w0 x00 + w1 x01) + h1 * (w0 x10 + w1 x11).
  cols = down_w[:, 0] * p[..., 0] + down_w[:, 1] * p[..., 1]                # [B, Q, G, 2, G]
  return down_w[:, 0, None] * cols[:, :, :, 0] + down_w[:, 1, None] * cols[:, :, :, 1]


def perception_prior(cls_logits: jax.Array, mask_logits: jax.Array, query_pos_feat: jax.Array,
                     grid: int, image_size: int | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`panoptic_postprocess` (spec 1.4 steps 3-6).

  Args:
    cls_logits: [B, Q, K + 1] (background last).
    mask_logits: [B, Q, M, M] at mask-feature resolution (the reference's 1024^2 up-sample is
      folded into the read, see `downsampled_probs`).
    query_pos_feat: [B, Q, D] (OMG: query feature ++ query_embed, D = 512).
    grid: G, the token grid side.
    image_size: S (default 4 M).
  Returns:
    prior [B, G*G, D] (row-major cells), owner [B, G*G] int32 (argmax query, first on ties),
    valid [B, Q] bool (the query owns at least one cell).
  """
  b, q = cls_logits.shape[:2]
  if mask_logits.shape[:2] != (b, q) or query_pos_feat.shape[:2] != (b, q):
    raise ValueError(f"perception_prior: batch/query dims differ: cls {cls_logits.shape}, masks "
                     f"{mask_logits.shape}, query_pos_feat {query_pos_feat.shape}")
  return _prior_from_probs(cell_probabilities(cls_logits, mask_logits, grid, image_size),
                           query_pos_feat)


def cell_probabilities(cls_logits: jax.Array, mask_logits: jax.Array, grid: int,
                       image_size: int | None = None) -> jax.Array:
  """P_q per grid cell (spec 1.4 steps 3-4): [B, Q, G*G] float32, the foreground-score-scaled
  mask probabilities read at the token grid."""
  b, q = cls_logits.shape[:2]
  score = jnp.max(jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[..., :-1], axis=-1)
  probs = downsampled_probs(mask_logits, 0.5 * score + 0.5, grid, image_size)
  return probs.reshape(b, q, grid * grid)


def _prior_from_probs(probs: jax.Array, query_pos_feat: jax.Array):
  """(prior [B, G*G, D], owner [B, G*G], valid [B, Q]) from P [B, Q, G*G] (steps 5-6)."""
  q = probs.shape[1]
  weights = jax.nn.softmax(probs, axis=1)
  prior = jnp.einsum("bqp,bqd->bpd", weights, query_pos_feat.astype(jnp.float32))
  owner = jnp.argmax(probs, axis=1).astype(jnp.int32)
  valid = jnp.any(owner[:, None, :] == jnp.arange(q, dtype=jnp.int32)[None, :, None], axis=-1)
  return prior.astype(query_pos_feat.dtype), owner, valid


def visual_tokens(clip_feat: jax.Array, decoder_out: dict[str, jax.Array],
                  image_size: int | None = None) -> dict[str, jax.Array]:
  """OMG-LLaVA's visual-encoder outputs (spec 1.4 step 7).

  Args:
    clip_feat: [B, H, W, Cc] stage-4 CLIP map (OMG: [B, 32, 32, 1536]).
    decoder_out: `Mask2FormerDecoder.__call__`'s dict (query_feat_last, query_pos, cls_logits,
      mask_logits).
    image_size: S, the padded image side the reference up-samples masks to; default
      `32 * H` (stride of CLIP stage 4).
  Returns:
    dict with `pixel_tokens` [B, G*G, 4 Cc + 2C] (OMG: [B, 256, 6656] = clip 6144 ++ prior 512),
    `query_pos_feat` [B, Q, 2C], `valid` [B, Q] bool, `owner` [B, G*G] int32, `cell_prob`
    [B, G*G] float32 (each cell's largest P_q over the queries, a pruning score); G = H / 2.
  """
  b, h, w, _ = clip_feat.shape
  if h != w:
    raise ValueError(f"visual_tokens: square CLIP map expected, got {clip_feat.shape}")
  grid = h // 2
  s = 32 * h if image_size is None else image_size
  query_pos_feat = jnp.concatenate([decoder_out["query_feat_last"], decoder_out["query_pos"]],
                                   axis=-1)
  probs = cell_probabilities(decoder_out["cls_logits"], decoder_out["mask_logits"], grid, s)
  prior, owner, valid = _prior_from_probs(probs, query_pos_feat)
  clip = pixel_shuffle(clip_feat, 2)
  pixel = jnp.concatenate([clip, prior.astype(clip.dtype)], axis=-1)
  return dict(pixel_tokens=pixel, query_pos_feat=query_pos_feat, valid=valid, owner=owner,
              cell_prob=jnp.max(probs, axis=1))
