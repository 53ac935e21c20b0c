"""Parity of the OMG-Seg pixel-decoder pieces against plain-PyTorch references (CPU, fp32, tiny).

The references are written here from the mmdet/mmcv maths (mmdet is not installable here):
`SinePositionalEncoding(3D)`, mmcv's `multi_scale_deformable_attn_pytorch` (grid_sample, zeros
padding, align_corners=False) and `MSDeformAttnPixelDecoder` with torch GroupNorm / LayerNorm /
F.interpolate. The torch decoder's state dict uses the release key names and is loaded into the
NNX module through `models.omg_seg.params_vision`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.omg_seg import positional


# -- positional encodings ---------------------------------------------------------------------------

def _torch_sine(mask: torch.Tensor, num_feats: int, three_d: bool) -> torch.Tensor:
  """mmdet SinePositionalEncoding(normalize=True) / SinePositionalEncoding3D with T = 1.

  mask [B, H, W] bool (True = padding) -> [B, H, W, 2 * num_feats]."""
  scale, eps, temp = 2 * math.pi, 1e-6, 10000
  not_mask = (~mask).to(torch.int)
  y = not_mask.cumsum(1, dtype=torch.float32)
  x = not_mask.cumsum(2, dtype=torch.float32)
  y = y / (y[:, -1:, :] + eps) * scale
  x = x / (x[:, :, -1:] + eps) * scale
  dim_t = torch.arange(num_feats, dtype=torch.float32)
  dim_t = temp ** (2 * (dim_t // 2) / num_feats)
  b, h, w = mask.shape

  def sc(p):
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

  pos = torch.cat((sc(y[..., None] / dim_t), sc(x[..., None] / dim_t)), dim=-1)
  if three_d:
    z = torch.ones(b, 1, h, w).cumsum(1)
    z = z / (z[:, -1:] + eps) * scale
    dim_tz = torch.arange(2 * num_feats, dtype=torch.float32)
    dim_tz = temp ** (2 * (dim_tz // 2) / (2 * num_feats))
    pos = pos + sc(z[:, 0, :, :, None] / dim_tz)
  return pos


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("h,w,f", [(4, 4, 8), (5, 7, 16), (32, 24, 128)])
def test_sine_positional(h, w, f, three_d):
  ref = _torch_sine(torch.zeros(1, h, w, dtype=torch.bool), f, three_d)[0].numpy()
  fn = positional.sine_3d if three_d else positional.sine_2d
  got = np.asarray(fn(h, w, f))
  assert got.shape == (h, w, 2 * f) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_sine_positional_bad_args():
  with pytest.raises(ValueError, match="num_feats"):
    positional.sine_2d(4, 4, 7)
  with pytest.raises(ValueError, match="map size"):
    positional.sine_3d(0, 4, 8)
