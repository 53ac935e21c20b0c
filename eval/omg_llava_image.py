"""OMG-LLaVA's image preprocessing and mask post-processing, numpy + PIL (omg_llava.md §3.1,
§3.4).

Reference: `gcg_omg_seg_llava.py` (`GCD_Inference_Dataset.__getitem__`, the mask block of `main`),
XTuner `expand2square`, HF `CLIPImageProcessor(size=1024, resample=3, crop_size=1024)` (PIL path).

- Image: `Image.open(f).convert('RGB')` (no EXIF transpose), `expand2square` with the pad colour
  int(255 * mean) = (122, 116, 104), PIL bicubic resize to 1024x1024, x/255 then normalisation
  with the truncated CLIP constants -> float32 [1024, 1024, 3] (NHWC). These are OMG-LLaVA's
  constants although OMG-Seg was trained with ImageNet ones; kept as the reference has them.
- Masks: logits [N, 256, 256] -> bilinear (align_corners=False) to S = max(w, h) -> crop the
  centred padding -> sigmoid > 0.5 -> bool [N, h, w].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

from models.sam.resize import linear_taps

IMAGE_SIZE = 1024
IMAGE_MEAN = (0.4814, 0.4578, 0.4082)  # truncated CLIP constants of the OMG-LLaVA config
IMAGE_STD = (0.2686, 0.2613, 0.2757)
PAD_COLOR = tuple(int(m * 255) for m in IMAGE_MEAN)  # (122, 116, 104)


def to_rgb(image, source: str = "<array>") -> Image.Image:
  """PIL `.convert('RGB')` of a PIL image (any mode) or of a uint8 array [H,W], [H,W,1],
  [H,W,3] or [H,W,4] (alpha dropped, grey replicated -- what `convert` does)."""
  if not isinstance(image, Image.Image):
    a = np.asarray(image)
    if a.dtype != np.uint8:
      raise ValueError(f"{source}: expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
      a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
      raise ValueError(f"{source}: expected an image of shape [H,W], [H,W,1], [H,W,3] or "
                       f"[H,W,4], got {a.shape}")
    image = Image.fromarray(np.ascontiguousarray(a))
  if image.width == 0 or image.height == 0:
    raise ValueError(f"{source}: empty image of size {image.size}")
  return image.convert("RGB")


def load_image(path: str) -> Image.Image:
  """`Image.open(path).convert('RGB')`; like the reference, EXIF orientation is NOT applied."""
  with Image.open(path) as im:
    return to_rgb(im, source=path)


def expand2square(rgb: np.ndarray, color: Sequence[int] = PAD_COLOR) -> np.ndarray:
  """uint8 [H,W,3] -> [S,S,3], S = max(H,W), the image at offset (S - min) // 2 on the short
  side (XTuner `expand2square`, a PIL paste)."""
  h, w = rgb.shape[:2]
  s = max(h, w)
  out = np.empty((s, s, 3), np.uint8)
  out[...] = np.asarray(color, np.uint8)
  top, left = (s - h) // 2, (s - w) // 2
  out[top:top + h, left:left + w] = rgb
  return out


@dataclasses.dataclass(frozen=True)
class OmgImage:
  """pixels: float32 [1024,1024,3] normalised (the vision input); square: uint8 [1024,1024,3]
  (the padded, resized image, e.g. for ALTP's superpixels); size: the original (w, h)."""
  pixels: np.ndarray
  square: np.ndarray
  size: tuple[int, int]


def preprocess(image, source: str = "<array>", size: int = IMAGE_SIZE) -> OmgImage:
  """`convert('RGB')` -> `expand2square` -> `CLIPImageProcessor(size=1024, resample=BICUBIC,
  crop 1024)`: on a square this is a PIL bicubic resize of the uint8 image, x * (1/255) in
  float64 cast to float32, then (x - mean) / std in float32."""
  im = to_rgb(image, source)
  square = expand2square(np.asarray(im))
  resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))
  x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
  x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
  return OmgImage(x, resized, im.size)


# ------------------------------------------------------------------------------------------------
# Masks.


def _resize_window(x: np.ndarray, out_size: int, axis: int, start: int, stop: int) -> np.ndarray:
  """Samples [start, stop) of a bilinear (align_corners=False, no antialias) resize of `axis`."""
  lo, hi, w_lo, w_hi = (t[start:stop] for t in linear_taps(x.shape[axis], out_size))
  shape = [1] * x.ndim
  shape[axis] = stop - start
  return (np.take(x, lo, axis=axis) * w_lo.reshape(shape)
          + np.take(x, hi, axis=axis) * w_hi.reshape(shape))


def resize_mask_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[N, h0, w0] mask logits -> float32 [N, h, w] for an original image of size (w, h):
  `F.interpolate(bilinear, align_corners=False)` to (S, S), S = max(w, h), then rows
  [(w-h)//2, +h) when w > h, else columns [(h-w)//2, +w). Only the kept window is computed (the
  same values: each output sample depends only on its own taps)."""
  x = np.asarray(logits, np.float32)
  if x.ndim != 3:
    raise ValueError(f"resize_mask_logits: expected logits [N, H, W], got shape {x.shape}")
  w, h = (int(v) for v in size)
  if w < 1 or h < 1:
    raise ValueError(f"resize_mask_logits: bad image size (w, h) = {size}")
  s = max(w, h)
  top, left = ((w - h) // 2, 0) if w >= h else (0, (h - w) // 2)
  # Width first, then height: the order of ATen's separable sum.
  x = _resize_window(x, s, 2, left, left + w)
  return _resize_window(x, s, 1, top, top + h)


def masks_to_image(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """bool [N, h, w]: `resize_mask_logits` then `sigmoid() > 0.5` in float32 (which is not
  exactly `logit > 0`: sigmoid rounds to 0.5 for logits below ~6e-8)."""
  x = resize_mask_logits(logits, size)
  with np.errstate(over="ignore"):
    prob = np.float32(1) / (np.float32(1) + np.exp(-x))
  return prob > np.float32(0.5)
