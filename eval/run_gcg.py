"""GCG evaluation of a converted GLaMM checkpoint on a folder of images, with pruning.

    python -m eval.run_gcg --ckpt CONVERTED_DIR --images GranDf/val_test_images --out OUT \
        [--prune altp --keep-ratio 0.1 --superpixels host] [--gt-dir GranDf/annotations/val_test \
        --split val --bert-dir bert-base-uncased]

Writes one GLaMM prediction JSON per image to `OUT/predictions/` (atomically; a rerun skips
images already done, so an interrupted job resumes without redoing or losing work), a run record
`OUT/run.json` (options, throughput), and with `--gt-dir` the five GCG metrics to
`OUT/metrics_{split}.json`. With several JAX processes (`jax.distributed`), each process takes
every `num_processes`-th pending image; the prediction files are the shared result, so a restart
with a different number of hosts continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

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


def pending_images(names, pred_dir, process_index=0, num_processes=1):
  """Images without a prediction file yet, this process's share (round-robin)."""
  todo = [n for n in names if not os.path.exists(os.path.join(pred_dir, f"{n[:-4]}.json"))]
  return todo[process_index::num_processes]


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


def run(model, tokenizer, image_dir, out_dir, options: gcg.GCGOptions, batch_size=1, limit=None,
        progress=True):
  """GCG over every pending image of `image_dir`; returns the run record."""
  from tqdm import tqdm
  from eval import gcg_output, prompt as prompt_lib

  cfg = model.config
  n = cfg.num_visual_tokens
  pred_dir = os.path.join(out_dir, "predictions")
  os.makedirs(pred_dir, exist_ok=True)
  prompt = prompt_lib.build_gcg_prompt(tokenizer, n)
  unexpanded = prompt_lib.tokenize_with_image(prompt_lib.gcg_prompt_text(), tokenizer)
  names = list_images(image_dir)
  todo = pending_images(names, pred_dir, jax.process_index(), jax.process_count())
  if limit is not None:
    todo = todo[:limit]
  runner = gcg.GCGRunner(model, options)
  b = batch_size
  ids = np.broadcast_to(prompt.ids, (b,) + prompt.ids.shape)
  valid = np.broadcast_to(prompt.valid, ids.shape)
  vis = np.broadcast_to(prompt.visual_mask, ids.shape)
  done, t_start, dropped_segs = 0, time.perf_counter(), 0
  bar = tqdm(total=len(todo), desc="GCG", unit="img", disable=not progress)
  for start in range(0, len(todo), b):
    chunk = todo[start:start + b]
    items = [_host_inputs(os.path.join(image_dir, f), cfg, options, n) for f in chunk]
    items += [items[-1]] * (b - len(items))           # pad the last batch (outputs discarded)
    clip, sam, resized, orig, labels, images01 = zip(*items)
    out = runner.run_batch(ids, valid, vis, np.stack(clip), np.stack(sam),
                           None if labels[0] is None else np.stack(labels),
                           np.stack(images01) if options.prune.method == "altp" else None)
    out = jax.device_get(out)
    for i, fname in enumerate(chunk):
      gen_ids = out["tokens"][i, : out["lengths"][i]].tolist()
      caption, phrases = gcg_output.decode_gcg_output(list(unexpanded) + gen_ids, tokenizer)
      keep = out["seg_valid"][i]
      masks = gcg.masks_to_original(out["low_res"][i][keep], resized[i], orig[i],
                                    cfg.sam.image_encoder.img_size)
      dropped_segs += int(out["num_segs"][i]) - int(keep.sum())
      gcg_output.write_prediction(pred_dir, gcg_output.prediction_record(
          fname, caption, phrases, masks))
    done += len(chunk)
    bar.update(len(chunk))
  bar.close()
  elapsed = time.perf_counter() - t_start
  record = dict(images_done=done, images_total=len(names), seconds=elapsed,
                images_per_second=done / elapsed if done else 0.0, batch_size=b,
                segs_beyond_max_segs=dropped_segs, options=repr(options),
                device=str(jax.devices()[0]), process_index=jax.process_index(),
                process_count=jax.process_count())
  _write_json(os.path.join(out_dir, f"run.{jax.process_index()}.json"), record)
  return record


def _write_json(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.run_gcg", description=__doc__.split("\n")[0])
  p.add_argument("--ckpt", required=True, help="directory written by `python -m convert glamm`")
  p.add_argument("--images", required=True, help="folder of images (GranDf val_test images)")
  p.add_argument("--out", required=True, help="output folder (predictions/, run, metrics)")
  p.add_argument("--prune", default="none", choices=gcg.METHODS)
  p.add_argument("--keep-ratio", type=float, default=1.0,
                 help="fraction of the visual tokens kept (0.1 = 90%% reduction)")
  p.add_argument("--superpixels", default="host", choices=("host", "device"),
                 help="ALTP superpixels: scikit-image on the host or the jitted JAX SLIC")
  p.add_argument("--density", default="dispersion", help="ALTP density option")
  p.add_argument("--positions", default="original", choices=("original", "compact"))
  p.add_argument("--fastv-layer", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--max-segs", type=int, default=16, help="masks decoded per image at most")
  p.add_argument("--limit", type=int, default=None, help="process at most this many images")
  p.add_argument("--gt-dir", default=None, help="GranDf annotations folder: evaluate after")
  p.add_argument("--split", default="val", choices=("val", "test"))
  p.add_argument("--bert-dir", default=None, help="local bert-base-uncased (grounding recall)")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None):
  import altp_jax
  from convert import load_glamm
  from eval.tokenizer import load_tokenizer, seg_token_id

  args = parse_args(argv)
  if args.gt_dir and not args.bert_dir:
    raise SystemExit("--gt-dir needs --bert-dir: grounding recall compares phrases with BERT "
                     "(bert-base-uncased, a local directory)")
  tokenizer = load_tokenizer(args.ckpt)
  model = load_glamm(args.ckpt)
  options = gcg.GCGOptions(
      prune=gcg.PruneConfig(method=args.prune, keep_ratio=args.keep_ratio,
                            altp=altp_jax.ALTPConfig(density=args.density),
                            superpixels=args.superpixels, positions=args.positions,
                            fastv_layer=args.fastv_layer),
      sampler=gen.SamplerConfig(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id or 0),
      seg_id=seg_token_id(tokenizer), max_segs=args.max_segs,
      grid=(model.config.vision.grid,) * 2)
  record = run(model, tokenizer, args.images, args.out, options, args.batch_size, args.limit,
               progress=not args.no_progress)
  print(json.dumps(record, indent=2))
  if args.gt_dir and jax.process_index() == 0:
    from eval import grandf, metrics
    from eval.text_embedder import BertMeanEmbedder

    caption_gt, mask_gt = grandf.gt_paths(args.gt_dir, args.split)
    results = metrics.evaluate_gcg(os.path.join(args.out, "predictions"), caption_gt, mask_gt,
                                   BertMeanEmbedder(args.bert_dir))
    _write_json(os.path.join(args.out, f"metrics_{args.split}.json"), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
