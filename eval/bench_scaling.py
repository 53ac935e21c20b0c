"""Issue 6 benchmark: GLaMM-7B GCG on 1, 2, 4, ... devices of one host, in one run.

    python -m eval.bench_scaling --out DIR [--tiny] [--dp 1,2,4] [--tp 2,4]
        [--per-device-batch 8] [--repeats 3] [--new-tokens 64] [--segs 8]
        [--method none] [--reduction 0.9] [--sam-attention auto] [--compile-workers 4]

Random bf16 weights at GLaMM-7B shapes (`eval.bench_jax.build_model`), the GCG program of
`eval.gcg.gcg_forward` with the SAM encoder inside (CLIP -> pruning -> prefill -> `while_loop`
decode of `--new-tokens` forced tokens -> [SEG] states -> SAM -> masks), placed the way
`eval/run_gcg.py` runs with `--mesh`: parameters by `models.placement.place_model` (logical axis
names -> `models/sharding.py` table), inputs split by their logical names, GSPMD for the rest.

1. Data parallelism: for each d of `--dp` (default 1, 2, 4, ... up to the device count), a
   `data=d` mesh over `jax.devices()[:d]` and a global batch of d x `--per-device-batch` (the
   first rows of one input bank, so every run shares its rows with the smaller runs). Images/s,
   speed-up over d = 1 and efficiency (speed-up / d); the generated tokens of each run's rows must
   equal those of every smaller run (the per-device program is the same).
2. Tensor parallelism at batch 1: for T of 1 and `--tp` (default 2, 4 up to the device count), a
   `data=1,fsdp=1,tensor=T` mesh over `jax.devices()[:T]`: end-to-end latency, prefill and one
   decode step (KV caches pinned to `models.mesh.CACHE_KV`, donated), speed-up over T = 1.
3. Device kinds, mesh shapes, compile and placement seconds, all in DIR/bench_scaling.json
   (rewritten after every row) and a markdown table in DIR/bench_scaling.md (also printed); each
   run's generated tokens in DIR/bench_scaling_tokens.npz (keys dp1, dp2, ..., tp1, tp2, ...).

Every program is lowered from abstract, sharded arguments and compiled before any is run, in
`--compile-workers` threads (`eval.bench_common.compile_many`); a program whose mesh and shapes
equal another's (e.g. data=1 and tensor=1 with a per-device batch of 1) is compiled once. Each
mesh's parameters are placed only while it runs. Timings: median of `--repeats` calls after one
warm-up call, `block_until_ready`, dispatch included.

CPU check: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python -m eval.bench_scaling --out /tmp/s --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from eval import bench_common as common

OUT_NAME = "bench_scaling"


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.bench_scaling",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tiny", action="store_true", help="tiny GLaMM (CPU check)")
  p.add_argument("--dp", default=None,
                 help="data-parallel device counts (default 1, 2, 4, ... up to the device count)")
  p.add_argument("--tp", default=None,
                 help="tensor-parallel sizes for batch-1 latency (default 2, 4 up to the device "
                      "count; tensor=1 is always run as the baseline; '' for none)")
  p.add_argument("--per-device-batch", type=int, default=None, help="default 8 (tiny: 1)")
  p.add_argument("--repeats", type=int, default=3, help="timed end-to-end calls per mesh")
  p.add_argument("--step-repeats", type=int, default=10, help="timed decode steps per mesh")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64 (tiny: 4)")
  p.add_argument("--segs", type=int, default=None, help="default 8 (tiny: 2)")
  p.add_argument("--method", default="none", choices=common.METHOD_NAMES)
  p.add_argument("--reduction", type=float, default=0.9, help="visual-token reduction")
  p.add_argument("--sam-attention", default="auto", help="SAM encoder attention path")
  p.add_argument("--no-decode-step", dest="decode_step", action="store_false",
                 help="skip the prefill and decode-step programs of the tensor-parallel runs")
  p.add_argument("--compile-workers", type=int, default=min(4, os.cpu_count() or 1))
  p.add_argument("--compile-option", action="append", default=[], metavar="KEY=VALUE",
                 help="XLA option for every compile, e.g. xla_backend_optimization_level=0 to "
                      "compile faster in a CPU check (timings then mean little)")
  a = p.parse_args(argv)
  a.compiler_options = {}
  for item in a.compile_option:
    k, eq, v = item.partition("=")
    if not eq:
      p.error(f"--compile-option {item!r} is not KEY=VALUE")
    a.compiler_options[k] = int(v) if v.lstrip("-").isdigit() else (
        {"true": True, "false": False}.get(v.lower(), v))
  n = jax.device_count()
  a.dp = _sizes(a.dp, [d for d in _powers_of_two(n)], n, "--dp")
  a.tp = _sizes(a.tp, [t for t in (2, 4) if t <= n], n, "--tp")
  a.per_device_batch = a.per_device_batch or (1 if a.tiny else 8)
  a.new_tokens = a.new_tokens or (4 if a.tiny else 64)
  a.segs = a.segs or (2 if a.tiny else 8)
  if a.method == "none":
    a.reduction = 0.0
  return a


def _powers_of_two(n):
  out, d = [], 1
  while d <= n:
    out.append(d)
    d *= 2
  return out


def _sizes(text, default, n, flag):
  sizes = default if text is None else [int(x) for x in text.split(",") if x.strip()]
  bad = [s for s in sizes if not 1 <= s <= n]
  if bad:
    raise SystemExit(f"{flag}: sizes {bad} are not between 1 and the {n} visible devices")
  return sorted(set(sizes))


def scaling_config(tiny: bool, sam_attention: str = "auto"):
  """GLaMM-7B in bf16, or the tiny bf16 GLaMM with fewer layers (2 LLM, 2 CLIP, 1 two-way mask
  decoder layer): the CPU check's time goes to XLA compiles, which scale with the layers."""
  if tiny:
    from models.glamm.config import GLaMMConfig
    rep = dataclasses.replace
    cfg = GLaMMConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cfg = rep(cfg, llm=rep(cfg.llm, num_layers=2), vision=rep(cfg.vision, num_layers=2),
              sam=rep(cfg.sam, mask_decoder=rep(cfg.sam.mask_decoder, transformer_depth=1)))
  else:
    cfg = common.bench_config(False)
  return common.with_sam_attention(cfg, sam_attention)


