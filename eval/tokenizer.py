"""LLaMA SentencePiece tokenizer with GLaMM's added tokens, in pure sentencepiece.

GLaMM tokenises the prompt and decodes generated ids with the *slow* `transformers.LlamaTokenizer`
of transformers 4.28.0.dev0 (`use_fast=False`). This module reproduces that tokenizer's behaviour
without importing transformers:

Encoding (4.28 `PreTrainedTokenizer.tokenize` + `LlamaTokenizer._tokenize`):
  1. Split the text on every "no-split" token (the added tokens and the special tokens `<s>`, `</s>`,
     `<unk>`), leftmost match first, longest match among those starting at the same place.
  2. Around each no-split token, strip whitespace from the neighbouring text pieces: a token saved
     as an `AddedToken` (a dict in `special_tokens_map.json` / `tokenizer_config.json`) strips only
     as its `lstrip`/`rstrip` flags say; any other no-split token (GLaMM's `<im_start>`, `[SEG]`,
     `<p>`, ... are plain strings in `added_tokens.json`) strips both neighbours (`str.rstrip()` on
     the left piece, `str.lstrip()` on the right one). The LLaMA special tokens are wrapped as
     `AddedToken(lstrip=False, rstrip=False)` by `LlamaTokenizer.__init__`, so they strip nothing.
  3. Encode every remaining non-empty text piece *separately* with SentencePiece, which prepends its
     dummy-prefix "▁" to each piece ("legacy" behaviour; transformers >= 4.34 with `legacy=False`
     would not do this after an added token).
  4. Prepend BOS when `add_bos_token` (default true), append EOS when `add_eos_token`.

Decoding (4.28 `PreTrainedTokenizer._decode` + `LlamaTokenizer.convert_tokens_to_string`):
  ids -> pieces (added tokens by their content); consecutive non-added pieces form a sub-text
  decoded by `convert_tokens_to_string`, in which the special tokens `<s>`, `</s>`, `<unk>` are
  emitted literally, preceded by one space unless they are the first piece or follow another
  special token; every added token is its own sub-text; sub-texts are joined with " "
  (`spaces_between_special_tokens=True`); finally the optional `clean_up_tokenization` pass (off for
  LLaMA unless `tokenizer_config.json` turns it on).
  The exact form of `convert_tokens_to_string` in 4.28.0.dev0 (the `i != 0` guard, no final strip)
  could not be read from that exact commit; GLaMM's text post-processing (remove "\\n", replace
  double spaces, keep the text after "ASSISTANT: ", strip tags and spaces) makes the parsed caption
  and phrases insensitive to those two details.

Shapes: ids are Python lists of ints. IMAGE_TOKEN_INDEX (-200) is not a token; `eval/prompt.py`
handles it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

# Added tokens GLaMM's `train.py::setup_tokenizer_and_special_tokens` adds, in order; with LLaMA's
# 32000-piece model they get ids 32000..32006 (glamm.md §3).
GLAMM_ADDED_TOKENS = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# `PreTrainedTokenizerBase.clean_up_tokenization` (unchanged since 2019).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclasses.dataclass(frozen=True)
class NoSplitToken:
  """A token the text is split on before SentencePiece sees it.

  `lstrip`: strip whitespace at the end of the piece on its left; `rstrip`: strip whitespace at
  the start of the piece on its right (the HF naming: the token "eats" the spaces on that side).
  """
  content: str
  id: int
  lstrip: bool
  rstrip: bool


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"tokenizer: {path} is not valid JSON: {e}") from e


def _token_content(value) -> str | None:
  """A special-token entry is a string or an AddedToken dict ({"content": ..., ...})."""
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise ValueError(f"tokenizer: cannot read a special-token entry {value!r}")


class AddedVocabLookup:
  """id <-> token lookups over a SentencePiece model `sp` (`sp_size` pieces) plus added tokens
  (`added_encoder` token -> id, `added_decoder` id -> token), shared by the LLaMA and InternLM2
  tokenizers."""

  def token_to_id(self, token: str) -> int:
    if token in self.added_encoder:
      return self.added_encoder[token]
    return self.sp.piece_to_id(token)

  def id_to_token(self, idx: int) -> str:
    idx = int(idx)
    if idx in self.added_decoder:
      return self.added_decoder[idx]
    if not 0 <= idx < self.sp_size:
      raise ValueError(f"tokenizer: id {idx} is outside the vocabulary [0, {len(self)}); "
                       "IMAGE_TOKEN_INDEX (-200) must be removed before decoding")
    return self.sp.id_to_piece(idx)


class LlamaSlowTokenizer(AddedVocabLookup):
  """transformers-4.28 slow `LlamaTokenizer` (legacy) behaviour on top of a SentencePiece model.

  Args:
    sp_model: a loaded `sentencepiece.SentencePieceProcessor` (the LLaMA `tokenizer.model`).
    added_tokens: content -> id of tokens beyond the SentencePiece vocabulary (GLaMM's 7 tokens).
    special_tokens: key ("bos_token", "eos_token", "unk_token", "pad_token") -> string or
      AddedToken dict, as in `special_tokens_map.json`.
    additional_special_tokens: strings or AddedToken dicts.
    add_bos_token / add_eos_token: what `encode(..., add_special_tokens=True)` adds.
    clean_up_tokenization_spaces: default of `decode`'s clean-up pass.
  """

  def __init__(self, sp_model: spm.SentencePieceProcessor, added_tokens: Mapping[str, int],
               special_tokens: Mapping[str, object] | None = None,
               additional_special_tokens: Sequence[object] = (),
               add_bos_token: bool = True, add_eos_token: bool = False,
               clean_up_tokenization_spaces: bool = False):
    self.sp = sp_model
    self.sp_size = sp_model.get_piece_size()
    special_tokens = dict(special_tokens or {})
    for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
      if special_tokens.get(key) is None:
        special_tokens[key] = default
    self.add_bos_token = bool(add_bos_token)
    self.add_eos_token = bool(add_eos_token)
    self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

    # Added tokens: ids must continue the SentencePiece vocabulary without gaps or collisions.
    self.added_encoder: dict[str, int] = {}
    for content, idx in sorted(added_tokens.items(), key=lambda kv: kv[1]):
      idx = int(idx)
      if idx < self.sp_size:
        # HF keeps such a token only as a no-split marker for a piece already in the vocabulary.
        if self.sp.id_to_piece(idx) != content:
          raise ValueError(f"tokenizer: added token {content!r} has id {idx}, which is the "
                           f"SentencePiece piece {self.sp.id_to_piece(idx)!r}")
        continue
      if idx in self.added_encoder.values():
        raise ValueError(f"tokenizer: two added tokens share id {idx}")
      self.added_encoder[content] = idx
    expected = list(range(self.sp_size, self.sp_size + len(self.added_encoder)))
    if sorted(self.added_encoder.values()) != expected:
      raise ValueError(f"tokenizer: added-token ids {sorted(self.added_encoder.values())} are not "
                       f"contiguous from the SentencePiece size {self.sp_size}")
    self.added_decoder = {v: k for k, v in self.added_encoder.items()}

    # Strip flags: AddedToken dicts carry their own; plain strings strip both sides, except the
    # four LLaMA special tokens, which `LlamaTokenizer.__init__` wraps as non-stripping AddedTokens.
    flags: dict[str, tuple[bool, bool]] = {}
    self.special_token_strings: dict[str, str] = {}
    for key in _SPECIAL_KEYS:
      value = special_tokens.get(key)
      content = _token_content(value)
      if content is None:
        continue
      self.special_token_strings[key] = content
      if isinstance(value, dict):
        flags[content] = (bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
      else:
        flags.setdefault(content, (False, False))
    self.additional_special_tokens = []
    for value in additional_special_tokens:
      content = _token_content(value)
      self.additional_special_tokens.append(content)
      if isinstance(value, dict):
        flags[content] = (bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
    # `all_special_tokens` of HF: the named special tokens then the additional ones, deduplicated.
    self.all_special_tokens = list(dict.fromkeys(
        list(self.special_token_strings.values()) + self.additional_special_tokens))

    self.no_split: dict[str, NoSplitToken] = {}
    for content in list(self.added_encoder) + self.all_special_tokens:
      lstrip, rstrip = flags.get(content, (True, True))
      self.no_split[content] = NoSplitToken(content, self.token_to_id(content), lstrip, rstrip)
    # Longest first, so that among matches starting at one position the longest wins.
    alternatives = sorted(self.no_split, key=len, reverse=True)
    self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, directory: str) -> "LlamaSlowTokenizer":
    """Reads `tokenizer.model` and the HF side files of a checkpoint directory.

    Files: `tokenizer.model` (required); `added_tokens.json` ({content: id}, as transformers 4.x
    writes it); `tokenizer_config.json` (`add_bos_token`, `add_eos_token`,
    `clean_up_tokenization_spaces`, special tokens, and from transformers >= 4.34 an
    `added_tokens_decoder` {id: {"content": ...}}); `special_tokens_map.json` (overrides the
    special tokens of the config, as `from_pretrained` does).
    """
    model_path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer: no SentencePiece model at {model_path}")
    sp = spm.SentencePieceProcessor(model_file=model_path)
    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
    added_json = _read_json(os.path.join(directory, "added_tokens.json")) or {}

    added: dict[str, int] = {}
    for content, idx in added_json.items():
      added[content] = int(idx)
    for idx, entry in (config.get("added_tokens_decoder") or {}).items():
      idx = int(idx)
      content = _token_content(entry)
      if idx < sp.get_piece_size():
        continue  # <unk>, <s>, </s> are listed here too by newer transformers
      if content in added and added[content] != idx:
        raise ValueError(f"tokenizer: {directory}: added token {content!r} has id {added[content]} "
                         f"in added_tokens.json but {idx} in tokenizer_config.json")
      added[content] = idx

    special = {k: config.get(k) for k in _SPECIAL_KEYS if config.get(k) is not None}
    for k in _SPECIAL_KEYS:
      if special_map.get(k) is not None:
        special[k] = special_map[k]
    additional = special_map.get("additional_special_tokens",
                                 config.get("additional_special_tokens")) or []
    return cls(sp, added, special, additional,
               add_bos_token=config.get("add_bos_token", True),
               add_eos_token=config.get("add_eos_token", False),
               clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False))

  # ----------------------------------------------------------------------------------------------
  def __len__(self) -> int:
    return self.sp_size + len(self.added_encoder)

  def _special_id(self, key: str) -> int | None:
    content = self.special_token_strings.get(key)
    return None if content is None else self.token_to_id(content)

  @property
  def bos_id(self) -> int:
    return self._special_id("bos_token")

  @property
  def eos_id(self) -> int:
    return self._special_id("eos_token")

  @property
  def unk_id(self) -> int:
    return self._special_id("unk_token")

  @property
  def pad_id(self) -> int:
    """GLaMM sets `pad_token = unk_token`; a checkpoint without a pad token falls back to unk."""
    pad = self._special_id("pad_token")
    return self.unk_id if pad is None else pad

  # ----------------------------------------------------------------------------------------------
  def _split(self, text: str) -> list[str]:
    """Text pieces and no-split tokens, with the neighbour stripping of step 2."""
    parts = self._split_re.split(text)
    # re.split with one group alternates text, token, text, ...; odd positions are tokens.
    for i in range(1, len(parts), 2):
      tok = self.no_split[parts[i]]
      if tok.rstrip and parts[i + 1]:
        parts[i + 1] = parts[i + 1].lstrip()
      if tok.lstrip and parts[i - 1]:
        parts[i - 1] = parts[i - 1].rstrip()
    return parts

  def tokenize(self, text: str) -> list[str]:
    """Pieces as the slow tokenizer's `tokenize` returns them (no BOS/EOS)."""
    pieces: list[str] = []
    for i, part in enumerate(self._split(text)):
      if not part:
        continue
      if i % 2:
        pieces.append(part)
      else:
        pieces.extend(self.sp.encode(part, out_type=str))
    return pieces

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer(text).input_ids` of the slow tokenizer."""
    ids: list[int] = []
    for i, part in enumerate(self._split(text)):
      if not part:
        continue
      if i % 2:
        ids.append(self.no_split[part].id)
      else:
        ids.extend(self.sp.encode(part))
    if add_special_tokens:
      if self.add_bos_token:
        ids = [self.bos_id] + ids
      if self.add_eos_token:
        ids = ids + [self.eos_id]
    return ids

  # ----------------------------------------------------------------------------------------------
  def _pieces_to_string(self, pieces: Sequence[str]) -> str:
    """4.28 `LlamaTokenizer.convert_tokens_to_string`: special tokens are not fed to SentencePiece."""
    out = ""
    run: list[str] = []
    prev_is_special = False
    for i, piece in enumerate(pieces):
      if piece in self.all_special_tokens:
        if not prev_is_special and i != 0:
          out += " "
        out += self.sp.decode_pieces(run) + piece
        prev_is_special = True
        run = []
      else:
        run.append(piece)
        prev_is_special = False
    return out + self.sp.decode_pieces(run)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
             spaces_between_special_tokens: bool = True,
             clean_up_tokenization_spaces: bool | None = None) -> str:
    """`tokenizer.decode(ids, ...)` of the slow tokenizer. GLaMM uses the defaults."""
    special_ids = {self.token_to_id(t) for t in self.all_special_tokens}
    pieces = [self.id_to_token(i) for i in ids if not (skip_special_tokens and int(i) in special_ids)]
    sub_texts: list[str] = []
    run: list[str] = []
    for piece in pieces:
      if piece in self.added_encoder:
        if run:
          sub_texts.append(self._pieces_to_string(run))
          run = []
        sub_texts.append(piece)
      else:
        run.append(piece)
    if run:
      sub_texts.append(self._pieces_to_string(run))
    text = (" " if spaces_between_special_tokens else "").join(sub_texts)
    if clean_up_tokenization_spaces is None:
      clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
    if clean_up_tokenization_spaces:
      for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def load_tokenizer(directory: str) -> LlamaSlowTokenizer:
  """The GLaMM tokenizer of a checkpoint directory (see `LlamaSlowTokenizer.from_pretrained`)."""
  return LlamaSlowTokenizer.from_pretrained(directory)


def seg_token_id(tokenizer: LlamaSlowTokenizer) -> int:
  """The [SEG] id the way `infer.py` gets it: first id of tokenising "[SEG]" without BOS."""
  ids = tokenizer.encode("[SEG]", add_special_tokens=False)
  if not ids or tokenizer.id_to_token(ids[0]) != "[SEG]":
    raise ValueError(f"tokenizer: '[SEG]' is not an added token (it tokenises to {ids})")
  return ids[0]
