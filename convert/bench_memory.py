"""Peak memory and time of converting a full-size GLaMM-7B checkpoint (synthetic, random bf16).

  python -m convert.bench_memory --workdir /path/with/40GB [--out result.json] [--keep]

1. Writes, tensor by tensor (never more than one tensor in memory), a checkpoint with the release's
   968 keys, shapes and dtypes (convert/glamm_spec.py) as two `.bin` shards split like HF's 10 GB
   `save_pretrained` (9.98 GB + 6.78 GB) + `pytorch_model.bin.index.json` + config + tokenizer
   stand-ins, and a CLIP ViT-L/14-336 `pytorch_model.bin` (fp32, `vision_model.*` + text keys).
   Generation is skipped when the files from an earlier run are complete.
2. Runs the CLI (`glamm ... --dtype bfloat16`) in a fresh child process, samples its
   /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM) every 0.2 s, and records the exact peak: the
   child's own VmHWM, read just before it exits.
3. Writes a JSON with the peak, the budget (largest shard + 2 GiB), time, and sizes.

The shard writer produces the format `torch.save` writes (a zip with `data.pkl` + `data/<n>`
records, 64-byte aligned), so `torch.load(weights_only=True, mmap=True)` reads it like the release.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from convert.glamm_spec import CLIP_L14_336_CONFIG, GLAMM_7B_CONFIG, Spec, clip_l14_336_keys
from convert.glamm_spec import glamm_7b_keys

MAX_SHARD_BYTES = 10 * 10 ** 9          # transformers' default max_shard_size="10GB"
_ITEMSIZE = {"bfloat16": 2, "float32": 4, "int64": 8}


# ------------------------------------------------------------------------------------------------
# Streaming `.bin` writer.

class _Storage:
  """Stands for the storage of tensor `key` in the pickle (a persistent id, as torch.save)."""

  def __init__(self, key: str, dtype: str, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
  """Pickles as `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, {})`."""

  def __init__(self, storage: _Storage, shape: tuple[int, ...]):
    self.storage, self.shape = storage, shape

  def __reduce_ex__(self, protocol):
    import torch
    stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
    return (torch._utils._rebuild_tensor_v2,
            (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict()))


def _storage_type(dtype: str):
  import torch
  return {"bfloat16": torch.BFloat16Storage, "float32": torch.FloatStorage,
          "int64": torch.LongStorage}[dtype]


class _Pickler(pickle.Pickler):

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
    return None


def write_bin_shard(path: str, specs: list[Spec], fill) -> None:
  """A torch.save-format file holding {key: tensor} for `specs`; `fill(spec) -> torch.Tensor`
  is called once per tensor, right before it is written, and the tensor is dropped after."""
  import torch
  refs = {}
  for i, (key, shape, dtype) in enumerate(specs):
    refs[key] = _TensorRef(_Storage(str(i), dtype, int(np.prod(shape, dtype=np.int64))), shape)
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(refs)
  data = buf.getvalue()
  writer = torch._C.PyTorchFileWriter(path, True, 64)
  writer.write_record("data.pkl", data, len(data))
  writer.write_record(".format_version", "1", 1)
  writer.write_record(".storage_alignment", "64", 2)
  writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
  for i, spec in enumerate(specs):
    t = fill(spec)
    assert tuple(t.shape) == tuple(spec[1]) and t.is_contiguous(), spec
    writer.write_record(f"data/{i}", t.untyped_storage(), t.nbytes)
    del t
  writer.write_end_of_file()


class RandomFill:
  """Random values without generating billions of normals: slices of one random pool."""

  def __init__(self, seed: int = 0, pool: int = 1 << 24):
    rng = np.random.default_rng(seed)
    self.pool = (0.02 * rng.standard_normal(pool)).astype(np.float32)
    self.rng = rng

  def __call__(self, spec: Spec):
    import torch
    _, shape, dtype = spec
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "int64":
      return torch.arange(n, dtype=torch.int64).reshape(shape)
    start = int(self.rng.integers(0, self.pool.size))
    flat = np.resize(np.roll(self.pool, -start), n)       # tiles the pool when n > pool size
    t = torch.from_numpy(flat).reshape(shape)
    return t.to(torch.bfloat16) if dtype == "bfloat16" else t.clone()


def _nbytes(spec: Spec) -> int:
  return int(np.prod(spec[1], dtype=np.int64)) * _ITEMSIZE[spec[2]]


def hf_shards(specs: list[Spec], max_bytes: int = MAX_SHARD_BYTES) -> list[list[Spec]]:
  """transformers' `shard_checkpoint`: a new shard when the next tensor would overflow one."""
  shards, cur, size = [], [], 0
  for spec in specs:
    if cur and size + _nbytes(spec) > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(spec)
    size += _nbytes(spec)
  return shards + [cur]


