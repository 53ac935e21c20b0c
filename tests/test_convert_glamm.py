"""GLaMM checkpoint conversion, end to end, against the PyTorch computation (CPU, fp32, tiny).

The fixture assembles a state dict with GLaMM's exact key names from reference modules
(transformers `LlamaForCausalLM` and `CLIPVisionModel`, segment-anything's SAM parts, torch
projector/fcs, plus region-encoder and RoPE-buffer keys that must be skipped), saves it like the
release (two `.bin` shards + `pytorch_model.bin.index.json` + config + tokenizer files, with one
LLM layer split across the shards) and CLIP as an HF directory, converts with the CLI, loads, and
checks: LLM logits with the image tokens spliced in, the [SEG] embedding through text_hidden_fcs,
and SAM masks (IoU 1.0 after thresholding). A second conversion reads GLaMM as one safetensors file
and CLIP in the transformers 4.x CLIPModel layout (`vision_model.*` + text tower) and must give
identical arrays. Bad checkpoints must fail with one clear error and leave no output behind.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from tests.hf_reference import import_transformers

transformers = import_transformers()

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder  # noqa: E402
from segment_anything.modeling import Sam as TorchSam, TwoWayTransformer  # noqa: E402

import convert  # noqa: E402
from convert import cli  # noqa: E402
from convert.pipeline import ConversionError  # noqa: E402
from convert.readers import CheckpointError  # noqa: E402
from models.glamm.config import IMAGE_TOKEN_INDEX, GLaMMConfig  # noqa: E402
from models.glamm.modeling import expand_image_placeholder  # noqa: E402
from models.sam.postprocess import preprocess_shape  # noqa: E402
from models.sharding import MESH_AXES, param_shardings  # noqa: E402

CFG = GLaMMConfig.tiny()
ATOL = 1e-4
TOKENIZER_FILES = {"tokenizer.model": b"\x0a\x0bnot-a-real-model",
                   "tokenizer_config.json": b'{"model_max_length": 512}',
                   "special_tokens_map.json": b'{"unk_token": "<unk>"}',
                   "added_tokens.json": b'{"[SEG]": 32004}'}


# ------------------------------------------------------------------------------------------------
# Reference modules and the GLaMM-layout state dict.

def _randomize(module: nn.Module, seed: int) -> nn.Module:
  """Random values everywhere (norm affines around 1, biases, zero-initialised tables too)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf == "bias" or leaf.startswith("rel_pos") or leaf == "pos_embed" or p.ndim == 1:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else p.numel()
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
  return module.eval()


def _torch_sam() -> TorchSam:
  e, pe, d = CFG.sam.image_encoder, CFG.sam.prompt_encoder, CFG.sam.mask_decoder
  enc = ImageEncoderViT(
      img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.embed_dim, depth=e.depth,
      num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, out_chans=e.out_chans, qkv_bias=e.qkv_bias,
      norm_layer=functools.partial(nn.LayerNorm, eps=e.layer_norm_eps), use_abs_pos=True,
      use_rel_pos=True, window_size=e.window_size, global_attn_indexes=e.global_attn_indexes)
  prompt = PromptEncoder(embed_dim=pe.embed_dim, image_embedding_size=pe.image_embedding_size,
                         input_image_size=pe.input_image_size, mask_in_chans=pe.mask_in_chans)
  dec = MaskDecoder(
      transformer_dim=d.transformer_dim,
      transformer=TwoWayTransformer(depth=d.transformer_depth, embedding_dim=d.transformer_dim,
                                    mlp_dim=d.transformer_mlp_dim,
                                    num_heads=d.transformer_num_heads,
                                    attention_downsample_rate=d.attention_downsample_rate),
      num_multimask_outputs=d.num_multimask_outputs, iou_head_depth=d.iou_head_depth,
      iou_head_hidden_dim=d.iou_head_hidden_dim)
  return _randomize(TorchSam(enc, prompt, dec), seed=3)


def _hf_llama_config() -> dict:
  c = CFG.llm
  return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, intermediate_size=c.intermediate_size,
              rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
              tie_word_embeddings=False)


