"""A small LLaMA-style SentencePiece tokenizer for the synthetic scenes, saved like GLaMM's.

GLaMM's tokenizer is LLaMA's 32000-piece SentencePiece BPE model (`<unk>`=0, `<s>`=1, `</s>`=2,
byte fallback, so "\\n" is `<0x0A>`) plus 7 added tokens stored in `added_tokens.json` with ids
continuing the SentencePiece vocabulary (glamm.md §3). This module trains a BPE model of a few
hundred pieces with LLaMA's trainer settings (identity normalisation, whitespace kept, digits
split, byte fallback) on the GCG prompt and the scene captions, and writes the same four files, so
`eval.tokenizer.load_tokenizer` loads it exactly as it loads GLaMM's: added tokens at ids
`sp_size .. sp_size + 6` in GLaMM's order, `[SEG]` = `sp_size + 4`.

The added tokens are kept out of the SentencePiece model (not user-defined symbols) because that is
GLaMM's layout: the slow tokenizer splits the text on them before SentencePiece sees it, so the
training text is split the same way here.

The corpus depends on the caption grammar only, not on a generated dataset: the GCG prompt, every
phrase the object vocabulary can form, the relation and region words, and captions sampled from the
grammar (`grammar_captions`, the generator's own caption function on random objects). So every
dataset written by `eval.scenes`, whatever its seed or size, gets the same tokenizer, and a model
trained on one dataset reads any other.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable

import numpy as np
import sentencepiece as spm

from eval.prompt import GCG_INSTRUCTION, gcg_prompt_text
from eval.tokenizer import GLAMM_ADDED_TOKENS, LlamaSlowTokenizer

DEFAULT_VOCAB_SIZE = 512   # SentencePiece pieces (incl. 3 specials and 256 byte pieces)

_SPLIT = re.compile("|".join(re.escape(t) for t in GLAMM_ADDED_TOKENS + ("<image>",)))


def _pieces(text: str) -> list[str]:
  """The text the slow tokenizer hands to SentencePiece: split on added tokens, lines apart
  (SentencePiece trains on lines; "\\n" itself is covered by byte fallback)."""
  out = []
  for chunk in _SPLIT.split(text):
    out += [line.strip() for line in chunk.split("\n") if line.strip()]
  return out


def vocabulary_corpus() -> list[str]:
  """Every phrase and connective the scene generator can write, once."""
  from eval import scenes
  lines = []
  for size in scenes.SIZES:
    for texture in scenes.TEXTURES:
      for colour in scenes.COLOURS:
        for shape in scenes.SHAPES:
          t = "" if texture == "plain" else texture + " "
          lines.append(f"a {size} {t}{colour} {shape}")
  lines += [f"The image shows {r}" for r in scenes.RELATIONS]
  lines += [f", which is {r}" for r in scenes.RELATIONS]
  lines += [f"{r} of the image." for r in scenes.REGIONS]
  return lines


def grammar_captions(n: int = 3000, seed: int = 0) -> list[str]:
  """`n` grounded captions of random objects (1-6, random centres) from the generator's caption
  function; no images are rendered."""
  from eval import scenes
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    objs = []
    for _ in range(int(rng.integers(1, scenes.MAX_OBJECTS + 1))):
      objs.append(scenes.SceneObject(
          shape=scenes.SHAPES[rng.integers(len(scenes.SHAPES))],
          colour=list(scenes.COLOURS)[rng.integers(len(scenes.COLOURS))],
          texture=scenes.TEXTURES[rng.integers(len(scenes.TEXTURES))],
          size=list(scenes.SIZES)[rng.integers(len(scenes.SIZES))],
          centre=tuple(float(v) for v in rng.uniform(0, scenes.IMAGE_SIZE, 2)), radius=10.0,
          angle=0.0, rgb=(0, 0, 0), rgb2=(0, 0, 0)))
    rels = [scenes.relation(a, b) for a, b in zip(objs, objs[1:])]
    out.append(scenes.grounded_caption(objs, rels)[0])
  return out


def train_tokenizer(out_dir: str, captions: Iterable[str] | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> LlamaSlowTokenizer:
  """Trains the SentencePiece model on prompt + vocabulary + captions (default:
  `grammar_captions()`) and writes `tokenizer.model`, `added_tokens.json`,
  `special_tokens_map.json`, `tokenizer_config.json`.

  Deterministic (one training thread, no sampling): the same files every time.
  """
  prompt = gcg_prompt_text(GCG_INSTRUCTION)
  corpus = _pieces(prompt) + vocabulary_corpus()
  for c in (grammar_captions() if captions is None else captions):
    corpus += _pieces(c)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
      byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
      remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, input_sentence_size=0,
      shuffle_input_sentence=False, minloglevel=2)
  os.makedirs(out_dir, exist_ok=True)
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  size = sp.get_piece_size()
  files = {
      "tokenizer.model": model.getvalue(),
      "added_tokens.json": {t: size + i for i, t in enumerate(GLAMM_ADDED_TOKENS)},
      # GLaMM: pad = unk; the 7 added tokens are not special tokens.
      "special_tokens_map.json": {
          k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
              "single_word": False}
          for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
      | {"pad_token": "<unk>"},
      "tokenizer_config.json": {
          "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
          "clean_up_tokenization_spaces": False, "model_max_length": 2048,
          "padding_side": "right", "legacy": True},
  }
  for name, content in files.items():
    path = os.path.join(out_dir, name)
    data = content if isinstance(content, bytes) else json.dumps(content, indent=2).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  from eval.tokenizer import load_tokenizer
  return load_tokenizer(out_dir)
