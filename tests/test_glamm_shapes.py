"""Full-size GLaMM without allocating it: `nnx.eval_shape(glamm_7b())` parameter counts per component
against glamm.md's shapes, and the conversion plan over the release's full key set (968 GLaMM keys
from glamm.md §2.4 plus openai/clip-vit-large-patch14-336), metadata only.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from convert import glamm_table, pipeline
from convert.glamm_spec import clip_l14_336_keys, glamm_7b_keys
from convert.load import _flat, fit_shardings
from convert.readers import TensorInfo
from models.glamm.config import GLaMMConfig
from models.glamm.modeling import abstract_glamm, param_shapes
from models.sharding import MESH_AXES, param_shardings

# Counts derived by hand from glamm.md §1 and §2.4 (each line: the table's shapes multiplied out).
LLM = (2 * 32007 * 4096                                   # embed_tokens + untied lm_head
       + 32 * (4 * 4096 * 4096 + 3 * 11008 * 4096 + 2 * 4096)   # attn, SwiGLU, 2 RMSNorms
       + 4096)                                            # final norm
MM_PROJECTOR = (4096 * 1024 + 4096) + (4096 * 4096 + 4096)
TEXT_HIDDEN_FCS = (4096 * 4096 + 4096) + (256 * 4096 + 256)
_SAM_BLOCK = 4 * 1280 + (3840 * 1280 + 3840) + (1280 * 1280 + 1280) + 2 * 5120 * 1280 + 5120 + 1280
SAM_IMAGE_ENCODER = (1280 * 3 * 16 * 16 + 1280 + 64 * 64 * 1280   # patch embed, pos_embed
                     + 32 * _SAM_BLOCK + 28 * 2 * 27 * 80 + 4 * 2 * 127 * 80   # blocks, rel_pos
                     + 256 * 1280 + 2 * 256 + 256 * 256 * 9 + 2 * 256)          # neck
SAM_PROMPT_ENCODER = (2 * 128 + 6 * 256                   # gaussian PE buffer, 6 embeddings
                      + (4 * 4 + 4) + 8 + (16 * 4 * 4 + 16) + 32 + (256 * 16 + 256))  # mask convs
_ATTN = lambda inner: 3 * (inner * 256 + inner) + 256 * inner + 256   # noqa: E731
_MLP3 = lambda out: 2 * (256 * 256 + 256) + out * 256 + out           # noqa: E731
SAM_MASK_DECODER = (5 * 256                               # iou token + 4 mask tokens
                    + 2 * (_ATTN(256) + 2 * _ATTN(128) + 8 * 256 + 2048 * 256 * 2 + 2048 + 256)
                    + _ATTN(128) + 2 * 256                # final attention + its norm
                    + (256 * 64 * 4 + 64) + 128 + (64 * 32 * 4 + 32)   # output upscaling
                    + 4 * _MLP3(32) + _MLP3(4))           # hypernetworks + IoU head
CLIP = (1024 + 1024 * 3 * 14 * 14 + 577 * 1024 + 2 * 1024          # CLS, patch conv, positions, pre-LN
        + 24 * (4 * (1024 * 1024 + 1024) + 4 * 1024 + 2 * 4096 * 1024 + 4096 + 1024)
        + 2 * 1024)                                       # post_layernorm (unused by GLaMM)


@pytest.fixture(scope="module")
def abstract_7b():
  """The abstract 7B model, built once (tracing the full-size init takes ~10 s on CPU)."""
  return abstract_glamm(GLaMMConfig.glamm_7b())


def _counts(model) -> dict[str, int]:
  out: dict[str, int] = {}
  for path, shape in param_shapes(model).items():
    comp = ".".join(path[:2]) if path[0] == "grounding_encoder" else path[0]
    out[comp] = out.get(comp, 0) + int(np.prod(shape))
  return out


def test_glamm_7b_parameter_counts_per_component(abstract_7b):
  counts = _counts(abstract_7b)
  assert counts == {
      "llm": LLM, "mm_projector": MM_PROJECTOR, "text_hidden_fcs": TEXT_HIDDEN_FCS,
      "vision_tower": CLIP, "grounding_encoder.image_encoder": SAM_IMAGE_ENCODER,
      "grounding_encoder.prompt_encoder": SAM_PROMPT_ENCODER,
      "grounding_encoder.mask_decoder": SAM_MASK_DECODER}
  # Well-known totals: Vicuna-7B 6.74 B, CLIP ViT-L/14-336 vision 303.5 M, SAM ViT-H 641.1 M.
  assert (LLM, CLIP) == (6_738_472_960, 303_507_456)
  assert SAM_IMAGE_ENCODER + SAM_MASK_DECODER + SAM_PROMPT_ENCODER - 256 == 641_090_608


class _MetadataOnly:
  """A checkpoint known by its key table alone (no data), for `pipeline.plan`."""

  def __init__(self, name, specs):
    self.path = f"<{name} key table>"
    self._meta = {k: TensorInfo(shape, dtype, name) for k, shape, dtype in specs}

  def metadata(self):
    return self._meta


def test_release_key_set_converts_completely_at_full_size(abstract_7b):
  specs = list(glamm_7b_keys())
  assert len(specs) == len({k for k, _, _ in specs}) == 968
  nbytes = sum(int(np.prod(s)) * (2 if d == "bfloat16" else 4) for _, s, d in specs)
  assert abs(nbytes / 1e9 - (9.98 + 6.78)) < 0.02          # the two shard sizes on the Hub
  shapes = param_shapes(abstract_7b)
  sources = [
      pipeline.Source("clip", _MetadataOnly("clip", clip_l14_336_keys()), glamm_table.clip_rules(),
                      glamm_table.normalize_clip_key),
      pipeline.Source("glamm", _MetadataOnly("glamm", specs), glamm_table.glamm_rules()),
  ]
  steps = pipeline.plan(sources, shapes)
  skipped = sorted(k for (_, k), s in steps.items() if s is None)
  assert len([k for k in skipped if k.startswith("model.region_encoder.")]) == 43
  assert len([k for k in skipped if k.endswith("rotary_emb.inv_freq")]) == 32
  assert {"logit_scale", "vision_model.embeddings.position_ids"} <= set(skipped)
  assert {s.path for s in steps.values() if s is not None} == set(shapes)   # all filled once
  groups = {glamm_table.group_of(p)[0] for p in shapes}
  assert groups - {g for g in groups if ".layers." in g or ".blocks." in g} == {
      "llm.embed_tokens", "llm.norm", "llm.lm_head", "vision_tower.embeddings",
      "vision_tower.pre_layrnorm", "vision_tower.post_layernorm", "mm_projector",
      "text_hidden_fcs", "grounding_encoder.image_encoder", "grounding_encoder.prompt_encoder",
      "grounding_encoder.mask_decoder"}
  assert len(groups) == 32 + 24 + 32 + 11
  # The largest group bounds what the converter holds: one LLM layer (202 M parameters).
  per_group: dict[str, int] = {}
  for p, s in shapes.items():
    g = glamm_table.group_of(p)[0]
    per_group[g] = per_group.get(g, 0) + int(np.prod(s))
  assert max(per_group.values()) == per_group["llm.layers.0"] == 202_383_360


def test_transformers5_clip_names_and_wrong_sizes_are_reported(abstract_7b):
  shapes = param_shapes(abstract_7b)
  clip = [(k.removeprefix("vision_model."), s, d) for k, s, d in clip_l14_336_keys(with_text=False)]
  clip[1] = (clip[1][0], (1024, 3, 16, 16), clip[1][2])   # a ViT-L/16 patch conv
  glamm = [spec for spec in glamm_7b_keys() if spec[0] != "lm_head.weight"]
  sources = [
      pipeline.Source("clip", _MetadataOnly("clip", clip), glamm_table.clip_rules(),
                      glamm_table.normalize_clip_key),
      pipeline.Source("glamm", _MetadataOnly("glamm", glamm), glamm_table.glamm_rules()),
  ]
  with pytest.raises(pipeline.ConversionError) as e:
    pipeline.plan(sources, shapes)
  msg = str(e.value)
  assert "2 problems" in msg
  assert ("clip: embeddings.patch_embedding.weight (1024, 3, 16, 16) -> vision_tower.embeddings."
          "patch_embedding.kernel: shape (16, 16, 3, 1024) after conv_weight, the model expects "
          "(14, 14, 3, 1024)") in msg
  assert "llm.lm_head.kernel (4096, 32007): no checkpoint key fills it" in msg


def test_shardings_on_a_mesh_replicate_only_the_odd_vocabulary(abstract_7b):
  state = nnx.state(abstract_7b)
  mesh = jax.make_mesh((1, 2, 4), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  flat = dict(state.flat_state())
  logical = _flat(param_shardings(state, mesh))
  sh = fit_shardings(flat, logical, strict=False)
  P = jax.sharding.PartitionSpec
  assert sh[("llm", "embed_tokens", "embedding")].spec == P(None, "fsdp")   # 32007 % 4 != 0
  assert sh[("llm", "layers", 3, "mlp", "up_proj", "kernel")].spec == P("fsdp", "tensor")
  changed = sorted(p for p, v in logical if tuple(sh[p].spec) != tuple(v.get_value().spec))
  assert changed == [("llm", "embed_tokens", "embedding"), ("llm", "lm_head", "kernel")]
  with pytest.raises(ValueError, match=r"llm\.lm_head\.kernel \(4096, 32007\): dim 1"):
    fit_shardings(flat, logical, strict=True)
