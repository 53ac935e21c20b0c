"""Training a GLaMM-architecture model on the synthetic scenes (eval/train_synthetic.py).

What is checked: the JAX losses equal GLaMM's PyTorch formulas (`model/GLaMM.py`:
`compute_sigmoid_cross_entropy`, `calculate_dice_loss`, their per-batch normalisation, and the HF
CE with ignored prompt labels), re-implemented here in torch; a training example puts the [SEG]
state indices, answer targets, visual slots and masks where GLaMM's training puts them; batches
are a function of (seed, step); a few optax steps on the micro model lower the loss; a run stopped
at a checkpoint and restarted reaches bit-for-bit the state and log of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from pycocotools import mask as mask_utils

from eval import scenes
from eval.glamm_losses import mask_losses, token_cross_entropy
from eval.prompt import build_gcg_prompt
from eval.preprocess import clip_preprocess, load_image, sam_preprocess
from eval.synthetic_data import (SyntheticGCGData, clip_normalize, clip_resize_crop,
                                 prefetch_batches, sam_normalize, sam_resize_pad, step_indices)
from eval.tokenizer import load_tokenizer, seg_token_id
from eval.train_synthetic import SyntheticTrainConfig, _override, evaluate, train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("syn"))
  scenes.write_dataset(out, {"train": 6, "val": 2}, seed=1, progress=False)
  return out


def _torch_glamm_mask_losses(pred, gt, counts):
  """GLaMM's `_compute_loss_components` mask part, per image, in torch (weights 1)."""
  bce_total, dice_total, num = 0.0, 0.0, 0
  for p, g, n in zip(pred, gt, counts):
    p, g = p[:n], g[:n]
    bce = F.binary_cross_entropy_with_logits(p, g, reduction="none").flatten(1, 2).mean(1)
    bce_total += bce.sum() / (n + 1e-8) * n
    s = p.sigmoid().flatten(1, 2)
    gg = g.flatten(1, 2)
    inter = 2 * (s / 1000 * gg).sum(-1)
    union = (s / 1000).sum(-1) + (gg / 1000).sum(-1)
    dice = (1 - (inter + 1e-6) / (union + 1e-6)).sum() / (n + 1e-8)
    dice_total += dice * n
    num += n
  return bce_total / (num + 1e-8), dice_total / (num + 1e-8)


def test_losses_match_glamms_torch_formulas():
  rng = np.random.default_rng(0)
  pred = rng.normal(0, 3, (3, 4, 12, 10)).astype(np.float32)
  gt = (rng.random((3, 4, 12, 10)) < 0.3).astype(np.float32)
  counts = [4, 1, 2]
  valid = np.arange(4)[None, :] < np.asarray(counts)[:, None]
  bce, dice = mask_losses(pred, gt, valid)
  tb, td = _torch_glamm_mask_losses(torch.tensor(pred), torch.tensor(gt), counts)
  np.testing.assert_allclose(float(bce), float(tb), rtol=1e-5)
  np.testing.assert_allclose(float(dice), float(td), rtol=1e-5)

  logits = rng.normal(0, 2, (2, 7, 11)).astype(np.float32)
  ids = rng.integers(0, 11, (2, 7))
  weight = np.zeros((2, 7), np.float32)
  weight[0, 3:6] = 1
  weight[1, 5:] = 1
  labels = np.where(weight > 0, ids, -100)   # HF: label t+1 scored at position t
  ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 11), torch.tensor(labels).reshape(-1),
                        ignore_index=-100)
  np.testing.assert_allclose(float(token_cross_entropy(logits, ids, weight)), float(ref),
                             rtol=1e-5)


