"""Generation for LLaMA-style decoders: one jitted prefill and a `lax.while_loop` decode.

Shapes are static end to end: the prompt is padded to a bucket length `T`, every KV cache holds
`T_s + max_new_tokens` slots, and in-LLM pruning (FastV, PyramidDrop) shortens the sequence to
static per-stage lengths `T_s = T - (N - n_s)`. Nothing recompiles per image; only a new bucket,
batch size, plan or sampler does.

The loop follows the shape of gemma's `_sampler_loop`: a dataclass state carried through
`lax.while_loop`, a token budget and an all-rows-done stop, greedy by default. Per-row EOS stops
a row (later tokens are `pad_id`); rows keep their own prompt lengths (right padding) because
every cache slot carries a valid bit and attention is causal by slot.

In-LLM pruning is a `PrunePlan`: stages of layers, each with its own cache and its own number of
visual tokens. At a stage boundary the last prompt token's attention scores the surviving visual
tokens (FastV: the previous layer's own q/k; PyramidDrop: the next layer's norm + q/k + RoPE) and
the top ones are kept. Selection happens once, at prefill; decode steps attend to the kept subset.
`PrunePlan.mode` says how the drop is applied (both modes share the scoring and selection code and
give the same tokens, hidden states and kept sets; tests/test_generate_mask_mode.py):

- `gather` (default, the fast one): hidden states, positions and masks are gathered to the
  shorter static length `T_s`, and every stage has its own cache of `T_s + max_new` slots, so the
  later layers really compute on (and cache) fewer tokens.
- `mask` (the reference, FastV's own ablation mode): the sequence keeps its full length `T` in
  every layer and every stage's cache has the full `T + max_new` slots (one slot layout for all
  layers, split by stage only so that each stage carries its own key-valid bits). A dropped visual
  token's key-valid bit is False for all later stages, at prefill and during decode, so no later
  layer attends to it; its hidden state keeps being computed (nobody reads it). Costs full FLOPs
  and a full-length KV cache (`plan.stage_lengths` reports the full `T`): use it as the reference
  that gather mode is checked against, and for accuracy ablations.

In both modes `compact` positions renumber the surviving tokens contiguously after every drop
(mask mode renumbers the surviving slots in place, so RoPE phases equal gather mode's).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from altp_jax import attention_scores
from altp_jax import fastv as fastv_lib
from altp_jax import gather
from altp_jax import pyramid_drop
from altp_jax import ranking

POSITION_MODES = ("original", "compact")
PRUNE_MODES = ("gather", "mask")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding options (static under jit).

  Attributes:
    max_new_tokens: generated tokens per row at most (GLaMM: 512).
    eos_id: end-of-sequence id; the EOS token is kept in the output.
    pad_id: written after a row has finished.
    temperature: 0 means greedy argmax (ties to the lowest id, as torch); > 0 samples.
    top_p: nucleus sampling threshold when sampling.
    ignore_eos: never stop early (benchmarks force a fixed number of new tokens).
    stop_ids: further ids that end a row like `eos_id` (kept in the output too), e.g.
      OMG-LLaVA's `<|im_end|>` next to EOS; empty (the default) leaves `eos_id` alone.
  """

  max_new_tokens: int = 512
  eos_id: int = 2
  pad_id: int = 0
  temperature: float = 0.0
  top_p: float = 1.0
  ignore_eos: bool = False
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplerConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"SamplerConfig.temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p={self.top_p} must be in (0, 1]")
    if not isinstance(self.stop_ids, tuple) or not all(isinstance(i, int) for i in self.stop_ids):
      raise ValueError(f"SamplerConfig.stop_ids={self.stop_ids!r} must be a tuple of ints")

  def is_stop(self, tokens: jax.Array) -> jax.Array:
    """Where `tokens` end a row: `eos_id` or one of `stop_ids` (never with `ignore_eos`)."""
    stop = tokens == self.eos_id
    for i in self.stop_ids:
      stop = stop | (tokens == i)
    return stop & (not self.ignore_eos)


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  """Static in-LLM pruning plan.

  Attributes:
    bounds: `((start, end), ...)` layer ranges of the stages, covering `[0, L)` in order.
    visual_counts: visual tokens present in each stage; the first is the input count.
    score: `fastv` (layer end-1's own last-query attention) or `pdrop` (the next layer's).
    positions: `original` (kept tokens keep their position ids) or `compact` (renumbered).
    mode: `gather` (dropped tokens are removed: shorter sequence and cache per stage, the fast
      one) or `mask` (full length everywhere, dropped tokens' key-valid bits cleared: the
      reference); see the module docstring.
  """

  bounds: tuple[tuple[int, int], ...]
  visual_counts: tuple[int, ...]
  score: str = "fastv"
  positions: str = "original"
  mode: str = "gather"

  def __post_init__(self):
    if len(self.bounds) != len(self.visual_counts) or not self.bounds:
      raise ValueError(f"PrunePlan needs one visual count per stage: {self}")
    if self.bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(self.bounds, self.bounds[1:])):
      raise ValueError(f"PrunePlan.bounds={self.bounds} must tile the layers from 0")
    if any(b > a for a, b in zip(self.visual_counts, self.visual_counts[1:])):
      raise ValueError(f"PrunePlan.visual_counts={self.visual_counts} must not grow")
    if self.score not in ("fastv", "pdrop") or self.positions not in POSITION_MODES:
      raise ValueError(f"PrunePlan score={self.score!r} positions={self.positions!r}")
    if self.mode not in PRUNE_MODES:
      raise ValueError(f"PrunePlan.mode={self.mode!r}; expected one of {PRUNE_MODES}")

  @classmethod
  def none(cls, num_layers: int, n: int, mode: str = "gather") -> "PrunePlan":
    return cls(((0, num_layers),), (n,), mode=mode)

  @classmethod
  def fastv(cls, num_layers: int, n: int, config: fastv_lib.FastVConfig,
            mode: str = "gather") -> "PrunePlan":
    if not config.layer < num_layers:
      raise ValueError(f"FastV layer {config.layer} must be < num_layers {num_layers}")
    return cls(((0, config.layer), (config.layer, num_layers)), (n, config.kept(n)), "fastv",
               config.positions, mode)

  @classmethod
  def pdrop(cls, n: int, schedule: pyramid_drop.PyramidSchedule,
            mode: str = "gather") -> "PrunePlan":
    return cls(schedule.stage_bounds(), (n,) + schedule.kept_counts(n), "pdrop",
               schedule.positions, mode)

  @property
  def num_layers(self) -> int:
    return self.bounds[-1][1]

  def kept_lengths(self, t: int) -> tuple[int, ...]:
    """Tokens that survive into each stage for a prompt of `t` slots: `t - (N - n_s)`."""
    return tuple(t - (self.visual_counts[0] - n) for n in self.visual_counts)

  def stage_lengths(self, t: int) -> tuple[int, ...]:
    """Sequence length each stage computes on (and caches) for a prompt of `t` slots: the kept
    length in `gather` mode, the full `t` in every stage in `mask` mode."""
    if self.mode == "mask":
      return (t,) * len(self.bounds)
    return self.kept_lengths(t)

  def average_visual_retention(self) -> float:
    n0 = self.visual_counts[0]
    return sum((e - s) * n / n0 for (s, e), n in zip(self.bounds, self.visual_counts)) / (
        self.num_layers)


