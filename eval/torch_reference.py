"""The PyTorch reference modules at this repo's configurations (GPU benchmark and GPU parity).

`build_llama`, `build_clip` and `build_sam` create transformers' `LlamaForCausalLM` and
`CLIPVisionModel` and segment-anything's `Sam` with random weights of realistic scale (each
library's own initialisation under `torch.manual_seed`), directly on `device` and in `dtype`.
SAM ViT-H comes from `sam_model_registry["vit_h"](checkpoint=None)`; other SAM sizes (tests,
`--tiny`) are assembled from the same segment-anything classes. segment-anything leaves
`pos_embed` and the relative-position tables at zero; `realistic_sam` gives them std-0.02 values so
a mis-mapped table cannot hide.

`sam_decode_text_prompts` is GLaMM's mask decoding with stock segment-anything modules: the
[SEG] embeddings are the sparse prompt (GLaMM's prompt encoder concatenates them to an empty
point/box set) and the dense prompt is `no_mask_embed`.
"""

from __future__ import annotations

import contextlib
import sys
import types


def import_transformers():
  """transformers first, then segment-anything; a torchvision stand-in only where torchvision is
  missing (this repo's CPU machine; the GPU image has torchvision). transformers must be imported
  before the stand-in exists: it probes `find_spec("torchvision")`, which a bare module fails."""
  import transformers
  transformers.LlamaForCausalLM, transformers.CLIPVisionModel  # noqa: B018 (resolve lazily now)
  try:
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001 - missing, or a CPU build without its CUDA ops
    _torchvision_stand_in()
  return transformers


def _torchvision_stand_in():
  """What `segment_anything` imports from torchvision: PIL resize helpers and box ops."""
  import numpy as np
  from PIL import Image

  mods = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                            "torchvision.transforms.functional", "torchvision.ops",
                                            "torchvision.ops.boxes")}
  fn = mods["torchvision.transforms.functional"]
  fn.resize = lambda img, size, *a, **k: img.resize((size[1], size[0]), Image.BILINEAR)
  fn.to_pil_image = lambda arr, mode=None: Image.fromarray(np.asarray(arr), mode=mode)
  boxes = mods["torchvision.ops.boxes"]
  boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

  def batched_nms(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: batched_nms is unavailable")
  boxes.batched_nms = batched_nms
  mods["torchvision"].transforms = mods["torchvision.transforms"]
  mods["torchvision.transforms"].functional = fn
  mods["torchvision"].ops = mods["torchvision.ops"]
  mods["torchvision.ops"].boxes = boxes
  sys.modules.update(mods)


@contextlib.contextmanager
def _default_dtype(dtype):
  import torch
  old = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    yield
  finally:
    torch.set_default_dtype(old)


def hf_llama_kwargs(cfg) -> dict:
  """transformers `LlamaConfig` arguments describing a `models.llama.config.LlamaConfig`."""
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)


def hf_llama_config(cfg, attn: str = "sdpa"):
  """transformers LlamaConfig for a `models.llama.config.LlamaConfig`."""
  transformers = import_transformers()
  return transformers.LlamaConfig(
      **hf_llama_kwargs(cfg), initializer_range=0.02, attn_implementation=attn, bos_token_id=1,
      eos_token_id=2, pad_token_id=0)


def hf_clip_config(cfg, attn: str = "sdpa"):
  transformers = import_transformers()
  return transformers.CLIPVisionConfig(
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
      layer_norm_eps=cfg.layer_norm_eps, attn_implementation=attn)


def build_llama(cfg, device, dtype, seed: int = 0, norm_noise: float = 0.1):
  """HF LlamaForCausalLM with HF's init (normal, std 0.02) made on `device` in `dtype`; RMSNorm
  weights 1 + norm_noise * N(0, 1) (trained models' norms are not all ones)."""
  import torch
  transformers = import_transformers()
  torch.manual_seed(seed)
  with torch.device(device), _default_dtype(dtype):
    model = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + norm_noise * torch.randn_like(p))
  return model.to(device=device, dtype=dtype)


