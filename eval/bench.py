"""Issue 5 benchmark: GLaMM-7B GCG throughput, this repo (JAX) against the PyTorch reference path.

    python -m eval.bench --out DIR [--part jax|torch|all|report] [--quick] [--tiny]
        [--batches 1,8,32] [--methods none,altp,fastv,pdrop] [--reductions 0.5,0.75,0.9]
        [--skip-torch] [--no-search] [--no-components] [--sam-attention auto,einsum,...]
        [--sam-only] [--attention auto|xla|cudnn]

Random bf16 weights at GLaMM-7B shapes (CLIP ViT-L/14-336, Vicuna-7B, SAM ViT-H), a 640-token
prompt (576 visual + 64 text), 64 new tokens forced (EOS ignored), 8 [SEG] masks per image.

- `--part jax` (`eval/bench_jax.py`): the two ceilings (8192^3 bf16 matmul, 2 GiB device copy),
  then per batch: CLIP, projector, SAM encoder, mask decoder per [SEG]; per (method, reduction):
  prefill, one decode step, end-to-end GCG; then a doubling search for the largest batch (per
  method, capped at `--search-cap-s`). Writes DIR/bench_jax.json after every row.
- `--part torch` (`eval/bench_torch.py`): the same on the PyTorch reference path (transformers +
  segment-anything, eager, SDPA), unpruned and with pre-LLM pruning. Writes DIR/bench_torch.json.
- `--part all`: both, each in its own process (JAX preallocates device memory; PyTorch caches
  it), then the report. `--part report`: only the report from the JSON files in DIR.

`--sam-attention` lists SAM image-encoder attention paths (`models/sam/config.py`); the
sam_encoder component is timed once per path. `--part jax --sam-only` times only that component
(the SAM parameters alone are built), e.g. the old einsum path against the fused ones.
`--attention` sets the CLIP tower's and the LLM's backend (`models/cudnn.py`; "auto" is cuDNN flash
on an NVIDIA GPU, with XLA for the LLM's one-token decode steps).

The report (DIR/bench.json, DIR/bench.md, DIR/bench.png) joins the two halves by (method,
reduction, batch) and gives time ratios ours / theirs: for ALTP against the reference with the
same number of visual tokens pruned before the LLM, for every method against the unpruned
reference. FLOPs per image are analytic (`eval/bench_flops.py`, formulas in its docstring).

A 9-minute device call fits about one half at batches 1, 8, 32 for two or three methods; split
with `--methods`/`--batches`/`--part` and merge with `--part report` (rows are matched across the
JSON files of DIR, including files named bench_jax*.json / bench_torch*.json from several calls).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time


# models.sam.config.SAM_ATTENTION_IMPLS, repeated: importing models.sam here would import jax
# before the torch half sets JAX_PLATFORMS=cpu (tests/test_sam_parity.py checks they agree).
SAM_ATTENTION_IMPLS = ("auto", "einsum", "xla_bias", "xla_folded", "cudnn_bias", "cudnn_folded",
                       "cudnn_mixed", "pallas_window", "pallas")
# models.cudnn.ATTENTION_IMPLS (CLIP and LLM), repeated for the same reason
# (tests/test_llama_parity.py checks they agree).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--part", choices=("jax", "torch", "all", "report"), default="all")
  p.add_argument("--tag", default="", help="suffix of this call's JSON (bench_jax{TAG}.json)")
  p.add_argument("--quick", action="store_true", help="few repeats, one reduction (90%%; tiny: 50%%)")
  p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
  p.add_argument("--batches", default=None, help="default 1,8,32 (tiny: 2)")
  p.add_argument("--methods", default="none,altp,fastv,pdrop")
  p.add_argument("--reductions", default=None, help="default 0.5,0.75,0.9 (quick: 0.9)")
  p.add_argument("--repeats", type=int, default=None, help="component repeats (default 20)")
  p.add_argument("--e2e-repeats", type=int, default=None, help="end-to-end repeats (default 5)")
  p.add_argument("--new-tokens", type=int, default=None)
  p.add_argument("--segs", type=int, default=None)
  p.add_argument("--e2e", choices=("split", "fused"), default="split")
  p.add_argument("--sam-chunk", type=int, default=32,
                 help="images per step of the SAM encoder's lax.map (32: fastest end to end at "
                      "batch 128 on an H100; smaller bounds its activations)")
  p.add_argument("--sam-attention", default="auto",
                 help="comma list of SAM encoder attention paths (" + ", ".join(SAM_ATTENTION_IMPLS)
                      + "): the first runs in the model and end to end; the sam_encoder "
                      "component is timed once per path")
  p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                 help="CLIP and LLM attention backend (auto: cuDNN flash where it runs, XLA for "
                      "the LLM's one-token decode steps); SAM's is --sam-attention")
  p.add_argument("--sam-only", action="store_true",
                 help="with --part jax: time only the SAM image encoder (its parameters alone), "
                      "once per --sam-attention path and batch")
  p.add_argument("--compile-workers", type=int, default=min(4, os.cpu_count() or 1))
  p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                 help="JAX LLM with fused q/k/v and gate/up matmuls (models/llama/fuse.py), as "
                      "`python -m eval.gcg` runs it")
  p.add_argument("--no-components", dest="components", action="store_false")
  p.add_argument("--no-search", dest="search", action="store_false")
  p.add_argument("--search-cap-s", type=float, default=None, help="default 90 (quick: 20)")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--budget-s", type=float, default=480,
                 help="a part starts no new batch or search after this many seconds (the "
                      "device call is limited to ~9 minutes)")
  a = p.parse_args(argv)
  a.batches = [int(x) for x in (a.batches or ("2" if a.tiny else "1,8,32")).split(",")]
  a.methods = [m for m in a.methods.split(",") if m]
  a.sam_attention = [x for x in a.sam_attention.split(",") if x]
  bad_impl = [x for x in a.sam_attention if x not in SAM_ATTENTION_IMPLS]
  if bad_impl or not a.sam_attention:
    p.error(f"--sam-attention: unknown {bad_impl}; expected a comma list of "
            f"{', '.join(SAM_ATTENTION_IMPLS)}")
  if a.sam_only and a.part not in ("jax", "report"):
    p.error("--sam-only needs --part jax")
  bad = set(a.methods) - {"none", "altp", "fastv", "pdrop"}
  if bad:
    p.error(f"--methods: unknown {sorted(bad)}; expected none, altp, fastv, pdrop")
  # Tiny: an 8-layer LLM, where PyramidDrop cannot average below 25% retention.
  quick_red = "0.5" if a.tiny else "0.9"
  a.reductions = [float(x) for x in (a.reductions or (quick_red if a.quick else "0.5,0.75,0.9"))
                  .split(",")]
  a.repeats = a.repeats or (3 if a.quick else 20)
  a.e2e_repeats = a.e2e_repeats or (2 if a.quick else 5)
  a.search_cap_s = a.search_cap_s if a.search_cap_s is not None else (20 if a.quick else 90)
  return a


def _meta(args):
  return dict(argv=sys.argv[1:], date=time.strftime("%Y-%m-%d %H:%M:%S"), tiny=args.tiny,
              quick=args.quick)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.part == "all":
    parts = ["jax"] + ([] if args.skip_torch else ["torch"])
    raw = sys.argv[1:] if argv is None else list(argv)
    for part in parts:
      cmd = [sys.executable, "-m", "eval.bench", *_without_part(raw), "--part", part]
      print("running", " ".join(cmd), flush=True)
      rc = subprocess.call(cmd)
      if rc:
        print(f"part {part} exited with {rc}; the report uses what it wrote", flush=True)
  elif args.part in ("jax", "torch"):
    _run_part(args)
  report(args.out)


def _without_part(argv):
  out, skip = [], False
  for x in argv:
    if skip:
      skip = False
      continue
    if x == "--part":
      skip = True
      continue
    if x.startswith("--part="):
      continue
    out.append(x)
  return out


def _run_part(args):
  from eval import bench_common as common
  if args.part == "jax":
    # Before jax is imported: most of the GPU for the largest batches. At 0.94 the unpruned
    # batch-128 program (fused projections, 54 GB of temporaries) failed to find one free block
    # although it fit in total; at 0.97 it runs (docs/PERFORMANCE.md, issue 5).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")
    from eval import bench_jax
    log = common.JsonLog(os.path.join(args.out, f"bench_jax{args.tag}.json"), _meta(args))
    bench_jax.run(args, log)
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the torch half uses jax only for plans
    from eval import bench_torch
    log = common.JsonLog(os.path.join(args.out, f"bench_torch{args.tag}.json"), _meta(args))
    bench_torch.run(args, log)


# ------------------------------------------------------------------------------------------------
# Report.

def load(out_dir):
  """All rows and metadata of DIR/bench_jax*.json and DIR/bench_torch*.json."""
  rows, meta = [], {}
  for path in sorted(glob.glob(os.path.join(out_dir, "bench_jax*.json"))
                     + glob.glob(os.path.join(out_dir, "bench_torch*.json"))):
    if path.endswith(".tmp"):
      continue
    with open(path) as f:
      d = json.load(f)
    name = os.path.basename(path)[:-5]
    meta[name] = {k: v for k, v in d.items() if k != "rows"}
    rows += [dict(r, source=name) for r in d.get("rows", [])]
  return rows, meta


def _key(r):
  return (r.get("what"), r.get("method"), r.get("reduction"), r.get("batch"))


def join(rows):
  """e2e rows with ours/theirs time ratios: `vs_torch_same` (same visual tokens entering the LLM
  pruned before it: torch none for none, torch prelm for altp at the same reduction) and
  `vs_torch_none` (against the unpruned reference)."""
  torch_e2e = {(r["method"], r["reduction"], r["batch"]): r for r in rows
               if r["framework"] == "torch" and r.get("what") == "e2e"}
  out = []
  for r in rows:
    if r["framework"] != "jax" or r.get("what") != "e2e":
      continue
    j = dict(r)
    none = torch_e2e.get(("none", 0.0, r["batch"]))
    same = none if r["method"] == "none" else (
        torch_e2e.get(("prelm", r["reduction"], r["batch"])) if r["method"] == "altp" else None)
    j["vs_torch_none"] = r["ms"] / none["ms"] if none else None
    j["vs_torch_same"] = r["ms"] / same["ms"] if same else None
    out.append(j)
  return out


def _f(x, nd=2):
  return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def markdown(rows, meta):
  lines = []
  for name, m in meta.items():
    dev = (m.get("jax") or m.get("torch") or {}).get("device", "?")
    ceil = m.get("jax_ceilings") or m.get("torch_ceilings") or {}
    lines.append(f"- `{name}`: {dev}; bf16 matmul {_f(ceil.get('matmul_tflops'), 0)} TFLOP/s, "
                 f"copy {_f(ceil.get('copy_gbps'), 0)} GB/s; {m.get('meta', {}).get('date', '')}")
  first = next((r for r in rows if r.get("what") == "e2e"), {})
  lines += ["", f"### End to end GCG ({first.get('new_tokens', '?')} new tokens, "
            f"{first.get('segs', '?')} masks per image)", "",
            "| framework | method | reduction | visual kept | batch | ms / batch | images/s | "
            "ours/theirs (same tokens) | ours/theirs (vs unpruned) | TFLOP/s | of matmul | "
            "KV cache GB | peak GB |", "|" + "---|" * 13]
  joined = {_key(j): j for j in join(rows)}
  e2e = sorted((r for r in rows if r.get("what") == "e2e"),
               key=lambda r: (r["framework"], r["batch"], r["method"], r["reduction"]))
  for r in e2e:
    j = joined.get(_key(r), {}) if r["framework"] == "jax" else {}
    lines.append(
        f"| {r['framework']} | {r['method']} | {r['reduction']} | {r['visual_kept']} | "
        f"{r['batch']} | {_f(r['ms'], 1)} | {_f(r['images_per_s'])} | "
        f"{_f(j.get('vs_torch_same'))} | {_f(j.get('vs_torch_none'))} | {_f(r.get('tflops'), 1)} | "
        f"{_f(r.get('frac_matmul'), 3)} | {_f(r.get('kv_cache_gb'))} | {_f(r.get('peak_gb'), 1)} |")
  lines += ["", "### Components (ms per call; decode step: one token for the whole batch, timed alone; "
            "decode loop: ms per step of 32 steps in one `fori_loop`)", "",
            "| framework | what | method | reduction | batch | ms | per image or [SEG] ms | "
            "TFLOP/s | of matmul | GB/s | of copy | floor ms |", "|" + "---|" * 12]
  comp = sorted((r for r in rows if r.get("what") in ("clip", "projector", "sam_encoder",
                                                      "mask_decoder", "prefill", "decode_step",
                                                      "decode_loop")),
                key=lambda r: (r["what"], r["framework"], r["batch"], r.get("method") or "",
                               r.get("reduction") or 0))
  for r in comp:
    what = r["what"] + (f" ({r['sam_attention']})" if r.get("sam_attention") else "")
    per = r.get("ms_per_seg") if r["what"] == "mask_decoder" else (
        None if r["what"] in ("decode_step", "decode_loop") else r["ms"] / r["batch"])
    lines.append(
        f"| {r['framework']} | {what} | {r.get('method', '')} | {r.get('reduction', '')} | "
        f"{r['batch']} | {_f(r['ms'])} | {_f(per, 3)} | {_f(r.get('tflops'), 1)} | "
        f"{_f(r.get('frac_matmul'), 3)} | {_f(r.get('gbps'), 0) if r.get('gbps') else '–'} | "
        f"{_f(r.get('frac_copy'), 2) if r.get('gbps') else '–'} | {_f(r.get('floor_ms'))} |")
  cost = sorted((r for r in rows if r.get("what") == "altp_cost"),
                key=lambda r: (r["batch"], r["reduction"]))
  if cost:
    lines += ["", "### ALTP's own cost (device superpixels, pixel detail and selection, timed "
              "alone)", "", "| reduction | batch | ms per batch | ms per image | "
              "of the end-to-end time |", "|" + "---|" * 5]
    lines += [f"| {r['reduction']} | {r['batch']} | {_f(r['ms'])} | {_f(r['ms_per_image'], 3)} | "
              f"{r['of_e2e']:.2%} |" for r in cost]
  other = [r for r in rows if r.get("what") in ("max_batch", "error", "search_stop", "skipped")]
  if other:
    lines += ["", "### Largest batch and failures", ""]
    for r in other:
      lines.append("- " + ", ".join(f"{k}={_f(v)}" for k, v in r.items()
                                    if k not in ("source",)))
  return "\n".join(lines) + "\n"


# One colour per method in every panel and framework; the framework is the line style and marker.
_METHOD_ORDER = ("none", "altp", "fastv", "pdrop", "prelm")


def plot(rows, path):
  """images/s against visual tokens kept: a panel per batch, a line per (framework, method).
  Each pruned line starts at its framework's unpruned point, which is also drawn alone."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  e2e = [r for r in rows if r.get("what") == "e2e"]
  batches = sorted({r["batch"] for r in e2e})
  if not batches:
    return False
  methods = sorted({r["method"] for r in e2e},
                   key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else 99, m))
  colour = {m: f"C{i}" for i, m in enumerate(methods)}
  fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for ax, b in zip(axes[0], batches):
    series = {}
    for r in e2e:
      if r["batch"] != b:
        continue
      series.setdefault((r["framework"], r["method"]), []).append(
          (r["visual_kept"], r["images_per_s"]))
    none = {fw: pts for (fw, m), pts in series.items() if m == "none"}
    for (fw, m), pts in sorted(series.items(), key=lambda kv: (kv[0][0], methods.index(kv[0][1]))):
      if m != "none":
        pts = pts + none.get(fw, [])
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour[m],
              marker="o" if fw == "jax" else "s", markersize=8 if m == "none" else 5,
              linestyle="-" if fw == "jax" else "--", label=f"{fw} {m}")
    ax.set_title(f"batch {b}")
    ax.set_xlabel("visual tokens kept (of the pruning point)")
    ax.set_ylabel("images / s (log)")
    ax.set_yscale("log")
    # Plain numbers on both tick levels: a batch-1 panel spans less than a decade, where the
    # default labels only the minor ticks, in scientific notation (2.7 x 10^0).
    for axis_ticks in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
      axis_ticks(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def report(out_dir):
  rows, meta = load(out_dir)
  combined = dict(meta=meta, rows=rows, e2e_joined=join(rows))
  with open(os.path.join(out_dir, "bench.json"), "w") as f:
    json.dump(combined, f, indent=1, default=str)
  md = markdown(rows, meta)
  with open(os.path.join(out_dir, "bench.md"), "w") as f:
    f.write(md)
  try:
    plotted = plot(rows, os.path.join(out_dir, "bench.png"))
  except ImportError as e:
    plotted = False
    print(f"no plot: {e}")
  print(md, flush=True)
  print(f"wrote {out_dir}/bench.json, bench.md" + (", bench.png" if plotted else ""), flush=True)


if __name__ == "__main__":
  main()