@struct.dataclass
class GenerationOutput:
  """What `generate` returns.

  Attributes:
    tokens: [B, max_new] int32 generated ids; `pad_id` after a row's EOS.
    lengths: [B] int32 number of generated tokens including EOS.
    hidden: [B, max_new, D] final-norm hidden state whose logits produced `tokens[:, t]` (GLaMM
      reads each [SEG]'s mask embedding from exactly this state).
    keep_index: [B, T_last] int32 prompt slots that survived in the last stage, ascending
      (`T_last = plan.kept_lengths(T)[-1]` in both modes; identity when nothing was pruned
      inside the LLM).
  """

  tokens: jax.Array
  lengths: jax.Array
  hidden: jax.Array
  keep_index: jax.Array


@struct.dataclass
class _LoopState:
  step: jax.Array
  tokens: jax.Array
  hidden: jax.Array
  done: jax.Array
  logits: jax.Array
  caches: tuple
  next_pos: tuple
  rng: jax.Array


def _sample(logits, rng, sampler: SamplerConfig):
  """[B, V] float32 logits -> [B] int32 ids."""
  if sampler.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampler.temperature
  if sampler.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= sampler.top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _stage_scores(llm, plan: PrunePlan, out, end, x, pos, last, key_valid):
  """Last-query attention [B, T_s] of a stage boundary (shared by both modes).

  FastV reads layer end-1's own q/k (`out[2]` of `run_layers(..., return_qk=True)`); PyramidDrop
  computes layer `end`'s q/k on the stage output. `last` [B] is the scoring query's slot and
  `key_valid` [B, T_s] the keys it may see (the stage's attention keys).
  """
  if plan.score == "fastv":
    q, k = out[2]
  else:
    q, k = llm.layer_query_key(end, x, pos)
  return attention_scores.last_query_scores(attention_scores.take_rows(q, last), k, key_valid)


