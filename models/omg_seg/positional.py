"""Fixed sine positional encodings of mmdet (`SinePositionalEncoding`, `SinePositionalEncoding3D`).

Both are functions of the map size only (OMG runs unpadded images, so the padding mask the mmdet
modules take is all-valid). The tables are computed on the host in float32 with the reference's
operation order (cumsum count / (last count + eps) * 2pi, then / 10000^(2 floor(c/2) / F)), so
they match PyTorch to float32 rounding, and they are baked into traced programs as constants.

Layout: channels-last [h, w, 2 * num_feats]: the y block (num_feats channels) then the x block;
within a block, even channels are sin and odd channels cos of the same frequency.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_SCALE = np.float32(2 * np.pi)
_EPS = np.float32(1e-6)
_TEMPERATURE = 10000


def _check(h: int, w: int, num_feats: int) -> None:
  if h < 1 or w < 1:
    raise ValueError(f"sine positional encoding: map size must be positive, got h={h}, w={w}")
  if num_feats < 2 or num_feats % 2:
    raise ValueError(f"sine positional encoding: num_feats must be even and >= 2, got {num_feats}")


def _inv_freq(n: int) -> np.ndarray:
  """10000^(2 floor(c/2) / n) for c < n, float32 as `torch.arange(n, dtype=float32)` gives."""
  c = np.arange(n, dtype=np.float32)
  return np.power(np.float32(_TEMPERATURE), np.float32(2) * np.floor(c / 2) / np.float32(n),
                  dtype=np.float32)


def _interleave(angles: np.ndarray) -> np.ndarray:
  """[..., n] angles -> [..., n] with sin at even and cos at odd channels."""
  out = np.empty_like(angles)
  out[..., 0::2] = np.sin(angles[..., 0::2])
  out[..., 1::2] = np.cos(angles[..., 1::2])
  return out


@functools.lru_cache(maxsize=64)
def _sine_2d_np(h: int, w: int, num_feats: int) -> np.ndarray:
  _check(h, w, num_feats)
  # Cumulative counts of valid pixels (1..h, 1..w), normalised so the last one is ~2pi.
  y = np.arange(1, h + 1, dtype=np.float32)
  x = np.arange(1, w + 1, dtype=np.float32)
  y = y / (np.float32(h) + _EPS) * _SCALE
  x = x / (np.float32(w) + _EPS) * _SCALE
  dim_t = _inv_freq(num_feats)
  pos_y = _interleave(y[:, None] / dim_t)           # [h, F]
  pos_x = _interleave(x[:, None] / dim_t)           # [w, F]
  pos = np.concatenate([np.broadcast_to(pos_y[:, None, :], (h, w, num_feats)),
                        np.broadcast_to(pos_x[None, :, :], (h, w, num_feats))], axis=-1)
  pos.setflags(write=False)
  return pos


@functools.lru_cache(maxsize=64)
def _sine_3d_np(h: int, w: int, num_feats: int) -> np.ndarray:
  pos = _sine_2d_np(h, w, num_feats)
  # One frame (T = 1): the z count is 1 everywhere, normalised like x and y, with frequencies
  # over all 2F channels; the same constant per channel is added to the whole map.
  z = np.float32(1) / (np.float32(1) + _EPS) * _SCALE
  pos_z = _interleave(z / _inv_freq(2 * num_feats))  # [2F]
  out = pos + pos_z
  out.setflags(write=False)
  return out


def sine_2d(h: int, w: int, num_feats: int = 128) -> jax.Array:
  """mmdet `SinePositionalEncoding(num_feats, normalize=True)` of an all-valid h x w map.

  Returns:
    [h, w, 2 * num_feats] float32: channel c < F is the y term, c >= F the x term.
  """
  return jnp.asarray(_sine_2d_np(int(h), int(w), int(num_feats)))


def sine_3d(h: int, w: int, num_feats: int = 128) -> jax.Array:
  """mmdet `SinePositionalEncoding3D(num_feats, normalize=True)` of one frame (T = 1).

  Equals `sine_2d(h, w, num_feats)` plus a per-channel constant z term: sin / cos (even / odd c)
  of (2pi / (1 + 1e-6)) / 10000^(2 floor(c/2) / (2 num_feats)).

  Returns:
    [h, w, 2 * num_feats] float32.
  """
  return jnp.asarray(_sine_3d_np(int(h), int(w), int(num_feats)))
