"""Parity of `models.omg_seg.mask2former` / `visual_tokens` against a plain-torch reference.

mmdet/mmcv are not installed, so the reference is written here following the original maths
(spec /work/shared/specs/omg_llava.md 1.3, 1.4, 1.7): mmcv `MultiheadAttention` (= torch
`nn.MultiheadAttention`, batch_first, with the residual and the query/key positions added
inside), mmcv `FFN`, mmdet `Mask2FormerTransformerDecoderLayer` (post-norm), mmdet
`SinePositionalEncoding3D` (T = 1), and `Mask2FormerVideoSemSamHead.forward` / `_forward_head` /
`forward_llm_seg` / `mask_pool` / `OMGSegVisualEncoder.panoptic_postprocess` /
`pixel_shuffle_feat` in NCHW with `F.interpolate(bilinear, align_corners=False)`.
The torch modules carry the release key names (`panoptic_head.transformer_decoder.layers.0.
cross_attn.attn.in_proj_weight`, ...), are randomised, and are loaded into the JAX module through
`MASK2FORMER_DECODER_TABLE` (strict). Sizes: C 32, 12 queries, 3 layers, mask features 16 x 16,
memories 4 x 4 / 8 x 8 / 16 x 16 (OMG's strides 32 / 16 / 8 against stride 4).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from models.omg_seg import mask2former as m2f
from models.omg_seg import visual_tokens as vt
from models.omg_seg.params_decoder import MASK2FORMER_DECODER_TABLE
from models.param_tables import load_state_dict

TOL = 1e-4
CFG = m2f.Mask2FormerConfig.tiny()
MASK_HW = 16
MEM_HW = (4, 8, 16)
B = 2
PROTOS = 3


# ------------------------------------------------------------------------------------------------
# Plain-torch reference with the release module names.

def sine_3d_torch(h: int, w: int, num_feats: int) -> torch.Tensor:
  """mmdet SinePositionalEncoding3D(normalize=True) of an all-valid [1, 1, h, w] mask, returned
  as the decoder uses it: [h*w, 2F] (row-major tokens)."""
  mask = torch.zeros(1, 1, h, w, dtype=torch.int)
  not_mask = 1 - mask
  z = not_mask.cumsum(1, dtype=torch.float32)
  y = not_mask.cumsum(2, dtype=torch.float32)
  x = not_mask.cumsum(3, dtype=torch.float32)
  eps, scale = 1e-6, 2 * math.pi
  z = z / (z[:, -1:] + eps) * scale
  y = y / (y[:, :, -1:] + eps) * scale
  x = x / (x[:, :, :, -1:] + eps) * scale
  dim_t = torch.arange(num_feats, dtype=torch.float32)
  dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
  dim_tz = torch.arange(2 * num_feats, dtype=torch.float32)
  dim_tz = 10000 ** (2 * (dim_tz // 2) / (2 * num_feats))

  def inter(p):
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=5).flatten(4)

  pos = torch.cat((inter(y[..., None] / dim_t), inter(x[..., None] / dim_t)), dim=4) \
      + inter(z[..., None] / dim_tz)
  pos = pos.permute(0, 1, 4, 2, 3)                     # b, t, c, h, w
  return pos.transpose(1, 2).flatten(2).permute(0, 2, 1)[0]


class RefMHA(nn.Module):
  """mmcv MultiheadAttention: identity + attn(query + query_pos, key + key_pos, value)."""

  def __init__(self, c, h):
    super().__init__()
    self.attn = nn.MultiheadAttention(c, h, dropout=0.0, batch_first=True)

  def forward(self, query, key, value, query_pos, key_pos, attn_mask=None):
    out = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask)[0]
    return query + out


class RefFFN(nn.Module):
  def __init__(self, c, hidden):
    super().__init__()
    self.layers = nn.Sequential(nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Dropout(0.0)),
                                nn.Linear(hidden, c), nn.Dropout(0.0))

  def forward(self, x):
    return x + self.layers(x)


class RefLayer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    c = cfg.embed_dim
    self.self_attn = RefMHA(c, cfg.num_heads)
    self.cross_attn = RefMHA(c, cfg.num_heads)
    self.ffn = RefFFN(c, cfg.ffn_dim)
    self.norms = nn.ModuleList([nn.LayerNorm(c) for _ in range(3)])

  def forward(self, query, key, value, query_pos, key_pos, cross_attn_mask):
    query = self.norms[0](self.cross_attn(query, key, value, query_pos, key_pos,
                                          attn_mask=cross_attn_mask))
    query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos))
    return self.norms[2](self.ffn(query))


class RefDecoder(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.layers = nn.ModuleList([RefLayer(cfg) for _ in range(cfg.num_layers)])
    self.post_norm = nn.LayerNorm(cfg.embed_dim)


def _mlp(c, out):
  return nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, out))


class RefHead(nn.Module):
  """Mask2FormerVideoSemSamHead without the pixel decoder (sphere_cls, loss_iou, box queries)."""

  def __init__(self, cfg, class_embed: torch.Tensor):
    super().__init__()
    c = cfg.embed_dim
    self.cfg = cfg
    self.num_heads = cfg.num_heads
    self.transformer_decoder = RefDecoder(cfg)
    self.query_embed = nn.Embedding(cfg.num_queries, c)
    self.query_feat = nn.Embedding(cfg.num_queries, c)
    self.level_embed = nn.Embedding(cfg.num_levels, c)
    self.mask_embed = _mlp(c, c)
    self.iou_embed = _mlp(c, 1)
    k, p, d = class_embed.shape
    full = torch.cat([class_embed, torch.zeros(1, p, d)], dim=0)
    self.register_buffer("cls_embed", full.permute(2, 0, 1).contiguous(), persistent=False)
    self.cls_proj = _mlp(c, d)
    self.register_buffer("logit_scale", torch.tensor(cfg.logit_scale, dtype=torch.float32),
                         persistent=False)
    self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
    self.mask_tokens = nn.Embedding(1, c)
    self.pb_embedding = nn.Embedding(2, c)
    self.pos_linear = nn.Linear(2 * c, c)
    self.transformer_decoder_llm = RefDecoder(cfg)
    self.mask_embed_llm = _mlp(c, c)
    self.full_rows = []   # fully masked attention rows seen before each layer (for the tests)
    self.reset = True     # False skips the empty-row reset (to show the tests exercise it)

  @staticmethod
  def mask_pool(x, mask):
    mask = (mask > 0).to(mask.dtype)
    denorm = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", x, mask / denorm)

  def forward_logit(self, cls_embd):
    cls_pred = torch.einsum("bnc,ckp->bnkp", F.normalize(cls_embd, dim=-1), self.cls_embed)
    return self.logit_scale.exp() * cls_pred.max(-1).values

  def _attn_mask(self, mask_pred, size):
    attn_mask = F.interpolate(mask_pred, size, mode="bilinear", align_corners=False)
    attn_mask = attn_mask.flatten(2).unsqueeze(1).repeat((1, self.num_heads, 1, 1)).flatten(0, 1)
    return attn_mask.sigmoid() < 0.5

  def _forward_head(self, decoder_out, mask_feature, size, llm=False):
    dec = self.transformer_decoder_llm if llm else self.transformer_decoder
    mask_embed = self.mask_embed_llm if llm else self.mask_embed
    decoder_out = dec.post_norm(decoder_out)
    mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed(decoder_out), mask_feature)
    cls_pred = None
    if not llm:
      maskpool = self.mask_pooling_proj(self.mask_pool(mask_feature, mask_pred.detach()))
      cls_pred = self.forward_logit(self.cls_proj(maskpool + decoder_out))
      cls_pred = torch.cat([cls_pred, self.iou_embed(decoder_out)], dim=-1)
    return cls_pred, mask_pred, self._attn_mask(mask_pred, size)

  def _inputs(self, memories, batch_idxs=None):
    inputs, poses = [], []
    for i, m in enumerate(memories):
      x = m.flatten(2).permute(0, 2, 1) + self.level_embed.weight[i].view(1, 1, -1)
      if batch_idxs is not None:
        x = x[batch_idxs]
      inputs.append(x)
      poses.append(sine_3d_torch(m.shape[-2], m.shape[-1], self.cfg.embed_dim // 2)[None]
                   .repeat(len(x), 1, 1))
    return inputs, poses

  def _layers(self, query_feat, query_embed, mask_features, memories, inputs, poses, llm):
    dec = self.transformer_decoder_llm if llm else self.transformer_decoder
    nl = len(memories)
    cls_pred, mask_pred, attn_mask = self._forward_head(query_feat, mask_features,
                                                        memories[0].shape[-2:], llm)
    for i in range(len(dec.layers)):
      lvl = i % nl
      full = attn_mask.sum(-1) == attn_mask.shape[-1]
      self.full_rows.append(int(full.sum()) // self.num_heads)
      if self.reset:
        attn_mask[torch.where(full)] = False
      query_feat = dec.layers[i](query_feat, inputs[lvl], inputs[lvl], query_embed, poses[lvl],
                                 attn_mask)
      cls_pred, mask_pred, attn_mask = self._forward_head(
          query_feat, mask_features, memories[(i + 1) % nl].shape[-2:], llm)
    return query_feat, cls_pred, mask_pred

  def forward(self, mask_features, memories):
    b = mask_features.shape[0]
    inputs, poses = self._inputs(memories)
    query_feat = self.query_feat.weight.unsqueeze(0).repeat((b, 1, 1))
    query_embed = self.query_embed.weight.unsqueeze(0).repeat((b, 1, 1))
    q, cls_pred, mask_pred = self._layers(query_feat, query_embed, mask_features, memories,
                                          inputs, poses, llm=False)
    return q, cls_pred[..., :-1], mask_pred          # predict() drops the iou column

  def forward_llm_seg(self, hidden_states, batch_idxs, mask_features, memories):
    hidden_states = hidden_states.unsqueeze(1)
    c = hidden_states.shape[-1]
    inputs, poses = self._inputs(memories, batch_idxs)
    _, _, mask_pred = self._layers(hidden_states[:, :, :c // 2], hidden_states[:, :, c // 2:],
                                   mask_features[batch_idxs], memories, inputs, poses, llm=True)
    return mask_pred


class RefOMG(nn.Module):
  """Holds the head under `panoptic_head`, so state_dict keys are the release names."""

  def __init__(self, cfg, class_embed):
    super().__init__()
    self.panoptic_head = RefHead(cfg, class_embed)


def ref_pixel_shuffle(feat_nchw: torch.Tensor, r: int = 2) -> torch.Tensor:
  """OMGSegVisualEncoder.pixel_shuffle_feat + llava_visual_feat's flatten: [B, hw, r r C]."""
  b, c, h, w = feat_nchw.shape
  x = feat_nchw.reshape(b, c, h // r, r, w // r, r).permute(0, 3, 5, 1, 2, 4).flatten(1, 3)
  return x.flatten(2).permute(0, 2, 1)


def ref_postprocess(mask_cls, mask_pred, query_feat, image_size, grid):
  """panoptic_postprocess on predict()'s image-size masks (the brute-force path)."""
  mask_pred = F.interpolate(mask_pred[None], size=(image_size, image_size), mode="bilinear",
                            align_corners=False)[0]
  scores, _ = F.softmax(mask_cls, dim=-1)[..., :-1].max(-1)
  prob = (scores.view(-1, 1, 1) * 0.5 + 0.5) * mask_pred.sigmoid()
  prob = F.interpolate(prob[None], size=(grid, grid), mode="bilinear", align_corners=False)[0]
  ids = prob.argmax(0).unsqueeze(0)
  pixel_query = prob.softmax(dim=0).permute(1, 2, 0) @ query_feat
  attn_mask = (ids != torch.arange(query_feat.shape[0]).view(-1, 1, 1)).flatten(1)
  valid = attn_mask.sum(-1) < attn_mask.shape[-1]
  return prob, pixel_query.flatten(0, 1), ids.flatten(), valid


# ------------------------------------------------------------------------------------------------
# Fixtures.

def _randomize(module: nn.Module, seed: int) -> nn.Module:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if isinstance(module.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm) \
          and leaf == "weight":
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf in ("bias", "in_proj_bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 2 and "Embedding" in type(module.get_submodule(
          name.rsplit(".", 1)[0])).__name__:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
  return module.eval()


