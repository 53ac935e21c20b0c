"""PyramidDrop (arXiv 2410.17247) schedules and stage selection.

The LLM is cut into stages at `layers` (counts of completed layers); after boundary s the model
keeps `ratios[s] * N` of the N visual tokens (relative to the original N, as the reference code).
Each drop scores the *currently surviving* visual tokens with the next layer's input norm and q/k
projections (one last-query row, see `attention_scores.last_query_scores`) and keeps the top ones.
Positions are renumbered contiguously after each drop (`compact`) in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from altp_jax import _checks
from altp_jax import fastv
from altp_jax import ranking


@dataclasses.dataclass(frozen=True)
class PyramidSchedule:
  """Stage boundaries and kept fractions.

  Attributes:
    layers: strictly increasing layer counts in `(0, num_layers)` after which a drop happens.
    ratios: kept fraction of the original N after each boundary, non-increasing, in (0, 1].
    num_layers: layers of the LLM.
    rounding: `floor` (the reference's `int()`) or `round`.
    positions: `compact` (the reference) or `original`.
  """

  layers: tuple[int, ...] = (8, 16, 24)
  ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
  num_layers: int = 32
  rounding: str = "floor"
  positions: str = "compact"

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
    object.__setattr__(self, "ratios", tuple(float(x) for x in self.ratios))
    if len(self.layers) != len(self.ratios) or not self.layers:
      raise ValueError(f"PyramidSchedule needs one ratio per drop layer; got layers={self.layers}"
                       f" ratios={self.ratios}")
    if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] <= 0 or (
        self.layers[-1] >= self.num_layers):
      raise ValueError(f"PyramidSchedule.layers={self.layers} must increase strictly within "
                       f"(0, num_layers={self.num_layers})")
    if any(not 0.0 < r <= 1.0 for r in self.ratios) or any(
        b > a for a, b in zip(self.ratios, self.ratios[1:])):
      raise ValueError(f"PyramidSchedule.ratios={self.ratios} must be non-increasing in (0, 1]")
    if self.positions not in ("original", "compact"):
      raise ValueError(f"PyramidSchedule.positions={self.positions!r}")
    fastv.keep_count(1, 0.0, self.rounding)

  def kept_counts(self, n: int) -> tuple[int, ...]:
    """Static visual-token counts after each drop (at least 1, never growing)."""
    counts, prev = [], n
    for r in self.ratios:
      c = min(prev, fastv.keep_count(n, 1.0 - r, self.rounding) if r < 1.0 else n)
      counts.append(c)
      prev = c
    return tuple(counts)

  def stage_bounds(self) -> tuple[tuple[int, int], ...]:
    """`[(start, end), ...]` layer ranges of the S+1 stages."""
    edges = (0,) + self.layers + (self.num_layers,)
    return tuple(zip(edges[:-1], edges[1:]))

  def average_retention(self, n: int | None = None) -> float:
    """Layer-averaged kept fraction of visual tokens, `(1/L) sum_s (l_{s+1} - l_s) r_s`.

    With `n`, uses the integer counts the model really keeps; otherwise the nominal ratios.
    """
    fracs = (1.0,) + (tuple(c / n for c in self.kept_counts(n)) if n else self.ratios)
    return sum((e - s) * f for (s, e), f in zip(self.stage_bounds(), fracs)) / self.num_layers


def default_schedule(num_layers: int = 32) -> PyramidSchedule:
  """The paper's default: drops after 1/4, 2/4, 3/4 of the layers, lambda = 0.5."""
  q = num_layers // 4
  return PyramidSchedule((q, 2 * q, 3 * q), (0.5, 0.25, 0.125), num_layers)


def schedule_for_target(target: float, num_layers: int = 32,
                        layers: tuple[int, ...] = (8, 16, 24),
                        base_ratios: tuple[float, ...] | None = None,
                        **kwargs) -> PyramidSchedule:
  """A schedule whose nominal layer-averaged retention equals `target`.

  With `base_ratios=None` the ratios are geometric, `lambda ** s` for s = 1..S, and lambda is
  solved for; with `base_ratios` they are `a * base_ratios` and the scale `a` is solved for (the
  form used to reach ~10% on 32 layers with layers (2, 8, 16, 24)).

  Raises:
    ValueError: when `target` is out of reach: retention can never drop below `layers[0] / L`,
      because every layer before the first drop sees all tokens.
  """
  if not 0.0 < target <= 1.0:
    raise ValueError(f"target={target} must be in (0, 1]")
  s_count = len(layers)
  floor = layers[0] / num_layers
  if target <= floor + 1e-12:
    raise ValueError(f"target retention {target:.4f} is unreachable with the first drop after "
                     f"layer {layers[0]} of {num_layers}: the minimum is above {floor:.4f}; "
                     "move the first drop earlier")

  def ratios_for(x):
    if base_ratios is None:
      return tuple(x ** (s + 1) for s in range(s_count))
    return tuple(min(1.0, x * r) for r in base_ratios)

  def retention(x):
    return PyramidSchedule(layers, ratios_for(x), num_layers, **kwargs).average_retention()

  if base_ratios is not None and len(base_ratios) != s_count:
    raise ValueError(f"base_ratios={base_ratios} needs one entry per drop layer {layers}")
  lo, hi = 1e-9, 1.0 if base_ratios is None else 1.0 / max(min(base_ratios), 1e-9)
  if retention(hi) < target:
    raise ValueError(f"target {target} exceeds the largest retention this form reaches "
                     f"({retention(hi):.4f})")
  for _ in range(100):  # bisection: retention is monotone increasing in x
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if retention(mid) < target else (lo, mid)
  return PyramidSchedule(layers, ratios_for(hi), num_layers, **kwargs)


def select_surviving(scores: jax.Array, alive: jax.Array, k: int) -> jax.Array:
  """One PyramidDrop drop in mask form: keep the `k` best of the currently surviving tokens.

  Args:
    scores: [..., N] scores of all N visual tokens (values of dead tokens are ignored).
    alive: [..., N] bool, tokens that survived earlier drops.
    k: static count to keep; rows with fewer than `k` alive tokens keep all of them and, to stay
      exactly `k`, the best dead ones (documented: callers keep counts non-increasing).

  Returns:
    [..., N] bool with exactly `k` True per row.
  """
  n = scores.shape[-1]
  k = _checks.check_k(k, n)
  prio = jax.vmap(ranking.priority)(scores.reshape(-1, n)).reshape(scores.shape)
  prio = prio + jnp.where(alive, n, 0)
  _, idx = jax.lax.top_k(prio, k)
  return ranking.keep_mask(idx, n)
