"""Command line:
  `python -m convert glamm --glamm DIR --clip DIR --out DIR [--dtype bfloat16]`
  `python -m convert omg_llava --internlm DIR --omg-llava FILE.pth --omg-seg omg_seg_convl.pth
     [--openclip FILE] --class-embed FILE.pth --out DIR [--dtype bfloat16]` (convert/omg_llava.py)

The output directory appears only when the conversion succeeded: everything is written to a
sibling `OUT.tmp-*` directory first and renamed at the end; on any error the temporary directory
is removed. The checkpoint is validated (all keys, shapes, dtypes) before the first tensor is read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
DTYPES = ("bfloat16", "float32", "float16")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert",
                              description="Convert released PyTorch checkpoints to Orbax.")
  sub = p.add_subparsers(dest="model", required=True)
  # Options every converter takes.
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--out", required=True, help="output directory (must not exist)")
  common.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out (only after the new conversion succeeded)")
  common.add_argument("--no-progress", action="store_true", help="no progress bar")
  g = sub.add_parser("glamm", parents=[common], help="GLaMM (MBZUAI/GLaMM-*) + its CLIP tower")
  g.add_argument("--glamm", required=True,
                 help="GLaMM HF directory (config.json, pytorch_model.bin.index.json + shards, "
                      "tokenizer files)")
  g.add_argument("--clip", required=True,
                 help="CLIP directory (openai/clip-vit-large-patch14-336: config.json + weights)")
  g.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                 help="storage dtype of every parameter (GLaMM runs in bf16)")
  g.add_argument("--sam-size", default="vit_h", choices=("vit_h", "tiny"),
                 help="SAM configuration (the checkpoint has no SAM config); vit_h for releases")

  o = sub.add_parser("omg_llava", parents=[common], help="OMG-LLaVA (zhangtao-whu/OMG-LLaVA release files)")
  o.add_argument("--internlm", required=True,
                 help="internlm2-chat-7b directory (config.json, safetensors shards + index, "
                      "tokenizer files)")
  o.add_argument("--omg-llava", required=True,
                 help="OMG-LLaVA .pth (e.g. finetuned_gcg.pth): LoRA factors, resized embedding "
                      "and head, projectors, [SEG] decoder copies")
  o.add_argument("--omg-seg", required=True, help="omg_seg_convl.pth (OMG-Seg weights)")
  o.add_argument("--openclip", default=None,
                 help="OpenCLIP convnext_large_d_320 weights (visual.trunk.*); read only when "
                      "omg_seg_convl.pth has no backbone.* keys")
  o.add_argument("--class-embed", required=True,
                 help="convnext_large_d_320_CocoPanopticOVDataset.pth (class text embeddings)")
  o.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                 help="storage dtype of the LLM (vision path and projectors stay float32)")
  o.add_argument("--size", default="omg_llava_7b", choices=("omg_llava_7b", "tiny"),
                 help="model configuration; omg_llava_7b for the release")
  return p


def _read_json(path: str) -> dict:
  from convert.readers import CheckpointError
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found") from None
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def convert_glamm(glamm_dir: str, clip_dir: str, out_dir: str, dtype: str = "bfloat16",
                  sam_size: str = "vit_h", overwrite: bool = False,
                  progress: bool = True) -> dict:
  """Converts GLaMM + CLIP to an Orbax model directory at `out_dir` (layout: convert/writer.py).

  Returns a small summary (seconds, tensors, bytes, groups).
  """
  # Imported here so `--help` stays fast.
  from convert import glamm_table, pipeline
  from convert.readers import Checkpoint
  from convert.writer import GroupWriter
  from models.glamm.config import SAM_SIZES, GLaMMConfig
  from models.glamm.modeling import abstract_glamm, param_shapes

  t0 = time.time()
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
  glamm_cfg = _read_json(os.path.join(glamm_dir, "config.json"))
  clip_cfg = _read_json(os.path.join(clip_dir, "config.json"))
  glamm_ckpt, clip_ckpt = Checkpoint(glamm_dir), Checkpoint(clip_dir)
  embed = glamm_ckpt.metadata().get("model.embed_tokens.weight")
  np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(_bf16())
  config = GLaMMConfig.from_hf(glamm_cfg, clip_cfg, SAM_SIZES[sam_size](), dtype=np_dtype,
                               param_dtype=np_dtype,
                               vocab_size=None if embed is None else embed.shape[0])
  shapes = param_shapes(abstract_glamm(config))
  sources = [
      pipeline.Source("clip", clip_ckpt, glamm_table.clip_rules(), glamm_table.normalize_clip_key),
      pipeline.Source("glamm", glamm_ckpt, glamm_table.glamm_rules()),
  ]
  steps = pipeline.plan(sources, shapes)   # raises with every problem before anything is written

  def fill(tmp: str) -> None:
    writer = GroupWriter(tmp, {p: (s, np_dtype) for p, s in shapes.items()},
                         glamm_table.group_of)
    try:
      pipeline.run(sources, steps, writer, np_dtype, progress=progress)
      writer.finish({"model": "glamm", "dtype": dtype, "sam_size": sam_size,
                     "sources": {"glamm": os.path.abspath(glamm_dir),
                                 "clip": os.path.abspath(clip_dir)},
                     "skipped": sorted(f"{s}: {k}" for (s, k), st in steps.items() if st is None)})
    except BaseException:
      _close_quietly(writer)
      raise
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=1)
    shutil.copyfile(os.path.join(glamm_dir, "config.json"), os.path.join(tmp, "source_config.json"))
    shutil.copyfile(os.path.join(clip_dir, "config.json"), os.path.join(tmp, "clip_config.json"))
    copy_tokenizer_files(glamm_dir, tmp)

  write_model_dir(out_dir, fill, overwrite=overwrite)
  n = sum(1 for s in steps.values() if s is not None)
  return {"seconds": time.time() - t0, "tensors": n, "skipped": len(steps) - n,
          "parameters": int(sum(np.prod(s) for s in shapes.values())), "out": out_dir}


def write_model_dir(out_dir: str, fill: Callable[[str], None], *, overwrite: bool = False) -> None:
  """Atomic output: `fill(tmp)` writes everything into a fresh sibling directory `OUT.tmp-*`,
  which is then renamed to `out_dir` (an existing `out_dir` is swapped out and deleted only after
  that, with `overwrite`). On any error, or an interrupt, the temporary directory is removed and
  `out_dir` is left as it was."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    fill(tmp)
    old = None
    if os.path.exists(out_dir):   # --overwrite: swap, then delete the old directory
      old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
      os.rename(out_dir, os.path.join(old, "x"))
    os.rename(tmp, out_dir)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> None:
  for name in TOKENIZER_FILES:
    src = os.path.join(src_dir, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(dst_dir, name))


def _close_quietly(writer) -> None:
  try:
    writer.close()
  except Exception:  # noqa: BLE001 - the original error matters more
    pass


def _bf16():
  import ml_dtypes
  return ml_dtypes.bfloat16


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.model == "glamm":
    summary = convert_glamm(args.glamm, args.clip, args.out, dtype=args.dtype,
                            sam_size=args.sam_size, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(json.dumps(summary), file=sys.stderr)
  elif args.model == "omg_llava":
    from convert.omg_llava import convert_omg_llava
    summary = convert_omg_llava(args.internlm, args.omg_llava, args.omg_seg, args.class_embed,
                                args.out, openclip=args.openclip, dtype=args.dtype,
                                size=args.size, overwrite=args.overwrite,
                                progress=not args.no_progress)
    print(json.dumps(summary), file=sys.stderr)
  return 0
