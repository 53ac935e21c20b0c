"""ALTP: Adaptive Local-Aware Token Pruning, as a fixed-shape selection.

ALTP as described in the paper (arXiv 2503.23959); settings the paper does not publish are options,
with the spec's candidate defaults until our ablation picks them (docs/ALTP.md). The formulation
follows `shared/specs/altp.md`:

* **Detail Density Capture (DDC).** Every superpixel that owns a token gets a coverage quota
  `q_g = min(n_g, m)`. If the quotas exceed the budget `k`, they go to the superpixels with the
  best top token first (a partial quota for the last one), so exactly `min(sum q, k)` are reserved.
* **Dynamic Density Formation (DDF).** The rest, `r = k - sum(q)`, is split in proportion to
  `w_g = density_g * (n_g - q_g)`, floor-rounded and capped at `n_g - q_g`; whatever rounding leaves
  over is filled by global score among the tokens not yet kept.
* Inside a superpixel the best tokens by score are taken. The result is always exactly `k` distinct
  indices in ascending (raster) order.

Shapes are static: `k` and the number of superpixel ids `num_segments` are Python ints, every
per-superpixel statistic is a `segment_sum` over `num_segments`, and the within-superpixel rank
comes from one sort. Everything vmaps over batch dims and shards over a batch axis.

Data-dependent edge cases have defined behaviour instead of errors (a jitted program cannot raise):
NaN scores rank lowest (they never win a tie), non-finite scores count as 0 in score densities,
negative densities count as 0, and under jit labels outside `[0, num_segments)` are clipped into
range (eager calls with concrete labels raise instead).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from altp_jax import _checks
from altp_jax import ranking

DENSITIES = ("dispersion", "score_mass", "score_mean", "pixel_detail", "area")
SCORE_SOURCES = ("clip_cls", "llm_last_query", "feature_norm", "uniform")
PLACEMENTS = ("pre_llm", "in_llm")
POSITION_MODES = ("original", "compact")
TOKEN_LABEL_MODES = ("majority", "center")


@dataclasses.dataclass(frozen=True)
class ALTPConfig:
  """Options of ALTP. Hashable, so it can be a static argument of `jax.jit`.

  Attributes:
    min_tokens: `m`, the coverage quota per non-empty superpixel (DDC).
    coverage: ties the superpixel count to the budget: `n_segments = round(k * coverage)`, i.e. the
      share of the budget that guarantees every local region a token.
    density: DDF's information density, one of `DENSITIES`:
      `dispersion` mean distance of the superpixel's token features to their mean (needs
      `features`); `score_mass` sum of scores; `score_mean` mean score; `pixel_detail` mean of a
      per-token detail measure such as the patch's mean gradient magnitude (needs `detail`);
      `area` constant density, so the remainder is split in proportion to remaining token counts.
    score: where the model pipelines take token scores from, one of `SCORE_SOURCES` (the selection
      itself only sees the score array).
    placement: `pre_llm` (prune projected visual tokens before the LLM) or `in_llm` (at layer
      `layer` with the FastV machinery).
    layer: the LLM layer for `in_llm` placement (the score is read at `layer - 1`).
    positions: position ids of kept tokens: `original` (gaps remain) or `compact`.
    token_labels: how a token's superpixel is chosen: `majority` over its patch or `center` pixel.
    compactness, sigma, slic_iters: SLIC parameters (skimage conventions).
  """

  min_tokens: int = 1
  coverage: float = 0.5
  density: str = "dispersion"
  score: str = "clip_cls"
  placement: str = "pre_llm"
  layer: int = 2
  positions: str = "original"
  token_labels: str = "majority"
  compactness: float = 10.0
  sigma: float = 0.0
  slic_iters: int = 10

  def __post_init__(self):
    for name, allowed in (("density", DENSITIES), ("score", SCORE_SOURCES),
                          ("placement", PLACEMENTS), ("positions", POSITION_MODES),
                          ("token_labels", TOKEN_LABEL_MODES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ALTPConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
    if self.min_tokens < 0:
      raise ValueError(f"ALTPConfig.min_tokens={self.min_tokens} must be >= 0")
    if not 0.0 < self.coverage <= 1.0:
      raise ValueError(f"ALTPConfig.coverage={self.coverage} must be in (0, 1]")
    if self.layer < 1:
      raise ValueError(f"ALTPConfig.layer={self.layer} must be >= 1 (the score comes from layer-1)")

  def n_segments(self, k: int) -> int:
    """The SLIC superpixel count for a budget of `k` tokens: `max(1, round(k * coverage))`."""
    return max(1, int(round(k * self.coverage)))


def _segment_mean(values, labels, num_segments, counts):
  sums = jax.ops.segment_sum(values, labels, num_segments)
  denom = jnp.maximum(counts, 1).astype(jnp.float32)
  return sums / (denom if values.ndim == 1 else denom[:, None])


def _density(density, scores, labels, counts, num_segments, features, detail):
  """[G] non-negative finite density per superpixel."""
  finite_scores = jnp.where(jnp.isfinite(scores), scores, 0.0).astype(jnp.float32)
  if density == "dispersion":
    x = features.astype(jnp.float32)
    mean = _segment_mean(x, labels, num_segments, counts)              # [G, D]
    dist = jnp.linalg.norm(x - mean[labels], axis=-1)                  # [N]
    d = _segment_mean(dist, labels, num_segments, counts)
  elif density == "score_mass":
    d = jax.ops.segment_sum(finite_scores, labels, num_segments)
  elif density == "score_mean":
    d = _segment_mean(finite_scores, labels, num_segments, counts)
  elif density == "pixel_detail":
    det = jnp.where(jnp.isfinite(detail), detail, 0.0).astype(jnp.float32)
    d = _segment_mean(det, labels, num_segments, counts)
  else:  # area
    d = jnp.ones((num_segments,), jnp.float32)
  return jnp.where(jnp.isfinite(d), jnp.maximum(d, 0.0), 0.0)


def _budgets_single(scores, labels, features, detail, *, k, num_segments, config):
  """Per-superpixel quota and extra tokens, plus what the selection needs. One sequence."""
  n = scores.shape[0]
  g = num_segments
  labels = jnp.clip(labels.astype(jnp.int32), 0, g - 1)
  prio = ranking.priority(scores)
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), labels, g)          # n_g
  best = jnp.where(counts > 0, jax.ops.segment_max(prio, labels, g), -1)      # best token

  # DDC: quotas, fitted into k by best-token priority (partial quota for the last superpixel).
  quota = jnp.minimum(counts, config.min_tokens)
  sp_order = jnp.argsort(-best, stable=True)
  q_sorted = quota[sp_order]
  before = jnp.cumsum(q_sorted) - q_sorted
  quota = jnp.zeros_like(quota).at[sp_order].set(jnp.clip(k - before, 0, q_sorted))

  # DDF: the remainder in proportion to density * remaining capacity.
  remainder = k - jnp.sum(quota)
  capacity = counts - quota
  dens = _density(config.density, scores, labels, counts, g, features, detail)
  weight = dens * capacity.astype(jnp.float32)
  total = jnp.sum(weight)
  share = jnp.where(total > 0, remainder.astype(jnp.float32) * weight / jnp.where(
      total > 0, total, 1.0), 0.0)
  extra = jnp.minimum(jnp.floor(share).astype(jnp.int32), capacity)
  return quota, extra, labels, prio, counts


def _select_single(scores, labels, features, detail, *, k, num_segments, config):
  n = scores.shape[0]
  quota, extra, labels, prio, counts = _budgets_single(
      scores, labels, features, detail, k=k, num_segments=num_segments, config=config)
  # Rank inside each superpixel: sort by (label, priority desc), subtract the segment's start.
  order = jnp.argsort(labels * n + (n - 1 - prio))
  pos = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  start = jnp.cumsum(counts) - counts
  rank_in_sp = pos - start[labels]
  # Tiers make the exact-k repair respect the plan: quota tokens first, then density extras, then
  # the global leftover fill; within a tier, by score. Exactly k, always, with no ties.
  tier = jnp.where(rank_in_sp < quota[labels], 2,
                   jnp.where(rank_in_sp < quota[labels] + extra[labels], 1, 0))
  return ranking.top_k_indices(tier * n + prio, k)


def _check_inputs(scores, labels, k, config, features, detail, num_segments):
  n = scores.shape[-1]
  k = _checks.check_k(k, n)
  if labels.shape != scores.shape:
    raise ValueError(f"labels shape {tuple(labels.shape)} must equal scores shape "
                     f"{tuple(scores.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer superpixel ids, got dtype {labels.dtype}")
  num_segments = n if num_segments is None else _checks.check_k(num_segments, 1 << 30,
                                                                  "num_segments")
  _checks.check_labels_in_range(labels, num_segments)
  if config.density == "dispersion":
    if features is None:
      raise ValueError("ALTPConfig.density='dispersion' needs features [..., N, D] (the visual "
                       "tokens); pass features= or choose another density")
    if features.shape[:-1] != scores.shape:
      raise ValueError(f"features shape {tuple(features.shape)} must be scores shape "
                       f"{tuple(scores.shape)} + (D,)")
  if config.density == "pixel_detail":
    if detail is None:
      raise ValueError("ALTPConfig.density='pixel_detail' needs detail [..., N] (e.g. "
                       "altp_jax.superpixels.patch_detail(image, grid))")
    if detail.shape != scores.shape:
      raise ValueError(f"detail shape {tuple(detail.shape)} must equal scores shape "
                       f"{tuple(scores.shape)}")
  return k, num_segments


def _maybe(x, wanted):
  return jnp.asarray(x) if (wanted and x is not None) else None


@functools.partial(jax.jit, static_argnames=("k", "num_segments", "config"))
def _select(scores, labels, features, detail, *, k, num_segments, config):
  fn = functools.partial(_select_single, k=k, num_segments=num_segments, config=config)
  return ranking.batched(fn, (1, 1, 2, 1))(scores, labels, features, detail)


@functools.partial(jax.jit, static_argnames=("k", "num_segments", "config"))
def _budgets(scores, labels, features, detail, *, k, num_segments, config):
  def fn(s, l, f, d):
    quota, extra, *_ = _budgets_single(s, l, f, d, k=k, num_segments=num_segments, config=config)
    return quota, extra
  return ranking.batched(fn, (1, 1, 2, 1))(scores, labels, features, detail)


def altp_select(scores, labels, k: int, *, config: ALTPConfig = ALTPConfig(), features=None,
                detail=None, num_segments: int | None = None) -> jax.Array:
  """Selects exactly `k` tokens with ALTP.

  Args:
    scores: [..., N] token importance (e.g. CLIP CLS attention), higher is better.
    labels: [..., N] int superpixel id of each token (`superpixels.token_labels`), in
      `[0, num_segments)`.
    k: static number of tokens kept, 1 <= k <= N. "90% reduction" of 576 tokens is `k=58`.
    config: `ALTPConfig`.
    features: [..., N, D] token features, needed by `density="dispersion"`.
    detail: [..., N] per-token detail, needed by `density="pixel_detail"`.
    num_segments: static bound on superpixel ids (default N).

  Returns:
    [..., k] int32 distinct token indices in ascending order.
  """
  scores, labels = jnp.asarray(scores), jnp.asarray(labels)
  k, num_segments = _check_inputs(scores, labels, k, config, features, detail, num_segments)
  return _select(scores, labels, _maybe(features, config.density == "dispersion"),
                 _maybe(detail, config.density == "pixel_detail"), k=k,
                 num_segments=num_segments, config=config)


def altp_keep_mask(scores, labels, k: int, **kwargs) -> jax.Array:
  """`altp_select` in mask form: [..., N] bool with exactly `k` True per sequence."""
  return ranking.keep_mask(altp_select(scores, labels, k, **kwargs), jnp.shape(scores)[-1])


def altp_budgets(scores, labels, k: int, *, config: ALTPConfig = ALTPConfig(), features=None,
                 detail=None, num_segments: int | None = None):
  """The per-superpixel plan behind `altp_select`.

  Returns:
    `(quota, extra)`, each [..., num_segments] int32: the DDC coverage quota and the DDF density
    allocation of every superpixel. The selection keeps `quota + extra` tokens of each superpixel
    and fills the remaining `k - sum(quota + extra)` by global score.
  """
  scores, labels = jnp.asarray(scores), jnp.asarray(labels)
  k, num_segments = _check_inputs(scores, labels, k, config, features, detail, num_segments)
  return _budgets(scores, labels, _maybe(features, config.density == "dispersion"),
                  _maybe(detail, config.density == "pixel_detail"), k=k,
                  num_segments=num_segments, config=config)
