"""Restoring a converted GLaMM checkpoint onto an 8-device FSDP x tensor mesh reads each device's
slice straight into place: no parameter that is meant to be sharded is ever read whole or put
whole on a device.

The checkpoint is written by the converter's own writer (`convert.writer.GroupWriter`, one Orbax
checkpoint per group) from the tiny random GLaMM. During `load_glamm` the test records every
TensorStore read Orbax makes and every array it hands to `jax.device_put`, and checks both against
the plan: one read per distinct shard, each the planned block, and exactly one device's block per
device -- so the whole restore moves exactly the bytes the devices end up holding.
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.serialization import serialization as ocp_serialization

import convert
from models import mesh as mesh_lib
from models.sharding import plan_param_specs, shard_shape
from tests import _sharded_programs as progs

MESH = (1, 4, 2)   # data, fsdp, tensor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tiny_glamm"))
  return out, progs.write_checkpoint(progs.tiny_model(), out)


def test_restore_reads_and_places_only_each_devices_slice(checkpoint, monkeypatch):
  out, original = checkpoint
  mesh = mesh_lib.make_mesh(MESH)
  sizes = dict(mesh.shape)

  reads, puts = [], []
  read_shard = ocp_serialization._read_shard
  device_put = jax.device_put

  async def recording_read(*, t, requested_domain, **kwargs):
    reads.append((tuple(t.shape), tuple(requested_domain.shape)))
    return await read_shard(t=t, requested_domain=requested_domain, **kwargs)

  def recording_put(x, *args, **kwargs):
    for leaf in jax.tree.leaves(x):
      puts.append((tuple(np.shape(leaf)), int(np.asarray(leaf).nbytes)
                   if isinstance(leaf, np.ndarray) else None))
    return device_put(x, *args, **kwargs)

  monkeypatch.setattr(ocp_serialization, "_read_shard", recording_read)
  monkeypatch.setattr(jax, "device_put", recording_put)
  model = convert.load_glamm(out, mesh=mesh)
  monkeypatch.undo()

  state = dict(nnx.state(model).flat_state())
  specs, _ = plan_param_specs(nnx.state(model), sizes)
  want_reads, want_put_bytes, sharded = [], 0, 0
  for path, var in state.items():
    arr = var.get_value()
    shape, block = tuple(arr.shape), shard_shape(arr.shape, specs[path], sizes)
    # Placement: the planned spec, every device holding exactly its block.
    assert arr.sharding.spec == specs[path] or arr.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, specs[path]), arr.ndim), path
    assert {s.data.shape for s in arr.addressable_shards} == {block}, path
    assert len(arr.addressable_shards) == 8, path
    if block != shape:
      sharded += 1
      assert all(s.data.shape != shape for s in arr.addressable_shards), path
    np.testing.assert_array_equal(np.asarray(arr), original[path], err_msg=str(path))
    distinct = len({tuple((i.start, i.stop) for i in s.index) for s in arr.addressable_shards})
    want_reads += [(shape, block)] * distinct
    want_put_bytes += 8 * math.prod(block) * arr.dtype.itemsize
  assert sharded > len(state) // 3            # the test is about sharded params: most LLM ones

  # Every read is one planned block; a sharded parameter is never read whole.
  assert sorted(reads) == sorted(want_reads)
  # Every device_put carries one device's block: the restore moves exactly what devices hold.
  assert all(nbytes is not None for _, nbytes in puts), puts[:5]
  assert sum(nbytes for _, nbytes in puts) == want_put_bytes
  blocks = {b for _, b in want_reads}
  assert {s for s, _ in puts} <= blocks