class Reference:
  """The PyTorch GLaMM pieces (fp32) and the state dict in the release's key layout."""

  def __init__(self):
    torch.manual_seed(0)
    v, c = CFG.vision, CFG.llm
    self.clip = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps, attn_implementation="eager")), seed=1)
    self.llama = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_hf_llama_config(), attn_implementation="eager")), seed=2)
    self.projector = _randomize(nn.Sequential(nn.Linear(v.hidden_size, c.hidden_size), nn.GELU(),
                                              nn.Linear(c.hidden_size, c.hidden_size)), seed=4)
    self.fcs = _randomize(nn.ModuleList([nn.Sequential(
        nn.Linear(c.hidden_size, c.hidden_size), nn.ReLU(),
        nn.Linear(c.hidden_size, CFG.text_out_dim), nn.Dropout(0.0))]), seed=5)
    self.sam = _torch_sam()

  def glamm_state_dict(self) -> dict[str, torch.Tensor]:
    """GLaMMForCausalLM.state_dict() order and names (vision tower removed, as released)."""
    sd = {}
    llama = self.llama.state_dict()
    head_dim = CFG.llm.head_dim
    for k, t in llama.items():
      if k == "lm_head.weight":
        continue
      sd[k] = t
      if k.endswith("self_attn.o_proj.weight"):   # 4.28 saved the RoPE buffers
        sd[k.replace("o_proj.weight", "rotary_emb.inv_freq")] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    sd.update({f"model.mm_projector.{k}": t for k, t in self.projector.state_dict().items()})
    g = torch.Generator().manual_seed(9)   # the region encoder: stored, never used by GCG
    sd["model.region_encoder.mlvl_fuse.input_conv.0.weight"] = torch.randn(8, 10, 1, 1, generator=g)
    sd["model.region_encoder.roi_align.flatten_linear.weight"] = torch.randn(8, 32, generator=g)
    sd.update({f"model.grounding_encoder.{k}": t for k, t in self.sam.state_dict().items()})
    sd.update({f"model.text_hidden_fcs.{k}": t for k, t in self.fcs.state_dict().items()})
    sd["lm_head.weight"] = llama["lm_head.weight"]
    return {k: t.detach().clone().contiguous() for k, t in sd.items()}

  def glamm_config(self) -> dict:
    return {**_hf_llama_config(), "architectures": ["GLaMMForCausalLM"], "model_type": "llava",
            "mm_hidden_size": CFG.vision.hidden_size, "mm_vision_select_layer": -2,
            "out_dim": CFG.text_out_dim, "torch_dtype": "float32"}

  # -- the computation GLaMM does (glamm.md §4.5-4.10) ---------------------------------------------

  @torch.no_grad()
  def forward(self, ids: list[int], pixels: torch.Tensor):
    """-> (logits [1,L,V], post-norm hidden [1,L,D]) with the image spliced in for the -200."""
    feats = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    visual = self.projector(feats)
    k = ids.index(IMAGE_TOKEN_INDEX)
    emb = self.llama.model.embed_tokens
    embeds = torch.cat([emb(torch.tensor([ids[:k]])), visual, emb(torch.tensor([ids[k + 1:]]))],
                       dim=1)
    hidden = self.llama.model(inputs_embeds=embeds).last_hidden_state
    return self.llama.lm_head(hidden), hidden

  @torch.no_grad()
  def masks(self, seg_hidden: torch.Tensor, sam_pixels: torch.Tensor, input_size, original_size):
    """seg_hidden [N,D] -> (fcs output [N,C], mask logits at the original size [N,1,H,W])."""
    text = self.fcs[0](seg_hidden)
    emb = self.sam.image_encoder(sam_pixels)
    n = text.shape[0]
    dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        n, -1, *CFG.sam.prompt_encoder.image_embedding_size)
    low, _ = self.sam.mask_decoder(emb, self.sam.prompt_encoder.get_dense_pe(), text[:, None],
                                   dense, multimask_output=False)
    return text, self.sam.postprocess_masks(low, input_size, original_size)


# ------------------------------------------------------------------------------------------------
# Writing checkpoints the way they are released.

def save_glamm_bin_shards(sd: dict, config: dict, d: str, split_key: str) -> list[str]:
  """Two `.bin` shards split before `split_key`, the index, config.json and tokenizer files."""
  os.makedirs(d, exist_ok=True)
  keys = list(sd)
  cut = keys.index(split_key)
  names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
  weight_map = {}
  for name, part in zip(names, (keys[:cut], keys[cut:])):
    torch.save({k: sd[k] for k in part}, os.path.join(d, name))
    weight_map.update({k: name for k in part})
  total = sum(t.numel() * t.element_size() for t in sd.values())
  with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  _write_config_and_tokenizer(config, d)
  return [os.path.join(d, n) for n in names]


def _write_config_and_tokenizer(config: dict, d: str):
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  for name, data in TOKENIZER_FILES.items():
    with open(os.path.join(d, name), "wb") as f:
      f.write(data)


