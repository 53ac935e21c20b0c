"""A plain-torch OMG-LLaVA (GCG inference path) assembled from the per-part references.

mmdet/mmcv/xtuner are not installable here, so every part is the plain-torch re-implementation
that its own parity test already checks against the original maths:
- ConvNeXt trunk: `tests/test_omg_convnext_parity.TorchConvNeXt` (timm names);
- pixel decoder: `tests/test_omg_pixel_decoder_parity.TorchPixelDecoder` (mmdet names);
- Mask2Former head, [SEG] decoding, `panoptic_postprocess`, `pixel_shuffle_feat`:
  `tests/test_omg_mask2former_parity.{RefHead, ref_postprocess, ref_pixel_shuffle}`;
- projectors: `tests/test_omg_projector_parity.{NaiveProj, _mlp}` (XTuner names);
- InternLM2: `tests/test_internlm2_parity.InternLM2ForCausalLM` (remote-code names, fused wqkv).

`OMGLLaVARef` wires them as `OMG_LLaVA` does (omg_llava.md §1.4-§1.7, §3): OMG-Seg forward ->
per image `[pixel tokens ; separator ; valid object tokens]` (`Naive_Proj`) ->
`prepare_inputs_labels_for_multimodal` (`[embed(ids_before) ; 257+N visual ; embed(ids_after)]`,
positions 0..T-1) -> InternLM2 logits and post-norm hidden -> [SEG] states ->
`projector_text2vision` -> `forward_llm_seg` (the `_llm` decoder copy on the cached features) ->
the last mask prediction. Its `state_dict()` carries the names of the `OMG_LLaVA` module:
`visual_encoder.backbone.*`, `visual_encoder.panoptic_head.{pixel_decoder,transformer_decoder,
transformer_decoder_llm,mask_embed_llm,...}.*`, `projector.model.*`,
`projector_text2vision.model.*`, `llm.base_model.model.{model.*,output.weight}`.
`reference_table(cfg)` composes the repo's tables to load that state dict into
`models.omg_llava.modeling.OMGLLaVA`.

Batch size 1 in the LLM, as in the reference script (each image's prompt has its own length).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from models.llama.internlm2_params import OMG_LLM_PREFIX, internlm2_table
from models.omg_llava.config import OMGLLaVAConfig
from models.omg_llava.projector import OMG_PROJECTOR_TABLE, TEXT_TO_VISION_TABLE
from models.omg_seg.params_decoder import MASK2FORMER_DECODER_TABLE
from models.omg_seg.params_vision import CONVNEXT_RULES, PIXEL_DECODER_RULES
from models.param_tables import Table
from tests import test_internlm2_parity as _llm_ref
from tests import test_omg_convnext_parity as _convnext_ref
from tests import test_omg_mask2former_parity as _m2f_ref
from tests import test_omg_pixel_decoder_parity as _pix_ref
from tests import test_omg_projector_parity as _proj_ref

VISUAL_PREFIX = "visual_encoder."


class _Holder(nn.Module):
  """An empty module that only names its children (e.g. `projector.model`)."""

  def __init__(self, **children: nn.Module):
    super().__init__()
    for k, v in children.items():
      setattr(self, k, v)


class OMGLLaVARef(nn.Module):
  """The whole original forward in plain torch (fp32, NCHW images, batch-1 LLM)."""

  def __init__(self, cfg: OMGLLaVAConfig, class_embed: torch.Tensor, seed: int = 0):
    super().__init__()
    self.cfg = cfg
    torch.manual_seed(seed)
    head_holder = _m2f_ref.RefOMG(cfg.decoder, class_embed)      # `panoptic_head`
    _m2f_ref._randomize(head_holder, seed + 1)
    head = head_holder.panoptic_head
    head.pixel_decoder = _pix_ref._randomize(_pix_ref.TorchPixelDecoder(cfg.pixel_decoder),
                                             seed + 2, offset_scale=2.0)
    backbone = _convnext_ref._randomize(
        _convnext_ref.TorchConvNeXt(cfg.backbone.depths, cfg.backbone.dims), seed + 3)
    self.visual_encoder = _Holder(backbone=backbone, panoptic_head=head)
    self.projector = _Holder(model=_proj_ref.NaiveProj(cfg.projector))
    d, c2 = cfg.llm.hidden_size, cfg.projector.text2vision_dim
    self.projector_text2vision = _Holder(model=_proj_ref._mlp(d, c2))
    llm = _llm_ref.InternLM2ForCausalLM(cfg.llm)
    _llm_ref._randomize(llm, seed + 4)
    self.llm = _Holder(base_model=_Holder(model=llm))
    self.eval()

  @property
  def internlm2(self) -> nn.Module:
    return self.llm.base_model.model

  # -- vision -------------------------------------------------------------------------------------

  @torch.no_grad()
  def encode_image(self, pixels: torch.Tensor) -> dict:
    """pixels [B,3,S,S] -> dict: `visual` (list of [(G^2+1+N_b), D]), `mask_features`
    [B,C,Hm,Wm], `memories` (3 maps [B,C,h,w]), `pixel_feats` [B,G^2,Dp], `query_pos_feat`
    [B,Q,2C], `attn_mask` [B,Q,G^2] bool, `valid` [B,Q], `owner` [B,G^2]."""
    cfg = self.cfg
    head = self.visual_encoder.panoptic_head
    feats = self.visual_encoder.backbone(pixels)
    mask_features, memories = head.pixel_decoder(feats)
    q, cls, masks = head(mask_features, memories)
    qpf = torch.cat([q, head.query_embed.weight[None].expand_as(q)], dim=-1)
    clip = _m2f_ref.ref_pixel_shuffle(feats[-1])
    pixel_feats, attn_masks, valids, owners = [], [], [], []
    for b in range(pixels.shape[0]):
      _, prior, ids, valid = _m2f_ref.ref_postprocess(cls[b], masks[b], qpf[b], cfg.image_size,
                                                      cfg.grid)
      pixel_feats.append(torch.cat([clip[b], prior], dim=-1))
      attn_masks.append(ids[None, :] != torch.arange(qpf.shape[1])[:, None])
      valids.append(valid)
      owners.append(ids)
    pixel_feats = torch.stack(pixel_feats)
    attn_mask = torch.stack(attn_masks)
    visual = self.projector.model(pixel_feats, qpf, attn_mask)
    return dict(visual=visual, mask_features=mask_features, memories=memories,
                pixel_feats=pixel_feats, query_pos_feat=qpf, attn_mask=attn_mask,
                valid=torch.stack(valids), owner=torch.stack(owners))

  # -- LLM ----------------------------------------------------------------------------------------

  @torch.no_grad()
  def prompt_embeds(self, ids_before, visual: torch.Tensor, ids_after) -> torch.Tensor:
    """`prepare_inputs_labels_for_multimodal` for one image: [1, T, D]."""
    emb = self.internlm2.model.tok_embeddings
    before = emb(torch.as_tensor(list(ids_before), dtype=torch.long))
    after = emb(torch.as_tensor(list(ids_after), dtype=torch.long))
    return torch.cat([before, visual, after], dim=0)[None]

  @torch.no_grad()
  def llm_forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """embeds [1,T,D], positions 0..T-1 -> (logits [1,T,V], post-norm hidden [1,T,D])."""
    m = self.internlm2
    pos = torch.arange(embeds.shape[1])[None]
    x = embeds
    for layer in m.model.layers:
      x = layer(x, pos)
    hidden = m.model.norm(x)
    return m.output(hidden), hidden

  @torch.no_grad()
  def greedy(self, embeds: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """HF greedy search without a cache: (new ids, [steps, D] post-norm state whose logits chose
    each id)."""
    emb = self.internlm2.model.tok_embeddings
    tokens, states = [], []
    x = embeds
    for _ in range(steps):
      logits, hidden = self.llm_forward(x)
      nxt = int(torch.argmax(logits[0, -1]))
      tokens.append(nxt)
      states.append(hidden[0, -1])
      x = torch.cat([x, emb(torch.tensor([[nxt]]))], dim=1)
    return tokens, torch.stack(states)

  # -- [SEG] masks --------------------------------------------------------------------------------

  @torch.no_grad()
  def seg_masks(self, seg_hidden: torch.Tensor, batch_idx: torch.Tensor,
                mask_features: torch.Tensor, memories) -> torch.Tensor:
    """seg_hidden [N,D] (post-norm states of [SEG] inputs), batch_idx [N] -> [N,Hm,Wm]."""
    z = self.projector_text2vision.model(seg_hidden)
    head = self.visual_encoder.panoptic_head
    return head.forward_llm_seg(z, batch_idx, mask_features, memories)[:, 0]


def _prefixed(rules: Table, src_prefix: str, dst_prefix: str) -> Table:
  """`rules` under a literal source prefix and a target prefix (split rows included)."""
  out = []
  for pattern, target, fn in rules:
    if isinstance(target, tuple):
      target = tuple(dst_prefix + t for t in target)
    elif target is not None:
      target = dst_prefix + target
    out.append((re.escape(src_prefix) + pattern, target, fn))
  return tuple(out)


def reference_table(cfg: OMGLLaVAConfig) -> Table:
  """`OMGLLaVARef.state_dict()` names -> `OMGLLaVA` parameter paths, from the parts' tables."""
  v = VISUAL_PREFIX
  return (
      *_prefixed(CONVNEXT_RULES, v + "backbone.", "backbone."),
      *_prefixed(PIXEL_DECODER_RULES, v + "panoptic_head.pixel_decoder.", "pixel_decoder."),
      *_prefixed(MASK2FORMER_DECODER_TABLE, v, "decoder."),
      *_prefixed(OMG_PROJECTOR_TABLE, "", "projector."),
      *_prefixed(TEXT_TO_VISION_TABLE, "", "text2vision."),
      *_prefixed(internlm2_table(cfg.llm, OMG_LLM_PREFIX), "", "llm."),
  )


def class_embed(cfg: OMGLLaVAConfig, seed: int = 5) -> torch.Tensor:
  """Unit-norm random class text embeddings [num_classes, P, cls_dim]."""
  g = torch.Generator().manual_seed(seed)
  e = torch.randn(cfg.class_embed_shape, generator=g)
  return torch.nn.functional.normalize(e, dim=-1)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
