"""eval/metrics.py, eval/grandf.py, eval/text_embedder.py on a hand-built GranD-f-format set whose
expected numbers are known by construction; METEOR/CIDEr against pycocoevalcap's COCOEvalCap as the
official script calls it (SPICE stubbed, one shared METEOR JVM per session)."""

import copy
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from _eval_helpers import import_transformers
from eval import grandf, metrics
from eval.gcg_output import encode_mask, prediction_record, write_prediction
from eval.text_embedder import BertMeanEmbedder, cosine_similarity

# pycocotools 2.0.11 decodes through a numpy-1 style __array__; harmless noise under numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# image id -> (height, width, [(label, (r0, r1, c0, c1))], captions). Caption-GT order is b, a, c;
# COCOeval sorts image ids (a, b, c).
SPEC = {
    "sa_b": (30, 40, [("the sky", (0, 10, 0, 40))], ["The sky is blue and clear."]),
    "sa_a": (40, 50, [("a man", (5, 25, 5, 25)), ("a red car", (10, 30, 30, 45))],
             ["A man is standing next to a red car.", "A person stands near a red car."]),
    "sa_c": (20, 25, [("a dog", (2, 12, 2, 12)), ("a tree", (10, 20, 15, 25))],
             ["A dog sits under a tree."]),
}
N_GT = 5


def _rect(h, w, box):
  m = np.zeros((h, w), np.uint8)
  r0, r1, c0, c1 = box
  m[r0:r1, c0:c1] = 1
  return m


def _gt():
  images, mask_anns, cap_anns = [], [], []
  for image_id, (h, w, objs, caps) in SPEC.items():
    images.append({"id": image_id, "height": h, "width": w, "file_name": image_id + ".jpg"})
    for label, box in objs:
      rle = encode_mask(_rect(h, w, box))
      mask_anns.append({"id": len(mask_anns) + 1, "image_id": image_id, "category_id": 1,
                        "segmentation": rle, "area": float(mask_utils.area(rle)),
                        "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    for cap in caps:
      cap_anns.append({"id": len(cap_anns) + 1, "image_id": image_id, "caption": cap,
                       "labels": [label for label, _ in objs]})
  mask_gt = {"images": images, "annotations": mask_anns, "categories": [{"id": 1, "name": "obj"}]}
  cap_gt = {"images": copy.deepcopy(images), "annotations": cap_anns}
  return cap_gt, mask_gt


def _write_gt_dir(gt_dir):
  """A GranDf annotations folder holding the val caption and mask GT of `_gt()`."""
  gt_dir.mkdir()
  for name, data in zip(("val_gcg_coco_caption_gt.json", "val_gcg_coco_mask_gt.json"), _gt()):
    with open(gt_dir / name, "w") as f:
      json.dump(data, f)
  return gt_dir


def _perfect_preds():
  """image_id -> (caption, phrases, masks [N,H,W])."""
  out = {}
  for image_id, (h, w, objs, caps) in SPEC.items():
    out[image_id] = (caps[0], [label for label, _ in objs],
                     np.stack([_rect(h, w, box) for _, box in objs]))
  return out


def _records(preds):
  return {i: prediction_record(i + ".jpg", c, p, m) for i, (c, p, m) in preds.items()}


class _NoSpice:
  def compute_score(self, gts, res):
    return 0.0, [0.0] * len(gts)

  def method(self):
    return "SPICE"


@pytest.fixture(scope="session")
def meteor():
  from pycocoevalcap.meteor.meteor import Meteor
  m = Meteor()  # one JVM (~10 s) for the whole session
  yield m
  del m


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  transformers = import_transformers()
  import torch
  d = tmp_path_factory.mktemp("tiny_bert")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
      {w for _, _, objs, _ in SPEC.values() for label, _ in objs for w in label.split()}
      | {"person", "cat", "road"}) + list("abcdefghijklmnopqrstuvwxyz")
  (d / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = transformers.BertTokenizer(str(d / "vocab.txt"))
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=37, max_position_embeddings=64))
  model.save_pretrained(str(d))
  tok.save_pretrained(str(d))
  return str(d)


@pytest.fixture(scope="module")
def embedder(bert_dir):
  return BertMeanEmbedder(bert_dir)


