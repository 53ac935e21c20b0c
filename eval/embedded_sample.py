"""The embedded default: a tiny GranDf-format sample we made from scikit-image photos.

Four photos shipped with scikit-image, each with our own grounded caption, phrases and masks
(derived from the image itself: the horse silhouette, Otsu-thresholded coins, the cameraman's dark
figure, hand-placed ellipses on the astronaut photo). `write_sample(dir)` writes the images and
the two GranDf annotation JSONs (`val_gcg_coco_caption_gt.json`, `val_gcg_coco_mask_gt.json`), so
the whole GCG pipeline runs on a fresh machine without any download.
"""

from __future__ import annotations

import json
import os

import numpy as np

SPLIT = "val"


def _largest_component(mask):
  from skimage.measure import label
  lab = label(mask)
  if lab.max() == 0:
    return mask
  return lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1


def _ellipse(shape, centre, radii):
  from skimage.draw import ellipse
  m = np.zeros(shape, bool)
  rr, cc = ellipse(centre[0], centre[1], radii[0], radii[1], shape=shape)
  m[rr, cc] = True
  return m


def photos():
  """[(stem, uint8 RGB image, caption, phrases, masks)] of the sample."""
  import skimage.data
  from skimage.filters import threshold_otsu

  out = []
  horse = skimage.data.horse()                          # True = background
  img = np.repeat((horse * 255).astype(np.uint8)[..., None], 3, -1)
  out.append(("sk_horse", img, "A horse stands in profile on a white background.",
              ["A horse"], [~horse]))
  coins = skimage.data.coins()
  out.append(("sk_coins", np.repeat(coins[..., None], 3, -1),
              "Rows of coins lie on a dark tray.", ["coins"], [coins > threshold_otsu(coins)]))
  cam = skimage.data.camera()
  man = _largest_component(cam < 40)
  out.append(("sk_camera", np.repeat(cam[..., None], 3, -1),
              "A man operates a camera on a tripod in a field.", ["A man"], [man]))
  astro = skimage.data.astronaut()
  face = _ellipse(astro.shape[:2], (125, 220), (60, 45))
  flag = np.zeros(astro.shape[:2], bool)
  flag[0:180, 0:110] = True
  out.append(("sk_astronaut", astro, "A woman in a space suit smiles in front of a flag.",
              ["A woman", "a flag"], [face, flag]))
  return out


def grounded(caption: str, phrases) -> str:
  """GLaMM's answer format: each phrase wrapped as `<p> phrase </p> [SEG]` in the caption."""
  for p in phrases:
    caption = caption.replace(p, f"<p> {p} </p> [SEG]", 1)
  return caption


def write_sample(directory: str) -> tuple[str, str]:
  """Writes `directory/images/*.png` and `directory/annotations/val_gcg_coco_*_gt.json`.

  Returns (images dir, annotations dir). Idempotent; files are written atomically.
  """
  from PIL import Image
  from eval.gcg_output import encode_mask
  from pycocotools import mask as mask_utils

  img_dir = os.path.join(directory, "images")
  ann_dir = os.path.join(directory, "annotations")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(ann_dir, exist_ok=True)
  images, caps, anns = [], [], []
  for stem, img, caption, phrases, masks in photos():
    path = os.path.join(img_dir, f"{stem}.png")
    if not os.path.exists(path):   # pid-unique temporary: several processes may write at once
      tmp = f"{path}.tmp{os.getpid()}.png"
      Image.fromarray(img).save(tmp)
      os.replace(tmp, path)
    h, w = img.shape[:2]
    images.append({"id": stem, "file_name": f"{stem}.png", "height": h, "width": w})
    caps.append({"id": len(caps) + 1, "image_id": stem, "caption": caption, "labels": phrases})
    for m in masks:
      rle = encode_mask(m)
      coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
      anns.append({"id": len(anns) + 1, "image_id": stem, "segmentation": rle,
                   "area": int(mask_utils.area(coco)),
                   "bbox": [float(v) for v in mask_utils.toBbox(coco)], "iscrowd": 0,
                   "category_id": 1})
  for name, obj in ((f"{SPLIT}_gcg_coco_caption_gt.json",
                     {"images": images, "annotations": caps}),
                    (f"{SPLIT}_gcg_coco_mask_gt.json",
                     {"images": images, "annotations": anns,
                      "categories": [{"id": 1, "name": "object"}]})):
    tmp = os.path.join(ann_dir, f"{name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump(obj, f)
    os.replace(tmp, os.path.join(ann_dir, name))
  return img_dir, ann_dir


def tiny_model_and_tokenizer(directory: str, seed: int = 0):
  """A tokenizer trained on the sample's captions and a tiny random-weight GLaMM (CLIP at 336/14,
  so the LLM sees GLaMM's 24x24 = 576 visual tokens)."""
  from flax import nnx
  from eval.synthetic_tokenizer import train_tokenizer
  from models.clip.config import CLIPVisionConfig
  from models.glamm.config import GLaMMConfig
  from models.glamm.modeling import GLaMM
  from models.llama.config import LlamaConfig
  from models.sam.config import SamConfig

  captions = [grounded(c, p) for _, _, c, p, _ in photos()]
  tokenizer = train_tokenizer(os.path.join(directory, "tokenizer"), captions)
  cfg = GLaMMConfig(vision=CLIPVisionConfig.tiny(image_size=336),
                    llm=LlamaConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=1024),
                    sam=SamConfig.tiny())
  return GLaMM(cfg, rngs=nnx.Rngs(seed)), tokenizer
