"""Sentence vectors for the GCG grounding recall (glamm.md §6.4, item 4).

The reference embeds each string with `bert-base-uncased`: fast tokenizer, `max_length=512`,
`truncation=True`, no padding (one string at a time), fp32 model in eval mode, and the mean of the
last hidden state over *all* tokens including [CLS] and [SEP]. That checkpoint cannot be downloaded
here, so the embedder is injected: `BertMeanEmbedder(local_dir)` reproduces the reference given a
local copy of bert-base-uncased; any callable `str -> float32 [D]` works.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

TextEmbedder = Callable[[str], np.ndarray]

MISSING_EMBEDDER_MESSAGE = (
    "GCG grounding recall needs the reference's text embedder (bert-base-uncased, mean of the "
    "last hidden state). Pass embedder=BertMeanEmbedder('/path/to/bert-base-uncased'), a local "
    "directory holding config.json, the model weights and the tokenizer files (vocab.txt or "
    "tokenizer.json); it cannot be downloaded from this machine.")


class BertMeanEmbedder:
  """`get_bert_embedding` of the reference, with a cache (embeddings are deterministic)."""

  def __init__(self, model_dir: str):
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"BertMeanEmbedder: {model_dir} is not a directory. "
                              + MISSING_EMBEDDER_MESSAGE)
    import torch  # noqa: F401  (imported lazily: only the recall metric needs torch)
    from transformers import AutoModel, AutoTokenizer
    self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    self.model = AutoModel.from_pretrained(model_dir, dtype="float32").eval()
    self._cache: dict[str, np.ndarray] = {}

  def __call__(self, text: str) -> np.ndarray:
    """text -> float32 [hidden]."""
    if text not in self._cache:
      import torch
      inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
      with torch.no_grad():
        hidden = self.model(**inputs).last_hidden_state[0]
      self._cache[text] = hidden.mean(dim=0).numpy()
    return self._cache[text]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
  """sklearn's `cosine_similarity([a], [b])[0, 0]`: L2-normalise each vector in its own dtype
  (float32 stays float32; a norm below 10 * eps counts as 1, sklearn's `_handle_zeros_in_scale`),
  then the dot product."""
  a = np.asarray(a)[None, :]
  b = np.asarray(b)[None, :]
  dtype = np.result_type(a.dtype, b.dtype, np.float32)
  a, b = a.astype(dtype), b.astype(dtype)
  out = []
  for x in (a, b):
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    norm[norm < 10 * np.finfo(dtype).eps] = 1.0
    out.append(x / norm[:, None])
  return float((out[0] @ out[1].T)[0, 0])
