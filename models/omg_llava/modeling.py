"""OMG-LLaVA in Flax NNX: the ported parts wired together for GCG inference (omg_llava.md §0-§4).

Shapes (B batch, S image side, G = S/64 token grid, Q decoder queries, C decoder width, D LLM
width, L prompt slots, V = V_max = G^2 + 1 + min(Q, G^2) visual slots, Hm = Wm = S/4; images
channels-last like every module of this repo):

- `encode_image(pixels [B,S,S,3]) -> dict`: the OMG-Seg pass in float32 (ConvNeXt -> pixel
  decoder -> Mask2Former with the fixed class embeddings -> pixel shuffle + perception prior) and
  the projector. `visual` [B,V,D] holds per row `[G^2 pixel tokens ; separator ; N_b valid object
  tokens (ascending query index)]` then zeros, `visual_valid` [B,V] marks the first G^2+1+N_b.
  Also returned: `num_visual` [B], `pixel_tokens_projected` [B,G^2,D], the cached
  `mask_features` [B,Hm,Wm,C] and `memories` (3 maps, strides 32/16/8) for [SEG] decoding,
  `owner` [B,G^2] (argmax query per cell), `query_valid` [B,Q].
- `splice(input_ids [B,L], visual_mask [B,L], valid [B,L], visual, visual_valid) ->
  (embeds [B,L,D], positions [B,L], key_valid [B,L])`: the prompt carries a static span of V
  visual slots per row; slot k of the span takes visual[b, k]; the unused tail of the span is
  key-invalid, and positions count only key-valid tokens, so every valid token gets the position
  XTuner's `prepare_inputs_labels_for_multimodal` gives it for the real 257+N span. Nothing
  recompiles when N changes.
- `pack_prompt(embeds, key_valid, visual_mask)`: the same prompt with the key-valid tokens moved
  to the front (stable), i.e. right-padded and contiguous, as `models.generate` expects.
- `llm`: the `models.llama` decoder (InternLM2 weights), called functionally:
  `model.llm(embeds, positions, key_valid=...)` -> (post-norm hidden, cache); `model.llm.logits`.
- `seg_masks(seg_hidden [B,M,D], mask_features, memories) -> [B,M,Hm,Wm]` mask logits: text2vision,
  split into query content / position (C each), one query per [SEG] through the decoder's `_llm`
  copy against the cached features of its own image; the last of the 10 predictions.
- `seg_hidden_from_generation(tokens, hidden, lengths, seg_id, max_masks)`: the post-norm states
  of generated [SEG] tokens as `get_seg_hidden_states` picks them.

Attribute names are the conversion targets: `backbone`, `pixel_decoder`, `decoder`, `projector`,
`text2vision`, `llm`, and the non-trainable `class_embed` (`Buffer` [num_classes, P, cls_dim]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama.modeling import LlamaForCausalLM
from models.omg_llava.config import OMGLLaVAConfig
from models.omg_llava.projector import OMGProjector, TextToVision
from models.omg_seg.convnext import ConvNeXt
from models.omg_seg.mask2former import Mask2FormerDecoder, l2_normalize
from models.omg_seg.pixel_decoder import MSDeformAttnPixelDecoder
from models.omg_seg.visual_tokens import visual_tokens


class Buffer(nnx.Variable):
  """A non-trainable array read from a file that is not a state dict (a torch non-persistent
  buffer): OMG-Seg's class text embeddings."""