def _non_caption_metrics(preds, embedder):
  """AP50 / mIoU / recall without the Java caption scorers."""
  cap_gt, mask_gt = _gt()
  coco_cap = grandf.load_caption_gt(cap_gt)
  coco_mask = grandf.load_mask_gt(mask_gt)
  ids = [img["id"] for img in cap_gt["images"]]
  loaded = grandf.load_predictions(_records(preds), ids)
  dets, caps = grandf.coco_predictions(loaded, ids, coco_mask)
  coco_dt = metrics._load_res(coco_mask, dets) if dets else metrics._empty_res(coco_mask)
  coco_cap_dt = metrics._load_res(coco_cap, caps)
  return {"AP50": metrics.mask_ap(coco_mask, dets)["AP50"],
          "mIoU": metrics.mean_iou(coco_mask, coco_dt, ids),
          "recall": metrics.grounding_recall(coco_mask, coco_cap, coco_dt, coco_cap_dt, ids,
                                             embedder)}


def _ap50_if_max_recall(max_recall):
  """AP50 when every detection before the last recall step is a TP (precision 1 up to
  `max_recall`, nothing beyond): the fraction of COCO's 101 recall thresholds <= max_recall."""
  from pycocotools.cocoeval import Params
  return float(np.mean(Params(iouType="segm").recThrs <= max_recall))


# ------------------------------------------------------------------------------------------------


def test_perfect_predictions_end_to_end(meteor, embedder, tmp_path):
  cap_gt, mask_gt = _gt()
  records = _records(_perfect_preds())
  for r in records.values():
    write_prediction(str(tmp_path), r)
  out = metrics.evaluate_gcg(str(tmp_path), cap_gt, mask_gt, embedder, meteor=meteor)
  assert out["AP50"] == 1.0 and out["mAP"] == 1.0
  assert out["mIoU"] == 1.0 and out["recall"] == 1.0
  assert 0.5 < out["METEOR"] <= 1.0 and out["CIDEr"] > 1.0
  # The same from in-memory records, and from GT files on disk.
  for name, data in (("cap.json", cap_gt), ("mask.json", mask_gt)):
    with open(tmp_path / name, "w") as f:
      json.dump(data, f)
  out2 = metrics.evaluate_gcg(list(records.values()), str(tmp_path / "cap.json"),
                              str(tmp_path / "mask.json"), embedder, meteor=meteor)
  assert out2 == out


def test_caption_scores_equal_cocoevalcap(meteor, monkeypatch):
  import pycocoevalcap.eval as ev
  monkeypatch.setattr(ev, "Spice", _NoSpice)
  monkeypatch.setattr(ev, "Meteor", lambda: meteor)
  cap_gt, _ = _gt()
  results = [{"image_id": "sa_b", "caption": "A clear blue sky.", "labels": []},
             {"image_id": "sa_a", "caption": "A man, standing by the red car!", "labels": []},
             {"image_id": "sa_c", "caption": "a dog  under the tree", "labels": []}]
  coco = grandf.load_caption_gt(cap_gt)
  got = metrics.caption_scores(coco, results, meteor=meteor)
  # The official script: COCOEvalCap on loadRes, params['image_id'] = result image ids.
  res = coco.loadRes(copy.deepcopy(results))
  reference = ev.COCOEvalCap(coco, res)
  reference.params["image_id"] = res.getImgIds()
  reference.evaluate()
  assert got["METEOR"] == reference.eval["METEOR"]
  assert got["CIDEr"] == reference.eval["CIDEr"]
  assert 0.0 < got["METEOR"] < 1.0 and got["CIDEr"] > 0.0


def test_shifted_mask_gives_hand_computed_scores(embedder):
  preds = _perfect_preds()
  caption, phrases, masks = preds["sa_c"]
  masks = masks.copy()
  masks[1] = _rect(20, 25, (4, 14, 15, 25))  # "a tree" moved up 6 rows: IoU 40 / 160
  preds["sa_c"] = (caption, phrases, masks)
  out = _non_caption_metrics(preds, embedder)
  assert out["mIoU"] == pytest.approx((1 + 1 + (1 + 0.25) / 2) / 3, abs=1e-12)
  assert out["recall"] == 4 / N_GT
  # Detection order a1 a2 b1 c1 (TP) then c2 (FP at IoU 0.5): precision 1 up to recall 4/5.
  assert out["AP50"] == _ap50_if_max_recall(4 / N_GT)


def test_empty_prediction_for_one_image(embedder):
  preds = _perfect_preds()
  preds["sa_b"] = ("Something.", [], np.zeros((0, 30, 40), np.uint8))
  out = _non_caption_metrics(preds, embedder)
  assert out["mIoU"] == pytest.approx(2 / 3, abs=1e-12)
  assert out["recall"] == 4 / N_GT  # the missing label still counts as a positive
  assert out["AP50"] == _ap50_if_max_recall(4 / N_GT)
  # No masks anywhere: the reference crashes in loadRes; here AP is 0 and mIoU/recall are 0.
  nothing = {i: ("x", [], np.zeros((0, h, w), np.uint8)) for i, (h, w, _, _) in SPEC.items()}
  assert _non_caption_metrics(nothing, embedder) == {"AP50": 0.0, "mIoU": 0.0, "recall": 0.0}


