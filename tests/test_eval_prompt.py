"""eval/prompt.py: the exact GCG prompt string, `tokenizer_image_token`, and the expanded input."""

import numpy as np
import pytest

from _eval_helpers import hf_reference_tokenizer, train_sp_model, write_glamm_tokenizer_dir
from eval.prompt import (IMAGE_TOKEN_INDEX, build_gcg_prompt, choose_bucket, expand_image_tokens,
                         gcg_prompt_text, tokenize_with_image)
from eval.tokenizer import load_tokenizer

# Written out by hand from conv_llava_v1 and infer.py (five spaces after "interleaved").
EXPECTED_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: The "
    "<im_start><image><im_end> provides an overview of the picture.\nCould you please give me a "
    "detailed description of the image? Please respond with interleaved     segmentation masks "
    "for the corresponding parts of the answer. ASSISTANT:")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  spm_path = train_sp_model(str(tmp_path_factory.mktemp("spm") / "m"))
  d = tmp_path_factory.mktemp("glamm_tok")
  write_glamm_tokenizer_dir(str(d), spm_path)
  ref = hf_reference_tokenizer(str(tmp_path_factory.mktemp("hf_tok")), spm_path)
  return load_tokenizer(str(d)), ref


def test_prompt_text_is_exact():
  assert gcg_prompt_text() == EXPECTED_PROMPT
  assert "interleaved     segmentation" in gcg_prompt_text()
  with pytest.raises(ValueError, match="bleach"):
    gcg_prompt_text("a & b")


def test_tokenize_with_image_matches_reference_procedure(toks):
  tok, ref = toks
  a, b = EXPECTED_PROMPT.split("<image>")
  # tokenizer_image_token: BOS of the first chunk only, one -200 between the chunks.
  expected = ref(a).input_ids + [IMAGE_TOKEN_INDEX] + ref(b).input_ids[1:]
  ids = tokenize_with_image(EXPECTED_PROMPT, tok)
  assert ids == expected
  assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
  k = ids.index(IMAGE_TOKEN_INDEX)
  assert ids[k - 1] == tok.token_to_id("<im_start>") and ids[k + 1] == tok.token_to_id("<im_end>")


def test_expanded_prompt_layout(toks):
  tok, _ = toks
  ids = tokenize_with_image(EXPECTED_PROMPT, tok)
  k = ids.index(IMAGE_TOKEN_INDEX)
  n = 576
  p = build_gcg_prompt(tok, num_visual_tokens=n)
  t = len(ids) - 1 + n
  assert p.length == t and p.image_start == k
  assert p.ids.shape == p.visual_mask.shape == p.valid.shape == (choose_bucket(t),)
  assert p.ids.dtype == np.int32
  assert p.visual_mask.sum() == n and p.visual_mask[k:k + n].all()
  assert p.valid.sum() == t and p.valid[:t].all()
  # Text ids before the image, after it shifted by n - 1, fill (pad = unk = 0) elsewhere.
  np.testing.assert_array_equal(p.ids[:k], ids[:k])
  np.testing.assert_array_equal(p.ids[k + n:t], ids[k + 1:])
  assert (p.ids[k:k + n] == 0).all() and (p.ids[t:] == 0).all()
  assert p.ids[k - 1] == tok.token_to_id("<im_start>") and p.ids[k + n] == tok.token_to_id("<im_end>")
  unpadded = build_gcg_prompt(tok, num_visual_tokens=n, buckets=None)
  assert unpadded.ids.shape == (t,)
  np.testing.assert_array_equal(unpadded.ids, p.ids[:t])


def test_buckets_and_errors():
  assert choose_bucket(256) == 256 and choose_bucket(257) == 512 and choose_bucket(700) == 768
  with pytest.raises(ValueError, match="largest bucket"):
    choose_bucket(1025)
  with pytest.raises(ValueError, match="exactly one image placeholder"):
    expand_image_tokens([1, 5, 6])
  with pytest.raises(ValueError, match="found 2"):
    expand_image_tokens([1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX])
  p = expand_image_tokens([1, 7, IMAGE_TOKEN_INDEX, 8], num_visual_tokens=3, fill_id=9,
                          buckets=(8,))
  np.testing.assert_array_equal(p.ids, [1, 7, 9, 9, 9, 8, 9, 9])
  np.testing.assert_array_equal(p.visual_mask, [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(p.valid, [1, 1, 1, 1, 1, 1, 0, 0])