class OMGLLaVA(nnx.Module):
  """OMG-Seg visual encoder, projector, LLM and the [SEG] mask path (see the module docstring)."""

  def __init__(self, config: OMGLLaVAConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    self.backbone = ConvNeXt(cfg.backbone, rngs=rngs)
    self.pixel_decoder = MSDeformAttnPixelDecoder(cfg.pixel_decoder, rngs=rngs)
    self.decoder = Mask2FormerDecoder(cfg.decoder, rngs=rngs)
    self.projector = OMGProjector(cfg.projector, rngs=rngs)
    self.text2vision = TextToVision(cfg.projector, rngs=rngs)
    self.llm = LlamaForCausalLM(cfg.llm, rngs=rngs)
    # Unit-norm random placeholder (the real tensor comes from the class-embedding file, see
    # convert); float32 like the file. Names: classes and prototypes are tiny axes, replicated.
    emb = jax.random.normal(rngs.params(), cfg.class_embed_shape, jnp.float32)
    self.class_embed = Buffer(l2_normalize(emb), sharding=(None, None, "vis_embed"),
                              eager_sharding=False)

  # -- image side ---------------------------------------------------------------------------------

  def encode_image(self, pixels: jax.Array, *, cell_probs: bool = False
                   ) -> dict[str, jax.Array]:
    """pixels [B,S,S,3] (CLIP-normalised, padded square, channels-last) -> the dict of the module
    docstring. The vision path runs in its own (float32) config dtypes.

    With `cell_probs` the dict also holds `cell_prob` [B,G^2] float32: each grid cell's largest
    perception-prior probability over the queries (a token score for pruning)."""
    cfg = self.config
    s = cfg.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (s, s, cfg.backbone.in_chans):
      raise ValueError(f"encode_image: pixels must be [B, {s}, {s}, {cfg.backbone.in_chans}] "
                       f"(config image_size {s}), got {pixels.shape}")
    feats = self.backbone(pixels.astype(cfg.backbone.dtype))
    mask_features, memories = self.pixel_decoder(feats)
    dec = self.decoder(mask_features, memories, self.class_embed[...])
    vt = visual_tokens(feats[-1], dec, image_size=s)
    tokens, valid = self.projector(vt["pixel_tokens"], vt["query_pos_feat"], vt["valid"])
    # Valid object tokens are packed to the front and there are at most min(Q, G^2) of them, so
    # the slots past V_max are always invalid: drop them for a shorter static span.
    v = cfg.num_visual_tokens_max
    tokens, valid = tokens[:, :v], valid[:, :v]
    out = dict(visual=tokens, visual_valid=valid,
               num_visual=jnp.sum(valid.astype(jnp.int32), axis=1),
               pixel_tokens_projected=tokens[:, :cfg.num_pixel_tokens],
               mask_features=mask_features, memories=list(memories), owner=vt["owner"],
               query_valid=vt["valid"])
    if cell_probs:
      out["cell_prob"] = vt["cell_prob"]
    return out

  # -- text side ----------------------------------------------------------------------------------

  def splice(self, input_ids: jax.Array, visual_mask: jax.Array, valid: jax.Array,
             visual: jax.Array, visual_valid: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LLM inputs with the visual span filled.

    Args:
      input_ids: [B,L] int; ids at visual slots are ignored.
      visual_mask: [B,L] bool, V contiguous True slots per row (the visual span).
      valid: [B,L] bool, the prompt (text and the whole visual span), False on padding.
      visual: [B,V,D] from `encode_image`.
      visual_valid: [B,V] bool from `encode_image`.
    Returns:
      (embeds [B,L,D] in the LLM compute dtype, positions [B,L] int32, key_valid [B,L] bool); see
      `prompt_layout`.
    """
    b, l = input_ids.shape
    if visual_mask.shape != (b, l) or valid.shape != (b, l):
      raise ValueError(f"splice: input_ids {input_ids.shape}, visual_mask {visual_mask.shape} and "
                       f"valid {valid.shape} must all be [B, L]")
    if visual.ndim != 3 or visual.shape[0] != b or visual_valid.shape != visual.shape[:2]:
      raise ValueError(f"splice: visual {visual.shape} / visual_valid {visual_valid.shape} must be "
                       f"[B, V, D] / [B, V] with B = {b}")
    visual_mask = visual_mask.astype(jnp.bool_)
    positions, key_valid, slot = prompt_layout(visual_mask, valid, visual_valid)
    embeds = self.llm.embed(jnp.where(visual_mask, 0, input_ids))
    vis = jnp.take_along_axis(visual, slot[..., None], axis=1).astype(embeds.dtype)
    embeds = jnp.where(visual_mask[..., None], vis, embeds)
    return embeds, positions, key_valid

  def forward(self, pixels: jax.Array, input_ids: jax.Array, visual_mask: jax.Array,
              valid: jax.Array) -> dict[str, jax.Array]:
    """One uncached pass: `encode_image`'s dict plus logits [B,L,V] f32, post-norm hidden
    [B,L,D], positions and key_valid [B,L] (logits are meaningful where key_valid)."""
    out = self.encode_image(pixels)
    embeds, positions, key_valid = self.splice(input_ids, visual_mask, valid, out["visual"],
                                               out["visual_valid"])
    hidden, _ = self.llm(embeds, positions, key_valid=key_valid)
    return dict(out, logits=self.llm.logits(hidden), hidden=hidden, positions=positions,
                key_valid=key_valid)

  # -- masks --------------------------------------------------------------------------------------

  def seg_masks(self, seg_hidden: jax.Array, mask_features: jax.Array,
                memories: list[jax.Array]) -> jax.Array:
    """seg_hidden [B,M,D] (post-norm LLM states of [SEG] inputs), the cached mask_features
    [B,Hm,Wm,C] and memories -> mask logits [B,M,Hm,Wm] (float32). Rows of unused [SEG] slots
    give finite garbage; mask them with the caller's valid bits."""
    b, m, d = seg_hidden.shape
    if d != self.config.llm.hidden_size or mask_features.shape[0] != b:
      raise ValueError(f"seg_masks: seg_hidden {seg_hidden.shape} must be [B, M, "
                       f"{self.config.llm.hidden_size}] with B = mask_features' "
                       f"{mask_features.shape[0]}")
    c = self.config.decoder.embed_dim
    z = self.text2vision(seg_hidden.astype(self.config.projector.dtype)).reshape(b * m, 2 * c)
    batch_idx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), m)
    masks = self.decoder.forward_llm_seg(z[:, :c], z[:, c:], mask_features, memories,
                                         batch_idx=batch_idx)
    return masks.reshape((b, m) + masks.shape[1:])


