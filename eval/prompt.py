"""The GLaMM GCG prompt: text, ids with the image placeholder, and the expanded model input.

Reference: `eval/gcg/infer.py::inference` (groundingLMM), `model/llava/conversation.py`
(`conv_llava_v1`, separator style TWO), `model/llava/mm_utils.py::tokenizer_image_token`
(glamm.md §3, §4.4, §4.5).

Layout of the LLM input (T = len(ids) - 1 + num_visual_tokens):
  [<s>, system..., "USER", ":", "The", <im_start>, v_0 ... v_{N-1}, <im_end>, "provides", ...,
   "ASSISTANT", ":"]
The single IMAGE_TOKEN_INDEX (-200) of the id list is replaced by N visual slots; `visual_mask`
marks them. Positions stay contiguous (0..T-1).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from eval.tokenizer import LlamaSlowTokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
NUM_VISUAL_TOKENS = 576  # CLIP ViT-L/14 at 336: a 24 x 24 grid, CLS dropped

# `conv_llava_v1` (note "human", not "user").
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")
# `infer.py` writes the instruction with a backslash line continuation inside the literal, so it
# holds FIVE spaces between "interleaved" and "segmentation" (the training template has one).
GCG_INSTRUCTION = ("Could you please give me a detailed description of the image? Please respond "
                   "with interleaved     segmentation masks for the corresponding parts of the "
                   "answer.")
USER_PREFIX = f"The {IM_START_TOKEN}{IMAGE_TOKEN}{IM_END_TOKEN} provides an overview of the picture.\n"

DEFAULT_BUCKETS = (256, 512, 768, 1024)


def gcg_prompt_text(instruction: str = GCG_INSTRUCTION) -> str:
  """`conv.get_prompt()` for [USER: prefix + instruction, ASSISTANT: ""].

  Separator style TWO: system + " " + "USER: " + message + " " + "ASSISTANT:" (an empty message
  renders as the role and a colon, no trailing space). `bleach.clean` plus the `&lt;`/`&gt;`
  restoration leave the official instruction unchanged; other instructions containing "&" would be
  escaped by the reference, so they are refused here.
  """
  if "&" in instruction:
    raise ValueError("gcg_prompt_text: '&' in the instruction would be HTML-escaped by GLaMM's "
                     f"bleach.clean; not supported: {instruction!r}")
  return f"{SYSTEM} {ROLES[0]}: {USER_PREFIX}{instruction} {ROLES[1]}:"


def tokenize_with_image(prompt: str, tokenizer: LlamaSlowTokenizer,
                        image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
  """`tokenizer_image_token`: split on "<image>", encode each chunk with BOS, keep only the first
  chunk's BOS, put one `image_token_index` between chunks."""
  chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
  ids: list[int] = []
  offset = 0
  if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_id:
    offset = 1
    ids.append(chunks[0][0])
  for i, chunk in enumerate(chunks):
    if i:
      ids.append(image_token_index)
    ids.extend(chunk[offset:])
  return ids


@dataclasses.dataclass(frozen=True)
class PromptInputs:
  """A prompt expanded for the model and right-padded to a bucket.

  ids: int32 [L]; visual slots and padding hold `fill_id` (their embeddings are replaced/ignored).
  visual_mask: bool [L]; True at the N visual-token slots.
  valid: bool [L]; True for the first `length` positions.
  length: the unpadded length T.
  image_start: index of the first visual slot (the position after <im_start>).
  """
  ids: np.ndarray
  visual_mask: np.ndarray
  valid: np.ndarray
  length: int
  image_start: int


def choose_bucket(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"prompt length {length} exceeds the largest bucket {max(buckets)}")


def expand_image_tokens(ids: Sequence[int], num_visual_tokens: int = NUM_VISUAL_TOKENS,
                        fill_id: int = 0, buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                        image_token_index: int = IMAGE_TOKEN_INDEX) -> PromptInputs:
  """Replaces the single `image_token_index` by `num_visual_tokens` slots and pads to a bucket.

  `buckets=None` returns the unpadded [T] arrays.
  """
  positions = [i for i, t in enumerate(ids) if t == image_token_index]
  if len(positions) != 1:
    raise ValueError(f"expand_image_tokens: expected exactly one image placeholder "
                     f"{image_token_index} in the ids, found {len(positions)}")
  k = positions[0]
  length = len(ids) - 1 + num_visual_tokens
  size = length if buckets is None else choose_bucket(length, buckets)
  out = np.full((size,), fill_id, np.int32)
  out[:k] = ids[:k]
  out[k + num_visual_tokens:length] = ids[k + 1:]
  visual_mask = np.zeros((size,), bool)
  visual_mask[k:k + num_visual_tokens] = True
  valid = np.zeros((size,), bool)
  valid[:length] = True
  return PromptInputs(out, visual_mask, valid, length, k)


def build_gcg_prompt(tokenizer: LlamaSlowTokenizer, num_visual_tokens: int = NUM_VISUAL_TOKENS,
                     buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                     instruction: str = GCG_INSTRUCTION) -> PromptInputs:
  """The GCG prompt ready for the model (same for every image)."""
  ids = tokenize_with_image(gcg_prompt_text(instruction), tokenizer)
  return expand_image_tokens(ids, num_visual_tokens, tokenizer.pad_id, buckets)
