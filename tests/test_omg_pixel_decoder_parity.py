"""Parity of the OMG-Seg pixel-decoder pieces against plain-PyTorch references (CPU, fp32, tiny).

The references are written here from the mmdet/mmcv maths (mmdet is not installable here):
`SinePositionalEncoding(3D)`, mmcv's `multi_scale_deformable_attn_pytorch` (grid_sample, zeros
padding, align_corners=False) and `MSDeformAttnPixelDecoder` with torch GroupNorm / LayerNorm /
F.interpolate. The torch decoder's state dict uses the release key names and is loaded into the
NNX module through `models.omg_seg.params_vision`.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from models.omg_seg import params_vision, positional
from models.omg_seg.config import PixelDecoderConfig
from models.omg_seg.pixel_decoder import MSDeformAttnPixelDecoder
from models.omg_seg.ms_deform_attn import (MultiScaleDeformableAttention, ms_deform_attn_core,
                                           reference_points)
from models.param_tables import identity, linear_weight, load_state_dict


# -- positional encodings --------------------------------------------------------------------------

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


# -- multi-scale deformable attention --------------------------------------------------------------

def torch_msda_core(value, shapes, loc, attn):
  """mmcv `multi_scale_deformable_attn_pytorch`: grid_sample (zeros, align_corners=False).

  value [B, Nv, heads, D]; loc [B, Nq, heads, L, P, 2]; attn [B, Nq, heads, L, P] -> [B, Nq, C]."""
  b, _, heads, d = value.shape
  _, nq, _, n_lvl, n_pts, _ = loc.shape
  values = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * loc - 1
  sampled = []
  for lvl, (h, w) in enumerate(shapes):
    v = values[lvl].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)      # [B*heads, Nq, P, 2]
    sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))           # [B*heads, D, Nq, P]
  attn = attn.transpose(1, 2).reshape(b * heads, 1, nq, n_lvl * n_pts)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1).view(b, heads * d, nq)
  return out.transpose(1, 2)


class TorchMSDeformAttn(nn.Module):
  """mmcv `MultiScaleDeformableAttention` (batch_first, 2-d reference points, eval)."""

  def __init__(self, dim, heads, levels, points):
    super().__init__()
    self.heads, self.levels, self.points = heads, levels, points
    self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
    self.attention_weights = nn.Linear(dim, heads * levels * points)
    self.value_proj = nn.Linear(dim, dim)
    self.output_proj = nn.Linear(dim, dim)

  def forward(self, query, query_pos, ref, shapes, return_loc=False):
    """query [B, Nq, C]; ref [B, Nq, L, 2]; value = query (no pos), identity = query."""
    value, identity = query, query
    q = query + query_pos
    b, nq, c = q.shape
    v = self.value_proj(value).view(b, value.shape[1], self.heads, -1)
    off = self.sampling_offsets(q).view(b, nq, self.heads, self.levels, self.points, 2)
    attn = self.attention_weights(q).view(b, nq, self.heads, self.levels * self.points)
    attn = attn.softmax(-1).view(b, nq, self.heads, self.levels, self.points)
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    out = self.output_proj(torch_msda_core(v, shapes, loc, attn)) + identity
    return (out, loc) if return_loc else out


def _randomize(module: nn.Module, seed: int, offset_scale: float = 1.0) -> nn.Module:
  """Random values everywhere (norm affines and level encodings included). `offset_scale`
  enlarges the sampling offsets (in pixels of each level) so points leave the maps."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      scale = offset_scale if "sampling_offsets" in name else 1.0
      if p.ndim == 1 and leaf == "weight":                      # norm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:                                         # biases
        p.copy_(0.3 * scale * torch.randn(p.shape, generator=g))
      elif "level_encoding" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
  return module.eval()


_LINEAR_TABLE = (
    (r"(\w+)\.weight", r"\1.kernel", linear_weight),
    (r"(\w+)\.bias", r"\1.bias", identity),
)

SHAPES = ((3, 2), (5, 4), (9, 7))   # non-square levels, low -> high resolution


def _attn_pair(seed, offset_scale, query_chunk=None, dim=32, heads=4, points=3):
  t = _randomize(TorchMSDeformAttn(dim, heads, len(SHAPES), points), seed, offset_scale)
  j = nnx.eval_shape(lambda: MultiScaleDeformableAttention(
      dim, heads, len(SHAPES), points, query_chunk=query_chunk, rngs=nnx.Rngs(0)))
  load_state_dict(j, t.state_dict(), _LINEAR_TABLE)
  return t, j


