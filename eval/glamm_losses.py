"""GLaMM's training losses in JAX (`model/GLaMM.py` of groundingLMM, which follows LISA).

- Next-token cross-entropy, mean over the answer tokens of the batch (HF `LlamaForCausalLM` with
  prompt labels set to IGNORE_INDEX).
- Mask BCE: per mask, the mean over pixels of `binary_cross_entropy_with_logits`; per batch, the
  sum over masks / number of masks (`compute_sigmoid_cross_entropy`).
- Mask Dice: per mask, `1 - (2 sum(p g / s) + eps) / (sum(p / s) + sum(g / s) + eps)` with
  p = sigmoid(logits), s = 1000, eps = 1e-6; per batch, the sum over masks / number of masks
  (`calculate_dice_loss`).
- Total = ce_weight * CE + bce_weight * BCE + dice_weight * Dice. glamm.md does not state the
  weights; GLaMM's (and LISA's) `train.py` defaults are CE 1.0, Dice 0.5, BCE 2.0.

Masks are compared at the original image size after `postprocess_masks` (GLaMM passes the label's
shape as `original_size`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """logits [B,L,V], targets [B,L] int (the id each position predicts), weights [B,L] (1 on
  answer positions) -> mean NLL over weighted positions (0 when there are none)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def mask_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[..., H, W] logits and {0,1} targets -> [...] mean sigmoid BCE over pixels."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  # Numerically stable BCE-with-logits: max(x, 0) - x t + log(1 + exp(-|x|)).
  loss = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.mean(loss, axis=(-2, -1))


def mask_dice(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[..., H, W] logits and {0,1} targets -> [...] GLaMM's scaled Dice loss."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32)) / DICE_SCALE
  t = targets.astype(jnp.float32) / DICE_SCALE
  inter = 2 * jnp.sum(p * targets.astype(jnp.float32), axis=(-2, -1))
  union = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
  return 1 - (inter + DICE_EPS) / (union + DICE_EPS)


def mask_losses(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple[jax.Array,
                                                                                 jax.Array]:
  """logits/targets [B,K,H,W], valid [B,K] bool (padded mask slots False) -> (BCE, Dice), each
  the sum over valid masks / (number of valid masks + 1e-8), as GLaMM normalises them."""
  v = valid.astype(jnp.float32)
  n = jnp.sum(v) + 1e-8
  return (jnp.sum(mask_bce(logits, targets) * v) / n, jnp.sum(mask_dice(logits, targets) * v) / n)


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[..., H, W] -> [...] IoU of (logits > 0) with the target (1 when both are empty)."""
  pred = logits > 0
  gt = targets > 0.5
  inter = jnp.sum(pred & gt, axis=(-2, -1))
  union = jnp.sum(pred | gt, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
