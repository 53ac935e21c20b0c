"""From generated ids and masks to GLaMM's per-image GCG prediction file (glamm.md §4.11-4.12).

Reference: `eval/gcg/infer.py::inference` and its `__main__` block, `eval/utils.py`
(`mask_to_rle_pytorch` + `coco_encode_rle`; `pycocotools.mask.encode` of a Fortran-ordered uint8
mask gives the same compressed string).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from eval.prompt import IMAGE_TOKEN_INDEX
from eval.tokenizer import LlamaSlowTokenizer

_TAG = re.compile(r"<.*?>")
_PHRASE = re.compile(r"<p>(.*?)</p>")


def parse_gcg_text(text: str) -> tuple[str, list[str]]:
  """Decoded text (prompt + answer) -> (caption, phrases), the `infer.py` post-processing.

  Delete every "\\n"; replace each double space by one (a single left-to-right pass, so three
  spaces become two); keep what follows the last "ASSISTANT: "; phrases = non-greedy
  `<p>(.*?)</p>` matches, stripped; caption = text without `<...>` tags and without "[SEG]",
  whitespace runs collapsed, single quotes stripped from both ends, then stripped.
  """
  text = text.replace("\n", "").replace("  ", " ")
  text = text.split("ASSISTANT: ")[-1]
  phrases = [p.strip() for p in _PHRASE.findall(text)]
  caption = _TAG.sub("", text).replace("[SEG]", "")
  caption = " ".join(caption.split()).strip("'").strip()
  return caption, phrases


def decode_gcg_output(output_ids: Sequence[int], tokenizer: LlamaSlowTokenizer) -> tuple[str, list[str]]:
  """Output sequence (prompt ids with -200, then generated ids) -> (caption, phrases).

  The reference removes IMAGE_TOKEN_INDEX and decodes the whole sequence with
  `skip_special_tokens=False`.
  """
  ids = [int(i) for i in output_ids if int(i) != IMAGE_TOKEN_INDEX]
  return parse_gcg_text(tokenizer.decode(ids, skip_special_tokens=False))


def encode_mask(mask: np.ndarray) -> dict:
  """Binary [H,W] mask -> COCO compressed RLE {"size": [H, W], "counts": str} (column-major)."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"encode_mask: expected a [H,W] mask, got shape {mask.shape}")
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8) != 0, dtype=np.uint8))
  return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def prediction_record(image_file: str, caption: str, phrases: Sequence[str],
                      masks: np.ndarray | Sequence[np.ndarray]) -> dict:
  """The dict `infer.py` writes: image_id = file name without its last 4 characters (".jpg").

  masks: bool/uint8 [N,H,W] (or a list of [H,W]) at the original image size, in [SEG] order.
  """
  return {"image_id": image_file[:-4], "caption": caption, "phrases": list(phrases),
          "pred_masks": [encode_mask(m) for m in masks]}


def write_prediction(output_dir: str, record: dict) -> str:
  """Writes `{output_dir}/{image_id}.json` atomically (a temporary file, then a rename, so an
  interrupted run never leaves a truncated prediction behind); returns the path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, f"{record['image_id']}.json")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, path)
  return path
