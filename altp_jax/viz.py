"""Pictures of a selection: the image, its superpixels, the kept token cells and the budgets."""

from __future__ import annotations

import numpy as np

from altp_jax import superpixels


def draw_selection(image, keep_idx, grid: tuple[int, int], pixel_labels=None, budgets=None,
                   title: str | None = None, scale: int = 2) -> np.ndarray:
  """Renders a token selection as an RGB picture.

  Dropped token cells are dimmed, kept cells keep their colours and get a thin outline; superpixel
  boundaries are drawn in yellow and, with `budgets`, each superpixel shows its token budget at its
  centroid.

  Args:
    image: [H, W, 3] RGB (uint8 or float in [0, 1]); H and W divisible by the grid.
    keep_idx: [k] kept token indices (raster order on the grid).
    grid: `(h, w)` token grid.
    pixel_labels: optional [H, W] superpixel ids.
    budgets: optional [G] tokens planned per superpixel id (e.g. quota + extra).
    title: optional caption drawn at the top.
    scale: integer upscaling for legibility.

  Returns:
    [H * scale, W * scale, 3] uint8.
  """
  from PIL import Image, ImageDraw
  from skimage.segmentation import find_boundaries

  rgb = (superpixels.as_rgb_float(image) * 255).astype(np.uint8)
  height, width = rgb.shape[:2]
  h, w = grid
  ph, pw = height // h, width // w
  kept = np.zeros(h * w, bool)
  kept[np.asarray(keep_idx)] = True
  cell = np.repeat(np.repeat(kept.reshape(h, w), ph, 0), pw, 1)
  out = np.where(cell[..., None], rgb, (rgb * 0.3).astype(np.uint8))
  if pixel_labels is not None:
    out[find_boundaries(np.asarray(pixel_labels), mode="inner")] = (255, 220, 0)
  pic = Image.fromarray(out).resize((width * scale, height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(pic)
  for t in np.flatnonzero(kept):
    y, x = divmod(int(t), w)
    draw.rectangle([x * pw * scale, y * ph * scale, (x + 1) * pw * scale - 1,
                    (y + 1) * ph * scale - 1], outline=(0, 200, 255))
  if pixel_labels is not None and budgets is not None:
    lab = np.asarray(pixel_labels)
    budgets = np.asarray(budgets)
    for g in np.unique(lab):
      if g >= len(budgets):
        continue
      ys, xs = np.nonzero(lab == g)
      cy, cx = ys.mean() * scale, xs.mean() * scale
      text = str(int(budgets[g]))
      draw.rectangle([cx - 6, cy - 7, cx + 6 * len(text), cy + 7], fill=(0, 0, 0))
      draw.text((cx - 4, cy - 6), text, fill=(255, 255, 255))
  if title:
    draw.rectangle([0, 0, pic.width, 16], fill=(0, 0, 0))
    draw.text((4, 2), title, fill=(255, 255, 255))
  return np.asarray(pic)


def save_png(picture: np.ndarray, path) -> None:
  """Writes an RGB uint8 array as a PNG, atomically (a temporary file, then a rename)."""
  import os
  from PIL import Image

  tmp = f"{path}.tmp.png"
  Image.fromarray(picture).save(tmp)
  os.replace(tmp, path)


def contact_sheet(pictures, columns: int) -> np.ndarray:
  """Tiles equally sized pictures into a grid (row-major), padding with black."""
  pics = list(pictures)
  ph, pw = pics[0].shape[:2]
  rows = -(-len(pics) // columns)
  sheet = np.zeros((rows * ph, columns * pw, 3), np.uint8)
  for i, p in enumerate(pics):
    r, c = divmod(i, columns)
    sheet[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = p
  return sheet
