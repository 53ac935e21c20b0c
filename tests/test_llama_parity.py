"""LLaMA decoder parity against `transformers.LlamaForCausalLM` (fp32, CPU, tiny configs).

Proves: weights load through the HF-name table; logits match HF (MHA and GQA) for plain,
right-padded and gapped-position inputs; prefill + one-token decode through the fixed-size cache
(per-row write slots) reproduces a full forward; split layer ranges compose; pruned (gathered,
original-position) sequences equal mask-mode pruning; and the last-query q/k give HF's eager
attention row of that layer (FastV), and `layer_query_key` the next layer's (PyramidDrop).
"""

import functools

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from altp_jax.attention_scores import last_query_scores
from eval.torch_reference import hf_llama_kwargs
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM
from models.llama.params import HF_LLAMA_TABLE
from models.param_tables import load_state_dict
from tests.hf_reference import import_transformers

transformers = import_transformers()
ATOL = 1e-4


# Jitted entry points: one compile per shape is much cheaper on CPU than op-by-op dispatch.
@functools.partial(jax.jit, static_argnames=("start", "end", "return_qk"))
def run_layers(model, x, pos, start, end, cache=None, index=None, key_valid=None,
               return_qk=False):
  return model.run_layers(x, pos, start, end, cache=cache, cache_write_index=index,
                          key_valid=key_valid, return_qk=return_qk)


def _logits_and_cache(model, hidden, cache):
  return model.logits(hidden), cache


@jax.jit
def forward(model, ids, pos, key_valid=None):
  """ids [B,T] -> (logits [B,T,V], post-norm hidden [B,T,D])."""
  hidden, _ = model(model.embed(ids), pos, key_valid=key_valid)
  return model.logits(hidden), hidden


def reference_last_query_scores(q_last, keys, key_valid):
  """softmax(q·k/sqrt(Dh)) over valid keys, mean over query heads (GQA: query head h uses kv head
  h // (Hq/Hkv)). q_last [B,Hq,Dh], keys [B,T,Hkv,Dh], key_valid [B,T] -> [B,T]."""
  q = np.asarray(q_last, np.float64)
  k = np.asarray(keys, np.float64)
  groups = q.shape[1] // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  logits = np.einsum("bhd,bthd->bht", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.asarray(key_valid)[:, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p.mean(1)


def _build(num_kv_heads):
  cfg = LlamaConfig.tiny(num_layers=3, num_kv_heads=num_kv_heads)
  hf_cfg = transformers.LlamaConfig(**hf_llama_kwargs(cfg), initializer_range=0.15,
                                    attn_implementation="eager")
  torch.manual_seed(num_kv_heads)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # non-trivial norm weights, so a skipped or misplaced norm shows
    for name, p in hf.named_parameters():
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, hf.state_dict(), HF_LLAMA_TABLE)
  return cfg, hf, model


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def models(request):
  return _build(request.param)


@pytest.fixture(scope="module")
def gqa_models():
  """The cache/layer-range logic is head-layout agnostic; GQA is the harder layout to get right."""
  return _build(2)


def _hf_logits(hf, ids, positions, mask=None, **kw):
  with torch.no_grad():
    out = hf(input_ids=torch.as_tensor(np.asarray(ids)),
             position_ids=torch.as_tensor(np.array(positions)),
             attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask, np.int64)),
             **kw)
  return out


def _ids(cfg, b, t, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


def test_load_rejects_bad_shapes_and_missing_keys(models):
  cfg, hf, _ = models
  sd = dict(hf.state_dict())
  sd["model.norm.weight"] = torch.ones(cfg.hidden_size + 1)
  del sd["lm_head.weight"]
  with pytest.raises(ValueError, match=r"norm\.weight.*shape(.|\n)*lm_head\.kernel.*not filled"):
    load_state_dict(LlamaForCausalLM(cfg, rngs=nnx.Rngs(1)), sd, HF_LLAMA_TABLE)


def test_logits_match_hf(models):
  cfg, hf, model = models
  ids = _ids(cfg, 2, 13)
  pos = np.broadcast_to(np.arange(13), ids.shape)
  ref = _hf_logits(hf, ids, pos).logits.numpy()
  assert ref.std() > 0.3  # the comparison is not between near-zero numbers
  logits, _ = forward(model, jnp.asarray(ids), jnp.asarray(pos))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL, rtol=0)