def build_synthetic(workdir: str, log=print) -> tuple[str, str]:
  """Writes (once) the synthetic GLaMM and CLIP directories under `workdir`; returns their paths."""
  glamm_dir, clip_dir = os.path.join(workdir, "GLaMM-GCG"), os.path.join(workdir, "clip-336")
  fill = RandomFill()
  done = os.path.join(glamm_dir, ".complete")
  if not os.path.exists(done):
    shutil.rmtree(glamm_dir, ignore_errors=True)
    os.makedirs(glamm_dir)
    shards = hf_shards(list(glamm_7b_keys()))
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
      name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
      t0 = time.time()
      write_bin_shard(os.path.join(glamm_dir, name), part, fill)
      log(f"wrote {name}: {len(part)} tensors, {sum(map(_nbytes, part)) / 1e9:.2f} GB, "
          f"{time.time() - t0:.0f} s")
      weight_map.update({k: name for k, _, _ in part})
      total += sum(map(_nbytes, part))
    with open(os.path.join(glamm_dir, "pytorch_model.bin.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(glamm_dir, "config.json"), "w") as f:
      json.dump(GLAMM_7B_CONFIG, f, indent=2)
    for name, text in (("tokenizer.model", "synthetic"), ("tokenizer_config.json", "{}"),
                       ("special_tokens_map.json", "{}"), ("added_tokens.json", "{}")):
      with open(os.path.join(glamm_dir, name), "w") as f:
        f.write(text)
    open(done, "w").close()
  done = os.path.join(clip_dir, ".complete")
  if not os.path.exists(done):
    shutil.rmtree(clip_dir, ignore_errors=True)
    os.makedirs(clip_dir)
    write_bin_shard(os.path.join(clip_dir, "pytorch_model.bin"), list(clip_l14_336_keys()), fill)
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
      json.dump(CLIP_L14_336_CONFIG, f, indent=2)
    open(done, "w").close()
  return glamm_dir, clip_dir


# ------------------------------------------------------------------------------------------------
# Measurement.

def _status(pid: int) -> dict[str, int]:
  """VmRSS, VmHWM, RssAnon, RssFile of a process in bytes ({} once it has exited)."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
          out[name] = int(rest.split()[0]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return out


def measure_conversion(glamm_dir: str, clip_dir: str, out_dir: str, interval: float = 0.2) -> dict:
  """Runs the CLI in a fresh child process; returns its peak memory and a sampled breakdown.

  The child (`--child`) runs `convert.cli.main` and, just before exiting, writes its own VmHWM:
  the high-water mark of the conversion process alone (a parent's `ru_maxrss` of children would
  also count the memory image inherited at fork time).
  """
  cli_args = ["glamm", "--glamm", glamm_dir, "--clip", clip_dir, "--out", out_dir,
              "--dtype", "bfloat16", "--overwrite"]
  hwm_file = out_dir + ".vmhwm.json"
  cmd = [sys.executable, "-m", "convert.bench_memory", "--child", hwm_file, "--", *cli_args]
  t0 = time.time()
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
  samples = []
  stderr_lines = []
  reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
  reader.start()
  while proc.poll() is None:
    s = _status(proc.pid)
    if s:
      samples.append({"t": round(time.time() - t0, 2), **s})
    time.sleep(interval)
  seconds = time.time() - t0
  reader.join(timeout=5)
  if proc.returncode != 0:
    raise RuntimeError(f"conversion failed ({proc.returncode}):\n" + "".join(stderr_lines[-30:]))
  with open(hwm_file) as f:
    final = json.load(f)
  os.remove(hwm_file)
  summary = json.loads(stderr_lines[-1]) if stderr_lines else {}
  return {"command": "python -m convert " + " ".join(cli_args), "seconds": round(seconds, 1),
          "peak_rss_bytes": final["VmHWM"], "final_status": final,
          "sampled_max": {k: max((s.get(k, 0) for s in samples), default=0)
                          for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")},
          "samples": samples[:: max(1, len(samples) // 400)], "summary": summary}


def _child(hwm_file: str, cli_args: list[str]) -> int:
  from convert import cli
  rc = cli.main(cli_args)
  with open(hwm_file, "w") as f:
    json.dump(_status(os.getpid()), f)
  return rc


def spot_check(glamm_dir: str, out_dir: str) -> dict[str, bool]:
  """Exact equality of a few converted arrays with their sources, layouts written out by hand."""
  import ml_dtypes
  import orbax.checkpoint as ocp
  import torch
  from convert.readers import torch_to_numpy
  with open(os.path.join(glamm_dir, "pytorch_model.bin.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  checks = {  # source key -> (group, path in group, our layout from the torch array)
      "model.layers.5.mlp.down_proj.weight": ("llm.layers.5", ("mlp", "down_proj", "kernel"),
                                              lambda w: w.T),
      "lm_head.weight": ("llm.lm_head", ("kernel",), lambda w: w.T),
      "model.grounding_encoder.image_encoder.blocks.7.attn.qkv.bias": (
          "grounding_encoder.image_encoder.blocks.7", ("attn", "qkv", "bias"),
          lambda w: w.reshape(3, 16, 80)),
      "model.grounding_encoder.image_encoder.patch_embed.proj.weight": (
          "grounding_encoder.image_encoder", ("patch_embed", "kernel"),
          lambda w: w.transpose(2, 3, 1, 0)),
  }
  out = {}
  with ocp.StandardCheckpointer() as ckptr:
    for key, (group, rel, layout) in checks.items():
      sd = torch.load(os.path.join(glamm_dir, weight_map[key]), map_location="cpu",
                      weights_only=True, mmap=True)
      want = layout(torch_to_numpy(sd[key])).astype(ml_dtypes.bfloat16)
      del sd
      got = ckptr.restore(os.path.join(out_dir, "params", group))
      for p in rel:
        got = got[p]
      out[key] = bool(np.array_equal(np.asarray(got), want))
  return out


def _dir_bytes(d: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--child"]:   # internal: the measured conversion process
    return _child(argv[1], argv[3:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="scratch directory (~35 GB free)")
  p.add_argument("--out", default=None, help="result JSON (default: WORKDIR/bench_memory.json)")
  p.add_argument("--keep", action="store_true", help="keep the converted output")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.time()
  glamm_dir, clip_dir = build_synthetic(args.workdir, log=lambda m: print(m, flush=True))
  gen_seconds = time.time() - t0
  shard_bytes = {f: os.path.getsize(os.path.join(glamm_dir, f))
                 for f in sorted(os.listdir(glamm_dir)) if f.endswith(".bin")}
  out_dir = os.path.join(args.workdir, "converted")
  result = measure_conversion(glamm_dir, clip_dir, out_dir)
  budget = max(shard_bytes.values()) + 2 * 2 ** 30
  result.update({
      "shard_bytes": shard_bytes,
      "clip_bytes": os.path.getsize(os.path.join(clip_dir, "pytorch_model.bin")),
      "budget_bytes (largest shard + 2 GiB)": budget,
      "within_budget": result["peak_rss_bytes"] < budget,
      "output_bytes": _dir_bytes(out_dir), "generation_seconds": round(gen_seconds, 1),
      "cpu_count": os.cpu_count(), "mem_total_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf(
          "SC_PAGE_SIZE")})
  result["spot_check_equal"] = spot_check(glamm_dir, out_dir)
  if not args.keep:
    shutil.rmtree(out_dir, ignore_errors=True)
  path = args.out or os.path.join(args.workdir, "bench_memory.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  gib = 2 ** 30
  print(f"peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB (budget {budget / gib:.2f} GiB), "
        f"{result['seconds']:.0f} s; sampled max anon {result['sampled_max']['RssAnon'] / gib:.2f} "
        f"GiB, file {result['sampled_max']['RssFile'] / gib:.2f} GiB -> {path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
