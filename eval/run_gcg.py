"""GCG evaluation of a converted GLaMM checkpoint on a folder of images, with pruning.

    python -m eval.gcg --checkpoint CONVERTED_DIR --images GranDf/val_test_images \
        --annotations GranDf/annotations/val_test --split val --bert bert-base-uncased \
        --prune altp --keep-ratio 0.1 --batch-size 8 --out OUT

    python -m eval.gcg --out out/gcg      # the embedded default: no download needed

Writes one GLaMM prediction JSON per image to `OUT/predictions/` (atomically; a rerun skips
images already done, so an interrupted job resumes without redoing or losing work), a run record
`OUT/run.json` (options, throughput, seconds per stage), and with `--annotations` the five
GCG metrics to
`OUT/metrics_{split}.json` plus a summary table. Without `--bert`, recall is reported as
unavailable (with the reason), never as 0. The global batch is split over the mesh's data axes,
so the same command uses every local device; with `jax.distributed` (docs/SCALING.md) every host
takes its rows of each batch, process 0 writes the files, and a restart with a different number
of hosts continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from altp_jax.altp import DENSITIES
from eval import gcg
from models import generate as gen

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images {folder!r} is not a directory")
  names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"--images {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return names


def _host_inputs(path, config, options, tokenizer_n):
  from eval import preprocess
  import altp_jax

  image = preprocess.load_image(path)
  clip = preprocess.clip_preprocess(image, size=config.vision.image_size)
  sam, resized = preprocess.sam_preprocess(image, size=config.sam.image_encoder.img_size)
  images01 = np.clip(clip * np.asarray(preprocess.CLIP_STD, np.float32)
                     + np.asarray(preprocess.CLIP_MEAN, np.float32), 0.0, 1.0)
  labels = None
  prune = options.prune
  if prune.method == "altp" and prune.superpixels == "host":
    n = tokenizer_n
    g = prune.num_segments(n)
    pix = altp_jax.slic_labels(images01, n_segments=prune.n_segments(n),
                               compactness=prune.altp.compactness, sigma=prune.altp.sigma,
                               max_segments=g)
    labels = np.asarray(altp_jax.token_labels(pix, options.grid, g, prune.altp.token_labels))
  return clip, sam, resized, image.shape[:2], labels, images01


def _save_picture(image_path, masks, caption, path):
  """The image with each predicted mask tinted in its own colour and the caption underneath."""
  from PIL import Image, ImageDraw
  from eval import preprocess

  img = preprocess.load_image(image_path).astype(np.float32)
  colours = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48],
                      [145, 30, 180], [70, 240, 240]], np.float32)
  for j, m in enumerate(masks):
    img[m] = 0.45 * img[m] + 0.55 * colours[j % len(colours)]
  pic = Image.fromarray(img.astype(np.uint8))
  canvas = Image.new("RGB", (pic.width, pic.height + 28), (0, 0, 0))
  canvas.paste(pic, (0, 0))
  ImageDraw.Draw(canvas).text((4, pic.height + 8), caption[:120], fill=(255, 255, 255))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  canvas.save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)
  return path


def run(model, tokenizer, image_dir, out_dir, options: gcg.GCGOptions, batch_size=1, limit=None,
        progress=True, max_pictures=4, mesh=None):
  """GCG over every pending image of `image_dir`; returns the run record.

  Without `mesh`, the model runs on the default device. With `mesh` (see `models.mesh`), the
  parameters are placed by their logical axis names and the global batch of `batch_size` images
  is split over the mesh's batch axes (`data`, `fsdp`): every local device, and with
  `jax.distributed` every host, takes its rows. All processes run the same batches in lockstep;
  process 0 decides what is pending and writes the prediction files.
  """
  from tqdm import tqdm
  from jax.experimental import multihost_utils
  from eval import gcg_output, multihost, prompt as prompt_lib
  from models import mesh as mesh_lib
  from models import placement

  cfg = model.config
  n = cfg.num_visual_tokens
  pred_dir = os.path.join(out_dir, "predictions")
  os.makedirs(pred_dir, exist_ok=True)
  prompt = prompt_lib.build_gcg_prompt(tokenizer, n)
  unexpanded = prompt_lib.tokenize_with_image(prompt_lib.gcg_prompt_text(), tokenizer)
  names = list_images(image_dir)
  b = batch_size
  if mesh is not None:
    mesh_lib.check_divisible(cfg, mesh, b)
    model = placement.place_model(model, mesh)
    rows = multihost.process_rows(mesh, b)
  else:
    rows = slice(0, b)
  by_id = {f[:-4]: f for f in names}          # GLaMM's image_id: the file name minus 4 chars
  todo = [by_id[i] for i in multihost.pending(list(by_id), pred_dir)]
  if limit is not None:
    todo = todo[:limit]
  runner = gcg.GCGRunner(model, options)
  local = rows.stop - rows.start

  def to_device(x, names_):
    if mesh is None:
      return x
    return placement.from_process_local(x, names_, mesh, global_rows=b)

  ids = np.broadcast_to(prompt.ids, (local,) + prompt.ids.shape)
  valid = np.broadcast_to(prompt.valid, ids.shape)
  vis = np.broadcast_to(prompt.visual_mask, ids.shape)
  tok_names = mesh_lib.ACT_TOKENS
  ids, valid, vis = (to_device(np.ascontiguousarray(a), tok_names) for a in (ids, valid, vis))
  done, t_start, dropped_segs = 0, time.perf_counter(), 0
  stage = dict(host_preprocess=0.0, device=0.0, postprocess_and_write=0.0)
  pictures = []
  bar = tqdm(total=len(todo), desc="GCG", unit="img",
             disable=not progress or jax.process_index() != 0)
  for batch in multihost.schedule(todo, b):
    t0 = time.perf_counter()
    mine = [f if f is not None else batch[0] for f in batch[rows]]   # pad rows repeat an image
    items = [_host_inputs(os.path.join(image_dir, f), cfg, options, n) for f in mine]
    clip, sam, resized, orig, labels, images01 = zip(*items)
    sizes = np.asarray([list(r) + list(o) for r, o in zip(resized, orig)], np.int32)
    if mesh is not None and jax.process_count() > 1:
      sizes = np.asarray(multihost_utils.process_allgather(sizes, tiled=True))
    pix = mesh_lib.ACT_PIXELS
    args = (to_device(np.stack(clip), pix), to_device(np.stack(sam), pix),
            None if labels[0] is None else to_device(np.stack(labels), tok_names),
            to_device(np.stack(images01), pix) if options.prune.method == "altp" else None)
    t1 = time.perf_counter()
    out = runner.run_batch(ids, valid, vis, *args)
    out = {k: placement.to_host(v) for k, v in out.items()}   # the first batch also compiles
    t2 = time.perf_counter()
    records = {}
    for i, fname in enumerate(batch):
      if fname is None:
        continue
      gen_ids = out["tokens"][i, : out["lengths"][i]].tolist()
      caption, phrases = gcg_output.decode_gcg_output(list(unexpanded) + gen_ids, tokenizer)
      keep = out["seg_valid"][i]
      masks = gcg.masks_to_original(out["low_res"][i][keep], tuple(sizes[i, :2]),
                                    tuple(sizes[i, 2:]), cfg.sam.image_encoder.img_size)
      dropped_segs += int(out["num_segs"][i]) - int(keep.sum())
      records[fname[:-4]] = gcg_output.prediction_record(fname, caption, phrases, masks)
      if len(pictures) < max_pictures and jax.process_index() == 0:
        pictures.append(_save_picture(os.path.join(image_dir, fname), masks, caption,
                                      os.path.join(out_dir, "pictures", f"{fname[:-4]}.png")))
    multihost.write_predictions(pred_dir, records)
    stage["host_preprocess"] += t1 - t0
    stage["device"] += t2 - t1
    stage["postprocess_and_write"] += time.perf_counter() - t2
    done += len(records)
    bar.update(len(records))
  bar.close()
  elapsed = time.perf_counter() - t_start
  record = dict(images_done=done, images_total=len(names), seconds=elapsed,
                images_per_second=done / elapsed if done else 0.0, batch_size=b,
                segs_beyond_max_segs=dropped_segs, seconds_per_stage=stage, pictures=pictures,
                options=repr(options), device=str(jax.devices()[0]),
                mesh=None if mesh is None else dict(mesh.shape),
                process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_index() == 0:
    _write_json(os.path.join(out_dir, "run.json"), record)
  return record


def _write_json(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


MODELS = ("glamm", "omg_llava")


def add_run_options(p: argparse.ArgumentParser, *, out: str, max_new_tokens: int,
                    max_segs: int, mesh_default: str) -> None:
  """The options `python -m eval.gcg` takes for GLaMM and OMG-LLaVA alike: evaluation data,
  the pruning method's common knobs, batching and mesh, generation limits, outputs. The
  model-specific defaults are arguments (`mesh_default`: what no --mesh means, for the help)."""
  p.add_argument("--annotations", "--gt-dir", default=None,
                 help="GranDf annotations folder ({split}_gcg_coco_{caption,mask}_gt.json)")
  p.add_argument("--split", default="val", choices=("val", "test"))
  p.add_argument("--bert", "--bert-dir", default=None,
                 help="local bert-base-uncased directory for grounding recall (without it recall "
                      "is reported as unavailable)")
  p.add_argument("--out", default=out, help="output folder (predictions/, run, metrics)")
  p.add_argument("--prune", default="none", choices=gcg.METHODS)
  p.add_argument("--positions", default="original", choices=("original", "compact"))
  p.add_argument("--fastv-layer", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=1,
                 help="global batch; split over the mesh's data/fsdp axes")
  p.add_argument("--mesh", default=None,
                 help="device mesh, e.g. data=-1 (all devices data-parallel) or "
                      f"data=2,fsdp=1,tensor=4; {mesh_default}")
  p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                 help="one matmul for each layer's q/k/v and gate/up (faster decoding; "
                      "models/llama/fuse.py); never with a tensor axis > 1")
  p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
  p.add_argument("--max-segs", type=int, default=max_segs, help="masks decoded per image at most")
  p.add_argument("--limit", type=int, default=None,
                 help="process at most this many images (the evaluation then scores only the "
                      "images that have predictions, and says so)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--skip-eval", action="store_true", help="write predictions only")


def check_run_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """argparse errors for values `add_run_options` types cannot reject."""
  if args.batch_size < 1:
    p.error("--batch-size must be >= 1")
  if args.limit is not None and args.limit < 0:
    p.error("--limit must be >= 0")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.gcg", description=__doc__.split("\n")[0])
  p.add_argument("--model", default="glamm", choices=MODELS,
                 help="omg_llava runs eval/omg_gcg.py (its options: --model omg_llava --help)")
  p.add_argument("--checkpoint", "--ckpt", default=None,
                 help="directory written by `python -m convert glamm`; without it, the embedded "
                      "default runs (our trained synthetic GLaMM on 16 generated test scenes)")
  p.add_argument("--images", default=None, help="folder of images (GranDf val_test images)")
  p.add_argument("--keep-ratio", type=float, default=1.0,
                 help="fraction of the visual tokens kept (0.1 = 90%% reduction)")
  p.add_argument("--superpixels", default="host", choices=("host", "device"),
                 help="ALTP superpixels: scikit-image on the host or the jitted JAX SLIC")
  p.add_argument("--density", default=gcg.ALTP_DEFAULTS.density, choices=DENSITIES,
                 help="ALTP information density (DDF)")
  p.add_argument("--coverage", type=float, default=gcg.ALTP_DEFAULTS.coverage,
                 help="ALTP: share of the token budget given to superpixel coverage (DDC)")
  add_run_options(p, out="out/gcg", max_new_tokens=512, max_segs=16,
                  mesh_default="default: data=-1 when several devices are visible")
  args = p.parse_args(argv)
  check_run_options(p, args)
  if args.checkpoint and not args.images:
    p.error("--checkpoint needs --images (the folder of images to caption)")
  return args


def summary_table(metrics: dict, record: dict) -> str:
  """A small markdown table of the five GCG numbers and the throughput."""
  def fmt(v):
    return "unavailable" if v is None else f"{v:.3f}"
  rows = [("METEOR", metrics.get("METEOR")), ("CIDEr", metrics.get("CIDEr")),
          ("AP50", metrics.get("AP50")), ("mIoU", metrics.get("mIoU")),
          ("recall", metrics.get("recall"))]
  lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]
  if metrics.get("evaluated_images", 0) < metrics.get("gt_images", 0):
    lines.append(f"| images scored | {metrics['evaluated_images']} of {metrics['gt_images']} "
                 f"(partial run) |")
  lines.append(f"| images/s | {record['images_per_second']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  from eval.tokenizer import load_tokenizer, seg_token_id

  argv = sys.argv[1:] if argv is None else list(argv)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--model", default="glamm", choices=MODELS)
  if pre.parse_known_args(argv)[0].model == "omg_llava":
    from eval import omg_gcg
    return omg_gcg.main(argv)
  args = parse_args(argv)
  from eval import multihost
  from models import mesh as mesh_lib
  from models.llama import fuse
  multihost.initialize()
  mesh_spec = args.mesh or ("data=-1" if jax.device_count() > 1 else None)
  mesh = mesh_lib.make_mesh(mesh_spec) if mesh_spec else None
  altp = dataclasses.replace(gcg.ALTP_DEFAULTS, density=args.density, coverage=args.coverage)
  if args.checkpoint:
    from convert import load_glamm
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_glamm(args.checkpoint, mesh=mesh)
    images, annotations = args.images, args.annotations
    options = gcg.GCGOptions(
        prune=gcg.PruneConfig(method=args.prune, keep_ratio=args.keep_ratio, altp=altp,
                              superpixels=args.superpixels, positions=args.positions,
                              fastv_layer=args.fastv_layer),
        sampler=gen.SamplerConfig(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id or 0),
        seg_id=seg_token_id(tokenizer), max_segs=args.max_segs,
        grid=(model.config.vision.grid,) * 2)
  else:
    from eval import embedded_default
    images, annotations, model, tokenizer = embedded_default.prepare(args)
    options = embedded_default.options(args, model, tokenizer, altp)
  if args.fuse_projections and fuse.should_fuse(mesh):
    fuse.fuse_projections(model.llm)   # in place: this model is loaded for this run only
  record = run(model, tokenizer, images, args.out, options, args.batch_size, args.limit,
               progress=not args.no_progress, mesh=mesh)
  print(json.dumps({k: v for k, v in record.items() if k != "options"}, indent=2))
  if annotations and not args.skip_eval and jax.process_index() == 0:
    return evaluate_and_report(args.out, annotations, args.split, record, args.bert,
                               None if args.checkpoint else embedded_default.recall_embedder(),
                               only_predicted=args.limit is not None)
  return record


def evaluate_and_report(out_dir, annotations, split, record, bert_dir=None, embedder=None,
                        only_predicted=False):
  """The GCG metrics of OUT/predictions against a GranDf annotations folder: writes
  OUT/metrics_{split}.json, prints the summary table, returns the metrics. `bert_dir` (a local
  bert-base-uncased) overrides `embedder` for the recall's text similarity. `only_predicted`
  (a `--limit` run): score only the GT images that have predictions, and say so."""
  from eval import grandf, metrics
  if bert_dir:
    from eval.text_embedder import BertMeanEmbedder
    embedder = BertMeanEmbedder(bert_dir)
  caption_gt, mask_gt = grandf.gt_paths(annotations, split)
  results = metrics.evaluate_gcg(os.path.join(out_dir, "predictions"), caption_gt, mask_gt,
                                 embedder, only_predicted=only_predicted)
  if results["evaluated_images"] < results["gt_images"]:
    print(f"partial run: metrics over {results['evaluated_images']} of {results['gt_images']} GT "
          f"images (those with predictions); not comparable with a full evaluation",
          file=sys.stderr)
  _write_json(os.path.join(out_dir, f"metrics_{split}.json"), results)
  print(summary_table(results, record))
  return results


if __name__ == "__main__":
  main()
