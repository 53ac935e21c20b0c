"""SAM's windowed-attention kernel on an NVIDIA GPU: accuracy, launch tuning and block time.

One ViT-H windowed block (1280 wide, 16 heads of 80, 14x14 windows on the 64x64 map) and one
global block (the map as one 64x64 window) with random parameters, the relative-position tables
and the qkv bias included (a padding key is that bias), each:

1. accuracy: the block in bf16 with the Pallas kernel (`pallas_window` / `pallas`) and with the
   cuDNN path (`cudnn_folded`: for windows pad, cut, fold, flash attention, crop), each against the
   same block in fp32 with the reference's einsum attention (relative L2 and max abs error);
2. tuning: the kernel and its relative-position products for each `--configs` entry
   rows:key_rows:num_warps:num_stages:rel (median ms);
3. time: the whole block and its attention part (norm1 -> qkv -> attention -> proj) with
   either path, at batch `--batch`.

Writes OUT/window_kernel.json. GPU only (the kernel compiles through Triton):

  python -m eval.window_kernel_gpu --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import bench_common as common


def _errors(got, want) -> dict:
  g = np.asarray(got, np.float32)
  w = np.asarray(want, np.float32)
  return dict(rel_l2=float(np.linalg.norm(g - w) / np.linalg.norm(w)),
              max_abs=float(np.abs(g - w).max()))


def measure_block(kind: str, configs: str, batch: int, repeats: int) -> dict:
  """Accuracy, kernel launches and times of one ViT-H block of `kind` ("windowed" or "global")."""
  from flax import nnx
  from models.sam import window_kernel as wk
  from models.sam.image_encoder import Block

  cfg = common.bench_config(False).sam.image_encoder
  grid = (cfg.grid_size, cfg.grid_size)
  ws = cfg.window_size if kind == "windowed" else 0
  window = ws or cfg.grid_size                 # a global block is one window of the whole map
  kernel_impl = "pallas_window" if kind == "windowed" else "pallas"
  block = Block(cfg, ws, grid, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  attn = block.attn
  # Trained-like magnitudes: the tables and the bias are zero at init and would hide errors.
  attn.rel_pos_h.value = jnp.asarray(rng.normal(0, 0.3, attn.rel_pos_h.shape), jnp.float32)
  attn.rel_pos_w.value = jnp.asarray(rng.normal(0, 0.3, attn.rel_pos_w.shape), jnp.float32)
  attn.qkv.bias.value = jnp.asarray(rng.normal(0, 0.5, attn.qkv.bias.shape), jnp.float32)
  graphdef, state32 = nnx.split(block)
  state16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), state32)
  x32 = jax.random.normal(jax.random.key(1), (batch, *grid, cfg.embed_dim), jnp.float32)
  x16 = x32.astype(jnp.bfloat16)

  def run(impl: str, part: str):
    def f(state, x):
      blk = nnx.merge(graphdef, state)
      blk.attn.impl = impl
      if part == "block":
        return blk(x)
      y = blk.norm1(x)                               # norm1 -> proj, no residual, no MLP
      return blk._windowed_attention(y) if ws else blk.attn(y)
    return jax.jit(f)

  res: dict = {"kind": kind, "window": window,
               "kernel_supported": wk.supported(jnp.bfloat16, cfg.head_dim, window)}
  want = run("einsum", "block")(state32, x32)
  res["accuracy_block_vs_fp32_einsum"] = {
      impl: _errors(run(impl, "block")(state16, x16), want)
      for impl in ("cudnn_folded", kernel_impl)}
  del want
  print(json.dumps(res), flush=True)

  # The kernel alone, per launch configuration, on the inputs the block gives it.
  blk16 = nnx.merge(graphdef, state16)
  qkv = jax.jit(lambda x: blk16.attn.qkv(blk16.norm1(x)))(x16)
  bias = blk16.attn.qkv.bias[...]
  rel_h, rel_w = blk16.attn.rel_pos_h[...], blk16.attn.rel_pos_w[...]
  sync = jax.block_until_ready
  ref_out = None
  res["kernel_configs"] = []
  for spec in [s for s in configs.split(",") if s]:
    *launch, mode = spec.split(":")
    rows, key_rows, warps, stages = (int(v) for v in launch)

    def f(qkv, bias, r=rows, kr=key_rows, nw=warps, ns=stages, mode=mode):
      # The relative-position products are part of the cost: in the kernel ("table") or by XLA.
      rel = (wk.rel_pos_table(rel_h, rel_w, window, qkv.dtype) if mode == "table"
             else wk.rel_pos_products(qkv[:, :, :, 0], rel_h, rel_w, window))
      return wk.window_attention(qkv, bias, rel, window=window, scale=attn.scale, rows=r,
                                 key_rows=kr, num_warps=nw, num_stages=ns)
    f = jax.jit(f)
    row = dict(rows=rows, key_rows=key_rows, num_warps=warps, num_stages=stages, rel=mode)
    try:
      out = f(qkv, bias)
      ref_out = out if ref_out is None else ref_out
      row.update(common.median_ms(lambda: f(qkv, bias), sync, repeats),
                 max_abs_vs_first=float(jnp.abs(out.astype(jnp.float32)
                                                - ref_out.astype(jnp.float32)).max()))
      row["ms_per_image"] = row["ms"] / batch
    except Exception as e:   # a launch that does not compile is a result, not a crash
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res["kernel_configs"].append(row)
    print(json.dumps(row), flush=True)

  # Block and attention-part times, both paths.
  res["times"] = {}
  for impl in ("cudnn_folded", kernel_impl):
    for part in ("block", "attention"):
      f = run(impl, part)
      t = common.median_ms(lambda: f(state16, x16), sync, repeats)
      t["ms_per_image"] = t["ms"] / batch
      res["times"][f"{impl}/{part}"] = t
      print(kind, impl, part, json.dumps(t), flush=True)
  return res


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--blocks", default="windowed,global", help="windowed, global or both")
  p.add_argument("--configs", default="8:2:4:4:table,8:2:4:4:products,8:4:4:4:table,"
                                      "8:2:4:3:table",
                 help="windowed-block launches to time, comma-separated "
                      "rows:key_rows:num_warps:num_stages:rel (rel: 'table', products in the "
                      "kernel, or 'products', by XLA)")
  p.add_argument("--global-configs", default="1:1:4:3:table,2:1:4:3:table,2:1:8:3:table,"
                                             "4:1:8:3:table,2:1:8:3:products",
                 help="the same for a global block (the 64x64 map as one window)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  res: dict = {"device": str(jax.devices()[0]), "batch": a.batch, "blocks": {}}
  for kind in [k for k in a.blocks.split(",") if k]:
    if kind not in ("windowed", "global"):
      p.error(f"--blocks: {kind!r} is not windowed or global")
    configs = a.configs if kind == "windowed" else a.global_configs
    res["blocks"][kind] = measure_block(kind, configs, a.batch, a.repeats)
    with open(os.path.join(a.out, "window_kernel.json"), "w") as fh:
      json.dump(res, fh, indent=1)
  return res


if __name__ == "__main__":
  main()
