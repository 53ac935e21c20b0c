"""Mask-mode in-LLM pruning equals gather mode (issue #4: "the mask-mode and gather-mode
implementations of FastV and PyramidDrop agree").

Mask mode keeps all T slots in every layer and clears the dropped tokens' key-valid bits; gather
mode really shortens the sequence and its caches. On a right-padded batch whose rows have different
prompt lengths and visual spans, both must generate the same tokens, the same hidden states at
every generated step (fp32, 1e-5) and keep the same prompt slots, for FastV (K=2, several ratios)
and PyramidDrop (two drops, three stages), with original and compact positions, MHA and GQA. The
MHA cases also check that pruning (and the compact renumbering) really changes the output beyond
the tolerance, and every case that the kept sets are not the trivial "first k", so the agreement
is not the trivial one of two unpruned runs.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import altp_jax
from models import generate as gen
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM

L, T, N, STEPS = 3, 26, 12, 5
PROMPT_LENS = (26, 19, 22)     # right padding: rows 1 and 2 are shorter
VIS_STARTS = (2, 5, 3)         # each row's 12 visual slots start elsewhere
SAMPLER = gen.SamplerConfig(max_new_tokens=STEPS, eos_id=-1)
TOL = dict(atol=1e-5, rtol=1e-5)

_MODELS, _UNPRUNED = {}, {}


def _model(num_kv_heads):
  if num_kv_heads not in _MODELS:
    cfg = LlamaConfig.tiny(num_layers=L, num_kv_heads=num_kv_heads)
    _MODELS[num_kv_heads] = LlamaForCausalLM(cfg, rngs=nnx.Rngs(num_kv_heads))
  return _MODELS[num_kv_heads]


def _batch(llm, seed=0):
  """embeds [3, T, D], valid [3, T], visual_mask [3, T] (N visual slots per row)."""
  rng = np.random.default_rng(seed)
  b = len(PROMPT_LENS)
  ids = rng.integers(3, llm.config.vocab_size, (b, T))
  embeds = np.array(llm.embed(jnp.asarray(ids)))
  valid = np.arange(T)[None, :] < np.array(PROMPT_LENS)[:, None]
  vis = np.zeros((b, T), bool)
  for r, s in enumerate(VIS_STARTS):
    vis[r, s:s + N] = True
  assert np.all(vis <= valid) and not np.any(vis[np.arange(b), np.array(PROMPT_LENS) - 1])
  embeds[vis] = rng.normal(size=(int(vis.sum()), embeds.shape[-1])) * 0.5
  return jnp.asarray(embeds, jnp.float32), jnp.asarray(valid), jnp.asarray(vis)


def _run(llm, batch, plan):
  return gen.generate(llm, *batch, plan=plan, sampler=SAMPLER)


def _assert_modes_agree(llm, batch, plan):
  """Runs `plan` in both modes; asserts equal tokens, hidden (1e-5) and kept slots."""
  gathered = _run(llm, batch, dataclasses.replace(plan, mode="gather"))
  masked = _run(llm, batch, dataclasses.replace(plan, mode="mask"))
  np.testing.assert_array_equal(np.asarray(masked.tokens), np.asarray(gathered.tokens))
  np.testing.assert_allclose(np.asarray(masked.hidden), np.asarray(gathered.hidden), **TOL)
  np.testing.assert_array_equal(np.asarray(masked.keep_index), np.asarray(gathered.keep_index))
  _check_kept_slots(np.asarray(masked.keep_index), batch, plan.visual_counts[-1])
  return gathered


def _check_kept_slots(keep_index, batch, k):
  """Every text/padding slot survives, exactly k visual slots per row, and the ranking is not
  the trivial "first k" for every row."""
  _, _, vis = (np.asarray(a) for a in batch)
  trivial = []
  for r in range(vis.shape[0]):
    assert np.all(np.diff(keep_index[r]) > 0)
    kept_vis = [j for j in keep_index[r] if vis[r, j]]
    assert len(kept_vis) == k
    assert set(np.flatnonzero(~vis[r])) <= set(keep_index[r])
    trivial.append(kept_vis == list(np.flatnonzero(vis[r])[:k]))
  assert not all(trivial)


def _unpruned(llm, batch):
  key = (id(llm), float(np.asarray(batch[0]).sum()))
  if key not in _UNPRUNED:   # one compile shared by the tests that need it
    _UNPRUNED[key] = _run(llm, batch, gen.PrunePlan.none(L, N))
  return _UNPRUNED[key]


def _assert_differs(a, b, what):
  diff = float(np.max(np.abs(np.asarray(a.hidden) - np.asarray(b.hidden))))
  assert diff > 1e-3, f"{what}: hidden states differ by only {diff}"


@pytest.mark.parametrize("reduction,positions,num_kv_heads", [
    (0.25, "original", 4), (0.75, "compact", 4), (0.5, "compact", 2)])
def test_fastv_mask_equals_gather(reduction, positions, num_kv_heads):
  llm = _model(num_kv_heads)
  batch = _batch(llm)
  cfg = altp_jax.FastVConfig(layer=2, reduction=reduction, positions=positions)
  out = _assert_modes_agree(llm, batch, gen.PrunePlan.fastv(L, N, cfg))
  if num_kv_heads == 4:
    _assert_differs(out, _unpruned(llm, batch), "FastV vs unpruned")
  if positions == "compact" and num_kv_heads == 4:
    # Same kept set (FastV selects before any renumbering), positions not renumbered: what a mask
    # mode that forgot the compaction would produce. It must not pass for the compact result.
    plain = _run(llm, batch, gen.PrunePlan.fastv(L, N, dataclasses.replace(
        cfg, positions="original"), mode="mask"))
    np.testing.assert_array_equal(np.asarray(plain.keep_index), np.asarray(out.keep_index))
    _assert_differs(out, plain, "compact vs original positions")


@pytest.mark.parametrize("positions,num_kv_heads", [("compact", 4), ("original", 2)])
def test_pdrop_mask_equals_gather(positions, num_kv_heads):
  llm = _model(num_kv_heads)
  batch = _batch(llm, seed=1)
  sched = altp_jax.PyramidSchedule((1, 2), (0.5, 0.25), L, positions=positions)
  plan = gen.PrunePlan.pdrop(N, sched)
  assert plan.visual_counts == (12, 6, 3)
  out = _assert_modes_agree(llm, batch, plan)
  if num_kv_heads == 4:
    _assert_differs(out, _unpruned(llm, batch), "PyramidDrop vs unpruned")


def test_keep_all_mask_mode_equals_unpruned():
  """Keep ratio 1.0: a two-stage FastV plan in mask mode is the unpruned model (equal tokens and
  kept slots; hidden states up to fp32 reassociation between two compiled programs)."""
  llm = _model(4)
  batch = _batch(llm)
  plan = gen.PrunePlan.fastv(L, N, altp_jax.FastVConfig(layer=2, reduction=0.0), mode="mask")
  assert len(plan.bounds) == 2 and plan.visual_counts == (N, N)
  out, full = _run(llm, batch, plan), _unpruned(llm, batch)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(full.hidden), atol=2e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.keep_index), np.asarray(full.keep_index))


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _prefill_and_one_step(graphdef, state, embeds, valid, vis, *, plan):
  llm = nnx.merge(graphdef, state)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), valid.shape)
  caches, index, _, next_pos, lengths = gen._prefill(llm, embeds, positions, valid, vis, plan,
                                                     STEPS)
  token = jnp.arange(valid.shape[0], dtype=jnp.int32) + 5
  _, stepped = gen._decode_step(llm, token, caches, next_pos, lengths, 1)
  return [c.valid for c in caches], index, [c.valid for c in stepped]


def test_mask_mode_caches_hide_dropped_slots_during_decode():
  """Stage s's cache valid bits are prompt-valid & kept-through-s at prefill, and stay so after a
  decode step (which only adds its own slot)."""
  llm = _model(4)
  embeds, valid, vis = _batch(llm)
  plan = gen.PrunePlan.pdrop(N, altp_jax.PyramidSchedule((1, 2), (0.5, 0.25), L), mode="mask")
  assert plan.stage_lengths(T) == (T, T, T)
  v, index, stepped = _prefill_and_one_step(*nnx.split(llm), embeds, valid, vis, plan=plan)
  v, stepped, valid = [np.asarray(a) for a in v], [np.asarray(a) for a in stepped], np.asarray(
      valid)
  assert all(a.shape == (3, T + STEPS) for a in v)
  kept_last = np.zeros((3, T), bool)
  np.put_along_axis(kept_last, np.asarray(index), True, axis=1)
  np.testing.assert_array_equal(v[0][:, :T], valid)
  # Stage 1 drops 6 of each row's 12 visual slots, stage 2 another 3; the last stage's set is
  # the kept index and each stage's set contains the next one's.
  np.testing.assert_array_equal(v[1][:, :T].sum(1), valid.sum(1) - 6)
  np.testing.assert_array_equal(v[2][:, :T], valid & kept_last)
  assert np.all(v[2] <= v[1]) and np.all(v[1] <= v[0]) and not np.any(v[0][:, T:])
  for before, after in zip(v, stepped):
    np.testing.assert_array_equal(after[:, :T], before[:, :T])
    assert np.all(after[:, T]) and not np.any(after[:, T + 1:])


def test_mode_validation_and_lengths():
  with pytest.raises(ValueError, match="PrunePlan.mode='hard'"):
    gen.PrunePlan(((0, 4),), (N,), mode="hard")
  plan = gen.PrunePlan.fastv(32, 576, altp_jax.FastVConfig(layer=2, reduction=0.9))
  masked = dataclasses.replace(plan, mode="mask")
  assert plan.stage_lengths(640) == plan.kept_lengths(640) == (640, 122)
  assert masked.stage_lengths(640) == (640, 640) and masked.kept_lengths(640) == (640, 122)
  assert masked.average_visual_retention() == plan.average_visual_retention()
