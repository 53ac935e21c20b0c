"""`eval.bench_scaling` on 8 CPU devices with the tiny GLaMM: the record's structure, that data
parallelism over 1, 2 and 4 devices generates the same tokens for the same rows, and the
tensor-parallel prefill / decode-step programs (caches kept in their KV layout)."""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import bench_common as common
from eval import bench_scaling

# Level-0 XLA codegen: this file's time goes to CPU compiles (~500 fusions per GCG program).
FAST = ["--compile-option", "xla_backend_optimization_level=0", "--compile-workers", "2"]


@pytest.fixture(scope="module")
def tiny_model():
  from eval.bench_jax import build_model
  return build_model(bench_scaling.scaling_config(True))


@pytest.fixture(scope="module")
def record(tmp_path_factory, tiny_model):
  assert jax.device_count() >= 4, "conftest provides 8 CPU devices"
  out = str(tmp_path_factory.mktemp("scaling"))
  # Tensor-parallel end-to-end runs compile the same GCG program on other meshes; their LLM
  # programs are checked below without it.
  args = bench_scaling.parse_args(["--out", out, "--tiny", "--dp", "1,2,4", "--tp", "",
                                   "--repeats", "1", *FAST])
  return out, bench_scaling.run(args, model=tiny_model)


def test_record_structure(record):
  out, data = record
  with open(os.path.join(out, "bench_scaling.json")) as f:
    on_disk = json.load(f)
  assert on_disk["rows"] == json.loads(json.dumps(data["rows"], default=str))
  setup = data["setup"]
  assert setup["device_count"] == jax.device_count() == len(setup["devices"])
  assert {"id", "kind", "platform"} <= set(setup["devices"][0])
  assert setup["dp"] == [1, 2, 4] and setup["tp"] == [] and setup["config"] == "tiny"
  assert setup["compiler_options"] == {"xla_backend_optimization_level": 0}
  assert data["model"]["model_gb"] > 0 and data["model"]["init_s"] >= 0
  assert data["compile"]["programs"] == 3 and data["compile"]["failed"] == 0
  rows = data["rows"]
  assert [r["what"] for r in rows] == ["dp", "dp", "dp"], rows
  dp = {r["devices"]: r for r in rows}
  for d, r in dp.items():
    assert r["mesh"] == {"data": d, "fsdp": 1, "tensor": 1}
    assert r["device_ids"] == [dev.id for dev in jax.devices()[:d]]
    assert r["device_kinds"] == [jax.devices()[0].device_kind]
    assert r["batch"] == d and r["per_device_batch"] == 1
    assert r["ms"] > 0 and r["images_per_s"] == pytest.approx(d / (r["ms"] / 1e3))
    assert r["compile_s"] > 0 and r["place_s"] >= 0 and r["repeats"] == 1
    assert r["speedup_vs_1"] == pytest.approx(r["images_per_s"] / dp[1]["images_per_s"])
    assert r["efficiency"] == pytest.approx(r["speedup_vs_1"] / d)
  assert dp[4]["compared_with"] == ["dp1", "dp2"]
  md = open(os.path.join(out, "bench_scaling.md")).read()
  assert "### Data parallel" in md and md.count("| (") == 3


def test_data_parallel_runs_generate_identical_tokens(record):
  out, data = record
  tokens = np.load(os.path.join(out, "bench_scaling_tokens.npz"))
  assert tokens["dp1"].shape == (1, data["setup"]["layout"]["new_tokens"])
  assert tokens["dp4"].shape[0] == 4
  np.testing.assert_array_equal(tokens["dp2"][:1], tokens["dp1"])
  np.testing.assert_array_equal(tokens["dp4"][:2], tokens["dp2"])
  assert all(r["tokens_match_smaller"] for r in data["rows"])
  assert data["dp_tokens_identical"] is True


def test_tensor_parallel_llm_programs_keep_the_cache_layout(tiny_model):
  from flax import nnx
  from models import mesh as mesh_lib
  from models import placement
  args = bench_scaling.parse_args(["--out", "/unused", "--tiny", "--step-repeats", "2", *FAST])
  config = bench_scaling.scaling_config(True)
  lay = common.layout(config, True, args.new_tokens, args.segs)
  graphdef, state = tiny_model
  progs = bench_scaling.Programs(config, lay, graphdef, state,
                                 bench_scaling.make_bank(config, lay, 1), args)
  mesh = mesh_lib.make_mesh({"tensor": 2}, jax.devices()[:2])
  run = bench_scaling.MeshRun("tp", 2, mesh, 1)
  lowerings = {(name,) + run.key: th for name, th in progs.lower_llm(run).items()}
  compiled = common.compile_many(lowerings, 2, None, args.compiler_options)
  st = nnx.state(placement.place_model(nnx.merge(graphdef, state), mesh))
  times = bench_scaling._time_llm(progs, compiled, {}, run, st, args)
  assert times["prefill_ms"] > 0 and times["decode_step_ms"] > 0
  assert times["prefill_compile_s"] > 0 and times["decode_step_compile_s"] > 0
  # One more step by hand: the cache comes back in the KV layout (heads over tensor), so the
  # donated caches never need resharding between steps.
  _, _, x, xs = progs.llm_data(run)
  caches, _, next_pos = compiled[("prefill",) + run.key][0](
      st, *[jax.device_put(v, xs[k]) for k, v in x.items()])
  token = jax.device_put(jnp.zeros((1,), jnp.int32),
                         mesh_lib.sharding_for(mesh_lib.ACT_BATCH, mesh, (1,)))
  nxt, caches = compiled[("decode_step",) + run.key][0](st, token, caches, next_pos)
  want = mesh_lib.sharding_for(mesh_lib.CACHE_KV, mesh, caches[0].k[0].shape)
  assert caches[0].k[0].sharding.is_equivalent_to(want, 4)
  assert caches[0].k[0].sharding.spec[2] == "tensor"
  assert nxt.shape == (1,)


def test_tensor_parallel_rows_in_speedups_and_markdown():
  rows = [dict(what="tp", devices=1, mesh={"data": 1, "fsdp": 1, "tensor": 1}, batch=1, ms=400.0,
               compile_s=9.0, prefill_ms=25.0, decode_step_ms=8.0),
          dict(what="tp", devices=2, mesh={"data": 1, "fsdp": 1, "tensor": 2}, batch=1, ms=250.0,
               compile_s=11.0, prefill_ms=15.0, decode_step_ms=5.0, tokens_match_tp1=True)]
  log = types.SimpleNamespace(data=dict(rows=rows), set=lambda k, v: None, save=lambda: None)
  bench_scaling._speedups({"tp1": rows[0], "tp2": rows[1]}, log)
  assert rows[1]["latency_speedup_vs_1"] == pytest.approx(1.6)
  assert rows[1]["decode_step_speedup_vs_1"] == pytest.approx(1.6)
  md = bench_scaling.markdown(dict(setup={}, rows=rows))
  assert "| (1, 1, 2) | 2 | 11.0 | 250.0 | 1.60 | 15.00 | 5.00 | 1.60 | True |" in md


def test_sizes_beyond_the_devices_are_refused(tmp_path):
  with pytest.raises(SystemExit, match="--dp: sizes \\[64\\]"):
    bench_scaling.parse_args(["--out", str(tmp_path), "--dp", "1,64"])
  with pytest.raises(SystemExit):
    bench_scaling.parse_args(["--out", str(tmp_path), "--compile-option", "novalue"])
