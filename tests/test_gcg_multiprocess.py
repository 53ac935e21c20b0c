"""`python -m eval.gcg` as two `jax.distributed` processes on this machine (2 CPU devices each, a
data=4 mesh over the 4): the images are split between the processes, process 0 writes the files,
and the predictions equal those of one process."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(out):
  return [sys.executable, "-m", "eval.gcg", "--out", out, "--no-progress", "--skip-eval",
          "--batch-size", "4", "--mesh", "data=4", "--max-new-tokens", "3"]


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             **extra)
  return env


def _predictions(out):
  d = os.path.join(out, "predictions")
  return {f: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))}


@pytest.mark.slow
def test_two_processes_write_the_same_predictions_as_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  subprocess.run(_cmd(one), env=_env(4), check=True, capture_output=True, timeout=600)
  port = _free_port()
  procs = [subprocess.Popen(_cmd(two), env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  run = json.load(open(os.path.join(two, "run.json")))
  assert run["process_count"] == 2 and run["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  want = _predictions(one)
  from eval import embedded_default
  assert len(want) == embedded_default.SAMPLE_COUNT and _predictions(two) == want