def test_ms_deform_attn_core_vs_grid_sample():
  g = torch.Generator().manual_seed(0)
  b, heads, d, pts = 2, 3, 5, 4
  nv = sum(h * w for h, w in SHAPES)
  value = torch.randn(b, nv, heads, d, generator=g)
  # Locations well outside [0, 1] too, and exact pixel centres / edges.
  loc = torch.rand(b, 11, heads, len(SHAPES), pts, 2, generator=g) * 1.8 - 0.4
  loc[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0])
  loc[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0])
  attn = torch.rand(b, 11, heads, len(SHAPES), pts, generator=g)
  ref = torch_msda_core(value, SHAPES, loc, attn).numpy()
  got = ms_deform_attn_core(jnp.asarray(value.numpy()), SHAPES, jnp.asarray(loc.numpy()),
                            jnp.asarray(attn.numpy()))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset_scale,query_chunk", [(1.0, None), (3.0, None), (3.0, 16)])
def test_ms_deform_attn_module(offset_scale, query_chunk):
  t, j = _attn_pair(1, offset_scale, query_chunk)
  nq = sum(h * w for h, w in SHAPES)
  g = torch.Generator().manual_seed(2)
  query = torch.randn(2, nq, 32, generator=g)
  pos = torch.randn(2, nq, 32, generator=g)
  ref_pts = torch.from_numpy(reference_points(SHAPES))
  with torch.no_grad():
    want, loc = t(query, pos, ref_pts[None, :, None].repeat(2, 1, len(SHAPES), 1), SHAPES,
                  return_loc=True)
  outside = ((loc < 0) | (loc > 1)).any(-1).float().mean().item()
  if offset_scale > 1:   # the large-offset cases really sample outside the maps
    assert 0.2 < outside < 0.95, outside
  fn = jax.jit(lambda m, q, p: m(q, query_pos=p, reference_points=reference_points(SHAPES),
                                 spatial_shapes=SHAPES))
  got = fn(j, query.numpy(), pos.numpy())
  err = float(np.max(np.abs(np.asarray(got) - want.numpy())))
  assert err <= 1e-5, (err, outside)
  print("msda", offset_scale, query_chunk, "err", err, "outside", outside)


def test_reference_points_layout():
  ref = reference_points(((2, 3),))
  np.testing.assert_allclose(ref, [[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4],
                                   [1 / 6, 3 / 4], [3 / 6, 3 / 4], [5 / 6, 3 / 4]], atol=1e-7)


# -- the whole pixel decoder -----------------------------------------------------------------------

class _ConvModule(nn.Module):
  """mmcv ConvModule(conv, GN[, ReLU]): state-dict keys `conv.*`, `gn.*`."""

  def __init__(self, c_in, c_out, k, groups, bias, relu):
    super().__init__()
    self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)
    self.gn = nn.GroupNorm(groups, c_out, eps=1e-5)
    self.relu = relu

  def forward(self, x):
    y = self.gn(self.conv(x))
    return F.relu(y) if self.relu else y


class _Ffn(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    # mmcv FFN: layers = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout).
    self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.0)),
                                nn.Linear(hidden, dim), nn.Dropout(0.0))

  def forward(self, x):
    return x + self.layers(x)


class _EncoderLayer(nn.Module):
  def __init__(self, dim, heads, levels, points, ffn):
    super().__init__()
    self.self_attn = TorchMSDeformAttn(dim, heads, levels, points)
    self.ffn = _Ffn(dim, ffn)
    self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])   # torch eps 1e-5

  def forward(self, x, pos, ref, shapes):
    x = self.norms[0](self.self_attn(x, pos, ref, shapes))
    return self.norms[1](self.ffn(x))


class _Encoder(nn.Module):
  def __init__(self, n, *args):
    super().__init__()
    self.layers = nn.ModuleList([_EncoderLayer(*args) for _ in range(n)])


