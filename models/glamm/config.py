"""GLaMM configuration: the part configurations plus the few settings that tie them together.

`glamm_7b()` is MBZUAI/GLaMM-GCG (glamm.md §1): CLIP ViT-L/14-336, Vicuna-7B (vocab 32007), SAM
ViT-H, features from CLIP `hidden_states[-2]` without CLS, `text_hidden_fcs` 4096 -> 4096 -> 256.
`tiny()` composes the parts' tiny configs for CPU tests. `to_dict`/`from_dict` give the JSON a
converted checkpoint stores as `config.json`; `from_hf` reads the released `config.json` files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from models import config_io
from models.clip.config import CLIPVisionConfig
from models.llama.config import LlamaConfig
from models.sam.config import (SamConfig, SamImageEncoderConfig, SamMaskDecoderConfig,
                               SamPromptEncoderConfig)

IMAGE_TOKEN_INDEX = -200   # the `<image>` sentinel id of LLaVA/GLaMM prompts (tools/utils.py)


@dataclasses.dataclass(frozen=True)
class GLaMMConfig:
  """GLaMM = vision tower -> mm_projector -> LLM, and LLM [SEG] states -> text_hidden_fcs -> SAM.

  Attributes:
    vision: CLIP vision tower.
    llm: LLaMA decoder.
    sam: SAM grounding encoder (image encoder, prompt encoder, mask decoder).
    vision_select_layer: CLIP `hidden_states` index fed to the projector (-2: output of the
      second-to-last layer; later layers are not run).
  """
  vision: CLIPVisionConfig
  llm: LlamaConfig
  sam: SamConfig
  vision_select_layer: int = -2

  def __post_init__(self):
    n = self.vision.num_layers
    if not (1 <= self.vision_select_layer <= n or -n <= self.vision_select_layer <= -1):
      raise ValueError(f"GLaMMConfig: vision_select_layer {self.vision_select_layer} must name one "
                       f"of the {n} CLIP layer outputs")

  # -- derived sizes ------------------------------------------------------------------------------

  @property
  def num_visual_tokens(self) -> int:
    """Visual tokens per image after dropping CLS (576 for ViT-L/14-336)."""
    return self.vision.num_patches

  @property
  def mm_hidden_size(self) -> int:
    return self.vision.hidden_size

  @property
  def text_out_dim(self) -> int:
    """`out_dim` of text_hidden_fcs = the SAM prompt embedding width (256)."""
    return self.sam.prompt_encoder.embed_dim

  # -- named sizes --------------------------------------------------------------------------------

  @classmethod
  def glamm_7b(cls, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.bfloat16) -> "GLaMMConfig":
    """MBZUAI/GLaMM-GCG. Inference runs in bf16 (glamm.md §2.2), hence the defaults."""
    return cls(vision=CLIPVisionConfig.clip_vit_l14_336(dtype=dtype, param_dtype=param_dtype),
               llm=LlamaConfig.vicuna_7b(dtype=dtype, param_dtype=param_dtype),
               sam=SamConfig.vit_h())

  @classmethod
  def tiny(cls, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> "GLaMMConfig":
    """Tiny parts for CPU tests; the LLM width is a multiple of the SAM prompt width."""
    return cls(vision=CLIPVisionConfig.tiny(dtype=dtype, param_dtype=param_dtype),
               llm=LlamaConfig.tiny(dtype=dtype, param_dtype=param_dtype),
               sam=SamConfig.tiny())

  # -- serialisation ------------------------------------------------------------------------------

  def to_dict(self) -> dict:
    """A JSON-ready dict (dtypes as names) that `from_dict` inverts."""
    return config_io.encode(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GLaMMConfig":
    try:
      sam = d["sam"]
      return cls(
          vision=CLIPVisionConfig(**config_io.decode_dtypes(d["vision"])),
          llm=LlamaConfig(**config_io.decode_dtypes(d["llm"])),
          sam=SamConfig(
              image_encoder=SamImageEncoderConfig(**config_io.lists_to_tuples(sam["image_encoder"])),
              prompt_encoder=SamPromptEncoderConfig(**config_io.lists_to_tuples(sam["prompt_encoder"])),
              mask_decoder=SamMaskDecoderConfig(**sam["mask_decoder"]),
              mask_threshold=sam.get("mask_threshold", 0.0)),
          vision_select_layer=d.get("vision_select_layer", -2))
    except (KeyError, TypeError) as e:
      raise ValueError(f"GLaMMConfig.from_dict: malformed config ({type(e).__name__}: {e})") from e

  @classmethod
  def from_hf(cls, glamm: Mapping[str, Any], clip: Mapping[str, Any], sam: SamConfig,
              dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.bfloat16,
              vocab_size: int | None = None) -> "GLaMMConfig":
    """From the released GLaMM `config.json`, the CLIP repo's `config.json` (a CLIPConfig with a
    `vision_config`, or a CLIPVisionConfig) and a SAM size (SAM has no config file).

    Missing fields take the HF class defaults of the pinned transformers (LLaMA: RoPE theta 10000,
    kv heads = heads; CLIP: quick_gelu, eps 1e-5). `vocab_size` (e.g. from the embedding's shape)
    fills in a config without one and must agree with one that has it.
    """
    g = dict(glamm)
    problems = []
    if vocab_size is not None and "vocab_size" in g and int(g["vocab_size"]) != vocab_size:
      problems.append(f"vocab_size {g['vocab_size']} in config.json but the checkpoint's "
                      f"embedding has {vocab_size} rows")
    vocab = int(g.get("vocab_size", vocab_size or 0))
    if not vocab:
      problems.append("config.json has no vocab_size and none was inferred from the checkpoint")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
      if k not in g:
        problems.append(f"GLaMM config.json lacks {k!r}")
    out_dim = g.get("out_dim")
    if out_dim is not None and int(out_dim) != sam.prompt_encoder.embed_dim:
      problems.append(f"out_dim {out_dim} in config.json != SAM prompt embed_dim "
                      f"{sam.prompt_encoder.embed_dim}")
    if problems:
      raise ValueError("GLaMMConfig.from_hf: " + "; ".join(problems))
    heads = int(g["num_attention_heads"])
    llm = LlamaConfig(
        vocab_size=vocab, hidden_size=int(g["hidden_size"]),
        num_layers=int(g["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(g.get("num_key_value_heads") or heads),
        head_dim=int(g.get("head_dim") or int(g["hidden_size"]) // heads),
        intermediate_size=int(g["intermediate_size"]),
        rms_norm_eps=float(g.get("rms_norm_eps", 1e-6)),
        rope_theta=float(g.get("rope_theta", 10000.0)),
        max_position_embeddings=int(g.get("max_position_embeddings", 2048)),
        dtype=dtype, param_dtype=param_dtype)
    v = dict(clip.get("vision_config", clip))
    vision = CLIPVisionConfig(
        image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 32)),
        hidden_size=int(v.get("hidden_size", 768)),
        intermediate_size=int(v.get("intermediate_size", 3072)),
        num_layers=int(v.get("num_hidden_layers", 12)),
        num_heads=int(v.get("num_attention_heads", 12)),
        num_channels=int(v.get("num_channels", 3)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        hidden_act=str(v.get("hidden_act", "quick_gelu")), dtype=dtype, param_dtype=param_dtype)
    mm_hidden = g.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
      raise ValueError(f"GLaMMConfig.from_hf: mm_hidden_size {mm_hidden} in config.json != CLIP "
                       f"hidden_size {vision.hidden_size}")
    return cls(vision=vision, llm=llm, sam=sam,
               vision_select_layer=int(g.get("mm_vision_select_layer", -2)))


SAM_SIZES = {"vit_h": SamConfig.vit_h, "tiny": SamConfig.tiny}
