"""GranD-f GCG metrics as GLaMM's `eval/gcg/evaluate.py` computes them (glamm.md §6.4).

1. Mask AP50: pycocotools `COCOeval(gt, dt, "segm")`, `params.catIds = [1]`, defaults otherwise;
   AP50 = `stats[1]` (IoU 0.50, area all, maxDets 100). Detections all have score 1.0, so ties
   keep the order of `grandf.coco_predictions` (caption-GT image order, then [SEG] order).
2. METEOR and CIDEr: `COCOEvalCap.evaluate` restricted to those two scorers: PTB tokenisation
   (Stanford CoreNLP, lower-cased, punctuation removed) of all GT captions of each image and of the
   predicted caption, then `Meteor().compute_score` and `Cider().compute_score` over the images of
   the caption results (`loadRes(...).getImgIds()`). CIDEr's document frequencies come from the
   evaluated references. BLEU/ROUGE/SPICE are not computed (SPICE needs a download).
3. mIoU: per image, IoU matrix (pred x GT) of the decoded masks, IoU = |A and B| / |A or B| (0/0 is
   NaN, as numpy makes it); repeatedly take the first global argmax, record it, delete its row and
   column, until the matrix is empty or its max is not > 0 (a NaN max also stops). Image score =
   mean of the recorded values or 0; result = mean over the caption-GT images.
4. Recall: per image, IoU matrix (GT masks x predicted masks) and text-similarity matrix (GT labels
   x predicted phrases, cosine of sentence vectors); repeatedly take the first argmax of the IoU
   matrix; stop if its IoU < 0.5 or its similarity < 0.5, else count a true positive and zero its
   row and column in both matrices. recall = sum(TP) / sum(number of GT labels). Where the
   reference raises inside its per-image `try` (the argmax falls outside the similarity matrix
   because masks and phrases differ in number, an image without a caption annotation, ...) the
   image adds no true positives; whether it still adds its GT count follows the reference: the
   count is added unless the failure happens while reading the caption annotations.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval import grandf
from eval.text_embedder import MISSING_EMBEDDER_MESSAGE, TextEmbedder, cosine_similarity


# ------------------------------------------------------------------------------------------------
# Masks.


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
  """uint8 [H,W] of a compressed RLE (the GranD-f format); polygons/uncompressed RLE converted."""
  if isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
    return mask_utils.decode(segm)
  if isinstance(segm, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  else:
    rle = mask_utils.frPyObjects(segm, height, width)
  return mask_utils.decode(rle)


def iou_matrix(masks_a: Sequence[np.ndarray], masks_b: Sequence[np.ndarray]) -> np.ndarray:
  """float64 [len(a), len(b)] of |A and B| / |A or B| (NaN where both masks are empty).

  Equal to the reference's `np.sum(logical_and) / np.sum(logical_or)`: the pixel counts are
  exact in float64 and the division is the same IEEE division.
  """
  out = np.zeros((len(masks_a), len(masks_b)))
  if not len(masks_a) or not len(masks_b):
    return out
  shapes = {np.shape(m) for m in list(masks_a) + list(masks_b)}
  if len(shapes) != 1:
    raise ValueError(f"iou_matrix: masks of different shapes {sorted(shapes)}")
  a = np.stack([np.asarray(m, bool).reshape(-1) for m in masks_a]).astype(np.float64)
  b = np.stack([np.asarray(m, bool).reshape(-1) for m in masks_b]).astype(np.float64)
  inter = a @ b.T
  union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / union


def image_miou(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> float:
  """The reference's `compute_miou` for one image (greedy one-to-one pairing)."""
  ious = iou_matrix(pred_masks, gt_masks)
  paired = []
  while ious.size > 0 and np.max(ious) > 0:
    r, c = np.unravel_index(np.argmax(ious), ious.shape)
    paired.append(ious[r, c])
    ious = np.delete(np.delete(ious, r, axis=0), c, axis=1)
  return float(np.mean(paired)) if paired else 0.0


def _image_anns(coco: COCO, image_id) -> list[dict]:
  """Annotations of one image in file order (the reference scans `coco.anns.values()`)."""
  return [ann for ann in coco.anns.values() if ann["image_id"] == image_id]