class TorchPixelDecoder(nn.Module):
  """mmdet `MSDeformAttnPixelDecoder.forward` with the release module names (NCHW)."""

  def __init__(self, cfg: PixelDecoderConfig):
    super().__init__()
    c, n_in, n_lvl = cfg.feat_channels, len(cfg.in_channels), cfg.num_levels
    self.cfg = cfg
    self.input_convs = nn.ModuleList([
        _ConvModule(cfg.in_channels[i], c, 1, cfg.gn_groups, True, False)
        for i in range(n_in - 1, n_in - n_lvl - 1, -1)])
    self.encoder = _Encoder(cfg.num_layers, c, cfg.num_heads, n_lvl, cfg.num_points, cfg.ffn_dim)
    self.level_encoding = nn.Embedding(n_lvl, c)
    self.lateral_convs = nn.ModuleList([
        _ConvModule(cfg.in_channels[i], c, 1, cfg.gn_groups, False, False)
        for i in range(n_in - n_lvl - 1, -1, -1)])
    self.output_convs = nn.ModuleList([
        _ConvModule(c, c, 3, cfg.gn_groups, False, True) for i in range(n_in - n_lvl)])
    self.mask_feature = nn.Conv2d(c, cfg.out_channels, 1)

  def forward(self, feats):
    cfg = self.cfg
    n_in, n_lvl = len(feats), cfg.num_levels
    b = feats[0].shape[0]
    tokens, pos, shapes, refs = [], [], [], []
    for i in range(n_lvl):
      lvl = n_in - i - 1
      x = self.input_convs[i](feats[lvl])
      h, w = x.shape[-2:]
      mask = torch.zeros(b, h, w, dtype=torch.bool)
      p = _torch_sine(mask, cfg.num_pos_feats, False).permute(0, 3, 1, 2)
      p = self.level_encoding.weight[i].view(1, -1, 1, 1) + p
      # MlvlPointGenerator priors (offset 0.5) divided by the level size in input pixels.
      stride = cfg.strides[lvl]
      ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
      pts = torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], -1)
      refs.append(pts / torch.tensor([w * stride, h * stride], dtype=torch.float32))
      tokens.append(x.flatten(2).permute(0, 2, 1))
      pos.append(p.flatten(2).permute(0, 2, 1))
      shapes.append((h, w))
    x = torch.cat(tokens, 1)
    pos = torch.cat(pos, 1)
    ref = torch.cat(refs, 0)[None, :, None].repeat(b, 1, n_lvl, 1)
    for layer in self.encoder.layers:
      x = layer(x, pos, ref, shapes)
    outs = [o.permute(0, 2, 1).reshape(b, -1, h, w)
            for o, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]
    for i in range(n_in - n_lvl - 1, -1, -1):
      cur = self.lateral_convs[i](feats[i])
      y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear",
                              align_corners=False)
      outs.append(self.output_convs[i](y))
    return self.mask_feature(outs[-1]), outs[:n_lvl]


def test_pixel_decoder_vs_torch():
  cfg = PixelDecoderConfig.tiny()
  torch_dec = _randomize(TorchPixelDecoder(cfg), seed=7, offset_scale=2.0)
  g = torch.Generator().manual_seed(8)
  h, w = 128, 96                       # non-square: levels 32x24, 16x12, 8x6, 4x3
  feats = [torch.randn(2, c, h // s, w // s, generator=g)
           for c, s in zip(cfg.in_channels, cfg.strides)]
  with torch.no_grad():
    want_mask, want_mem = torch_dec(feats)
  sd = {f"panoptic_head.pixel_decoder.{k}": v for k, v in torch_dec.state_dict().items()}
  dec = nnx.eval_shape(lambda: MSDeformAttnPixelDecoder(cfg, rngs=nnx.Rngs(0)))
  load_state_dict(dec, sd, params_vision.OMG_PIXEL_DECODER_TABLE)
  got_mask, got_mem = jax.jit(lambda m, f: m(f))(
      dec, [f.permute(0, 2, 3, 1).numpy() for f in feats])
  assert got_mask.shape == (2, 32, 24, cfg.out_channels)
  assert [m.shape[1:3] for m in got_mem] == [(4, 3), (8, 6), (16, 12)]
  errs = [float(np.max(np.abs(np.asarray(got_mask) - want_mask.permute(0, 2, 3, 1).numpy())))]
  for gm, wm in zip(got_mem, want_mem):
    errs.append(float(np.max(np.abs(np.asarray(gm) - wm.permute(0, 2, 3, 1).numpy()))))
  assert max(errs) <= 1e-4, errs
  print("pixel decoder max abs err (mask features, memories)", errs)


def test_pixel_decoder_chunked_equals_unchunked():
  """Query chunking (with padding: 336 tokens in chunks of 50) changes nothing."""
  cfg = PixelDecoderConfig.tiny()
  torch_dec = _randomize(TorchPixelDecoder(cfg), seed=9)
  sd = {f"panoptic_head.pixel_decoder.{k}": v for k, v in torch_dec.state_dict().items()}
  outs = []
  for chunk in (None, 50):
    dec = nnx.eval_shape(lambda: MSDeformAttnPixelDecoder(
        dataclasses.replace(cfg, query_chunk=chunk), rngs=nnx.Rngs(0)))
    load_state_dict(dec, sd, params_vision.OMG_PIXEL_DECODER_TABLE)
    feats = [np.random.default_rng(0).standard_normal((1, 128 // s, 128 // s, c), np.float32)
             for c, s in zip(cfg.in_channels, cfg.strides)]
    outs.append(jax.jit(lambda m, f: m(f))(dec, feats))
  np.testing.assert_allclose(np.asarray(outs[0][0]), np.asarray(outs[1][0]), atol=1e-5, rtol=0)


def test_pixel_decoder_bad_input():
  cfg = PixelDecoderConfig.tiny()
  dec = nnx.eval_shape(lambda: MSDeformAttnPixelDecoder(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="feature 2"):
    dec([np.zeros((1, 8, 8, 8)), np.zeros((1, 4, 4, 16)), np.zeros((1, 2, 2, 31)),
         np.zeros((1, 1, 1, 64))])
  with pytest.raises(ValueError, match="num_levels"):
    PixelDecoderConfig.tiny(num_levels=4)
