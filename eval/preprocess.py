"""Image loading and the two GLaMM image preprocessors (CLIP 336 and SAM 1024), numpy + PIL.

Reference: `eval/gcg/infer.py::inference`, `model/SAM/utils/transforms.py::ResizeLongestSide`,
`eval/utils.py::grounding_image_ecoder_preprocess`, and the HF `CLIPImageProcessor` slow path with
the `openai/clip-vit-large-patch14-336` preprocessor config (glamm.md §4.1-4.3).

Outputs are channels-last (the JAX models take NHWC); the PyTorch reference tensors are the same
numbers in CHW order.

Image modes. GLaMM reads images with `cv2.imread(path)` (IMREAD_COLOR) and converts BGR->RGB.
IMREAD_COLOR always yields 3 channels: a grayscale file is replicated into R=G=B and an alpha
channel is *dropped* (not composited). PIL's `.convert("RGB")` does the same for modes "L" and
"RGBA", so this loader accepts exactly those modes (plus "RGB") and refuses the others with an
error naming the mode and the file. OpenCV also applies the EXIF orientation, which PIL does not by
default; `load_image` applies it with `ImageOps.exif_transpose`. JPEG decoding is done by PIL's
libjpeg rather than OpenCV's; both use the default integer IDCT, but a different libjpeg build can
differ by one grey level on some pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

CLIP_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESCALE = 1 / 255  # the preprocessor config's rescale_factor 0.00392156862745098

SAM_SIZE = 1024
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)

_ACCEPTED_MODES = ("RGB", "RGBA", "L")


def to_rgb(image, source: str = "<array>") -> np.ndarray:
  """uint8 [H,W,3] RGB from a PIL image or a uint8 array ([H,W], [H,W,1], [H,W,3] or [H,W,4]).

  Grayscale is replicated into three channels and alpha is dropped, as `cv2.imread` /
  PIL `.convert("RGB")` do. `source` names the file in error messages.
  """
  if isinstance(image, Image.Image):
    if image.mode not in _ACCEPTED_MODES:
      raise ValueError(f"{source}: unsupported image mode {image.mode!r}; expected one of "
                       f"{_ACCEPTED_MODES}")
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{source}: expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"{source}: expected an image of shape [H,W], [H,W,1], [H,W,3] or [H,W,4], "
                     f"got {image.shape}")
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  elif image.shape[2] == 4:
    image = image[:, :, :3]
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"{source}: empty image of shape {image.shape}")
  return np.ascontiguousarray(image)


def load_image(path: str) -> np.ndarray:
  """uint8 [H,W,3] RGB of an image file, EXIF orientation applied (as `cv2.imread` does)."""
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im)
    im.load()
    return to_rgb(im, source=path)


# ------------------------------------------------------------------------------------------------
# CLIP branch.


def clip_resize_shape(height: int, width: int, size: int = CLIP_SIZE) -> tuple[int, int]:
  """Short side -> `size`, long side -> int(size * long / short) (HF `get_resize_output_image_size`)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def clip_preprocess(image: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
  """uint8 [H,W,3] -> float32 [size,size,3].

  PIL bicubic resize of the uint8 image (short side -> size), centre crop (top = (h - size) // 2,
  left = (w - size) // 2), x * (1/255) in float64 cast to float32, then (x - mean) / std in float32.
  No pad-to-square.
  """
  image = to_rgb(image)
  new_h, new_w = clip_resize_shape(image.shape[0], image.shape[1], size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  crop = resized[top:top + size, left:left + size]
  x = (crop.astype(np.float64) * CLIP_RESCALE).astype(np.float32)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


# ------------------------------------------------------------------------------------------------
# SAM branch.


def sam_resize_shape(height: int, width: int, long_side: int = SAM_SIZE) -> tuple[int, int]:
  """`ResizeLongestSide.get_preprocess_shape`: scale the long side to `long_side`, round half up."""
  scale = long_side * 1.0 / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_preprocess(image: np.ndarray, size: int = SAM_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 [H,W,3] -> (float32 [size,size,3], resize_hw).

  PIL bilinear resize of the uint8 image to `sam_resize_shape` (torchvision's `resize` on a PIL
  image), (x - mean) / std in float32, zero padding at the bottom and right *after*
  normalisation. `resize_hw` = (new_h, new_w) is what mask post-processing crops back to.
  """
  image = to_rgb(image)
  new_h, new_w = sam_resize_shape(image.shape[0], image.shape[1], size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  x = (resized.astype(np.float32) - np.asarray(SAM_MEAN, np.float32)) / np.asarray(SAM_STD, np.float32)
  out = np.zeros((size, size, 3), np.float32)
  out[:new_h, :new_w] = x
  return out, (new_h, new_w)
