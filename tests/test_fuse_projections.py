"""models/llama/fuse.py: fused q/k/v and gate/up projections give the unfused model's outputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import altp_jax
from models import generate as gen
from models import mesh as mesh_lib
from models import placement
from models.llama.config import LlamaConfig
from models.llama.fuse import FusedLinear, fuse_projections, should_fuse
from models.llama.modeling import LlamaForCausalLM


def _pair(num_kv_heads):
  cfg = LlamaConfig.tiny(num_kv_heads=num_kv_heads)
  a = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  b = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  fuse_projections(b)
  return a, b


@pytest.mark.parametrize("num_kv_heads", [4, 2])   # MHA and GQA
def test_fused_forward_and_pruned_generation_equal_unfused(num_kv_heads):
  plain, fused = _pair(num_kv_heads)
  att, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
  assert att.q_proj is None and att.k_proj is None and mlp.gate_proj is None
  assert isinstance(att.qkv_proj, FusedLinear) and isinstance(mlp.gate_up_proj, FusedLinear)
  assert att.qkv_proj.kernel.shape == (64, (4 + 2 * num_kv_heads) * 16)
  assert mlp.gate_up_proj.kernel.shape == (64, 2 * 96)
  cfg = plain.config
  ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 20)))
  pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
  want = plain.logits(plain(plain.embed(ids), pos)[0])
  got = fused.logits(fused(fused.embed(ids), pos)[0])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # Generation with FastV (scores from a layer's q/k) and PyramidDrop (layer_query_key).
  vis = np.zeros((2, 20), bool)
  vis[:, 3:11] = True
  embeds = plain.embed(ids)
  for plan in (gen.PrunePlan.fastv(4, 8, altp_jax.FastVConfig(layer=2, reduction=0.5)),
               gen.PrunePlan.pdrop(8, altp_jax.PyramidSchedule((1, 2, 3), (0.5, 0.25, 0.125),
                                                               4))):
    kw = dict(plan=plan, sampler=gen.SamplerConfig(max_new_tokens=5, eos_id=-1))
    a = gen.generate(plain, embeds, jnp.ones((2, 20), bool), vis, **kw)
    b = gen.generate(fused, embeds, jnp.ones((2, 20), bool), vis, **kw)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_array_equal(np.asarray(b.keep_index), np.asarray(a.keep_index))
    np.testing.assert_allclose(np.asarray(b.hidden), np.asarray(a.hidden), atol=1e-5)


def test_fusing_is_idempotent_and_places_on_an_fsdp_mesh():
  _, fused = _pair(2)
  kernel = fused.layers[1].self_attn.qkv_proj.kernel[...]
  fuse_projections(fused)
  assert fused.layers[1].self_attn.qkv_proj.kernel[...] is kernel
  mesh = mesh_lib.make_mesh("data=2,fsdp=4")
  placed = placement.place_model(fused, mesh)
  sh = placed.layers[0].mlp.gate_up_proj.kernel[...].sharding
  assert sh.spec[0] == "fsdp" and len(sh.device_set) == 8
  assert should_fuse(None) and should_fuse(mesh)
  assert not should_fuse(mesh_lib.make_mesh("data=2,tensor=4"))
