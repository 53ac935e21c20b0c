"""Mesh spec parsing, divisibility errors, the sharding table's coverage, and the golden dump of
where every tiny-GLaMM parameter goes on the test meshes (plus GLaMM-7B on (1, 2, 4) from
`eval_shape`, no memory)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from models import mesh as mesh_lib
from models import sharding_dump
from models.glamm.config import GLaMMConfig
from models.glamm.modeling import abstract_glamm
from models.llama.config import LlamaConfig
from models.sharding import (LOGICAL_RULES, MESH_AXES, logical_spec, mesh_axes_of,
                             plan_param_specs, shard_shape)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "glamm_tiny_partition_specs.json")


# -- mesh specs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,n,want", [
    ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
    ("data=-1,tensor=4", 8, (2, 1, 4)),
    ("fsdp=-1", 8, (1, 8, 1)),
    ("tensor=8", 8, (1, 1, 8)),
    (" data = 2 , fsdp=-1 , tensor=2 ", 16, (2, 4, 2)),
    ("data=-1,fsdp=4,tensor=8", 64, (2, 4, 8)),
])
def test_parse_mesh_spec(text, n, want):
  assert tuple(mesh_lib.parse_mesh_spec(text, n).values()) == want


@pytest.mark.parametrize("text,n,match", [
    ("data=2,fsdp=2,tensor=4", 8, r"2 x 2 x 4 = 16, but there are 8 devices"),
    ("data=-1,tensor=3", 8, r"not a multiple of the other axes' product 3"),
    ("data=-1,fsdp=-1", 8, r"only one axis may be -1, got data, fsdp"),
    ("pipeline=2", 8, r"'pipeline=2' is not AXIS=SIZE"),
    ("data=two", 8, r"size 'two' of 'data' is not an integer"),
    ("data=0,tensor=8", 8, r"size of 'data' must be positive or -1"),
    ("data=2,data=4", 8, r"axis 'data' given twice"),
])
def test_parse_mesh_spec_errors(text, n, match):
  with pytest.raises(mesh_lib.MeshError, match=match):
    mesh_lib.parse_mesh_spec(text, n)


def test_make_mesh_auto_axes_and_forms():
  for spec in ("data=2,fsdp=-1,tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)):
    mesh = mesh_lib.make_mesh(spec)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
  mesh = mesh_lib.make_mesh("tensor=-1", devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 4}


def test_check_divisible_names_every_problem():
  gqa = LlamaConfig.tiny(num_heads=4, num_kv_heads=2)
  with pytest.raises(mesh_lib.MeshError) as err:
    mesh_lib.check_divisible(gqa, {"data": 1, "fsdp": 3, "tensor": 4}, batch=4)
  msg = str(err.value)
  assert "mesh (data=1, fsdp=3, tensor=4)" in msg
  assert "LLM KV heads: 2 KV heads do not divide over tensor=4 (fewer KV heads" in msg
  assert "batch: 4 rows do not divide over data x fsdp = 1 x 3 = 3" in msg
  assert "attention heads" not in msg                       # 4 heads do divide
  with pytest.raises(mesh_lib.MeshError, match=r"LLM attention heads: 32 heads .* tensor=3"):
    mesh_lib.check_divisible(GLaMMConfig.glamm_7b(), {"data": 1, "fsdp": 1, "tensor": 3})
  # GLaMM-7B on a 2x4 slice with a batch of 8: fine (the vocab is reported, not an error).
  mesh_lib.check_divisible(GLaMMConfig.glamm_7b(), mesh_lib.make_mesh((1, 2, 4)), batch=8)


# -- the table ------------------------------------------------------------------------------------------

def test_every_glamm_logical_name_has_a_rule_and_unknown_names_fail():
  state = nnx.state(abstract_glamm(GLaMMConfig.tiny()))
  names = {n for v in nnx.get_partition_spec(state).flat_state() for n in v[1].get_value()}
  names.discard(None)
  table = {n for n, _ in LOGICAL_RULES}
  assert names <= table, names - table
  for name, axes in LOGICAL_RULES:
    assert set(mesh_axes_of(name)) <= set(MESH_AXES), name
  with pytest.raises(KeyError, match=r"'embd' has no rule"):
    mesh_axes_of("embd")
  with pytest.raises(ValueError, match=r"mesh axis 'tensor' would split both dim 0 and dim 1"):
    logical_spec(("mlp", "vocab"))


def test_golden_partition_specs_of_tiny_glamm():
  """Any change of where a parameter goes shows up here; if intended, regenerate with
  `python -m models.sharding_dump --out tests/golden/glamm_tiny_partition_specs.json`."""
  with open(GOLDEN) as f:
    golden = json.load(f)
  now = json.loads(json.dumps(sharding_dump.dump("tiny")))
  assert now["logical"] == golden["logical"]
  assert set(now["meshes"]) == set(golden["meshes"])
  for mesh, want in golden["meshes"].items():
    got = now["meshes"][mesh]
    diff = [f"{p}: {got['specs'].get(p)} != golden {s}" for p, s in want["specs"].items()
            if got["specs"].get(p) != s]
    diff += [f"{p}: not in the golden file" for p in set(got["specs"]) - set(want["specs"])]
    assert not diff, f"{mesh}:\n  " + "\n  ".join(diff[:20])
    assert got["replicated"] == want["replicated"], mesh
    assert got["param_bytes_per_device"] == want["param_bytes_per_device"], mesh


def test_golden_file_content_is_the_intended_placement():
  """Spot checks of the golden file against the design, so regenerating it cannot silently bless a
  wrong table."""
  with open(GOLDEN) as f:
    golden = json.load(f)["meshes"]
  m = golden["data=1,fsdp=4,tensor=2"]["specs"]
  assert m["llm.layers.0.self_attn.q_proj.kernel"] == ["fsdp", "tensor"]
  assert m["llm.layers.3.self_attn.o_proj.kernel"] == ["tensor", "fsdp"]
  assert m["llm.layers.1.mlp.down_proj.kernel"] == ["tensor", "fsdp"]
  assert m["llm.embed_tokens.embedding"] == ["tensor", "fsdp"]        # vocab 128 divides
  assert m["llm.lm_head.kernel"] == ["fsdp", "tensor"]
  assert m["llm.norm.weight"] == [None]
  assert m["mm_projector.linear_1.kernel"] == [None, "tensor"]
  assert m["vision_tower.encoder.layers.0.mlp.fc1.kernel"] == [None, "tensor"]
  assert m["grounding_encoder.image_encoder.blocks.0.attn.qkv.kernel"] == [None, None, "tensor",
                                                                          None]
  # Tensor 4 does not divide the tiny SAM's 2 heads: replicated and reported, LLM untouched.
  t4 = golden["data=2,fsdp=1,tensor=4"]
  assert t4["specs"]["grounding_encoder.image_encoder.blocks.0.attn.qkv.kernel"] == [None] * 4
  assert t4["specs"]["llm.layers.0.self_attn.k_proj.kernel"] == ["fsdp", "tensor"]
  assert all(r.startswith("grounding_encoder.") for r in t4["replicated"])
  # The tiny vision towers (mostly replicated) weigh as much as its LLM, hence only ~2x.
  assert golden["data=8,fsdp=1,tensor=1"]["param_bytes_per_device"] > \
      1.8 * golden["data=1,fsdp=4,tensor=2"]["param_bytes_per_device"]


def test_glamm_7b_placement_on_1x2x4_from_eval_shape():
  state = sharding_dump.abstract_state(GLaMMConfig.glamm_7b())
  sizes = {"data": 1, "fsdp": 2, "tensor": 4}
  specs, report = plan_param_specs(state, sizes)
  # 32007 rows divide no tensor axis: embed_tokens and lm_head keep only their fsdp split.
  assert [(".".join(map(str, r.path)), r.dim) for r in report] == [
      ("llm.embed_tokens.embedding", 0), ("llm.lm_head.kernel", 1)]
  assert specs[("llm", "embed_tokens", "embedding")] == P(None, "fsdp")
  assert specs[("llm", "lm_head", "kernel")] == P("fsdp", None)
  for i in (0, 31):
    layer = ("llm", "layers", i)
    assert specs[layer + ("self_attn", "q_proj", "kernel")] == P("fsdp", "tensor")
    assert specs[layer + ("self_attn", "o_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[layer + ("mlp", "gate_proj", "kernel")] == P("fsdp", "tensor")
    assert specs[layer + ("mlp", "down_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[layer + ("input_layernorm", "weight")] == P(None)
  assert specs[("grounding_encoder", "image_encoder", "blocks", 5, "attn", "qkv", "kernel")] == \
      P(None, None, "tensor", None)                                     # 16 SAM heads / 4
  # Every decoder layer weight is split 8 ways: each device holds 1/8 of it.
  flat = dict(state.flat_state())
  for path, spec in specs.items():
    if path[:2] == ("llm", "layers") and len(flat[path].shape) == 2:
      assert np.prod(shard_shape(flat[path].shape, spec, sizes)) * 8 == np.prod(flat[path].shape)
  # Per device: 1/8 of the decoder, 1/2 of embed+lm_head, the vision towers mostly whole.
  per_device = sharding_dump.dump("glamm_7b", [(1, 2, 4)])["meshes"]["data=1,fsdp=2,tensor=4"]
  gib = per_device["param_bytes_per_device"] / 2**30
  assert 2.3 < gib < 3.0, gib


# -- activations -----------------------------------------------------------------------------------------

def test_constrain_and_cache_shardings():
  mesh = mesh_lib.make_mesh((2, 2, 2))
  x = jnp.ones((8, 5, 16))
  assert mesh_lib.constrain(x, mesh_lib.ACT_HIDDEN) is x                   # no mesh: no-op
  f = jax.jit(lambda x: mesh_lib.constrain(x * 2, ("batch", "length", "act_mlp"), mesh))
  assert f(x).sharding.spec == P(("data", "fsdp"), None, "tensor")
  with jax.set_mesh(mesh):                                                  # mesh from context
    y = jax.jit(lambda x: mesh_lib.constrain(x + 1, ("batch", None, "act_heads")))(x)
  assert y.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
  # Logits over a vocabulary the tensor axis does not divide stay whole on that dimension.
  assert mesh_lib.spec_for(mesh_lib.ACT_LOGITS, (8, 1, 32007), dict(mesh.shape)) == \
      P(("data", "fsdp"), None, None)
  with pytest.raises(ValueError, match=r"3 names .* shape \(8, 5\)"):
    mesh_lib.constrain(jnp.ones((8, 5)), mesh_lib.ACT_HIDDEN, mesh)

  from models.llama.cache import KVCache
  cache = mesh_lib.shard_cache(KVCache.create(8, 12, 2, 4, 16), mesh)
  assert cache.k[1].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  assert cache.valid.sharding.spec == P(("data", "fsdp"), None)
  assert cache.k[0].addressable_shards[0].data.shape == (2, 12, 2, 16)


def test_mesh_cli_reports_memory_and_refuses_bad_batches(capsys):
  out = mesh_lib.main(["--mesh", "fsdp=2,tensor=-1", "--devices", "8", "--batch", "8"])
  assert out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
  assert 2.3 < out["param_gib_per_device"] < 3.0
  # 32 layers x k,v x 4 rows x 1152 slots x 8 heads x 128 x 2 bytes.
  assert out["kv_cache_gib_per_device"] == 2 * 32 * 4 * 1152 * 8 * 128 * 2 / 2**30
  assert '"tensor": 4' in capsys.readouterr().out
  with pytest.raises(mesh_lib.MeshError, match=r"batch: 6 rows do not divide over data x fsdp"):
    mesh_lib.main(["--mesh", "data=4,tensor=2", "--devices", "8", "--batch", "6"])