# -- prompt layout helpers (traceable) -------------------------------------------------------------

def prompt_layout(visual_mask: jax.Array, valid: jax.Array, visual_valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions and key validity of a prompt with a static visual span.

  Args:
    visual_mask: [B,L] bool, the V slots of the visual span (in order).
    valid: [B,L] bool, prompt slots (False on padding).
    visual_valid: [B,V] bool, which span slots hold a real visual token.
  Returns:
    positions [B,L] int32: 0, 1, ... counted over key-valid slots only (a key-invalid slot gets
      the position of the next valid one; nothing reads it);
    key_valid [B,L] bool: valid, minus the unused visual slots;
    slot [B,L] int32: index into the span of each visual slot (clamped, 0 elsewhere).
  """
  visual_mask = visual_mask.astype(jnp.bool_)
  v = visual_valid.shape[1]
  slot = jnp.clip(jnp.cumsum(visual_mask.astype(jnp.int32), axis=1) - 1, 0, v - 1)
  vis_ok = jnp.take_along_axis(visual_valid.astype(jnp.bool_), slot, axis=1)
  key_valid = valid.astype(jnp.bool_) & (~visual_mask | vis_ok)
  positions = jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - key_valid.astype(jnp.int32)
  return positions.astype(jnp.int32), key_valid, jnp.where(visual_mask, slot, 0)


def pack_prompt(embeds: jax.Array, key_valid: jax.Array, visual_mask: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Moves the key-valid slots to the front (order kept): the right-padded, contiguous layout of
  `models.generate` (positions 0..n-1 are then the default `arange`).

  Returns (embeds [B,L,D], valid [B,L] (a prefix per row), visual_mask [B,L] (the real visual
  tokens only), index [B,L] int32: the original slot of each packed slot).
  """
  l = key_valid.shape[1]
  iota = jnp.arange(l, dtype=jnp.int32)
  index = jnp.argsort(jnp.where(key_valid, iota, l + iota), axis=1).astype(jnp.int32)
  kv = jnp.take_along_axis(key_valid.astype(jnp.bool_), index, axis=1)
  vm = jnp.take_along_axis(visual_mask.astype(jnp.bool_), index, axis=1) & kv
  return jnp.take_along_axis(embeds, index[..., None], axis=1), kv, vm, index


def seg_hidden_from_generation(tokens: jax.Array, hidden: jax.Array, lengths: jax.Array,
                               seg_id: int, max_masks: int) -> tuple[jax.Array, jax.Array]:
  """`get_seg_hidden_states` on `models.generate` output.

  The state of a generated [SEG] at index i is the one computed when that token is fed back,
  i.e. `hidden[:, i + 1]` (GenerationOutput.hidden[:, t] produced tokens[:, t]); a [SEG] that is
  the last generated token (i = length - 1) has none and is dropped, as in the reference.

  Args:
    tokens: [B,T] int generated ids; hidden: [B,T,D]; lengths: [B] generated count (incl. EOS).
    seg_id: the [SEG] id; max_masks: static M.
  Returns:
    (seg_hidden [B,M,D] (the first M usable [SEG]s in order, zeros after), seg_valid [B,M]).
  """
  b, t = tokens.shape
  if hidden.shape[:2] != (b, t) or lengths.shape != (b,) or max_masks < 1:
    raise ValueError(f"seg_hidden_from_generation: tokens {tokens.shape}, hidden {hidden.shape}, "
                     f"lengths {lengths.shape} must be [B,T], [B,T,D], [B]; max_masks "
                     f"{max_masks} >= 1")
  iota = jnp.arange(t, dtype=jnp.int32)
  usable = (tokens == seg_id) & (iota[None, :] + 1 < lengths[:, None])
  order = jnp.argsort(jnp.where(usable, iota, t + iota), axis=1)[:, :max_masks]
  ok = jnp.take_along_axis(usable, order, axis=1)
  if max_masks > t:   # more slots than generated tokens: the extra ones are never valid
    order = jnp.pad(order, ((0, 0), (0, max_masks - t)))
    ok = jnp.pad(ok, ((0, 0), (0, max_masks - t)))
  src = jnp.minimum(order + 1, t - 1)
  h = jnp.take_along_axis(hidden, src[..., None], axis=1)
  return jnp.where(ok[..., None], h, jnp.zeros((), h.dtype)), ok


def abstract_omg_llava(config: OMGLLaVAConfig) -> OMGLLaVA:
  """The model with shapes, dtypes and logical axis names but no data (`nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: OMGLLaVA(config, rngs=nnx.Rngs(0)))