def _class_embed(seed=5):
  g = torch.Generator().manual_seed(seed)
  e = torch.randn(CFG.num_classes, PROTOS, CFG.cls_embed_dim, generator=g)
  return F.normalize(e, dim=-1)


def _features(seed=1, pos_mask_features=False):
  g = torch.Generator().manual_seed(seed)
  c = CFG.embed_dim
  if pos_mask_features:
    # Nearly constant positive features: a query's mask logit has one sign over the whole map,
    # so many attention rows are fully masked and must be reset.
    mf = 1.0 + 0.05 * torch.randn(B, c, MASK_HW, MASK_HW, generator=g)
  else:
    mf = torch.randn(B, c, MASK_HW, MASK_HW, generator=g)
  mems = [torch.randn(B, c, s, s, generator=g) for s in MEM_HW]
  return mf, mems


def _nhwc(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  ref = _randomize(RefOMG(CFG, _class_embed()), seed=3)
  # Abstract construction (no random init to compile); strict loading fills every parameter.
  model = nnx.eval_shape(lambda: m2f.Mask2FormerDecoder(CFG, rngs=nnx.Rngs(0)))
  load_state_dict(model, ref.state_dict(), MASK2FORMER_DECODER_TABLE, strict=True)
  return ref, model


@pytest.fixture(scope="module")
def jitted():
  return dict(
      call=nnx.jit(lambda m, mf, mems, ce: m(mf, mems, ce)),
      llm=nnx.jit(lambda m, qc, qp, mf, mems, idx: m.forward_llm_seg(qc, qp, mf, mems, idx)))


# ------------------------------------------------------------------------------------------------
# Tests.

def test_table_covers_release_keys(pair):
  ref, _ = pair
  keys = list(ref.state_dict())
  assert any("in_proj_weight" in k for k in keys)
  assert "panoptic_head.transformer_decoder_llm.post_norm.weight" in keys
  assert "panoptic_head.mask_embed_llm.4.bias" in keys
  assert "panoptic_head.pos_linear.weight" in keys      # present, skipped by the table
  assert not any("cls_embed" in k for k in keys)         # non-persistent buffer


def test_decoder_layer(pair):
  ref, model = pair
  tl = ref.panoptic_head.transformer_decoder.layers[1]
  jl = model.transformer_decoder.layers[1]
  g = torch.Generator().manual_seed(11)
  c, q, k = CFG.embed_dim, CFG.num_queries, 8 * 8
  x = torch.randn(B, q, c, generator=g)
  qpos = torch.randn(B, q, c, generator=g)
  mem = torch.randn(B, k, c, generator=g)
  kpos = sine_3d_torch(8, 8, c // 2)
  mask = torch.rand(B, q, k, generator=g) < 0.6
  mask[0, 3] = True                                       # a fully masked row: reset first
  mask[1, 5] = True
  jmask = m2f.reset_empty_rows(jnp.asarray(mask.numpy()))
  assert not bool(jnp.any(jnp.all(jmask, -1)))
  mask[torch.where(mask.sum(-1) == k)] = False
  with torch.no_grad():
    want = tl(x, mem, mem, qpos, kpos[None].repeat(B, 1, 1),
              mask.repeat_interleave(CFG.num_heads, 0))
  np.testing.assert_array_equal(np.asarray(jmask), mask.numpy())
  got = nnx.jit(lambda l, *a: l(*a))(jl, jnp.asarray(x.numpy()), jnp.asarray(qpos.numpy()),
                                     jnp.asarray(mem.numpy()), jnp.asarray(kpos.numpy()), jmask)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)


def test_key_pos_matches_mmdet_formula():
  for h, w in ((4, 4), (8, 8), (3, 5)):
    from models.omg_seg.positional import sine_3d
    np.testing.assert_allclose(np.asarray(sine_3d(h, w, 16)).reshape(h * w, 32),
                               sine_3d_torch(h, w, 16).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pos_features", [False, True], ids=["random", "empty_rows"])
def test_decoder(pair, jitted, pos_features):
  ref, model = pair
  mf, mems = _features(seed=1, pos_mask_features=pos_features)
  head = ref.panoptic_head
  head.full_rows = []
  with torch.no_grad():
    q, cls, masks = head(mf, mems)
  if pos_features:
    # The reset rule is exercised: some (not all) rows were fully masked before some layer.
    assert sum(head.full_rows) > 0
    assert min(head.full_rows) < B * CFG.num_queries
  out = jitted["call"](model, _nhwc(mf), [_nhwc(m) for m in mems],
                       jnp.asarray(_class_embed().numpy()))
  np.testing.assert_allclose(np.asarray(out["query_feat_last"]), q.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(out["mask_logits"]), masks.numpy(), atol=TOL, rtol=0)
  # Class logits are 100 x a cosine: compare the cosine at TOL (the logits to 100 x TOL).
  scale = math.exp(CFG.logit_scale)
  np.testing.assert_allclose(np.asarray(out["cls_logits"]) / scale, cls.numpy() / scale,
                             atol=TOL, rtol=0)
  assert np.all(np.asarray(out["cls_logits"])[..., -1] == 0)
  np.testing.assert_array_equal(np.asarray(out["query_pos"]),
                                np.broadcast_to(head.query_embed.weight.detach().numpy(),
                                                out["query_pos"].shape))


def test_decoder_without_reset_would_differ(pair):
  """The empty-row case matters: skipping the reset gives NaN rows in the torch reference."""
  ref, _ = pair
  mf, mems = _features(seed=1, pos_mask_features=True)
  head = ref.panoptic_head
  head.reset = False
  try:
    with torch.no_grad():
      q, _, _ = head(mf, mems)
  finally:
    head.reset = True
  assert torch.isnan(q).any()


def test_forward_llm_seg(pair, jitted):
  ref, model = pair
  mf, mems = _features(seed=2)
  g = torch.Generator().manual_seed(7)
  n = 3
  hidden = torch.randn(n, 2 * CFG.embed_dim, generator=g)
  idx = torch.tensor([1, 0, 1])
  with torch.no_grad():
    want = ref.panoptic_head.forward_llm_seg(hidden, idx, mf, mems)[:, 0]
  c = CFG.embed_dim
  got = jitted["llm"](model, jnp.asarray(hidden[:, :c].numpy()), jnp.asarray(hidden[:, c:].numpy()),
                      _nhwc(mf), [_nhwc(m) for m in mems], jnp.asarray(idx.numpy()))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)
  # A model whose llm copy was not used would fail above: the reference's llm copy has its own
  # random weights (checked here so that this stays true).
  head = ref.panoptic_head
  assert not torch.equal(head.mask_embed[0].weight, head.mask_embed_llm[0].weight)


def test_forward_llm_seg_broadcasts_one_image(pair, jitted):
  _, model = pair
  mf, mems = _features(seed=2)
  c, n = CFG.embed_dim, 3
  qc = jnp.asarray(np.linspace(-1, 1, n * c, dtype=np.float32).reshape(n, c))
  qp = qc[::-1]
  one = nnx.jit(lambda m, *a: m.forward_llm_seg(*a))(
      model, qc, qp, _nhwc(mf[1:]), [_nhwc(m[1:]) for m in mems])
  idx = jitted["llm"](model, qc, qp, _nhwc(mf), [_nhwc(m) for m in mems], jnp.array([1, 1, 1]))
  np.testing.assert_allclose(np.asarray(one), np.asarray(idx), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="batch_idx"):
    model.forward_llm_seg(jnp.ones((3, c)), jnp.ones((3, c)), _nhwc(mf),
                          [_nhwc(m) for m in mems])


def test_pixel_shuffle():
  g = torch.Generator().manual_seed(3)
  feat = torch.randn(2, 6, 8, 8, generator=g)         # [B, C, H, W]
  want = ref_pixel_shuffle(feat)
  got = jax.jit(vt.pixel_shuffle)(_nhwc(feat))
  assert got.shape == (2, 16, 24)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.mark.parametrize("grid,logits,image", [
    (4, 16, 64),        # OMG's geometry at 1/16 scale: cell = 2 pixels at 16 i + 7.375 / 7.625
    (16, 256, 1024),    # OMG itself (few queries)
    (3, 10, 48),        # odd down-sample ratio (single-pixel reads) and a non-4 up-sample
    (5, 12, 35),        # fractional ratios on both sides
])
def test_downsampled_probs_vs_brute_force(grid, logits, image):
  g = torch.Generator().manual_seed(grid * 100 + logits)
  q = 3
  x = 3.0 * torch.randn(1, q, logits, logits, generator=g)
  s = torch.rand(1, q, generator=g)
  up = F.interpolate(x, size=(image, image), mode="bilinear", align_corners=False)
  p = s[..., None, None] * up.sigmoid()
  want = F.interpolate(p, size=(grid, grid), mode="bilinear", align_corners=False)
  got = jax.jit(vt.downsampled_probs, static_argnums=(2, 3))(
      jnp.asarray(x.numpy()), jnp.asarray(s.numpy()), grid, image)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6, rtol=0)


