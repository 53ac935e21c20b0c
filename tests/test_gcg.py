"""GCG pipeline: pruning bookkeeping, [SEG] state selection, mask post-processing, the resumable
runner end to end on a tiny random GLaMM with a tokenizer trained in the test."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import altp_jax
from eval import gcg, run_gcg
from eval import prompt as prompt_lib
from eval.tokenizer import load_tokenizer, seg_token_id
from models import generate as gen
from models.glamm.config import GLaMMConfig
from models.glamm.modeling import GLaMM
from models.llama.config import LlamaConfig
from models.sam.config import SamConfig
from models.clip.config import CLIPVisionConfig
from models.sam.postprocess import postprocess_masks
from tests import _eval_helpers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  model_path = _eval_helpers.train_sp_model(str(d / "sp"))
  _eval_helpers.write_glamm_tokenizer_dir(str(d / "glamm"), model_path)
  return load_tokenizer(str(d / "glamm"))


_MODELS = {}


def _tiny_glamm(tokenizer, seg_bias=False):
  """One cached tiny model per variant: eager construction is the slow part of these tests."""
  key = (id(tokenizer), seg_bias)
  if key not in _MODELS:
    _MODELS[key] = _build_tiny_glamm(tokenizer, seg_bias)
  return _MODELS[key]


def _build_tiny_glamm(tokenizer, seg_bias):
  cfg = GLaMMConfig(vision=CLIPVisionConfig.tiny(), llm=LlamaConfig.tiny(vocab_size=len(tokenizer)),
                    sam=SamConfig.tiny())
  model = GLaMM(cfg, rngs=nnx.Rngs(0))
  if seg_bias:  # make [SEG] the argmax everywhere, so every generated token asks for a mask
    kernel = model.llm.lm_head.kernel
    kernel[...] = kernel[...].at[:, seg_token_id(tokenizer)].set(5.0)
  return model


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  import skimage.data
  d = tmp_path_factory.mktemp("images")
  Image.fromarray(skimage.data.astronaut()[::4, ::3]).save(d / "a_astronaut.png")   # 128x171
  Image.fromarray(skimage.data.camera()[::5, ::4]).save(d / "b_camera.png")         # gray
  Image.fromarray(skimage.data.coffee()[::3, ::5]).save(d / "c_coffee.jpg")          # 134x120
  return str(d)


def _options(tokenizer, method="none", keep=1.0, max_new=4, **kw):
  return gcg.GCGOptions(prune=gcg.PruneConfig(method=method, keep_ratio=keep, **kw),
                        sampler=gen.SamplerConfig(max_new_tokens=max_new,
                                                  eos_id=tokenizer.eos_id, pad_id=0),
                        seg_id=seg_token_id(tokenizer), max_segs=3, grid=(4, 4))


def test_seg_states_pick_the_state_before_each_seg():
  tokens = jnp.array([[5, 9, 7, 9, 9], [9, 1, 1, 1, 9]])
  lengths = jnp.array([5, 4])            # row 1's last [SEG] is past its EOS: ignored
  hidden = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1)
  h, valid = gcg.seg_states(tokens, lengths, hidden, 9, 3)
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(h[0, :, 0], [1, 3, 4])
  assert float(h[1, 0, 0]) == 5.0


def test_host_mask_postprocess_equals_device_version():
  rng = np.random.default_rng(0)
  low = rng.normal(size=(2, 24, 24)).astype(np.float32)
  for original in ((90, 60), (40, 95)):
    resized = (96 * original[0] // max(original), 96 * original[1] // max(original))
    want = np.asarray(postprocess_masks(jnp.asarray(low[None]), resized, original, img_size=96))[0]
    got = gcg.masks_to_original(low, resized, original, img_size=96)
    np.testing.assert_array_equal(got, want > 0)


def test_pre_llm_pruning_equals_manual_gather(tokenizer):
  """topk pruning inside the pipeline == generating from hand-gathered kept tokens."""
  model = _tiny_glamm(tokenizer)
  cfg = model.config
  n = cfg.num_visual_tokens
  prompt = prompt_lib.build_gcg_prompt(tokenizer, n)
  ids, valid, vis = (np.asarray(a)[None] for a in (prompt.ids, prompt.valid, prompt.visual_mask))
  clip = np.random.default_rng(1).normal(size=(1, 56, 56, 3)).astype(np.float32)
  sam = np.zeros((1, 96, 96, 3), np.float32)
  opts = _options(tokenizer, "topk", 0.25, max_new=5)
  out = gcg.GCGRunner(model, opts).run_batch(ids, valid, vis, clip, sam)
  visual, cls = model.encode_image(jnp.asarray(clip))
  k = opts.prune.kept(n)
  keep = np.sort(np.argsort(-np.asarray(cls[0]), kind="stable")[:k])
  np.testing.assert_array_equal(out["keep_visual"][0], keep)
  vis_slots = np.flatnonzero(vis[0])
  slots = np.sort(np.concatenate([np.flatnonzero(~vis[0]), vis_slots[keep]]))
  embeds = model.splice(jnp.asarray(ids[:, slots]), visual[:, keep], jnp.asarray(vis[:, slots]))
  ref = gen.generate(model.llm, embeds, valid[:, slots], vis[:, slots],
                     positions=jnp.asarray(slots[None], jnp.int32), sampler=opts.sampler)
  np.testing.assert_array_equal(out["tokens"], ref.tokens)


def test_run_gcg_end_to_end_and_resume(tokenizer, image_dir, tmp_path):
  model = _tiny_glamm(tokenizer, seg_bias=True)
  opts = _options(tokenizer, "altp", 0.5, max_new=4)
  out_dir = str(tmp_path / "run")
  rec = run_gcg.run(model, tokenizer, image_dir, out_dir, opts, batch_size=2, progress=False)
  assert rec["images_done"] == 3
  preds = sorted(os.listdir(os.path.join(out_dir, "predictions")))
  assert preds == ["a_astronaut.json", "b_camera.json", "c_coffee.json"]
  import json
  from pycocotools import mask as mask_utils
  p = json.load(open(os.path.join(out_dir, "predictions", "c_coffee.json")))
  assert p["image_id"] == "c_coffee" and len(p["pred_masks"]) == 3     # max_segs masks
  assert list(mask_utils.decode(p["pred_masks"][0]).shape) == [134, 120]
  assert rec["segs_beyond_max_segs"] == 3                              # 4 [SEG]s, 3 kept, x3
  # Resume: nothing left to do; then one lost prediction is redone, the others are not touched.
  assert run_gcg.run(model, tokenizer, image_dir, out_dir, opts, progress=False)[
      "images_done"] == 0
  before = os.path.getmtime(os.path.join(out_dir, "predictions", "a_astronaut.json"))
  os.remove(os.path.join(out_dir, "predictions", "b_camera.json"))
  assert run_gcg.run(model, tokenizer, image_dir, out_dir, opts, progress=False)[
      "images_done"] == 1
  assert os.path.getmtime(os.path.join(out_dir, "predictions", "a_astronaut.json")) == before


@pytest.mark.parametrize("method, extra", [
    ("fastv", {}), ("pdrop", {"pdrop_layers": (1, 2, 3), "pdrop_base_ratios": (1.0, .5, .25)}),
    ("random", {}), ("grid", {}),
    ("altp", {"superpixels": "device"}), ("none", {})])
def test_every_method_runs_with_static_shapes(tokenizer, method, extra):
  model = _tiny_glamm(tokenizer)
  n = model.config.num_visual_tokens
  prompt = prompt_lib.build_gcg_prompt(tokenizer, n)
  b = 2
  ids, valid, vis = (np.broadcast_to(np.asarray(a), (b,) + a.shape) for a in (
      prompt.ids, prompt.valid, prompt.visual_mask))
  rng = np.random.default_rng(2)
  clip = rng.normal(size=(b, 56, 56, 3)).astype(np.float32)
  images01 = rng.random((b, 56, 56, 3)).astype(np.float32)
  sam = rng.normal(size=(b, 96, 96, 3)).astype(np.float32)
  opts = _options(tokenizer, method, 0.5, max_new=3, **extra)
  out = gcg.GCGRunner(model, opts).run_batch(ids, valid, vis, clip, sam, None, images01)
  assert out["tokens"].shape == (b, 3) and out["low_res"].shape == (b, 3, 24, 24)
  if method in gcg.PRE_LLM:
    assert out["keep_visual"].shape == (b, opts.prune.kept(n))
    assert np.all(np.diff(np.asarray(out["keep_visual"]), axis=1) > 0)


def test_prune_config_errors():
  with pytest.raises(ValueError, match="--prune 'magic'"):
    gcg.PruneConfig(method="magic")
  with pytest.raises(ValueError, match="--keep-ratio 0"):
    gcg.PruneConfig(method="altp", keep_ratio=0.0)
  assert gcg.PruneConfig(method="altp", keep_ratio=0.1).kept(576) == 58
  plan = gcg.PruneConfig(method="pdrop", keep_ratio=0.1).plan(32, 576)
  assert plan.average_visual_retention() == pytest.approx(0.1, abs=0.01)
  # Device superpixels (no host labels) need the images, and say so.
  visual, cls = jnp.zeros((1, 16, 8)), jnp.full((1, 16), 1 / 16)
  with pytest.raises(ValueError, match="device superpixels needs images01"):
    gcg.pre_llm_selection(gcg.PruneConfig(method="altp", keep_ratio=0.5, superpixels="device"),
                          visual, cls, None, None, jax.random.key(0), (4, 4))


def test_cli_killed_mid_run_loses_nothing(tmp_path):
  """SIGKILL the CLI after its first prediction; every file left is whole, and a rerun finishes
  the rest without touching what was done."""
  import json
  import signal
  import subprocess
  import sys
  import time

  out = str(tmp_path / "gcg")
  pred = os.path.join(out, "predictions")
  cmd = [sys.executable, "-m", "eval.gcg", "--out", out, "--no-progress", "--skip-eval",
         "--max-new-tokens", "4"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(pred) and any(f.endswith(".json") for f in os.listdir(pred)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  first = {f: os.path.getmtime(os.path.join(pred, f)) for f in os.listdir(pred)
           if f.endswith(".json")}
  assert first, proc.stderr.read().decode()[-2000:]
  for f in first:                                   # atomic writes: no truncated JSON
    json.load(open(os.path.join(pred, f)))
  subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
  final = sorted(f for f in os.listdir(pred) if f.endswith(".json"))
  from eval import embedded_default
  assert final == [f"syn_test_{i:06d}.json" for i in range(embedded_default.SAMPLE_COUNT)]
  assert all(os.path.getmtime(os.path.join(pred, f)) == t for f, t in first.items())
  assert not [f for f in os.listdir(pred) if ".tmp" in f]


def _batch_inputs(model, tokenizer, b=1, seed=3):
  n = model.config.num_visual_tokens
  prompt = prompt_lib.build_gcg_prompt(tokenizer, n)
  ids, valid, vis = (np.broadcast_to(np.asarray(a), (b,) + a.shape) for a in (
      prompt.ids, prompt.valid, prompt.visual_mask))
  rng = np.random.default_rng(seed)
  return dict(ids=ids, valid=valid, visual_mask=vis,
              clip_pixels=rng.normal(size=(b, 56, 56, 3)).astype(np.float32),
              sam_pixels=rng.normal(size=(b, 96, 96, 3)).astype(np.float32),
              images01=rng.random((b, 56, 56, 3)).astype(np.float32))


def test_keep_ratio_one_is_exactly_unpruned(tokenizer):
  model = _tiny_glamm(tokenizer)
  inp = _batch_inputs(model, tokenizer)
  ref = gcg.GCGRunner(model, _options(tokenizer, "none", 1.0, max_new=4)).run_batch(**inp)
  for method, extra in (("altp", {"superpixels": "device"}), ("fastv", {"fastv_layer": 1}),
                        ("pdrop", {"pdrop_layers": (1, 2, 3),
                                   "pdrop_base_ratios": (1.0, .5, .25)}),
                        ("random", {}), ("grid", {}), ("topk", {})):
    out = gcg.GCGRunner(model, _options(tokenizer, method, 1.0, max_new=4, **extra)).run_batch(
        **inp)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"], err_msg=method)
    np.testing.assert_allclose(out["low_res"], ref["low_res"], atol=1e-5, err_msg=method)


def test_altp_inside_the_model_equals_altp_jax(tokenizer):
  model = _tiny_glamm(tokenizer)
  inp = _batch_inputs(model, tokenizer, b=2)
  opts = _options(tokenizer, "altp", 0.5, max_new=2)
  n, k, g = 16, opts.prune.kept(16), opts.prune.num_segments(16)
  labels = np.random.default_rng(4).integers(0, g, (2, n)).astype(np.int32)
  assert opts.prune.altp.density == "pixel_detail"   # the pipeline default measures the images
  out = gcg.GCGRunner(model, opts).run_batch(labels=labels, **inp)
  visual, cls = model.encode_image(jnp.asarray(inp["clip_pixels"]))
  detail = altp_jax.superpixels.patch_detail_device(jnp.asarray(inp["images01"]), (4, 4))
  want = altp_jax.altp_select(cls, labels, k, config=opts.prune.altp,
                              features=visual.astype(jnp.float32), detail=detail, num_segments=g)
  np.testing.assert_array_equal(out["keep_visual"], want)
  with pytest.raises(ValueError, match="pixel_detail.*images01"):
    gcg.GCGRunner(model, opts).run_batch(labels=labels, **{
        k_: v for k_, v in inp.items() if k_ != "images01"})


def test_batch_sharded_over_devices_equals_one_device(tokenizer, image_dir, tmp_path):
  """The global batch split over a data=4 mesh writes the same predictions as one device."""
  import json
  from models import mesh as mesh_lib

  model = _tiny_glamm(tokenizer, seg_bias=True)
  opts = _options(tokenizer, "grid", 0.5, max_new=3)
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  run_gcg.run(model, tokenizer, image_dir, one, opts, batch_size=4, progress=False)
  mesh = mesh_lib.make_mesh("data=4", jax.devices()[:4])
  rec = run_gcg.run(model, tokenizer, image_dir, four, opts, batch_size=4, progress=False,
                    mesh=mesh)
  assert rec["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and rec["images_done"] == 3
  for f in sorted(os.listdir(os.path.join(one, "predictions"))):
    a = json.load(open(os.path.join(one, "predictions", f)))
    b = json.load(open(os.path.join(four, "predictions", f)))
    assert a == b, f
