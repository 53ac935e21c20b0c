"""eval/omg_llava_{tokenizer,inputs,image}.py: OMG-LLaVA's InternLM2 tokenizer and prompt against
transformers' sentencepiece tokenizer and a `tokenizers` pipeline built like the remote
InternLM2TokenizerFast; decode strings derived by hand from transformers 4.36 + the remote
`convert_tokens_to_string`; preprocessing against PIL + HF's CLIP image processor on scikit-image
photos; mask post-processing against torch `F.interpolate`; caption parsing and the retry rule."""

import json
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import sentencepiece as spm
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from _eval_helpers import import_transformers, train_internlm2_sp_model
from eval.omg_llava_image import (IMAGE_MEAN, IMAGE_STD, PAD_COLOR, expand2square, load_image,
                                  masks_to_image, preprocess, resize_mask_logits, to_rgb)
from eval.omg_llava_inputs import (GCG_QUESTIONS, NUM_PIXEL_TOKENS, build_prompt, choose_answer,
                                   parse_answer, parse_text, prompt_text, seg_positions,
                                   should_stop, stack_prompts, stop_ids, tokenize_prompt)
from eval.omg_llava_tokenizer import (OMG_TOKENS, InternLM2SlowTokenizer, check_token_ids,
                                      load_omg_llava_tokenizer, token_id)
from eval.prompt import IMAGE_TOKEN_INDEX
from eval.tokenizer import LlamaSlowTokenizer

# The tiny model mimics InternLM2's layout: V-2 / V-1 are placeholder pieces that the config
# renames to <|im_end|> / <|im_start|> (92542 / 92543 for the real 92544-piece model), and the OMG
# tokens follow at V..V+4 (92544..92548).
V = 500
IM_END, IM_START = V - 2, V - 1
SEG, BOP, EOP, REGION, MARK = range(V, V + 5)


def _train(prefix: str, add_dummy_prefix: bool = True) -> str:
  return train_internlm2_sp_model(prefix, add_dummy_prefix)


def _entry(content):
  return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False, "special": True}


def _write_dir(directory, model_path, omg_tokens=False, chat_tokens=True):
  """internlm2-chat-7b's tokenizer files (tokenizer_config.json with `added_tokens_decoder`)."""
  os.makedirs(directory, exist_ok=True)
  with open(model_path, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
    dst.write(src.read())
  decoder = {"0": _entry("<unk>"), "1": _entry("<s>"), "2": _entry("</s>")}
  if chat_tokens:
    decoder.update({str(IM_END): _entry("<|im_end|>"), str(IM_START): _entry("<|im_start|>")})
  additional = ["<|im_start|>", "<|im_end|>"]
  if omg_tokens:
    decoder.update({str(V + i): _entry(t) for i, t in enumerate(OMG_TOKENS)})
    additional += list(OMG_TOKENS)
  config = {"added_tokens_decoder": decoder, "additional_special_tokens": additional,
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False,
            "tokenizer_class": "InternLM2Tokenizer"}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


def _hf_reference(model_path):
  """transformers' sentencepiece tokenizer set up like the remote InternLM2Tokenizer (legacy
  per-piece SentencePiece, BOS prepended, chat tokens renaming V-2/V-1), then OMG's add_tokens."""
  transformers = import_transformers()
  from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
  AddedToken = transformers.AddedToken
  ref = SentencePieceBackend(
      vocab_file=model_path, legacy=True, special_tokens_pattern="bos", bos_token="<s>",
      eos_token="</s>", unk_token="<unk>", pad_token="</s>",
      added_tokens_decoder={IM_END: AddedToken("<|im_end|>", special=True, normalized=False),
                            IM_START: AddedToken("<|im_start|>", special=True, normalized=False)},
      additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  ref.add_tokens(["[SEG]", "<p>", "</p>", "<region>"], special_tokens=True)
  ref.add_tokens(["<mark>"], special_tokens=True)
  return ref


def _fast_pipeline(model_path):
  """A `tokenizers` pipeline as the remote InternLM2Converter builds it (BPE with byte fallback,
  Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer), without post-processor."""
  from tokenizers import AddedToken, Tokenizer, normalizers
  from tokenizers.models import BPE
  import_transformers()
  from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
  vocab, _, merges = SentencePieceExtractor(model_path).extract()
  pieces = {i: p for p, i in vocab.items()}
  pieces[IM_END], pieces[IM_START] = "<|im_end|>", "<|im_start|>"
  fast = Tokenizer(BPE({p: i for i, p in pieces.items()}, merges, unk_token="<unk>",
                       fuse_unk=True, byte_fallback=True))
  fast.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                         normalizers.Replace(" ", "\u2581")])
  fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                           ("<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>") + OMG_TOKENS])
  return fast


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp("spm") / "m"))


