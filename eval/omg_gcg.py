"""OMG-LLaVA grounded conversation generation with pruning built in: images -> captions + masks.

    python -m eval.gcg --model omg_llava --checkpoint CONVERTED_DIR --images GranDf/val_test \
        [--annotations GranDf/annotations/val_test --split val] --prune altp --keep-ratio 0.1 \
        --batch-size 8 --out OUT

One jitted program per (prompt length, batch size, options) does, for a batch of images
(omg_llava.md §3-§4; the GLaMM side is eval/gcg.py; `--split-programs` compiles the vision part
once for all options and the rest per options instead):

  `encode_image` (OMG-Seg, float32 in the release config -> pixel tokens, separator, N_b object
  tokens in the static V_max span) -> token scores -> pre-LLM pruning of the pixel tokens (ALTP /
  top-k / random / grid) or none -> splice (positions of the real 257+N span) -> the key-valid tokens packed to the
  front and the prompt shortened to a static length -> prefill with in-LLM pruning (FastV /
  PyramidDrop) if chosen -> greedy `lax.while_loop` decoding that stops on EOS or `<|im_end|>` ->
  the post-norm states of the generated [SEG]s -> `seg_masks` on the cached pixel-decoder
  features.

The host then applies the reference's stop rule exactly (a text ending in `<|im_end|>`), decodes
the caption and phrases, resizes/crops/thresholds each mask (eval/omg_llava_image.masks_to_image)
and writes GLaMM's prediction JSON (eval/gcg_output), one file per image, atomically; a rerun
skips images already done. The question-retry rule (§3.2: ask GCG_QUESTIONS[0], [1], ... until an
answer has a usable [SEG]; after six, the sixth with no masks) is `retry=True` (`--omg-retry`,
the default): only the rows that need another question are run again, in a batch of the same size
(padding rows repeat a pending one), so nothing recompiles. A retried row runs the whole program
again, vision included.

Pruning on OMG-LLaVA's visual span `[256 pixel ; separator ; N object]` (N varies per image; the
prompt holds the static V_max = 513 slots, the unused tail key-invalid):
- Token scores (`score`): ConvNeXt has no CLS token, so there is no CLS attention. `feature_norm`
  (default) is the L2 norm of each projected pixel token (altp.md's `feature_norm` source);
  `perception` is the cell's perception-prior probability max_q P_q(cell), P_q =
  (0.5 s_q + 0.5) sigmoid(mask logit) down-sampled to the grid (how confidently OMG-Seg assigns
  the cell to some query; the prior the pixel tokens carry).
- Pre-LLM methods (`altp`, `topk`, `random`, `grid`) keep `k = keep_count(256, 1 - keep_ratio)`
  of the 256 pixel tokens (26 at 0.1). ALTP's superpixels are SLIC on the padded, resized square
  image (1024^2) mapped to the 16 x 16 grid (`altp_jax.slic_labels` + `token_labels`, host or the
  device SLIC; `n_segments = ALTPConfig.n_segments(k)` of that pixel budget, 13 at 0.1); its
  `dispersion` density reads the projected pixel tokens. The separator and the
  object tokens are kept (`include_objects=False`, the default). With `include_objects=True`
  (altp, topk, random) the valid object tokens join the pixel tokens in one pool of the static
  G^2 + min(Q, G^2) = 512 slots and `k = keep_count(512, 1 - keep_ratio)` of them are kept (51
  at 0.1: keep_ratio of the largest possible span, so the count is static; an image whose 256 + N
  valid tokens are fewer than k keeps them all). An object token's score is its projected norm
  (`feature_norm`) or the largest P over the cells it owns (`perception`); for ALTP it belongs to
  the superpixel holding most of its cells; the unused object slots get a superpixel id of their
  own and the lowest score, and are never kept (a pick ALTP's quota gives them goes to the best
  unpicked valid token by score).
- In-LLM methods (`fastv`, `pdrop`) rank the 256 pixel tokens only (the last prompt token's
  attention, GQA-aware; `models.generate.PrunePlan`), keeping the separator and all objects, so
  their `k` per stage is static whatever N is (FastV: k of 256 after layer K; PyramidDrop: the
  schedule's counts of 256 with the layer-averaged retention = keep_ratio over the pixel tokens).
- Reported reduction (run.json): against the whole visual span, `1 - kept / (257 + N)` per image
  with `kept` the visual tokens entering the LLM after the pruning point (pre-LLM: k + 1 + N, or
  min(k, 256 + N) + 1 with objects in the budget; FastV: k + 1 + N after layer K; PyramidDrop:
  after its first drop), and the layer-averaged retention.
- `keep_ratio = 1.0` keeps every token: the same tokens and masks as `none` (tested).

Positions: `original` (default: kept tokens keep the positions of the unpruned 257+N layout) or
`compact` (renumbered). Prompt length: the V_max span plus the longest of the six questions,
rounded up to a multiple of 16; after pre-LLM pruning the packed prompt is `256 - k` slots
shorter (every row drops that many or more; `512 - k` with objects in the budget), so the LLM
runs on a shorter static length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import altp_jax
from altp_jax import gather
from altp_jax import pipeline
from altp_jax import ranking
from altp_jax import superpixels
from eval import gcg
from eval.omg_llava_inputs import GCG_QUESTIONS, MAX_NEW_TOKENS, seg_positions, tokenize_prompt
from models import generate as gen
from models.flat_state import split_flat
from models.omg_llava.modeling import pack_prompt, seg_hidden_from_generation

SCORES = ("feature_norm", "perception")
OBJECT_METHODS = ("altp", "topk", "random")     # pre-LLM methods that can put objects in budget
DEFAULT_MAX_MASKS = 16
PROMPT_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class OmgGCGOptions:
  """Static options of one compiled OMG-LLaVA GCG program.

  Attributes:
    prune: `eval.gcg.PruneConfig` (method, keep_ratio, ALTP options, superpixels, positions,
      FastV layer, PyramidDrop layers); `keep_ratio` is over the 256 pixel tokens.
    sampler: greedy decoding; `eos_id` 2 and `stop_ids=(<|im_end|>,)` for the reference's stop.
    seg_id: the [SEG] id (92544 with the release tokenizer).
    max_masks: static bound on masks decoded per image (later [SEG]s are counted, not decoded).
    score: token score source for altp/topk (`SCORES`, see the module docstring).
    include_objects: object tokens join the pre-LLM budget (altp, topk, random).
  """

  prune: gcg.PruneConfig = gcg.PruneConfig()
  sampler: gen.SamplerConfig = gen.SamplerConfig(max_new_tokens=MAX_NEW_TOKENS, eos_id=2,
                                                 pad_id=2, stop_ids=(92542,))
  seg_id: int = 92544
  max_masks: int = DEFAULT_MAX_MASKS
  score: str = "feature_norm"
  include_objects: bool = False

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(f"--omg-score {self.score!r}: expected one of {SCORES}")
    if self.max_masks < 1:
      raise ValueError(f"--max-segs {self.max_masks}: must be >= 1")
    if self.include_objects and self.prune.method not in OBJECT_METHODS + ("none",):
      raise ValueError(f"--include-objects works with the pre-LLM methods {OBJECT_METHODS}, not "
                       f"--prune {self.prune.method!r} (grid has no place for object tokens; "
                       "FastV/PyramidDrop rank the 256 pixel tokens so that k stays static)")


# ------------------------------------------------------------------------------------------------
# Traceable pieces.


def encode_stage(model, pixels: jax.Array, *, score: str = "feature_norm") -> dict:
  """`model.encode_image(pixels)` plus token scores.

  Adds `pixel_scores` [B,G^2] and `object_scores` [B,M] float32 (M = V_max - G^2 - 1 object
  slots; garbage on unused slots). `feature_norm` is the norm of the projected token;
  `perception` the cell's largest perception-prior probability (`encode_image(cell_probs=True)`).
  """
  cfg = model.config
  g2 = cfg.num_pixel_tokens
  if score == "perception":
    out = model.encode_image(pixels, cell_probs=True)
    cell = out["cell_prob"]
    owns = _object_cells(out["owner"], out["query_valid"], out["visual"].shape[1] - g2 - 1)
    obj = jnp.max(jnp.where(owns, cell[:, None, :], -jnp.inf), axis=-1)
    return dict(out, pixel_scores=cell, object_scores=obj)
  out = model.encode_image(pixels)
  norms = jnp.linalg.norm(out["visual"].astype(jnp.float32), axis=-1)
  return dict(out, pixel_scores=norms[:, :g2], object_scores=norms[:, g2 + 1:])


def _object_cells(owner: jax.Array, query_valid: jax.Array, m: int) -> jax.Array:
  """[B,M,G^2] bool: the grid cells each object slot's query owns. Object slot j holds the j-th
  valid query in ascending order (the projector packs them so); unused slots own nothing."""
  q = query_valid.shape[1]
  iota = jnp.arange(q, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(query_valid, iota, q + iota), axis=1)[:, :m]     # [B,M]
  slot_ok = jnp.take_along_axis(query_valid, order, axis=1)
  if m > q:
    order = jnp.pad(order, ((0, 0), (0, m - q)))
    slot_ok = jnp.pad(slot_ok, ((0, 0), (0, m - q)))
  return (owner[:, None, :] == order[:, :, None]) & slot_ok[:, :, None]


def object_labels(owner, query_valid, token_labels, num_segments: int, m: int) -> jax.Array:
  """[B,M] superpixel id of each object slot: the id holding most of its cells (ties to the
  smaller id); unused slots get `num_segments` (an id of their own)."""
  owns = _object_cells(owner, query_valid, m).astype(jnp.float32)             # [B,M,G2]
  onehot = jax.nn.one_hot(token_labels, num_segments, dtype=jnp.float32)       # [B,G2,G]
  counts = jnp.einsum("bmc,bcg->bmg", owns, onehot)
  has = jnp.any(owns > 0, axis=-1)
  return jnp.where(has, jnp.argmax(counts, axis=-1), num_segments).astype(jnp.int32)


def _valid_top_k(prio_keep: jax.Array, candidate_valid: jax.Array, scores: jax.Array, k: int):
  """`k` candidates, ascending: the valid ones marked by `prio_keep` [B,P] bool first, then the
  best unmarked valid ones by score, invalid ones only when a row has fewer than k valid (the
  caller drops those)."""
  prio = jax.vmap(ranking.priority)(jnp.where(candidate_valid, scores, -jnp.inf))
  n = scores.shape[-1]
  tier = jnp.where(candidate_valid, jnp.where(prio_keep, 2, 1), 0)
  _, idx = jax.lax.top_k(tier * n + prio, k)
  return jnp.sort(idx.astype(jnp.int32), axis=-1)


def pre_llm_keep(options: OmgGCGOptions, enc: dict, labels, images01, rng, *, grid: int):
  """The pre-LLM keep decision.

  Returns (keep_idx [B,k] ascending into the candidate pool (the G^2 pixel tokens, or G^2 + M
  pixel then object slots with `include_objects`, where unused slots can appear when a row has
  fewer than k valid tokens), span_keep [B,V] bool over the visual span: the real visual tokens
  that stay, min_dropped: the static number of visual tokens every row drops at least).
  """
  prune = options.prune
  visual, visual_valid = enc["visual"], enc["visual_valid"]
  b, v = visual_valid.shape
  g2 = grid * grid
  m = v - g2 - 1
  k = prune.kept(g2 + m) if options.include_objects else prune.kept(g2)
  pix_scores = enc["pixel_scores"].astype(jnp.float32)
  pix_feats = enc["pixel_tokens_projected"].astype(jnp.float32)
  if prune.method == "altp":
    if labels is None:
      n_seg = prune.n_segments(g2)
      pix = pipeline.device_pixel_labels(images01, n_segments=n_seg, config=prune.altp)
      num_segments = pipeline.device_num_segments(images01.shape[1], images01.shape[2], n_seg)
      labels = superpixels.token_labels(pix, (grid, grid), num_segments, prune.altp.token_labels)
    else:
      num_segments = prune.num_segments(g2)
  if not options.include_objects:
    keep = gcg.pre_llm_keep(prune.method, k, pix_feats, pix_scores, labels, rng, prune.altp,
                            num_segments if prune.method == "altp" else None, (grid, grid))
    span_keep = jnp.concatenate([ranking.keep_mask(keep, g2), jnp.ones((b, v - g2), bool)], 1)
    return keep, span_keep & visual_valid, g2 - k
  # Objects in the budget: one pool of G^2 pixel and M object slots.
  obj_valid = visual_valid[:, g2 + 1:]
  cand_valid = jnp.concatenate([jnp.ones((b, g2), bool), obj_valid], axis=1)
  scores = jnp.concatenate([pix_scores, enc["object_scores"].astype(jnp.float32)], axis=1)
  if prune.method == "altp":
    obj_lab = object_labels(enc["owner"], enc["query_valid"], labels, num_segments, m)
    pool_labels = jnp.concatenate([labels.astype(jnp.int32), obj_lab], axis=1)
    feats = jnp.concatenate([pix_feats, visual[:, g2 + 1:].astype(jnp.float32)], axis=1)
    # Unused slots: their own superpixel id, the lowest score and zero features (density 0).
    altp_scores = jnp.where(cand_valid, scores, -jnp.inf)
    feats = jnp.where(cand_valid[..., None], feats, 0.0)
    first = altp_jax.altp.altp_select(altp_scores, pool_labels, k, config=prune.altp,
                                      features=feats, num_segments=num_segments + 1)
    marked = ranking.keep_mask(first, g2 + m)
  elif prune.method == "topk":
    marked = jnp.zeros((b, g2 + m), bool)
  else:   # random: uniform priorities
    scores = jax.random.uniform(rng, (b, g2 + m))
    marked = jnp.zeros((b, g2 + m), bool)
  keep = _valid_top_k(marked, cand_valid, scores, k)
  kept = ranking.keep_mask(keep, g2 + m)
  span_keep = jnp.concatenate([kept[:, :g2], jnp.ones((b, 1), bool), kept[:, g2:]], axis=1)
  return keep, span_keep & visual_valid, g2 + m - k


def llm_layout(options: OmgGCGOptions, config, prompt_len: int) -> tuple[gen.PrunePlan, int]:
  """(in-LLM plan, static LLM sequence length) for a prompt of `prompt_len` slots: the packed
  prompt is shortened by the visual tokens every row drops at least (pre-LLM methods: G^2 - k,
  or G^2 + M - k with objects in the budget)."""
  prune = options.prune
  g2 = config.num_pixel_tokens
  m = config.num_visual_tokens_max - g2 - 1
  if prune.method in ("fastv", "pdrop"):
    return prune.plan(config.llm.num_layers, g2), prompt_len
  plan = gen.PrunePlan.none(config.llm.num_layers, 0)
  if prune.method not in gcg.PRE_LLM:
    return plan, prompt_len
  if options.include_objects:
    return plan, prompt_len - (g2 + m - prune.kept(g2 + m))
  return plan, prompt_len - (g2 - prune.kept(g2))


def llm_inputs(model, enc: dict, ids, valid, visual_mask, labels, images01, rng, *,
               options: OmgGCGOptions) -> dict:
  """Pre-LLM pruning, splice and packing: what `models.generate` reads.

  Args:
    enc: `encode_stage`'s dict.
    ids, valid, visual_mask: [B,L] prompt with a V_max visual span per row, right-padded.
    labels: [B,G^2] int32 host token superpixel labels (ALTP, host superpixels) or None.
    images01: [B,S,S,3] float32 padded square image in [0,1] (ALTP, device superpixels) or None.
    rng: PRNG key (random selection).
  Returns:
    dict: embeds [B,L',D], valid [B,L'] (a prefix per row), pixel_mask [B,L'] (the pixel tokens
    in the LLM: FastV/PyramidDrop rank these), positions [B,L'], plan (`PrunePlan`, static),
    rng, keep_index [B,k] (pre-LLM methods; else [B,0]), kept_visual [B] (visual tokens entering
    the LLM); L' = L - (the visual tokens every row drops at least).
  """
  prune, cfg = options.prune, model.config
  g2 = cfg.num_pixel_tokens
  visual_mask = visual_mask.astype(jnp.bool_)
  embeds, positions, key_valid = model.splice(ids, visual_mask, valid, enc["visual"],
                                              enc["visual_valid"])
  b, l = ids.shape
  span = jnp.clip(jnp.cumsum(visual_mask.astype(jnp.int32), axis=1) - 1, 0, None)
  pixel_mask = visual_mask & (span < g2)
  keep = jnp.zeros((b, 0), jnp.int32)
  kept_visual = enc["num_visual"]
  plan, length = llm_layout(options, cfg, l)
  if prune.method in gcg.PRE_LLM:
    rng, sub = jax.random.split(rng)
    keep, span_keep, min_dropped = pre_llm_keep(options, enc, labels, images01, sub,
                                                grid=cfg.grid)
    assert length == l - min_dropped, (length, l, min_dropped)
    key_valid = key_valid & gather.sequence_keep_mask(visual_mask, span_keep)
    kept_visual = jnp.sum(span_keep.astype(jnp.int32), axis=1)
    if prune.positions == "compact":
      kv = key_valid.astype(jnp.int32)
      positions = jnp.cumsum(kv, axis=1) - kv
  embeds, packed_valid, packed_pixels, index = pack_prompt(embeds, key_valid, pixel_mask)
  positions = jnp.take_along_axis(positions, index, axis=1)
  return dict(embeds=embeds[:, :length], valid=packed_valid[:, :length],
              pixel_mask=packed_pixels[:, :length], positions=positions[:, :length], plan=plan,
              rng=rng, keep_index=keep, kept_visual=kept_visual)


def generate_stage(model, x: dict, *, options: OmgGCGOptions) -> gen.GenerationOutput:
  """`models.generate.generate_fn` on `llm_inputs`' dict."""
  return gen.generate_fn(model.llm, x["embeds"], x["valid"], x["pixel_mask"], x["rng"],
                         x["positions"], plan=x["plan"], sampler=options.sampler)


def llm_stage(model, enc: dict, ids, valid, visual_mask, labels, images01, rng, *,
              options: OmgGCGOptions) -> dict:
  """Everything after `encode_stage`: `llm_inputs`, `generate_stage`, [SEG] masks.

  Returns:
    dict: tokens [B,T] and lengths [B] (T = max_new_tokens), masks [B,M,Hm,Wm] float32 logits
    of the first M usable [SEG]s, seg_valid [B,M], num_visual [B] (257+N), kept_visual [B]
    (visual tokens entering the LLM), keep_index [B,k] (pre-LLM methods; else [B,0]).
  """
  x = llm_inputs(model, enc, ids, valid, visual_mask, labels, images01, rng, options=options)
  out = generate_stage(model, x, options=options)
  seg_hidden, seg_valid = seg_hidden_from_generation(out.tokens, out.hidden, out.lengths,
                                                     options.seg_id, options.max_masks)
  masks = model.seg_masks(seg_hidden, enc["mask_features"], enc["memories"])
  return dict(tokens=out.tokens, lengths=out.lengths, masks=masks.astype(jnp.float32),
              seg_valid=seg_valid, num_visual=enc["num_visual"],
              kept_visual=x["kept_visual"], keep_index=x["keep_index"])


def omg_gcg_forward(model, ids, valid, visual_mask, pixels, labels, images01, rng, *,
                    options: OmgGCGOptions) -> dict:
  """Traceable GCG for a batch: `encode_stage` then `llm_stage` (see their docstrings;
  pixels [B,S,S,3] CLIP-normalised padded squares)."""
  enc = encode_stage(model, pixels, score=options.score)
  return llm_stage(model, enc, ids, valid, visual_mask, labels, images01, rng, options=options)


@functools.partial(jax.jit, static_argnames=("fdef", "options"))
def _omg_gcg_jit(fdef, leaves, ids, valid, visual_mask, pixels, labels, images01, rng, *,
                 options):
  return omg_gcg_forward(fdef.merge(leaves), ids, valid, visual_mask, pixels, labels,
                         images01, rng, options=options)


@functools.partial(jax.jit, static_argnames=("fdef", "score"))
def _encode_jit(fdef, leaves, pixels, *, score):
  return encode_stage(fdef.merge(leaves), pixels, score=score)


@functools.partial(jax.jit, static_argnames=("fdef", "options"))
def _llm_jit(fdef, leaves, enc, ids, valid, visual_mask, labels, images01, rng, *, options):
  return llm_stage(fdef.merge(leaves), enc, ids, valid, visual_mask, labels, images01,
                   rng, options=options)


class OmgGCGRunner:
  """Holds the model split for jit and runs GCG batches (`run_batch`).

  `split=False` (default): one program per (prompt length, batch size, options), vision
  included. `split=True`: the vision program (`encode_stage`) is compiled once per (batch size,
  score) and shared by every pruning option, and `llm_stage` once per options; the arrays stay
  on the device in between. Same functions, same results (tested); faster to compile when
  sweeping methods or ratios, since the vision encoder dominates the compile time.
  """

  def __init__(self, model, options: OmgGCGOptions, split: bool = False):
    self.fdef, self.leaves = split_flat(model)   # see eval.gcg.GCGRunner
    self.options = options
    self.config = model.config
    self.split = split

  def run_batch(self, ids, valid, visual_mask, pixels, labels=None, images01=None, rng=None):
    """ids/valid/visual_mask [B,L], pixels [B,S,S,3] -> `llm_stage`'s dict (device arrays)."""
    rng = jax.random.key(self.options.prune.seed) if rng is None else rng
    if self.options.prune.method == "altp" and labels is None and images01 is None:
      raise ValueError("ALTP needs labels [B, G^2] (host superpixels) or images01 [B,S,S,3] "
                       "(device superpixels)")
    if self.split:
      enc = _encode_jit(self.fdef, self.leaves, pixels, score=self.options.score)
      return _llm_jit(self.fdef, self.leaves, enc, ids, valid, visual_mask, labels, images01,
                      rng, options=self.options)
    return _omg_gcg_jit(self.fdef, self.leaves, ids, valid, visual_mask, pixels, labels,
                        images01, rng, options=self.options)


# ------------------------------------------------------------------------------------------------
# Host side: prompts, stop rule, retry, one image's inputs and outputs.


def question_prompts(tok, config, multiple: int = PROMPT_MULTIPLE):
  """The six GCG prompts, each with a V_max visual span, all padded to one length (the longest
  rounded up to `multiple`) so that every question runs in the same compiled program.
  Returns a list of `eval.prompt.PromptInputs`."""
  from eval.prompt import IMAGE_TOKEN_INDEX, expand_image_tokens
  v = config.num_visual_tokens_max
  ids = []
  for q in GCG_QUESTIONS:
    before, after = tokenize_prompt(tok, q)
    ids.append(before + [IMAGE_TOKEN_INDEX] + after)
  longest = max(len(i) - 1 + v for i in ids)
  size = -(-longest // multiple) * multiple
  return [expand_image_tokens(i, v, tok.eos_id, (size,)) for i in ids]


def stop_length(tok, generated: Sequence[int], stop_ids: Sequence[int]) -> int:
  """The reference's stop (HF generate with EOS + `StopWordStoppingCriteria`): the first t such
  that token t is a stop id or the decoded text of tokens [0, t] ends with `<|im_end|>`
  (`eval.omg_llava_inputs.should_stop`); only tokens whose piece can end that text are tested."""
  from eval.omg_llava_inputs import should_stop
  gen_ids = [int(i) for i in generated]
  for t, tid in enumerate(gen_ids):
    if tid in stop_ids:
      return t + 1
    piece = tok.id_to_token(tid)
    if any(c in piece for c in ">\n\r") and should_stop(tok, gen_ids[:t + 1]):
      return t + 1
  return len(gen_ids)


@dataclasses.dataclass
class RowResult:
  """One image's answer: generated ids (cut at the reference's stop), the question used, mask
  logits of its usable [SEG]s [S,Hm,Wm] (at most max_masks), [SEG]s beyond max_masks, and the
  visual-token counts."""
  generated: list
  question: int
  mask_logits: np.ndarray
  segs_beyond_max: int
  num_visual: int
  kept_visual: int
  keep_index: np.ndarray


def answer_with_retry(run_rows: Callable[[list, list], list], count: int, seg_id: int,
                      retry: bool = True) -> tuple[list, list]:
  """The question-retry loop on the host.

  Args:
    run_rows: (rows, question indices) -> one result per row with `.generated`.
    count: number of rows (images).
  Returns:
    (results per row, calls: the rows run in each call). A row is done when its answer has a
    usable [SEG] (`seg_positions`), when it had the last question, or at once without `retry`;
    only pending rows are run again, with their next question.
  """
  attempt = [0] * count
  final = [None] * count
  pending = list(range(count))
  calls = []
  while pending:
    calls.append(list(pending))
    results = run_rows(pending, [attempt[r] for r in pending])
    nxt = []
    for r, res in zip(pending, results):
      if (not retry or seg_positions(res.generated, seg_id)
          or attempt[r] == len(GCG_QUESTIONS) - 1):
        final[r] = res
      else:
        attempt[r] += 1
        nxt.append(r)
    pending = nxt
  return final, calls


def host_image(path: str, config, options: OmgGCGOptions):
  """One image's host inputs: (pixels [S,S,3] float32, size (w,h), token labels [G^2] int32
  for ALTP with host superpixels or None, images01 [S,S,3] float32 for device superpixels or
  None)."""
  from eval.omg_llava_image import load_image, preprocess
  img = preprocess(load_image(path), source=path, size=config.image_size)
  prune = options.prune
  labels = images01 = None
  if prune.method == "altp":
    sq01 = img.square.astype(np.float32) / np.float32(255)
    g2 = config.num_pixel_tokens
    if prune.superpixels == "host":
      g = prune.num_segments(g2)
      pix = altp_jax.slic_labels(sq01, n_segments=prune.n_segments(g2),
                                 compactness=prune.altp.compactness, sigma=prune.altp.sigma,
                                 max_segments=g, max_num_iter=prune.altp.slic_iters)
      labels = np.asarray(altp_jax.token_labels(pix, (config.grid, config.grid), g,
                                                prune.altp.token_labels))
    else:
      images01 = sq01
  return img.pixels, img.size, labels, images01


def make_row_runner(runner: OmgGCGRunner, prompts, images: list, batch_size: int, tok,
                    stats: dict | None = None, mesh=None):
  """A `run_rows` for `answer_with_retry`: runs the rows (padded to `batch_size` with copies of
  the first) with their questions and returns `RowResult`s; `images` are `host_image` tuples.
  With `mesh`, every device batch is split over the mesh's batch axes (`data`, `fsdp`)."""
  from models import mesh as mesh_lib
  from models import placement
  opts = runner.options
  stop_ids = (opts.sampler.eos_id,) + tuple(opts.sampler.stop_ids)

  def put(x, names):
    return x if mesh is None or x is None else placement.put_global(x, names, mesh)

  def run_rows(rows, questions):
    results = []
    for i in range(0, len(rows), batch_size):
      chunk, qs = rows[i:i + batch_size], questions[i:i + batch_size]
      pad = batch_size - len(chunk)
      chunk_p, qs_p = chunk + [chunk[0]] * pad, qs + [qs[0]] * pad
      ids = np.stack([prompts[q].ids for q in qs_p])
      valid = np.stack([prompts[q].valid for q in qs_p])
      vis = np.stack([prompts[q].visual_mask for q in qs_p])
      pixels = np.stack([images[r][0] for r in chunk_p])
      labels = (None if images[chunk[0]][2] is None
                else np.stack([images[r][2] for r in chunk_p]))
      im01 = (None if images[chunk[0]][3] is None
              else np.stack([images[r][3] for r in chunk_p]))
      tokens_, pix_ = mesh_lib.ACT_TOKENS, mesh_lib.ACT_PIXELS
      ids, valid, vis, labels = (put(x, tokens_) for x in (ids, valid, vis, labels))
      pixels, im01 = put(pixels, pix_), put(im01, pix_)
      t0 = time.perf_counter()
      out = runner.run_batch(ids, valid, vis, pixels, labels, im01)
      out = jax.device_get(out)
      if stats is not None:
        stats["device"] = stats.get("device", 0.0) + time.perf_counter() - t0
        stats["batches"] = stats.get("batches", 0) + 1
      for j, q in enumerate(qs):
        toks = out["tokens"][j, : int(out["lengths"][j])]
        n = stop_length(tok, toks, stop_ids)
        gen_ids = [int(x) for x in toks[:n]]
        usable = len(seg_positions(gen_ids, opts.seg_id))
        m = min(usable, opts.max_masks)
        results.append(RowResult(gen_ids, q, np.asarray(out["masks"][j, :m]), usable - m,
                                 int(out["num_visual"][j]), int(out["kept_visual"][j]),
                                 np.asarray(out["keep_index"][j])))
    return results
  return run_rows


def prediction(tok, fname: str, res: RowResult, size) -> tuple[dict, np.ndarray]:
  """GLaMM's prediction record for one image (caption and phrases of `process_and_save_output`,
  masks resized, cropped and thresholded to the original (w,h)), and those masks bool [S,h,w]."""
  from eval import gcg_output
  from eval.omg_llava_image import masks_to_image
  from eval.omg_llava_inputs import parse_answer
  caption, phrases = parse_answer(tok, res.generated)
  w, h = size
  masks = (masks_to_image(res.mask_logits, size) if len(res.mask_logits)
           else np.zeros((0, h, w), bool))
  return gcg_output.prediction_record(fname, caption, phrases, masks), masks


def visual_retention(options: OmgGCGOptions, config, num_visual: int, kept_visual: int
                     ) -> dict:
  """Per-image token accounting against the whole visual span (257 + N)."""
  prune = options.prune
  g2 = config.num_pixel_tokens
  other = num_visual - g2                       # separator + objects
  if prune.method in ("fastv", "pdrop"):
    plan = prune.plan(config.llm.num_layers, g2)
    kept = plan.visual_counts[-1 if prune.method == "fastv" else 1] + other
    avg = sum((e - s) * (n + other) for (s, e), n in zip(plan.bounds, plan.visual_counts)) / (
        plan.num_layers * num_visual)
    return dict(kept=kept, reduction=1 - kept / num_visual, layer_avg_retention=avg)
  return dict(kept=kept_visual, reduction=1 - kept_visual / num_visual,
              layer_avg_retention=kept_visual / num_visual)


# ------------------------------------------------------------------------------------------------
# Run loop and CLI.


def run(model, tokenizer, image_dir, out_dir, options: OmgGCGOptions, batch_size: int = 1,
        limit: int | None = None, progress: bool = True, retry: bool = True,
        max_pictures: int = 4, split: bool = False, mesh=None) -> dict:
  """GCG over every pending image of `image_dir` (one prediction JSON each in
  `out_dir/predictions/`, atomically; finished images are skipped); returns the run record,
  also written to `out_dir/run.json`. `split`: see `OmgGCGRunner`.

  `mesh` (see `models.mesh`; one process): the parameters are placed by their logical axis names
  and each device batch of `batch_size` rows is split over the mesh's batch axes. Several
  processes are refused: the question retry re-runs a data-dependent subset of rows, which the
  processes would have to agree on batch by batch (give each host its own image folder instead).
  """
  from tqdm import tqdm
  from eval import multihost
  from eval.run_gcg import _save_picture, _write_json, list_images
  from models import mesh as mesh_lib
  from models import placement

  cfg = model.config
  if mesh is not None:
    if jax.process_count() > 1:
      raise ValueError(f"OMG-LLaVA GCG runs in one process per mesh ({jax.process_count()} "
                       "processes found): the question retry is decided per host; run one "
                       "process per host on its own share of the images")
    mesh_lib.check_divisible(cfg, mesh, batch_size)
    model = placement.place_model(model, mesh)
  pred_dir = os.path.join(out_dir, "predictions")
  os.makedirs(pred_dir, exist_ok=True)
  names = list_images(image_dir)
  by_id = {f[:-4]: f for f in names}          # the image_id: the file name minus 4 characters
  todo = [by_id[i] for i in multihost.pending(list(by_id), pred_dir)]
  if limit is not None:
    todo = todo[:limit]
  runner = OmgGCGRunner(model, options, split=split)
  prompts = question_prompts(tokenizer, cfg)
  stats = dict(host_preprocess=0.0, device=0.0, postprocess_and_write=0.0, batches=0)
  questions_used = [0] * len(GCG_QUESTIONS)
  acc = dict(segs_beyond_max_masks=0, no_mask_answers=0, visual=0, kept=0, reduction=0.0,
             layer_avg_retention=0.0)
  pictures, done, t_start = [], 0, time.perf_counter()
  bar = tqdm(total=len(todo), desc="GCG omg_llava", unit="img", disable=not progress)
  for start in range(0, len(todo), batch_size):
    batch = todo[start:start + batch_size]
    t0 = time.perf_counter()
    images = [host_image(os.path.join(image_dir, f), cfg, options) for f in batch]
    stats["host_preprocess"] += time.perf_counter() - t0
    run_rows = make_row_runner(runner, prompts, images, batch_size, tokenizer, stats, mesh)
    results, _ = answer_with_retry(run_rows, len(batch), options.seg_id, retry)
    t2 = time.perf_counter()
    records = {}
    for fname, img, res in zip(batch, images, results):
      rec, masks = prediction(tokenizer, fname, res, img[1])
      records[fname[:-4]] = rec
      questions_used[res.question] += 1
      acc["segs_beyond_max_masks"] += res.segs_beyond_max
      acc["no_mask_answers"] += int(not rec["pred_masks"])
      r = visual_retention(options, cfg, res.num_visual, res.kept_visual)
      acc["visual"] += res.num_visual
      acc["kept"] += r["kept"]
      acc["reduction"] += r["reduction"]
      acc["layer_avg_retention"] += r["layer_avg_retention"]
      if len(pictures) < max_pictures:
        pictures.append(_save_picture(os.path.join(image_dir, fname), masks, rec["caption"],
                                      os.path.join(out_dir, "pictures", f"{fname[:-4]}.png")))
    multihost.write_predictions(pred_dir, records)
    stats["postprocess_and_write"] += time.perf_counter() - t2
    done += len(records)
    bar.update(len(records))
  bar.close()
  elapsed = time.perf_counter() - t_start
  n = max(done, 1)
  record = dict(model="omg_llava", images_done=done, images_total=len(names), seconds=elapsed,
                images_per_second=done / elapsed if done else 0.0, batch_size=batch_size,
                retry=retry, split_programs=split, questions_used=questions_used,
                device_batches=stats.pop("batches"), seconds_per_stage=stats,
                segs_beyond_max_masks=acc["segs_beyond_max_masks"],
                answers_without_masks=acc["no_mask_answers"],
                mean_visual_tokens=acc["visual"] / n, mean_visual_kept=acc["kept"] / n,
                mean_reduction=acc["reduction"] / n,
                mean_layer_avg_retention=acc["layer_avg_retention"] / n,
                pictures=pictures, options=repr(options), device=str(jax.devices()[0]),
                mesh=None if mesh is None else dict(mesh.shape))
  _write_json(os.path.join(out_dir, "run.json"), record)
  return record


def build_options(args, tok, config) -> OmgGCGOptions:
  from eval.omg_llava_tokenizer import IM_END_TOKEN, SEG_TOKEN, token_id
  extra = {}
  if args.pdrop_layers:
    extra["pdrop_layers"] = tuple(int(x) for x in args.pdrop_layers.split(","))
  if args.pdrop_ratios:
    extra["pdrop_base_ratios"] = tuple(float(x) for x in args.pdrop_ratios.split(","))
  prune = gcg.PruneConfig(method=args.prune, keep_ratio=args.keep_ratio,
                          altp=altp_jax.ALTPConfig(density=args.density, score="feature_norm"),
                          superpixels=args.superpixels, positions=args.positions,
                          fastv_layer=args.fastv_layer, seed=args.seed, **extra)
  if args.prune in ("fastv", "pdrop"):
    prune.plan(config.llm.num_layers, config.num_pixel_tokens)     # fail early on bad layers
  im_end = token_id(tok, IM_END_TOKEN)
  sampler = gen.SamplerConfig(max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                              pad_id=tok.eos_id, stop_ids=(im_end,))
  return OmgGCGOptions(prune=prune, sampler=sampler, seg_id=token_id(tok, SEG_TOKEN),
                       max_masks=args.max_segs, score=args.omg_score,
                       include_objects=args.include_objects)


def parse_args(argv=None):
  from eval import run_gcg
  p = argparse.ArgumentParser(prog="python -m eval.gcg --model omg_llava",
                              description="OMG-LLaVA GCG with visual-token pruning")
  p.add_argument("--model", default="omg_llava", choices=("glamm", "omg_llava"))
  p.add_argument("--checkpoint", "--ckpt", required=True,
                 help="directory written by `python -m convert omg_llava` (with the tokenizer)")
  p.add_argument("--images", required=True, help="folder of images (GranDf val_test images)")
  p.add_argument("--keep-ratio", type=float, default=1.0,
                 help="fraction of the 256 pixel tokens kept (0.1 = 90%% reduction of them)")
  p.add_argument("--omg-score", default="feature_norm", choices=SCORES,
                 help="pixel-token score for altp/topk (no CLS token in ConvNeXt)")
  p.add_argument("--include-objects", action="store_true",
                 help="object tokens join the pre-LLM budget (altp, topk, random)")
  p.add_argument("--omg-retry", action=argparse.BooleanOptionalAction, default=True,
                 help="ask the next GCG question until an answer has a [SEG] (reference rule)")
  p.add_argument("--superpixels", default="host", choices=("host", "device"))
  p.add_argument("--density", default="dispersion", help="ALTP density option")
  p.add_argument("--pdrop-layers", default=None, help="comma list (default 2,8,16,24)")
  p.add_argument("--pdrop-ratios", default=None, help="comma list (default 1,0.5,0.25,0.125)")
  p.add_argument("--seed", type=int, default=0, help="seed of --prune random")
  p.add_argument("--split-programs", action="store_true",
                 help="compile the vision encoder once and the pruning + LLM program per "
                      "options (two programs) instead of one program per options")
  run_gcg.add_run_options(p, out="out/gcg_omg_llava", max_new_tokens=MAX_NEW_TOKENS,
                          max_segs=DEFAULT_MAX_MASKS, mesh_default="default: the first device")
  args = p.parse_args(argv)
  run_gcg.check_run_options(p, args)
  return args


def main(argv=None):
  """`python -m eval.gcg --model omg_llava ...` (dispatched from eval/run_gcg.py)."""
  from convert.load import load_omg_llava
  from eval.omg_llava_tokenizer import load_omg_llava_tokenizer
  from eval import run_gcg
  from models import mesh as mesh_lib
  from models.llama import fuse

  args = parse_args(argv)
  mesh = mesh_lib.make_mesh(args.mesh) if args.mesh else None   # one process, first device
  tok = load_omg_llava_tokenizer(args.checkpoint, add_missing=True)
  model = load_omg_llava(args.checkpoint, mesh=mesh)
  if model.config.llm.vocab_size < len(tok):
    raise ValueError(f"{args.checkpoint}: the tokenizer has {len(tok)} ids, the model's "
                     f"vocabulary only {model.config.llm.vocab_size}")
  options = build_options(args, tok, model.config)
  if args.fuse_projections and fuse.should_fuse(mesh):
    fuse.fuse_projections(model.llm)   # in place: this model is loaded for this run only
  record = run(model, tok, args.images, args.out, options, args.batch_size, args.limit,
               progress=not args.no_progress, retry=args.omg_retry, split=args.split_programs,
               mesh=mesh)
  print(json.dumps({k: v for k, v in record.items() if k != "options"}, indent=2))
  if args.annotations and not args.skip_eval:
    return run_gcg.evaluate_and_report(args.out, args.annotations, args.split, record, args.bert,
                                       only_predicted=args.limit is not None)
  return record
