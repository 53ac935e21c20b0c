"""ALTP selection: exactness against a plain reading of the spec, and the properties it promises."""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import altp_jax
from altp_jax import altp as altp_mod
from tests.altp_reference import altp_reference


@st.composite
def selection_inputs(draw, max_n=12):
  n = draw(st.sampled_from([1, 2, 5, 12][: 1 + sum(x <= max_n for x in [2, 5, 12])]))
  k = draw(st.integers(1, n))
  groups = draw(st.integers(1, n))
  # Scores with many ties: small integers, sometimes constant, sometimes NaN.
  scores = draw(hnp.arrays(np.float32, n, elements=st.sampled_from([0.0, 1.0, 2.0, 3.0, 7.0])))
  if draw(st.booleans()):
    scores[draw(st.integers(0, n - 1))] = np.nan
  labels = draw(hnp.arrays(np.int32, n, elements=st.integers(0, groups - 1)))
  return scores, labels, k, groups


def _check_exact_k(idx, k, n):
  idx = np.asarray(idx)
  assert idx.shape[-1] == k
  assert np.all(np.diff(idx, axis=-1) > 0), idx         # distinct and ascending
  assert idx.min() >= 0 and idx.max() < n


@given(selection_inputs(), st.sampled_from(["area", "score_mass"]), st.integers(0, 2))
def test_matches_reference(inp, kind, m):
  scores, labels, k, groups = inp
  cfg = altp_jax.ALTPConfig(density=kind, min_tokens=m)
  got = altp_jax.altp_select(scores, labels, k, config=cfg, num_segments=groups)
  want, quota, extra = altp_reference(scores, labels, k, m=m, kind=kind)
  _check_exact_k(got, k, len(scores))
  np.testing.assert_array_equal(np.asarray(got), want)
  q, e = altp_jax.altp_budgets(scores, labels, k, config=cfg, num_segments=groups)
  for g in quota:
    assert (int(q[g]), int(e[g])) == (quota[g], extra[g])


@given(selection_inputs(), st.sampled_from(altp_mod.DENSITIES))
def test_exactly_k_for_every_density(inp, kind):
  scores, labels, k, groups = inp
  n = len(scores)
  rng = np.random.default_rng(n * 31 + k)
  got = altp_jax.altp_select(
      scores, labels, k, config=altp_jax.ALTPConfig(density=kind), num_segments=groups,
      features=rng.normal(size=(n, 3)).astype(np.float32),
      detail=rng.random(n).astype(np.float32))
  _check_exact_k(got, k, n)


@pytest.mark.parametrize("n", [1, 7, 30])
def test_extreme_budgets_and_partitions(n):
  rng = np.random.default_rng(n)
  scores = rng.random(n).astype(np.float32)
  for labels in (np.zeros(n, np.int32), np.arange(n, dtype=np.int32)):
    for k in (1, n):
      got = np.asarray(altp_jax.altp_select(scores, labels, k, config=altp_jax.ALTPConfig(
          density="score_mass")))
      _check_exact_k(got, k, n)
    # k = N keeps everything; k = 1 keeps the single best token.
    np.testing.assert_array_equal(
        altp_jax.altp_select(scores, labels, n, config=altp_jax.ALTPConfig(density="area")),
        np.arange(n))
    assert int(altp_jax.altp_select(scores, labels, 1, config=altp_jax.ALTPConfig(
        density="area"))[0]) == int(np.argmax(scores))


@given(selection_inputs(), st.integers(1, 3))
def test_coverage_when_budget_allows(inp, m):
  scores, labels, k, groups = inp
  nonempty = np.unique(labels)
  need = sum(min(m, int(np.sum(labels == g))) for g in nonempty)
  if k < need:
    k = need
  cfg = altp_jax.ALTPConfig(density="score_mass", min_tokens=m)
  keep = np.asarray(altp_jax.altp_select(scores, labels, k, config=cfg, num_segments=groups))
  for g in nonempty:
    assert np.sum(labels[keep] == g) >= min(m, np.sum(labels == g)), (g, keep)


@given(st.integers(0, 10_000), st.floats(1.0, 20.0))
def test_allocation_is_monotone_in_density(seed, factor):
  rng = np.random.default_rng(seed)
  n, groups, k = 48, 6, 20
  labels = rng.integers(0, groups, n).astype(np.int32)
  scores = rng.random(n).astype(np.float32)
  detail = rng.random(n).astype(np.float32)
  g = int(labels[0])
  boosted = np.where(labels == g, detail * factor, detail).astype(np.float32)
  cfg = altp_jax.ALTPConfig(density="pixel_detail")
  q0, e0 = altp_jax.altp_budgets(scores, labels, k, config=cfg, detail=detail,
                                 num_segments=groups)
  q1, e1 = altp_jax.altp_budgets(scores, labels, k, config=cfg, detail=boosted,
                                 num_segments=groups)
  assert int(q1[g] + e1[g]) >= int(q0[g] + e0[g])


