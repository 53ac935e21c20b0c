"""Tiny GLaMM on 8 CPU devices: every mesh of the issue gives the single-device outputs.

For the meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,4,2), (2,1,4): parameters are placed by
the sharding table (and checked to be where the plan says), inputs are split over the batch, and
CLIP features, LLM logits/hidden states, SAM masks and a prefill + cached greedy decode must match
the unsharded run: token ids and cache-valid flags exactly, thresholded masks exactly away from
the threshold (|logit| > 1e-4), floats to 1e-5 (sharded contractions add in a different order). The KV cache coming out of each decode step must
keep its layout (batch over data x fsdp, KV heads over tensor).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from models import mesh as mesh_lib
from models.placement import place_model
from models.sharding import plan_param_shardings
from tests import _sharded_programs as progs

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)]


@pytest.fixture(scope="module")
def model():
  return progs.tiny_model()


@pytest.fixture(scope="module")
def inputs(model):
  return progs.make_inputs(model.config)


@pytest.fixture(scope="module")
def reference(model, inputs):
  return {name: fn(model, inputs, None) for name, fn in progs.PROGRAMS.items()}


def _compare(name, got, want):
  for key, w in want.items():
    if key.startswith("_"):
      continue
    g = got[key]
    assert g.shape == w.shape, (name, key)
    if key == "masks":
      # Exact, except that a pixel whose reference logit is within 1e-4 of the threshold may
      # flip with the summation order; such pixels must stay rare.
      sure = np.abs(want["mask_logits"]) > 1e-4
      assert (~sure).mean() < 1e-3, (name, (~sure).mean())
      np.testing.assert_array_equal(g[sure], w[sure], err_msg=f"{name}.{key}")
    elif key in progs.EXACT:
      np.testing.assert_array_equal(g, w, err_msg=f"{name}.{key}")
    else:
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{name}.{key}")


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_outputs_equal_single_device(shape, model, inputs, reference):
  mesh = mesh_lib.make_mesh(shape)
  mesh_lib.check_divisible(model.config, mesh, progs.BATCH)
  sharded = place_model(model, mesh)

  # Every parameter sits where the plan puts it, spread over the whole mesh.
  planned, _ = plan_param_shardings(nnx.state(model), mesh)
  planned = dict(planned.flat_state())
  for path, var in nnx.state(sharded).flat_state():
    arr = var.get_value()
    assert arr.sharding.is_equivalent_to(planned[path].get_value(), arr.ndim), path
    assert len(arr.sharding.device_set) == 8, path
  q = sharded.llm.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  for name, fn in progs.PROGRAMS.items():
    got = fn(sharded, inputs, mesh)
    _compare(name, got, reference[name])

  cache = got["_cache"]          # prefill_decode ran last
  want = mesh_lib.cache_shardings(cache, mesh)
  for arr, sh in zip(cache.k + cache.v + (cache.valid,), want.k + want.v + (want.valid,)):
    assert arr.sharding.is_equivalent_to(sh, arr.ndim), (arr.sharding, sh)
  assert want.k[0].spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
