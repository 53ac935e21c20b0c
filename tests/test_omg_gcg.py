"""OMG-LLaVA GCG with pruning (eval/omg_gcg.py): the CLI end to end for every method on three
scikit-image photos (official prediction layout, resume), keep_ratio 1.0 == no pruning exactly,
batched == per-image, ALTP's kept pixel tokens == altp_jax, objects in the budget, the
perception score path == encode_image, the host stop and question-retry rules.

Model: a small OMG-LLaVA (image 256: a 4 x 4 grid of pixel tokens, 12 queries, V_max = 29;
one ConvNeXt block per stage, one deformable / decoder layer, a two-layer InternLM2-tiny with the
test tokenizer's 505 ids), random weights filled on the host, written as a converted checkpoint. Two
parameter sets share one structure (so every compiled program is shared): `plain`, and `seg`,
whose LLM always emits [SEG] (a constant residual coordinate read by the [SEG] logit), so masks
are decoded from states that depend on the image.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import altp_jax
from eval import omg_gcg, run_gcg
from eval.omg_llava_inputs import GCG_QUESTIONS, seg_positions
from eval.omg_llava_tokenizer import load_omg_llava_tokenizer
from models import generate as gen
from models.flat_state import flatten_state
from models.omg_llava.config import OMGLLaVAConfig
from models.omg_llava.modeling import abstract_omg_llava

METHODS = ("none", "altp", "fastv", "pdrop", "random", "grid")
# Two LLM layers: FastV drops after layer 1, PyramidDrop once after layer 1 (keep 0.75 of the
# layer-averaged pixel tokens = half of them in layer 1).
IN_LLM = {"fastv": ["--fastv-layer", "1"], "pdrop": ["--pdrop-layers", "1", "--pdrop-ratios", "1"]}
NEW, SEGS, B = 4, 2, 2
NAMES = ["a_astronaut.png", "b_camera.png", "c_coffee.jpg"]


def small_config(vocab: int) -> OMGLLaVAConfig:
  cfg = OMGLLaVAConfig.tiny(image_size=256)
  return dataclasses.replace(
      cfg, backbone=dataclasses.replace(cfg.backbone, depths=(1, 1, 1, 1)),
      pixel_decoder=dataclasses.replace(cfg.pixel_decoder, num_layers=1),
      decoder=dataclasses.replace(cfg.decoder, num_layers=1),
      llm=dataclasses.replace(cfg.llm, vocab_size=vocab, num_layers=2))


def random_model(cfg: OMGLLaVAConfig, seed: int = 0):
  """Random weights made on the host (eager init compiles one program per shape: minutes):
  matrices N(0, 1/fan_in), biases 0, other vectors 1, the class embedding unit-norm."""
  graphdef, state = nnx.split(abstract_omg_llava(cfg))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      a = np.zeros(x.shape, x.dtype)
    elif len(x.shape) >= 2:
      a = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
      if path[0].key == "class_embed":
        a /= np.linalg.norm(a, axis=-1, keepdims=True)
    else:
      a = np.zeros(x.shape) if "bias" in str(path[-1]) else np.ones(x.shape)
    return jnp.asarray(a, x.dtype)
  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


def seg_always(model, seg_id: int):
  """Makes the LLM emit [SEG] after every prompt (in place): residual coordinate 0 is a
  constant 4 at text tokens (embedding column 0; no layer writes to it), and only the [SEG]
  logit reads it, with weight 10."""
  llm = model.llm
  llm.embed_tokens.embedding[...] = llm.embed_tokens.embedding[...].at[:, 0].set(4.0)
  for layer in llm.layers:
    layer.self_attn.o_proj.kernel[...] = layer.self_attn.o_proj.kernel[...].at[:, 0].set(0.0)
    layer.mlp.down_proj.kernel[...] = layer.mlp.down_proj.kernel[...].at[:, 0].set(0.0)
  head = llm.lm_head.kernel[...]
  llm.lm_head.kernel[...] = head.at[:, seg_id].set(0.0).at[0, seg_id].set(10.0)
  return model


def tokenizer_dir(root) -> str:
  """internlm2-chat-7b's tokenizer files with a 500-piece SentencePiece model: pieces 498/499
  are the placeholders the config renames to <|im_end|>/<|im_start|>; OMG's five tokens are
  added at load time (ids 500..504), as tests/test_omg_llava_inputs.py builds it."""
  import shutil
  from tests._eval_helpers import train_internlm2_sp_model
  model_path = train_internlm2_sp_model(os.path.join(root, "sp"))
  out = os.path.join(root, "tok")
  os.makedirs(out)
  shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))
  entry = lambda c: {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
  config = {"added_tokens_decoder": {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>"),
                                     "498": entry("<|im_end|>"), "499": entry("<|im_start|>")},
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<s>",
            "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, "tokenizer_class": "InternLM2Tokenizer"}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return out


def write_checkpoint(model, tokenizer_dir: str, out: str) -> str:
  """The layout `python -m convert omg_llava` writes (Orbax groups, manifest, config.json,
  tokenizer files), from a model in memory."""
  from convert.cli import copy_tokenizer_files, write_model_dir
  from convert.omg_llava import variable_specs
  from convert.omg_llava_table import group_of
  from convert.writer import GroupWriter

  def fill(tmp):
    writer = GroupWriter(tmp, variable_specs(model), group_of)
    for path, var in nnx.state(model).flat_state():
      writer.add(path, np.asarray(var.get_value()), ".".join(map(str, path)))
    writer.finish({"model": "omg_llava", "source": "tests/test_omg_gcg.py random weights"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config.to_dict(), f)
    copy_tokenizer_files(tokenizer_dir, tmp)
  write_model_dir(out, fill)
  return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  import skimage.data
  root = tmp_path_factory.mktemp("omg_gcg")
  tok_dir = tokenizer_dir(str(root))
  tok = load_omg_llava_tokenizer(tok_dir, add_missing=True)
  seg = tok.token_to_id("[SEG]")
  plain = random_model(small_config(len(tok)))
  # The plain LLM never emits [SEG] (a zero logit loses to the largest of 504 random ones).
  plain.llm.lm_head.kernel[...] = plain.llm.lm_head.kernel[...].at[:, seg].set(0.0)
  ck_seg = write_checkpoint(seg_always(nnx.clone(plain), seg), tok_dir, str(root / "ck_seg"))
  images = root / "images"
  images.mkdir()
  Image.fromarray(skimage.data.astronaut()[::4, ::3]).save(images / NAMES[0])   # 128 x 171
  Image.fromarray(skimage.data.camera()[::5, ::4]).save(images / NAMES[1])      # grey
  Image.fromarray(skimage.data.coffee()[::3, ::5]).save(images / NAMES[2])      # 134 x 120
  from convert.load import load_omg_llava
  seg_model = load_omg_llava(ck_seg)
  # The plain weights placed as a restored checkpoint's are, so both share every program.
  gd, st = nnx.split(plain)
  st = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), st, nnx.state(seg_model))
  return dict(root=root, tok=tok, seg=seg, ck_seg=ck_seg, images=str(images),
              plain=nnx.merge(gd, st), seg_model=seg_model)


def _cli_args(env, method, out, keep=0.5, *extra):
  args = ["--model", "omg_llava", "--checkpoint", env["ck_seg"], "--images", env["images"],
          "--out", out, "--prune", method, "--batch-size", str(B), "--max-new-tokens", str(NEW),
          "--max-segs", str(SEGS), "--no-progress", "--skip-eval", *extra]
  if method != "none":
    args += ["--keep-ratio", str(0.75 if (method, keep) == ("pdrop", 0.5) else keep)]
  return args + IN_LLM.get(method, [])


def _options(env, method, keep=0.5, *extra):
  args = omg_gcg.parse_args(_cli_args(env, method, "unused", keep, *extra))
  return omg_gcg.build_options(args, env["tok"], env["plain"].config)


def _inputs(env, options, rows=(0, 2), question=0):
  """Batch inputs of images `rows` (host preprocessing of the runner)."""
  cfg = env["plain"].config
  prompts = omg_gcg.question_prompts(env["tok"], cfg)
  imgs = [omg_gcg.host_image(os.path.join(env["images"], NAMES[r]), cfg, options) for r in rows]
  p = prompts[question]
  b = len(rows)
  out = dict(ids=np.stack([p.ids] * b), valid=np.stack([p.valid] * b),
             visual_mask=np.stack([p.visual_mask] * b), pixels=np.stack([i[0] for i in imgs]))
  out["labels"] = None if imgs[0][2] is None else np.stack([i[2] for i in imgs])
  return out, imgs


# ------------------------------------------------------------------------------------------------


def test_cli_every_method_official_layout_and_resume(env):
  from pycocotools import mask as mask_utils
  sizes = {}
  for name in NAMES:
    with Image.open(os.path.join(env["images"], name)) as im:
      sizes[name[:-4]] = [im.height, im.width]
  for method in METHODS:
    out = str(env["root"] / f"cli_{method}")
    # One program per method costs a vision compile each: ALTP runs the default single program
    # (the one the ALTP test checks), the others --split-programs (one shared vision program).
    extra = [] if method == "altp" else ["--split-programs"]
    rec = run_gcg.main(_cli_args(env, method, out, 0.5, *extra))
    assert rec["split_programs"] == (method != "altp")
    assert rec["images_done"] == 3 and rec["questions_used"][0] == 3, (method, rec)
    assert rec["device_batches"] == 2                       # no retry: every answer has a [SEG]
    preds = sorted(os.listdir(os.path.join(out, "predictions")))
    assert preds == [n[:-4] + ".json" for n in NAMES], method
    for f in preds:
      p = json.load(open(os.path.join(out, "predictions", f)))
      assert sorted(p) == ["caption", "image_id", "phrases", "pred_masks"]
      assert p["image_id"] == f[:-5] and isinstance(p["caption"], str)
      # NEW [SEG]s, the last has no state: NEW - 1 usable, SEGS decoded.
      assert len(p["pred_masks"]) == SEGS, (method, p)
      for m in p["pred_masks"]:
        assert m["size"] == sizes[p["image_id"]]
        assert mask_utils.decode(m).shape == tuple(sizes[p["image_id"]])
    assert rec["segs_beyond_max_masks"] == 3 * (NEW - 1 - SEGS)
    n_vis = rec["mean_visual_tokens"]
    if method == "none":
      assert rec["mean_reduction"] == 0.0
    else:   # 8 of the 16 pixel tokens kept at the pruning point
      assert rec["mean_visual_kept"] == pytest.approx(n_vis - 8), method
  # Resume: nothing to do; a lost prediction is redone, the others untouched.
  out = str(env["root"] / "cli_none")
  pred = os.path.join(out, "predictions")
  args = _cli_args(env, "none", out, 1.0, "--split-programs")
  assert run_gcg.main(args)["images_done"] == 0
  before = os.path.getmtime(os.path.join(pred, "a_astronaut.json"))
  os.remove(os.path.join(pred, "b_camera.json"))
  assert run_gcg.main(args)["images_done"] == 1
  assert os.path.getmtime(os.path.join(pred, "a_astronaut.json")) == before
  assert not [f for f in os.listdir(pred) if ".tmp" in f]


def _encode(graphdef, state, pixels, score="feature_norm"):
  """The split runner's vision program (shared with the CLI's --split-programs runs)."""
  fdef, leaves = flatten_state(graphdef, state)
  return omg_gcg._encode_jit(fdef, leaves, pixels, score=score)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "generate"))
def _llm(graphdef, state, enc, ids, valid, visual_mask, labels, *, options, generate=True):
  """`llm_inputs` (+ `generate_stage`): the pruning and the LLM without the mask decoder;
  `generate="inputs"`: the LLM inputs instead, False: only the keep decision."""
  model = nnx.merge(graphdef, state)
  x = omg_gcg.llm_inputs(model, enc, ids, valid, visual_mask, labels, None, jax.random.key(0),
                         options=options)
  out = dict(keep_index=x["keep_index"], kept_visual=x["kept_visual"])
  if generate == "inputs":
    out.update({k: x[k] for k in ("embeds", "valid", "pixel_mask", "positions")})
  elif generate:
    g = omg_gcg.generate_stage(model, x, options=options)
    out.update(tokens=g.tokens, lengths=g.lengths, hidden=g.hidden)
  return out


def test_keep_ratio_one_equals_none_for_every_method(env):
  """The same encoder output into the pruning + LLM at keep_ratio 1.0. FastV and PyramidDrop:
  the tokens of no pruning and its generated post-norm states (to fp32 rounding: the LLM runs in
  stages). The pre-LLM methods (ALTP, also with objects in the budget, random, grid): the LLM
  inputs of no pruning (embeddings, validity, pixel slots, positions, in-LLM plan none), bit for
  bit, so the same generation program follows."""
  gd, st = nnx.split(env["plain"])
  opts = _options(env, "none")
  inp, _ = _inputs(env, opts)
  enc = _encode(gd, st, inp["pixels"])
  n_vis = np.asarray(enc["num_visual"])
  args = (gd, st, enc, inp["ids"], inp["valid"], inp["visual_mask"])
  ref = jax.device_get(_llm(*args, None, options=opts))
  ref_in = jax.device_get(_llm(*args, None, options=opts, generate="inputs"))
  assert np.abs(ref["hidden"]).max() > 0.1 and (ref["kept_visual"] == n_vis).all()
  for method, extra in [(m, ()) for m in METHODS[1:]] + [("altp", ("--include-objects",))]:
    o = _options(env, method, 1.0, *extra)
    labels = np.stack([i[2] for i in _inputs(env, o)[1]]) if method == "altp" else None
    if method in ("fastv", "pdrop"):
      got = jax.device_get(_llm(*args, labels, options=o))
      for key in ("tokens", "lengths", "kept_visual"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{method} {key}")
      # Split into stages, XLA sums some attention terms in another order: fp32 rounding.
      np.testing.assert_allclose(got["hidden"], ref["hidden"], rtol=0, atol=5e-6)
    else:
      got = jax.device_get(_llm(*args, labels, options=o, generate="inputs"))
      for key in ("embeds", "valid", "pixel_mask", "positions", "kept_visual"):
        np.testing.assert_array_equal(got[key], ref_in[key], err_msg=f"{method} {extra} {key}")


def test_batched_equals_per_image_and_altp_equals_altp_jax(env):
  """The CLI's batch-2 ALTP program: each row equals that image run alone (a batch holding only
  it, padded by repetition as the runner pads), and its kept pixel tokens are
  altp_jax.altp_select's on the feature norms, with SLIC superpixels of the padded square."""
  from eval.omg_llava_image import load_image, preprocess
  opts = _options(env, "altp")
  cfg = env["plain"].config
  inp, imgs = _inputs(env, opts, rows=(0, 1))
  # Host superpixels: SLIC of the padded, resized square mapped to the 4 x 4 grid.
  g = opts.prune.num_segments(cfg.num_pixel_tokens)
  for r, (_, _, labels, _) in enumerate(imgs):
    sq = preprocess(load_image(os.path.join(env["images"], NAMES[r])), size=256).square
    pix = altp_jax.slic_labels(sq.astype(np.float32) / 255, n_segments=opts.prune.n_segments(16),
                               max_segments=g)
    np.testing.assert_array_equal(labels, np.asarray(altp_jax.token_labels(pix, (4, 4), g)))
  k = opts.prune.kept(cfg.num_pixel_tokens)
  assert k == 8 and len(np.unique(inp["labels"][0])) > 1
  for name in ("plain", "seg_model"):
    runner = omg_gcg.OmgGCGRunner(env[name], opts)
    both = jax.device_get(runner.run_batch(**inp))
    gd, st = nnx.split(env[name])
    enc = _encode(gd, st, inp["pixels"])
    feats = enc["pixel_tokens_projected"].astype(jnp.float32)
    want = altp_jax.altp_select(jnp.linalg.norm(feats, axis=-1), inp["labels"], k,
                                config=opts.prune.altp, features=feats, num_segments=g)
    np.testing.assert_array_equal(both["keep_index"], want)
    np.testing.assert_array_equal(both["kept_visual"], np.asarray(enc["num_visual"]) - 8)
    for b in range(2):
      # Row b against row b, so that only the other row's content changes: on an AVX2-only CPU,
      # XLA:CPU rounded an image's masks differently (~1e-5) at another position in the batch.
      alone = jax.device_get(runner.run_batch(**{k_: v[[b, b]] for k_, v in inp.items()}))
      for key, value in both.items():
        np.testing.assert_array_equal(alone[key][b], value[b], err_msg=f"{name} {key} {b}")
    # The two-program runner (vision, then pruning + LLM) gives the one program's results.
    split = jax.device_get(omg_gcg.OmgGCGRunner(env[name], opts, split=True).run_batch(**inp))
    for key in ("tokens", "lengths", "keep_index", "kept_visual", "seg_valid"):
      np.testing.assert_array_equal(split[key], both[key], err_msg=f"{name} split {key}")
    np.testing.assert_allclose(split["masks"], both["masks"], rtol=1e-5, atol=1e-5)
  # The two images' [SEG] masks differ: each row reads its own image's features.
  assert np.abs(both["masks"][0] - both["masks"][1]).max() > 1e-2