def test_dispersion_density_matches_numpy():
  rng = np.random.default_rng(0)
  n, groups = 40, 5
  labels = rng.integers(0, groups, n).astype(np.int32)
  feats = rng.normal(size=(n, 8)).astype(np.float32)
  counts = np.bincount(labels, minlength=groups)
  got = altp_mod._density("dispersion", jnp.zeros(n), jnp.asarray(labels), jnp.asarray(counts),
                          groups, jnp.asarray(feats), None)
  for g in range(groups):
    x = feats[labels == g]
    want = np.mean(np.linalg.norm(x - x.mean(0), axis=1)) if len(x) else 0.0
    np.testing.assert_allclose(float(got[g]), want, rtol=1e-5, atol=1e-6)


def _batch(seed=0, b=8, n=64, groups=10, d=4):
  rng = np.random.default_rng(seed)
  return (rng.random((b, n)).astype(np.float32), rng.integers(0, groups, (b, n)).astype(np.int32),
          rng.normal(size=(b, n, d)).astype(np.float32))


def test_deterministic_and_eager_jit_vmap_agree():
  scores, labels, feats = _batch()
  k, cfg = 13, altp_jax.ALTPConfig()
  batched = np.asarray(altp_jax.altp_select(scores, labels, k, config=cfg, features=feats))
  again = np.asarray(altp_jax.altp_select(scores, labels, k, config=cfg, features=feats))
  np.testing.assert_array_equal(batched, again)
  looped = np.stack([altp_jax.altp_select(s, l, k, config=cfg, features=f)
                     for s, l, f in zip(scores, labels, feats)])
  np.testing.assert_array_equal(batched, looped)
  with jax.disable_jit():
    eager = np.asarray(altp_jax.altp_select(scores, labels, k, config=cfg, features=feats))
  np.testing.assert_array_equal(batched, eager)
  # Inside a user's jit and vmap (labels are tracers: no eager range check, same result).
  user = jax.jit(jax.vmap(lambda s, l, f: altp_jax.altp_select(s, l, k, config=cfg, features=f)))
  np.testing.assert_array_equal(batched, np.asarray(user(scores, labels, feats)))


def test_sharded_batch_equals_unsharded():
  scores, labels, feats = _batch(b=16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  row = jax.sharding.NamedSharding(mesh, jax.P("data"))
  fn = jax.jit(lambda s, l, f: altp_jax.altp_select(s, l, 9, features=f),
               in_shardings=(row, row, row), out_shardings=row)
  out = fn(*[jax.device_put(x, row) for x in (scores, labels, feats)])
  assert len(out.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out), altp_jax.altp_select(scores, labels, 9,
                                                                      features=feats))


def test_no_recompilation_for_same_static_shapes():
  scores, labels, feats = _batch(seed=1)
  altp_jax.altp_select(scores, labels, 11, features=feats)
  before = altp_mod._select._cache_size()
  for seed in range(2, 5):
    s, l, f = _batch(seed=seed)
    altp_jax.altp_select(s, l, 11, features=f)
  assert altp_mod._select._cache_size() == before


def test_nan_scores_rank_lowest():
  scores = np.array([np.nan, 0.1, np.nan, 0.2, 0.0], np.float32)
  labels = np.zeros(5, np.int32)
  keep = altp_jax.altp_select(scores, labels, 3, config=altp_jax.ALTPConfig(density="area"))
  np.testing.assert_array_equal(keep, [1, 3, 4])


def test_mask_form_has_exactly_k():
  scores, labels, feats = _batch()
  mask = altp_jax.altp_keep_mask(scores, labels, 17, features=feats)
  assert mask.shape == scores.shape and np.all(np.sum(mask, -1) == 17)
  idx = altp_jax.altp_select(scores, labels, 17, features=feats)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(altp_jax.keep_mask(idx, 64)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=0), ValueError, "k=0 must be >= 1"),
    (dict(k=65), ValueError, "exceeds the number of tokens N=64"),
    (dict(k=3.0), TypeError, "static Python int"),
    (dict(labels=np.zeros((8, 63), np.int32)), ValueError, "labels shape"),
    (dict(labels=np.full((8, 64), 70, np.int32)), ValueError, r"labels must lie in \[0, 64\)"),
    (dict(labels=np.full((8, 64), -1, np.int32)), ValueError, "labels must lie"),
    (dict(labels=np.zeros((8, 64), np.float32)), TypeError, "integer superpixel ids"),
    (dict(features=None), ValueError, "needs features"),
    (dict(features=np.zeros((8, 63, 4), np.float32)), ValueError, "features shape"),
    (dict(config=altp_jax.ALTPConfig(density="pixel_detail")), ValueError, "needs detail"),
])
def test_bad_input_raises_clear_errors(kwargs, error, match):
  scores, labels, feats = _batch()
  args = dict(scores=scores, labels=labels, k=5, features=feats, config=altp_jax.ALTPConfig())
  args.update(kwargs)
  with pytest.raises(error, match=match):
    altp_jax.altp_select(args.pop("scores"), args.pop("labels"), args.pop("k"), **args)


def test_config_validates_options():
  with pytest.raises(ValueError, match="density='entropy'"):
    altp_jax.ALTPConfig(density="entropy")
  with pytest.raises(ValueError, match="coverage"):
    altp_jax.ALTPConfig(coverage=0.0)
  assert altp_jax.ALTPConfig().n_segments(58) == 29
  assert hash(altp_jax.ALTPConfig()) == hash(dataclasses.replace(altp_jax.ALTPConfig()))