@pytest.fixture(scope="module")
def tok(model_path, tmp_path_factory):
  return load_omg_llava_tokenizer(_write_dir(tmp_path_factory.mktemp("tok"), model_path),
                                  add_missing=True)


@pytest.fixture(scope="module")
def ref(model_path):
  return _hf_reference(model_path)


@pytest.fixture(scope="module")
def sp(model_path):
  return spm.SentencePieceProcessor(model_file=model_path)


# ------------------------------------------------------------------------------------------------
# Tokenizer.


def test_token_ids_match_transformers_add_tokens(tok, ref, tmp_path, model_path):
  ids = check_token_ids(tok)
  assert ids == {"<|im_end|>": IM_END, "<|im_start|>": IM_START, "[SEG]": SEG, "<p>": BOP,
                 "</p>": EOP, "<region>": REGION, "<mark>": MARK, "<s>": 1, "</s>": 2}
  for t in ("<|im_end|>", "<|im_start|>") + OMG_TOKENS:
    assert ids[t] == ref.convert_tokens_to_ids(t) == ref(t, add_special_tokens=False).input_ids[0]
  assert len(tok) == len(ref) == V + 5
  # The same ids when the checkpoint's files list the OMG tokens.
  listed = load_omg_llava_tokenizer(_write_dir(tmp_path / "listed", model_path, omg_tokens=True))
  assert check_token_ids(listed) == ids


def test_missing_tokens_raise_naming_file_and_token(tmp_path, model_path):
  with pytest.raises(ValueError, match=r"'\[SEG\]' is not listed in .*tokenizer_config.json.*"
                                       r"add_missing=True"):
    load_omg_llava_tokenizer(_write_dir(tmp_path / "a", model_path))
  with pytest.raises(ValueError, match=r"chat token '<\|im_start\|>' is not listed in .*"
                                       r"tokenizer_config.json"):
    load_omg_llava_tokenizer(_write_dir(tmp_path / "b", model_path, chat_tokens=False),
                             add_missing=True)
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    load_omg_llava_tokenizer(str(tmp_path))


@pytest.mark.parametrize("question", GCG_QUESTIONS)
def test_prompt_chunks_match_transformers_and_fast_pipeline(tok, ref, model_path, question):
  before, after = tokenize_prompt(tok, question)
  a, b = prompt_text(question).split("<image>")
  assert before == ref(a).input_ids
  assert after == ref(b, add_special_tokens=False).input_ids
  fast = _fast_pipeline(model_path)
  assert before == [1] + fast.encode(a, add_special_tokens=False).ids
  assert after == fast.encode(b, add_special_tokens=False).ids
  # <s> <|im_start|> "user\n" ... ; "\n" Q <|im_end|> "\n" <|im_start|> "assistant\n".
  assert before[:2] == [1, IM_START] and after.count(IM_END) == 1 and after.count(IM_START) == 1
  assert IMAGE_TOKEN_INDEX not in before + after


_FRAGMENTS = ["a", "man", "The", "red car", "<p>", "</p>", "[SEG]", "<region>", "<mark>",
              "<|im_start|>", "<|im_end|>", " ", "  ", "\n", " \n ", ".", " .", ",", "don't",
              "caf\u00e9", "\u65e5\u672c", "123", "<s>", "</s>", "<unk>", "<p", "SEG]", "\t",
              "user", "assistant"]


@hypothesis.settings(max_examples=60)
@hypothesis.given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12), st.booleans())
def test_encode_matches_transformers(tok, ref, parts, bos):
  text = "".join(parts)
  assert tok.encode(text, add_special_tokens=bos) == ref(text, add_special_tokens=bos).input_ids


