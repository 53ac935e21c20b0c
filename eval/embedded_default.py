"""The embedded default of `python -m eval.gcg` (no --checkpoint): the GLaMM-architecture model
trained on the synthetic grounded scenes (eval/assets/synthetic_glamm, see docs/SYNTHETIC.md),
evaluated on a small generated sample of the synthetic test split, so that a fresh machine runs the
whole pipeline on a model whose captions and masks are real.

The sample is regenerated deterministically (seed 0, test scenes 0..15) under OUT/embedded_sample.
Grounding recall uses exact phrase match instead of BERT similarity (the synthetic variant,
documented in eval/synthetic_eval.py) unless --bert is given.
"""

from __future__ import annotations

import os

from eval import synthetic_eval

SAMPLE_SEED = 0
SAMPLE_COUNT = 16
SPLIT = "test"


def prepare(args):
  """(images dir, annotations dir, model, tokenizer); sets args.split and the token budget."""
  from eval import scenes
  from eval.synthetic_checkpoint import load_model
  print(f"No --checkpoint: running the embedded default, the synthetic GLaMM "
        f"({synthetic_eval.DEFAULT_CHECKPOINT}) on {SAMPLE_COUNT} generated test scenes "
        "(docs/SYNTHETIC.md). Real GranDf numbers need a converted release checkpoint.")
  root = os.path.join(args.out, "embedded_sample")
  scenes.write_dataset(root, {SPLIT: SAMPLE_COUNT}, seed=SAMPLE_SEED, progress=False,
                       tokenizer=False)
  args.split = SPLIT
  if args.max_new_tokens == 512:     # the CLI default for GLaMM-7B; synthetic answers are shorter
    args.max_new_tokens = 112
  model, tokenizer = load_model(synthetic_eval.DEFAULT_CHECKPOINT)
  annotations = os.path.dirname(scenes.annotation_paths(root, SPLIT)[0])
  return scenes.image_dir(root, SPLIT), annotations, model, tokenizer


def options(args, model, tokenizer, altp_config):
  """GCG options for the 4-layer synthetic model (FastV K=1, PyramidDrop at layers 1-3), with
  the command line's ALTP options `altp_config`."""
  altp = synthetic_eval.altp_overrides(altp_config)
  if args.positions != "original":
    altp += (("positions", args.positions),)
  cfg = synthetic_eval.EvalConfig(args.prune, args.keep_ratio, altp)
  return synthetic_eval.gcg_options(cfg, model, tokenizer, args.max_new_tokens,
                                    superpixels=args.superpixels, max_segs=args.max_segs)


def recall_embedder():
  return synthetic_eval.ExactPhraseEmbedder()
