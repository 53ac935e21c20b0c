"""GLaMM in Flax NNX: the ported parts wired together for GCG inference (glamm.md §0, §4.5-4.10).

Shapes (B batch, L sequence, N visual tokens = 576, Dv CLIP width 1024, D LLM width 4096, C SAM
width 256, h = w = 64 SAM grid; images channels-last like every module of this repo):

- `encode_image(clip_pixels [B,336,336,3]) -> (visual tokens [B,N,D], CLS attention [B,N] f32)`:
  CLIP `hidden_states[vision_select_layer]` without CLS, through mm_projector; the CLS→patch
  attention of the layer that produced those features, mean over heads (ALTP's `clip_cls` score).
- `splice(input_ids [B,L], visual_tokens [B,M,D], visual_mask [B,L]) -> embeds [B,L,D]`: token
  embeddings with the image slots (visual_mask True) replaced, in order, by visual tokens.
- `llm`: the `models.llama` decoder, called functionally: `model.llm(embeds, positions, cache=...)`
  -> (post-norm hidden [B,L,D], cache); `model.llm.logits(hidden)` -> [B,L,V] f32.
- `seg_embeddings(hidden [...,D]) -> [...,C]`: text_hidden_fcs.
- `sam_embed(sam_pixels [B,1024,1024,3]) -> image embedding [B,h,w,C]` (NHWC; the PyTorch
  reference's [B,C,h,w] transposed).
- `decode_masks(seg_hidden [B,S,D], image_embedding [B,h,w,C]) -> low-res logits [B,S,4h,4w]`:
  text_hidden_fcs, one sparse prompt per [SEG] state, no mask prompt, single-mask output.
- `postprocess_masks(low_res [B,S,256,256], input_size, original_size) -> [B,S,H,W] f32 logits`
  (threshold with `> 0`).

The prompt's single `<image>` id (-200) is expanded on the host to N placeholder slots
(`expand_image_placeholder`), so every array has a static shape and pruning changes masks only.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from models.clip.modeling import CLIPVisionModel
from models.glamm.config import IMAGE_TOKEN_INDEX, GLaMMConfig
from models.llama.modeling import LlamaForCausalLM
from models.projector import MMProjector, ProjectorConfig, TextHiddenFcs
from models.sam import Sam
from models.sam.postprocess import postprocess_masks as _postprocess_masks


class GLaMM(nnx.Module):
  """Vision tower, mm_projector, LLM, text_hidden_fcs and the SAM grounding encoder.

  Attribute names follow the checkpoint's components (`convert/glamm_table.py`): `vision_tower`,
  `mm_projector`, `llm`, `text_hidden_fcs`, `grounding_encoder` (image_encoder, prompt_encoder,
  mask_decoder).
  """

  def __init__(self, config: GLaMMConfig, *, rngs: nnx.Rngs):
    self.config = config
    proj = ProjectorConfig(vision_hidden_size=config.vision.hidden_size,
                           llm_hidden_size=config.llm.hidden_size,
                           seg_embed_dim=config.text_out_dim, dtype=config.llm.dtype,
                           param_dtype=config.llm.param_dtype)
    self.vision_tower = CLIPVisionModel(config.vision, rngs=rngs)
    self.mm_projector = MMProjector(proj, rngs=rngs)
    self.llm = LlamaForCausalLM(config.llm, rngs=rngs)
    self.text_hidden_fcs = TextHiddenFcs(proj, rngs=rngs)
    self.grounding_encoder = Sam(config.sam, rngs=rngs)

  # -- image side ---------------------------------------------------------------------------------

  def encode_image(self, clip_pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """clip_pixels [B,S,S,3] (CLIP-normalised, channels-last) -> (visual tokens [B,N,D] in the LLM
    compute dtype, CLS→patch attention [B,N] float32)."""
    feats, cls_attention = self.vision_tower.features(
        clip_pixels, select_layer=self.config.vision_select_layer)
    return self.mm_projector(feats), cls_attention

  def sam_embed(self, sam_pixels: jax.Array) -> jax.Array:
    """sam_pixels [B,1024,1024,3] (SAM-normalised, padded, channels-last) -> [B,h,w,C]."""
    return self.grounding_encoder.embed_image(sam_pixels)

  # -- text side ----------------------------------------------------------------------------------

  def splice(self, input_ids: jax.Array, visual_tokens: jax.Array,
             visual_mask: jax.Array) -> jax.Array:
    """LLM input embeddings with the image slots filled.

    Args:
      input_ids: [B,L] int; ids at image slots are ignored (any value, e.g. -200).
      visual_tokens: [B,M,D]; the k-th True slot of row b receives visual_tokens[b, k].
      visual_mask: [B,L] bool, at most M True per row (fewer after pruning: the first ones are
        used, so pass the kept tokens in slot order).
    Returns:
      [B,L,D] in the LLM compute dtype.
    """
    b, l = input_ids.shape
    if visual_mask.shape != (b, l) or visual_tokens.ndim != 3 or visual_tokens.shape[0] != b:
      raise ValueError(f"splice: input_ids {input_ids.shape}, visual_mask {visual_mask.shape} and "
                       f"visual_tokens {visual_tokens.shape} must be [B,L], [B,L], [B,M,D]")
    visual_mask = visual_mask.astype(jnp.bool_)
    embeds = self.llm.embed(jnp.where(visual_mask, 0, input_ids))
    slot = jnp.clip(jnp.cumsum(visual_mask, axis=1) - 1, 0, visual_tokens.shape[1] - 1)
    vis = jnp.take_along_axis(visual_tokens, slot[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(visual_mask[..., None], vis, embeds)

  def forward(self, input_ids: jax.Array, visual_mask: jax.Array, clip_pixels: jax.Array,
              positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One uncached pass (the reference's `use_cache=False` step): -> (logits [B,L,V] f32,
    post-norm hidden [B,L,D]). Positions default to 0..L-1."""
    visual, _ = self.encode_image(clip_pixels)
    embeds = self.splice(input_ids, visual, visual_mask)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden, _ = self.llm(embeds, positions)
    return self.llm.logits(hidden), hidden

  def seg_embeddings(self, hidden: jax.Array) -> jax.Array:
    """text_hidden_fcs: [...,D] -> [...,C]."""
    return self.text_hidden_fcs(hidden)

  # -- masks --------------------------------------------------------------------------------------

  def decode_masks(self, seg_hidden: jax.Array, image_embedding: jax.Array) -> jax.Array:
    """seg_hidden [B,S,D] (post-norm LLM states before each [SEG]), image_embedding [B,h,w,C]
    -> low-res mask logits [B,S,4h,4w]; each [SEG] is decoded on its own (batch S per image)."""
    if seg_hidden.ndim != 3 or image_embedding.ndim != 4 or \
        seg_hidden.shape[0] != image_embedding.shape[0]:
      raise ValueError(f"decode_masks: seg_hidden {seg_hidden.shape} must be [B,S,D] and "
                       f"image_embedding {image_embedding.shape} [B,h,w,C] with the same B")
    text = self.seg_embeddings(seg_hidden)                              # [B,S,C]

    def one(img, emb):   # img [h,w,C], emb [S,C] -> [S,4h,4w]
      masks, _ = self.grounding_encoder.decode_text_prompts(img[None], emb, multimask_output=False)
      return masks[:, 0]
    return jax.vmap(one)(image_embedding, text)

  def postprocess_masks(self, low_res: jax.Array, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> jax.Array:
    """[B,S,4h,4w] -> [B,S,H,W] float32 logits at the original image size (glamm.md §4.10)."""
    return _postprocess_masks(low_res, input_size, original_size,
                              img_size=self.config.sam.image_encoder.img_size)


def expand_image_placeholder(ids, num_visual: int) -> tuple[np.ndarray, np.ndarray]:
  """Host-side: ids [L] with exactly one IMAGE_TOKEN_INDEX -> (ids [L+N-1] with N placeholder
  slots (value IMAGE_TOKEN_INDEX), visual_mask [L+N-1] bool). Matches the reference's sequence
  layout (`prepare_inputs_labels_for_multimodal`)."""
  ids = np.asarray(ids)
  where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
  if ids.ndim != 1 or where.size != 1:
    raise ValueError(f"expand_image_placeholder: need a 1-D id list with exactly one "
                     f"{IMAGE_TOKEN_INDEX}, got shape {ids.shape} with {where.size}")
  k = int(where[0])
  out = np.concatenate([ids[:k], np.full(num_visual, IMAGE_TOKEN_INDEX, ids.dtype), ids[k + 1:]])
  return out, out == IMAGE_TOKEN_INDEX


def abstract_glamm(config: GLaMMConfig) -> GLaMM:
  """The model with shapes, dtypes and logical axis names but no data (`nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: GLaMM(config, rngs=nnx.Rngs(0)))


def param_shapes(model: nnx.Module) -> dict[tuple, tuple[int, ...]]:
  """Path -> shape of every variable a checkpoint fills (parameters and checkpoint buffers)."""
  return {path: tuple(var.shape) for path, var in nnx.state(model).flat_state()}
