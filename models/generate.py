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
tokens (FastV: the previous layer's own q/k; PyramidDrop: the next layer's norm + q/k + RoPE),
the top ones are kept, and hidden states, positions and masks are gathered to the shorter length.
Selection happens once, at prefill; decode steps attend to the kept subset.
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
  """

  max_new_tokens: int = 512
  eos_id: int = 2
  pad_id: int = 0
  temperature: float = 0.0
  top_p: float = 1.0
  ignore_eos: bool = False

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplerConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"SamplerConfig.temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p={self.top_p} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  """Static in-LLM pruning plan.

  Attributes:
    bounds: `((start, end), ...)` layer ranges of the stages, covering `[0, L)` in order.
    visual_counts: visual tokens present in each stage; the first is the input count.
    score: `fastv` (layer end-1's own last-query attention) or `pdrop` (the next layer's).
    positions: `original` (kept tokens keep their position ids) or `compact` (renumbered).
  """

  bounds: tuple[tuple[int, int], ...]
  visual_counts: tuple[int, ...]
  score: str = "fastv"
  positions: str = "original"

  def __post_init__(self):
    if len(self.bounds) != len(self.visual_counts) or not self.bounds:
      raise ValueError(f"PrunePlan needs one visual count per stage: {self}")
    if self.bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(self.bounds, self.bounds[1:])):
      raise ValueError(f"PrunePlan.bounds={self.bounds} must tile the layers from 0")
    if any(b > a for a, b in zip(self.visual_counts, self.visual_counts[1:])):
      raise ValueError(f"PrunePlan.visual_counts={self.visual_counts} must not grow")
    if self.score not in ("fastv", "pdrop") or self.positions not in POSITION_MODES:
      raise ValueError(f"PrunePlan score={self.score!r} positions={self.positions!r}")

  @classmethod
  def none(cls, num_layers: int, n: int) -> "PrunePlan":
    return cls(((0, num_layers),), (n,))

  @classmethod
  def fastv(cls, num_layers: int, n: int, config: fastv_lib.FastVConfig) -> "PrunePlan":
    if not config.layer < num_layers:
      raise ValueError(f"FastV layer {config.layer} must be < num_layers {num_layers}")
    return cls(((0, config.layer), (config.layer, num_layers)), (n, config.kept(n)), "fastv",
               config.positions)

  @classmethod
  def pdrop(cls, n: int, schedule: pyramid_drop.PyramidSchedule) -> "PrunePlan":
    return cls(schedule.stage_bounds(), (n,) + schedule.kept_counts(n), "pdrop",
               schedule.positions)

  @property
  def num_layers(self) -> int:
    return self.bounds[-1][1]

  def stage_lengths(self, t: int) -> tuple[int, ...]:
    """Sequence length of each stage for a prompt of `t` slots."""
    return tuple(t - (self.visual_counts[0] - n) for n in self.visual_counts)

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
    keep_index: [B, T_last] int32 prompt slots that survived in the last stage (identity when
      nothing was pruned inside the LLM).
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


def _prefill(llm, embeds, positions, valid, visual_mask, plan: PrunePlan, max_new: int):
  """Runs the prompt through every stage, pruning between stages.

  Returns (caches, last-stage positions [B,T_last], last-stage valid [B,T_last], keep_index
  [B,T_last] into the original slots, final-norm hidden of each row's last prompt token [B,D],
  and each stage's positions for decoding).
  """
  b, t, _ = embeds.shape
  x, pos, val, vis = embeds, positions, valid, visual_mask
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  lengths = plan.stage_lengths(t)
  caches, stage_next_pos = [], []
  for s, ((start, end), n_s) in enumerate(zip(plan.bounds, plan.visual_counts)):
    cache = llm.init_cache(b, lengths[s] + max_new, start, end)
    last = attention_scores.last_query_index(val)
    last_pos = attention_scores.take_rows(pos, last)
    stage_next_pos.append(last_pos + 1)
    is_last_stage = s == len(plan.bounds) - 1
    need_own_qk = not is_last_stage and plan.score == "fastv"
    out = llm.run_layers(x, pos, start, end, cache=cache, cache_write_index=0, key_valid=val,
                         return_qk=need_own_qk)
    x, cache = out[0], out[1]
    caches.append(cache)
    if is_last_stage:
      break
    if plan.score == "fastv":
      q, k = out[2]
    else:
      q, k = llm.layer_query_key(end, x, pos)
    scores = attention_scores.last_query_scores(attention_scores.take_rows(q, last), k, val)
    vis_scores = gather.visual_values(scores, vis, n_s)                        # [B, n_s]
    prio = jax.vmap(ranking.priority)(vis_scores)
    _, top = jax.lax.top_k(prio, plan.visual_counts[s + 1])
    keep_vis = ranking.keep_mask(top, n_s)
    keep_all = gather.sequence_keep_mask(vis, keep_vis)
    x, order, _ = gather.gather_kept(x, keep_all, lengths[s + 1])
    pos = gather.kept_positions(keep_all, order, plan.positions, pos)
    val = jnp.take_along_axis(val, order, axis=1)
    vis = jnp.take_along_axis(vis, order, axis=1)
    index = jnp.take_along_axis(index, order, axis=1)
  hidden = llm.final_norm(attention_scores.take_rows(x, attention_scores.last_query_index(val)))
  return tuple(caches), index, hidden, tuple(stage_next_pos), lengths


def _decode_step(llm, token, caches, next_pos, lengths, step):
  """One token through every stage: [B] ids -> (final-norm hidden [B, D], new caches)."""
  x = llm.embed(token[:, None])
  new_caches = []
  for (start, end), cache, pos, t_s in zip(_bounds(caches), caches, next_pos, lengths):
    x, cache = llm.run_layers(x, (pos + step - 1)[:, None], start, end, cache=cache,
                              cache_write_index=t_s + step - 1)
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
    plan: the in-LLM pruning plan (`PrunePlan.none` for none).
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
  done = (tok0 == sampler.eos_id) & (not sampler.ignore_eos)
  state = _LoopState(step=jnp.int32(1), tokens=tokens, hidden=hidden, done=done, logits=logits0,
                     caches=caches, next_pos=next_pos, rng=rng)

  def cond(s):
    return (s.step < max_new) & ~jnp.all(s.done)

  def body(s):
    prev = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=False)
    h, caches = _decode_step(llm, prev, s.caches, s.next_pos, lengths, s.step)
    logits = llm.logits(h[:, None])[:, 0]
    rng, sub = jax.random.split(s.rng)
    tok = jnp.where(s.done, sampler.pad_id, _sample(logits, sub, sampler))
    done = s.done | ((tok == sampler.eos_id) & (not sampler.ignore_eos))
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.step, axis=1)
    hidden = jax.lax.dynamic_update_index_in_dim(s.hidden, h.astype(s.hidden.dtype), s.step,
                                                 axis=1)
    return _LoopState(step=s.step + 1, tokens=tokens, hidden=hidden, done=done, logits=logits,
                      caches=caches, next_pos=s.next_pos, rng=rng)

  state = jax.lax.while_loop(cond, body, state)
  is_eos = (state.tokens == sampler.eos_id) & (not sampler.ignore_eos)
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, state.step)
  return GenerationOutput(tokens=state.tokens, lengths=first_eos.astype(jnp.int32),
                          hidden=state.hidden, keep_index=index)


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