def test_example_layout(data_root):
  tok = load_tokenizer(os.path.join(data_root, "tokenizer"))
  data = SyntheticGCGData(data_root, "train", tok, clip_size=56, sam_size=96,
                          num_visual_tokens=16, max_answer_tokens=112)
  prompt = build_gcg_prompt(tok, 16, buckets=None)
  p = len(prompt.ids)
  for i in range(len(data)):
    ex = data.example(i)
    s = scenes.render_scene(1, "train", i)
    n = len(s.objects)
    answer = tok.encode(s.grounded_caption, add_special_tokens=False) + [tok.eos_id]
    np.testing.assert_array_equal(ex["input_ids"][:p], prompt.ids)
    np.testing.assert_array_equal(ex["input_ids"][p:p + len(answer)], answer)
    assert np.all(ex["input_ids"][p + len(answer):] == tok.pad_id)
    assert ex["visual_mask"].sum() == 16 and np.array_equal(ex["visual_mask"][:p],
                                                            prompt.visual_mask)
    # Weighted positions predict exactly the answer (incl. </s>), starting at "ASSISTANT:"'s ":".
    pos = np.flatnonzero(ex["loss_weight"])
    assert pos[0] == p - 1 and list(ex["targets"][pos]) == answer
    # [SEG] states: the token right before each [SEG], in [SEG] order.
    assert ex["seg_valid"].sum() == n
    seg = ex["seg_index"][:n]
    assert np.all(ex["input_ids"][seg + 1] == seg_token_id(tok))
    assert np.all(np.diff(seg) > 0)
    np.testing.assert_array_equal(ex["masks"][:n].astype(bool), s.masks)
    assert not ex["masks"][n:].any()
    # uint8 images finished on the device equal the evaluation preprocessors.
    image = load_image(os.path.join(data_root, "GranDf_HA_images", "train",
                                    f"syn_train_{i:06d}.jpg"))
    np.testing.assert_allclose(np.asarray(clip_normalize(ex["clip_image"])),
                               clip_preprocess(image, 56), atol=2e-6)
    sam_ref, hw = sam_preprocess(image, 96)
    np.testing.assert_allclose(np.asarray(sam_normalize(ex["sam_image"], hw)), sam_ref,
                               atol=2e-6)
  # A non-square image: SAM's padding is zero after normalisation.
  wide = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  sam_ref, hw = sam_preprocess(wide, 96)
  np.testing.assert_allclose(np.asarray(sam_normalize(sam_resize_pad(wide, 96), hw)), sam_ref,
                             atol=2e-6)
  np.testing.assert_allclose(np.asarray(clip_normalize(clip_resize_crop(wide, 56))),
                             clip_preprocess(wide, 56), atol=2e-6)
  with pytest.raises(ValueError, match="max_answer_tokens"):
    SyntheticGCGData(data_root, "train", tok, clip_size=56, sam_size=96, num_visual_tokens=16,
                     max_answer_tokens=5).example(0)