def _convert(glamm_dir, clip_dir, out, *extra):
  return cli.main(["glamm", "--glamm", str(glamm_dir), "--clip", str(clip_dir), "--out", str(out),
                   "--dtype", "float32", "--sam-size", "tiny", "--no-progress", *extra])


@pytest.fixture(scope="module")
def ref():
  return Reference()


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
  root = tmp_path_factory.mktemp("glamm")
  glamm_dir, clip_dir, out = root / "glamm", root / "clip", root / "out"
  save_glamm_bin_shards(ref.glamm_state_dict(), ref.glamm_config(), glamm_dir,
                        split_key="model.layers.1.mlp.gate_proj.weight")
  ref.clip.save_pretrained(clip_dir)       # transformers 5.x: model.safetensors, no prefix
  assert _convert(glamm_dir, clip_dir, out) == 0
  return {"root": root, "glamm": glamm_dir, "clip": clip_dir, "out": out,
          "model": convert.load_glamm(str(out))}


def _nhwc(t: torch.Tensor) -> jax.Array:
  return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------------
# End to end.

def test_output_layout(converted):
  out = converted["out"]
  for name, data in TOKENIZER_FILES.items():
    assert (out / name).read_bytes() == data
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["dtype"] == "float32"
  # One Orbax checkpoint per group: each LLM / CLIP / SAM layer, plus the other components.
  groups = set(manifest["groups"])
  assert {f"llm.layers.{i}" for i in range(CFG.llm.num_layers)} <= groups
  assert {f"vision_tower.encoder.layers.{i}" for i in range(CFG.vision.num_layers)} <= groups
  assert {"llm.embed_tokens", "llm.lm_head", "mm_projector", "text_hidden_fcs",
          "grounding_encoder.prompt_encoder", "grounding_encoder.mask_decoder"} <= groups
  assert sorted(os.listdir(out / "params")) == sorted(groups)
  skipped = manifest["skipped"]
  assert "glamm: model.region_encoder.roi_align.flatten_linear.weight" in skipped
  assert "glamm: model.layers.0.self_attn.rotary_emb.inv_freq" in skipped
  assert GLaMMConfig.from_dict(json.loads((out / "config.json").read_text())) == \
      GLaMMConfig.from_dict(CFG.to_dict())
  assert not glob.glob(str(converted["root"] / "out.tmp-*"))


def test_llm_logits_with_spliced_image_match_pytorch(converted, ref):
  model = converted["model"]
  ids = [1, 5, 17, 32, IMAGE_TOKEN_INDEX, 33, 7, 91, 100, 2]
  pixels = torch.randn(1, 3, CFG.vision.image_size, CFG.vision.image_size,
                       generator=torch.Generator().manual_seed(11))
  want_logits, want_hidden = ref.forward(ids, pixels)
  expanded, mask = expand_image_placeholder(np.array(ids), CFG.num_visual_tokens)
  logits, hidden = jax.jit(lambda m, i, v, p: m.forward(i, v, p))(
      model, jnp.asarray(expanded)[None], jnp.asarray(mask)[None], _nhwc(pixels))
  assert logits.shape == want_logits.shape == (1, len(ids) - 1 + 16, CFG.llm.vocab_size)
  np.testing.assert_allclose(np.asarray(hidden), want_hidden.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), rtol=0, atol=ATOL)


def test_seg_embedding_and_sam_masks_match_pytorch(converted, ref):
  model = converted["model"]
  g = torch.Generator().manual_seed(12)
  ids = [1, 9, IMAGE_TOKEN_INDEX, 4, 8, 15, 16, 23, 42]
  pixels = torch.randn(1, 3, CFG.vision.image_size, CFG.vision.image_size, generator=g)
  _, hidden = ref.forward(ids, pixels)
  seg_hidden = hidden[0, [-3, -1]]                        # two "[SEG]" states
  img = CFG.sam.image_encoder.img_size
  sam_pixels = torch.randn(1, 3, img, img, generator=g)
  original_size = (75, 100)
  input_size = preprocess_shape(original_size, img)
  want_text, want_masks = ref.masks(seg_hidden, sam_pixels, input_size, original_size)

  @jax.jit
  def run(m, seg, pix):
    low = m.decode_masks(seg, m.sam_embed(pix))
    return m.seg_embeddings(seg), m.postprocess_masks(low, input_size, original_size)

  text, masks = run(model, jnp.asarray(seg_hidden.numpy())[None], _nhwc(sam_pixels))
  np.testing.assert_allclose(np.asarray(text)[0], want_text.numpy(), rtol=0, atol=ATOL)
  masks = np.asarray(masks)[0]                            # [S,H,W]
  want = want_masks.numpy()[:, 0]
  assert masks.shape == want.shape == (2,) + original_size
  np.testing.assert_allclose(masks, want, rtol=0, atol=1e-3)
  for got_m, want_m in zip(masks > 0, want > 0):
    assert want_m.any() and (~want_m).any()               # a real mask, not all or nothing
    iou = (got_m & want_m).sum() / (got_m | want_m).sum()
    assert iou == 1.0