def test_fewer_phrases_than_masks_zeroes_the_image(embedder):
  # sa_a: the first match (0, 0) is found, then the argmax (1, 1) falls outside the 2 x 1
  # similarity matrix; the reference's exception drops *both* matches of that image.
  preds = _perfect_preds()
  caption, phrases, masks = preds["sa_a"]
  preds["sa_a"] = (caption, phrases[:1], masks)
  out = _non_caption_metrics(preds, embedder)
  assert out["recall"] == 3 / N_GT
  assert out["mIoU"] == 1.0 and out["AP50"] == 1.0


def test_text_similarity_threshold_with_stub_embedder():
  vectors = {"the sky": [1.0, 0.0], "a man": [1.0, 0.0], "a red car": [0.0, 1.0],
             "a dog": [1.0, 1.0], "a tree": [1.0, -1.0], "ocean": [-1.0, 0.2],
             "a person": [0.6, 0.8]}
  preds = _perfect_preds()
  preds["sa_b"] = (preds["sa_b"][0], ["ocean"], preds["sa_b"][2])  # cos < 0 -> rejected
  preds["sa_a"] = (preds["sa_a"][0], ["a person", "a red car"], preds["sa_a"][2])  # cos 0.6 ok
  out = _non_caption_metrics(preds, lambda t: np.asarray(vectors[t], np.float32))
  assert out["recall"] == 4 / N_GT


def test_nan_quirks_of_the_reference():
  empty = np.zeros((4, 4), np.uint8)
  full = np.ones((4, 4), np.uint8)
  assert np.isnan(metrics.iou_matrix([empty], [empty])[0, 0])
  # A NaN (empty vs empty) makes np.max NaN, which stops the pairing before the perfect pair.
  assert metrics.image_miou([empty, full], [empty, full]) == 0.0
  assert metrics.image_miou([full, empty], [full]) == 1.0
  # The recall's rejection test `iou < 0.5` is False for NaN: the pair is accepted.
  assert metrics.greedy_recall_matches(np.array([[np.nan]]), np.array([[0.9]])) == 1
  assert metrics.greedy_recall_matches(np.array([[0.5]]), np.array([[0.5]])) == 1
  assert metrics.greedy_recall_matches(np.array([[0.49]]), np.array([[0.9]])) == 0
  assert metrics.greedy_recall_matches(np.zeros((2, 0)), np.zeros((2, 0))) == 0
  assert metrics.greedy_recall_matches(np.eye(2), np.ones((2, 1))) is None


def test_iou_matrix_by_hand():
  a = _rect(10, 10, (0, 5, 0, 5))   # 25 px
  b = _rect(10, 10, (0, 5, 2, 7))   # 25 px, overlap 15
  np.testing.assert_array_equal(metrics.iou_matrix([a, b], [b]), [[15 / 35], [1.0]])
  assert metrics.image_miou([a], [a, b]) == 1.0
  assert metrics.image_miou([], [a]) == 0.0