def test_no_whitespace_stripping_around_added_tokens_unlike_glamm(tok, sp, model_path):
  # transformers >= 4.34 AddedTokens from add_tokens()/added_tokens_decoder strip nothing; GLaMM's
  # 4.28 plain-string tokens strip both neighbours.
  text = "x \n <p>  y"
  assert tok.encode(text, False) == sp.encode("x \n ") + [BOP] + sp.encode("  y")
  glamm = LlamaSlowTokenizer(sp, {"<p>": V})
  assert glamm.encode(text, False) == sp.encode("x") + [V] + sp.encode("y")


def test_dummy_prefix_follows_the_model(tmp_path):
  path = _train(str(tmp_path / "np"), add_dummy_prefix=False)
  tok = load_omg_llava_tokenizer(_write_dir(tmp_path / "d", path), add_missing=True)
  ref = _hf_reference(path)
  sp = spm.SentencePieceProcessor(model_file=path)
  for q in GCG_QUESTIONS[:2]:
    a, b = prompt_text(q).split("<image>")
    assert tok.encode(a) == ref(a).input_ids
    assert tok.encode(b, False) == ref(b, add_special_tokens=False).input_ids
  assert tok.encode("<p>man", False) == [BOP] + sp.encode("man")
  assert not sp.id_to_piece(sp.encode("man")[0]).startswith("\u2581")


def test_decode_plain_text_matches_sentencepiece_and_transformers(tok, ref, sp):
  ids = sp.encode("a man wearing a red shirt")
  assert tok.decode(ids) == sp.decode(ids) == ref.decode(ids) == "a man wearing a red shirt"
  # Byte-fallback pieces (transformers 5's sentencepiece decode just joins pieces, so only sp).
  for text in ["Two people\nsit  on a bench", "caf\u00e9 \u65e5\u672c"]:
    ids = sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


def _enc(sp, s):
  ids = sp.encode(s)
  assert sp.decode(ids) == s
  return ids


def test_decode_special_tokens_like_transformers_4_36_internlm2(tok, sp):
  # Legacy added tokens (the OMG ones) are sub-texts joined by " "; <|im_end|> / </s> are special
  # tokens inside a run: the text before them gets one leading space.
  gen = ([BOP] + _enc(sp, "A man") + [EOP, SEG] + _enc(sp, "is standing next to") + [BOP]
         + _enc(sp, "a red car") + [EOP, SEG] + _enc(sp, "on the road.") + [IM_END])
  text = "<p> A man </p> [SEG] is standing next to <p> a red car </p> [SEG]  on the road.<|im_end|>"
  assert tok.decode(gen) == text
  assert tok.decode(gen[:-1] + [2]) == text.replace("<|im_end|>", "</s>")
  assert tok.decode([1, IM_START] + _enc(sp, "user")) == " <s><|im_start|>user"
  assert tok.decode([IM_END, IM_END, SEG]) == " <|im_end|><|im_end|> [SEG]"
  assert tok.decode(gen, skip_special_tokens=True) == (
      "A man is standing next to a red car on the road.")
  with pytest.raises(ValueError, match="-200"):
    tok.decode([1, IMAGE_TOKEN_INDEX])


def test_decode_always_cleans_up_runs_unlike_glamm(tok, sp):
  # The remote convert_tokens_to_string calls clean_up_tokenization unconditionally.
  ids = _enc(sp, "a man , a dog .")
  assert sp.decode(ids) == "a man , a dog ."
  assert tok.decode(ids) == "a man, a dog."
  assert LlamaSlowTokenizer(sp, {}).decode(ids) == "a man , a dog ."
  # ...but not across sub-texts (the final pass follows clean_up_tokenization_spaces=False).
  assert tok.decode([SEG] + _enc(sp, ".")) == "[SEG] ."


def test_token_id_errors(sp):
  bare = InternLM2SlowTokenizer(sp, {})
  with pytest.raises(ValueError, match="not an added token"):
    token_id(bare, "[SEG]")
  with pytest.raises(ValueError, match="consecutive"):
    check_token_ids(InternLM2SlowTokenizer(sp, {"<|im_end|>": (IM_END, False, False),
                                                "<|im_start|>": (IM_START, False, False),
                                                **{t: (V + 5 - i, False, False)
                                                   for i, t in enumerate(OMG_TOKENS)}}))


# ------------------------------------------------------------------------------------------------
# Prompt, layout, questions, generation rules, parsing.

