"""Configurations of the Segment Anything (SAM) parts used by GLaMM's grounding encoder.

Field names follow the constructor arguments of `segment_anything.modeling` so a reader can put the
two side by side. `SamConfig.vit_h()` is GLaMM's configuration (`build_sam_vit_h`); `tiny()` is a
configuration small enough for CPU parity tests.
"""

from __future__ import annotations

import dataclasses

# How the image encoder's attention is computed (`models.sam.image_encoder.Attention`); every
# choice computes the same maths. "pallas" runs attention as one Pallas kernel on the unpadded map
# where it compiles (`models.sam.window_kernel`: NVIDIA GPU, 16-bit; a global block is one
# window), "pallas_window" only in windowed blocks; "auto" is "pallas_window"; attention not run by
# the kernel is "cudnn_folded" where cuDNN flash attention takes the shapes (NVIDIA GPU,
# bf16/fp16, folded head dim within cuDNN's limit), "xla_bias" elsewhere; "cudnn_mixed" folds
# where that widens the heads by at most half (ViT-H's 14x14 windows) and passes a bias
# elsewhere (its 64x64 global blocks).
SAM_ATTENTION_IMPLS = ("auto", "einsum", "xla_bias", "xla_folded", "cudnn_bias", "cudnn_folded",
                       "cudnn_mixed", "pallas_window", "pallas")


@dataclasses.dataclass(frozen=True)
class SamImageEncoderConfig:
  """ViT image encoder (`ImageEncoderViT`) with windowed attention and a conv neck."""
  img_size: int = 1024                # side of the (square, padded) input image
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  out_chans: int = 256                # channels of the output image embedding
  qkv_bias: bool = True
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14               # 0 would mean global attention everywhere
  global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
  layer_norm_eps: float = 1e-6        # ViT blocks (norm_layer=partial(LayerNorm, eps=1e-6))
  neck_norm_eps: float = 1e-6         # LayerNorm2d default
  # Runtime choice, not a checkpoint property: one of SAM_ATTENTION_IMPLS ("einsum" is the
  # original 6-D-logits formulation, kept for benchmarking against the fused paths).
  attention_impl: str = "auto"

  @property
  def grid_size(self) -> int:
    """Tokens per side for a full-size input (64 for ViT-H at 1024)."""
    return self.img_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  def block_window_size(self, index: int) -> int:
    """Window size of block `index`; 0 marks a global-attention block."""
    return 0 if index in self.global_attn_indexes else self.window_size

  def __post_init__(self):
    if self.attention_impl not in SAM_ATTENTION_IMPLS:
      raise ValueError(f"SamImageEncoderConfig: attention_impl {self.attention_impl!r} is not one "
                       f"of {', '.join(SAM_ATTENTION_IMPLS)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"SamImageEncoderConfig: embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"SamImageEncoderConfig: global_attn_indexes {bad} outside depth "
                       f"{self.depth}")


@dataclasses.dataclass(frozen=True)
class SamPromptEncoderConfig:
  """Prompt encoder (`PromptEncoder`): random-Fourier PE, point/box/mask embeddings."""
  embed_dim: int = 256
  image_embedding_size: tuple[int, int] = (64, 64)   # (H, W) of the image embedding
  input_image_size: tuple[int, int] = (1024, 1024)   # (H, W) of the padded encoder input
  mask_in_chans: int = 16
  num_point_embeddings: int = 4   # negative point, positive point, box corner 1, box corner 2


@dataclasses.dataclass(frozen=True)
class SamMaskDecoderConfig:
  """Mask decoder (`MaskDecoder` + `TwoWayTransformer`)."""
  transformer_dim: int = 256
  transformer_depth: int = 2
  transformer_num_heads: int = 8
  transformer_mlp_dim: int = 2048
  attention_downsample_rate: int = 2   # cross-attention internal dim = transformer_dim / 2
  num_multimask_outputs: int = 3       # + 1 single-mask token = 4 mask tokens
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_norm_eps: float = 1e-5   # nn.LayerNorm default inside the two-way transformer
  upscale_norm_eps: float = 1e-6       # LayerNorm2d default in output_upscaling

  @property
  def num_mask_tokens(self) -> int:
    return self.num_multimask_outputs + 1


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """The three SAM parts plus the mask threshold applied after post-processing."""
  image_encoder: SamImageEncoderConfig = SamImageEncoderConfig()
  prompt_encoder: SamPromptEncoderConfig = SamPromptEncoderConfig()
  mask_decoder: SamMaskDecoderConfig = SamMaskDecoderConfig()
  mask_threshold: float = 0.0

  def __post_init__(self):
    enc, pe, dec = self.image_encoder, self.prompt_encoder, self.mask_decoder
    if not (enc.out_chans == pe.embed_dim == dec.transformer_dim):
      raise ValueError(f"SamConfig: image_encoder.out_chans {enc.out_chans}, prompt_encoder."
                       f"embed_dim {pe.embed_dim} and mask_decoder.transformer_dim "
                       f"{dec.transformer_dim} must be equal")
    if pe.image_embedding_size != (enc.grid_size, enc.grid_size):
      raise ValueError(f"SamConfig: prompt_encoder.image_embedding_size {pe.image_embedding_size} "
                       f"!= image encoder grid {(enc.grid_size, enc.grid_size)}")
    if pe.input_image_size != (enc.img_size, enc.img_size):
      raise ValueError(f"SamConfig: prompt_encoder.input_image_size {pe.input_image_size} != "
                       f"image encoder input {(enc.img_size, enc.img_size)}")

  @classmethod
  def vit_h(cls) -> "SamConfig":
    """GLaMM's grounding encoder: SAM ViT-H (`build_sam_vit_h`), 1024x1024 input."""
    return cls()

  @classmethod
  def tiny(cls) -> "SamConfig":
    """A few-thousand-parameter SAM for CPU tests.

    96x96 input with 16x16 patches gives a 6x6 token grid, so window-4 blocks pad to 8x8: the
    padding path is exercised.
    """
    return cls(
        image_encoder=SamImageEncoderConfig(
            img_size=96, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16,
            window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=SamPromptEncoderConfig(
            embed_dim=16, image_embedding_size=(6, 6), input_image_size=(96, 96), mask_in_chans=8),
        mask_decoder=SamMaskDecoderConfig(
            transformer_dim=16, transformer_depth=2, transformer_num_heads=2,
            transformer_mlp_dim=32, iou_head_hidden_dim=16),
    )
