"""Mask post-processing to the original image size (`Sam.postprocess_masks`) and thresholding.

low-res logits [N, K, 256, 256] -> float32 -> bilinear to img_size^2 -> crop to the resized,
un-padded input (h, w) -> bilinear to the original (H, W); all `align_corners=False` and without
antialiasing, even when shrinking (glamm.md 4.10). Binary masks are logits > threshold (0.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.sam.resize import resize_bilinear


def preprocess_shape(original_size: tuple[int, int], long_side: int) -> tuple[int, int]:
  """(h, w) of the resized image before padding (`ResizeLongestSide.get_preprocess_shape`)."""
  old_h, old_w = original_size
  scale = long_side * 1.0 / max(old_h, old_w)
  return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def postprocess_masks(masks: jax.Array, input_size: tuple[int, int],
                      original_size: tuple[int, int], img_size: int = 1024) -> jax.Array:
  """Upsamples low-res mask logits to the original image.

  Args:
    masks: [N, K, h_low, w_low] mask logits (any float dtype; computed in float32).
    input_size: (h, w) of the resized image inside the padded img_size x img_size input.
    original_size: (H, W) of the original image.
    img_size: side of the padded encoder input.
  Returns:
    [N, K, H, W] float32 logits.
  """
  in_h, in_w = (int(s) for s in input_size)
  if not (0 < in_h <= img_size and 0 < in_w <= img_size):
    raise ValueError(f"postprocess_masks: input_size {input_size} must lie inside the "
                     f"{img_size}x{img_size} padded input")
  x = masks.astype(jnp.float32)
  # Resize to img_size^2 then crop to (in_h, in_w); the cropped-away samples are never computed.
  x = resize_bilinear(x, (img_size, img_size), keep_hw=(in_h, in_w))
  return resize_bilinear(x, original_size)


def masks_to_binary(logits: jax.Array, threshold: float = 0.0) -> jax.Array:
  """Binary masks: logits > threshold (GLaMM's `pred_masks > 0`)."""
  return logits > threshold