# From omg_llava.md §3.2 (the script's GCG_QUESTIONS).
SPEC_QUESTIONS = [
    "Could you please give me a detailed description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer.",  # noqa: E501
    "Can you provide a thorough description of the this image? Please output with interleaved segmentation masks for the corresponding phrases.",  # noqa: E501
    "Please describe in detail the contents of the image. Please respond with interleaved segmentation masks for the corresponding parts of the answer.",  # noqa: E501
    "Could you give a comprehensive explanation of what can be found within this picture? Please output with interleaved segmentation masks for the corresponding phrases.",  # noqa: E501
    "Could you give me an elaborate explanation of this picture? Please respond with interleaved segmentation masks for the corresponding phrases.",  # noqa: E501
    "Could you provide me with a detailed analysis of this photo? Please output with interleaved segmentation masks for the corresponding parts of the answer.",  # noqa: E501
]


def test_prompt_text_and_questions_are_exact():
  assert list(GCG_QUESTIONS) == SPEC_QUESTIONS
  assert prompt_text(GCG_QUESTIONS[1]) == (
      "<|im_start|>user\n<image>\n" + SPEC_QUESTIONS[1] + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("n_obj", [0, 1, 37, 256])
def test_prompt_layout(tok, n_obj):
  before, after = tokenize_prompt(tok)
  p = build_prompt(tok, n_obj)
  n_vis, k = 257 + n_obj, len(before)
  t = k + n_vis + len(after)
  assert p.num_visual_tokens == n_vis and p.inputs.length == t and p.inputs.image_start == k
  size = p.inputs.ids.shape[0]
  assert size == min(b for b in (384, 512, 640) if b >= t)
  np.testing.assert_array_equal(p.inputs.ids[:k], before)
  np.testing.assert_array_equal(p.inputs.ids[k + n_vis:t], after)
  assert (p.inputs.ids[k:k + n_vis] == 2).all() and (p.inputs.ids[t:] == 2).all()
  assert p.inputs.visual_mask.sum() == n_vis and p.inputs.visual_mask[k:k + n_vis].all()
  assert p.inputs.valid.sum() == t and p.inputs.valid[:t].all()
  assert (p.pixel_slice.start, p.pixel_slice.stop) == (k, k + NUM_PIXEL_TOKENS)
  assert p.separator_index == k + 256
  assert (p.object_slice.start, p.object_slice.stop) == (k + 257, k + 257 + n_obj)
  assert p.inputs.ids[p.object_slice.stop] == after[0]


def test_stack_prompts_and_errors(tok):
  a, b = build_prompt(tok, 3), build_prompt(tok, 150)
  assert (a.inputs.ids.shape, b.inputs.ids.shape) == ((384,), (512,))
  batch = stack_prompts([a, b], fill_id=2)
  assert batch["ids"].shape == batch["visual_mask"].shape == batch["valid"].shape == (2, 512)
  np.testing.assert_array_equal(batch["ids"][0, :384], a.inputs.ids)
  np.testing.assert_array_equal(batch["ids"][1], b.inputs.ids)
  np.testing.assert_array_equal(batch["visual_mask"][0, :384], a.inputs.visual_mask)
  assert (batch["ids"][0, 384:] == 2).all() and not batch["valid"][0, 384:].any()
  np.testing.assert_array_equal(batch["lengths"], [a.inputs.length, b.inputs.length])
  np.testing.assert_array_equal(batch["image_start"], [a.inputs.image_start] * 2)
  assert build_prompt(tok, 3, buckets=None).inputs.ids.shape == (a.inputs.length,)
  with pytest.raises(ValueError, match="num_object_tokens=257"):
    build_prompt(tok, 257)
  with pytest.raises(ValueError, match="largest bucket"):
    build_prompt(tok, 256, buckets=(384,))
  with pytest.raises(ValueError, match="exactly one <image>"):
    tokenize_prompt(tok, "a <image> b")


def test_stop_rule(tok, sp):
  assert stop_ids(tok) == (2, IM_END)
  gen = _enc(sp, "a man") + [SEG]
  assert not should_stop(tok, []) and not should_stop(tok, gen)
  assert should_stop(tok, gen + [IM_END]) and should_stop(tok, gen + [2])
  assert should_stop(tok, gen + [IM_END] + sp.encode("\n"))  # "\r" / "\n" are ignored
  # <|im_end|> spelled by ordinary pieces also stops the reference.
  assert should_stop(tok, gen + sp.encode("<|im_end|>"))
  assert not should_stop(tok, gen + sp.encode("<|im_end|> x"))


def test_seg_positions_and_retry_rule():
  s = SEG
  assert seg_positions([5, s, 6, s, IM_END], s) == [1, 3]
  assert seg_positions([5, 6, s], s) == []  # a final [SEG] has no hidden state
  assert seg_positions([], s) == []
  no, last_only, yes = [5, 6, IM_END], [5, s], [7, s, IM_END]
  assert choose_answer([], s) is None
  assert choose_answer([no], s) is None and choose_answer([no, last_only], s) is None
  assert choose_answer([yes], s) == (0, True)
  assert choose_answer([no, last_only, yes], s) == (2, True)
  assert choose_answer([no] * 6, s) == (5, False)
  assert choose_answer([no] * 5 + [yes], s) == (5, True)
  with pytest.raises(ValueError, match="already has a"):
    choose_answer([yes, no], s)
  with pytest.raises(ValueError, match="7 answers"):
    choose_answer([no] * 7, s)


def test_parse_answer(tok, sp):
  gen = ([BOP] + _enc(sp, "A man") + [EOP, SEG] + _enc(sp, "is standing next to") + [BOP]
         + _enc(sp, "a red car") + [EOP, SEG] + _enc(sp, "on the road.") + [IM_END])
  assert parse_answer(tok, gen) == ("A man is standing next to a red car on the road.",
                                    ["A man", "a red car"])
  # Hand-written decoded texts: <s> removed first (so it never lands in a phrase), "\n" deleted,
  # tags (<|im_end|>, </s>, <region>) and [SEG] removed, quotes stripped from the ends.
  assert parse_text(" <s>'The <p> big<s> dog </p> [SEG]\n sits .'<|im_end|></s>") == (
      "The big dog sits .", ["big dog"])
  assert parse_text("<p>a</p>[SEG]<p> b </p> <region>x") == ("a b x", ["a", "b"])
  assert parse_text("no masks at all.</s>") == ("no masks at all.", [])


# ------------------------------------------------------------------------------------------------
# Image preprocessing.


def _rgba():
  rgb = skimage.data.coffee()
  alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :].repeat(rgb.shape[0], 0)
  return np.concatenate([rgb, alpha[..., None]], axis=2)