def test_objects_in_budget_and_perception_score(env):
  """`perception` encodes exactly like encode_image; with objects in the budget exactly
  min(k, 16 + N) valid pool tokens stay, for topk the best ones by score."""
  cfg = env["plain"].config
  gd, st = nnx.split(env["plain"])
  opts = _options(env, "topk", 0.3, "--include-objects", "--omg-score", "perception")
  inp, _ = _inputs(env, opts)
  enc = _encode(gd, st, inp["pixels"], score="perception")
  ref = _encode(gd, st, inp["pixels"])
  for key in ("visual", "visual_valid", "num_visual", "owner", "query_valid", "mask_features"):
    np.testing.assert_array_equal(np.asarray(enc[key]), np.asarray(ref[key]), err_msg=key)
  cell = np.asarray(enc["pixel_scores"])
  assert cell.shape == (2, 16) and (cell > 0).all() and (cell <= 1).all()
  out = jax.device_get(_llm(gd, st, enc, inp["ids"], inp["valid"], inp["visual_mask"], None,
                            options=opts, generate=False))
  g2, m = 16, cfg.num_visual_tokens_max - 17
  k = opts.prune.kept(g2 + m)
  n_obj = np.asarray(enc["num_visual"]) - 17
  owner, qv = np.asarray(enc["owner"]), np.asarray(enc["query_valid"])
  assert k == 8 and (n_obj >= 1).all()
  for b in range(2):
    valid_pool = np.concatenate([np.ones(g2, bool), np.arange(m) < n_obj[b]])
    obj = np.full(m, -np.inf)     # an object's score: the best cell score over its cells
    for j, q in enumerate(np.flatnonzero(qv[b])):
      obj[j] = cell[b][owner[b] == q].max()
    scores = np.where(valid_pool, np.concatenate([cell[b], obj]), -np.inf)
    want = np.sort(np.argsort(-scores, kind="stable")[:k])
    np.testing.assert_array_equal(out["keep_index"][b], want)
    assert out["kept_visual"][b] == min(k, g2 + n_obj[b]) + 1
  with pytest.raises(ValueError, match="include-objects"):
    _options(env, "fastv", 0.5, "--include-objects")