def _right_padded(cfg, hf, lengths, seed):
  """Rows of `lengths` real tokens right-padded to max(lengths): ids, valid, positions [B,T] and
  HF's logits [B,T,V]."""
  t = int(max(lengths))
  ids = _ids(cfg, len(lengths), t, seed=seed)
  valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
  pos = np.broadcast_to(np.arange(t), ids.shape)
  return ids, valid, pos, _hf_logits(hf, ids, pos, valid).logits.numpy()


def test_right_padded_batch_matches_hf_on_valid_positions(models):
  cfg, hf, model = models
  lengths = np.array([13, 6, 9])
  ids, valid, pos, ref = _right_padded(cfg, hf, lengths, seed=1)
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(valid))[0])
  np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=0)
  # And each padded row equals that row run alone, unpadded.
  for b, n in enumerate(lengths):
    alone, _ = forward(model, jnp.asarray(ids[b:b + 1, :n]), jnp.asarray(pos[b:b + 1, :n]))
    np.testing.assert_allclose(got[b, :n], np.asarray(alone)[0], atol=ATOL, rtol=0)


@functools.partial(jax.jit, static_argnames=("valid_is_prefix", "slots"))
def _prefill_logits(model, ids, pos, key_valid, valid_is_prefix, slots=None):
  """Logits [B,T,V] and the cache of a prefill (written at slot 0 of `slots` when given)."""
  cache = None if slots is None else model.init_cache(ids.shape[0], slots)
  x, cache = model.run_layers(model.embed(ids), pos, cache=cache,
                              cache_write_index=None if slots is None else 0,
                              key_valid=key_valid, valid_is_prefix=valid_is_prefix)
  return model.logits(model.final_norm(x)), cache


@pytest.mark.parametrize("slots", [None, 16], ids=["no_cache", "cache"])
def test_prefill_masked_by_key_lengths_matches_hf(models, slots):
  """`valid_is_prefix=True` (per-row key lengths instead of a dense mask) on right-padded rows,
  down to a one-token row: HF's logits on the real tokens, the dense-mask run's everywhere
  (padding queries included, which must stay finite), and the same cache (with a cache the
  lengths run attends over the whole buffer, whose extra masked slots change only the order of
  the float sums)."""
  cfg, hf, model = models
  ids, valid, pos, ref = _right_padded(cfg, hf, [13, 6, 1], seed=7)
  args = (model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(valid))
  got, cache = _prefill_logits(*args, valid_is_prefix=True, slots=slots)
  dense, dense_cache = _prefill_logits(*args, valid_is_prefix=False, slots=slots)
  got = np.asarray(got)
  np.testing.assert_allclose(got[valid], ref[valid], atol=ATOL, rtol=0)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, np.asarray(dense), atol=1e-5, rtol=0)
  if slots is not None:
    for a, b in zip(cache.k + cache.v + (cache.valid,), dense_cache.k + dense_cache.v
                    + (dense_cache.valid,)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_gapped_positions_match_hf(models):
  cfg, hf, model = models
  ids = _ids(cfg, 2, 10, seed=2)
  # Pruning-style gaps: original positions of kept tokens, different per row.
  pos = np.array([[0, 1, 2, 7, 9, 12, 13, 14, 15, 16],
                  [0, 3, 4, 5, 6, 20, 21, 40, 41, 42]])
  ref = _hf_logits(hf, ids, pos).logits.numpy()
  logits, _ = forward(model, jnp.asarray(ids), jnp.asarray(pos))
  np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL, rtol=0)


def test_prefill_then_decode_matches_full_forward(models):
  cfg, hf, model = models
  total, slots = 14, 16
  ids = _ids(cfg, 2, total, seed=3)
  pos = np.broadcast_to(np.arange(total), ids.shape)
  ref = _hf_logits(hf, ids, pos).logits.numpy()
  # Rows have different prompt lengths: a right-padded prefill, then per-row write slots.
  prompt = np.array([9, 5])
  t0 = prompt.max()
  valid = np.arange(t0)[None] < prompt[:, None]
  cache = model.init_cache(2, slots)
  step = jax.jit(lambda m, ids, p, c, i, kv: _logits_and_cache(
      m, *m(m.embed(ids), p, cache=c, cache_write_index=i, key_valid=kv)))
  got, cache = step(model, jnp.asarray(ids[:, :t0]), jnp.asarray(pos[:, :t0]), cache, 0,
                    jnp.asarray(valid))
  got = np.asarray(got)
  np.testing.assert_allclose(got[valid], ref[:, :t0][valid], atol=ATOL, rtol=0)
  rows = np.arange(2)
  for s in range(total - t0):
    at = prompt + s  # each row's next slot == its next position
    logits, cache = step(model, jnp.asarray(ids[rows, at][:, None]), jnp.asarray(at[:, None]),
                         cache, jnp.asarray(at), None)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], ref[rows, at],
                               atol=ATOL, rtol=0, err_msg=f"decode step {s}")
  assert np.asarray(cache.valid).sum(1).tolist() == (prompt + total - t0).tolist()


