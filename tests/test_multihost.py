"""The multi-host path end to end: two `jax.distributed` processes on this machine, 4 CPU devices
each, one global (data=2, fsdp=2, tensor=2) mesh over the 8.

Each worker (tests/_multihost_worker.py) restores the converted tiny GLaMM from Orbax straight
into the global sharding (each process reading its own devices' slices), feeds only its rows of
the batch (`eval.multihost.process_rows` + `jax.make_array_from_process_local_data`), runs the
forward pass and a prefill + cached greedy decode, and gathers the outputs: they must equal the
single-process, single-device outputs. Then both run the lockstep evaluation loop, resuming a run
this process started alone (1 host -> 2 hosts): process 0 writes the missing prediction files,
and all twelve must hold the single-device predictions.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from models import mesh as mesh_lib
from tests import _sharded_programs as progs

NAMES = [f"img{i:02d}" for i in range(12)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _reference_tokens(model, names):
  items = [progs.image_inputs(model.config, int(n[3:])) for n in names]
  items += [items[-1]] * (progs.BATCH - len(items))
  inputs = {k: np.stack([it[k] for it in items]) for k in items[0]}
  return progs.prefill_decode(model, inputs, None)["tokens"][:len(names)]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_a_one_host_run(tmp_path):
  model = progs.tiny_model()
  ckpt = str(tmp_path / "ckpt")
  os.makedirs(ckpt)
  progs.write_checkpoint(model, ckpt)
  pred_dir = str(tmp_path / "predictions")

  # A one-process run that stops after its first global batch (an interrupted job).
  one_device = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  progs.eval_loop(model, NAMES, pred_dir, one_device, max_steps=1)
  assert sorted(os.listdir(pred_dir)) == [f"{n}.json" for n in NAMES[:progs.BATCH]]

  port = str(_free_port())
  worker = os.path.join(os.path.dirname(__file__), "_multihost_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = str(tmp_path / "out")
  procs = [subprocess.Popen([sys.executable, worker, str(i), port, ckpt, pred_dir, out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-5000:]}"

  inputs = progs.make_inputs(model.config)
  want = {name: progs.PROGRAMS[name](model, inputs, None)
          for name in ("clip_and_forward", "prefill_decode")}
  for i in range(2):
    got = dict(np.load(f"{out}.{i}.npz"))
    np.testing.assert_array_equal(got["rows"], [4 * i, 4 * i + 4])   # its own image shard
    for name, outputs in want.items():
      for key, w in outputs.items():
        if key.startswith("_"):
          continue
        g = got[f"{name}.{key}"]
        if key in progs.EXACT:
          np.testing.assert_array_equal(g, w, err_msg=f"process {i} {name}.{key}")
        else:
          np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5,
                                     err_msg=f"process {i} {name}.{key}")

  # One set of prediction files: the first batch from the one-host run, the rest from two hosts.
  files = sorted(glob.glob(os.path.join(pred_dir, "*")))
  assert [os.path.basename(f) for f in files] == [f"{n}.json" for n in NAMES]
  records = [json.load(open(f)) for f in files]
  assert [r["process_count"] for r in records] == [1] * 8 + [2] * 4
  tokens = np.concatenate([_reference_tokens(model, NAMES[:8]), _reference_tokens(model, NAMES[8:])])
  np.testing.assert_array_equal(np.array([r["tokens"] for r in records]), tokens)