def test_question_retry_end_to_end_and_rows(env, tmp_path):
  """The plain LLM never emits [SEG]: six questions per image, then no masks; with
  --no-omg-retry one. Only pending rows are run again (fake runner)."""
  opts = _options(env, "none", 1.0)
  rec = omg_gcg.run(env["plain"], env["tok"], env["images"], str(tmp_path / "r"), opts, B,
                    limit=2, progress=False, split=True)
  assert rec["questions_used"] == [0] * 5 + [2] and rec["device_batches"] == 6
  assert rec["answers_without_masks"] == 2
  rec = omg_gcg.run(env["plain"], env["tok"], env["images"], str(tmp_path / "n"), opts, B,
                    limit=2, progress=False, retry=False, split=True)
  assert rec["questions_used"] == [2, 0, 0, 0, 0, 0] and rec["device_batches"] == 1

  seg = 7
  first_seg = {0: 0, 1: 2, 2: None, 3: 1}           # row -> first question answered with [SEG]

  def run_rows(rows, questions):
    out = []
    for r, q in zip(rows, questions):
      ok = first_seg[r] is not None and q >= first_seg[r]
      out.append(omg_gcg.RowResult([5, seg, 9] if ok else [5, 9, seg], q, np.zeros((0,)), 0, 0,
                                   0, np.zeros(0)))
    return out
  results, calls = omg_gcg.answer_with_retry(run_rows, 4, seg)
  assert [r.question for r in results] == [0, 2, 5, 1]
  assert calls == [[0, 1, 2, 3], [1, 2, 3], [1, 2], [2], [2], [2]]
  assert not seg_positions(results[2].generated, seg) and len(GCG_QUESTIONS) == 6