# ------------------------------------------------------------------------------------------------
# Programs.

@dataclasses.dataclass
class MeshRun:
  """One mesh and what runs on it."""
  kind: str                 # "dp" or "tp"
  size: int                 # devices used
  mesh: jax.sharding.Mesh
  batch: int                # global batch

  @property
  def name(self) -> str:
    return f"{self.kind}{self.size}"

  @property
  def key(self):
    """Programs are shared between runs of equal key (same devices, mesh shape and batch)."""
    return (tuple(d.id for d in self.mesh.devices.flat), tuple(self.mesh.shape.items()),
            self.batch)


def mesh_dict(mesh) -> dict:
  return {k: int(v) for k, v in mesh.shape.items()}


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      tree, shardings)


class Programs:
  """Builds the abstract, sharded lowerings of every run."""

  def __init__(self, config, lay, graphdef, state, bank, args):
    self.config, self.lay, self.graphdef, self.state = config, lay, graphdef, state
    self.bank, self.args = bank, args

  def model(self, state):
    return nnx.merge(self.graphdef, state)

  def state_shardings(self, mesh):
    """The parameters' NamedShardings on `mesh` (the plan `placement.place_model` follows)."""
    from models.sharding import plan_param_shardings
    return plan_param_shardings(self.state, mesh)

  def inputs(self, b: int):
    """The first b rows of the input bank (on the default device)."""
    return {k: (v[:b] if k != "rng" else v) for k, v in self.bank.items()}

  def input_shardings(self, x, mesh):
    from models import mesh as mesh_lib
    names = dict(ids=mesh_lib.ACT_TOKENS, valid=mesh_lib.ACT_TOKENS, vmask=mesh_lib.ACT_TOKENS,
                 clip_px=mesh_lib.ACT_PIXELS, sam_px=mesh_lib.ACT_PIXELS,
                 images01=mesh_lib.ACT_PIXELS)
    return {k: (NamedSharding(mesh, PartitionSpec()) if k == "rng"
                else mesh_lib.sharding_for(names[k], mesh, v.shape)) for k, v in x.items()}

  def lower_e2e(self, run: MeshRun):
    """Thunk lowering GCG end to end (SAM inside) for `run` from abstract sharded arguments."""
    from eval.bench_jax import gcg_options
    from eval.gcg import gcg_forward
    opts = gcg_options(self.config, self.lay, self.args.method, self.args.reduction)
    altp = self.args.method == "altp"

    def fn(s, ids, valid, vmask, clip_px, sam_px, images01, rng):
      return gcg_forward(self.model(s), ids, valid, vmask, clip_px, sam_px, None,
                         images01 if altp else None, jax.random.wrap_key_data(rng),
                         options=opts)
    sh, _ = self.state_shardings(run.mesh)
    x = self.inputs(run.batch)
    xs = self.input_shardings(x, run.mesh)
    ab = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=xs[k]) for k, v in x.items()}
    st = _abstract(self.state, sh)
    return lambda: jax.jit(fn).lower(st, ab["ids"], ab["valid"], ab["vmask"], ab["clip_px"],
                                     ab["sam_px"], ab["images01"], ab["rng"])

  def llm_data(self, run: MeshRun):
    """(prefill fn, step fn, inputs, input shardings, abstract caches/next_pos) of `run`."""
    from eval.bench_jax import llm_inputs, llm_step_fns
    from models import mesh as mesh_lib
    plan, embeds, pos, valid, vmask = llm_inputs(self.config, self.lay, run.batch,
                                                 self.args.method, self.args.reduction)
    lengths = plan.stage_lengths(embeds.shape[1])
    prefill, step = llm_step_fns(self.model, plan, self.lay.new_tokens, lengths, run.mesh)
    x = dict(embeds=embeds, pos=pos, valid=valid, vmask=vmask)
    names = dict(embeds=mesh_lib.ACT_HIDDEN, pos=mesh_lib.ACT_TOKENS,
                 valid=mesh_lib.ACT_TOKENS, vmask=mesh_lib.ACT_TOKENS)
    xs = {k: mesh_lib.sharding_for(names[k], run.mesh, v.shape) for k, v in x.items()}
    return prefill, step, x, xs

  def lower_llm(self, run: MeshRun):
    """Thunks lowering the prefill and the decode step (caches donated) of `run`."""
    from models import mesh as mesh_lib
    prefill, step, x, xs = self.llm_data(run)
    sh, _ = self.state_shardings(run.mesh)
    st = _abstract(self.state, sh)
    ab = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=xs[k]) for k, v in x.items()}
    caches, _, next_pos = jax.eval_shape(prefill, self.state, *x.values())
    cache_sh = tuple(mesh_lib.cache_shardings(c, run.mesh) for c in caches)
    batch_sh = mesh_lib.sharding_for(mesh_lib.ACT_BATCH, run.mesh, (run.batch,))
    caches_ab = _abstract(caches, cache_sh)
    next_ab = tuple(jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=batch_sh) for p in next_pos)
    token = jax.ShapeDtypeStruct((run.batch,), jnp.int32, sharding=batch_sh)
    return {
        "prefill": lambda: jax.jit(prefill).lower(st, ab["embeds"], ab["pos"], ab["valid"],
                                                  ab["vmask"]),
        "decode_step": lambda: jax.jit(step, donate_argnums=2).lower(st, token, caches_ab,
                                                                     next_ab)}


