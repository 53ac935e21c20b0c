"""GranD-f GCG evaluation files: ground truth, per-image predictions, and the COCO-format lists
that GLaMM's `eval/gcg/evaluate.py::main` builds from them (glamm.md §6.1-6.3).

Ground truth (`{split}_gcg_coco_mask_gt.json`, `{split}_gcg_coco_caption_gt.json`):
  mask GT: COCO instances; images[] {id: file stem, height, width}; annotations[] {id, image_id,
    category_id 1, segmentation: compressed RLE, area, iscrowd, bbox}; categories [{id: 1}].
  caption GT: images[] (the evaluated image list, in this order); annotations[] {id, image_id,
    caption, labels: [phrase, ...]}.
Predictions: one `{image_id}.json` per GT image, `{"image_id", "caption", "phrases",
  "pred_masks": [RLE]}` (or the same dict nested under one key, which the reference also accepts).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Mapping, Sequence

from pycocotools.coco import COCO


def gt_paths(gt_dir: str, split: str) -> tuple[str, str]:
  """(caption GT, mask GT) paths of a split, as `run_evaluation.sh` lays them out."""
  if split not in ("val", "test"):
    raise ValueError(f"GranD-f GCG has only 'val' and 'test' splits, got {split!r}")
  return (os.path.join(gt_dir, f"{split}_gcg_coco_caption_gt.json"),
          os.path.join(gt_dir, f"{split}_gcg_coco_mask_gt.json"))


def _load_json(path_or_dict, what: str) -> tuple[dict, str]:
  if isinstance(path_or_dict, Mapping):
    return copy.deepcopy(dict(path_or_dict)), f"<{what} dict>"
  if not os.path.exists(path_or_dict):
    raise FileNotFoundError(f"{what}: no such file {path_or_dict}")
  with open(path_or_dict) as f:
    return json.load(f), str(path_or_dict)


def _require(items, keys: Sequence[str], where: str) -> None:
  for i, item in enumerate(items):
    for k in keys:
      if k not in item:
        raise ValueError(f"{where}[{i}] lacks the key {k!r} (has {sorted(item)})")


def make_coco(dataset: dict) -> COCO:
  """A pycocotools COCO object over an in-memory dataset, without the loading chatter."""
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def load_mask_gt(path_or_dict) -> COCO:
  data, name = _load_json(path_or_dict, "mask GT")
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise ValueError(f"{name}: missing top-level key {key!r}")
  _require(data["images"], ("id", "height", "width"), f"{name}: images")
  _require(data["annotations"], ("id", "image_id", "category_id", "segmentation", "area",
                                 "iscrowd"), f"{name}: annotations")
  return make_coco(data)


def load_caption_gt(path_or_dict) -> COCO:
  data, name = _load_json(path_or_dict, "caption GT")
  for key in ("images", "annotations"):
    if key not in data:
      raise ValueError(f"{name}: missing top-level key {key!r}")
  _require(data["images"], ("id",), f"{name}: images")
  _require(data["annotations"], ("id", "image_id", "caption"), f"{name}: annotations")
  return make_coco(data)


def _unnest(pred: dict) -> dict:
  """The reference reads `pred[first key]` and falls back to `pred` when that has no caption."""
  if pred:
    first = pred[next(iter(pred))]
    if isinstance(first, dict) and "caption" in first and "phrases" in first:
      return first
  return pred


def predicted_ids(pred_dir_or_records, image_ids: Sequence[str]) -> list[str]:
  """The ids of `image_ids` (in that order) that have a prediction: a `{image_id}.json` file in a
  directory, a key of a mapping, or a record's "image_id" in a list."""
  if isinstance(pred_dir_or_records, (str, os.PathLike)):
    have = {f[:-len(".json")] for f in os.listdir(pred_dir_or_records) if f.endswith(".json")}
  elif isinstance(pred_dir_or_records, Mapping):
    have = set(pred_dir_or_records)
  else:
    have = {r["image_id"] for r in pred_dir_or_records}
  return [i for i in image_ids if i in have]


def load_predictions(pred_dir_or_records, image_ids: Sequence[str]) -> dict[str, dict]:
  """image_id -> {"caption", "labels", "pred_masks"} for every evaluated image.

  `pred_dir_or_records`: a directory of `{image_id}.json` files, a mapping image_id -> record,
  or a list of records carrying "image_id". A missing image is an error, as in the reference.
  """
  if isinstance(pred_dir_or_records, (str, os.PathLike)):
    records = {}
    for image_id in image_ids:
      path = os.path.join(pred_dir_or_records, f"{image_id}.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"predictions: no file for GT image {image_id!r} ({path})")
      with open(path) as f:
        records[image_id] = json.load(f)
  elif isinstance(pred_dir_or_records, Mapping):
    records = dict(pred_dir_or_records)
  else:
    records = {}
    for i, r in enumerate(pred_dir_or_records):
      if "image_id" not in r:
        raise ValueError(f"predictions: record {i} has no 'image_id'")
      records[r["image_id"]] = r
  out = {}
  for image_id in image_ids:
    if image_id not in records:
      raise KeyError(f"predictions: no record for GT image {image_id!r}")
    pred = _unnest(records[image_id])
    for key in ("caption", "phrases", "pred_masks"):
      if key not in pred:
        raise ValueError(f"predictions: record of {image_id!r} lacks {key!r} (has {sorted(pred)})")
    out[image_id] = {"caption": pred["caption"], "labels": list(pred["phrases"]),
                     "pred_masks": list(pred["pred_masks"])}
  return out


def coco_predictions(preds: Mapping[str, dict], image_ids: Sequence[str],
                     coco_mask_gt: COCO) -> tuple[list[dict], list[dict]]:
  """(mask detections, caption results) in the reference's order: images in caption-GT order,
  masks in [SEG] order, every score 1.0 (so COCOeval's stable sort keeps this order)."""
  detections, captions = [], []
  for image_id in image_ids:
    pred = preds[image_id]
    img = coco_mask_gt.imgs.get(image_id)
    for j, rle in enumerate(pred["pred_masks"]):
      if img is None:
        raise ValueError(f"predictions: image {image_id!r} has masks but is not in the mask GT")
      if list(rle.get("size", [])) != [img["height"], img["width"]]:
        raise ValueError(f"predictions: mask {j} of {image_id!r} has size {rle.get('size')}, the "
                         f"GT image is {[img['height'], img['width']]}")
      detections.append({"image_id": image_id, "category_id": 1, "segmentation": rle,
                         "score": 1.0})
    captions.append({"image_id": image_id, "caption": pred["caption"], "labels": pred["labels"]})
  return detections, captions
