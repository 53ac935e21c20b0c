"""Synthetic scenes (eval/scenes.py) and their tokenizer (eval/synthetic_tokenizer.py).

What is checked: scenes are a pure function of (seed, split, index), on disk too; every mask is
exactly the visible pixels painted with its object's colours; geometry matches the size class;
captions parse with GLaMM's post-processing into the phrases, and their relations agree with the
objects' centroids measured independently; the GranD-f readers load the written files and COCOeval
scores the ground truth against itself as perfect; an interrupted write resumes to the same files;
the tokenizer loads like GLaMM's, with the added tokens after the SentencePiece pieces.
"""

from __future__ import annotations

import filecmp
import json
import os
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from eval import grandf, scenes
from eval.gcg_output import parse_gcg_text
from eval.metrics import mask_ap, mean_iou
from eval.prompt import gcg_prompt_text, tokenize_with_image
from eval.tokenizer import GLAMM_ADDED_TOKENS, load_tokenizer, seg_token_id

COUNTS = {"train": 4, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("scenes"))
  scenes.write_dataset(out, COUNTS, seed=7, progress=False)
  return out


def _norm(text: str) -> str:
  """GLaMM's parse leaves ' ,' where '[SEG],' was; compare captions without that space."""
  return re.sub(r"\s+([,.])", r"\1", text)


def test_scene_is_a_function_of_seed_split_index():
  a, b = scenes.render_scene(3, "val", 5), scenes.render_scene(3, "val", 5)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.masks, b.masks)
  assert a.grounded_caption == b.grounded_caption
  for other in (scenes.render_scene(3, "val", 6), scenes.render_scene(4, "val", 5),
                scenes.render_scene(3, "test", 5)):
    assert not np.array_equal(a.image, other.image)


@pytest.mark.parametrize("index", range(12))
def test_masks_are_the_painted_visible_pixels(index):
  s = scenes.render_scene(11, "train", index)
  n = len(s.objects)
  assert 1 <= n <= scenes.MAX_OBJECTS
  assert s.image.shape == (336, 336, 3) and s.image.dtype == np.uint8
  assert s.masks.shape == (n, 336, 336)
  assert np.all(s.masks.sum(axis=0) <= 1), "masks of two objects overlap"
  assert len({(o.colour, o.shape) for o in s.objects}) == n, "a phrase names two objects"
  for obj, m in zip(s.objects, s.masks):
    full = scenes.shape_mask(obj.shape, obj.centre, obj.radius, obj.angle)
    assert m.any() and not np.any(m & ~full)
    assert m.sum() >= scenes.MIN_VISIBLE * full.sum() - 1
    lo, hi = scenes.SIZES[obj.size]
    assert lo <= obj.radius <= hi
    rows, cols = np.nonzero(full)
    assert max(np.ptp(rows), np.ptp(cols)) <= 2 * obj.radius + 1
    # Every visible pixel carries one of the object's two colours, exactly.
    pix = s.image[m].astype(int)
    ok = np.all(pix == obj.rgb, axis=1) | np.all(pix == obj.rgb2, axis=1)
    assert ok.all(), f"{obj.phrase}: {np.sum(~ok)} mask pixels not painted with its colours"
    if obj.texture != "plain" and m.sum() > 400:
      assert np.all(pix == obj.rgb2, axis=1).any(), f"{obj.phrase}: texture not drawn"