IMAGES = {  # square, grayscale square, landscape 400x600, RGBA, tall odd-width crop
    "astronaut": skimage.data.astronaut,
    "camera_gray": skimage.data.camera,
    "coffee": skimage.data.coffee,
    "coffee_rgba": _rgba,
    "astronaut_tall": lambda: np.ascontiguousarray(skimage.data.astronaut()[:, 101:300]),
}


def _pil_expand2square(pil_img, background_color):
  """XTuner's expand2square, written with the same PIL calls."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  side = max(width, height)
  result = Image.new(pil_img.mode, (side, side), background_color)
  offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
  result.paste(pil_img, offset)
  return result


@pytest.fixture(scope="module")
def clip_processor():
  transformers = import_transformers()
  return transformers.CLIPImageProcessorPil(  # the OMG-LLaVA config's image_processor
      do_resize=True, size={"shortest_edge": 1024}, resample=3, do_center_crop=True,
      crop_size={"height": 1024, "width": 1024}, do_rescale=True, rescale_factor=1 / 255,
      do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
      do_convert_rgb=True)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_preprocess_matches_pil_and_hf_processor(name, clip_processor):
  image = IMAGES[name]()
  pil = Image.fromarray(image).convert("RGB")
  square = _pil_expand2square(pil, tuple(int(x * 255) for x in IMAGE_MEAN))
  resized = np.asarray(square.resize((1024, 1024), Image.BICUBIC))
  ref = clip_processor(square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  got = preprocess(image)
  assert got.size == pil.size == (image.shape[1], image.shape[0])
  assert got.square.dtype == np.uint8 and got.square.shape == (1024, 1024, 3)
  np.testing.assert_array_equal(got.square, resized)
  assert got.pixels.dtype == np.float32 and got.pixels.shape == (1024, 1024, 3)
  np.testing.assert_array_equal(got.pixels, ref)  # same float32 operations: bit-exact
  manual = (resized / 255 - np.asarray(IMAGE_MEAN)) / np.asarray(IMAGE_STD)
  np.testing.assert_allclose(got.pixels, manual, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(preprocess(pil).pixels, got.pixels)


@pytest.mark.parametrize("hw", [(5, 8), (8, 5), (4, 7), (7, 4), (6, 6), (1, 4)])
def test_expand2square_centring(hw):
  rgb = np.random.default_rng(0).integers(0, 256, hw + (3,), dtype=np.uint8)
  ref = np.asarray(_pil_expand2square(Image.fromarray(rgb), PAD_COLOR))
  got = expand2square(rgb)
  np.testing.assert_array_equal(got, ref)
  assert PAD_COLOR == (122, 116, 104)
  h, w = hw
  if w > h:  # odd padding: the extra row goes to the bottom
    assert (got[:(w - h) // 2] == PAD_COLOR).all() and (got[(w - h) // 2 + h:] == PAD_COLOR).all()
    np.testing.assert_array_equal(got[(w - h) // 2:(w - h) // 2 + h], rgb)


def test_image_modes_and_loading(tmp_path):
  gray = skimage.data.camera()[:40, :60]
  for arr in (gray, gray[..., None]):
    np.testing.assert_array_equal(np.asarray(to_rgb(arr)), np.repeat(gray[..., None], 3, 2))
  rgba = _rgba()[:30, :50]
  np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), rgba[..., :3])  # alpha dropped
  rgb = skimage.data.coffee()[:30, :50]
  for mode in ("P", "CMYK", "LA", "I"):  # any PIL mode goes through .convert("RGB")
    im = Image.fromarray(rgb).convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB")))
  # The reference does not apply the EXIF orientation (GLaMM's loader does).
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rgb).save(tmp_path / "r.png", exif=exif)
  np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "r.png"))), rgb)
  with pytest.raises(ValueError, match="uint8"):
    to_rgb(gray.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
    to_rgb(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------------------------------------
# Mask post-processing.


def _torch_masks(logits, w, h):
  """The mask block of gcg_omg_seg_llava.py::main on [N,1,256,256] logits."""
  masks = F.interpolate(torch.from_numpy(logits)[:, None], size=(max(w, h), max(w, h)),
                        mode="bilinear", align_corners=False)[:, 0]
  if w > h:
    n_pad = w - h
    masks = masks[:, n_pad // 2: w - (n_pad - n_pad // 2)]
  elif h > w:
    n_pad = h - w
    masks = masks[:, :, n_pad // 2: h - (n_pad - n_pad // 2)]
  return masks.numpy(), (masks.sigmoid() > 0.5).numpy()


@pytest.mark.parametrize("wh", [(640, 427), (427, 640), (300, 300), (513, 300), (200, 801),
                                (256, 255), (100, 60)])
def test_masks_match_torch_interpolate(wh):
  w, h = wh
  rng = np.random.default_rng(w * 7 + h)
  logits = (rng.standard_normal((3, 256, 256)) * 4).astype(np.float32)
  logits[0, 100:140, 20:90] += 30  # a confident blob
  ref_float, ref_bool = _torch_masks(logits, w, h)
  got_float = resize_mask_logits(logits, (w, h))
  got = masks_to_image(logits, (w, h))
  assert got_float.shape == got.shape == ref_bool.shape == (3, h, w) and got.dtype == bool
  # Within a few float32 ulps of ATen (its kernel's rounding order is not reproduced bit-exactly).
  np.testing.assert_allclose(got_float, ref_float, rtol=1e-6, atol=1e-6)
  differ = got != ref_bool
  assert (np.abs(ref_float[differ]) < 1e-5).all()  # flips only right at the threshold...
  assert differ.sum() == 0  # ...and none on these logits


def test_mask_threshold_is_sigmoid_not_sign():
  logits = np.asarray([[[1e-8, 2e-7], [-1e-8, 0.0]]], np.float32)
  got = masks_to_image(logits, (2, 2))
  ref = (torch.from_numpy(logits).sigmoid() > 0.5).numpy()
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got[0], [[False, True], [False, False]])
  with pytest.raises(ValueError, match=r"\[N, H, W\]"):
    masks_to_image(logits[0], (2, 2))
