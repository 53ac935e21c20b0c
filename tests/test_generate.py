"""Generation: prefill + while_loop decode equals uncached step-by-step recomputation.

The reference below re-runs the whole model on the whole sequence at every step (no KV cache),
re-implementing the in-LLM pruning with a NumPy full-attention softmax, so cache slots, per-stage
positions and the kept subsets are all checked against an independent path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import altp_jax
from models import generate as gen
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM


def _model(num_layers=4, num_kv_heads=4, seed=0):
  cfg = LlamaConfig.tiny(num_layers=num_layers, num_kv_heads=num_kv_heads)
  return LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def _prompt(llm, b=1, t=20, n=8, vis_start=3, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, llm.config.vocab_size, (b, t))
  embeds = np.array(llm.embed(jnp.asarray(ids)))
  # Visual slots carry random "image" embeddings, as after the projector.
  vis = np.zeros((b, t), bool)
  vis[:, vis_start:vis_start + n] = True
  embeds[vis] = rng.normal(size=(int(vis.sum()), embeds.shape[-1])) * 0.5
  return jnp.asarray(embeds, jnp.float32), vis


def _np_last_query_scores(q_last, k):
  """q_last [Hq, Dh], k [T, Hkv, Dh] -> [T], full softmax in float64, mean over heads."""
  hq, dh = q_last.shape
  k = np.repeat(np.asarray(k, np.float64), hq // k.shape[1], axis=1)
  logits = np.einsum("hd,thd->ht", np.asarray(q_last, np.float64), k) / np.sqrt(dh)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).mean(0)


def _reference(llm, embeds, vis, plan, steps):
  """Uncached greedy decoding of one unpadded row under `plan`."""
  x = embeds
  t = x.shape[1]
  pos = np.arange(t)
  keeps, stage_pos = [], []
  vis_row = vis[0].copy()
  for s, ((start, end), n_s) in enumerate(zip(plan.bounds, plan.visual_counts)):
    stage_pos.append(pos.copy())
    if s == len(plan.bounds) - 1:
      break
    out = llm.run_layers(x, jnp.asarray(pos[None]), start, end, return_qk=True)
    x = out[0]
    if plan.score == "fastv":
      q, k = out[2]
    else:
      q, k = llm.layer_query_key(end, x, jnp.asarray(pos[None]))
    scores = _np_last_query_scores(np.asarray(q)[0, -1], np.asarray(k)[0])
    vis_idx = np.flatnonzero(vis_row)
    top = np.sort(np.argsort(-scores[vis_idx], kind="stable")[: plan.visual_counts[s + 1]])
    keep = ~vis_row
    keep[vis_idx[top]] = True
    keep_slots = np.flatnonzero(keep)
    keeps.append(keep_slots)
    x = x[:, keep_slots]
    pos = pos[keep_slots] if plan.positions == "original" else np.arange(len(keep_slots))
    vis_row = vis_row[keep_slots]
  tokens, hiddens = [], []
  for _ in range(steps):
    g = len(tokens)
    x = embeds if not g else jnp.concatenate(
        [embeds, llm.embed(jnp.asarray([tokens], jnp.int32))], axis=1)
    prompt_len = embeds.shape[1]
    for s, (start, end) in enumerate(plan.bounds):
      if s > 0:  # drop the pruned prompt slots; generated tokens always stay
        x = jnp.concatenate([x[:, :prompt_len][:, keeps[s - 1]], x[:, prompt_len:]], axis=1)
        prompt_len = len(keeps[s - 1])
      p = np.concatenate([stage_pos[s], stage_pos[s][-1] + 1 + np.arange(g)])
      x, _ = llm.run_layers(x, jnp.asarray(p[None]), start, end)
    h = llm.final_norm(x)[:, -1]
    tokens.append(int(jnp.argmax(llm.logits(h[:, None])[0, 0])))
    hiddens.append(np.asarray(h[0]))
  return np.array(tokens), np.stack(hiddens)


@pytest.mark.parametrize("kind", ["none", "fastv", "pdrop_compact", "fastv_gqa"])
def test_generate_matches_uncached_reference(kind):
  llm = _model(num_kv_heads=2 if kind == "fastv_gqa" else 4)
  embeds, vis = _prompt(llm)
  n = int(vis.sum())
  if kind == "none":
    plan = gen.PrunePlan.none(4, n)
  elif kind.startswith("fastv"):
    plan = gen.PrunePlan.fastv(4, n, altp_jax.FastVConfig(layer=2, reduction=0.5))
  else:
    plan = gen.PrunePlan.pdrop(n, altp_jax.PyramidSchedule((1, 2, 3), (0.5, 0.25, 0.125), 4))
  steps = 6
  out = gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis, plan=plan,
                     sampler=gen.SamplerConfig(max_new_tokens=steps, eos_id=-1))
  want_tokens, want_hidden = _reference(llm, embeds, vis, plan, steps)
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), want_tokens)
  np.testing.assert_allclose(np.asarray(out.hidden[0]), want_hidden, atol=1e-4, rtol=1e-4)
  assert out.keep_index.shape == (1, plan.stage_lengths(embeds.shape[1])[-1])


def test_right_padded_batch_equals_rows_alone():
  llm = _model()
  embeds, vis = _prompt(llm, b=2, t=20)
  valid = np.ones((2, 20), bool)
  valid[1, 15:] = False                               # row 1 is 5 tokens shorter
  sampler = gen.SamplerConfig(max_new_tokens=5, eos_id=-1)
  plan = gen.PrunePlan.fastv(4, 8, altp_jax.FastVConfig(layer=1, reduction=0.5))
  both = gen.generate(llm, embeds, valid, vis, plan=plan, sampler=sampler)
  row1 = gen.generate(llm, embeds[1:, :15], valid[1:, :15], vis[1:, :15], plan=plan,
                      sampler=sampler)
  np.testing.assert_array_equal(both.tokens[1], row1.tokens[0])
  np.testing.assert_allclose(both.hidden[1], row1.hidden[0], atol=1e-4, rtol=1e-4)


def test_eos_stops_rows_and_pads():
  llm = _model()
  embeds, vis = _prompt(llm, b=2)
  free = gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis,
                      sampler=gen.SamplerConfig(max_new_tokens=6, eos_id=-1))
  eos = int(free.tokens[0, 2])                       # make row 0's third token the EOS
  out = gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis,
                     sampler=gen.SamplerConfig(max_new_tokens=6, eos_id=eos, pad_id=0))
  row = np.asarray(out.tokens[0])
  first = int(np.flatnonzero(row == eos)[0])
  assert int(out.lengths[0]) == first + 1
  np.testing.assert_array_equal(row[: first + 1], np.asarray(free.tokens[0, : first + 1]))
  assert np.all(row[first + 1:] == 0)
  forced = gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis,
                        sampler=gen.SamplerConfig(max_new_tokens=6, eos_id=eos, ignore_eos=True))
  np.testing.assert_array_equal(forced.tokens, free.tokens)
  assert np.all(np.asarray(forced.lengths) == 6)


def test_sampling_is_seeded_and_top_p_small_is_greedy():
  llm = _model()
  embeds, vis = _prompt(llm, b=2)
  valid = jnp.ones(vis.shape, bool)
  s = gen.SamplerConfig(max_new_tokens=5, eos_id=-1, temperature=1.0)
  a = gen.generate(llm, embeds, valid, vis, sampler=s, rng=jax.random.key(1))
  b = gen.generate(llm, embeds, valid, vis, sampler=s, rng=jax.random.key(1))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  greedy = gen.generate(llm, embeds, valid, vis, sampler=gen.SamplerConfig(5, eos_id=-1))
  nucleus = gen.generate(llm, embeds, valid, vis, rng=jax.random.key(2), sampler=gen.SamplerConfig(
      5, eos_id=-1, temperature=1.0, top_p=1e-6))
  np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)


def test_no_recompilation_across_prompts():
  llm = _model()
  sampler = gen.SamplerConfig(max_new_tokens=3, eos_id=-1)
  embeds, vis = _prompt(llm, seed=1)
  gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis, sampler=sampler)
  before = gen._generate_jit._cache_size()
  for seed in (2, 3):
    embeds, vis = _prompt(llm, seed=seed)
    gen.generate(llm, embeds, jnp.ones(vis.shape, bool), vis, sampler=sampler)
  assert gen._generate_jit._cache_size() == before


def test_plan_validation():
  with pytest.raises(ValueError, match="must be < num_layers"):
    gen.PrunePlan.fastv(2, 8, altp_jax.FastVConfig(layer=2))
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.SamplerConfig(max_new_tokens=0)
  plan = gen.PrunePlan.pdrop(576, altp_jax.default_schedule(32))
  assert plan.average_visual_retention() == pytest.approx(
      altp_jax.default_schedule(32).average_retention(576))


def test_decode_phases_cover_every_step_once():
  # Each phase's loop reads the cache only up to its last step's slot (`key_limit`); the
  # uncached-reference test above runs 5 steps in 4 such phases.
  assert gen._decode_phases(64) == [(1, 15), (16, 31), (32, 47), (48, 63)]
  assert gen._decode_phases(6) == [(1, 1), (2, 2), (3, 3), (4, 5)]
  assert gen._decode_phases(1) == []
  llm = _model(num_layers=1)
  cache = llm.init_cache(1, 8)
  x = llm.embed(jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ValueError, match="key_limit 9 outside a cache of 8 slots"):
    llm.run_layers(x, jnp.zeros((1, 1), jnp.int32), cache=cache, cache_write_index=0,
                   key_limit=9)
