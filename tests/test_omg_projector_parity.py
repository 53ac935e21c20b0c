"""OMG-LLaVA projectors vs torch modules built like the release (fp32, tiny widths).

The reference `NaiveProj` has Naive_Proj's submodules and names (`query_proj`, `model` and
`model_feat` as nn.Sequential(Linear, GELU(), Linear), `seperate_embed` nn.Embedding(1, D)) and its
forward: valid = mask.sum(-1) < HW, per image cat([model_feat(clip), seperate_embed.weight,
model(query_proj(q))[valid]]). Keys get the release prefixes `projector.model.` and
`projector_text2vision.model.`.

Proves: both tables load every release key; each image's token list matches to 1e-5 (exact GELU,
valid queries packed in ascending index order, separator in place); TextToVision matches.
"""

import numpy as np
import pytest
import torch
from torch import nn

import jax
import jax.numpy as jnp
from flax import nnx

from models.omg_llava.projector import (OMG_PROJECTOR_TABLE, TEXT_TO_VISION_TABLE, OMGProjector,
                                        OMGProjectorConfig, TextToVision, valid_queries)
from models.param_tables import load_state_dict, map_key


def _mlp(d_in, d_out):
  return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class NaiveProj(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.query_proj = nn.Linear(cfg.query_dim, cfg.query_hidden)
    self.model = _mlp(cfg.query_hidden, cfg.llm_hidden_size)
    self.model_feat = _mlp(cfg.pixel_dim, cfg.llm_hidden_size)
    self.seperate_embed = nn.Embedding(1, cfg.llm_hidden_size)

  def forward(self, clip_feature, query_feat, attention_mask):
    valid = attention_mask.sum(dim=-1) < attention_mask.shape[-1]
    objs = self.model(self.query_proj(query_feat))
    pix = self.model_feat(clip_feature)
    return [torch.cat([p, self.seperate_embed.weight, o[keep]], dim=0)
            for p, o, keep in zip(pix, objs, valid)]


def _prefixed(module, prefix):
  return {prefix + k: v for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def cfg():
  return OMGProjectorConfig.tiny()


def test_omg_projector_matches_torch(cfg):
  torch.manual_seed(0)
  ref = NaiveProj(cfg).eval()
  model = OMGProjector(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, _prefixed(ref, "projector.model."), OMG_PROJECTOR_TABLE)

  rng = np.random.default_rng(0)
  b, hw, q = 3, 6, 7
  # Large inputs put GELU's tails (where erf and tanh GELU differ most) to work.
  pix = 3 * rng.normal(size=(b, hw, cfg.pixel_dim)).astype(np.float32)
  qf = 3 * rng.normal(size=(b, q, cfg.query_dim)).astype(np.float32)
  mask = rng.random((b, q, hw)) < 0.5
  mask[0, [1, 4, 5]] = True   # all-masked queries are dropped...
  mask[1] = True              # ...an image with no valid query...
  mask[2] = False             # ...and one where all are valid.
  with torch.no_grad():
    want = ref(torch.from_numpy(pix), torch.from_numpy(qf), torch.from_numpy(mask))

  valid = valid_queries(jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(valid), ~mask.all(-1))
  tokens, token_valid = jax.jit(lambda m, *a: m(*a))(model, jnp.asarray(pix), jnp.asarray(qf),
                                                     valid)
  tokens, token_valid = np.asarray(tokens), np.asarray(token_valid)
  assert tokens.shape == (b, hw + 1 + q, cfg.llm_hidden_size)
  assert [w.shape[0] for w in want] == [hw + 1 + 4, hw + 1, hw + 1 + q]
  for i, w in enumerate(want):
    n = w.shape[0]
    assert token_valid[i].tolist() == [True] * n + [False] * (hw + 1 + q - n)
    np.testing.assert_allclose(tokens[i, :n], w.numpy(), atol=1e-5, rtol=0, err_msg=f"image {i}")
    assert not tokens[i, n:].any()
  assert np.abs(want[0].numpy()).max() > 0.5
  with pytest.raises(ValueError, match="query_valid shape"):
    model(jnp.asarray(pix), jnp.asarray(qf), valid[:, :3])


def test_text_to_vision_matches_torch(cfg):
  torch.manual_seed(1)
  ref = _mlp(cfg.llm_hidden_size, cfg.text2vision_dim).eval()
  model = TextToVision(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, _prefixed(ref, "projector_text2vision.model."), TEXT_TO_VISION_TABLE)
  x = 3 * np.random.default_rng(1).normal(size=(5, cfg.llm_hidden_size)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(model(jnp.asarray(x)))
  assert got.shape == (5, cfg.text2vision_dim)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_release_shapes_load():
  """Every release key of §2.3 at full size maps onto a parameter of the same shape."""
  cfg = OMGProjectorConfig.omg_llava_7b()
  shapes = {
      "projector.model.query_proj.weight": (6144, 512), "projector.model.query_proj.bias": (6144,),
      "projector.model.model.0.weight": (4096, 6144), "projector.model.model.0.bias": (4096,),
      "projector.model.model.2.weight": (4096, 4096), "projector.model.model.2.bias": (4096,),
      "projector.model.model_feat.0.weight": (4096, 6656),
      "projector.model.model_feat.0.bias": (4096,),
      "projector.model.model_feat.2.weight": (4096, 4096),
      "projector.model.model_feat.2.bias": (4096,),
      "projector.model.seperate_embed.weight": (1, 4096),
  }
  abstract = nnx.eval_shape(lambda: OMGProjector(cfg, rngs=nnx.Rngs(0)))
  flat = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  got = {}
  for key, shape in shapes.items():
    path, fn = map_key(key, OMG_PROJECTOR_TABLE)
    view = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
    got[path] = fn(view).shape
  assert got == flat
  assert all(v.get_value().dtype == jnp.float32
             for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