def test_stop_rule_and_sampler_stop_ids(env):
  tok = env["tok"]
  im_end = tok.token_to_id("<|im_end|>")
  words = tok.encode("a man", add_special_tokens=False)
  stops = (tok.eos_id, im_end)
  assert omg_gcg.stop_length(tok, words + [im_end, 9, 9], stops) == len(words) + 1
  assert omg_gcg.stop_length(tok, words + [tok.eos_id], stops) == len(words) + 1
  spelled = tok.sp.encode("x<|im_end|>")[1:]        # ordinary pieces (the first one is "x")
  assert im_end not in spelled and tok.decode(words + spelled).endswith("<|im_end|>")
  assert omg_gcg.stop_length(tok, words + spelled + [9], stops) == len(words) + len(spelled)
  assert omg_gcg.stop_length(tok, words, stops) == len(words)
  # The device loop stops on any of eos_id / stop_ids and keeps the stop token (a one-layer
  # LLM: two small compiles).
  from models.llama.config import LlamaConfig
  from models.llama.modeling import LlamaForCausalLM
  cfg = LlamaConfig.internlm2_tiny(num_layers=1)
  gd, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)
  state = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state)
  llm = nnx.merge(gd, state)
  emb = llm.embed(jnp.asarray([[1, 5, 6, 7]]))
  valid = jnp.ones((1, 4), bool)
  free = gen.generate(llm, emb, valid, jnp.zeros((1, 4), bool),
                      sampler=gen.SamplerConfig(max_new_tokens=5, eos_id=-1))
  t = np.asarray(free.tokens[0])
  out = gen.generate(llm, emb, valid, jnp.zeros((1, 4), bool),
                     sampler=gen.SamplerConfig(max_new_tokens=5, eos_id=-1,
                                               stop_ids=(int(t[2]),)))
  stop = int(np.argmax(t == t[2])) + 1
  assert int(out.lengths[0]) == stop
  np.testing.assert_array_equal(np.asarray(out.tokens[0, :stop]), t[:stop])
  with pytest.raises(ValueError, match="stop_ids"):
    gen.SamplerConfig(stop_ids=[1])


