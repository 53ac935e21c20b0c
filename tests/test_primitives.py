"""FastV / PyramidDrop primitives, baselines, gathers and attention scores."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import altp_jax


def _naive_last_query(q, k, valid):
  """Full attention matrix reference: softmax over valid keys, mean over query heads."""
  b, hq, dh = q.shape
  hkv = k.shape[2]
  k_rep = np.repeat(k, hq // hkv, axis=2)                          # [B, T, Hq, Dh]
  logits = np.einsum("bhd,bthd->bht", q.astype(np.float64), k_rep) / np.sqrt(dh)
  logits = np.where(valid[:, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return p.mean(1)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (6, 1)])
def test_last_query_scores_match_full_attention(hq, hkv):
  rng = np.random.default_rng(hq * 10 + hkv)
  b, t, dh = 3, 11, 8
  q = rng.normal(size=(b, hq, dh)).astype(np.float32)
  k = rng.normal(size=(b, t, hkv, dh)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[1, 7:] = False                          # right padding
  got = altp_jax.last_query_scores(q, k, valid)
  np.testing.assert_allclose(got, _naive_last_query(q, k, valid), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(got)[1, 7:] == 0)


def test_last_query_scores_rejects_bad_heads():
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    altp_jax.last_query_scores(jnp.zeros((1, 6, 4)), jnp.zeros((1, 5, 4, 4)),
                               jnp.ones((1, 5), bool))


def test_last_query_index_and_cls_scores():
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(altp_jax.last_query_index(valid), [2, 3])
  probs = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
  np.testing.assert_allclose(altp_jax.cls_attention_scores(probs),
                             probs[:, :, 0, 1:].mean(1), rtol=1e-6)


@given(hnp.arrays(np.float32, st.integers(1, 20),
                  elements=st.sampled_from([0.0, 0.5, 1.0, np.nan, -np.inf, np.inf])),
       st.data())
def test_topk_exact_k_ties_to_lower_index(scores, data):
  n = len(scores)
  k = data.draw(st.integers(1, n))
  got = np.asarray(altp_jax.topk_select(scores, k))
  assert got.shape == (k,) and np.all(np.diff(got) > 0)
  s = np.where(np.isnan(scores), -np.inf, scores)
  want = sorted(sorted(range(n), key=lambda i: (-s[i], i))[:k])
  np.testing.assert_array_equal(got, want)


def test_random_select_seeded_and_exact():
  key = jax.random.key(3)
  a = np.asarray(altp_jax.random_select(key, (4,), 100, 10))
  b = np.asarray(altp_jax.random_select(key, (4,), 100, 10))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 10) and np.all(np.diff(a, axis=-1) > 0)
  assert not np.array_equal(a, np.asarray(altp_jax.random_select(jax.random.key(4), (4,), 100,
                                                                  10)))


@pytest.mark.parametrize("grid, k", [((24, 24), 58), ((24, 24), 144), ((24, 24), 576),
                                     ((16, 16), 1), ((7, 13), 50), ((1, 9), 4)])
def test_grid_select_is_uniform(grid, k):
  idx = np.asarray(altp_jax.grid_select(grid, k, (2,)))
  assert idx.shape == (2, k) and np.all(np.diff(idx[0]) > 0)
  h, w = grid
  rows, cols = idx[0] // w, idx[0] % w
  if k == 144:  # a 12x12 lattice: every other row and column
    assert len(np.unique(rows)) == 12 and len(np.unique(cols)) == 12
  if k > 1:     # spread over the grid: the bounding box covers most of it
    assert rows.max() - rows.min() >= (h - 1) * 0.5 and cols.max() - cols.min() >= (w - 1) * 0.5


def test_keep_count_conventions():
  assert altp_jax.keep_count(576, 0.9) == 58              # FastV-HF round
  assert altp_jax.keep_count(576, 0.9, "floor") == 57     # PyramidDrop int()
  assert altp_jax.keep_count(576, 0.5) == 288
  assert altp_jax.keep_count(10, 0.99) == 1
  with pytest.raises(ValueError, match="reduction=1.0"):
    altp_jax.keep_count(576, 1.0)


def test_fastv_select_reads_visual_span():
  rng = np.random.default_rng(0)
  b, t, n, h, dh = 2, 12, 6, 2, 4
  visual = np.zeros((b, t), bool)
  visual[0, 2:8] = True
  visual[1, 3:9] = True              # a different image position per row
  q = rng.normal(size=(b, h, dh)).astype(np.float32)
  k = rng.normal(size=(b, t, h, dh)).astype(np.float32)
  valid = np.ones((b, t), bool)
  got = np.asarray(altp_jax.fastv_select(q, k, valid, visual, n, 3))
  full = _naive_last_query(q, k, valid)
  for row in range(b):
    vis_scores = full[row][visual[row]]
    np.testing.assert_array_equal(got[row], np.sort(np.argsort(-vis_scores, kind="stable")[:3]))
  with pytest.raises(ValueError, match="layer=0"):
    altp_jax.FastVConfig(layer=0)


def test_gather_and_positions():
  x = np.arange(2 * 6).reshape(2, 6).astype(np.float32)[..., None]
  keep = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1]], bool)
  y, index, valid = altp_jax.gather_kept(jnp.asarray(x), jnp.asarray(keep), 4)
  np.testing.assert_array_equal(index, [[0, 2, 3, 5], [0, 1, 4, 5]])
  np.testing.assert_array_equal(y[..., 0], x[..., 0][np.arange(2)[:, None], index])
  assert np.all(valid)
  np.testing.assert_array_equal(altp_jax.kept_positions(keep, index, "original"), index)
  np.testing.assert_array_equal(altp_jax.kept_positions(keep, index, "compact"),
                                [[0, 1, 2, 3], [0, 1, 2, 3]])
  _, _, valid = altp_jax.gather_kept(jnp.asarray(x), jnp.asarray(keep), 5)
  assert not valid.all() and valid.sum() == 8
  with pytest.raises(ValueError, match="length=7"):
    altp_jax.gather_kept(jnp.asarray(x), jnp.asarray(keep), 7)


def test_sequence_keep_mask_and_visual_values():
  visual = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
  vkeep = np.array([[1, 0, 1], [0, 1, 1]], bool)
  np.testing.assert_array_equal(altp_jax.sequence_keep_mask(visual, vkeep),
                                [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
  vals = np.arange(10).reshape(2, 5)
  np.testing.assert_array_equal(altp_jax.visual_values(jnp.asarray(vals), visual, 3),
                                [[1, 2, 3], [7, 8, 9]])


def test_pyramid_schedule_retention_and_counts():
  sched = altp_jax.default_schedule(32)
  assert sched.layers == (8, 16, 24)
  assert sched.average_retention() == pytest.approx(0.46875)
  assert sched.kept_counts(576) == (288, 144, 72)
  assert sched.stage_bounds() == ((0, 8), (8, 16), (16, 24), (24, 32))
  with pytest.raises(ValueError, match="unreachable"):
    altp_jax.schedule_for_target(0.1, 32, (8, 16, 24))
  geo = altp_jax.schedule_for_target(0.3, 32, (4, 12, 20))
  assert geo.average_retention() == pytest.approx(0.3, abs=1e-6)
  scaled = altp_jax.schedule_for_target(0.1, 32, (2, 8, 16, 24), base_ratios=(1, .5, .25, .125))
  assert scaled.average_retention() == pytest.approx(0.1, abs=1e-6)
  assert scaled.ratios[0] == pytest.approx(1.2 / 13, rel=1e-4)   # the spec's worked example
  with pytest.raises(ValueError, match="non-increasing"):
    altp_jax.PyramidSchedule((8, 16), (0.25, 0.5))


@given(st.integers(0, 1000), st.integers(1, 16))
def test_select_surviving_keeps_best_alive(seed, k):
  rng = np.random.default_rng(seed)
  n = 16
  scores = rng.random((2, n)).astype(np.float32)
  alive = np.zeros((2, n), bool)
  alive[:, rng.permutation(n)[: max(k, 8)]] = True
  new = np.asarray(altp_jax.select_surviving(jnp.asarray(scores), jnp.asarray(alive), k))
  assert np.all(new.sum(-1) == k)
  assert np.all(~new | alive)                    # only survivors are kept
  for r in range(2):
    alive_scores = np.where(alive[r], scores[r], -np.inf)
    np.testing.assert_array_equal(np.flatnonzero(new[r]),
                                  np.sort(np.argsort(-alive_scores, kind="stable")[:k]))
