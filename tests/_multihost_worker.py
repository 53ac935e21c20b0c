"""One process of the 2-process test (tests/test_multihost.py): 4 CPU devices of a global 8.

  python tests/_multihost_worker.py PROCESS_ID PORT CHECKPOINT_DIR PRED_DIR OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def main():
  pid, port, ckpt, pred_dir, out = sys.argv[1:6]
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=pid)
  from eval import multihost
  multihost.initialize()
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

  from convert import load_glamm
  from models import mesh as mesh_lib
  from models.placement import from_process_local
  from tests import _sharded_programs as progs

  mesh = mesh_lib.make_mesh("data=2,fsdp=-1,tensor=2")
  model = load_glamm(ckpt, mesh=mesh)                  # each process reads its devices' slices
  config = model.config
  mesh_lib.check_divisible(config, mesh, progs.BATCH)
  rows = multihost.process_rows(mesh, progs.BATCH)
  inputs = progs.make_inputs(config)
  put = lambda v, names, m: from_process_local(v[rows], names, m, global_rows=progs.BATCH)
  results = {"rows": np.array([rows.start, rows.stop])}
  for name in ("clip_and_forward", "prefill_decode"):
    got = progs.PROGRAMS[name](model, inputs, mesh, put=put)
    results.update({f"{name}.{k}": v for k, v in got.items() if not k.startswith("_")})
  progs.eval_loop(model, [f"img{i:02d}" for i in range(12)], pred_dir, mesh)
  np.savez(f"{out}.{pid}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