def test_prompts_share_one_length(env):
  cfg = env["plain"].config
  prompts = omg_gcg.question_prompts(env["tok"], cfg)
  assert len({p.ids.shape[0] for p in prompts}) == 1 and prompts[0].ids.shape[0] % 16 == 0
  for p in prompts:
    assert p.visual_mask.sum() == cfg.num_visual_tokens_max
  with pytest.raises(ValueError, match="omg-score"):
    omg_gcg.OmgGCGOptions(score="cls")


def test_data_parallel_mesh_matches_one_device(env, monkeypatch):
  """`run(..., mesh=data=2)` (the CLI's `--mesh`): the parameters placed by their logical names,
  each device batch split over two CPU devices; the predictions equal the one-device run's."""
  from models import mesh as mesh_lib
  mesh = mesh_lib.make_mesh("data=2", jax.devices()[:2])
  options = _options(env, "none")
  seen = []
  original = omg_gcg.OmgGCGRunner.run_batch

  def spy(self, ids, valid, visual_mask, pixels, *rest):
    seen.append((getattr(pixels, "sharding", None), self.leaves[0].sharding))
    return original(self, ids, valid, visual_mask, pixels, *rest)
  monkeypatch.setattr(omg_gcg.OmgGCGRunner, "run_batch", spy)
  outs = {}
  for tag, m in (("one", None), ("mesh", mesh)):
    out = str(env["root"] / f"mesh_{tag}")
    rec = omg_gcg.run(env["plain"], env["tok"], env["images"], out, options, batch_size=B,
                      progress=False, split=True, mesh=m)
    assert rec["images_done"] == 3
    outs[tag] = {f: json.load(open(os.path.join(out, "predictions", f)))
                 for f in sorted(os.listdir(os.path.join(out, "predictions")))}
  assert rec["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert outs["mesh"] == outs["one"]
  pix_sh, param_sh = seen[-1]                      # the mesh run's last batch
  assert pix_sh.mesh.shape == mesh.shape and pix_sh.spec[0] == ("data", "fsdp")
  assert param_sh.mesh.shape == mesh.shape and len(param_sh.device_set) == 2
  with pytest.raises(mesh_lib.MeshError, match="batch"):
    omg_gcg.run(env["plain"], env["tok"], env["images"], str(env["root"] / "mesh_bad"),
                options, batch_size=3, mesh=mesh, progress=False)
  assert omg_gcg.parse_args(_cli_args(env, "none", "o", 0.5, "--mesh", "data=2")).mesh == "data=2"