def _masks_of(coco: COCO, image_id) -> list[np.ndarray]:
  img = coco.imgs.get(image_id, {})
  return [decode_segmentation(a["segmentation"], img.get("height"), img.get("width"))
          for a in _image_anns(coco, image_id) if "segmentation" in a]


def _load_res(coco_gt: COCO, results: list[dict]) -> COCO:
  with contextlib.redirect_stdout(io.StringIO()):
    return coco_gt.loadRes(copy.deepcopy(results))


def _empty_res(coco_gt: COCO) -> COCO:
  """What `loadRes` would give for an empty result list (it crashes on one instead)."""
  return grandf.make_coco({"images": list(coco_gt.dataset["images"]),
                           "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                           "annotations": []})


def mask_ap(coco_mask_gt: COCO, detections: list[dict], verbose: bool = False,
            image_ids: Sequence | None = None) -> dict[str, float]:
  """{"mAP": stats[0], "AP50": stats[1]} of COCOeval segm with catIds [1], over every GT image
  or only `image_ids`.

  The reference crashes when no image has any mask (`loadRes` indexes the first result); here
  that case evaluates an empty detection set (AP 0).
  """
  coco_dt = _load_res(coco_mask_gt, detections) if detections else _empty_res(coco_mask_gt)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ev = COCOeval(coco_mask_gt, coco_dt, "segm")
    ev.params.catIds = [1]
    if image_ids is not None:
      ev.params.imgIds = list(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  if verbose:
    print(out.getvalue())
  return {"mAP": float(ev.stats[0]), "AP50": float(ev.stats[1])}


def mean_iou(coco_mask_gt: COCO, coco_dt: COCO, image_ids: Sequence) -> float:
  """The reference's `evaluate_mask_miou`: mean over `image_ids` of `image_miou`."""
  mious = [image_miou(_masks_of(coco_dt, i), _masks_of(coco_mask_gt, i)) for i in image_ids]
  return float(np.mean(mious)) if mious else 0.0


# ------------------------------------------------------------------------------------------------
# Grounding recall.


def greedy_recall_matches(ious: np.ndarray, text_sims: np.ndarray, iou_threshold: float = 0.5,
                          text_sim_threshold: float = 0.5) -> int | None:
  """Number of accepted (GT, pred) pairs of one image, or None where the reference raises
  (its argmax falls outside `text_sims`), which makes that image count zero true positives.

  ious: float64 [n_gt_masks, n_pred_masks]; text_sims: [n_gt_labels, n_pred_phrases].
  """
  ious = np.array(ious, np.float64)
  text_sims = np.array(text_sims, np.float64)
  matches = 0
  while ious.size > 0:
    r, c = np.unravel_index(np.argmax(ious), ious.shape)
    if r >= text_sims.shape[0] or c >= text_sims.shape[1]:
      return None
    # Written as the reference's rejection test: NaN IoUs are *accepted*.
    if ious[r, c] < iou_threshold or text_sims[r, c] < text_sim_threshold:
      break
    matches += 1
    ious[r, :] = 0
    ious[:, c] = 0
    text_sims[r, :] = 0
    text_sims[:, c] = 0
  return matches


def grounding_recall(coco_mask_gt: COCO, coco_cap_gt: COCO, coco_dt: COCO, coco_cap_dt: COCO,
                     image_ids: Sequence, embedder: TextEmbedder, iou_threshold: float = 0.5,
                     text_sim_threshold: float = 0.5) -> float:
  """The reference's `evaluate_recall_with_mapping`."""
  true_positives = 0
  actual_positives = 0
  for image_id in image_ids:
    gt_caps = _image_anns(coco_cap_gt, image_id)
    dt_caps = _image_anns(coco_cap_dt, image_id)
    if not gt_caps or not dt_caps or "labels" not in gt_caps[0] or "labels" not in dt_caps[0]:
      continue  # the reference fails before counting this image's labels
    gt_labels, dt_labels = gt_caps[0]["labels"], dt_caps[0]["labels"]
    actual_positives += len(gt_labels)
    try:
      ious = iou_matrix(_masks_of(coco_mask_gt, image_id), _masks_of(coco_dt, image_id))
    except ValueError:
      continue  # masks of different sizes: the reference's try/except swallows it
    # Unlike the reference, an embedder failure is raised, not swallowed into a silent zero.
    gt_vecs = [embedder(t) for t in gt_labels]
    dt_vecs = [embedder(t) for t in dt_labels]
    sims = np.zeros((len(gt_labels), len(dt_labels)))
    for i, u in enumerate(gt_vecs):
      for j, v in enumerate(dt_vecs):
        sims[i, j] = cosine_similarity(u, v)
    matches = greedy_recall_matches(ious, sims, iou_threshold, text_sim_threshold)
    true_positives += matches or 0
  return true_positives / actual_positives if actual_positives > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# Captions.


def caption_scores(coco_cap_gt: COCO, caption_results: list[dict], meteor=None) -> dict[str, float]:
  """{"METEOR", "CIDEr"} as `COCOEvalCap(coco_cap_gt, loadRes(results)).evaluate()` gives them.

  meteor: a `pycocoevalcap.meteor.meteor.Meteor` to reuse (each one starts a JVM, ~10 s); by
  default one is started and stopped here.
  """
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  coco_res = _load_res(coco_cap_gt, caption_results)
  image_ids = coco_res.getImgIds()
  gts = {i: coco_cap_gt.imgToAnns[i] for i in image_ids}
  res = {i: coco_res.imgToAnns[i] for i in image_ids}
  tokenizer = PTBTokenizer()
  gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
  own_meteor = meteor is None
  if own_meteor:
    meteor = Meteor()
  try:
    meteor_score, _ = meteor.compute_score(gts, res)
  finally:
    if own_meteor:
      del meteor
  cider_score, _ = Cider().compute_score(gts, res)
  return {"METEOR": float(meteor_score), "CIDEr": float(cider_score)}


# ------------------------------------------------------------------------------------------------


def evaluate_gcg(pred_dir_or_records, gt_caption_json, gt_mask_json,
                 embedder: TextEmbedder | None, meteor=None, iou_threshold: float = 0.5,
                 text_sim_threshold: float = 0.5, verbose: bool = False,
                 only_predicted: bool = False) -> dict:
  """The five GCG numbers: {"AP50", "METEOR", "CIDEr", "mIoU", "recall"} (plus "mAP",
  "evaluated_images" and "gt_images").

  pred_dir_or_records: prediction directory, {image_id: record} or a list of records.
  gt_caption_json / gt_mask_json: paths (or already-parsed dicts) of the GranD-f GT files.
  embedder: str -> float32 [D] sentence vector for the recall (see `text_embedder`). Without
    one, "recall" is None and "recall_unavailable" gives the reason (never a silent 0).
  meteor: an optional shared `Meteor()` instance.
  only_predicted: score only the GT images that have a prediction (a partial run, e.g.
    `--limit`), every metric restricted to them; by default a missing prediction is an error, as
    in the reference.
  """
  coco_cap_gt = grandf.load_caption_gt(gt_caption_json)
  coco_mask_gt = grandf.load_mask_gt(gt_mask_json)
  all_ids = [img["id"] for img in coco_cap_gt.dataset["images"]]
  image_ids = grandf.predicted_ids(pred_dir_or_records, all_ids) if only_predicted else all_ids
  if not image_ids:
    raise ValueError(f"predictions: none of the {len(all_ids)} GT images has a prediction")
  preds = grandf.load_predictions(pred_dir_or_records, image_ids)
  detections, captions = grandf.coco_predictions(preds, image_ids, coco_mask_gt)

  results: dict = {"evaluated_images": len(image_ids), "gt_images": len(all_ids)}
  results.update(mask_ap(coco_mask_gt, detections, verbose=verbose,
                         image_ids=image_ids if only_predicted else None))
  results.update(caption_scores(coco_cap_gt, captions, meteor=meteor))
  coco_dt = _load_res(coco_mask_gt, detections) if detections else _empty_res(coco_mask_gt)
  coco_cap_dt = _load_res(coco_cap_gt, captions)
  results["mIoU"] = mean_iou(coco_mask_gt, coco_dt, image_ids)
  if embedder is None:
    results["recall"] = None
    results["recall_unavailable"] = MISSING_EMBEDDER_MESSAGE
  else:
    results["recall"] = grounding_recall(coco_mask_gt, coco_cap_gt, coco_dt, coco_cap_dt,
                                         image_ids, embedder, iou_threshold, text_sim_threshold)
  if verbose:
    print(" ".join(f"{k}: {v:.3f}" for k, v in results.items() if isinstance(v, float)))
  return results