def test_bert_embedder_is_the_mean_of_the_last_hidden_state(bert_dir, embedder):
  transformers = import_transformers()
  import torch
  tok = transformers.AutoTokenizer.from_pretrained(bert_dir)
  model = transformers.AutoModel.from_pretrained(bert_dir).eval()
  with torch.no_grad():
    inputs = tok("a red car", return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 5  # [CLS] a red car [SEP]: all five are averaged
    expected = model(**inputs).last_hidden_state[0].mean(0).numpy()
  np.testing.assert_allclose(embedder("a red car"), expected, rtol=1e-6, atol=1e-6)
  assert embedder("a red car").dtype == np.float32


def test_cosine_similarity():
  assert cosine_similarity(np.array([3.0, 4.0], np.float32), np.array([6.0, 8.0], np.float32)) \
      == pytest.approx(1.0, abs=1e-7)
  assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
  assert cosine_similarity(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(2 ** -0.5)
  assert cosine_similarity(np.zeros(3, np.float32), np.ones(3, np.float32)) == 0.0


def test_encode_mask_matches_column_major_runs():
  rng = np.random.default_rng(0)
  m = (rng.random((7, 5)) > 0.6).astype(np.uint8)
  flat = m.T.reshape(-1)  # column-major
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  expected = mask_utils.frPyObjects({"size": [7, 5], "counts": counts}, 7, 5)
  assert encode_mask(m) == {"size": [7, 5], "counts": expected["counts"].decode()}
  np.testing.assert_array_equal(mask_utils.decode(encode_mask(m)), m)


def test_prediction_loading_layouts_and_errors(tmp_path, embedder):
  cap_gt, mask_gt = _gt()
  ids = [img["id"] for img in cap_gt["images"]]
  records = _records(_perfect_preds())
  nested = {i: {i: r} for i, r in records.items()}
  assert grandf.load_predictions(nested, ids) == grandf.load_predictions(records, ids)
  write_prediction(str(tmp_path), records["sa_a"])
  with pytest.raises(FileNotFoundError, match="sa_b"):
    grandf.load_predictions(str(tmp_path), ids)
  bad = copy.deepcopy(records)
  bad["sa_c"]["pred_masks"][0] = encode_mask(np.zeros((21, 25), np.uint8))
  loaded = grandf.load_predictions(bad, ids)
  with pytest.raises(ValueError, match=r"mask 0 of 'sa_c' has size \[21, 25\]"):
    grandf.coco_predictions(loaded, ids, grandf.load_mask_gt(mask_gt))
  no_recall = metrics.evaluate_gcg(records, cap_gt, mask_gt, embedder=None)
  assert no_recall["recall"] is None and "local" in no_recall["recall_unavailable"]
  assert no_recall["mIoU"] == 1.0
  broken = copy.deepcopy(mask_gt)
  del broken["annotations"][0]["iscrowd"]
  with pytest.raises(ValueError, match="iscrowd"):
    grandf.load_mask_gt(broken)
  assert os.path.exists(tmp_path / "sa_a.json")


def test_command_line_writes_the_numbers(tmp_path, bert_dir, meteor, monkeypatch):
  from eval import run_gcg_eval
  monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", lambda: meteor)  # reuse the JVM
  gt_dir = _write_gt_dir(tmp_path / "gt")
  for r in _records(_perfect_preds()).values():
    write_prediction(str(tmp_path / "pred"), r)
  run_gcg_eval.main(["--pred_dir", str(tmp_path / "pred"), "--gt_dir", str(gt_dir), "--split",
                     "val", "--bert_dir", bert_dir, "--out", str(tmp_path / "out")])
  with open(tmp_path / "out" / "gcg_val.json") as f:
    out = json.load(f)
  assert out["AP50"] == 1.0 and out["mIoU"] == 1.0 and out["recall"] == 1.0
  assert out["METEOR"] > 0.5 and out["split"] == "val"


def test_partial_run_scores_only_the_predicted_images(tmp_path, meteor):
  # A `--limit` run predicts some GT images: the default (the reference's) is an error naming the
  # first missing one; only_predicted scores the predicted ones, COCO AP included (the missing
  # images' 3 GT masks would otherwise count as misses: AP50 0.4 instead of 1).
  cap_gt, mask_gt = _gt()
  records = _records(_perfect_preds())
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="none of the 3 GT images"):
    metrics.evaluate_gcg(str(empty), cap_gt, mask_gt, None, meteor=meteor, only_predicted=True)
  write_prediction(str(tmp_path), records["sa_a"])
  with pytest.raises(FileNotFoundError, match="sa_b"):
    metrics.evaluate_gcg(str(tmp_path), cap_gt, mask_gt, None, meteor=meteor)
  out = metrics.evaluate_gcg(str(tmp_path), cap_gt, mask_gt, None, meteor=meteor,
                             only_predicted=True)
  assert (out["evaluated_images"], out["gt_images"]) == (1, 3)
  assert out["AP50"] == 1.0 and out["mIoU"] == 1.0 and out["METEOR"] > 0.5
  assert grandf.predicted_ids(records, ["sa_c", "x", "sa_a"]) == ["sa_c", "sa_a"]
  assert grandf.predicted_ids(list(records.values()), ["sa_b"]) == ["sa_b"]


def test_limit_run_reports_a_partial_score(tmp_path, meteor, monkeypatch, capsys):
  # What `python -m eval.gcg --limit N` does after predicting: score the predicted images only,
  # say so on stderr and in the summary table, and write the counts into metrics_{split}.json.
  from eval import run_gcg
  monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", lambda: meteor)  # reuse the JVM
  gt_dir = _write_gt_dir(tmp_path / "gt")
  out_dir = tmp_path / "run"
  write_prediction(str(out_dir / "predictions"), _records(_perfect_preds())["sa_c"])
  res = run_gcg.evaluate_and_report(str(out_dir), str(gt_dir), "val", {"images_per_second": 1.0},
                                    only_predicted=True)
  printed = capsys.readouterr()
  assert "metrics over 1 of 3 GT images" in printed.err
  assert "| images scored | 1 of 3 (partial run) |" in printed.out
  with open(out_dir / "metrics_val.json") as f:
    saved = json.load(f)
  assert saved["evaluated_images"] == res["evaluated_images"] == 1 and saved["AP50"] == 1.0
