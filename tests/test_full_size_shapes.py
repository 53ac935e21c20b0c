"""Full-size (7B) shapes without allocating: `nnx.eval_shape` of GLaMM's CLIP tower, LLM and
projectors, checked against the checkpoint key/shape scheme of glamm.md §2.4.

Proves: each component's parameter count equals the count implied by glamm.md's shapes; every
checkpoint key of that scheme maps through our name tables onto a parameter of the right shape
(after the layout transform), every parameter is hit exactly once (what the converter needs); and
every parameter carries one logical axis name per dimension.
"""

import numpy as np
import pytest

import jax
from flax import nnx

from models.clip.config import CLIPVisionConfig
from models.clip.modeling import CLIPVisionModel
from models.clip.params import HF_CLIP_VISION_TABLE
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM
from models.llama.params import HF_LLAMA_TABLE
from models.param_tables import map_key
from models.projector import MMProjector, ProjectorConfig, TextHiddenFcs
from models.projector_params import MM_PROJECTOR_TABLE, TEXT_HIDDEN_FCS_TABLE


def _llm_keys():
  """glamm.md §2.4, LLM table (i = 0..31), incl. the ignored inv_freq buffers."""
  keys = {"model.embed_tokens.weight": (32007, 4096), "model.norm.weight": (4096,),
          "lm_head.weight": (32007, 4096)}
  for i in range(32):
    p = f"model.layers.{i}."
    for n in "qkvo":
      keys[p + f"self_attn.{n}_proj.weight"] = (4096, 4096)
    keys[p + "self_attn.rotary_emb.inv_freq"] = (64,)
    keys[p + "mlp.gate_proj.weight"] = keys[p + "mlp.up_proj.weight"] = (11008, 4096)
    keys[p + "mlp.down_proj.weight"] = (4096, 11008)
    keys[p + "input_layernorm.weight"] = keys[p + "post_attention_layernorm.weight"] = (4096,)
  return keys


def _clip_keys():
  """glamm.md §2.4, the `openai/clip-vit-large-patch14-336` vision keys."""
  v = "vision_model."
  keys = {v + "embeddings.class_embedding": (1024,),
          v + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
          v + "embeddings.position_embedding.weight": (577, 1024)}
  for ln in ("pre_layrnorm", "post_layernorm"):
    keys[v + ln + ".weight"] = keys[v + ln + ".bias"] = (1024,)
  for i in range(24):
    p = v + f"encoder.layers.{i}."
    for n in ("q", "k", "v", "out"):
      keys[p + f"self_attn.{n}_proj.weight"] = (1024, 1024)
      keys[p + f"self_attn.{n}_proj.bias"] = (1024,)
    for ln in ("layer_norm1", "layer_norm2"):
      keys[p + ln + ".weight"] = keys[p + ln + ".bias"] = (1024,)
    keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (4096, 1024), (4096,)
    keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (1024, 4096), (1024,)
  return keys


COMPONENTS = {
    # name: (abstract-model builder, table, glamm.md keys, parameter count implied by them)
    "llm": (lambda: LlamaForCausalLM(LlamaConfig.vicuna_7b(), rngs=nnx.Rngs(0)), HF_LLAMA_TABLE,
            _llm_keys, 6_738_472_960),
    "clip": (lambda: CLIPVisionModel(CLIPVisionConfig.clip_vit_l14_336(), rngs=nnx.Rngs(0)),
             HF_CLIP_VISION_TABLE, _clip_keys, 303_507_456),
    "mm_projector": (lambda: MMProjector(ProjectorConfig.glamm_7b(), rngs=nnx.Rngs(0)),
                     MM_PROJECTOR_TABLE,
                     lambda: {"model.mm_projector.0.weight": (4096, 1024),
                              "model.mm_projector.0.bias": (4096,),
                              "model.mm_projector.2.weight": (4096, 4096),
                              "model.mm_projector.2.bias": (4096,)}, 20_979_712),
    "text_hidden_fcs": (lambda: TextHiddenFcs(ProjectorConfig.glamm_7b(), rngs=nnx.Rngs(0)),
                        TEXT_HIDDEN_FCS_TABLE,
                        lambda: {"model.text_hidden_fcs.0.0.weight": (4096, 4096),
                                 "model.text_hidden_fcs.0.0.bias": (4096,),
                                 "model.text_hidden_fcs.0.2.weight": (256, 4096),
                                 "model.text_hidden_fcs.0.2.bias": (256,)}, 17_830_144),
}


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_full_size_component_matches_glamm_scheme(name):
  build, table, keys_fn, expected_count = COMPONENTS[name]
  abstract = nnx.eval_shape(build)
  state = nnx.state(abstract, nnx.Param)
  flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
  shapes = {path: tuple(var.get_value().shape) for path, var in flat.items()}
  keys = keys_fn()
  assert sum(int(np.prod(s)) for k, s in keys.items() if "inv_freq" not in k) == expected_count
  assert sum(int(np.prod(s)) for s in shapes.values()) == expected_count

  hit = {}
  for key, shape in keys.items():
    mapped = map_key(key, table)
    if mapped is None:
      assert "inv_freq" in key, f"{key} skipped by the table"
      continue
    path, transform = mapped
    assert path in shapes, f"{key} -> {path}: no such parameter"
    # A zero-stride view: the layout transform's output shape without allocating 7B floats.
    view = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))
    assert transform(view).shape == shapes[path], f"{key}: {shape} -> {shapes[path]}"
    assert path not in hit, f"{key} and {hit[path]} both fill {path}"
    hit[path] = key
  assert set(hit) == set(shapes), f"unfilled: {sorted(set(shapes) - set(hit), key=str)[:5]}"

  for path, var in flat.items():
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(shapes[path]), (path, names)


def test_vicuna_decode_cache_shapes():
  """A 7B cache for layers [2, 32) (FastV's post-pruning range) is shaped, not allocated."""
  model = nnx.eval_shape(lambda: LlamaForCausalLM(LlamaConfig.vicuna_7b(), rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(4, 192, 2, 32))
  assert len(cache.k) == 30 and cache.k[0].shape == (4, 192, 32, 128)
  assert cache.valid.shape == (4, 192)
