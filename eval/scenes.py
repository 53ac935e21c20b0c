"""Synthetic grounded-conversation scenes in the GranD-f GCG file layout.

Each scene is a 336x336 RGB image (the CLIP input size, so the LLM sees 24x24 = 576 visual tokens
with no resizing) holding 1 to 6 named objects on a textured background with unnamed clutter, a
GLaMM-style grounded caption and one mask per phrase:

  "The image shows <p> a small striped red star </p> [SEG] to the left of
   <p> a large blue circle </p> [SEG], which is above <p> a tiny dotted green ring </p> [SEG]."

Objects draw from shapes x colours x textures x sizes (`SHAPES`, `COLOURS`, `TEXTURES`, `SIZES`);
"tiny" objects span about 2x2 CLIP patches, the case where local detail matters for pruning. No two
objects of a scene share (colour, shape), so every phrase names exactly one object. Objects may
partially occlude each other (each keeps at least `MIN_VISIBLE` of its area visible); masks are the
*visible* pixels. Every scene is a pure function of (seed, split, index).

Relations: consecutive objects in caption order are related by their shape centres: the axis with
the larger centre distance decides ("to the left of" / "to the right of" when |dx| >= |dy|, else
"above" / "below"; image rows grow downwards). A single object gets its region of the image.

File layout (glamm.md §6.1-6.2; `eval/grandf.py` reads it):
  OUT/GranDf_HA_images/train/syn_train_000000.jpg
  OUT/GranDf_HA_images/val_test/syn_{val,test}_000000.jpg
  OUT/annotations/train/train_gcg_coco_{caption,mask}_gt.json
  OUT/annotations/val_test/{val,test}_gcg_coco_{caption,mask}_gt.json
  OUT/tokenizer/  (eval/synthetic_tokenizer.py; identical for every seed and size)
  OUT/dataset.json  (seed, counts, vocabulary)
Caption annotations carry, besides GranD-f's `caption` (plain text) and `labels` (phrases), the
`grounded_caption` used as the training answer; mask annotations carry the object's `attributes`
(shape, colour, texture, size), which the small-object recall of the comparison uses.

`python -m eval.scenes --out DIR --train N --val N --test N --seed S` writes it; each image and a
per-image record (under OUT/.parts) are written atomically, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import draw

from eval.gcg_output import encode_mask

IMAGE_SIZE = 336
MAX_OBJECTS = 6
MIN_VISIBLE = 0.6          # every object keeps >= 60 % of its own area visible
JPEG_QUALITY = 95
GENERATOR_VERSION = 1      # bump when the rendering changes; recorded in dataset.json

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLOURS = {
    "red": (214, 39, 40), "orange": (245, 130, 20), "yellow": (235, 205, 30),
    "green": (44, 160, 60), "cyan": (30, 190, 205), "blue": (40, 70, 215),
    "purple": (140, 55, 185), "pink": (245, 120, 185),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Size class -> circumradius range in pixels (14 px = one CLIP patch).
SIZES = {"tiny": (9, 12), "small": (16, 22), "medium": (30, 42), "large": (54, 70)}

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

RELATIONS = ("to the left of", "to the right of", "above", "below")
REGIONS = ("in the top left corner", "at the top", "in the top right corner", "on the left side",
           "in the centre", "on the right side", "in the bottom left corner", "at the bottom",
           "in the bottom right corner")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One named object. `centre` is (row, col) in pixels; `radius` its circumradius."""
  shape: str
  colour: str
  texture: str
  size: str
  centre: tuple[float, float]
  radius: float
  angle: float
  rgb: tuple[int, int, int]
  rgb2: tuple[int, int, int]       # second colour of the texture

  @property
  def phrase(self) -> str:
    texture = "" if self.texture == "plain" else self.texture + " "
    return f"a {self.size} {texture}{self.colour} {self.shape}"

  @property
  def attributes(self) -> dict:
    return {"shape": self.shape, "colour": self.colour, "texture": self.texture,
            "size": self.size}


@dataclasses.dataclass(frozen=True)
class Scene:
  """image uint8 [H,W,3]; objects and masks (bool [n,H,W], visible pixels) in caption order."""
  image: np.ndarray
  objects: tuple[SceneObject, ...]
  masks: np.ndarray
  grounded_caption: str
  caption: str
  relations: tuple[str, ...]       # relation of object i to object i+1 (empty for one object)

  @property
  def phrases(self) -> list[str]:
    return [o.phrase for o in self.objects]


