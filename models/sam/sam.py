"""The SAM grounding encoder as GLaMM uses it: image encoder, prompt encoder and mask decoder.

GLaMM calls (glamm.md 4.8-4.10): `embed_image` once per image, then `decode_text_prompts` with the
[SEG] embeddings ([N, C] after `text_hidden_fcs`), then `postprocess.postprocess_masks`.
"""

from __future__ import annotations

from flax import nnx
import jax

from models.sam.config import SamConfig
from models.sam.image_encoder import ImageEncoder
from models.sam.mask_decoder import MaskDecoder
from models.sam.prompt_encoder import PromptEncoder


class Sam(nnx.Module):
  """SAM with `segment_anything.modeling.Sam`'s three submodules (same attribute names)."""

  def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.image_encoder = ImageEncoder(config.image_encoder, rngs=rngs)
    self.prompt_encoder = PromptEncoder(config.prompt_encoder, rngs=rngs)
    self.mask_decoder = MaskDecoder(config.mask_decoder, rngs=rngs)

  def embed_image(self, pixels: jax.Array) -> jax.Array:
    """Normalised, padded pixels [B, img, img, 3] -> image embedding [B, h, w, C]."""
    return self.image_encoder(pixels)

  def decode_text_prompts(self, image_embedding: jax.Array, text_embeds: jax.Array,
                          multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """GLaMM's mask decoding: one sparse prompt per [SEG] embedding, no mask prompt.

    Args:
      image_embedding: [1, h, w, C] for one image.
      text_embeds: [N, C] or [N, T, C] projected [SEG] hidden states.
      multimask_output: GLaMM uses False.
    Returns:
      low-res mask logits [N, K, 4h, 4w] and IoU predictions [N, K] (K = 1 unless multimask).
    """
    if text_embeds.ndim == 2:
      text_embeds = text_embeds[:, None, :]
    sparse, dense = self.prompt_encoder(text_embeds=text_embeds)
    return self.mask_decoder(image_embedding, self.prompt_encoder.dense_pe(), sparse, dense,
                             multimask_output=multimask_output)
