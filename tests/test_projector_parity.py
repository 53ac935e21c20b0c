"""GLaMM projectors vs the torch modules GLaMM builds (nn.Sequential), fp32, tiny widths.

Proves: the GLaMM-name tables load both modules; mm_projector uses the exact (erf) GELU and
text_hidden_fcs a ReLU, matching torch to 1e-5.
"""

import numpy as np
import torch
from torch import nn

import jax.numpy as jnp
from flax import nnx

from models.param_tables import load_state_dict
from models.projector import MMProjector, ProjectorConfig, TextHiddenFcs
from models.projector_params import MM_PROJECTOR_TABLE, TEXT_HIDDEN_FCS_TABLE


def _prefixed(module, prefix):
  return {prefix + k: v for k, v in module.state_dict().items()}


def test_mm_projector_matches_torch():
  cfg = ProjectorConfig.tiny()
  torch.manual_seed(0)
  ref = nn.Sequential(nn.Linear(cfg.vision_hidden_size, cfg.llm_hidden_size), nn.GELU(),
                      nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size))
  model = MMProjector(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, _prefixed(ref, "model.mm_projector."), MM_PROJECTOR_TABLE)
  # Large inputs put GELU's tails (where erf and tanh GELU differ most) to work.
  x = 3 * np.random.default_rng(0).normal(size=(2, 9, cfg.vision_hidden_size)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want, atol=1e-5, rtol=0)


def test_text_hidden_fcs_matches_torch():
  cfg = ProjectorConfig.tiny()
  torch.manual_seed(1)
  ref = nn.ModuleList([nn.Sequential(nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size),
                                     nn.ReLU(inplace=True),
                                     nn.Linear(cfg.llm_hidden_size, cfg.seg_embed_dim),
                                     nn.Dropout(0.0))]).eval()
  model = TextHiddenFcs(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, _prefixed(ref, "model.text_hidden_fcs."), TEXT_HIDDEN_FCS_TABLE)
  x = np.random.default_rng(1).normal(size=(5, cfg.llm_hidden_size)).astype(np.float32)
  with torch.no_grad():
    want = ref[0](torch.from_numpy(x)).numpy()
  got = np.asarray(model(jnp.asarray(x)))
  assert got.shape == (5, cfg.seg_embed_dim)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