def test_tiny_objects_span_few_clip_patches():
  seen = 0
  for index in range(40):
    s = scenes.render_scene(5, "test", index)
    for obj, m in zip(s.objects, s.masks):
      if obj.size == "tiny":
        rows, cols = np.nonzero(m)
        patches = len({(r // 14, c // 14) for r, c in zip(rows, cols)})
        assert patches <= 9, f"tiny {obj.phrase} covers {patches} patches"
        seen += 1
  assert seen >= 5


@pytest.mark.parametrize("index", range(10))
def test_captions_parse_into_phrases_and_true_relations(index):
  s = scenes.render_scene(2, "val", index)
  caption, phrases = parse_gcg_text("USER: describe ASSISTANT: " + s.grounded_caption)
  assert phrases == s.phrases
  assert _norm(caption) == s.caption
  assert s.caption.count(" a ") + s.caption.startswith("a ") >= len(s.objects)
  # Relations read back from the text agree with the full shapes' pixel centroids.
  rels = re.findall(r"\[SEG\],? (?:which is )?(to the left of|to the right of|above|below) <p>",
                    s.grounded_caption)
  assert len(rels) == len(s.objects) - 1
  cents = []
  for obj in s.objects:
    rows, cols = np.nonzero(scenes.shape_mask(obj.shape, obj.centre, obj.radius, obj.angle))
    cents.append((rows.mean(), cols.mean()))
  for i, rel in enumerate(rels):
    dy = cents[i][0] - cents[i + 1][0]
    dx = cents[i][1] - cents[i + 1][1]
    if abs(abs(dx) - abs(dy)) < 4:
      continue    # too close to the diagonal for centroids to settle the axis
    if abs(dx) > abs(dy):
      assert rel == ("to the left of" if dx < 0 else "to the right of"), (rel, dx, dy)
    else:
      assert rel == ("above" if dy < 0 else "below"), (rel, dx, dy)
  if len(s.objects) == 1:
    assert any(r in s.caption for r in scenes.REGIONS)


def test_grandf_readers_load_the_layout(dataset):
  for split in ("val", "test"):
    cap_path, mask_path = grandf.gt_paths(os.path.join(dataset, "annotations", "val_test"), split)
    cap, msk = grandf.load_caption_gt(cap_path), grandf.load_mask_gt(mask_path)
    ids = [im["id"] for im in cap.dataset["images"]]
    assert ids == [scenes.image_stem(split, i) for i in range(COUNTS[split])]
    assert sorted(msk.getImgIds()) == sorted(ids)
    for i, image_id in enumerate(ids):
      assert os.path.exists(os.path.join(dataset, "GranDf_HA_images", "val_test",
                                         f"{image_id}.jpg"))
      s = scenes.render_scene(7, split, i)
      (ann,) = cap.imgToAnns[image_id]
      assert ann["labels"] == s.phrases and ann["caption"] == s.caption
      masks = msk.imgToAnns[image_id]
      assert len(masks) == len(s.objects)
      for j, a in enumerate(masks):   # file order = phrase order
        np.testing.assert_array_equal(msk.annToMask(a).astype(bool), s.masks[j])
        assert a["attributes"]["size"] == s.objects[j].size
        assert a["area"] == int(s.masks[j].sum())
    # The GT scored against itself through the metric code is perfect.
    dets = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"],
             "score": 1.0} for a in msk.dataset["annotations"]]
    assert mask_ap(msk, dets)["AP50"] == pytest.approx(1.0)
    assert mean_iou(msk, msk, ids) == pytest.approx(1.0)
  # The train split uses the same two-file format.
  cap_path, mask_path = scenes.annotation_paths(dataset, "train")
  assert len(grandf.load_mask_gt(mask_path).dataset["images"]) == COUNTS["train"]
  with open(os.path.join(dataset, "dataset.json")) as f:
    meta = json.load(f)
  assert meta["complete"] and meta["seed"] == 7 and meta["counts"] == COUNTS


def test_jpeg_is_close_to_the_rendered_image(dataset):
  from eval.preprocess import load_image
  s = scenes.render_scene(7, "test", 1)
  img = load_image(os.path.join(dataset, "GranDf_HA_images", "val_test", "syn_test_000001.jpg"))
  assert np.abs(img.astype(int) - s.image.astype(int)).mean() < 4


def test_interrupted_write_resumes_to_identical_files(dataset, tmp_path):
  out = str(tmp_path / "again")
  scenes.write_dataset(out, {"val": 3}, seed=7, progress=False, tokenizer=False)
  # Simulate a kill: one image finished without its record, one record lost, a temp file left.
  os.remove(os.path.join(out, ".parts", "val", "syn_val_000001.json"))
  os.remove(os.path.join(out, ".parts", "val", "syn_val_000002.json"))
  os.remove(os.path.join(out, "GranDf_HA_images", "val_test", "syn_val_000002.jpg"))
  with open(os.path.join(out, "GranDf_HA_images", "val_test", "syn_val_000002.jpg.tmp1"), "w"):
    pass
  os.remove(scenes.annotation_paths(out, "val")[0])
  scenes.write_dataset(out, {"val": 3}, seed=7, progress=False, tokenizer=False)
  assert sorted(os.listdir(os.path.join(out, "GranDf_HA_images", "val_test"))) == [
      f"syn_val_{i:06d}.jpg" for i in range(3)]
  for a, b in zip(scenes.annotation_paths(out, "val"), scenes.annotation_paths(dataset, "val")):
    assert filecmp.cmp(a, b, shallow=False)
  for i in range(3):
    name = f"syn_val_{i:06d}.jpg"
    assert filecmp.cmp(os.path.join(out, "GranDf_HA_images", "val_test", name),
                       os.path.join(dataset, "GranDf_HA_images", "val_test", name), shallow=False)
  with pytest.raises(ValueError, match="seed 7"):
    scenes.write_dataset(out, {"val": 3}, seed=8, progress=False, tokenizer=False)


def test_tokenizer_is_the_same_for_every_dataset(dataset, tmp_path):
  from eval.synthetic_tokenizer import train_tokenizer
  train_tokenizer(str(tmp_path / "tok"))
  for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json",
               "tokenizer_config.json"):
    assert filecmp.cmp(str(tmp_path / "tok" / name), os.path.join(dataset, "tokenizer", name),
                       shallow=False), name


def test_tokenizer_loads_like_glamms(dataset):
  tok = load_tokenizer(os.path.join(dataset, "tokenizer"))
  size = tok.sp_size
  assert [tok.token_to_id(t) for t in GLAMM_ADDED_TOKENS] == list(range(size, size + 7))
  assert seg_token_id(tok) == size + 4 and len(tok) == size + 7
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
  assert tok.token_to_id("<0x0A>") > 2      # byte fallback: "\n" is a byte piece, as in LLaMA
  prompt = gcg_prompt_text()
  p_ids = tokenize_with_image(prompt, tok)
  assert tok.unk_id not in p_ids
  for i in range(COUNTS["train"]):
    s = scenes.render_scene(7, "train", i)
    answer = tok.encode(s.grounded_caption, add_special_tokens=False)
    assert tok.unk_id not in answer
    # Prompt ids + answer ids = the ids of the whole llava_v1 conversation.
    assert tokenize_with_image(prompt + " " + s.grounded_caption, tok) == p_ids + answer
    assert answer.count(seg_token_id(tok)) == len(s.objects)
    caption, phrases = parse_gcg_text(tok.decode([t for t in p_ids if t >= 0] + answer + [2]))
    assert phrases == s.phrases and _norm(caption) == s.caption
