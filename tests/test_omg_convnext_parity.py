"""Parity of the OMG-Seg ConvNeXt trunk (`models.omg_seg.convnext`) against PyTorch (CPU, fp32).

Two references, both loaded into the NNX model through the checkpoint tables of
`models.omg_seg.params_vision`:
- a plain-torch timm-style ConvNeXt written here with OMG's module names (`stem.{0,1}`,
  `layer{k}.downsample.{0,1}`, `layer{k}.blocks.{j}.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`), whose
  state dict is loaded with the `backbone.` prefix (OMG table) and as `visual.trunk.*` (OpenCLIP
  table);
- `transformers.ConvNextModel` (same maths, different names: its weights are renamed to the OMG
  names here, so a naming slip in either place shows up as a mismatch).
"""

from __future__ import annotations

import math
import sys

from flax import nnx
import jax
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from models.omg_seg import params_vision
from models.omg_seg.config import ConvNeXtConfig
from models.omg_seg.convnext import ConvNeXt
from models.param_tables import load_state_dict

TOL = 1e-5
CFG = ConvNeXtConfig.tiny()


class _LayerNorm2d(nn.LayerNorm):
  """timm LayerNorm2d: LayerNorm over the channels of NCHW."""

  def forward(self, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


class _Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))   # exact erf GELU


class _Block(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = _Mlp(dim, 4 * dim)
    self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

  def forward(self, x):
    y = self.conv_dw(x).permute(0, 2, 3, 1)
    y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
    return x + y * self.gamma.reshape(1, -1, 1, 1)


class _Stage(nn.Module):
  def __init__(self, c_in, c_out, depth, down):
    super().__init__()
    self.downsample = (nn.Sequential(_LayerNorm2d(c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 2, 2))
                       if down else nn.Identity())
    self.blocks = nn.Sequential(*[_Block(c_out) for _ in range(depth)])

  def forward(self, x):
    return self.blocks(self.downsample(x))


class TorchConvNeXt(nn.Module):
  """timm `convnext` trunk as OMG's `OpenCLIPBackbone_omgseg` names it (NCHW)."""

  def __init__(self, depths, dims):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), _LayerNorm2d(dims[0], eps=1e-6))
    for k in range(4):
      setattr(self, f"layer{k + 1}", _Stage(dims[max(k - 1, 0)], dims[k], depths[k], k > 0))

  def forward(self, x):
    x = self.stem(x)
    outs = []
    for k in range(4):
      x = getattr(self, f"layer{k + 1}")(x)
      outs.append(x)
    return outs


def _randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random values everywhere (layer scale and norms included), so no init can hide a bug."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":                      # norm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:                                         # biases, layer scales
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
  return module.eval()


def _pixels(seed=0, size=64, batch=2):
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model() -> ConvNeXt:
  """An abstract model (no random init: each new init shape costs an eager compile); every
  parameter is then filled by the strict table load."""
  return nnx.eval_shape(lambda: ConvNeXt(CFG, rngs=nnx.Rngs(0)))


def _hf_convnext():
  """`transformers` ConvNext classes, resolved while conftest's torchvision stand-in is hidden
  (transformers' torchvision probe rejects a module without `__spec__`)."""
  hidden = {n: sys.modules.pop(n) for n in list(sys.modules)
            if n == "torchvision" or n.startswith("torchvision.")}
  try:
    import transformers
    return transformers.ConvNextConfig, transformers.ConvNextModel
  finally:
    sys.modules.update(hidden)


def _compare(model: ConvNeXt, x: torch.Tensor, ref_outs):
  outs = jax.jit(lambda m, p: m(p))(model, x.permute(0, 2, 3, 1).numpy())
  assert len(outs) == 4
  errs = []
  for k, (o, r) in enumerate(zip(outs, ref_outs)):
    r = r.detach().permute(0, 2, 3, 1).numpy()
    assert o.shape == r.shape, (k, o.shape, r.shape)
    errs.append(float(np.max(np.abs(np.asarray(o) - r))))
  assert max(errs) <= TOL, errs
  return errs


@pytest.fixture(scope="module")
def torch_trunk():
  return _randomize(TorchConvNeXt(CFG.depths, CFG.dims), seed=1)


def test_convnext_vs_plain_torch_omg_names(torch_trunk):
  x = _pixels()
  with torch.no_grad():
    ref = torch_trunk(x)
  model = _model()
  sd = {f"backbone.{k}": v for k, v in torch_trunk.state_dict().items()}
  sd["backbone.head.fc.weight"] = torch.zeros(3, 3)       # unused CLIP head: skipped
  load_state_dict(model, sd, params_vision.OMG_BACKBONE_TABLE)
  errs = _compare(model, x, ref)
  assert [o.shape[2] for o in ref] == [16, 8, 4, 2]
  print("convnext vs plain torch: max abs err per stage", errs)


def test_convnext_openclip_names(torch_trunk):
  """The same weights under OpenCLIP names (`visual.trunk.stages.{i}` = `layer{i+1}`)."""
  x = _pixels(seed=3, size=96, batch=1)
  with torch.no_grad():
    ref = torch_trunk(x)
  sd = {}
  for k, v in torch_trunk.state_dict().items():
    if k.startswith("layer"):
      k = f"stages.{int(k[5]) - 1}" + k[6:]
    sd[f"visual.trunk.{k}"] = v
  sd["text.token_embedding.weight"] = torch.zeros(4, 4)   # rest of a CLIP file: skipped
  sd["visual.head.proj.weight"] = torch.zeros(4, 4)
  model = _model()
  load_state_dict(model, sd, params_vision.OPENCLIP_BACKBONE_TABLE)
  _compare(model, x, ref)


def test_convnext_vs_transformers():
  ConvNextConfig, ConvNextModel = _hf_convnext()
  hf = ConvNextModel(ConvNextConfig(num_channels=3, patch_size=4, num_stages=4,
                                    hidden_sizes=list(CFG.dims), depths=list(CFG.depths),
                                    hidden_act="gelu", layer_scale_init_value=1e-6))
  hf = _randomize(hf, seed=2)
  x = _pixels(seed=5)
  with torch.no_grad():
    hidden = hf(pixel_values=x, output_hidden_states=True).hidden_states
  # hidden_states[0] is the embedding output (stem); [1..4] are the four stage outputs.
  ref = hidden[1:]
  rename = [
      ("embeddings.patch_embeddings.", "stem.0."), ("embeddings.layernorm.", "stem.1."),
      ("downsampling_layer.", "downsample."), (".layers.", ".blocks."), ("dwconv.", "conv_dw."),
      ("layernorm.", "norm."), ("pwconv1.", "mlp.fc1."), ("pwconv2.", "mlp.fc2."),
      ("layer_scale_parameter", "gamma")]
  sd = {}
  for k, v in hf.state_dict().items():
    if k.startswith("layernorm."):       # final pooled-output norm: not part of the trunk maps
      continue
    k = k.replace("encoder.stages.", "layer")
    for a, b in rename:
      k = k.replace(a, b)
    if k.startswith("layer"):            # layer{i}. -> layer{i+1}.
      k = f"layer{int(k[5]) + 1}" + k[6:]
    sd[f"backbone.{k}"] = v
  model = _model()
  load_state_dict(model, sd, params_vision.OMG_BACKBONE_TABLE)
  _compare(model, x, ref)


def test_convnext_bad_input():
  model = _model()
  with pytest.raises(ValueError, match="multiples of 32"):
    model(np.zeros((1, 48, 64, 3), np.float32))
  with pytest.raises(ValueError, match="pixels"):
    model(np.zeros((1, 64, 64, 4), np.float32))