def test_layer_ranges_compose(gqa_models):
  cfg, _, model = gqa_models
  k = 1
  ids = _ids(cfg, 2, 11, seed=4)
  pos = jnp.broadcast_to(jnp.arange(11), ids.shape)
  x = model.embed(jnp.asarray(ids))
  full = forward(model, jnp.asarray(ids), pos)[1]
  h, _ = run_layers(model, x, pos, 0, k)
  h, _ = run_layers(model, h, pos, k, cfg.num_layers)
  np.testing.assert_allclose(np.asarray(model.final_norm(h)), np.asarray(full), atol=1e-5, rtol=0)
  # Same with one cache per range, prefill then a decode step.
  ca, cb = model.init_cache(2, 12, 0, k), model.init_cache(2, 12, k, cfg.num_layers)
  h, ca = run_layers(model, x[:, :10], pos[:, :10], 0, k, cache=ca, index=0)
  h, cb = run_layers(model, h, pos[:, :10], k, cfg.num_layers, cache=cb, index=0)
  h, ca = run_layers(model, x[:, 10:], pos[:, 10:], 0, k, cache=ca, index=10)
  h, cb = run_layers(model, h, pos[:, 10:], k, cfg.num_layers, cache=cb, index=10)
  np.testing.assert_allclose(np.asarray(model.final_norm(h)), np.asarray(full[:, 10:]),
                             atol=1e-5, rtol=0)


def test_pruned_sequence_with_short_cache_equals_mask_mode(gqa_models):
  """FastV at layer K: gathering the kept tokens (original positions) into a shorter sequence with
  its own shorter cache gives the same states as masking the dropped keys in the full sequence."""
  cfg, _, model = gqa_models
  k, t = 1, 12
  ids = _ids(cfg, 2, t + 1, seed=5)
  pos = jnp.broadcast_to(jnp.arange(t + 1), ids.shape)
  x = model.embed(jnp.asarray(ids))
  keep = np.ones((2, t), bool)
  keep[0, [2, 3, 5, 8]] = False
  keep[1, [1, 4, 6, 7]] = False
  h, _ = run_layers(model, x[:, :t], pos[:, :t], 0, k)
  masked, _ = run_layers(model, h, pos[:, :t], k, cfg.num_layers, key_valid=jnp.asarray(keep))
  order = np.stack([np.flatnonzero(r) for r in keep])  # 8 kept per row, original order
  hg = jnp.take_along_axis(h, jnp.asarray(order)[..., None], axis=1)
  pg = jnp.take_along_axis(pos[:, :t], jnp.asarray(order), axis=1)
  cache = model.init_cache(2, order.shape[1] + 1, k, cfg.num_layers)
  gathered, cache = run_layers(model, hg, pg, k, cfg.num_layers, cache=cache, index=0)
  np.testing.assert_allclose(np.asarray(gathered),
                             np.take_along_axis(np.asarray(masked), order[..., None], axis=1),
                             atol=1e-5, rtol=0)
  # A decode token after pruning: full-length run with dropped keys masked vs the short cache.
  hx, _ = run_layers(model, x, pos, 0, k)
  ref, _ = run_layers(model, hx, pos, k, cfg.num_layers,
                      key_valid=jnp.asarray(np.concatenate([keep, np.ones((2, 1), bool)], 1)))
  got, _ = run_layers(model, hx[:, t:], pos[:, t:], k, cfg.num_layers, cache=cache,
                      index=order.shape[1])
  np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(ref[:, t]), atol=1e-5, rtol=0)