# ------------------------------------------------------------------------------------------------
# Geometry.


def shape_mask(shape: str, centre: tuple[float, float], radius: float, angle: float,
               size: int = IMAGE_SIZE) -> np.ndarray:
  """bool [size,size]: the filled shape (clipped to the image)."""
  cy, cx = centre
  out = np.zeros((size, size), bool)
  if shape in ("circle", "ring"):
    rr, cc = draw.disk((cy, cx), radius, shape=out.shape)
    out[rr, cc] = True
    if shape == "ring":
      rr, cc = draw.disk((cy, cx), 0.55 * radius, shape=out.shape)
      out[rr, cc] = False
    return out
  if shape == "square":
    angles = angle + np.pi / 4 + np.arange(4) * np.pi / 2
    radii = np.full(4, radius)
  elif shape == "diamond":   # a rhombus, tall: distinct from a square turned by 45 degrees
    angles = angle + np.arange(4) * np.pi / 2
    radii = radius * np.array([0.62, 1.0, 0.62, 1.0])
  elif shape == "triangle":
    angles = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    radii = np.full(3, radius)
  elif shape == "hexagon":
    angles = angle + np.arange(6) * np.pi / 3
    radii = np.full(6, radius)
  elif shape == "star":
    angles = angle - np.pi / 2 + np.arange(10) * np.pi / 5
    radii = radius * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
  elif shape == "cross":     # a plus sign: 12 corners with arms of half-width 0.34 r
    w = 0.34
    pts = np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w),
                    (-1, -w), (-1, w), (-w, w), (-w, 1)])
    angles = angle + np.arctan2(pts[:, 1], pts[:, 0])
    radii = radius * np.hypot(pts[:, 0], pts[:, 1]) / np.hypot(1, w)
  else:
    raise ValueError(f"shape_mask: unknown shape {shape!r}; known: {SHAPES}")
  rows = cy + radii * np.sin(angles)
  cols = cx + radii * np.cos(angles)
  rr, cc = draw.polygon(rows, cols, shape=out.shape)
  out[rr, cc] = True
  return out


def relation(a: SceneObject, b: SceneObject) -> str:
  """Where `a` is relative to `b`: the axis with the larger centre distance decides."""
  dy = a.centre[0] - b.centre[0]
  dx = a.centre[1] - b.centre[1]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx < 0 else "to the right of"
  return "above" if dy < 0 else "below"


def region(obj: SceneObject, size: int = IMAGE_SIZE) -> str:
  """The image third (rows x cols) holding the object's centre, as a caption phrase."""
  row = min(int(3 * obj.centre[0] / size), 2)
  col = min(int(3 * obj.centre[1] / size), 2)
  return REGIONS[3 * row + col]


# ------------------------------------------------------------------------------------------------
# Rendering.