def test_omg_shortcut_taps():
  """At OMG size each cell reads logit rows 16 i + 7.375 and 16 i + 7.625 (spec 1.4)."""
  down_w, up = vt.composite_taps(16, 256, 1024)
  np.testing.assert_array_equal(down_w, 0.5)
  pos = (up * np.arange(256)).sum(-1)                   # read position of each pixel
  i = np.arange(16)[:, None]
  np.testing.assert_allclose(pos, 16 * i + np.array([7.375, 7.625]), atol=0, rtol=0)


def test_visual_tokens_vs_postprocess(pair, jitted):
  ref, model = pair
  mf, mems = _features(seed=4)
  out = jitted["call"](model, _nhwc(mf), [_nhwc(m) for m in mems],
                       jnp.asarray(_class_embed().numpy()))
  g = torch.Generator().manual_seed(9)
  clip = torch.randn(B, 24, 8, 8, generator=g)           # stage-4 map, G = 4
  image = 4 * MASK_HW                                    # mask features are stride 4
  got = jax.jit(vt.visual_tokens, static_argnames="image_size")(_nhwc(clip), out,
                                                                 image_size=image)
  cls = torch.tensor(np.asarray(out["cls_logits"]))
  masks = torch.tensor(np.asarray(out["mask_logits"]))
  qpf = torch.cat([torch.tensor(np.asarray(out["query_feat_last"])),
                   torch.tensor(np.asarray(out["query_pos"]))], dim=-1)
  np.testing.assert_array_equal(np.asarray(got["query_pos_feat"]), qpf.numpy())
  clip_tok = ref_pixel_shuffle(clip)
  for b in range(B):
    _, prior, owner, valid = ref_postprocess(cls[b], masks[b], qpf[b], image, 4)
    want = torch.cat([clip_tok[b], prior], dim=-1)
    np.testing.assert_allclose(np.asarray(got["pixel_tokens"][b]), want.numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(got["owner"][b]), owner.numpy())
    np.testing.assert_array_equal(np.asarray(got["valid"][b]), valid.numpy())
  assert got["pixel_tokens"].shape == (B, 16, 4 * 24 + 2 * CFG.embed_dim)


