"""A plain-Python reading of ALTP as `shared/specs/altp.md` defines it, for exactness tests.

Written as loops over superpixels and tokens, independent of the vectorised JAX implementation.
"""

import math

import numpy as np


def _order_best_first(scores):
  """Token indices best first; NaN lowest; ties to the lower index."""
  s = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))
  return sorted(range(len(s)), key=lambda i: (-s[i], i))


def density(kind, scores, labels, members, features=None, detail=None):
  out = {}
  fin = np.where(np.isfinite(scores), scores, 0.0).astype(np.float64)
  for g, idx in members.items():
    if kind == "area":
      d = 1.0
    elif kind == "score_mass":
      d = float(sum(fin[i] for i in idx))
    elif kind == "score_mean":
      d = float(sum(fin[i] for i in idx)) / len(idx)
    elif kind == "pixel_detail":
      d = float(np.mean([detail[i] for i in idx]))
    else:
      x = features[idx].astype(np.float64)
      d = float(np.mean(np.linalg.norm(x - x.mean(0), axis=1)))
    out[g] = max(d, 0.0) if math.isfinite(d) else 0.0
  return out


def altp_reference(scores, labels, k, *, m=1, kind="area", features=None, detail=None):
  """Returns (sorted keep list, quota dict, extra dict)."""
  scores = np.asarray(scores)
  n = len(scores)
  best_first = _order_best_first(scores)
  rank = {i: r for r, i in enumerate(best_first)}
  members = {}
  for i in best_first:                       # members listed best first
    members.setdefault(int(labels[i]), []).append(i)
  # DDC quotas, fitted into k by best-token order of the superpixels.
  quota = {g: min(len(v), m) for g, v in members.items()}
  left = k
  for g in sorted(members, key=lambda g: rank[members[g][0]]):
    quota[g] = max(0, min(quota[g], left))
    left -= quota[g]
  r = k - sum(quota.values())
  dens = density(kind, scores, labels, members, features, detail)
  w = {g: dens[g] * (len(members[g]) - quota[g]) for g in members}
  total = sum(w.values())
  extra = {g: (min(int(math.floor(np.float32(r) * np.float32(w[g]) / np.float32(total))),
                   len(members[g]) - quota[g]) if total > 0 else 0) for g in members}
  # Quota tokens first, then density extras by score, then the global fill by score.
  tier = {}
  for g, idx in members.items():
    for j, i in enumerate(idx):
      tier[i] = 2 if j < quota[g] else (1 if j < quota[g] + extra[g] else 0)
  keep = sorted(range(n), key=lambda i: (-tier[i], rank[i]))[:k]
  return sorted(keep), quota, extra
