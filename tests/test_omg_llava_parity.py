"""End-to-end parity of `models.omg_llava.modeling.OMGLLaVA` against the plain-torch original
(`tests/omg_torch_reference.py`), fp32 on CPU, tiny config (image 256: 16 pixel tokens, 12
queries, V_max = 29; InternLM2-tiny).

The torch model's whole state dict (release names) is loaded through the composed part tables
(strict), the class embeddings are copied into the `class_embed` buffer, and then:
- visual tokens: each image's `[pixel ; separator ; valid objects]` list equals our packed span
  (valid part, <= 1e-4), with a zero, invalid tail; the two images have different object counts;
- LLM logits at every valid prompt position (a batch of both images, each with its own 257+N
  layout inside the static V_max span) equal the batch-1 reference's (<= 1e-4);
- [SEG] masks from the [SEG] states of the prompt equal `forward_llm_seg`'s (<= 1e-4);
- greedy generation (`models.generate`, prefill + cached decode on the packed prompt) gives the
  reference greedy loop's tokens and states.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import sharding
from models.generate import SamplerConfig, generate
from models.omg_llava.config import OMGLLaVAConfig
from models.omg_llava.modeling import (Buffer, abstract_omg_llava, pack_prompt,
                                       prompt_layout, seg_hidden_from_generation)
from models.param_tables import load_state_dict
from tests.omg_torch_reference import OMGLLaVARef, class_embed, nchw, reference_table

TOL = 1e-4
CFG = OMGLLaVAConfig.tiny(image_size=256)
SEG = CFG.llm.vocab_size - 4              # the [SEG] id (92544 of 92548 at release size)
BEFORE = (1, 17, 33, 5)                    # BOS + "<|im_start|>user\n"-like ids
AFTER = (9, 40, 41, SEG, 77, 8, SEG, 12, 90)
PAD = 3                                    # padding slots after the longest prompt
NEW_TOKENS = 8


def _pixels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((2, CFG.image_size, CFG.image_size, 3),
                                                    dtype=np.float32)


@pytest.fixture(scope="module")
def setup():
  ce = class_embed(CFG)
  ref = OMGLLaVARef(CFG, ce, seed=0)
  model = abstract_omg_llava(CFG)
  load_state_dict(model, ref.state_dict(), reference_table(CFG), strict=True)
  model.class_embed.set_value(jnp.asarray(ce.numpy()))
  pixels = _pixels(11)
  want = ref.encode_image(nchw(pixels))
  got = nnx.jit(lambda m, p: m.encode_image(p))(model, jnp.asarray(pixels))
  return ref, model, pixels, want, got


def _prompt(batch: int):
  """ids / visual_mask / valid [B, L] with a V_max visual span (the layout of
  eval.omg_llava_inputs.build_prompt with num_object_tokens = max)."""
  v = CFG.num_visual_tokens_max
  row = list(BEFORE) + [0] * v + list(AFTER) + [0] * PAD
  vis = [False] * len(BEFORE) + [True] * v + [False] * (len(AFTER) + PAD)
  ok = [True] * (len(BEFORE) + v + len(AFTER)) + [False] * PAD
  rep = lambda x, dt: np.asarray([x] * batch, dt)
  return rep(row, np.int32), rep(vis, bool), rep(ok, bool)


def test_visual_tokens(setup):
  _, _, _, want, got = setup
  counts = [w.shape[0] - CFG.num_pixel_tokens - 1 for w in want["visual"]]
  # Different object counts in one batch, neither at the cap: the packed tail is exercised.
  assert counts[0] != counts[1] and max(counts) < CFG.max_object_tokens, counts
  np.testing.assert_array_equal(np.asarray(got["query_valid"]), want["valid"].numpy())
  np.testing.assert_array_equal(np.asarray(got["owner"]), want["owner"].numpy())
  visual, valid = np.asarray(got["visual"]), np.asarray(got["visual_valid"])
  assert visual.shape == (2, CFG.num_visual_tokens_max, CFG.llm.hidden_size)
  errs = []
  for b, w in enumerate(want["visual"]):
    n = w.shape[0]
    assert valid[b].tolist() == [True] * n + [False] * (visual.shape[1] - n)
    assert int(got["num_visual"][b]) == n
    errs.append(float(np.max(np.abs(visual[b, :n] - w.numpy()))))
    assert not visual[b, n:].any()
  assert max(errs) <= TOL, errs
  np.testing.assert_array_equal(np.asarray(got["pixel_tokens_projected"]),
                                visual[:, :CFG.num_pixel_tokens])
  np.testing.assert_allclose(np.asarray(got["mask_features"]),
                             want["mask_features"].permute(0, 2, 3, 1).numpy(), atol=TOL, rtol=0)
  print("visual token counts", counts, "max abs err", errs)


def test_prompt_layout_positions():
  """Positions count only the key-valid tokens: XTuner's contiguous 0..T-1 of the real span."""
  vm = np.array([[0, 1, 1, 1, 1, 0, 0, 0]], bool)
  ok = np.array([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
  vv = np.array([[1, 1, 0, 0]], bool)
  pos, kv, slot = prompt_layout(jnp.asarray(vm), jnp.asarray(ok), jnp.asarray(vv))
  assert np.asarray(kv).tolist() == [[True, True, True, False, False, True, True, False]]
  assert np.asarray(pos)[0][np.asarray(kv)[0]].tolist() == [0, 1, 2, 3, 4]
  assert np.asarray(slot).tolist() == [[0, 0, 1, 2, 3, 0, 0, 0]]


def test_llm_logits_and_seg_masks(setup):
  ref, model, _, want, got = setup
  ids, vm, ok = _prompt(2)

  @nnx.jit
  def run(m, ids, vm, ok, visual, visual_valid):
    embeds, pos, kv = m.splice(ids, vm, ok, visual, visual_valid)
    hidden, _ = m.llm(embeds, pos, key_valid=kv)
    return m.llm.logits(hidden), hidden, kv

  logits, hidden, kv = run(model, ids, vm, ok, got["visual"], got["visual_valid"])
  logits, hidden, kv = np.asarray(logits), np.asarray(hidden), np.asarray(kv)
  errs, seg_states, ref_seg = [], [], []
  for b, vis in enumerate(want["visual"]):
    w_logits, w_hidden = ref.llm_forward(ref.prompt_embeds(BEFORE, vis, AFTER))
    slots = np.flatnonzero(kv[b])
    assert slots.size == w_logits.shape[1] == len(BEFORE) + vis.shape[0] + len(AFTER)
    errs.append(float(np.max(np.abs(logits[b, slots] - w_logits[0].numpy()))))
    # [SEG] inputs (two per image, in the text after the image).
    seg_ref_pos = len(BEFORE) + vis.shape[0] + np.flatnonzero(np.asarray(AFTER) == SEG)
    seg_states.append(hidden[b, slots[seg_ref_pos]])
    ref_seg.append(w_hidden[0, seg_ref_pos])
  assert max(errs) <= TOL, errs
  assert np.abs(logits[np.asarray(kv)]).max() > 1.0       # logits are not trivially small
  # Positions matter: counting the unused span slots (plain 0..L-1) changes the text's logits.
  @nnx.jit
  def naive_run(m, ids, vm, ok, visual, visual_valid):
    embeds, _, kv = m.splice(ids, vm, ok, visual, visual_valid)
    arange = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return m.llm.logits(m.llm(embeds, arange, key_valid=kv)[0])

  naive = np.asarray(naive_run(model, ids, vm, ok, got["visual"], got["visual_valid"]))
  assert np.abs(naive[0, np.flatnonzero(kv[0])] - logits[0, np.flatnonzero(kv[0])]).max() > 1e-2

  seg_hidden = jnp.asarray(np.stack(seg_states))           # [B, M=2, D]
  masks = nnx.jit(lambda m, h, mf, mem: m.seg_masks(h, mf, mem))(
      model, seg_hidden, got["mask_features"], got["memories"])
  assert masks.shape == (2, 2, CFG.mask_size, CFG.mask_size)
  w_masks = ref.seg_masks(torch.cat(ref_seg), torch.tensor([0, 0, 1, 1]), want["mask_features"],
                          want["memories"]).numpy()
  mask_err = float(np.max(np.abs(np.asarray(masks).reshape(w_masks.shape) - w_masks)))
  assert mask_err <= TOL, mask_err
  # The masks differ between [SEG]s and images (the batch index really selects features).
  assert np.abs(w_masks[0] - w_masks[2]).max() > 0.1
  print("logits max abs err per image", errs, "[SEG] mask logits err", mask_err)


def test_greedy_generation(setup):
  ref, model, _, want, got = setup
  ids, vm, ok = _prompt(2)
  sampler = SamplerConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)

  @nnx.jit
  def packed(m, ids, vm, ok, visual, visual_valid):
    embeds, _, kv = m.splice(ids, vm, ok, visual, visual_valid)
    return pack_prompt(embeds, kv, vm)

  embeds, valid, vis_mask, _ = packed(model, ids, vm, ok, got["visual"], got["visual_valid"])
  lengths = np.asarray(valid).sum(1)
  assert lengths[0] != lengths[1]                           # right padding differs per row
  out = generate(model.llm, embeds, valid, vis_mask, sampler=sampler)
  for b, vis in enumerate(want["visual"]):
    w_tokens, w_states = ref.greedy(ref.prompt_embeds(BEFORE, vis, AFTER), NEW_TOKENS)
    assert np.asarray(out.tokens[b]).tolist() == w_tokens, b
    np.testing.assert_allclose(np.asarray(out.hidden[b]), w_states.numpy(), atol=TOL, rtol=0)
  assert len(set(np.asarray(out.tokens).ravel().tolist())) > 1   # not one repeated id


def test_seg_hidden_from_generation():
  tokens = jnp.asarray([[5, SEG, 7, SEG, SEG], [SEG, 2, 0, 0, 0]], jnp.int32)
  hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  lengths = jnp.asarray([5, 2], jnp.int32)
  h, ok = seg_hidden_from_generation(tokens, hidden, lengths, SEG, 3)
  # Row 0: [SEG]s at 1 and 3 have states at 2 and 4; the last token (index 4) has none.
  assert np.asarray(ok).tolist() == [[True, True, False], [True, False, False]]
  np.testing.assert_array_equal(np.asarray(h[0, :2]), np.asarray(hidden[0, [2, 4]]))
  np.testing.assert_array_equal(np.asarray(h[1, 0]), np.asarray(hidden[1, 1]))
  assert not np.asarray(h[0, 2]).any()
  h, ok = seg_hidden_from_generation(tokens, hidden, lengths, SEG, 7)
  assert h.shape == (2, 7, 3) and np.asarray(ok).sum() == 3


def test_config_and_release_shapes():
  c = OMGLLaVAConfig.omg_llava_7b(num_class_prototypes=7)
  assert (c.grid, c.num_pixel_tokens, c.num_visual_tokens_max, c.mask_size) == (16, 256, 513, 256)
  assert OMGLLaVAConfig.from_dict(c.to_dict()) == c
  assert OMGLLaVAConfig.from_dict(CFG.to_dict()) == CFG
  assert (CFG.grid, CFG.num_visual_tokens_max) == (4, 29)
  a = abstract_omg_llava(c)
  assert isinstance(a.class_embed, Buffer) and a.class_embed.get_value().shape == (133, 7, 768)
  assert a.projector.pixel_fc1.kernel.get_value().shape == (6656, 4096)
  assert a.text2vision.fc2.kernel.get_value().shape == (512, 512)
  assert a.llm.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
  assert a.backbone.layer4.blocks[0].fc1.kernel.get_value().dtype == jnp.float32
  # Every variable (the class_embed buffer included) has logical axis names the table resolves.
  specs, _ = sharding.plan_param_specs(nnx.state(a), {"data": 1, "fsdp": 2, "tensor": 4})
  assert ("class_embed",) in specs and len(specs) == len(nnx.state(a).flat_state())
  with pytest.raises(ValueError, match="grid"):
    dataclasses.replace(CFG, grid=3)
  with pytest.raises(ValueError, match="projector.pixel_dim"):
    dataclasses.replace(CFG, projector=dataclasses.replace(CFG.projector, pixel_dim=41))
  with pytest.raises(ValueError, match="malformed"):
    OMGLLaVAConfig.from_dict({"backbone": {}})


def test_bad_inputs(setup):
  _, model, _, _, got = setup
  with pytest.raises(ValueError, match="pixels must be"):
    model.encode_image(jnp.zeros((1, 128, 128, 3)))
  ids, vm, ok = _prompt(2)
  with pytest.raises(ValueError, match="visual"):
    model.splice(ids, vm, ok, got["visual"][:1], got["visual_valid"][:1])
  with pytest.raises(ValueError, match="seg_hidden"):
    model.seg_masks(jnp.zeros((2, 1, 5)), got["mask_features"], got["memories"])
