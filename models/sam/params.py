"""segment-anything state_dict names -> `models.sam.Sam` parameter paths, as data.

`SAM_RULES` is a table of (regex over the key relative to the SAM root, target path template with
`\\1`-style group references, transform name). The checkpoint converter reuses it with the GLaMM
prefix `GLAMM_SAM_PREFIX` (glamm.md 2.4): e.g. `model.grounding_encoder.image_encoder.blocks.7.
attn.qkv.weight` -> `image_encoder.blocks.7.attn.qkv.kernel` via the "linear" transform.

Transforms take (array in PyTorch layout, target shape) and return the array in our layout:
  identity         same shape required
  reshape          same elements, C-order reshape (biases of split projections: [3E] -> [3, H, D])
  linear           `nn.Linear` weight [out, in] -> transposed [in, out], then C-order reshape to the
                   target whose leading axes multiply to `in` and trailing axes to `out`
  conv             `nn.Conv2d` weight [O, I, kh, kw] -> [kh, kw, I, O]
  conv_transpose   `nn.ConvTranspose2d` weight [I, O, kh, kw] -> [kh, kw, I, O]
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from models.sam import layers

GLAMM_SAM_PREFIX = "model.grounding_encoder."

_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"

# (pattern relative to the SAM root, target template, transform). Patterns are full matches.
SAM_RULES: tuple[tuple[str, str, str], ...] = (
    # Image encoder.
    (r"image_encoder\.patch_embed\.proj\.weight", r"image_encoder.patch_embed.kernel", "conv"),
    (r"image_encoder\.patch_embed\.proj\.bias", r"image_encoder.patch_embed.bias", "identity"),
    (r"image_encoder\.pos_embed", r"image_encoder.pos_embed", "identity"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.weight", r"image_encoder.blocks.\1.norm\2.scale",
     "identity"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.bias", r"image_encoder.blocks.\1.norm\2.bias",
     "identity"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight",
     r"image_encoder.blocks.\1.attn.\2.kernel", "linear"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias",
     r"image_encoder.blocks.\1.attn.\2.bias", "reshape"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_([hw])",
     r"image_encoder.blocks.\1.attn.rel_pos_\2", "identity"),
    (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.weight",
     r"image_encoder.blocks.\1.mlp.\2.kernel", "linear"),
    (r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.bias",
     r"image_encoder.blocks.\1.mlp.\2.bias", "identity"),
    (r"image_encoder\.neck\.0\.weight", r"image_encoder.neck_conv1.kernel", "conv"),
    (r"image_encoder\.neck\.1\.weight", r"image_encoder.neck_norm1.scale", "identity"),
    (r"image_encoder\.neck\.1\.bias", r"image_encoder.neck_norm1.bias", "identity"),
    (r"image_encoder\.neck\.2\.weight", r"image_encoder.neck_conv2.kernel", "conv"),
    (r"image_encoder\.neck\.3\.weight", r"image_encoder.neck_norm2.scale", "identity"),
    (r"image_encoder\.neck\.3\.bias", r"image_encoder.neck_norm2.bias", "identity"),
    # Prompt encoder.
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
     r"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "identity"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embeddings.\1",
     "identity"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1",
     "identity"),
    (r"prompt_encoder\.mask_downscaling\.0\.weight", r"prompt_encoder.mask_conv1.kernel", "conv"),
    (r"prompt_encoder\.mask_downscaling\.0\.bias", r"prompt_encoder.mask_conv1.bias", "identity"),
    (r"prompt_encoder\.mask_downscaling\.1\.weight", r"prompt_encoder.mask_norm1.scale",
     "identity"),
    (r"prompt_encoder\.mask_downscaling\.1\.bias", r"prompt_encoder.mask_norm1.bias", "identity"),
    (r"prompt_encoder\.mask_downscaling\.3\.weight", r"prompt_encoder.mask_conv2.kernel", "conv"),
    (r"prompt_encoder\.mask_downscaling\.3\.bias", r"prompt_encoder.mask_conv2.bias", "identity"),
    (r"prompt_encoder\.mask_downscaling\.4\.weight", r"prompt_encoder.mask_norm2.scale",
     "identity"),
    (r"prompt_encoder\.mask_downscaling\.4\.bias", r"prompt_encoder.mask_norm2.bias", "identity"),
    (r"prompt_encoder\.mask_downscaling\.6\.weight", r"prompt_encoder.mask_conv3.kernel", "conv"),
    (r"prompt_encoder\.mask_downscaling\.6\.bias", r"prompt_encoder.mask_conv3.bias", "identity"),
    # Mask decoder.
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1", "identity"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\." + _ATTN + r"\.([qkv]|out)_proj\.weight",
     r"mask_decoder.transformer.layers.\1.\2.\3_proj.kernel", "linear"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\." + _ATTN + r"\.([qkv]|out)_proj\.bias",
     r"mask_decoder.transformer.layers.\1.\2.\3_proj.bias", "reshape"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.weight",
     r"mask_decoder.transformer.layers.\1.norm\2.scale", "identity"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.bias",
     r"mask_decoder.transformer.layers.\1.norm\2.bias", "identity"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.weight",
     r"mask_decoder.transformer.layers.\1.mlp.\2.kernel", "linear"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.bias",
     r"mask_decoder.transformer.layers.\1.mlp.\2.bias", "identity"),
    (r"mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]|out)_proj\.weight",
     r"mask_decoder.transformer.final_attn_token_to_image.\1_proj.kernel", "linear"),
    (r"mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]|out)_proj\.bias",
     r"mask_decoder.transformer.final_attn_token_to_image.\1_proj.bias", "reshape"),
    (r"mask_decoder\.transformer\.norm_final_attn\.weight",
     r"mask_decoder.transformer.norm_final_attn.scale", "identity"),
    (r"mask_decoder\.transformer\.norm_final_attn\.bias",
     r"mask_decoder.transformer.norm_final_attn.bias", "identity"),
    (r"mask_decoder\.output_upscaling\.0\.weight", r"mask_decoder.upscale_conv1.kernel",
     "conv_transpose"),
    (r"mask_decoder\.output_upscaling\.0\.bias", r"mask_decoder.upscale_conv1.bias", "identity"),
    (r"mask_decoder\.output_upscaling\.1\.weight", r"mask_decoder.upscale_norm.scale", "identity"),
    (r"mask_decoder\.output_upscaling\.1\.bias", r"mask_decoder.upscale_norm.bias", "identity"),
    (r"mask_decoder\.output_upscaling\.3\.weight", r"mask_decoder.upscale_conv2.kernel",
     "conv_transpose"),
    (r"mask_decoder\.output_upscaling\.3\.bias", r"mask_decoder.upscale_conv2.bias", "identity"),
    (r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.weight",
     r"mask_decoder.\1.layers.\2.kernel", "linear"),
    (r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.bias",
     r"mask_decoder.\1.layers.\2.bias", "identity"),
)


# ------------------------------------------------------------------------------------------------
# Transforms.

def _identity(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if w.shape != shape:
    raise ValueError(f"shape {w.shape} != target {shape}")
  return w


def _reshape(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if w.size != math.prod(shape):
    raise ValueError(f"shape {w.shape} cannot be reshaped to target {shape}")
  return w.reshape(shape)


def _linear(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if w.ndim != 2:
    raise ValueError(f"Linear weight must be 2-D [out, in], got {w.shape}")
  out_f, in_f = w.shape
  # The target must group as (in axes..., out axes...) for the C-order reshape to be meaningful.
  if not any(math.prod(shape[:k]) == in_f and math.prod(shape[k:]) == out_f
             for k in range(1, len(shape))):
    raise ValueError(f"Linear weight [out={out_f}, in={in_f}] does not fit target {shape}")
  return w.T.reshape(shape)


def _conv(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if w.ndim != 4:
    raise ValueError(f"Conv2d weight must be 4-D [O, I, kh, kw], got {w.shape}")
  return _identity(w.transpose(2, 3, 1, 0), shape)


def _conv_transpose(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if w.ndim != 4:
    raise ValueError(f"ConvTranspose2d weight must be 4-D [I, O, kh, kw], got {w.shape}")
  return _identity(w.transpose(2, 3, 0, 1), shape)


TRANSFORMS: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    "identity": _identity,
    "reshape": _reshape,
    "linear": _linear,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
}


# ------------------------------------------------------------------------------------------------
# Mapping and loading.

def compile_rules(rules: Sequence[tuple[str, str, str]] = SAM_RULES, prefix: str = ""
                  ) -> list[tuple[re.Pattern, str, str]]:
  """Rules with `prefix` (e.g. `GLAMM_SAM_PREFIX`) prepended to every pattern, compiled."""
  compiled = []
  for pattern, target, transform in rules:
    if transform not in TRANSFORMS:
      raise ValueError(f"SAM rule {pattern!r}: unknown transform {transform!r}")
    compiled.append((re.compile(re.escape(prefix) + pattern), target, transform))
  return compiled


def map_key(key: str, compiled: Sequence[tuple[re.Pattern, str, str]]
            ) -> tuple[str, str] | None:
  """(target path, transform) for a state_dict key, or None when no rule matches."""
  for pattern, target, transform in compiled:
    m = pattern.fullmatch(key)
    if m:
      return m.expand(target), transform
  return None


def _to_numpy(value: Any) -> np.ndarray:
  """torch.Tensor (any dtype, incl. bfloat16) or array-like -> NumPy array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _path_str(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], *, prefix: str = "",
                    rules: Sequence[tuple[str, str, str]] = SAM_RULES,
                    module_path: str = "", dtype: Any = None) -> None:
  """Fills `module` (a `models.sam.Sam`, in place) from a segment-anything state_dict.

  Keys that do not start with `prefix` are ignored (a GLaMM checkpoint also holds the LLM); every
  key that does must map to exactly one parameter or buffer, and every parameter and buffer of
  `module` must be filled. All problems are collected and raised together as one ValueError.

  Args:
    module: the NNX module to fill.
    state_dict: key -> torch.Tensor or array.
    prefix: e.g. `GLAMM_SAM_PREFIX` for a GLaMM checkpoint, "" for a plain `Sam` state_dict.
    rules: the mapping table.
    module_path: where `module` sits inside `Sam` when it is a part (e.g. "prompt_encoder" or
      "image_encoder.blocks.0"); only keys mapping under it are used, the rest are ignored.
    dtype: cast every value to this dtype; None keeps each target variable's current dtype.
  """
  compiled = compile_rules(rules, prefix)
  flat = dict((_path_str(p), (p, v)) for p, v in
              nnx.state(module, (nnx.Param, layers.Buffer)).flat_state())
  filled: dict[str, tuple[Any, nnx.Variable]] = {}
  errors: list[str] = []
  attempted: set[str] = set()   # targets some key maps to (even if its transform failed)
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    mapped = map_key(key, compiled)
    if mapped is None:
      errors.append(f"{key}: no mapping rule matches")
      continue
    target, transform = mapped
    if module_path:
      if not target.startswith(module_path + "."):
        continue
      target = target[len(module_path) + 1:]
    if target not in flat:
      errors.append(f"{key}: target {target} is not a parameter of {type(module).__name__}")
      continue
    if target in filled:
      errors.append(f"{key}: target {target} is already filled by another key")
      continue
    path, var = flat[target]
    attempted.add(target)
    try:
      arr = TRANSFORMS[transform](_to_numpy(value), tuple(var.shape))
    except ValueError as e:
      errors.append(f"{key} -> {target} ({transform}): {e}")
      continue
    filled[target] = (path, var.replace(jnp.asarray(arr, dtype or var.dtype)))
  missing = sorted(set(flat) - attempted)
  errors += [f"{t}: no state_dict key (prefix {prefix!r}) fills it" for t in missing]
  if errors:
    shown = "\n  ".join(errors[:50])
    more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
    raise ValueError(f"load_state_dict into {type(module).__name__}: {len(errors)} problem(s):\n"
                     f"  {shown}{more}")
  nnx.update(module, nnx.State.from_flat_path(list(filled.values())))