def test_safetensors_and_transformers4_clip_layout_give_identical_arrays(converted, ref, tmp_path):
  from safetensors.torch import save_file
  glamm_dir, clip_dir = tmp_path / "glamm_st", tmp_path / "clip4"
  os.makedirs(glamm_dir)
  save_file(ref.glamm_state_dict(), str(glamm_dir / "model.safetensors"))
  _write_config_and_tokenizer(ref.glamm_config(), glamm_dir)
  # transformers 4.x / CLIPModel: `vision_model.` prefix, plus text-tower keys to skip.
  os.makedirs(clip_dir)
  clip_sd = {f"vision_model.{k}": t for k, t in ref.clip.state_dict().items()}
  clip_sd.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                  "logit_scale": torch.tensor(2.0), "visual_projection.weight": torch.zeros(8, 64),
                  "vision_model.embeddings.position_ids": torch.arange(17)[None]})
  torch.save(clip_sd, clip_dir / "pytorch_model.bin")
  (clip_dir / "config.json").write_text(json.dumps(
      {"model_type": "clip", "vision_config": json.loads(
          (converted["clip"] / "config.json").read_text())}))
  assert _convert(glamm_dir, clip_dir, tmp_path / "out2") == 0
  a = jax.tree.leaves(_pure(converted["model"]))
  b = jax.tree.leaves(_pure(convert.load_glamm(str(tmp_path / "out2"))))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _pure(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


def test_load_on_a_mesh_places_arrays_by_logical_names(converted):
  from flax import nnx
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = convert.load_glamm(str(converted["out"]), mesh=mesh)
  want = param_shardings(nnx.state(model), mesh)
  kernel = model.llm.layers[0].mlp.up_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8
  got_flat, want_flat = dict(nnx.state(model).flat_state()), dict(want.flat_state())
  for path, var in got_flat.items():
    assert var[...].sharding.is_equivalent_to(want_flat[path].get_value(), var.ndim), path
  np.testing.assert_array_equal(
      np.asarray(kernel), np.asarray(converted["model"].llm.layers[0].mlp.up_proj.kernel[...]))
  # Default: everything on one device.
  assert converted["model"].llm.embed_tokens.embedding[...].sharding.device_set == \
      {jax.devices()[0]}


# ------------------------------------------------------------------------------------------------
# Bad checkpoints: clear errors, nothing written.

def _assert_no_output(parent, name):
  assert not os.path.exists(os.path.join(parent, name))
  assert not glob.glob(os.path.join(parent, name + ".tmp-*"))


def test_missing_unknown_and_misshapen_keys_reported_together(converted, ref, tmp_path):
  sd = ref.glamm_state_dict()
  del sd["model.layers.1.mlp.up_proj.weight"]
  sd["model.mystery_head.weight"] = torch.zeros(3, 3)
  sd["model.mm_projector.0.weight"] = torch.zeros(CFG.llm.hidden_size, CFG.vision.hidden_size + 1)
  d = tmp_path / "bad"
  os.makedirs(d)
  torch.save(sd, d / "pytorch_model.bin")
  _write_config_and_tokenizer(ref.glamm_config(), d)
  with pytest.raises(ConversionError) as e:
    _convert(d, converted["clip"], tmp_path / "out")
  msg = str(e.value)
  assert "3 problems" in msg
  assert "glamm: model.mystery_head.weight (3, 3): unknown key" in msg
  assert ("glamm: model.mm_projector.0.weight (64, 65) -> mm_projector.linear_1.kernel: shape "
          "(65, 64) after linear_weight, the model expects (64, 64)") in msg
  assert "llm.layers.1.mlp.up_proj.kernel (64, 96): no checkpoint key fills it" in msg
  _assert_no_output(tmp_path, "out")


def test_truncated_shard_is_named(converted, ref, tmp_path):
  d = tmp_path / "trunc"
  files = save_glamm_bin_shards(ref.glamm_state_dict(), ref.glamm_config(), d,
                                split_key="model.layers.2.self_attn.q_proj.weight")
  size = os.path.getsize(files[1])
  with open(files[1], "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: cannot read .*"
                     r"truncated or corrupt"):
    _convert(d, converted["clip"], tmp_path / "out")
  _assert_no_output(tmp_path, "out")


class NotATensor:
  """Anything pickled by class reference; weights_only must refuse to import it."""

  def __init__(self):
    self.payload = [1, 2, 3]


def test_pickle_refused_by_weights_only(converted, ref, tmp_path):
  d = tmp_path / "evil"
  os.makedirs(d)
  sd = ref.glamm_state_dict()
  sd["model.extra"] = NotATensor()
  torch.save(sd, d / "pytorch_model.bin")
  _write_config_and_tokenizer(ref.glamm_config(), d)
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: torch\.load\(weights_only=True\)"
                     r" refused the pickle"):
    _convert(d, converted["clip"], tmp_path / "out")
  _assert_no_output(tmp_path, "out")


