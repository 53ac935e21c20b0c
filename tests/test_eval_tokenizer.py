"""eval/tokenizer.py against transformers' LlamaTokenizer and hand-derived 4.28 decode strings."""

import os

import hypothesis
import hypothesis.strategies as st
import pytest
import sentencepiece as spm

from _eval_helpers import (SP_VOCAB, hf_reference_tokenizer, train_sp_model,
                           write_glamm_tokenizer_dir)
from eval.gcg_output import decode_gcg_output, parse_gcg_text
from eval.prompt import IMAGE_TOKEN_INDEX, gcg_prompt_text
from eval.tokenizer import GLAMM_ADDED_TOKENS, LlamaSlowTokenizer, load_tokenizer, seg_token_id


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  return train_sp_model(str(tmp_path_factory.mktemp("spm") / "m"))


@pytest.fixture(scope="module")
def tok(spm_path, tmp_path_factory):
  d = tmp_path_factory.mktemp("glamm_tok")
  write_glamm_tokenizer_dir(str(d), spm_path)
  return load_tokenizer(str(d))


@pytest.fixture(scope="module")
def ref(spm_path, tmp_path_factory):
  return hf_reference_tokenizer(str(tmp_path_factory.mktemp("hf_tok")), spm_path)


@pytest.fixture(scope="module")
def sp(spm_path):
  return spm.SentencePieceProcessor(model_file=spm_path)


def test_added_token_ids_follow_the_sentencepiece_vocabulary(tok):
  assert [tok.token_to_id(t) for t in GLAMM_ADDED_TOKENS] == list(range(SP_VOCAB, SP_VOCAB + 7))
  assert len(tok) == SP_VOCAB + 7
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
  assert seg_token_id(tok) == SP_VOCAB + 4


def test_both_checkpoint_layouts_give_the_same_tokenizer(spm_path, tmp_path, tok):
  write_glamm_tokenizer_dir(str(tmp_path / "new"), spm_path, layout="decoder")
  other = load_tokenizer(str(tmp_path / "new"))
  text = "<p> a man </p> [SEG] and <im_start>x<im_end>"
  assert other.encode(text) == tok.encode(text)
  assert other.added_encoder == tok.added_encoder


def test_gcg_prompt_chunks_match_transformers(tok, ref):
  prompt = gcg_prompt_text()
  for chunk in prompt.split("<image>"):
    assert tok.encode(chunk) == ref(chunk).input_ids, chunk
  # The second chunk starts with <im_end>, followed by "▁provides..." (legacy prefix).
  second = tok.encode(prompt.split("<image>")[1])
  assert second[:2] == [1, tok.token_to_id("<im_end>")]
  assert tok.id_to_token(second[2]).startswith("\u2581")


_FRAGMENTS = ["a", "man", "The", "red car", "<p>", "</p>", "[SEG]", "<im_start>", "<im_end>",
              "<bbox>", "<point>", " ", "  ", "\n", " \n ", ".", ",", "don't", "caf\u00e9",
              "\u65e5\u672c", "123", "<s>", "</s>", "<unk>", "<p", "SEG]", "\t"]


@hypothesis.settings(max_examples=40)
@hypothesis.given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12))
def test_encode_matches_transformers_on_gcg_like_text(tok, ref, parts):
  text = "".join(parts)
  # transformers' Metaspace does not add a second "▁" to a piece that already starts with
  # whitespace, SentencePiece (and so the 4.28 slow tokenizer) does; such pieces can only occur at
  # the start of the text or right after <s>/</s>/<unk> (which strip nothing). They are checked
  # against SentencePiece directly in the next test.
  for special in ("", "<s>", "</s>", "<unk>"):
    for piece in text.split(special)[1:] if special else [text]:
      hypothesis.assume(not piece[:1].isspace())
  assert tok.encode(text) == ref(text).input_ids


def test_leading_whitespace_pieces_follow_sentencepiece(tok, sp):
  assert tok.encode(" a b") == [1] + sp.encode(" a b")
  assert tok.encode("x<s> y") == [1] + sp.encode("x") + [1] + sp.encode(" y")
  # Added tokens strip both neighbours: the whitespace never reaches SentencePiece.
  assert tok.encode("x \n <p>  y") == [1] + sp.encode("x") + [SP_VOCAB + 5] + sp.encode("y")
  assert tok.encode("[SEG]", add_special_tokens=False) == [SP_VOCAB + 4]


def test_decode_of_plain_text_matches_transformers_and_sentencepiece(tok, ref, sp):
  for text in ["a man wearing a red shirt.", "Two people\nsit  on a bench", "caf\u00e9 \u65e5\u672c"]:
    ids = sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == ref.decode(ids) == text


def test_decode_joins_added_and_special_tokens_like_transformers_4_28(tok, sp):
  def enc(s):
    ids = sp.encode(s)
    assert sp.decode(ids) == s
    return ids
  p, q, seg = (tok.token_to_id(t) for t in ("<p>", "</p>", "[SEG]"))
  ids = [1] + enc("A chat") + [p] + enc("a man") + [q, seg] + enc("and a tree.") + [2]
  # Sub-texts joined by " "; </s> inside a sub-text gets one leading space; <s> first does not.
  assert tok.decode(ids) == "<s>A chat <p> a man </p> [SEG]  and a tree.</s>"
  assert tok.decode(ids, skip_special_tokens=True) == "A chat <p> a man </p> [SEG] and a tree."
  assert tok.decode([seg] + enc("x , y")) == "[SEG] x , y"
  assert tok.decode([seg] + enc("x , y"), clean_up_tokenization_spaces=True) == "[SEG] x, y"
  with pytest.raises(ValueError, match="-200"):
    tok.decode([1, IMAGE_TOKEN_INDEX])


def test_generated_output_round_trip_to_caption_and_phrases(tok):
  prompt = gcg_prompt_text()
  answer = ("<p> A man </p> [SEG] is standing next to <p> a red car </p> [SEG] on the road."
            "</s>")
  a, b = prompt.split("<image>")
  ids = tok.encode(a) + [IMAGE_TOKEN_INDEX] + tok.encode(b)[1:] + tok.encode(answer)[1:]
  caption, phrases = decode_gcg_output(ids, tok)
  assert phrases == ["A man", "a red car"]
  assert caption == "A man is standing next to a red car on the road."


def test_parse_gcg_text_quirks():
  text = "<s>x ASSISTANT: y ASSISTANT: 'The <p>  big dog </p> [SEG]   sits.'\n</s>"
  caption, phrases = parse_gcg_text(text)
  # Only the last "ASSISTANT: " counts; quotes stripped from both ends; tags and [SEG] removed.
  assert phrases == ["big dog"]
  assert caption == "The big dog sits."


def test_errors_name_the_problem(tmp_path, spm_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    load_tokenizer(str(tmp_path))
  sp_model = spm.SentencePieceProcessor(model_file=spm_path)
  with pytest.raises(ValueError, match="contiguous"):
    LlamaSlowTokenizer(sp_model, {"[SEG]": SP_VOCAB + 3})
  with pytest.raises(ValueError, match="not an added token"):
    seg_token_id(LlamaSlowTokenizer(sp_model, {}))
  assert os.path.exists(spm_path)