def _select_visual(scores, vis, n_s: int, k: int):
  """The stage's keep decision: top `k` of the `n_s` visual slots marked by `vis` [B, T_s].

  Returns [B, T_s] bool, True on every slot not marked by `vis` and on the kept visual slots.
  """
  vis_scores = gather.visual_values(scores, vis, n_s)                         # [B, n_s]
  prio = jax.vmap(ranking.priority)(vis_scores)
  _, top = jax.lax.top_k(prio, k)
  return gather.sequence_keep_mask(vis, ranking.keep_mask(top, n_s))


def _last_true_index(mask):
  """[B, T] bool -> [B] int32 index of each row's last True slot (holes allowed)."""
  t = mask.shape[-1]
  return jnp.max(jnp.where(mask, jnp.arange(t, dtype=jnp.int32), -1), axis=-1)


def _first_true_index(mask):
  """[B, T] bool -> [B] int32 index of each row's first True slot."""
  return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _prefill(llm, embeds, positions, valid, visual_mask, plan: PrunePlan, max_new: int):
  """Runs the prompt through every stage, pruning between stages.

  Returns (caches, keep_index [B, T_last] into the original slots, final-norm hidden of each
  row's last prompt token [B, D], each stage's first decode position [B], and the stage lengths
  (each stage's cache slot where decoding starts)).
  """
  if plan.mode == "mask":
    return _prefill_mask(llm, embeds, positions, valid, visual_mask, plan, max_new)
  b, t, _ = embeds.shape
  x, pos, val, vis = embeds, positions, valid, visual_mask
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  lengths = plan.stage_lengths(t)
  caches, stage_next_pos = [], []
  for s, ((start, end), n_s) in enumerate(zip(plan.bounds, plan.visual_counts)):
    cache = llm.init_cache(b, lengths[s] + max_new, start, end)
    # Gathers are stable and text is never dropped, so the prompt stays contiguous at the front.
    last = attention_scores.last_query_index(val)
    stage_next_pos.append(attention_scores.take_rows(pos, last) + 1)
    is_last_stage = s == len(plan.bounds) - 1
    need_own_qk = not is_last_stage and plan.score == "fastv"
    # Right-padded prompts stay right-padded through the stable gathers: `val` is a prefix.
    out = llm.run_layers(x, pos, start, end, cache=cache, cache_write_index=0, key_valid=val,
                         return_qk=need_own_qk, valid_is_prefix=True)
    x, cache = out[0], out[1]
    caches.append(cache)
    if is_last_stage:
      break
    scores = _stage_scores(llm, plan, out, end, x, pos, last, val)
    keep_all = _select_visual(scores, vis, n_s, plan.visual_counts[s + 1])
    x, order, _ = gather.gather_kept(x, keep_all, lengths[s + 1])
    pos = gather.kept_positions(keep_all, order, plan.positions, pos)
    val = jnp.take_along_axis(val, order, axis=1)
    vis = jnp.take_along_axis(vis, order, axis=1)
    index = jnp.take_along_axis(index, order, axis=1)
  hidden = llm.final_norm(attention_scores.take_rows(x, attention_scores.last_query_index(val)))
  return tuple(caches), index, hidden, tuple(stage_next_pos), lengths