def build_clip(cfg, device, dtype, seed: int = 1):
  import torch
  transformers = import_transformers()
  torch.manual_seed(seed)
  with torch.device(device), _default_dtype(dtype):
    model = transformers.CLIPVisionModel(hf_clip_config(cfg)).eval()
  return model.to(device=device, dtype=dtype)


def build_sam(sam_cfg, device, dtype, seed: int = 2):
  """segment-anything `Sam` for a `models.sam.SamConfig` (ViT-H through the registry)."""
  import functools
  import torch
  from torch import nn
  import_transformers()
  from segment_anything import sam_model_registry
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  from models.sam.config import SamConfig

  torch.manual_seed(seed)
  with torch.device(device):
    if sam_cfg == SamConfig.vit_h():
      model = sam_model_registry["vit_h"](checkpoint=None)
    else:
      e, p, d = sam_cfg.image_encoder, sam_cfg.prompt_encoder, sam_cfg.mask_decoder
      model = Sam(
          image_encoder=ImageEncoderViT(
              img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.embed_dim, depth=e.depth,
              num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, out_chans=e.out_chans,
              qkv_bias=e.qkv_bias, norm_layer=functools.partial(nn.LayerNorm,
                                                                eps=e.layer_norm_eps),
              use_abs_pos=True, use_rel_pos=True, window_size=e.window_size,
              global_attn_indexes=e.global_attn_indexes),
          prompt_encoder=PromptEncoder(embed_dim=p.embed_dim,
                                       image_embedding_size=p.image_embedding_size,
                                       input_image_size=p.input_image_size,
                                       mask_in_chans=p.mask_in_chans),
          mask_decoder=MaskDecoder(
              transformer_dim=d.transformer_dim,
              transformer=TwoWayTransformer(depth=d.transformer_depth,
                                            embedding_dim=d.transformer_dim,
                                            mlp_dim=d.transformer_mlp_dim,
                                            num_heads=d.transformer_num_heads,
                                            attention_downsample_rate=d.attention_downsample_rate),
              num_multimask_outputs=d.num_multimask_outputs, iou_head_depth=d.iou_head_depth,
              iou_head_hidden_dim=d.iou_head_hidden_dim))
  realistic_sam(model, seed)
  return model.eval().to(device=device, dtype=dtype)


def realistic_sam(model, seed: int, std: float = 0.02):
  """Non-zero pos_embed and relative-position tables (segment-anything initialises them to 0)."""
  import torch
  g = torch.Generator(device="cpu").manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf == "pos_embed" or leaf.startswith("rel_pos"):
        p.copy_((std * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))


def dense_pe(prompt_encoder):
  """`PromptEncoder.get_dense_pe` computed in the dtype of the Gaussian matrix (GLaMM's SAM
  does it in bf16; stock segment-anything builds an fp32 grid, which fails against bf16)."""
  import torch
  pe = prompt_encoder.pe_layer
  g = pe.positional_encoding_gaussian_matrix
  h, w = prompt_encoder.image_embedding_size
  grid = torch.ones((h, w), device=g.device, dtype=g.dtype)
  y = (grid.cumsum(dim=0) - 0.5) / h
  x = (grid.cumsum(dim=1) - 0.5) / w
  return pe._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)[None]


def sam_decode_text_prompts(sam, image_embedding, text_embeds):
  """GLaMM's decoding: image_embedding [1,C,h,w], text_embeds [S,C] -> low-res logits [S,1,4h,4w]
  and IoU [S,1]."""
  pe = sam.prompt_encoder
  s = text_embeds.shape[0]
  sparse = text_embeds[:, None, :].to(image_embedding.dtype)
  h, w = pe.image_embedding_size
  dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(s, -1, h, w)
  return sam.mask_decoder(image_embeddings=image_embedding, image_pe=dense_pe(pe),
                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                          multimask_output=False)
