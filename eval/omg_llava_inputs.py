"""Host-side inputs and outputs of OMG-LLaVA's GCG inference (omg_llava.md §3, §4).

Reference: `omg_llava/tools/gcg_omg_seg_llava.py` (`GCG_QUESTIONS`, `GCD_Inference_Dataset`,
`main`, `forward_model`, `get_seg_hidden_states`, `process_and_save_output`), XTuner's
`internlm2_chat` template, `StopWordStoppingCriteria` and `expand2square`.

- Prompt: `<|im_start|>user\\n<image>\\nQUESTION<|im_end|>\\n<|im_start|>assistant\\n`; the text
  before `<image>` is encoded with BOS, the text after it without; the visual span of 257+N
  embeddings (256 pixel tokens, the separator, N object tokens) replaces `<image>`; positions are
  contiguous. `build_prompt` returns eval/prompt.py's `PromptInputs`, right-padded to a bucket.
- Questions: the six `GCG_QUESTIONS` are tried in order until an answer has a usable [SEG]
  (`choose_answer`).
- Image preprocessing and mask post-processing: eval/omg_llava_image.py.
- Text: decode with special tokens kept, strip, then GLaMM's caption/phrase parsing after removing
  "<s>" (`parse_answer`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from eval.gcg_output import parse_gcg_text
from eval.omg_llava_tokenizer import IM_END_TOKEN, InternLM2SlowTokenizer, token_id
from eval.prompt import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, PromptInputs, expand_image_tokens

# `gcg_omg_seg_llava.py::GCG_QUESTIONS`, verbatim ("the this image" included).
GCG_QUESTIONS = (
    "Could you please give me a detailed description of the image? Please respond with "
    "interleaved segmentation masks for the corresponding parts of the answer.",
    "Can you provide a thorough description of the this image? Please output with interleaved "
    "segmentation masks for the corresponding phrases.",
    "Please describe in detail the contents of the image. Please respond with interleaved "
    "segmentation masks for the corresponding parts of the answer.",
    "Could you give a comprehensive explanation of what can be found within this picture? Please "
    "output with interleaved segmentation masks for the corresponding phrases.",
    "Could you give me an elaborate explanation of this picture? Please respond with interleaved "
    "segmentation masks for the corresponding phrases.",
    "Could you provide me with a detailed analysis of this photo? Please output with interleaved "
    "segmentation masks for the corresponding parts of the answer.",
)
# XTuner `PROMPT_TEMPLATE.internlm2_chat['INSTRUCTION']` (the script uses no system prompt).
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
NUM_PIXEL_TOKENS = 256  # the 16 x 16 grid of 64-pixel cells of the padded 1024 image
MAX_OBJECT_TOKENS = 256  # a valid query owns at least one of the 256 cells
DEFAULT_BUCKETS = (384, 512, 640)  # ~45 text tokens + 257 + N (1 <= N <= 256)
MAX_NEW_TOKENS = 100  # the script's default


# ------------------------------------------------------------------------------------------------
# Prompt.


def prompt_text(question: str = GCG_QUESTIONS[0]) -> str:
  """`INSTRUCTION.format(input=DEFAULT_IMAGE_TOKEN + '\\n' + question)`."""
  return INSTRUCTION.format(input=IMAGE_TOKEN + "\n" + question)


def tokenize_prompt(tok: InternLM2SlowTokenizer, question: str = GCG_QUESTIONS[0]
                    ) -> tuple[list[int], list[int]]:
  """(ids before the image, ids after it) as `forward_model` encodes them: chunk 0 with BOS,
  chunk 1 with `add_special_tokens=False`."""
  chunks = prompt_text(question).split(IMAGE_TOKEN)
  if len(chunks) != 2:
    raise ValueError(f"prompt: expected exactly one {IMAGE_TOKEN} in the prompt, found "
                     f"{len(chunks) - 1} (question {question!r})")
  return tok.encode(chunks[0]), tok.encode(chunks[1], add_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class OmgPrompt:
  """One image's LLM input layout. `inputs.ids` [L] int32 (visual slots and padding hold
  `fill_id`), `inputs.visual_mask` [L] (257 + N slots from `inputs.image_start`),
  `inputs.valid` [L], `inputs.length` = len(before) + 257 + N + len(after)."""
  inputs: PromptInputs
  ids_before: tuple[int, ...]
  ids_after: tuple[int, ...]
  num_object_tokens: int

  @property
  def num_visual_tokens(self) -> int:
    return NUM_PIXEL_TOKENS + 1 + self.num_object_tokens

  @property
  def pixel_slice(self) -> slice:
    s = self.inputs.image_start
    return slice(s, s + NUM_PIXEL_TOKENS)

  @property
  def separator_index(self) -> int:
    return self.inputs.image_start + NUM_PIXEL_TOKENS

  @property
  def object_slice(self) -> slice:
    s = self.separator_index + 1
    return slice(s, s + self.num_object_tokens)


def build_prompt(tok: InternLM2SlowTokenizer, num_object_tokens: int,
                 question: str = GCG_QUESTIONS[0], buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                 fill_id: int | None = None) -> OmgPrompt:
  """The expanded, bucket-padded input for a visual span of 257 + `num_object_tokens`.
  `fill_id` defaults to the pad id of the reference (`pad_token` = `</s>`, i.e. EOS)."""
  if not 0 <= num_object_tokens <= MAX_OBJECT_TOKENS:
    raise ValueError(f"prompt: num_object_tokens={num_object_tokens} outside "
                     f"[0, {MAX_OBJECT_TOKENS}]")
  before, after = tokenize_prompt(tok, question)
  fill = tok.eos_id if fill_id is None else fill_id
  inputs = expand_image_tokens(before + [IMAGE_TOKEN_INDEX] + after,
                               NUM_PIXEL_TOKENS + 1 + num_object_tokens, fill, buckets)
  return OmgPrompt(inputs, tuple(before), tuple(after), num_object_tokens)


def stack_prompts(prompts: Sequence[OmgPrompt], fill_id: int) -> dict[str, np.ndarray]:
  """A batch of prompts (N differs per image) right-padded to the longest padded one: ids [B,L]
  int32 (padding = `fill_id`), visual_mask / valid [B,L] bool, lengths [B], image_start [B]."""
  if not prompts:
    raise ValueError("stack_prompts: no prompts")
  size = max(p.inputs.ids.shape[0] for p in prompts)

  def pad(a, value):
    return np.pad(a, (0, size - a.shape[0]), constant_values=value)
  return {"ids": np.stack([pad(p.inputs.ids, fill_id) for p in prompts]).astype(np.int32),
          "visual_mask": np.stack([pad(p.inputs.visual_mask, False) for p in prompts]),
          "valid": np.stack([pad(p.inputs.valid, False) for p in prompts]),
          "lengths": np.asarray([p.inputs.length for p in prompts], np.int32),
          "image_start": np.asarray([p.inputs.image_start for p in prompts], np.int32)}


# ------------------------------------------------------------------------------------------------
# Generation: stop rule, [SEG] positions, question retry.


def should_stop(tok: InternLM2SlowTokenizer, generated: Sequence[int]) -> bool:
  """HF `generate`'s stop after the last new token: EOS (id 2), or `StopWordStoppingCriteria`:
  the decoded new tokens, with "\\r" and "\\n" removed, end with `<|im_end|>` (which the token
  92542 always produces; ordinary pieces could spell it too, hence the text test)."""
  if not generated:
    return False
  if int(generated[-1]) == tok.eos_id:
    return True
  text = tok.decode(generated).replace("\r", "").replace("\n", "")
  return text.endswith(IM_END_TOKEN)


def stop_ids(tok: InternLM2SlowTokenizer) -> tuple[int, int]:
  """(eos, <|im_end|>): the token-level stop rule a device loop can use; `should_stop` adds the
  rare case of `<|im_end|>` spelled by ordinary pieces."""
  return tok.eos_id, token_id(tok, IM_END_TOKEN)


def seg_positions(generated: Sequence[int], seg_id: int) -> list[int]:
  """`get_seg_hidden_states`: indices i of generated [SEG] tokens whose hidden state exists, i.e.
  the state computed when token i is fed back (i < n - 1; a final [SEG] has none)."""
  return [i for i, t in enumerate(list(generated)[:-1]) if int(t) == seg_id]


def choose_answer(answers: Sequence[Sequence[int]], seg_id: int) -> tuple[int, bool] | None:
  """The question-retry rule over the answers to GCG_QUESTIONS[0], [1], ... (generated ids).

  Returns (index of the answer kept, whether it has masks): the first answer with a usable [SEG]
  (`seg_positions` non-empty); after all six without one, the 6th with zero masks. None means
  "ask the next question". Answers after the kept one are an error (the reference stops there).
  """
  if len(answers) > len(GCG_QUESTIONS):
    raise ValueError(f"choose_answer: {len(answers)} answers for {len(GCG_QUESTIONS)} questions")
  for i, ans in enumerate(answers):
    if seg_positions(ans, seg_id):
      if i != len(answers) - 1:
        raise ValueError(f"choose_answer: answer {i} already has a [SEG]; the reference asks no "
                         f"further question, but {len(answers)} answers were given")
      return i, True
  return (len(GCG_QUESTIONS) - 1, False) if len(answers) == len(GCG_QUESTIONS) else None


def parse_answer(tok: InternLM2SlowTokenizer, generated: Sequence[int]) -> tuple[str, list[str]]:
  """(caption, phrases) of `process_and_save_output` for the generated ids (no prompt: with
  `inputs_embeds`, HF returns only the new tokens). The reference removes "<s>" before the steps
  GLaMM shares (`eval.gcg_output.parse_gcg_text`); `<|im_end|>` goes with the `<...>` tags."""
  return parse_text(tok.decode([int(i) for i in generated]).strip())


def parse_text(text: str) -> tuple[str, list[str]]:
  """(caption, phrases) of an already decoded and stripped text."""
  return parse_gcg_text(text.replace("<s>", ""))
