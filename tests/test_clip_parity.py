"""CLIP vision tower parity against `transformers.CLIPVisionModel` (fp32, CPU, tiny config).

Proves: the HF-name table loads every weight; every hidden state (embeddings after pre_layrnorm and
each layer) matches HF to 1e-5; the pooled output matches; `features(select_layer=-2)` is HF's
hidden_states[-2] without CLS, computed without running the last layer; and the CLS→patch
attention equals HF's eager `attentions[layer][:, :, 0, 1:]` averaged over heads.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from models.clip.config import CLIPVisionConfig
from models.clip.modeling import CLIPVisionModel
from models.clip.params import HF_CLIP_VISION_TABLE
from models.param_tables import load_state_dict, map_key
from tests.hf_reference import import_transformers

transformers = import_transformers()
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
  cfg = CLIPVisionConfig.tiny()
  hf_cfg = transformers.CLIPVisionConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
      layer_norm_eps=cfg.layer_norm_eps, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.CLIPVisionModel(hf_cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorm affine parameters and positions
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
      elif "position_embedding" in name:
        p.normal_(0, 0.5)
  model = CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, hf.state_dict(), HF_CLIP_VISION_TABLE)
  pixels = np.random.default_rng(0).normal(size=(2, 3, cfg.image_size, cfg.image_size))
  pixels = pixels.astype(np.float32)
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(pixels), output_hidden_states=True,
             output_attentions=True)
  return cfg, model, pixels.transpose(0, 2, 3, 1), ref


@jax.jit
def _run_all(model, pixels):
  out = model(pixels, cls_attention_layer=0)
  return out, model.pool(out.last_hidden_state)


def test_every_hidden_state_and_pool_match_hf(models):
  cfg, model, pixels, ref = models
  out, pooled = _run_all(model, jnp.asarray(pixels))
  assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_layers + 1
  for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert want.abs().max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL, rtol=0,
                               err_msg=f"hidden_states[{i}]")
  np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(),
                             atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=ATOL, rtol=0)
  want = ref.attentions[0][:, :, 0, 1:].mean(1).numpy()
  np.testing.assert_allclose(np.asarray(out.cls_attention), want, atol=1e-6, rtol=0)


def test_features_select_layer_and_cls_attention(models):
  cfg, model, pixels, ref = models
  feats, cls_attn = jax.jit(lambda m, p: m.features(p, select_layer=-2))(model, jnp.asarray(pixels))
  assert feats.shape == (2, cfg.num_patches, cfg.hidden_size)
  assert cls_attn.shape == (2, cfg.num_patches) and cls_attn.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(feats), ref.hidden_states[-2][:, 1:].numpy(),
                             atol=ATOL, rtol=0)
  # hidden_states[-2] is the output of layer L-2, so its attention is layer L-2's.
  want = ref.attentions[cfg.num_layers - 2][:, :, 0, 1:].mean(1).numpy()
  np.testing.assert_allclose(np.asarray(cls_attn), want, atol=1e-6, rtol=0)
  # Probabilities over all 1+N keys: the patch part sums to 1 - P(CLS -> CLS).
  cls_self = ref.attentions[cfg.num_layers - 2][:, :, 0, 0].mean(1).numpy()
  np.testing.assert_allclose(np.asarray(cls_attn).sum(1), 1 - cls_self, atol=1e-6)
  # The last layer is never run: poisoning its weights changes nothing.
  poisoned = nnx.clone(model)
  last = poisoned.encoder.layers[cfg.num_layers - 1]
  last.mlp.fc1.kernel[...] = jnp.full_like(last.mlp.fc1.kernel[...], jnp.nan)
  feats2, _ = poisoned.features(jnp.asarray(pixels), select_layer=-2)
  assert np.isfinite(np.asarray(feats2)).all()
  np.testing.assert_allclose(np.asarray(feats2), np.asarray(feats), atol=1e-6, rtol=0)


def test_table_maps_hub_checkpoint_names():
  """The hub file is a CLIPModel (`vision_model.` prefix, plus a text tower to skip)."""
  path, transform = map_key("vision_model.encoder.layers.11.mlp.fc1.weight", HF_CLIP_VISION_TABLE)
  assert path == ("encoder", "layers", 11, "mlp", "fc1", "kernel")
  assert transform(np.zeros((4, 3))).shape == (3, 4)
  path, _ = map_key("vision_model.pre_layrnorm.weight", HF_CLIP_VISION_TABLE)
  assert path == ("pre_layrnorm", "scale")
  assert map_key("text_model.encoder.layers.0.mlp.fc1.weight", HF_CLIP_VISION_TABLE) is None
  assert map_key("logit_scale", HF_CLIP_VISION_TABLE) is None


def test_features_reject_bad_layer_and_input(models):
  cfg, model, pixels, _ = models
  for bad in (0, -(cfg.num_layers + 1), cfg.num_layers + 1):
    with pytest.raises(ValueError, match="select_layer"):
      model.features(jnp.asarray(pixels), select_layer=bad)
  with pytest.raises(ValueError, match="channels last"):
    model(jnp.asarray(pixels.transpose(0, 3, 1, 2)))


def test_load_rejects_unknown_key(models):
  cfg, _, _, _ = models
  with pytest.raises(ValueError, match="no conversion rule.*vision_model.encoder.bogus"):
    load_state_dict(CLIPVisionModel(cfg, rngs=nnx.Rngs(1)),
                    {"vision_model.encoder.bogus": np.zeros(3)}, HF_CLIP_VISION_TABLE)