def make_bank(config, lay, rows: int, seed: int = 0):
  """`rows` rows of benchmark inputs on the default device, plus the sampling key's data."""
  from eval.bench_jax import make_inputs
  x = make_inputs(config, lay, rows, seed)
  bank = {k: x[k] for k in ("ids", "valid", "vmask", "clip_px", "sam_px", "images01")}
  bank["rng"] = jax.random.key_data(jax.random.key(seed))
  return bank


# ------------------------------------------------------------------------------------------------
# Running.

def _sync(x):
  return jax.block_until_ready(x)


def _err(e: BaseException) -> dict:
  return dict(error=f"{type(e).__name__}: {str(e)[:400]}", oom=common.is_oom(e))


def run(args, log: common.JsonLog | None = None, model=None) -> dict:
  """Measures the data- and tensor-parallel runs of `args` (see `parse_args`); returns the record
  (also written to OUT/bench_scaling.json, with the markdown in OUT/bench_scaling.md). `model`:
  an already built (graphdef, state) of `scaling_config(args.tiny, args.sam_attention)`."""
  from eval.bench_jax import build_model, sam_attention_paths
  from models import mesh as mesh_lib
  from models import placement

  t_start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  config = scaling_config(args.tiny, args.sam_attention)
  lay = common.layout(config, args.tiny, args.new_tokens, args.segs)
  devices = jax.devices()
  if log is None:
    log = common.JsonLog(os.path.join(args.out, OUT_NAME + ".json"), dict(
        argv=sys.argv[1:], date=time.strftime("%Y-%m-%d %H:%M:%S"), tiny=args.tiny))
  log.set("setup", dict(
      jax=jax.__version__, backend=jax.default_backend(), device_count=len(devices),
      devices=[dict(id=d.id, kind=d.device_kind, platform=d.platform) for d in devices],
      config="tiny" if args.tiny else "glamm_7b", layout=lay.__dict__,
      per_device_batch=args.per_device_batch, repeats=args.repeats,
      step_repeats=args.step_repeats, method=args.method, reduction=args.reduction,
      sam_attention=args.sam_attention,
      sam_attention_paths=sam_attention_paths(config.sam.image_encoder, args.sam_attention),
      dp=args.dp, tp=args.tp, compiler_options=args.compiler_options))

  t0 = time.perf_counter()
  graphdef, state = build_model(config) if model is None else model
  _sync(state)
  nbytes = sum(a.nbytes for a in jax.tree.leaves(state))
  log.set("model", dict(init_s=time.perf_counter() - t0, model_gb=nbytes / 1e9))
  print(f"[scaling] model built in {time.perf_counter() - t0:.1f} s ({nbytes / 1e9:.2f} GB) on "
        f"{len(devices)} x {devices[0].device_kind}", flush=True)

  runs = []
  for d in args.dp:
    runs.append(MeshRun("dp", d, mesh_lib.make_mesh({"data": d}, devices[:d]),
                        d * args.per_device_batch))
  tp_sizes = sorted({1, *args.tp}) if args.tp else []
  for t in tp_sizes:
    runs.append(MeshRun("tp", t, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": t},
                                                     devices[:t]), 1))
  for r in runs:
    mesh_lib.check_divisible(config, r.mesh, r.batch)
  bank = make_bank(config, lay, max(r.batch for r in runs))
  progs = Programs(config, lay, graphdef, state, bank, args)

  # Every program lowered and compiled up front, once per distinct (devices, mesh, batch).
  lowerings, owner = {}, {}
  for r in runs:
    if ("e2e",) + r.key not in lowerings:
      owner[("e2e",) + r.key] = r.name
      lowerings[("e2e",) + r.key] = progs.lower_e2e(r)
    if r.kind == "tp" and args.decode_step:
      for name, thunk in progs.lower_llm(r).items():
        lowerings[(name,) + r.key] = thunk
  t0 = time.perf_counter()
  errors = {}
  compiled = common.compile_many(lowerings, args.compile_workers, errors,
                                 args.compiler_options or None)
  log.set("compile", dict(programs=len(lowerings), wall_s=time.perf_counter() - t0,
                          workers=args.compile_workers, failed=len(errors)))
  print(f"[scaling] compiled {len(compiled)} of {len(lowerings)} programs in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)

  tokens = {}      # run name -> tokens [B, G] (host)
  results = {}
  for r in runs:
    row = dict(what=r.kind, devices=r.size, mesh=mesh_dict(r.mesh),
               device_ids=[d.id for d in r.mesh.devices.flat],
               device_kinds=sorted({d.device_kind for d in r.mesh.devices.flat}), batch=r.batch,
               per_device_batch=r.batch // (r.mesh.shape["data"] * r.mesh.shape["fsdp"]))
    key = ("e2e",) + r.key
    if key in errors:
      log.add(dict(row, what="error", part=f"{r.name} e2e compile", **_err(errors[key])))
      continue
    c, compile_s = compiled[key]
    row["compile_s"] = compile_s
    row["shared_program_with"] = None if owner[key] == r.name else owner[key]
    try:
      t0 = time.perf_counter()
      model = placement.place_model(nnx.merge(graphdef, state), r.mesh)
      st = nnx.state(model)
      x = progs.inputs(r.batch)
      xs = progs.input_shardings(x, r.mesh)
      x = {k: jax.device_put(v, xs[k]) for k, v in x.items()}
      _sync((st, x))
      row["place_s"] = time.perf_counter() - t0
      args_ = (st, x["ids"], x["valid"], x["vmask"], x["clip_px"], x["sam_px"], x["images01"],
               x["rng"])
      out = c(*args_)
      tokens[r.name] = placement.to_host(out["tokens"])
      row["num_segs_mean"] = float(np.mean(placement.to_host(out["num_segs"])))
      del out
      t = common.median_ms(lambda: c(*args_), _sync, args.repeats, warmup=0)
      row.update(t)
      row["images_per_s"] = r.batch / (t["ms"] / 1e3)
      row["ms_per_image"] = t["ms"] / r.batch
      if r.kind == "tp" and args.decode_step:
        row.update(_time_llm(progs, compiled, errors, r, st, args))
      row["peak_gb"] = _peak_gb(r.mesh)
      del st, model, x, args_
    except Exception as e:  # noqa: BLE001 - record (e.g. out of memory) and go on
      log.add(dict(row, what="error", part=f"{r.name} run", **_err(e)))
      continue
    _compare(row, r, runs, tokens)
    results[r.name] = row
    log.add(row)

  _speedups(results, log)
  # Every run's generated tokens, for checks beyond the flags in the rows.
  np.savez(os.path.join(args.out, OUT_NAME + "_tokens.npz"), **tokens)
  log.set("wall_s", time.perf_counter() - t_start)
  md = markdown(log.data)
  with open(os.path.join(args.out, OUT_NAME + ".md"), "w") as f:
    f.write(md)
  print(md, flush=True)
  return log.data


def _time_llm(progs, compiled, errors, r, st, args) -> dict:
  """Prefill and decode-step times of `r` (the step's caches donated and threaded through)."""
  from models import mesh as mesh_lib
  out = {}
  for name in ("prefill", "decode_step"):
    if (name,) + r.key in errors:
      out[f"{name}_error"] = _err(errors[(name,) + r.key])["error"]
      return out
  cp, sec_p = compiled[("prefill",) + r.key]
  cs, sec_s = compiled[("decode_step",) + r.key]
  _, _, x, xs = progs.llm_data(r)
  x = [jax.device_put(v, xs[k]) for k, v in x.items()]
  holder = {}

  def run_prefill():
    holder["out"] = cp(st, *x)
    return holder["out"][1]
  t = common.median_ms(run_prefill, _sync, args.repeats)
  out.update(prefill_ms=t["ms"], prefill_ms_min=t["ms_min"], prefill_compile_s=sec_p)
  caches, _, next_pos = holder.pop("out")
  box = {"caches": caches}
  tok = jax.device_put(jnp.full((r.batch,), 5, jnp.int32),
                       mesh_lib.sharding_for(mesh_lib.ACT_BATCH, r.mesh, (r.batch,)))

  def run_step():
    nxt, box["caches"] = cs(st, tok, box["caches"], next_pos)
    return nxt
  t = common.median_ms(run_step, _sync, args.step_repeats)
  out.update(decode_step_ms=t["ms"], decode_step_ms_min=t["ms_min"], decode_step_compile_s=sec_s)
  del box, caches
  return out


def _peak_gb(mesh):
  peaks = [((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in mesh.devices.flat]
  return max(peaks) / 1e9 if any(peaks) else None


def _compare(row, r, runs, tokens):
  """Token equality with the smaller runs of the same kind (data parallel: required; tensor
  parallel: reported against tensor=1, as a different reduction order may flip a bf16 argmax)."""
  mine = tokens.get(r.name)
  if mine is None:
    return
  if r.kind == "dp":
    smaller = [o for o in runs if o.kind == "dp" and o.size < r.size and o.name in tokens]
    row["tokens_match_smaller"] = all(
        np.array_equal(mine[: o.batch], tokens[o.name]) for o in smaller)
    row["compared_with"] = [o.name for o in smaller]
  elif r.size > 1 and "tp1" in tokens:
    row["tokens_match_tp1"] = bool(np.array_equal(mine, tokens["tp1"]))
    row["tokens_agreement_tp1"] = float(np.mean(mine == tokens["tp1"]))


def _speedups(results, log):
  dp1, tp1 = results.get("dp1"), results.get("tp1")
  for name, row in results.items():
    if row["what"] == "dp" and dp1:
      row["speedup_vs_1"] = row["images_per_s"] / dp1["images_per_s"]
      row["efficiency"] = row["speedup_vs_1"] / row["devices"]
    if row["what"] == "tp" and tp1:
      row["latency_speedup_vs_1"] = tp1["ms"] / row["ms"]
      if "decode_step_ms" in row and "decode_step_ms" in tp1:
        row["decode_step_speedup_vs_1"] = tp1["decode_step_ms"] / row["decode_step_ms"]
  dp = [r for r in results.values() if r["what"] == "dp"]
  log.set("dp_tokens_identical", all(r.get("tokens_match_smaller", False) for r in dp)
          if dp else None)
  log.save()


# ------------------------------------------------------------------------------------------------
# Report.

def _f(x, nd=2):
  return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(data: dict) -> str:
  setup = data.get("setup", {})
  kinds = sorted({d["kind"] for d in setup.get("devices", [])})
  lay = setup.get("layout", {})
  lines = [f"Devices: {setup.get('device_count')} x {', '.join(kinds)} ({setup.get('backend')}, "
           f"jax {setup.get('jax')}); {setup.get('config')}, method {setup.get('method')}, "
           f"{lay.get('new_tokens')} new tokens, {lay.get('segs')} masks per image; model built "
           f"in {_f(data.get('model', {}).get('init_s'), 1)} s; "
           f"{data.get('compile', {}).get('programs')} programs compiled in "
           f"{_f(data.get('compile', {}).get('wall_s'), 1)} s.", "",
           "### Data parallel (GCG end to end, per-device batch fixed)", "",
           "| mesh (data, fsdp, tensor) | devices | global batch | compile s | ms / call | "
           "images/s | speed-up vs 1 | efficiency | tokens = smaller runs |",
           "|" + "---|" * 9]
  rows = data.get("rows", [])
  for r in rows:
    if r.get("what") != "dp":
      continue
    m = r["mesh"]
    lines.append(f"| ({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['devices']} | {r['batch']} | "
                 f"{_f(r.get('compile_s'), 1)} | {_f(r.get('ms'), 1)} | "
                 f"{_f(r.get('images_per_s'))} | {_f(r.get('speedup_vs_1'))} | "
                 f"{_f(r.get('efficiency'))} | {r.get('tokens_match_smaller')} |")
  lines += ["", "### Tensor parallel, batch 1", "",
            "| mesh (data, fsdp, tensor) | devices | compile s | e2e ms | speed-up vs 1 | "
            "prefill ms | decode step ms | step speed-up | tokens = tensor 1 |",
            "|" + "---|" * 9]
  for r in rows:
    if r.get("what") != "tp":
      continue
    m = r["mesh"]
    lines.append(f"| ({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['devices']} | "
                 f"{_f(r.get('compile_s'), 1)} | {_f(r.get('ms'), 1)} | "
                 f"{_f(r.get('latency_speedup_vs_1'))} | {_f(r.get('prefill_ms'))} | "
                 f"{_f(r.get('decode_step_ms'))} | {_f(r.get('decode_step_speedup_vs_1'))} | "
                 f"{r.get('tokens_match_tp1', '–') if r['devices'] > 1 else '–'} |")
  errs = [r for r in rows if r.get("what") == "error"]
  if errs:
    lines += ["", "### Failures", ""]
    lines += [f"- {r.get('part')}: {r.get('error')}" for r in errs]
  return "\n".join(lines) + "\n"


def main(argv=None):
  # Before the first device query creates the GPU client: room for two model copies on device 0
  # (the built one and a placed one) plus a batch's activations.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  args = parse_args(argv)
  return run(args)


if __name__ == "__main__":
  main()