def _prefill_mask(llm, embeds, positions, valid, visual_mask, plan: PrunePlan, max_new: int):
  """`_prefill` in mask mode: full length `T` in every stage, drops clear key-valid bits.

  `alive` [B, T] marks the slots not dropped so far (all text and padding, surviving visual
  tokens). Stage s attends to keys `valid & alive_s` (written into its cache's valid bits, so
  decode steps never see dropped tokens either), while `valid` alone (prompt-valid) still
  defines the prompt. The scoring query is the last prompt slot that is alive, which is the gather
  mode's `sum(valid) - 1` after its gathers (the last real prompt token unless that was a dropped
  visual token); key validity has holes here, so it is found by index, not by a count.
  """
  b, t, _ = embeds.shape
  x, pos = embeds, positions
  alive = jnp.ones((b, t), jnp.bool_)
  lengths = plan.stage_lengths(t)                                             # (t,) * stages
  caches, stage_next_pos = [], []
  for s, ((start, end), n_s) in enumerate(zip(plan.bounds, plan.visual_counts)):
    key_valid = valid & alive
    cache = llm.init_cache(b, t + max_new, start, end)
    last = _last_true_index(key_valid)
    stage_next_pos.append(attention_scores.take_rows(pos, last) + 1)
    is_last_stage = s == len(plan.bounds) - 1
    need_own_qk = not is_last_stage and plan.score == "fastv"
    out = llm.run_layers(x, pos, start, end, cache=cache, cache_write_index=0,
                         key_valid=key_valid, return_qk=need_own_qk)
    x, cache = out[0], out[1]
    caches.append(cache)
    if is_last_stage:
      break
    scores = _stage_scores(llm, plan, out, end, x, pos, last, key_valid)
    # Only the surviving visual slots are ranked; dropped ones are neither candidates nor keys.
    keep_all = _select_visual(scores, visual_mask & alive, n_s, plan.visual_counts[s + 1])
    new_alive = alive & keep_all
    if plan.positions == "compact":
      # Gather mode numbers its kept slots first + 0, 1, ... where `first` is the position of
      # its slot 0, i.e. of the first slot alive in this stage; renumber the same slots in place.
      first = attention_scores.take_rows(pos, _first_true_index(alive))[:, None]
      pos = first + jnp.cumsum(new_alive.astype(jnp.int32), axis=-1) - 1
    alive = new_alive
  hidden = llm.final_norm(attention_scores.take_rows(x, _last_true_index(valid & alive)))
  # The surviving slots in order: the same array gather mode's composed gathers produce.
  t_last = plan.kept_lengths(t)[-1]
  iota = jnp.arange(t, dtype=jnp.int32)
  index = jnp.argsort(jnp.where(alive, iota, t + iota), axis=-1)[:, :t_last].astype(jnp.int32)
  return tuple(caches), index, hidden, tuple(stage_next_pos), lengths


def _decode_step(llm, token, caches, next_pos, lengths, step, last_step=None):
  """One token through every stage: [B] ids -> (final-norm hidden [B, D], new caches).

  `last_step` (static): a bound on `step`; attention then reads only the cache slots steps up
  to it can have written (stage prompt length + last_step - 1)."""
  x = llm.embed(token[:, None])
  new_caches = []
  for (start, end), cache, pos, t_s in zip(_bounds(caches), caches, next_pos, lengths):
    limit = None if last_step is None else t_s + last_step
    x, cache = llm.run_layers(x, (pos + step - 1)[:, None], start, end, cache=cache,
                              cache_write_index=t_s + step - 1, key_limit=limit)
    new_caches.append(cache)
  return llm.final_norm(x)[:, 0], tuple(new_caches)


def _bounds(caches):
  out, start = [], 0
  for c in caches:
    out.append((start, start + c.num_layers))
    start += c.num_layers
  return out


