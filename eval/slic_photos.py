"""The photo set of the superpixel report and benchmark: scikit-image's bundled images.

Each is brought to the model's input resolution the way CLIP's processor does it (shortest side
resized to `size` with bicubic filtering, centre crop), as uint8 RGB [size, size, 3]. Grayscale
photos are replicated to three channels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Names as in skimage.data; all ship with scikit-image (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera")


def _raw(name: str) -> np.ndarray:
  from skimage import data

  img = getattr(data, name)()
  if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity); take the left view
    img = img[0]
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def clip_resize(img: np.ndarray, size: int) -> np.ndarray:
  """Shortest side to `size` (bicubic), then a centre `size x size` crop."""
  h, w = img.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  pil = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(pil)[top:top + size, left:left + size]


def load(size: int = 336, names=PHOTOS) -> list[tuple[str, np.ndarray]]:
  """[(name, uint8 [size, size, 3])] for every photo in `names`."""
  return [(name, clip_resize(_raw(name), size)) for name in names]
