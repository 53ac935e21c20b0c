"""InternLM2-chat-7B's slow tokenizer with OMG-LLaVA's added tokens, in pure sentencepiece.

OMG-LLaVA loads `AutoTokenizer.from_pretrained(internlm2-chat-7b, trust_remote_code=True)` (the
remote `InternLM2Tokenizer`, transformers 4.36) and then, in `OMG_LLaVA._add_special_tokens`, calls
`add_tokens(["[SEG]", "<p>", "</p>", "<region>"], special_tokens=True)`, resizes the embeddings,
and adds `<mark>` the same way (omg_llava.md §1.6). This module reproduces that tokenizer.

Vocabulary. `tokenizer.model` has 92544 pieces. The chat tokens are *not* pieces of it: ids
92538..92543 hold placeholder pieces that `tokenizer_config.json`'s `added_tokens_decoder` renames
(`<|im_end|>` = 92542, `<|im_start|>` = 92543, ...). `add_tokens` gives a new token the id
`len(get_vocab())` = 92544 onwards, so `[SEG]`, `<p>`, `</p>`, `<region>`, `<mark>` = 92544..92548.

Encoding (4.36 `PreTrainedTokenizer.tokenize` + `InternLM2Tokenizer._tokenize`):
  1. Split the text on every added or special token (leftmost match, longest first).
  2. Strip whitespace next to a token only as its AddedToken `lstrip`/`rstrip` flags say. All the
     tokens involved here have both flags False (`add_tokens` of a string and the config entries),
     so nothing is stripped -- unlike GLaMM's transformers 4.28 (eval/tokenizer.py).
  3. Encode each remaining text piece separately with SentencePiece, which adds its dummy prefix
     to every piece when the model's normalizer says so.
  4. `encode(..., add_special_tokens=True)` prepends BOS = `sp.bos_id()` (the remote class takes
     BOS/EOS ids from the SentencePiece model, not from the config strings).

Decoding (4.36 `PreTrainedTokenizer._decode` + `InternLM2Tokenizer.convert_tokens_to_string`):
  ids -> tokens (added tokens by their content). "Legacy" added tokens -- added tokens that are
  not special, plus special ones with an id >= the SentencePiece size (the five OMG tokens) --
  are sub-texts of their own; runs of other tokens are converted by `convert_tokens_to_string`:
  every special token inside a run (`<s>`, `</s>`, `<|im_end|>`, ...) is emitted literally, and
  the text before it gets one leading space unless the previous token was special too; the run's
  result always goes through `clean_up_tokenization` (" ." -> "." etc.; the remote class calls it
  unconditionally); its `_maybe_add_prefix_space` prepends a space that the final `[1:]` removes
  again (it tests a token *string* against a set of *ids*, so it always prepends). Sub-texts are
  joined with " " (`spaces_between_special_tokens=True`). The final clean-up pass of `_decode`
  follows `clean_up_tokenization_spaces` (False in the InternLM2 config).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

from eval.tokenizer import AddedVocabLookup, _CLEAN_UP, _read_json, _token_content

IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SEG_TOKEN = "[SEG]"
# `_add_special_tokens`: these four first, then (after the embedding resize) `<mark>`.
OMG_ADDED_TOKENS = ("[SEG]", "<p>", "</p>", "<region>")
OMG_POINT_TOKEN = "<mark>"
OMG_TOKENS = OMG_ADDED_TOKENS + (OMG_POINT_TOKEN,)
# EXPECTED with the real 92544-piece model (omg_llava.md §1.6); `check_token_ids` verifies them.
INTERNLM2_VOCAB = 92544
EXPECTED_IDS = {"<|im_end|>": 92542, "<|im_start|>": 92543, "[SEG]": 92544, "<p>": 92545,
                "</p>": 92546, "<region>": 92547, "<mark>": 92548, "<s>": 1, "</s>": 2}

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _clean_up(text: str) -> str:
  for old, new in _CLEAN_UP:
    text = text.replace(old, new)
  return text


class InternLM2SlowTokenizer(AddedVocabLookup):
  """transformers-4.36 remote `InternLM2Tokenizer` behaviour on top of a SentencePiece model.

  Args:
    sp_model: the loaded `tokenizer.model`.
    added: content -> (id, lstrip, rstrip) of added tokens; an id below the SentencePiece size
      renames that piece (InternLM2's chat tokens).
    special_tokens: "bos_token"/"eos_token"/"unk_token"/"pad_token" -> content.
    additional_special_tokens: contents (`additional_special_tokens` of the config).
  """

  def __init__(self, sp_model: spm.SentencePieceProcessor,
               added: Mapping[str, tuple[int, bool, bool]],
               special_tokens: Mapping[str, str] | None = None,
               additional_special_tokens: Sequence[str] = (), add_bos_token: bool = True,
               add_eos_token: bool = False, clean_up_tokenization_spaces: bool = False):
    self.sp = sp_model
    self.sp_size = sp_model.get_piece_size()
    self.add_bos_token = bool(add_bos_token)
    self.add_eos_token = bool(add_eos_token)
    self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    special.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    self.special_token_strings = special
    self.additional_special_tokens = list(dict.fromkeys(additional_special_tokens))
    self.added_encoder: dict[str, int] = {}
    self._flags: dict[str, tuple[bool, bool]] = {}
    for content, (idx, lstrip, rstrip) in sorted(added.items(), key=lambda kv: kv[1][0]):
      self._register(content, int(idx), lstrip, rstrip)
    # 4.36 registers the named special tokens as added tokens at their vocabulary ids.
    for content in special.values():
      idx = self.sp.piece_to_id(content)
      if content not in self.added_encoder and self.sp.id_to_piece(idx) == content:
        self._register(content, idx, False, False)
    self._rebuild()

  def _register(self, content: str, idx: int, lstrip: bool = False, rstrip: bool = False):
    if not 0 <= idx:
      raise ValueError(f"tokenizer: added token {content!r} has a negative id {idx}")
    owner = self.added_decoder_of(idx)
    if owner is not None and owner != content:
      raise ValueError(f"tokenizer: tokens {owner!r} and {content!r} share id {idx}")
    self.added_encoder[content] = idx
    self._flags[content] = (bool(lstrip), bool(rstrip))

  def added_decoder_of(self, idx: int) -> str | None:
    for content, i in self.added_encoder.items():
      if i == idx:
        return content
    return None

  def _rebuild(self):
    self.added_decoder = {i: t for t, i in self.added_encoder.items()}
    self.all_special_tokens = list(dict.fromkeys(
        list(self.special_token_strings.values()) + self.additional_special_tokens))
    special = set(self.all_special_tokens)
    self.legacy_added = ({t for t in self.added_encoder if t not in special}
                         | {t for t in self.additional_special_tokens
                            if self.token_to_id(t) >= self.sp_size})
    alternatives = sorted(set(self.added_encoder) | special, key=len, reverse=True)
    self._split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

  # ----------------------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, directory: str) -> "InternLM2SlowTokenizer":
    """`tokenizer.model` plus `tokenizer_config.json` (`added_tokens_decoder`, special tokens,
    `add_bos_token`, ...), `added_tokens.json` ({content: id}) and `special_tokens_map.json`
    (overrides the config's special tokens, as `from_pretrained` does)."""
    model_path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer: no SentencePiece model at {model_path}")
    sp = spm.SentencePieceProcessor(model_file=model_path)
    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
    added_json = _read_json(os.path.join(directory, "added_tokens.json")) or {}
    added: dict[str, tuple[int, bool, bool]] = {t: (int(i), False, False)
                                                for t, i in added_json.items()}
    for idx, entry in (config.get("added_tokens_decoder") or {}).items():
      content = _token_content(entry)
      if content in added and added[content][0] != int(idx):
        raise ValueError(f"tokenizer: {directory}: {content!r} has id {added[content][0]} in "
                         f"added_tokens.json but {idx} in tokenizer_config.json")
      added[content] = (int(idx), bool(entry.get("lstrip", False)),
                        bool(entry.get("rstrip", False)))
    special = {k: _token_content(config.get(k)) for k in _SPECIAL_KEYS if config.get(k)}
    special.update({k: _token_content(special_map[k]) for k in _SPECIAL_KEYS if special_map.get(k)})
    additional = special_map.get("additional_special_tokens",
                                 config.get("additional_special_tokens")) or []
    return cls(sp, added, special, [_token_content(t) for t in additional],
               add_bos_token=config.get("add_bos_token", True),
               add_eos_token=config.get("add_eos_token", False),
               clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False))

  def add_tokens(self, tokens: Sequence[str], special_tokens: bool = True) -> int:
    """`tokenizer.add_tokens(tokens, special_tokens=...)`: new ids from `len(self)`, no stripping;
    special ones join `additional_special_tokens`. Returns how many were new."""
    count = 0
    for content in tokens:
      if not content or content in self.added_encoder:
        continue
      idx = self.sp.piece_to_id(content)
      if not (idx < self.sp_size and self.sp.id_to_piece(idx) == content
              and idx not in self.added_decoder):
        idx = len(self)  # not already a piece of the vocabulary: a new id
        count += 1
      self._register(content, idx, False, False)
      if special_tokens and content not in self.all_special_tokens:
        self.additional_special_tokens.append(content)
      self._rebuild()
    return count

  # ----------------------------------------------------------------------------------------------
  def __len__(self) -> int:
    """`len(get_vocab())`: the SentencePiece pieces (renamed ones counted once) plus new tokens."""
    return self.sp_size + sum(1 for i in self.added_encoder.values() if i >= self.sp_size)

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  # ----------------------------------------------------------------------------------------------
  def _split(self, text: str) -> list[str]:
    parts = self._split_re.split(text)  # text, token, text, token, ..., text
    for i in range(1, len(parts), 2):
      lstrip, rstrip = self._flags.get(parts[i], (False, False))
      if rstrip and parts[i + 1]:
        parts[i + 1] = parts[i + 1].lstrip()
      if lstrip and parts[i - 1]:
        parts[i - 1] = parts[i - 1].rstrip()
    return parts

  def tokenize(self, text: str) -> list[str]:
    out: list[str] = []
    for i, part in enumerate(self._split(text)):
      if part:
        out.extend([part] if i % 2 else self.sp.encode(part, out_type=str))
    return out

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=...)`."""
    ids: list[int] = []
    for i, part in enumerate(self._split(text)):
      if part:
        ids.extend([self.token_to_id(part)] if i % 2 else self.sp.encode(part))
    if add_special_tokens:
      ids = ([self.bos_id] if self.add_bos_token else []) + ids
      ids = ids + ([self.eos_id] if self.add_eos_token else [])
    return ids

  # ----------------------------------------------------------------------------------------------
  def _tokens_to_string(self, tokens: Sequence[str]) -> str:
    """`InternLM2Tokenizer.convert_tokens_to_string` (its prefix-space round trip is a no-op)."""
    out, run, prev_special = "", [], False
    for tok in tokens:
      if tok in self.all_special_tokens:
        out += ("" if prev_special else " ") + self.sp.decode_pieces(run) + tok
        run, prev_special = [], True
      else:
        run.append(tok)
        prev_special = False
    return _clean_up(out + self.sp.decode_pieces(run))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
             spaces_between_special_tokens: bool = True,
             clean_up_tokenization_spaces: bool | None = None) -> str:
    """`tokenizer.decode(ids, ...)`; OMG-LLaVA uses the defaults (special tokens kept)."""
    special_ids = {self.token_to_id(t) for t in self.all_special_tokens}
    tokens = [self.id_to_token(i) for i in ids
              if not (skip_special_tokens and int(i) in special_ids)]
    sub_texts: list[str] = []
    run: list[str] = []
    for tok in tokens:
      if tok in self.legacy_added:
        if run:
          text = self._tokens_to_string(run)
          if text:
            sub_texts.append(text)
          run = []
        sub_texts.append(tok)
      else:
        run.append(tok)
    if run:
      sub_texts.append(self._tokens_to_string(run))
    text = (" " if spaces_between_special_tokens else "").join(sub_texts)
    if clean_up_tokenization_spaces is None:
      clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
    return _clean_up(text) if clean_up_tokenization_spaces else text


# --------------------------------------------------------------------------------------------------
_FILES = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")


def load_omg_llava_tokenizer(directory: str, add_missing: bool = False) -> InternLM2SlowTokenizer:
  """OMG-LLaVA's tokenizer from the checkpoint's `internlm2-chat-7b/` directory.

  The chat tokens must be listed in the directory's files. The five OMG tokens are read from the
  files too; a stock `internlm2-chat-7b/` does not list them because OMG-LLaVA adds them at run
  time, so `add_missing=True` adds the missing ones exactly as `OMG_LLaVA._add_special_tokens`
  does (in its order, ids from `len(tokenizer)`). Raises naming the files and the token otherwise.
  Then `check_token_ids` runs.
  """
  tok = InternLM2SlowTokenizer.from_pretrained(directory)
  files = " / ".join(os.path.join(directory, f) for f in _FILES)
  for content in (IM_START_TOKEN, IM_END_TOKEN):
    if content not in tok.added_encoder:
      raise ValueError(f"tokenizer: chat token {content!r} is not listed in {files} "
                       "(expected in tokenizer_config.json's added_tokens_decoder)")
  missing = [t for t in OMG_TOKENS if t not in tok.added_encoder]
  if missing and not add_missing:
    raise ValueError(f"tokenizer: OMG-LLaVA token {missing[0]!r} is not listed in {files}; "
                     "OMG-LLaVA adds it at run time (OMG_LLaVA._add_special_tokens): pass "
                     "add_missing=True to add it the same way")
  tok.add_tokens([t for t in OMG_ADDED_TOKENS if t in missing], special_tokens=True)
  tok.add_tokens([t for t in (OMG_POINT_TOKEN,) if t in missing], special_tokens=True)
  check_token_ids(tok)
  return tok


def token_id(tok: InternLM2SlowTokenizer, content: str) -> int:
  """The id the reference reads: `tokenizer(content, add_special_tokens=False).input_ids[0]`,
  required to be the single added token."""
  ids = tok.encode(content, add_special_tokens=False)
  if len(ids) != 1 or tok.id_to_token(ids[0]) != content:
    raise ValueError(f"tokenizer: {content!r} is not an added token (it tokenises to {ids})")
  return ids[0]


def check_token_ids(tok: InternLM2SlowTokenizer) -> dict[str, int]:
  """Ids of the chat and OMG tokens. The OMG tokens must continue the SentencePiece vocabulary in
  `_add_special_tokens` order (the checkpoint's embedding rows depend on it); with the real
  92544-piece model every id must equal `EXPECTED_IDS`."""
  ids = {t: token_id(tok, t) for t in (IM_END_TOKEN, IM_START_TOKEN) + OMG_TOKENS}
  ids["<s>"], ids["</s>"] = tok.bos_id, tok.eos_id
  got = [ids[t] for t in OMG_TOKENS]
  if got != list(range(tok.sp_size, tok.sp_size + len(OMG_TOKENS))):
    raise ValueError(f"tokenizer: OMG tokens {OMG_TOKENS} have ids {got}; expected consecutive "
                     f"ids from the SentencePiece size {tok.sp_size}")
  if tok.sp_size == INTERNLM2_VOCAB:
    wrong = {t: (ids[t], e) for t, e in EXPECTED_IDS.items() if ids[t] != e}
    if wrong:
      raise ValueError(f"tokenizer: ids differ from InternLM2-chat-7B's (got, expected): {wrong}")
  return ids