def _texture_pattern(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """bool [size,size]: where the texture's second colour goes."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  if texture == "plain":
    return np.zeros((size, size), bool)
  if texture == "striped":
    period = rng.uniform(6.0, 10.0)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, period)
    return (u % period) < period / 2
  if texture == "dotted":
    period = rng.uniform(6.0, 8.0)
    r = rng.uniform(1.5, 2.2)
    oy, ox = rng.uniform(0, period, 2)
    dy = (yy + oy) % period - period / 2
    dx = (xx + ox) % period - period / 2
    return dy * dy + dx * dx <= r * r
  if texture == "checkered":
    k = int(rng.integers(4, 7))
    oy, ox = rng.integers(0, k, 2)
    return (((yy + oy) // k + (xx + ox) // k) % 2).astype(bool)
  raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")


def _second_colour(rgb: np.ndarray) -> np.ndarray:
  """A darker shade of a light colour, a lighter tint of a dark one (keeps the colour name)."""
  lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return rgb * 0.45 if lum >= 110 else rgb + 0.55 * (255 - rgb)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """float32 [size,size,3]: a desaturated base colour, a gradient, a pattern and noise."""
  base = rng.uniform(70, 200, 3)
  base = base.mean() + 0.3 * (base - base.mean())
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  theta = rng.uniform(0, 2 * np.pi)
  grad = (xx * np.cos(theta) + yy * np.sin(theta)) * rng.uniform(-40, 40)
  kind = rng.integers(4)
  if kind == 0:      # waves
    period = rng.uniform(0.05, 0.2)
    phi = rng.uniform(0, 2 * np.pi)
    pattern = 10 * np.sin(2 * np.pi * (xx * np.sin(phi) + yy * np.cos(phi)) / period)
  elif kind == 1:    # faint grid
    k = int(rng.integers(12, 40))
    lines = ((np.arange(size) % k) == 0)
    pattern = 14 * (lines[:, None] | lines[None, :]).astype(np.float32) * rng.choice([-1, 1])
  elif kind == 2:    # blotches: low-resolution noise upsampled
    coarse = rng.normal(0, 12, (8, 8)).astype(np.float32)
    pattern = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
  else:              # speckle
    pattern = (rng.random((size, size)) < 0.04) * rng.uniform(-30, 30)
  img = base[None, None, :] + (grad + pattern)[..., None]
  return img + rng.normal(0, 4, (size, size, 3))


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
  """Unnamed distractors drawn on the background (under the objects): thin grey lines, arcs and
  small irregular blobs, low in saturation so no named colour describes them."""
  size = img.shape[0]
  for _ in range(int(rng.integers(3, 12))):
    grey = rng.uniform(30, 230)
    colour = grey + rng.normal(0, 8, 3)
    kind = rng.integers(3)
    if kind == 0:
      r0, c0, r1, c1 = rng.integers(0, size, 4)
      rr, cc, val = draw.line_aa(r0, c0, r1, c1)
      keep = (rr < size) & (cc < size)
      rr, cc, val = rr[keep], cc[keep], val[keep][:, None]
      img[rr, cc] = (1 - val) * img[rr, cc] + val * colour
    elif kind == 1:
      rr, cc = draw.circle_perimeter(int(rng.integers(0, size)), int(rng.integers(0, size)),
                                     int(rng.integers(5, 30)), shape=img.shape[:2])
      img[rr, cc] = colour
    else:
      n = int(rng.integers(3, 7))
      cy, cx = rng.uniform(0, size, 2)
      ang = np.sort(rng.uniform(0, 2 * np.pi, n))
      rad = rng.uniform(2, 8, n)
      rr, cc = draw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=img.shape[:2])
      img[rr, cc] = colour


def _sample_objects(rng: np.random.Generator, n: int, size: int):
  """Objects in paint order with their full shape masks; occlusion keeps MIN_VISIBLE visible."""
  objects, full = [], []
  used = set()
  size_names = list(SIZES)
  for _ in range(n):
    while True:
      shape = SHAPES[rng.integers(len(SHAPES))]
      colour = list(COLOURS)[rng.integers(len(COLOURS))]
      if (colour, shape) not in used:
        break
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    size_idx = int(rng.integers(len(SIZES)))
    placed = False
    while not placed and size_idx >= 0:
      name = size_names[size_idx]
      for _ in range(40):
        radius = float(rng.uniform(*SIZES[name]))
        margin = radius + 2
        centre = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        angle = float(rng.uniform(-0.26, 0.26)) if shape in ("square", "diamond", "triangle") \
            else float(rng.uniform(0, 2 * np.pi))
        m = shape_mask(shape, centre, radius, angle, size)
        # The new object goes on top: every earlier object must keep MIN_VISIBLE of its area.
        ok = True
        cover = m.copy()
        for j in range(len(full) - 1, -1, -1):
          visible = full[j] & ~cover
          if visible.sum() < MIN_VISIBLE * full[j].sum():
            ok = False
            break
          cover |= full[j]
        # Centres must differ enough for a relation to be readable.
        if ok and all(max(abs(centre[0] - o.centre[0]), abs(centre[1] - o.centre[1])) >= 8
                      for o in objects):
          placed = True
          break
      if not placed:
        size_idx -= 1     # no room: try a smaller size class
    if not placed:
      continue            # no room at all: the scene gets fewer objects
    rgb = np.clip(np.asarray(COLOURS[colour], np.float64) + rng.normal(0, 8, 3), 0, 255)
    rgb2 = np.clip(_second_colour(rgb), 0, 255)
    used.add((colour, shape))
    objects.append(SceneObject(shape, colour, texture, name, centre, radius, angle,
                               tuple(int(round(v)) for v in rgb),
                               tuple(int(round(v)) for v in rgb2)))
    full.append(m)
  return objects, full


def grounded_caption(objects: Sequence[SceneObject], relations: Sequence[str],
                     size: int = IMAGE_SIZE) -> tuple[str, str]:
  """(grounded caption with `<p> phrase </p> [SEG]`, plain caption) for objects in caption order."""
  def g(o):
    return f"<p> {o.phrase} </p> [SEG]"
  if len(objects) == 1:
    tail = f" {region(objects[0], size)} of the image."
    return (f"The image shows {g(objects[0])}{tail}",
            f"The image shows {objects[0].phrase}{tail}")
  grounded = [f"The image shows {g(objects[0])} {relations[0]} {g(objects[1])}"]
  plain = [f"The image shows {objects[0].phrase} {relations[0]} {objects[1].phrase}"]
  for i in range(1, len(objects) - 1):
    grounded.append(f", which is {relations[i]} {g(objects[i + 1])}")
    plain.append(f", which is {relations[i]} {objects[i + 1].phrase}")
  return "".join(grounded) + ".", "".join(plain) + "."


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  if split not in _SPLIT_CODE:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def render_scene(seed: int, split: str, index: int, size: int = IMAGE_SIZE) -> Scene:
  """The scene of (seed, split, index); deterministic."""
  rng = scene_rng(seed, split, index)
  img = _background(rng, size)
  _clutter(img, rng)
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  objects, full = _sample_objects(rng, n, size)
  for obj, m in zip(objects, full):     # paint order: later objects occlude earlier ones
    pattern = _texture_pattern(obj.texture, rng, size)
    img[m & ~pattern] = obj.rgb
    img[m & pattern] = obj.rgb2
  image = np.clip(np.round(img), 0, 255).astype(np.uint8)
  # The painted colours are integers in [0, 255], so rounding and clipping leave objects exact.
  visible = []
  for j, m in enumerate(full):
    covered = np.zeros_like(m)
    for k in range(j + 1, len(full)):
      covered |= full[k]
    visible.append(m & ~covered)
  order = rng.permutation(len(objects))
  objects = tuple(objects[i] for i in order)
  masks = np.stack([visible[i] for i in order]) if objects else np.zeros((0, size, size), bool)
  relations = tuple(relation(objects[i], objects[i + 1]) for i in range(len(objects) - 1))
  grounded, plain = grounded_caption(objects, relations, size)
  return Scene(image, objects, masks, grounded, plain, relations)


# ------------------------------------------------------------------------------------------------
# GranD-f layout.


def image_dir(out: str, split: str) -> str:
  return os.path.join(out, "GranDf_HA_images", "train" if split == "train" else "val_test")


def annotation_paths(out: str, split: str) -> tuple[str, str]:
  """(caption GT, mask GT) of a split; val/test as `eval/grandf.gt_paths(OUT/annotations/val_test,
  split)` expects them."""
  sub = "train" if split == "train" else "val_test"
  d = os.path.join(out, "annotations", sub)
  return (os.path.join(d, f"{split}_gcg_coco_caption_gt.json"),
          os.path.join(d, f"{split}_gcg_coco_mask_gt.json"))


def image_stem(split: str, index: int) -> str:
  return f"syn_{split}_{index:06d}"


def scene_record(scene: Scene, stem: str) -> dict:
  """Per-image record: the image entry, the caption annotation and the mask annotations (no ids)."""
  h, w = scene.image.shape[:2]
  masks = []
  for obj, m in zip(scene.objects, scene.masks):
    rle = encode_mask(m)
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    masks.append({"segmentation": rle, "area": int(mask_utils.area(coco_rle)),
                  "bbox": [float(v) for v in mask_utils.toBbox(coco_rle)],
                  "iscrowd": 0, "category_id": 1, "attributes": obj.attributes})
  return {"image": {"id": stem, "file_name": f"{stem}.jpg", "height": h, "width": w},
          "caption": {"caption": scene.caption, "labels": scene.phrases,
                      "grounded_caption": scene.grounded_caption},
          "masks": masks}


def _atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _atomic_write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _atomic_write_bytes(path, json.dumps(obj).encode("utf-8"))


def _write_one(args) -> None:
  out, split, index, seed = args
  stem = image_stem(split, index)
  part = os.path.join(out, ".parts", split, f"{stem}.json")
  if os.path.exists(part) and os.path.exists(os.path.join(image_dir(out, split), f"{stem}.jpg")):
    return
  scene = render_scene(seed, split, index)
  buf = io.BytesIO()
  Image.fromarray(scene.image).save(buf, format="JPEG", quality=JPEG_QUALITY)
  _atomic_write_bytes(os.path.join(image_dir(out, split), f"{stem}.jpg"), buf.getvalue())
  _atomic_write_json(part, scene_record(scene, stem))   # last: its presence marks the image done


def assemble_split(out: str, split: str, n: int) -> tuple[str, str]:
  """Builds the two GT JSONs of a split from its per-image records; returns their paths."""
  images, cap_anns, mask_anns = [], [], []
  for index in range(n):
    stem = image_stem(split, index)
    part = os.path.join(out, ".parts", split, f"{stem}.json")
    with open(part) as f:
      rec = json.load(f)
    images.append(rec["image"])
    cap_anns.append({"id": len(cap_anns) + 1, "image_id": stem, **rec["caption"]})
    for m in rec["masks"]:   # in phrase order: label i <-> i-th mask annotation of the image
      mask_anns.append({"id": len(mask_anns) + 1, "image_id": stem, **m})
  info = {"description": "altp-jax synthetic grounded scenes", "split": split,
          "generator_version": GENERATOR_VERSION}
  cap_path, mask_path = annotation_paths(out, split)
  _atomic_write_json(cap_path, {"info": info, "images": images, "annotations": cap_anns})
  _atomic_write_json(mask_path, {"info": info, "images": images, "annotations": mask_anns,
                                 "categories": [{"id": 1, "name": "object"}]})
  return cap_path, mask_path


def _check_meta(out: str, seed: int) -> None:
  """A directory holds one seed's scenes: refuse to mix seeds or generator versions."""
  path = os.path.join(out, "dataset.json")
  if os.path.exists(path):
    with open(path) as f:
      meta = json.load(f)
    if meta.get("seed") != seed or meta.get("generator_version") != GENERATOR_VERSION:
      raise ValueError(f"{path}: directory was generated with seed {meta.get('seed')} / version "
                       f"{meta.get('generator_version')}, not seed {seed} / version "
                       f"{GENERATOR_VERSION}; use another --out")


def write_dataset(out: str, counts: dict[str, int], seed: int, workers: int = 1,
                  progress: bool = True, tokenizer: bool = True) -> dict:
  """Writes (or completes) the dataset; returns the dataset.json contents."""
  os.makedirs(out, exist_ok=True)
  _check_meta(out, seed)
  # Recorded first, so that a resumed run with another seed is refused even before completion.
  _atomic_write_json(os.path.join(out, "dataset.json"),
                     {"seed": seed, "generator_version": GENERATOR_VERSION, "complete": False})
  for split, n in counts.items():
    if split not in SPLITS or n < 0:
      raise ValueError(f"write_dataset: bad split count {split}={n}")
    os.makedirs(image_dir(out, split), exist_ok=True)
    os.makedirs(os.path.join(out, ".parts", split), exist_ok=True)
    # Temp files of a killed run: GLaMM's inference lists every file of the image folder.
    for d in (image_dir(out, split), os.path.join(out, ".parts", split)):
      for name in os.listdir(d):
        if ".tmp" in name:
          os.remove(os.path.join(d, name))
  jobs = [(out, split, i, seed) for split, n in counts.items() for i in range(n)]
  try:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="scenes", disable=not progress, file=sys.stderr)
  except ImportError:   # tqdm is optional; the run is the same without a bar
    bar = None
  if workers > 1:
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(workers) as pool:
      for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
        if bar is not None:
          bar.update()
  else:
    for job in jobs:
      _write_one(job)
      if bar is not None:
        bar.update()
  if bar is not None:
    bar.close()
  for split, n in counts.items():
    assemble_split(out, split, n)
  meta = {"seed": seed, "generator_version": GENERATOR_VERSION, "complete": True, "counts": counts,
          "image_size": IMAGE_SIZE, "max_objects": MAX_OBJECTS,
          "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS),
                         "textures": list(TEXTURES), "sizes": {k: list(v) for k, v in SIZES.items()}}}
  if tokenizer:   # a function of the caption grammar only: the same for every dataset
    from eval import synthetic_tokenizer
    synthetic_tokenizer.train_tokenizer(os.path.join(out, "tokenizer"))
  _atomic_write_json(os.path.join(out, "dataset.json"), meta)
  return meta


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--train", type=int, default=0)
  p.add_argument("--val", type=int, default=0)
  p.add_argument("--test", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  meta = write_dataset(a.out, {"train": a.train, "val": a.val, "test": a.test}, a.seed,
                       workers=a.workers, progress=not a.no_progress)
  print(json.dumps({"out": a.out, "counts": meta["counts"], "seed": meta["seed"]}))


if __name__ == "__main__":
  main()