def test_batches_are_a_function_of_seed_and_step():
  a = [step_indices(10, 4, s, seed=3) for s in range(5)]
  b = [step_indices(10, 4, s, seed=3) for s in range(5)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  flat = np.concatenate(a)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert not np.array_equal(step_indices(10, 4, 0, seed=4), a[0])


def test_worker_processes_give_the_same_batches(data_root):
  tok = load_tokenizer(os.path.join(data_root, "tokenizer"))
  data = SyntheticGCGData(data_root, "train", tok, clip_size=56, sam_size=96,
                          num_visual_tokens=16)
  got = list(prefetch_batches(data, 3, 2, 4, seed=5, workers=2,
                              tokenizer_dir=os.path.join(data_root, "tokenizer")))
  assert [s for s, _ in got] == [2, 3]
  for step, batch in got:
    ref = data.batch(step_indices(len(data), 3, step, seed=5))
    assert batch.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(batch[k], ref[k])


def _shared_segments() -> set[str]:
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_worker_pipeline_releases_its_shared_memory(data_root):
  """Stopping early (the consumer breaks) still closes the pool and unlinks both batch slots."""
  tok = load_tokenizer(os.path.join(data_root, "tokenizer"))
  data = SyntheticGCGData(data_root, "train", tok, clip_size=56, sam_size=96,
                          num_visual_tokens=16)
  before = _shared_segments()
  batches = prefetch_batches(data, 2, 0, 50, seed=1, workers=2,
                             tokenizer_dir=os.path.join(data_root, "tokenizer"))
  step, batch = next(batches)
  assert step == 0 and batch["masks"].flags.owndata
  batches.close()
  deadline = time.time() + 30
  while _shared_segments() - before and time.time() < deadline:
    time.sleep(0.1)
  assert not _shared_segments() - before


def _train_rows(workdir):
  with open(os.path.join(workdir, "log.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_training_lowers_the_loss_and_resumes_exactly(data_root, tmp_path):
  cfg = SyntheticTrainConfig.micro(steps=8, warmup_steps=2, eval_every=0, ckpt_every=4,
                                   log_every=1)
  full = train(cfg, data_root, str(tmp_path / "a"), plot=False, verbose=False)
  rows = _train_rows(tmp_path / "a")
  assert [r["step"] for r in rows] == list(range(1, 9))
  loss = [r["loss"] for r in rows]
  assert np.isfinite(loss).all()
  assert np.mean(loss[-2:]) < loss[0] - 0.5, loss
  assert rows[-1]["ce"] < rows[0]["ce"] and rows[-1]["bce"] < rows[0]["bce"]

  # Interrupted after the step-4 checkpoint (plus one unsaved step), then restarted.
  wb = str(tmp_path / "b")
  cut = train(cfg, data_root, wb, stop_after=4, plot=False, verbose=False)
  assert cut["step"] == 4
  with open(os.path.join(wb, "log.jsonl"), "a") as f:   # a line written after the checkpoint
    f.write(json.dumps({"kind": "train", "step": 5, "loss": -1.0}) + "\n")
  resumed = train(cfg, data_root, wb, plot=True, verbose=False)
  assert resumed["step"] == 8
  a = jax.tree.leaves(nnx.to_pure_dict(full["state"]))
  b = jax.tree.leaves(nnx.to_pure_dict(resumed["state"]))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [(r["step"], r["loss"]) for r in _train_rows(wb)] == [(r["step"], r["loss"])
                                                                 for r in rows]
  with open(os.path.join(wb, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(os.path.join(wb, "checkpoints")))[-2:] == ["4", "8"]
  # A time limit stops at the first step past it, checkpointed.
  wc = str(tmp_path / "c")
  assert train(cfg, data_root, wc, time_limit_s=0.0, plot=False, verbose=False)["step"] == 1
  assert os.listdir(os.path.join(wc, "checkpoints")) == ["1"]
  with pytest.raises(ValueError, match="another configuration"):
    train(dataclasses.replace(cfg, peak_lr=1e-2), data_root, wb, plot=False, verbose=False)

  # Teacher-forced validation metrics of the trained state are well-formed.
  tok = load_tokenizer(os.path.join(data_root, "tokenizer"))
  val = SyntheticGCGData(data_root, "val", tok, clip_size=cfg.image_size,
                         sam_size=cfg.sam_image_size, num_visual_tokens=16)
  from eval.train_synthetic import StepStatics
  st = StepStatics(cfg.ce_weight, cfg.bce_weight, cfg.dice_weight, val.sam_input_size(),
                   val.image_hw)
  m = evaluate(full["graphdef"], full["state"], val, cfg, st)
  assert 0 <= m["token_acc"] <= 1 and 0 <= m["mask_iou"] <= 1 and np.isfinite(m["loss"])
  assert m["loss"] == pytest.approx(m["ce"] + 2 * m["bce"] + 0.5 * m["dice"], rel=1e-5)


def test_gpu_job_driver_on_cpu(tmp_path):
  """The one-process device job (data + training + summary), at the test's micro settings."""
  from eval.synthetic_gpu_run import main
  out = str(tmp_path / "job")
  summary = main(["--out", out, "--train", "4", "--val", "2", "--test", "2", "--gen-workers",
                  "1", "--preset", "micro", "--steps", "8", "--time-limit", "600", "--set",
                  "warmup_steps=2", "eval_every=0", "ckpt_every=4", "log_every=1"])
  assert summary["steps_done"] == 8 and summary["params"] > 0
  assert summary["steady_step_time_s"] > 0
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f)["steps_done"] == 8
  assert os.path.exists(os.path.join(out, "data", "annotations", "val_test",
                                     "test_gcg_coco_mask_gt.json"))


def test_config_overrides_and_sizes():
  cfg = _override(SyntheticTrainConfig.small(), ["steps=1000", "sam_global_attn=0,2",
                                                  "peak_lr=1e-3", "fast_compile=true"])
  assert (cfg.steps, cfg.sam_global_attn, cfg.peak_lr, cfg.fast_compile) == (1000, (0, 2), 1e-3,
                                                                           True)
  with pytest.raises(ValueError, match="FIELD"):
    _override(cfg, ["nope=1"])
  g = SyntheticTrainConfig.small().glamm_config(519)
  assert g.num_visual_tokens == 576 and g.vision.image_size == 336 and g.vision.patch_size == 14
  assert g.sam.image_encoder.img_size == 256 and g.text_out_dim == 128
  assert SyntheticTrainConfig.from_dict(cfg.to_dict()) == cfg