def generate_fn(llm, embeds, valid, visual_mask, rng, positions=None, *, plan: PrunePlan,
                sampler: SamplerConfig) -> GenerationOutput:
  """Traceable generation (call inside your own jit, or use `generate`).

  Args:
    llm: a `models.llama.modeling.LlamaForCausalLM`.
    embeds: [B, T] + [D] prompt embeddings (visual tokens spliced in), right-padded.
    valid: [B, T] bool, real prompt tokens.
    visual_mask: [B, T] bool, the visual slots (plan.visual_counts[0] per row).
    rng: a PRNG key (used only when sampling).
    positions: [B, T] int position ids (default 0..T-1; pre-LLM pruning passes gapped ones).
    plan: the in-LLM pruning plan (`PrunePlan.none` for none); `plan.mode` picks gather (fast)
      or mask (full-length reference) application of its drops.
    sampler: decoding options.

  Returns:
    `GenerationOutput`.
  """
  b, t, _ = embeds.shape
  if plan.num_layers != llm.config.num_layers:
    raise ValueError(f"PrunePlan covers {plan.num_layers} layers; the model has "
                     f"{llm.config.num_layers}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  max_new = sampler.max_new_tokens
  caches, index, hidden0, next_pos, lengths = _prefill(
      llm, embeds, positions.astype(jnp.int32), valid, visual_mask, plan, max_new)
  logits0 = llm.logits(hidden0[:, None])[:, 0]
  rng, sub = jax.random.split(rng)
  tok0 = _sample(logits0, sub, sampler)
  tokens = jnp.full((b, max_new), sampler.pad_id, jnp.int32).at[:, 0].set(tok0)
  hidden = jnp.zeros((b, max_new, hidden0.shape[-1]), hidden0.dtype).at[:, 0].set(hidden0)
  done = sampler.is_stop(tok0)
  state = _LoopState(step=jnp.int32(1), tokens=tokens, hidden=hidden, done=done, logits=logits0,
                     caches=caches, next_pos=next_pos, rng=rng)

  def body(s, last_step):
    prev = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
    h, caches = _decode_step(llm, prev, s.caches, s.next_pos, lengths, s.step, last_step)
    logits = llm.logits(h[:, None])[:, 0]
    rng, sub = jax.random.split(s.rng)
    tok = jnp.where(s.done, sampler.pad_id, _sample(logits, sub, sampler))
    done = s.done | sampler.is_stop(tok)
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.step, axis=1)
    hidden = jax.lax.dynamic_update_index_in_dim(s.hidden, h.astype(s.hidden.dtype), s.step,
                                                 axis=1)
    return _LoopState(step=s.step + 1, tokens=tokens, hidden=hidden, done=done, logits=logits,
                      caches=caches, next_pos=s.next_pos, rng=rng)

  # Steps 1 .. max_new - 1 in a few phases, each its own loop with a static bound on the cache
  # slots its steps can see: a step reads the KV cache up to its phase's end rather than the
  # whole buffer (decode is bound by reading the cache). The phases run back to back; a finished
  # batch leaves every remaining loop at once.
  for _, last in _decode_phases(max_new):
    state = jax.lax.while_loop(
        lambda s, last=last: (s.step <= last) & ~jnp.all(s.done),
        functools.partial(body, last_step=last), state)
  is_eos = sampler.is_stop(state.tokens)
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, state.step)
  return GenerationOutput(tokens=state.tokens, lengths=first_eos.astype(jnp.int32),
                          hidden=state.hidden, keep_index=index)


# Decode loops per generation: more phases read less of the cache's empty tail (4 phases of 64
# steps read ~3% fewer slots than one loop at a 640-token prompt), each costing one more loop body
# to compile.
DECODE_PHASES = 4


def _decode_phases(max_new: int, phases: int = DECODE_PHASES) -> list[tuple[int, int]]:
  """Inclusive step ranges (first, last) splitting decode steps 1 .. max_new - 1 evenly."""
  steps = max_new - 1
  n = min(phases, steps)
  edges = [1 + steps * i // n for i in range(n + 1)] if n > 0 else []
  return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])]


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "sampler"))
def _generate_jit(graphdef, state, embeds, valid, visual_mask, rng, positions, *, plan, sampler):
  llm = nnx.merge(graphdef, state)
  return generate_fn(llm, embeds, valid, visual_mask, rng, positions, plan=plan, sampler=sampler)


def generate(llm, embeds, valid, visual_mask, *, plan: PrunePlan | None = None,
             sampler: SamplerConfig = SamplerConfig(), rng=None,
             positions=None) -> GenerationOutput:
  """Jitted generation: prefill + `lax.while_loop` decode (see `generate_fn` for shapes).

  The module's state is passed to the jitted function as an argument (not closed over), so the
  compiled program is reused across calls with the same shapes, plan and sampler.
  """
  b, t = valid.shape
  plan = PrunePlan.none(llm.config.num_layers, 0) if plan is None else plan
  if embeds.shape[:2] != (b, t) or visual_mask.shape != (b, t):
    raise ValueError(f"embeds {embeds.shape}, valid {valid.shape} and visual_mask "
                     f"{visual_mask.shape} must agree on [B, T]")
  rng = jax.random.key(0) if rng is None else rng
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  graphdef, state = nnx.split(llm)
  return _generate_jit(graphdef, state, embeds, jnp.asarray(valid, bool),
                       jnp.asarray(visual_mask, bool), rng, jnp.asarray(positions, jnp.int32),
                       plan=plan, sampler=sampler)
