"""OMG-LLaVA configuration: the part configurations plus the sizes that tie them together.

`omg_llava_7b()` is the release model (omg_llava.md §1): OMG-Seg ConvNeXt-L + MSDeformAttn pixel
decoder + 9-layer Mask2Former (300 queries) at 1024 x 1024, InternLM2-chat-7B (vocab 92548), a
16 x 16 grid of pixel-centric tokens. `tiny()` composes the parts' tiny configs for CPU tests with
every width derived the same way. `to_dict`/`from_dict` give the JSON a converted checkpoint
stores as `config.json`.

Derived sizes (S image side, G grid, Cc stage-4 channels, C decoder width, Q queries):
- G = S / 64 (stage 4 has stride 32, pixel shuffle ratio 2): G^2 pixel-centric tokens;
- pixel token features Dp = 4 Cc + 2 C, query features Dq = 2 C, query_proj width Dh = 4 Cc,
  [SEG] -> decoder query width 2 C;
- object tokens per image N <= min(Q, G^2) (a valid query owns at least one grid cell), so the
  visual span has at most V_max = G^2 + 1 + min(Q, G^2) tokens (513 at release size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from models import config_io
from models.llama.config import LlamaConfig
from models.omg_llava.projector import OMGProjectorConfig
from models.omg_seg.config import ConvNeXtConfig, PixelDecoderConfig
from models.omg_seg.mask2former import Mask2FormerConfig

PIXEL_SHUFFLE_RATIO = 2   # `pixel_shuffle_feat` ratio (omg_llava.md §1.4 step 1)
STAGE4_STRIDE = 32


@dataclasses.dataclass(frozen=True)
class OMGLLaVAConfig:
  """OMG-LLaVA = OMG-Seg (backbone, pixel_decoder, decoder) -> projector -> LLM, and LLM [SEG]
  states -> text2vision -> decoder (llm copy) masks.

  Attributes:
    backbone: ConvNeXt trunk (fp32 in the original, `OMGSegVisualEncoder.dtype`).
    pixel_decoder: MSDeformAttn pixel decoder.
    decoder: Mask2Former head (with the `_llm` copy for [SEG] decoding).
    projector: widths of `projector` and `projector_text2vision`.
    llm: InternLM2 on the LLaMA decoder.
    image_size: S, the padded square image side the vision path runs at.
    grid: G, the pixel-token grid side (S / 64).
    num_class_prototypes: P of the fixed class text embeddings [num_classes, P, cls_embed_dim]
      (read it from `convnext_large_d_320_CocoPanopticOVDataset.pth`; it only sizes the buffer).
  """
  backbone: ConvNeXtConfig
  pixel_decoder: PixelDecoderConfig
  decoder: Mask2FormerConfig
  projector: OMGProjectorConfig
  llm: LlamaConfig
  image_size: int = 1024
  grid: int = 16
  num_class_prototypes: int = 1

  def __post_init__(self):
    problems = []
    s, g = self.image_size, self.grid
    if s % (STAGE4_STRIDE * PIXEL_SHUFFLE_RATIO) or s // (STAGE4_STRIDE * PIXEL_SHUFFLE_RATIO) != g:
      problems.append(f"image_size {s} must be {STAGE4_STRIDE * PIXEL_SHUFFLE_RATIO} x grid "
                      f"(grid {g})")
    if tuple(self.pixel_decoder.in_channels) != tuple(self.backbone.dims):
      problems.append(f"pixel_decoder.in_channels {self.pixel_decoder.in_channels} != backbone "
                      f"dims {self.backbone.dims}")
    c = self.decoder.embed_dim
    if self.pixel_decoder.feat_channels != c or self.pixel_decoder.out_channels != c:
      problems.append(f"pixel_decoder channels ({self.pixel_decoder.feat_channels}, "
                      f"{self.pixel_decoder.out_channels}) != decoder embed_dim {c}")
    if self.pixel_decoder.num_levels != self.decoder.num_levels:
      problems.append(f"pixel_decoder.num_levels {self.pixel_decoder.num_levels} != "
                      f"decoder.num_levels {self.decoder.num_levels}")
    cc = self.backbone.dims[-1]
    r2 = PIXEL_SHUFFLE_RATIO ** 2
    want = dict(pixel_dim=r2 * cc + 2 * c, query_dim=2 * c, query_hidden=r2 * cc,
                llm_hidden_size=self.llm.hidden_size, text2vision_dim=2 * c)
    for k, v in want.items():
      if getattr(self.projector, k) != v:
        problems.append(f"projector.{k} {getattr(self.projector, k)} != {v} (derived from the "
                        f"backbone / decoder / llm widths)")
    if self.num_class_prototypes < 1:
      problems.append(f"num_class_prototypes {self.num_class_prototypes} must be >= 1")
    if problems:
      raise ValueError("OMGLLaVAConfig: " + "; ".join(problems))

  # -- derived sizes ------------------------------------------------------------------------------

  @property
  def num_pixel_tokens(self) -> int:
    """G^2 pixel-centric tokens (256 at release size)."""
    return self.grid * self.grid

  @property
  def max_object_tokens(self) -> int:
    """min(Q, G^2): a valid query owns at least one of the G^2 cells (256 at release size)."""
    return min(self.decoder.num_queries, self.num_pixel_tokens)

  @property
  def num_visual_tokens_max(self) -> int:
    """V_max = G^2 + 1 + min(Q, G^2): the static visual span (513 at release size)."""
    return self.num_pixel_tokens + 1 + self.max_object_tokens

  @property
  def mask_size(self) -> int:
    """Side of the mask logits (stride-4 mask features: 256 at release size)."""
    return self.image_size // 4

  @property
  def class_embed_shape(self) -> tuple[int, int, int]:
    return (self.decoder.num_classes, self.num_class_prototypes, self.decoder.cls_embed_dim)

  # -- named sizes --------------------------------------------------------------------------------

  @classmethod
  def omg_llava_7b(cls, llm_dtype: Any = jnp.bfloat16, llm_param_dtype: Any = jnp.bfloat16,
                   num_class_prototypes: int = 1) -> "OMGLLaVAConfig":
    """The release model. The vision path and both projectors stay fp32 as in the original
    (`OMGSegVisualEncoder.dtype = float32`, projectors cast to fp32); only the LLM takes
    `llm_dtype`. `num_class_prototypes`: P of the class-embedding file (unknown until read)."""
    return cls(backbone=ConvNeXtConfig.large(), pixel_decoder=PixelDecoderConfig.omg(),
               decoder=Mask2FormerConfig.omg(), projector=OMGProjectorConfig.omg_llava_7b(),
               llm=LlamaConfig.internlm2_chat_7b(dtype=llm_dtype, param_dtype=llm_param_dtype),
               image_size=1024, grid=16, num_class_prototypes=num_class_prototypes)

  @classmethod
  def tiny(cls, image_size: int = 128, num_queries: int = 12, num_class_prototypes: int = 3,
           dtype: Any = jnp.float32) -> "OMGLLaVAConfig":
    """Tiny parts for CPU tests. image_size 128: stage-4 map 4 x 4, grid 2 (4 pixel tokens);
    256: grid 4 (16 pixel tokens). Decoder width 32, `num_queries` queries, InternLM2-tiny."""
    backbone = ConvNeXtConfig.tiny()
    pix = PixelDecoderConfig.tiny(in_channels=backbone.dims)
    dec = Mask2FormerConfig.tiny(num_queries=num_queries, embed_dim=pix.feat_channels)
    llm = LlamaConfig.internlm2_tiny(dtype=dtype, param_dtype=dtype)
    cc, c = backbone.dims[-1], dec.embed_dim
    r2 = PIXEL_SHUFFLE_RATIO ** 2
    proj = OMGProjectorConfig(pixel_dim=r2 * cc + 2 * c, query_dim=2 * c, query_hidden=r2 * cc,
                              llm_hidden_size=llm.hidden_size, text2vision_dim=2 * c)
    return cls(backbone=backbone, pixel_decoder=pix, decoder=dec, projector=proj, llm=llm,
               image_size=image_size, grid=image_size // (STAGE4_STRIDE * PIXEL_SHUFFLE_RATIO),
               num_class_prototypes=num_class_prototypes)

  # -- serialisation ------------------------------------------------------------------------------

  def to_dict(self) -> dict:
    """A JSON-ready dict (dtypes as names, tuples as lists) that `from_dict` inverts."""
    return config_io.encode(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "OMGLLaVAConfig":
    try:
      return cls(
          backbone=ConvNeXtConfig(**config_io.lists_to_tuples(config_io.decode_dtypes(d["backbone"]))),
          pixel_decoder=PixelDecoderConfig(**config_io.lists_to_tuples(config_io.decode_dtypes(d["pixel_decoder"]))),
          decoder=Mask2FormerConfig(**d["decoder"]),
          projector=OMGProjectorConfig(**config_io.decode_dtypes(d["projector"])),
          llm=LlamaConfig(**config_io.decode_dtypes(d["llm"])),
          image_size=int(d["image_size"]), grid=int(d["grid"]),
          num_class_prototypes=int(d.get("num_class_prototypes", 1)))
    except (KeyError, TypeError) as e:
      raise ValueError(f"OMGLLaVAConfig.from_dict: malformed config ({type(e).__name__}: {e})"
                       ) from e
