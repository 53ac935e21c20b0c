"""Shared builders for the eval tests: a tiny LLaMA-style SentencePiece checkpoint directory laid
out as GLaMM's (HF 4.28 side files), and the same tokenizer through transformers 5.23."""

from __future__ import annotations

import json
import os
import random

import sentencepiece as spm

from eval.prompt import GCG_INSTRUCTION, SYSTEM
from eval.tokenizer import GLAMM_ADDED_TOKENS

_WORDS = ("a man woman dog cat tree sky grass road car building person wearing red blue shirt "
          "standing next to holding the of and in on with is are sitting white black large small "
          "wooden table people street background front left right two three it its there").split()

SP_VOCAB = 500


def _corpus(seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  lines = [SYSTEM, "The provides an overview of the picture.", GCG_INSTRUCTION,
           "USER: ASSISTANT: don't it's we're I'm you've (x) 123 4567 caf\u00e9 na\u00efve"]
  for _ in range(400):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
    line = " ".join(words)
    if rng.random() < 0.4:
      line = line[0].upper() + line[1:] + rng.choice([".", ",", "!", "?"])
    lines.append(line)
  return lines


def train_sp_model(path_prefix: str) -> str:
  """A 500-piece BPE model with LLaMA's settings (byte fallback, ids 0/1/2 = <unk>/<s>/</s>,
  identity normalisation, dummy prefix, no whitespace squeezing). Returns the .model path."""
  corpus = path_prefix + ".txt"
  with open(corpus, "w") as f:
    f.write("\n".join(_corpus()))
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=path_prefix, vocab_size=SP_VOCAB, model_type="bpe",
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
      remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
      character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2)
  return path_prefix + ".model"


def train_internlm2_sp_model(path_prefix: str, add_dummy_prefix: bool = True) -> str:
  """InternLM2's tokenizer shape at 500 pieces: a 498-piece BPE model (LLaMA's settings, trained
  on the GCG questions and the corpus) plus the two user-defined placeholder pieces 498/499 that
  the tokenizer config renames to <|im_end|>/<|im_start|>. Returns the .model path."""
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2
  from eval.omg_llava_inputs import GCG_QUESTIONS
  with open(path_prefix + ".txt", "w") as f:
    f.write("\n".join(list(GCG_QUESTIONS) * 3 + _corpus() + ["user assistant"]))
  spm.SentencePieceTrainer.train(
      input=path_prefix + ".txt", model_prefix=path_prefix, vocab_size=SP_VOCAB - 2,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
      normalization_rule_name="identity", split_digits=True, character_coverage=1.0,
      allow_whitespace_only_pieces=True, minloglevel=2)
  proto = sp_pb2.ModelProto()
  with open(path_prefix + ".model", "rb") as f:
    proto.ParseFromString(f.read())
  for name in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = name, 0.0, sp_pb2.ModelProto.SentencePiece.USER_DEFINED
  with open(path_prefix + ".model", "wb") as f:
    f.write(proto.SerializeToString())
  return path_prefix + ".model"


def import_transformers():
  """`transformers` imported around conftest's torchvision stand-in (see `tests/hf_reference`)."""
  from tests.hf_reference import import_transformers as _import
  return _import()


def _added_token_dict(content: str) -> dict:
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
          "rstrip": False, "single_word": False}


def write_glamm_tokenizer_dir(directory: str, model_path: str, layout: str = "legacy") -> None:
  """GLaMM-style tokenizer files. layout "legacy": added_tokens.json as transformers 4.28 writes
  it; "decoder": only tokenizer_config.json's `added_tokens_decoder` (transformers >= 4.34)."""
  os.makedirs(directory, exist_ok=True)
  with open(model_path, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
    dst.write(src.read())
  added = {tok: SP_VOCAB + i for i, tok in enumerate(GLAMM_ADDED_TOKENS)}
  config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token_dict("<s>"),
            "eos_token": _added_token_dict("</s>"), "unk_token": _added_token_dict("<unk>"),
            "clean_up_tokenization_spaces": False, "model_max_length": 512, "pad_token": None,
            "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
  special_map = {"bos_token": _added_token_dict("<s>"), "eos_token": _added_token_dict("</s>"),
                 "unk_token": _added_token_dict("<unk>"), "pad_token": "<unk>"}
  if layout == "legacy":
    with open(os.path.join(directory, "added_tokens.json"), "w") as f:
      json.dump(added, f)
  elif layout == "decoder":
    config["added_tokens_decoder"] = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True} for t, i in added.items()}
    for i, t in enumerate(("<unk>", "<s>", "</s>")):
      config["added_tokens_decoder"][str(i)] = {"content": t, "special": True}
  else:
    raise ValueError(layout)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump(special_map, f)


def hf_reference_tokenizer(directory: str, model_path: str):
  """transformers 5.23 `LlamaTokenizer` on the same model, with GLaMM's tokens added so that they
  behave as 4.28's plain-string no-split tokens (strip whitespace on both sides), and `legacy=True`
  so that every text piece gets SentencePiece's "▁" prefix."""
  transformers = import_transformers()
  AddedToken, LlamaTokenizer = transformers.AddedToken, transformers.LlamaTokenizer
  os.makedirs(directory, exist_ok=True)
  with open(model_path, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
    dst.write(src.read())
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>"}, f)
  tok = LlamaTokenizer.from_pretrained(directory, legacy=True)
  tok.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True)
                  for t in GLAMM_ADDED_TOKENS], special_tokens=True)
  return tok