def test_perception_prior_first_index_on_ties():
  q, m = 4, 8
  logits = jnp.zeros((1, q, m, m))
  cls = jnp.zeros((1, q, 3))
  feat = jnp.arange(q * 2, dtype=jnp.float32).reshape(1, q, 2)
  prior, owner, valid = jax.jit(vt.perception_prior, static_argnums=(3, 4))(cls, logits, feat, 2,
                                                                            32)
  np.testing.assert_array_equal(np.asarray(owner), 0)
  np.testing.assert_array_equal(np.asarray(valid), [[True, False, False, False]])
  np.testing.assert_allclose(np.asarray(prior), np.broadcast_to(feat.mean(1), (1, 4, 2)),
                             rtol=1e-6)


def test_bad_inputs(pair):
  _, model = pair
  mf, mems = _features()
  with pytest.raises(ValueError, match="memory levels"):
    model(_nhwc(mf), [_nhwc(m) for m in mems[:2]], jnp.asarray(_class_embed().numpy()))
  with pytest.raises(ValueError, match="class_embed"):
    model(_nhwc(mf), [_nhwc(m) for m in mems], jnp.zeros((4, 2, CFG.cls_embed_dim)))
  with pytest.raises(ValueError, match="divisible"):
    vt.pixel_shuffle(jnp.zeros((1, 5, 4, 3)))