def test_last_query_scores_match_hf_eager_attention(models):
  cfg, hf, model = models
  k = 2
  lengths = np.array([12, 8])
  ids = _ids(cfg, 2, 12, seed=6)
  valid = np.arange(12)[None] < lengths[:, None]
  pos = np.broadcast_to(np.arange(12), ids.shape)
  attn = _hf_logits(hf, ids, pos, valid, output_attentions=True).attentions
  rows, last = np.arange(2), lengths - 1
  x = model.embed(jnp.asarray(ids))
  h_prev, _ = run_layers(model, x, jnp.asarray(pos), 0, k - 1, key_valid=jnp.asarray(valid))
  h, _, (q, kk) = run_layers(model, h_prev, jnp.asarray(pos), k - 1, k,
                             key_valid=jnp.asarray(valid), return_qk=True)
  q_last = np.asarray(q)[rows, last]  # [B, Hq, Dh]
  # FastV: layer K-1's own q/k.
  want = attn[k - 1].numpy()[rows, :, last, :].mean(1)
  np.testing.assert_allclose(reference_last_query_scores(q_last, kk, valid), want, atol=1e-5,
                             rtol=0)
  got = last_query_scores(jnp.asarray(q_last), kk, jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  # PyramidDrop: layer K's input-norm + q/k + RoPE on its input equals what layer K computes.
  qn, kn = model.layer_query_key(k, h, jnp.asarray(pos))
  _, _, (q2, k2) = run_layers(model, h, jnp.asarray(pos), k, k + 1,
                              key_valid=jnp.asarray(valid), return_qk=True)
  np.testing.assert_allclose(np.asarray(qn), np.asarray(q2), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(kn), np.asarray(k2), atol=1e-6, rtol=0)
  want_next = attn[k].numpy()[rows, :, last, :].mean(1)
  got_next = last_query_scores(qn[rows, last], kn, jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(got_next), want_next, atol=1e-5, rtol=0)


def test_run_layers_rejects_mismatched_inputs(gqa_models):
  cfg, _, model = gqa_models
  x = jnp.zeros((2, 5, cfg.hidden_size))
  pos = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="cache_write_index is required"):
    model.run_layers(x, pos, cache=model.init_cache(2, 8))
  with pytest.raises(ValueError, match=r"cache has 3 layers.*need 2"):
    model.run_layers(x, pos, 1, 3, cache=model.init_cache(2, 8), cache_write_index=0)
  with pytest.raises(ValueError, match="do not fit"):
    model.run_layers(x, pos, cache=model.init_cache(2, 4), cache_write_index=0)
  with pytest.raises(ValueError, match="positions shape"):
    model.run_layers(x, pos[:, :4])
  with pytest.raises(ValueError, match=r"layer range \[2, 2\)"):
    model.run_layers(x, pos, 2, 2)


def test_attention_backend_choice(monkeypatch):
  # "auto": cuDNN flash for multi-token calls where it runs, XLA for one-token decode steps and
  # wherever cuDNN cannot run (this CPU, fp32, head dims it does not take).
  import dataclasses
  from eval.bench import ATTENTION_IMPLS as bench_impls   # the CLI's copy of the list
  from models import cudnn
  from models.clip.config import CLIPVisionConfig
  from models.llama.modeling import LlamaAttention
  assert bench_impls == cudnn.ATTENTION_IMPLS
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    LlamaConfig.tiny(attention_impl="flash")

  def backend(cfg, t, dtype):
    return LlamaAttention(cfg, rngs=nnx.Rngs(0)).backend(t, dtype)
  tiny, tiny16 = LlamaConfig.tiny(), LlamaConfig.tiny(head_dim=20)
  assert backend(tiny, 640, jnp.bfloat16) == "xla"          # no cuDNN on this backend
  monkeypatch.setattr(cudnn, "flash_head_dim_limit", lambda dtype: 256)
  assert backend(tiny, 640, jnp.bfloat16) == "cudnn"
  assert backend(tiny, 1, jnp.bfloat16) == "xla"            # a decode step
  assert backend(tiny16, 640, jnp.bfloat16) == "xla"        # head dim 20: not a multiple of 8
  assert backend(LlamaConfig.tiny(attention_impl="xla"), 640, jnp.bfloat16) == "xla"
  assert backend(LlamaConfig.tiny(attention_impl="cudnn"), 1, jnp.bfloat16) == "cudnn"
  monkeypatch.undo()
  assert cudnn.flash_head_dim_limit(jnp.bfloat16) == 0
  clip = CLIPVisionConfig.tiny()
  with pytest.raises(ValueError, match="CLIPVisionConfig: attention_impl 'flash'"):
    dataclasses.replace(clip, attention_impl="flash")
  # A saved config without the field (written before it existed) loads with "auto".
  from models import config_io
  d = config_io.encode(dataclasses.asdict(tiny))
  del d["attention_impl"]
  assert LlamaConfig(**config_io.decode_dtypes(d)).attention_impl == "auto"
