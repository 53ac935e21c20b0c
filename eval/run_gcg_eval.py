"""Command line: the five GranD-f GCG numbers of a prediction directory, written as JSON.

  python -m eval.run_gcg_eval --pred_dir PRED --gt_dir data/GranDf/annotations/val_test \
      --split val --bert_dir /path/to/bert-base-uncased --out OUT_DIR

Writes OUT_DIR/gcg_{split}.json = {"AP50", "mAP", "METEOR", "CIDEr", "mIoU", "recall", ...}.
Needs Java (PTB tokenizer, METEOR) and a local bert-base-uncased directory for the recall.
"""

from __future__ import annotations

import argparse
import json
import os

from eval import grandf, metrics
from eval.text_embedder import BertMeanEmbedder


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pred_dir", required=True, help="directory of {image_id}.json predictions")
  parser.add_argument("--gt_dir", default="./data/GranDf/annotations/val_test")
  parser.add_argument("--split", required=True, choices=["val", "test"])
  parser.add_argument("--bert_dir", required=True, help="local bert-base-uncased directory")
  parser.add_argument("--out", required=True, help="output directory for the JSON results")
  args = parser.parse_args(argv)

  caption_gt, mask_gt = grandf.gt_paths(args.gt_dir, args.split)
  results = metrics.evaluate_gcg(args.pred_dir, caption_gt, mask_gt,
                                 BertMeanEmbedder(args.bert_dir), verbose=True)
  results.update({"split": args.split, "pred_dir": os.path.abspath(args.pred_dir)})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"gcg_{args.split}.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