def test_failure_during_writing_leaves_no_output(converted, tmp_path, monkeypatch):
  from convert import writer
  calls = {"n": 0}
  original = writer.GroupWriter.add

  def failing_add(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 40:   # after several groups were already saved
      raise KeyboardInterrupt
    return original(self, *args, **kwargs)

  monkeypatch.setattr(writer.GroupWriter, "add", failing_add)
  with pytest.raises(KeyboardInterrupt):
    _convert(converted["glamm"], converted["clip"], tmp_path / "out")
  assert calls["n"] == 40
  _assert_no_output(tmp_path, "out")


def test_existing_output_needs_overwrite(converted, tmp_path):
  out = tmp_path / "out"
  os.makedirs(out)
  (out / "old.txt").write_text("old")
  with pytest.raises(FileExistsError, match="--overwrite"):
    _convert(converted["glamm"], converted["clip"], out)
  assert (out / "old.txt").exists()
  assert _convert(converted["glamm"], converted["clip"], out, "--overwrite") == 0
  assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
  assert not glob.glob(str(tmp_path / "out.old-*")) and not glob.glob(str(tmp_path / "out.tmp-*"))


# ------------------------------------------------------------------------------------------------
# Pieces: spilling incomplete groups, index/shard consistency.

def test_writer_spills_interleaved_groups_to_disk_and_restores_them(tmp_path):
  import orbax.checkpoint as ocp
  from convert.writer import GroupWriter, nest
  f32 = np.dtype(np.float32)
  expected = {("a", i): ((3, 4), f32) for i in range(3)}
  expected.update({("b", i): ((5,), f32) for i in range(3)})
  group_of = lambda p: (p[0], p[1:])   # noqa: E731
  w = GroupWriter(str(tmp_path), expected, group_of, spill_bytes=0)
  rng = np.random.default_rng(0)
  values = {p: rng.standard_normal(s).astype(f32) for p, (s, _) in expected.items()}
  order = [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]   # groups interleaved
  for p in order[:4]:
    w.add(p, values[p], str(p))
  assert w.spilled >= 2 and os.listdir(tmp_path / "_spill")
  for p in order[4:]:
    w.add(p, values[p], str(p))
  w.finish()
  assert not (tmp_path / "_spill").exists()
  with ocp.StandardCheckpointer() as c:
    for g in "ab":
      got = c.restore(str(tmp_path / "params" / g))
      for i in range(3):
        np.testing.assert_array_equal(np.asarray(got[str(i)]), values[(g, i)])
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert [e["path"] for e in manifest["groups"]["a"]] == ["0", "1", "2"]


def test_index_listing_a_key_its_shard_lacks_is_reported(converted, tmp_path):
  import shutil
  d = tmp_path / "idx"
  shutil.copytree(converted["glamm"], d)
  index = json.loads((d / "pytorch_model.bin.index.json").read_text())
  index["weight_map"]["model.ghost.weight"] = "pytorch_model-00001-of-00002.bin"
  index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00002.bin"   # really in shard 2
  (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError) as e:
    _convert(d, converted["clip"], tmp_path / "out")
  msg = str(e.value)
  assert "model.ghost.weight: listed in the index for pytorch_model-00001-of-00002.bin" in msg
  assert ("lm_head.weight: index says pytorch_model-00001-of-00002.bin, found in "
          "pytorch_model-00002-of-00002.bin") in msg
  _assert_no_output(tmp_path, "out")
