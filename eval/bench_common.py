"""What the JAX and PyTorch halves of `eval.bench` share: sizes, prompt layout, pruning plans,
timing statistics and the incrementally written JSON record."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import statistics
import time
from typing import Callable

METHOD_NAMES = ("none", "altp", "fastv", "pdrop")
PRE_LLM = ("altp", "topk", "prelm")


@dataclasses.dataclass(frozen=True)
class Layout:
  """The benchmark prompt: `offset` text tokens, N visual slots, then the rest of the text
  (`text` text tokens in all: GLaMM's GCG prompt is about 64 tokens), `new_tokens` forced new
  tokens (ignore EOS) and `segs` [SEG] masks decoded per image."""
  num_visual: int
  text: int = 64
  offset: int = 35
  new_tokens: int = 64
  segs: int = 8

  @property
  def prompt_len(self) -> int:
    return self.num_visual + self.text


def bench_config(tiny: bool):
  """GLaMM-7B (or the tiny test composition) with bf16 parameters and compute."""
  import jax.numpy as jnp
  from models.glamm.config import GLaMMConfig
  if tiny:   # 8 layers: PyramidDrop (first drop after layer 2) can reach a 50% average
    cfg = GLaMMConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=8))
  return GLaMMConfig.glamm_7b()


def with_sam_attention(config, impl: str):
  """`config` with the SAM image encoder's attention path set to `impl` (see
  `models.sam.config.SAM_ATTENTION_IMPLS`)."""
  enc = dataclasses.replace(config.sam.image_encoder, attention_impl=impl)
  return dataclasses.replace(config, sam=dataclasses.replace(config.sam, image_encoder=enc))


def with_attention(config, impl: str):
  """`config` with the CLIP tower's and the LLM's attention backend set to `impl` (see
  `models.cudnn.ATTENTION_IMPLS`)."""
  return dataclasses.replace(config, llm=dataclasses.replace(config.llm, attention_impl=impl),
                             vision=dataclasses.replace(config.vision, attention_impl=impl))


def layout(config, tiny: bool, new_tokens: int | None = None, segs: int | None = None) -> Layout:
  n = config.num_visual_tokens
  base = Layout(num_visual=n, text=8, offset=3, new_tokens=8, segs=2) if tiny else Layout(n)
  return dataclasses.replace(base, new_tokens=new_tokens or base.new_tokens,
                             segs=segs or base.segs)


def kept(n: int, reduction: float) -> int:
  """Visual tokens kept at a reduction (FastV rounding, 58 of 576 at 0.9)."""
  import altp_jax
  return n if reduction == 0 else altp_jax.keep_count(n, reduction)


def prune_plan(config, method: str, reduction: float, prompt_len: int):
  """(PrunePlan of the LLM, tokens entering the LLM, visual tokens entering the LLM, nominal kept
  visual tokens) for a method at a visual-token reduction.

  Pre-LLM methods (`altp`, and the PyTorch reference's `prelm`) shorten the prompt before the LLM;
  FastV prunes after layer 2; PyramidDrop at four layers with the layer-averaged retention equal
  to 1 - reduction (`eval.gcg.PruneConfig.plan`).
  """
  from eval.gcg import PruneConfig
  from models import generate as gen
  n, layers = config.num_visual_tokens, config.llm.num_layers
  if method == "none" or reduction == 0:
    return gen.PrunePlan.none(layers, n), prompt_len, n, n
  k = kept(n, reduction)
  if method in PRE_LLM:
    return gen.PrunePlan.none(layers, k), prompt_len - (n - k), k, k
  plan = PruneConfig(method=method, keep_ratio=1.0 - reduction).plan(layers, n)
  return plan, prompt_len, n, k


def median_ms(fn: Callable[[], object], sync: Callable[[object], object], repeats: int,
              warmup: int = 1) -> dict:
  """Median (and min/max) wall milliseconds of `sync(fn())` after `warmup` calls."""
  for _ in range(warmup):
    sync(fn())
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    ts.append((time.perf_counter() - t0) * 1e3)
  return dict(ms=statistics.median(ts), ms_min=min(ts), ms_max=max(ts), repeats=repeats)


def compile_many(lowerings: dict, workers: int, errors: dict | None = None,
                 compiler_options: dict | None = None) -> dict:
  """name -> (compiled, seconds) for name -> thunk returning a `jax.stages.Lowered`; lowering
  (tracing) runs in the caller's thread, XLA compilation in `workers` threads. Seconds include the
  lowering. With `errors` (a dict), a program that fails to lower or compile is left out of the
  result and its exception stored under its name there; without it the first failure raises.
  `compiler_options` go to every `Lowered.compile` (XLA debug options by name)."""
  lowered, t_lower = {}, {}
  for name, thunk in lowerings.items():
    t0 = time.perf_counter()
    try:
      lowered[name] = thunk()
    except Exception as e:  # noqa: BLE001 - reported through `errors`
      if errors is None:
        raise
      errors[name] = e
      continue
    t_lower[name] = time.perf_counter() - t0

  def comp(name):
    t0 = time.perf_counter()
    try:
      return (name, lowered[name].compile(compiler_options=compiler_options),
              time.perf_counter() - t0, None)
    except Exception as e:  # noqa: BLE001
      if errors is None:
        raise
      return name, None, 0.0, e
  out = {}
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for name, c, sec, err in pool.map(comp, lowered):
      if err is not None:
        errors[name] = err
      else:
        out[name] = (c, t_lower[name] + sec)
  return out


class JsonLog:
  """A JSON record rewritten atomically after every addition, so a killed run keeps its rows."""

  def __init__(self, path: str, meta: dict):
    self.path = path
    self.data = dict(meta=meta, rows=[])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.save()

  def set(self, key, value):
    self.data[key] = value
    self.save()

  def add(self, row: dict):
    self.data["rows"].append(row)
    self.save()
    print("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

  def save(self):
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def is_oom(e: BaseException) -> bool:
  s = f"{type(e).__name__}: {e}"
  return any(m in s for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                              "OutOfMemory"))
