"""Parity of `models.sam` against the official `segment_anything` package (CPU, fp32, tiny sizes).

Every torch module is randomised first (including the zero-initialised relative-position tables and
pos_embed, and the LayerNorm affines), loaded through `models.sam.params` (the same table the
checkpoint converter uses), and compared on the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from segment_anything.modeling import image_encoder as t_ie
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam as TorchSam
from segment_anything.modeling import TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from models import cudnn
from models.sam import Sam, SamConfig, SamImageEncoderConfig, SamPromptEncoderConfig
from models.sam import image_encoder as j_ie
from models.sam import params as sam_params
from models.sam.mask_decoder import MaskDecoder as JMaskDecoder
from models.sam.postprocess import masks_to_binary, postprocess_masks, preprocess_shape
from models.sam.prompt_encoder import PromptEncoder as JPromptEncoder
from models.sam.resize import resize_bilinear

TOL = 1e-4
TINY = SamConfig.tiny()


def _randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random values for every parameter, so zero/one initialisations cannot hide a mapping bug."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf.startswith("rel_pos") or leaf == "pos_embed":
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and leaf == "weight":          # LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf == "bias":
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:                                           # weights: fan-in scaled normal
        fan_in = p[0].numel() if p.ndim > 1 else p.numel()
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
  return module.eval()


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


def _nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(_np(t).transpose(0, 2, 3, 1))


def _abstract(ctor):
  """`ctor(rngs)` built shape-only: the loader fills every variable, and eager random init would
  compile one XLA program per parameter shape (tens of seconds on the CI machine)."""
  return nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))


def _load(ctor, torch_module, module_path: str):
  """Builds `ctor(rngs)` abstractly and fills it from the torch part sitting at `module_path` of
  a segment-anything `Sam`."""
  module = _abstract(ctor)
  sd = {f"{module_path}.{k}": v for k, v in torch_module.state_dict().items()}
  sam_params.load_state_dict(module, sd, module_path=module_path)
  return module


def _torch_image_encoder(c: SamImageEncoderConfig) -> ImageEncoderViT:
  return ImageEncoderViT(
      img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
      num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, out_chans=c.out_chans, qkv_bias=c.qkv_bias,
      norm_layer=functools.partial(nn.LayerNorm, eps=c.layer_norm_eps), use_abs_pos=True,
      use_rel_pos=True, window_size=c.window_size, global_attn_indexes=c.global_attn_indexes)


def _torch_prompt_encoder(c: SamPromptEncoderConfig) -> PromptEncoder:
  return PromptEncoder(embed_dim=c.embed_dim, image_embedding_size=c.image_embedding_size,
                       input_image_size=c.input_image_size, mask_in_chans=c.mask_in_chans)


def _torch_mask_decoder(c) -> MaskDecoder:
  return MaskDecoder(
      transformer_dim=c.transformer_dim,
      transformer=TwoWayTransformer(depth=c.transformer_depth, embedding_dim=c.transformer_dim,
                                    mlp_dim=c.transformer_mlp_dim,
                                    num_heads=c.transformer_num_heads,
                                    attention_downsample_rate=c.attention_downsample_rate),
      num_multimask_outputs=c.num_multimask_outputs, iou_head_depth=c.iou_head_depth,
      iou_head_hidden_dim=c.iou_head_hidden_dim)


# ------------------------------------------------------------------------------------------------
# Image encoder.

def test_window_partition_matches_reference_on_non_square_input():
  # H needs 3 rows of padding and W 1 column: a swapped H/W padding order cannot pass.
  x = torch.randn(2, 5, 11, 3)
  t_win, t_pad = t_ie.window_partition(x, 4)
  j_win, j_pad = j_ie.window_partition(jnp.asarray(_np(x)), 4)
  assert j_pad == tuple(t_pad) == (8, 12)
  np.testing.assert_array_equal(np.asarray(j_win), _np(t_win))
  back = j_ie.window_unpartition(j_win, 4, j_pad, (5, 11))
  np.testing.assert_array_equal(np.asarray(back), _np(x))


@pytest.mark.parametrize("q_size,k_size,table", [(4, 4, 7), (6, 6, 15), (10, 10, 15), (4, 8, 15),
                                                 (8, 4, 9), (5, 7, 13)])
def test_get_rel_pos_matches_reference(q_size, k_size, table):
  # Table lengths differing from 2 * max(q, k) - 1 exercise the linear interpolation both ways.
  rel = torch.randn(table, 6)
  want = t_ie.get_rel_pos(q_size, k_size, rel)
  got = j_ie.get_rel_pos(q_size, k_size, jnp.asarray(_np(rel)))
  np.testing.assert_allclose(np.asarray(got), _np(want), rtol=0, atol=1e-6)


# The attention paths that run on the CPU ("cudnn_*" share their maths with "xla_*": only the
# kernel differs); "auto" resolves to "xla_bias" here.
CPU_IMPLS = ("einsum", "xla_bias", "xla_folded")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("window,input_size,hw", [
    (4, (6, 6), (5, 11)),     # windowed, pads 3 rows and 1 column
    (4, (6, 6), (9, 6)),      # windowed, pads 3 rows and 2 columns
    (0, (6, 10), (6, 10)),    # global, non-square tables: rel_pos_h [11, D], rel_pos_w [19, D]
    (0, (8, 8), (6, 10)),     # global: rel_pos_h shrinks 15 -> 11, rel_pos_w grows 15 -> 19
])
def test_block_matches_reference_on_non_square_maps(window, input_size, hw, impl):
  c = SamImageEncoderConfig(img_size=96, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                            out_chans=16, window_size=window, global_attn_indexes=(),
                            attention_impl=impl)
  t_block = _randomize(t_ie.Block(
      dim=32, num_heads=2, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
      use_rel_pos=True, window_size=window, input_size=input_size), seed=1)
  j_block = _load(lambda r: j_ie.Block(c, window, input_size, rngs=r), t_block,
                  "image_encoder.blocks.0")
  x = torch.randn(2, *hw, 32)
  with torch.no_grad():
    want = _np(t_block(x))
  got = np.asarray(jax.jit(lambda m, x: m(x))(j_block, jnp.asarray(_np(x))))
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", ["auto", "xla_folded", "pallas_window", "pallas"])
def test_image_encoder_matches_reference_with_window_padding(impl, monkeypatch):
  if impl.startswith("pallas"):
    # The kernel compiles only on an NVIDIA GPU; here it runs through JAX's Pallas interpreter.
    monkeypatch.setattr(j_ie.window_kernel, "supported", lambda *a: True)
  c = dataclasses.replace(TINY.image_encoder, attention_impl=impl)
  assert c.grid_size % c.window_size != 0, "the tiny config must make windowed blocks pad"
  t_enc = _randomize(_torch_image_encoder(c), seed=2)
  j_enc = _load(lambda r: j_ie.ImageEncoder(c, rngs=r), t_enc, "image_encoder")
  x = torch.randn(2, 3, c.img_size, c.img_size)
  with torch.no_grad():
    want = _np(t_enc(x))
  got = _nchw(jax.jit(lambda m, p: m(p))(j_enc, _nhwc(x)))
  assert got.shape == want.shape == (2, c.out_chans, c.grid_size, c.grid_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_attention_impl_resolution_and_folded_widths(monkeypatch):
  # On the CPU "auto" is the XLA bias path; the folded head dims of ViT-H (80 + 14 + 14 -> 112 for
  # windows, 80 + 64 + 64 = 208 for global blocks) are what cuDNN gets on a GPU.
  assert j_ie.resolve_attention_impl("auto", jnp.bfloat16, 80, (14, 14), True) == "xla_bias"
  # The Pallas kernel needs a GPU; elsewhere "pallas_window" and "pallas" resolve as "auto".
  for impl in ("pallas_window", "pallas"):
    assert j_ie.resolve_attention_impl(impl, jnp.bfloat16, 80, (14, 14), True,
                                       windowed=True) == "xla_bias"
  # Where it compiles: windows by default, global blocks (square maps) only with "pallas".
  monkeypatch.setattr(j_ie.window_kernel, "supported", lambda *a: True)
  resolve = j_ie.resolve_attention_impl
  assert resolve("auto", jnp.bfloat16, 80, (14, 14), True, windowed=True) == "pallas"
  assert resolve("auto", jnp.bfloat16, 80, (64, 64), True) == "xla_bias"
  assert resolve("pallas_window", jnp.bfloat16, 80, (64, 64), True) == "xla_bias"
  assert resolve("pallas", jnp.bfloat16, 80, (64, 64), True) == "pallas"
  assert resolve("pallas", jnp.bfloat16, 80, (64, 48), True) == "xla_bias"
  assert resolve("cudnn_folded", jnp.bfloat16, 80, (14, 14), True, windowed=True) == (
      "cudnn_folded")
  monkeypatch.undo()
  assert j_ie.resolve_attention_impl("cudnn_bias", jnp.float32, 80, (14, 14), True) == "cudnn_bias"
  assert cudnn.flash_head_dim_limit(jnp.float32) == 0
  assert j_ie.resolve_attention_impl("cudnn_mixed", jnp.bfloat16, 80, (14, 14), True) == (
      "cudnn_folded")
  assert j_ie.resolve_attention_impl("cudnn_mixed", jnp.bfloat16, 80, (64, 64), True) == (
      "cudnn_bias")
  for side, width in ((14, 112), (64, 208)):
    t = side * side
    q = jnp.ones((1, t, 2, 80), jnp.bfloat16)
    rel = jnp.ones((1, t, 2, side), jnp.float32)
    q2, k2, v2 = j_ie.fold_rel_pos(q, q, q, rel, rel, side, side, 0.5)
    assert q2.shape == k2.shape == v2.shape == (1, t, 2, width)
    assert q2.dtype == k2.dtype == v2.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    SamImageEncoderConfig(attention_impl="flash")
  from eval.bench import SAM_ATTENTION_IMPLS as bench_impls   # the CLI's copy of the list
  from models.sam.config import SAM_ATTENTION_IMPLS
  assert bench_impls == SAM_ATTENTION_IMPLS
  enc = _abstract(lambda r: j_ie.ImageEncoder(TINY.image_encoder, rngs=r))
  enc.set_attention_impl("einsum")
  assert {b.attn.impl for b in enc.blocks} == {"einsum"}
  with pytest.raises(ValueError, match="'flash' is not one of"):
    enc.set_attention_impl("flash")


@pytest.mark.parametrize("impl", ["xla_bias", "xla_folded"])
def test_bf16_block_paths_stay_bf16_and_near_the_fp32_reference(impl):
  # bf16 weights and activations: the output stays bf16, and the fused paths (fp32 logits and
  # softmax) land within bf16 rounding of the fp32 reference; a wrong bias would be off by O(1).
  c = SamImageEncoderConfig(img_size=96, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                            out_chans=16, window_size=0, global_attn_indexes=(),
                            attention_impl=impl)
  t_block = _randomize(t_ie.Block(
      dim=32, num_heads=2, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
      use_rel_pos=True, window_size=0, input_size=(6, 10)), seed=4)
  j_block = _load(lambda r: j_ie.Block(c, 0, (6, 10), rngs=r), t_block, "image_encoder.blocks.0")
  nnx.update(j_block, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(j_block)))
  x = torch.randn(2, 6, 10, 32)
  with torch.no_grad():
    want = _np(t_block(x))
  got = jax.jit(lambda m, x: m(x))(j_block, jnp.asarray(_np(x), jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
  assert err < 3e-2, err


# ------------------------------------------------------------------------------------------------
# Prompt encoder (non-square embedding grid and input image, so x/y and H/W mix-ups show).

PE_CONFIG = SamPromptEncoderConfig(embed_dim=16, image_embedding_size=(6, 8),
                                   input_image_size=(96, 128), mask_in_chans=8)


@pytest.fixture(scope="module")
def prompt_encoders():
  t_pe = _randomize(_torch_prompt_encoder(PE_CONFIG), seed=3)
  j_pe = _load(lambda r: JPromptEncoder(PE_CONFIG, rngs=r), t_pe, "prompt_encoder")
  return t_pe, j_pe


def _points(n: int, k: int, seed: int):
  g = torch.Generator().manual_seed(seed)
  coords = torch.rand(n, k, 2, generator=g) * torch.tensor([128.0, 96.0])
  labels = torch.randint(-1, 2, (n, k), generator=g)
  return coords, labels


def test_dense_pe_matches_reference(prompt_encoders):
  t_pe, j_pe = prompt_encoders
  with torch.no_grad():
    want = _np(t_pe.get_dense_pe())
  np.testing.assert_allclose(_nchw(j_pe.dense_pe()), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_points,use_boxes,use_masks", [
    (True, False, False), (True, True, False), (False, True, False), (False, False, True),
    (True, True, True)])
def test_prompt_encoder_matches_reference(prompt_encoders, use_points, use_boxes, use_masks):
  t_pe, j_pe = prompt_encoders
  n = 3
  coords, labels = _points(n, 4, seed=4)
  labels[0, :3] = torch.tensor([-1, 0, 1])   # every label value appears
  boxes = torch.rand(n, 4) * torch.tensor([128.0, 96.0, 128.0, 96.0])
  masks = torch.randn(n, 1, 24, 32)
  t_args = (coords, labels) if use_points else None, boxes if use_boxes else None, \
      masks if use_masks else None
  with torch.no_grad():
    t_sparse, t_dense = t_pe(*t_args)
  j_sparse, j_dense = jax.jit(lambda m, p, b, k: m(points=p, boxes=b, masks=k))(
      j_pe, (jnp.asarray(_np(coords)), jnp.asarray(_np(labels))) if use_points else None,
      jnp.asarray(_np(boxes)) if use_boxes else None, _nhwc(masks) if use_masks else None)
  assert j_sparse.shape == tuple(t_sparse.shape)
  np.testing.assert_allclose(np.asarray(j_sparse), _np(t_sparse), rtol=0, atol=TOL)
  np.testing.assert_allclose(_nchw(j_dense), _np(t_dense), rtol=0, atol=TOL)


def test_prompt_encoder_text_embeds_path(prompt_encoders):
  """GLaMM: sparse = the [SEG] embeddings [N, 1, C]; dense = no_mask_embed over the grid."""
  t_pe, j_pe = prompt_encoders
  text = jax.random.normal(jax.random.key(0), (5, 1, PE_CONFIG.embed_dim))
  sparse, dense = j_pe(text_embeds=text)
  np.testing.assert_array_equal(np.asarray(sparse), np.asarray(text))
  with torch.no_grad():
    _, t_dense = t_pe(None, None, None)       # batch 1: the no-mask embedding over the grid
  assert dense.shape == (5, 6, 8, PE_CONFIG.embed_dim)
  np.testing.assert_array_equal(_nchw(dense), np.broadcast_to(_np(t_dense), (5, 16, 6, 8)))


# ------------------------------------------------------------------------------------------------
# Mask decoder.

@pytest.mark.parametrize("num_sparse,multimask", [(1, False), (3, False), (1, True)])
def test_mask_decoder_matches_reference(num_sparse, multimask):
  c = TINY.mask_decoder
  t_dec = _randomize(_torch_mask_decoder(c), seed=5)
  j_dec = _load(lambda r: JMaskDecoder(c, rngs=r), t_dec, "mask_decoder")
  dim, n = c.transformer_dim, 3
  image = torch.randn(1, dim, 6, 8)           # non-square embedding grid
  pe = torch.randn(1, dim, 6, 8)
  sparse = torch.randn(n, num_sparse, dim)
  dense = torch.randn(n, dim, 6, 8)
  with torch.no_grad():
    t_masks, t_iou = t_dec(image, pe, sparse, dense, multimask_output=multimask)
  j_masks, j_iou = jax.jit(lambda m, *a: m(*a, multimask_output=multimask))(
      j_dec, _nhwc(image), _nhwc(pe), jnp.asarray(_np(sparse)), _nhwc(dense))
  assert j_masks.shape == tuple(t_masks.shape) == (n, 3 if multimask else 1, 24, 32)
  np.testing.assert_allclose(np.asarray(j_masks), _np(t_masks), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(j_iou), _np(t_iou), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------
# Resizing and post-processing.

@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (13, 3)), ((31, 17), (4, 29)),
                                          ((5, 5), (5, 9)), ((256, 256), (1024, 1024))])
def test_resize_bilinear_matches_torch_interpolate(in_hw, out_hw):
  x = torch.randn(2, 3, *in_hw)
  want = _np(F.interpolate(x, out_hw, mode="bilinear", align_corners=False))
  got = np.asarray(resize_bilinear(jnp.asarray(_np(x)), out_hw))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("original_size", [(427, 640), (1500, 1000)])
def test_postprocess_matches_reference(original_size):
  """Full-size GLaMM post-processing: 256^2 logits -> 1024^2 -> crop -> original (H, W)."""
  input_size = preprocess_shape(original_size, 1024)
  assert input_size == ResizeLongestSide.get_preprocess_shape(*original_size, 1024)
  low = torch.randn(2, 1, 256, 256)
  fake_sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))
  with torch.no_grad():
    want = _np(TorchSam.postprocess_masks(fake_sam, low, input_size, original_size))
  got = np.asarray(jax.jit(postprocess_masks, static_argnums=(1, 2))(
      jnp.asarray(_np(low)), input_size, original_size))
  assert got.shape == want.shape == (2, 1) + original_size
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  got_bin, want_bin = np.asarray(masks_to_binary(got)), want > 0.0
  iou = (got_bin & want_bin).sum() / (got_bin | want_bin).sum()
  assert iou == 1.0


# ------------------------------------------------------------------------------------------------
# The whole GLaMM SAM path from a GLaMM-prefixed state_dict.

def test_glamm_sam_path_matches_reference():
  enc_c, pe_c, dec_c = TINY.image_encoder, TINY.prompt_encoder, TINY.mask_decoder
  t_sam = _randomize(TorchSam(_torch_image_encoder(enc_c), _torch_prompt_encoder(pe_c),
                              _torch_mask_decoder(dec_c)), seed=6)
  sd = {sam_params.GLAMM_SAM_PREFIX + k: v for k, v in t_sam.state_dict().items()}
  sd["model.embed_tokens.weight"] = torch.zeros(4, 4)    # LLM keys are skipped, not errors
  j_sam = _abstract(lambda r: Sam(TINY, rngs=r))
  sam_params.load_state_dict(j_sam, sd, prefix=sam_params.GLAMM_SAM_PREFIX)

  original_size = (50, 75)
  input_size = preprocess_shape(original_size, enc_c.img_size)   # (64, 96)
  pixels = torch.randn(1, 3, enc_c.img_size, enc_c.img_size)
  text = torch.randn(4, pe_c.embed_dim)                          # 4 [SEG] embeddings
  with torch.no_grad():
    emb = t_sam.image_encoder(pixels)
    dense = t_sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        4, -1, *pe_c.image_embedding_size)
    low, _ = t_sam.mask_decoder(emb, t_sam.prompt_encoder.get_dense_pe(), text[:, None], dense,
                                multimask_output=False)
    want = _np(t_sam.postprocess_masks(low, input_size, original_size))

  @jax.jit
  def run(model, pixels, text):
    low, _ = model.decode_text_prompts(model.embed_image(pixels), text)
    return postprocess_masks(low, input_size, original_size, enc_c.img_size)

  got = np.asarray(run(j_sam, _nhwc(pixels), jnp.asarray(_np(text))))
  assert got.shape == want.shape == (4, 1) + original_size
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  np.testing.assert_array_equal(np.asarray(masks_to_binary(got)), want > 0)


# ------------------------------------------------------------------------------------------------
# Full-size shapes and the loader's error reporting.

def _glamm_vit_h_key_shapes() -> dict[str, tuple[int, ...]]:
  """Every SAM key of the 7B GLaMM checkpoint with its shape, written out from glamm.md 2.4."""
  p = sam_params.GLAMM_SAM_PREFIX
  s: dict[str, tuple[int, ...]] = {}
  ie = p + "image_encoder."
  s[ie + "patch_embed.proj.weight"], s[ie + "patch_embed.proj.bias"] = (1280, 3, 16, 16), (1280,)
  s[ie + "pos_embed"] = (1, 64, 64, 1280)
  for b in range(32):
    k = f"{ie}blocks.{b}."
    for n in ("norm1", "norm2"):
      s[k + n + ".weight"] = s[k + n + ".bias"] = (1280,)
    s[k + "attn.qkv.weight"], s[k + "attn.qkv.bias"] = (3840, 1280), (3840,)
    s[k + "attn.proj.weight"], s[k + "attn.proj.bias"] = (1280, 1280), (1280,)
    rel = (127, 80) if b in (7, 15, 23, 31) else (27, 80)
    s[k + "attn.rel_pos_h"] = s[k + "attn.rel_pos_w"] = rel
    s[k + "mlp.lin1.weight"], s[k + "mlp.lin1.bias"] = (5120, 1280), (5120,)
    s[k + "mlp.lin2.weight"], s[k + "mlp.lin2.bias"] = (1280, 5120), (1280,)
  s[ie + "neck.0.weight"], s[ie + "neck.2.weight"] = (256, 1280, 1, 1), (256, 256, 3, 3)
  for n in ("neck.1", "neck.3"):
    s[ie + n + ".weight"] = s[ie + n + ".bias"] = (256,)
  pe = p + "prompt_encoder."
  s[pe + "pe_layer.positional_encoding_gaussian_matrix"] = (2, 128)
  for n in ["point_embeddings.0", "point_embeddings.1", "point_embeddings.2",
            "point_embeddings.3", "not_a_point_embed", "no_mask_embed"]:
    s[pe + n + ".weight"] = (1, 256)
  md = pe + "mask_downscaling."
  s[md + "0.weight"], s[md + "0.bias"] = (4, 1, 2, 2), (4,)
  s[md + "1.weight"] = s[md + "1.bias"] = (4,)
  s[md + "3.weight"], s[md + "3.bias"] = (16, 4, 2, 2), (16,)
  s[md + "4.weight"] = s[md + "4.bias"] = (16,)
  s[md + "6.weight"], s[md + "6.bias"] = (256, 16, 1, 1), (256,)
  d = p + "mask_decoder."
  s[d + "iou_token.weight"], s[d + "mask_tokens.weight"] = (1, 256), (4, 256)

  def attn(k, internal):
    for x in "qkv":
      s[f"{k}.{x}_proj.weight"], s[f"{k}.{x}_proj.bias"] = (internal, 256), (internal,)
    s[f"{k}.out_proj.weight"], s[f"{k}.out_proj.bias"] = (256, internal), (256,)

  for j in range(2):
    k = f"{d}transformer.layers.{j}."
    attn(k + "self_attn", 256)
    attn(k + "cross_attn_token_to_image", 128)
    attn(k + "cross_attn_image_to_token", 128)
    for n in range(1, 5):
      s[f"{k}norm{n}.weight"] = s[f"{k}norm{n}.bias"] = (256,)
    s[k + "mlp.lin1.weight"], s[k + "mlp.lin1.bias"] = (2048, 256), (2048,)
    s[k + "mlp.lin2.weight"], s[k + "mlp.lin2.bias"] = (256, 2048), (256,)
  attn(d + "transformer.final_attn_token_to_image", 128)
  s[d + "transformer.norm_final_attn.weight"] = s[d + "transformer.norm_final_attn.bias"] = (256,)
  s[d + "output_upscaling.0.weight"], s[d + "output_upscaling.0.bias"] = (256, 64, 2, 2), (64,)
  s[d + "output_upscaling.1.weight"] = s[d + "output_upscaling.1.bias"] = (64,)
  s[d + "output_upscaling.3.weight"], s[d + "output_upscaling.3.bias"] = (64, 32, 2, 2), (32,)
  for i in range(4):
    k = f"{d}output_hypernetworks_mlps.{i}.layers."
    s[k + "0.weight"] = s[k + "1.weight"] = (256, 256)
    s[k + "0.bias"] = s[k + "1.bias"] = (256,)
    s[k + "2.weight"], s[k + "2.bias"] = (32, 256), (32,)
  k = d + "iou_prediction_head.layers."
  s[k + "0.weight"] = s[k + "1.weight"] = (256, 256)
  s[k + "0.bias"] = s[k + "1.bias"] = (256,)
  s[k + "2.weight"], s[k + "2.bias"] = (4, 256), (4,)
  return s


def test_vit_h_shapes_and_parameter_count():
  model = _abstract(lambda r: Sam(SamConfig.vit_h(), rngs=r))
  flat = {".".join(map(str, p)): v for p, v in
          nnx.state(model, (nnx.Param, sam_params.layers.Buffer)).flat_state()}
  want = _glamm_vit_h_key_shapes()
  # 32 blocks x 14 keys + 9 (rest of the encoder) + 17 (prompt encoder) + 120 (decoder); with
  # the 374 LLM, projector and region-encoder keys this makes glamm.md's 968.
  assert len(want) == 594
  compiled = sam_params.compile_rules(prefix=sam_params.GLAMM_SAM_PREFIX)
  targets = set()
  for key, shape in want.items():
    mapped = sam_params.map_key(key, compiled)
    assert mapped is not None, key
    target, transform = mapped
    assert target in flat, (key, target)
    out = sam_params.TRANSFORMS[transform](np.zeros(shape, np.int8), tuple(flat[target].shape))
    assert out.shape == tuple(flat[target].shape), (key, target)
    targets.add(target)
  assert targets == set(flat), sorted(set(flat) - targets)
  # Parameter count: the spec's table minus the gaussian PE buffer, and segment-anything's own.
  n_params = sum(math.prod(v.shape) for p, v in
                 nnx.state(model, nnx.Param).flat_state())
  n_spec = sum(math.prod(s) for k, s in want.items() if "gaussian" not in k)
  assert n_params == n_spec == 641_090_608
  from segment_anything import sam_model_registry
  with torch.device("meta"):
    t_sam = sam_model_registry["vit_h"]()   # shapes only, no memory
  assert n_params == sum(p.numel() for p in t_sam.parameters())
  t_shapes = {sam_params.GLAMM_SAM_PREFIX + k: tuple(v.shape)
              for k, v in t_sam.state_dict().items()}
  assert t_shapes == want


def test_vit_h_logical_axis_names_shard_on_the_mesh():
  """Every variable names each axis, and the names place ViT-H evenly on a (1, 2, 4) mesh."""
  from models import sharding
  model = _abstract(lambda r: Sam(SamConfig.vit_h(), rngs=r))
  state = nnx.state(model, (nnx.Param, sam_params.layers.Buffer))
  specs = nnx.get_partition_spec(state)
  for (path, var), (_, spec) in zip(state.flat_state(), specs.flat_state()):
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    assert len(spec) == len(var.shape), (path, spec, var.shape)
  mesh = jax.make_mesh((1, 2, 4), sharding.MESH_AXES)
  shardings = sharding.param_shardings(state, mesh)
  for (path, var), (_, sh) in zip(state.flat_state(), nnx.State(shardings).flat_state()):
    sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
    for dim, axes in zip(var.shape, tuple(sh.spec) + (None,) * (len(var.shape) - len(sh.spec))):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (path, var.shape, sh.spec)


def test_loader_reports_every_problem():
  t_dec = _torch_mask_decoder(TINY.mask_decoder)
  sd = {f"mask_decoder.{k}": v for k, v in t_dec.state_dict().items()}
  del sd["mask_decoder.iou_token.weight"]
  sd["mask_decoder.mask_tokens.weight"] = torch.zeros(5, 16)      # wrong shape
  sd["mask_decoder.bogus.weight"] = torch.zeros(1)                  # unmapped
  j_dec = _abstract(lambda r: JMaskDecoder(TINY.mask_decoder, rngs=r))
  with pytest.raises(ValueError) as err:
    sam_params.load_state_dict(j_dec, sd, module_path="mask_decoder")
  msg = str(err.value)
  assert "3 problem(s)" in msg
  assert "iou_token: no state_dict key" in msg
  assert "mask_decoder.mask_tokens.weight -> mask_tokens (identity): shape (5, 16)" in msg
  assert "mask_decoder.bogus.weight: no mapping rule matches" in msg
