"""OMG-LLaVA checkpoint conversion, end to end (CPU, tiny config), plus the release key set at 7B.

The fixture writes random tensors under the release's key names and file layouts
(omg_llava.md §2): internlm2-chat-7b as two safetensors shards + index + config.json (bf16, base
vocabulary = model vocabulary - 4), the OMG-LLaVA .pth (peft LoRA names with adapter `default`,
the resized embedding and head, projectors, the `_llm` decoder copies), omg_seg_convl.pth in an
mmengine `{'meta', 'state_dict'}` wrapper, and the class embedding saved as a bare tensor. Every
source tensor is declared together with the value the model must end up with, computed here
independently of the converter's tables (explicit grouped wqkv split, LoRA merge in float64,
transposes), so the test checks every converted variable and that nothing is left over.
"""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import convert
from convert import cli, omg_llava_table, pipeline
from convert.omg_llava import ClassEmbedFile, plan_omg_llava
from convert.pipeline import ConversionError
from convert.readers import TensorInfo
from models.omg_llava.config import OMGLLaVAConfig

CFG = OMGLLaVAConfig.tiny()
ALPHA = 256.0
OMG = "llm.base_model.model."
TOKENIZER_FILES = {"tokenizer.model": b"\x0a\x0bnot-a-real-model",
                   "tokenizer_config.json": b'{"model_max_length": 512}'}


def internlm2_config(llm, **overrides) -> dict:
  """The fields of internlm2-chat-7b's config.json (with the shipped dynamic-NTK rope_scaling)."""
  return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
          "hidden_act": "silu", "hidden_size": llm.hidden_size,
          "intermediate_size": llm.intermediate_size, "num_attention_heads": llm.num_heads,
          "num_hidden_layers": llm.num_layers, "num_key_value_heads": llm.num_kv_heads,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "vocab_size": llm.vocab_size - 4, **overrides}


# ------------------------------------------------------------------------------------------------
# The release files, declared tensor by tensor with the value each model variable must get.

class Release:
  """State dicts under the release names (`materialize=False`: shapes only, for the 7B key set)
  and `expected`: model path -> value (float64) the converted variable must equal.

  Options cover the documented alternatives: the head as `output.base_layer.weight` with a LoRA
  pair or `output.weight` without; omg_seg_convl.pth with or without `backbone.*` (then the trunk
  is in `openclip` under `visual.trunk.*`); the .pth with or without the `_llm` decoder copies.
  """

  def __init__(self, cfg: OMGLLaVAConfig, *, materialize: bool = True, seed: int = 0, r: int = 8,
               r_output: int = 4, lora_output: bool = True, backbone_in_seg: bool = True,
               llm_copies: bool = True):
    self.cfg, self.materialize = cfg, materialize
    self.g = torch.Generator().manual_seed(seed)
    self.base, self.omg, self.seg, self.openclip = {}, {}, {}, {}
    self.expected: dict[str, np.ndarray | tuple] = {}
    self.merged: set[str] = set()      # expected paths whose value went through a LoRA merge
    self._llm(r, r_output, lora_output)
    self._projectors()
    self._backbone(self.seg if backbone_in_seg else self.openclip,
                   "backbone" if backbone_in_seg else "visual.trunk", backbone_in_seg)
    if not backbone_in_seg:   # the rest of an OpenCLIP file, all skipped
      for k, s in (("visual.trunk.head.norm.weight", (8,)), ("visual.head.proj.weight", (8, 8)),
                   ("token_embedding.weight", (10, 8)), ("logit_scale", ())):
        self.openclip[k] = self._rand(s)
    self._pixel_decoder("panoptic_head.pixel_decoder")
    self._head(llm_copies)
    self.class_embed = self._rand(cfg.class_embed_shape)
    self._expect("class_embed", self.class_embed)

  # -- primitives ---------------------------------------------------------------------------------

  def _rand(self, shape, scale=None, dtype=torch.float32):
    if not self.materialize:
      return TensorInfo(tuple(shape), "bfloat16" if dtype == torch.bfloat16 else "float32", "-")
    if scale is None:
      scale = 1.0 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.5
    return (scale * torch.randn(tuple(shape), generator=self.g)).to(dtype)

  def _expect(self, path, value, fn=lambda t: t):
    if path in self.expected:
      raise AssertionError(f"test bug: {path} declared twice")
    if self.materialize:
      self.expected[path] = fn(value.double()).numpy()
    else:
      self.expected[path] = None

  def tensor(self, sd, key, path, shape, fn=lambda t: t, **kw):
    sd[key] = self._rand(shape, **kw)
    if path is not None:
      self._expect(path, sd[key], fn)
    return sd[key]

  def linear(self, sd, src, dst, out, inn, bias=True):
    self.tensor(sd, f"{src}.weight", f"{dst}.kernel", (out, inn), lambda w: w.T)
    if bias:
      self.tensor(sd, f"{src}.bias", f"{dst}.bias", (out,))

  def conv(self, sd, src, dst, out, inn, k, bias=True):
    self.tensor(sd, f"{src}.weight", f"{dst}.kernel", (out, inn, k, k),
                lambda w: w.permute(2, 3, 1, 0))
    if bias:
      self.tensor(sd, f"{src}.bias", f"{dst}.bias", (out,))

  def norm(self, sd, src, dst, n, scale="scale"):
    self.tensor(sd, f"{src}.weight", f"{dst}.{scale}", (n,))
    self.tensor(sd, f"{src}.bias", f"{dst}.bias", (n,))

  def mlp(self, sd, src, dst, dims):
    """torch Sequential(Linear, ReLU, Linear, ReLU, Linear) -> layers.0..2."""
    for j, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
      self.linear(sd, f"{src}.{2 * j}", f"{dst}.layers.{j}", o, i)

  # -- the LLM ------------------------------------------------------------------------------------

  def _lora(self, hf_key, base_value, r, omg_key=None):
    """A peft LoRA pair for `hf_key` in the .pth; returns W + alpha/r B A (float64)."""
    module = (omg_key or OMG + hf_key)[:-len(".weight")].replace(".base_layer", "")
    out, inn = base_value.shape
    a = self.tensor(self.omg, f"{module}.lora_A.default.weight", None, (r, inn))
    b = self.tensor(self.omg, f"{module}.lora_B.default.weight", None, (out, r), scale=0.05)
    if not self.materialize:
      return None
    return base_value.double() + (ALPHA / r) * (b.double() @ a.double())

  def _llm(self, r, r_output, lora_output):
    c = self.cfg.llm
    v, d, f = c.vocab_size, c.hidden_size, c.intermediate_size
    hq, hkv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    g = hq // hkv
    bf = torch.bfloat16

    def lin(hf_key, out, inn):
      w = self.tensor(self.base, hf_key, None, (out, inn), dtype=bf)
      return self._lora(hf_key, w, r)

    # Base embedding and head (92544 rows at release size): replaced, never read.
    self.tensor(self.base, "model.tok_embeddings.weight", None, (v - 4, d), dtype=bf)
    self.tensor(self.base, "output.weight", None, (v - 4, d), dtype=bf)
    self.tensor(self.omg, OMG + "model.tok_embeddings.weight", "llm.embed_tokens.embedding", (v, d))
    if lora_output:
      key = OMG + "output.base_layer.weight"
      w = self.tensor(self.omg, key, None, (v, d))
      self._set_merged("llm.lm_head.kernel", self._lora("output.weight", w, r_output, key),
                       lambda m: m.T)
    else:
      self.tensor(self.omg, OMG + "output.weight", "llm.lm_head.kernel", (v, d), lambda w: w.T)
    for i in range(c.num_layers):
      p, t = f"model.layers.{i}.", f"llm.layers.{i}."
      m = lin(p + "attention.wqkv.weight", (hq + 2 * hkv) * dh, d)
      if m is not None or not self.materialize:
        # Grouped layout: rows = KV group h x (g query heads, 1 key, 1 value) x head_dim.
        q_cols, k_cols, v_cols = [], [], []
        for h in range(hkv):
          base = h * (g + 2) * dh
          if self.materialize:
            for j in range(g):   # query head h*g + j
              q_cols.append(m[base + j * dh: base + (j + 1) * dh])
            k_cols.append(m[base + g * dh: base + (g + 1) * dh])
            v_cols.append(m[base + (g + 1) * dh: base + (g + 2) * dh])
        for name, cols in (("q", q_cols), ("k", k_cols), ("v", v_cols)):
          self._set_merged(t + f"self_attn.{name}_proj.kernel",
                           torch.cat(cols).T if self.materialize else None)
      self._set_merged(t + "self_attn.o_proj.kernel", lin(p + "attention.wo.weight", d, hq * dh),
                       lambda w: w.T)
      self._set_merged(t + "mlp.gate_proj.kernel", lin(p + "feed_forward.w1.weight", f, d),
                       lambda w: w.T)
      self._set_merged(t + "mlp.up_proj.kernel", lin(p + "feed_forward.w3.weight", f, d),
                       lambda w: w.T)
      self._set_merged(t + "mlp.down_proj.kernel", lin(p + "feed_forward.w2.weight", d, f),
                       lambda w: w.T)
      self.tensor(self.base, p + "attention_norm.weight", t + "input_layernorm.weight", (d,),
                  dtype=bf)
      self.tensor(self.base, p + "ffn_norm.weight", t + "post_attention_layernorm.weight", (d,),
                  dtype=bf)
      if i == 0:   # a RoPE buffer some exports keep: skipped
        self.tensor(self.base, p + "attention.rotary_emb.inv_freq", None, (dh // 2,))
    self.tensor(self.base, "model.norm.weight", "llm.norm.weight", (d,), dtype=bf)

  def _set_merged(self, path, value, fn=lambda t: t):
    if path in self.expected:
      raise AssertionError(f"test bug: {path} declared twice")
    self.expected[path] = fn(value).numpy() if self.materialize else None
    self.merged.add(path)

  # -- projectors, OMG-Seg ------------------------------------------------------------------------

  def _projectors(self):
    pc = self.cfg.projector
    o = self.omg
    self.linear(o, "projector.model.query_proj", "projector.query_proj", pc.query_hidden,
                pc.query_dim)
    self.linear(o, "projector.model.model.0", "projector.query_fc1", pc.llm_hidden_size,
                pc.query_hidden)
    self.linear(o, "projector.model.model.2", "projector.query_fc2", pc.llm_hidden_size,
                pc.llm_hidden_size)
    self.linear(o, "projector.model.model_feat.0", "projector.pixel_fc1", pc.llm_hidden_size,
                pc.pixel_dim)
    self.linear(o, "projector.model.model_feat.2", "projector.pixel_fc2", pc.llm_hidden_size,
                pc.llm_hidden_size)
    self.tensor(o, "projector.model.seperate_embed.weight", "projector.seperate_embed",
                (1, pc.llm_hidden_size))
    self.linear(o, "projector_text2vision.model.0", "text2vision.fc1", pc.text2vision_dim,
                pc.llm_hidden_size)
    self.linear(o, "projector_text2vision.model.2", "text2vision.fc2", pc.text2vision_dim,
                pc.text2vision_dim)

  def _backbone(self, sd, src, omg_names):
    b = self.cfg.backbone
    dims = b.dims
    self.conv(sd, f"{src}.stem.0", "backbone.stem.conv", dims[0], b.in_chans, 4)
    self.norm(sd, f"{src}.stem.1", "backbone.stem.norm", dims[0])
    for k in range(1, 5):
      s = f"{src}.layer{k}" if omg_names else f"{src}.stages.{k - 1}"
      t, c = f"backbone.layer{k}", dims[k - 1]
      if k > 1:
        self.norm(sd, f"{s}.downsample.0", f"{t}.downsample.norm", dims[k - 2])
        self.conv(sd, f"{s}.downsample.1", f"{t}.downsample.conv", c, dims[k - 2], 2)
      for j in range(b.depths[k - 1]):
        sb, tb = f"{s}.blocks.{j}", f"{t}.blocks.{j}"
        self.conv(sd, f"{sb}.conv_dw", f"{tb}.conv_dw", c, 1, b.kernel_size)
        self.norm(sd, f"{sb}.norm", f"{tb}.norm", c)
        self.linear(sd, f"{sb}.mlp.fc1", f"{tb}.fc1", b.mlp_ratio * c, c)
        self.linear(sd, f"{sb}.mlp.fc2", f"{tb}.fc2", c, b.mlp_ratio * c)
        self.tensor(sd, f"{sb}.gamma", f"{tb}.gamma", (c,))
    if omg_names:   # the unused CLIP head
      self.tensor(sd, f"{src}.head.norm.weight", None, (dims[-1],))
      self.tensor(sd, f"{src}.head.mlp.fc1.weight", None, (8, dims[-1]))

  def _pixel_decoder(self, src):
    pd, sd = self.cfg.pixel_decoder, self.seg
    c, lv = pd.feat_channels, pd.num_levels
    enc_in = list(pd.in_channels)[::-1][:lv]           # strides 32, 16, 8
    for i, cin in enumerate(enc_in):
      self.conv(sd, f"{src}.input_convs.{i}.conv", f"pixel_decoder.input_convs.{i}.conv", c,
                cin, 1)
      self.norm(sd, f"{src}.input_convs.{i}.gn", f"pixel_decoder.input_convs.{i}.gn", c)
    for layer in range(pd.num_layers):
      s, t = f"{src}.encoder.layers.{layer}", f"pixel_decoder.layers.{layer}"
      hlp = pd.num_heads * lv * pd.num_points
      for name, out in (("sampling_offsets", 2 * hlp), ("attention_weights", hlp),
                        ("value_proj", c), ("output_proj", c)):
        self.linear(sd, f"{s}.self_attn.{name}", f"{t}.self_attn.{name}", out, c)
      self.linear(sd, f"{s}.ffn.layers.0.0", f"{t}.ffn.fc1", pd.ffn_dim, c)
      self.linear(sd, f"{s}.ffn.layers.1", f"{t}.ffn.fc2", c, pd.ffn_dim)
      self.norm(sd, f"{s}.norms.0", f"{t}.norm0", c)
      self.norm(sd, f"{s}.norms.1", f"{t}.norm1", c)
    self.tensor(sd, f"{src}.level_encoding.weight", "pixel_decoder.level_encoding", (lv, c))
    assert len(pd.in_channels) - lv == 1
    self.conv(sd, f"{src}.lateral_convs.0.conv", "pixel_decoder.lateral_convs.0.conv", c,
              pd.in_channels[0], 1, bias=False)
    self.norm(sd, f"{src}.lateral_convs.0.gn", "pixel_decoder.lateral_convs.0.gn", c)
    self.conv(sd, f"{src}.output_convs.0.conv", "pixel_decoder.output_convs.0.conv", c, c, 3,
              bias=False)
    self.norm(sd, f"{src}.output_convs.0.gn", "pixel_decoder.output_convs.0.gn", c)
    self.conv(sd, f"{src}.mask_feature", "pixel_decoder.mask_feature", c, c, 1)

  def _transformer_decoder(self, sd, src, dst):
    d = self.cfg.decoder
    c = d.embed_dim
    for i in range(d.num_layers):
      s, t = f"{src}.layers.{i}", f"{dst}.layers.{i}"
      for a in ("self_attn", "cross_attn"):
        self.tensor(sd, f"{s}.{a}.attn.in_proj_weight", f"{t}.{a}.in_proj.kernel", (3 * c, c),
                    lambda w: w.T)
        self.tensor(sd, f"{s}.{a}.attn.in_proj_bias", f"{t}.{a}.in_proj.bias", (3 * c,))
        self.linear(sd, f"{s}.{a}.attn.out_proj", f"{t}.{a}.out_proj", c, c)
      self.linear(sd, f"{s}.ffn.layers.0.0", f"{t}.ffn.fc1", d.ffn_dim, c)
      self.linear(sd, f"{s}.ffn.layers.1", f"{t}.ffn.fc2", c, d.ffn_dim)
      for n in range(3):
        self.norm(sd, f"{s}.norms.{n}", f"{t}.norms.{n}", c)
    self.norm(sd, f"{src}.post_norm", f"{dst}.post_norm", c)

  def _head(self, llm_copies):
    d, sd, h = self.cfg.decoder, self.seg, "panoptic_head"
    c = d.embed_dim
    self._transformer_decoder(sd, f"{h}.transformer_decoder", "decoder.transformer_decoder")
    for name, rows in (("query_feat", d.num_queries), ("query_embed", d.num_queries),
                       ("level_embed", d.num_levels)):
      self.tensor(sd, f"{h}.{name}.weight", f"decoder.{name}", (rows, c))
    self.mlp(sd, f"{h}.mask_embed", "decoder.mask_embed", (c, c, c, c))
    self.mlp(sd, f"{h}.cls_proj", "decoder.cls_proj", (c, c, c, d.cls_embed_dim))
    self.norm(sd, f"{h}.mask_pooling_proj.0", "decoder.mask_pooling_proj.norm", c)
    self.linear(sd, f"{h}.mask_pooling_proj.1", "decoder.mask_pooling_proj.linear", c, c)
    # Stored but unused for GCG: skipped.
    for j, (i, o) in enumerate(((c, c), (c, c), (c, 1))):
      self.tensor(sd, f"{h}.iou_embed.{2 * j}.weight", None, (o, i))
      self.tensor(sd, f"{h}.iou_embed.{2 * j}.bias", None, (o,))
    self.tensor(sd, f"{h}.mask_tokens.weight", None, (1, c))
    self.tensor(sd, f"{h}.pb_embedding.weight", None, (2, c))
    self.tensor(sd, f"{h}.pos_linear.weight", None, (c, 2 * c))
    self.tensor(sd, f"{h}.pos_linear.bias", None, (c,))
    if llm_copies:   # GCG / refseg fine-tunes: in the OMG-LLaVA .pth, under visual_encoder.
      v = f"visual_encoder.{h}"
      self._transformer_decoder(self.omg, f"{v}.transformer_decoder_llm",
                                "decoder.transformer_decoder_llm")
      self.mlp(self.omg, f"{v}.mask_embed_llm", "decoder.mask_embed_llm", (c, c, c, c))


# ------------------------------------------------------------------------------------------------
# Writing the files the way they are released.

def write_release(rel: Release, root, *, omg_wrapped: bool = False) -> dict:
  from safetensors.torch import save_file
  root = str(root)
  base = os.path.join(root, "internlm2-chat-7b")
  os.makedirs(base)
  keys = list(rel.base)
  cut = keys.index("model.layers.1.attention.wqkv.weight")
  names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  weight_map = {}
  for name, part in zip(names, (keys[:cut], keys[cut:])):
    save_file({k: rel.base[k].contiguous() for k in part}, os.path.join(base, name),
              metadata={"format": "pt"})
    weight_map.update({k: name for k in part})
  with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  with open(os.path.join(base, "config.json"), "w") as f:
    json.dump(internlm2_config(rel.cfg.llm), f)
  for name, data in TOKENIZER_FILES.items():
    with open(os.path.join(base, name), "wb") as f:
      f.write(data)
  files = {"internlm": base, "omg_llava": os.path.join(root, "finetuned_gcg.pth"),
           "omg_seg": os.path.join(root, "omg_seg_convl.pth"),
           "class_embed": os.path.join(root, "convnext_large_d_320_CocoPanopticOVDataset.pth")}
  torch.save({"state_dict": rel.omg} if omg_wrapped else rel.omg, files["omg_llava"])
  torch.save({"meta": {"epoch": 12, "mmengine_version": "0.8.4",
                       "dataset_meta": {"classes": ("person", "sky")}},
              "state_dict": rel.seg}, files["omg_seg"])
  torch.save(rel.class_embed, files["class_embed"])
  if rel.openclip:
    files["openclip"] = os.path.join(root, "open_clip_pytorch_model.bin")
    torch.save(rel.openclip, files["openclip"])
  return files


def run_cli(files, out, *extra, dtype="float32"):
  args = ["omg_llava", "--internlm", files["internlm"], "--omg-llava", files["omg_llava"],
          "--omg-seg", files["omg_seg"], "--class-embed", files["class_embed"],
          "--out", str(out), "--dtype", dtype, "--size", "tiny", "--no-progress", *extra]
  if "openclip" in files:
    args += ["--openclip", files["openclip"]]
  return cli.main(args)


def flat_values(model) -> dict[str, np.ndarray]:
  from flax import nnx
  return {".".join(map(str, p)): v.get_value()
          for p, v in nnx.state(model).flat_state()}


def assert_matches(model, rel: Release, llm_dtype=np.float32):
  """Every variable equals its declared value; none is missing or extra."""
  got = flat_values(model)
  assert set(got) == set(rel.expected)
  for path, want in rel.expected.items():
    value = got[path]
    is_llm = path.startswith("llm.")
    dt = np.dtype(ml_dtypes.bfloat16) if (is_llm and llm_dtype != np.float32) else np.float32
    assert value.dtype == dt, path
    assert value.shape == want.shape, path
    have = np.asarray(value, np.float64)
    if dt == np.float32:
      if path in rel.merged:   # float32 merge vs the float64 reference
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6, err_msg=path)
      else:
        np.testing.assert_array_equal(have, want.astype(np.float32), err_msg=path)
    else:
      want_bf = want.astype(np.float32).astype(dt).astype(np.float64)
      if path in rel.merged:   # at most one bf16 step apart (rounding float32 vs float64)
        np.testing.assert_allclose(have, want_bf, rtol=2 ** -7, atol=1e-6, err_msg=path)
      else:
        np.testing.assert_array_equal(have, want_bf, err_msg=path)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  rel = Release(CFG)
  root = tmp_path_factory.mktemp("omg")
  files = write_release(rel, root)
  out = root / "out"
  assert run_cli(files, out) == 0
  return {"rel": rel, "files": files, "root": root, "out": out,
          "model": convert.load_omg_llava(str(out))}


# ------------------------------------------------------------------------------------------------
# End to end.

def test_every_parameter_is_converted_exactly(release):
  rel = release["rel"]
  assert_matches(release["model"], rel)
  # The test itself: merges really happened (not zero deltas) and the LoRA scale is alpha / r.
  assert len(rel.merged) == 3 * 7 + 1
  m = flat_values(release["model"])
  base = rel.omg[OMG + "output.base_layer.weight"].double().numpy()
  assert np.abs(m["llm.lm_head.kernel"] - base.T).max() > 0.1


def test_output_layout_and_manifest(release):
  out, rel = release["out"], release["rel"]
  for name, data in TOKENIZER_FILES.items():
    assert (out / name).read_bytes() == data
  assert json.loads((out / "source_config.json").read_text()) == internlm2_config(CFG.llm)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["model"] == "omg_llava" and manifest["dtype"] == "float32"
  assert manifest["backbone_from"] == "omg_seg" and manifest["llm_decoder_copies"] is True
  assert manifest["num_class_prototypes"] == CFG.num_class_prototypes
  assert "output.weight" in manifest["lora_merged"]
  assert "model.layers.2.attention.wqkv.weight" in manifest["lora_merged"]
  skipped = set(manifest["skipped"])
  for key in ("panoptic_head.iou_embed.4.weight", "panoptic_head.mask_tokens.weight",
              "panoptic_head.pb_embedding.weight", "panoptic_head.pos_linear.bias",
              "backbone.head.norm.weight"):
    assert f"omg_seg: {key}" in skipped
  assert "internlm2+lora: model.layers.0.attention.rotary_emb.inv_freq" in skipped
  assert not [k for k in skipped if k.startswith("omg_llava:")]   # all read (LLM keys merged)
  assert len(skipped) == 1 + 2 + 6 + 1 + 1 + 2   # inv_freq, head, iou_embed, tokens, pb, pos
  assert manifest["replaced_from_omg_llava"] == ["model.tok_embeddings.weight", "output.weight"]
  groups = set(manifest["groups"])
  assert {f"llm.layers.{i}" for i in range(CFG.llm.num_layers)} <= groups
  assert {"llm.embed_tokens", "llm.lm_head", "llm.norm", "backbone.stem", "backbone.layer3",
          "pixel_decoder", "decoder", "decoder.transformer_decoder",
          "decoder.transformer_decoder_llm", "decoder.mask_embed_llm", "projector", "text2vision",
          "class_embed"} <= groups
  assert sorted(os.listdir(out / "params")) == sorted(groups)
  assert OMGLLaVAConfig.from_dict(json.loads((out / "config.json").read_text())) == CFG
  assert not glob.glob(str(release["root"] / "out.tmp-*"))
  assert len(rel.expected) == sum(len(v) for v in manifest["groups"].values())


def test_bfloat16_alternative_layouts(tmp_path):
  """--dtype bfloat16 (LLM bf16, vision and projectors float32), with the other documented
  layouts: a {'state_dict'} .pth whose head is `output.weight` without LoRA, omg_seg_convl.pth
  without backbone.* (trunk from --openclip), no `_llm` decoder copies."""
  rel = Release(CFG, seed=1, lora_output=False, backbone_in_seg=False, llm_copies=False)
  files = write_release(rel, tmp_path, omg_wrapped=True)
  assert run_cli(files, tmp_path / "out", dtype="bfloat16") == 0
  model = convert.load_omg_llava(str(tmp_path / "out"))
  assert model.config.decoder.llm_decoder is False
  assert model.config.llm.param_dtype == np.dtype(ml_dtypes.bfloat16)
  assert_matches(model, rel, llm_dtype=ml_dtypes.bfloat16)
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["backbone_from"] == "openclip" and manifest["llm_decoder_copies"] is False
  assert "output.weight" not in manifest["lora_merged"]
  assert "openclip: token_embedding.weight" in manifest["skipped"]


def test_load_on_a_mesh_places_arrays_by_logical_names(release):
  from flax import nnx
  from models.sharding import MESH_AXES, param_shardings
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  model = convert.load_omg_llava(str(release["out"]), mesh=mesh)
  want = dict(param_shardings(nnx.state(model), mesh).flat_state())
  for path, var in nnx.state(model).flat_state():
    assert var[...].sharding.is_equivalent_to(want[path].get_value(), var.ndim), path
  kernel = model.llm.layers[0].mlp.up_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(release["model"].llm.layers[0].mlp.up_proj.kernel[...]))
  assert release["model"].class_embed[...].sharding.device_set == {jax.devices()[0]}


# ------------------------------------------------------------------------------------------------
# Bad checkpoints: one error naming every problem, nothing written.

def _assert_no_output(parent, name="out"):
  assert not os.path.exists(os.path.join(parent, name))
  assert not glob.glob(os.path.join(parent, name + ".tmp-*"))


def test_bad_checkpoint_lists_every_problem(release, tmp_path):
  rel = release["rel"]
  omg = dict(rel.omg)
  del omg["projector.model.model.2.bias"]                                  # missing
  omg["projector.model.mystery.weight"] = torch.zeros(3, 3)                # unknown
  omg["projector_text2vision.model.0.weight"] = torch.zeros(5, 64)         # misshapen
  del omg[OMG + "model.layers.1.feed_forward.w3.lora_B.default.weight"]    # A without B
  omg[OMG + "model.layers.0.attention.wo.lora_B.default.weight"] = torch.zeros(64, 7)  # r mismatch
  bad = str(tmp_path / "bad.pth")
  torch.save(omg, bad)
  files = dict(release["files"], omg_llava=bad)
  with pytest.raises(ConversionError) as e:
    run_cli(files, tmp_path / "out")
  msg = str(e.value)
  assert "5 problems" in msg, msg
  assert ("bad.pth: 'llm.base_model.model.model.layers.1.feed_forward.w3.lora_A.default.weight': "
          "lora_A without lora_B (target 'model.layers.1.feed_forward.w3.weight')") in msg
  assert ("bad.pth: LoRA shapes do not chain for 'model.layers.0.attention.wo.weight' (64, 64) "
          "(out, in): 'llm.base_model.model.model.layers.0.attention.wo.lora_A.default.weight' "
          "(8, 64) should be (r, 64), 'llm.base_model.model.model.layers.0.attention.wo.lora_B."
          "default.weight' (64, 7) should be (64, r)") in msg
  assert "omg_llava: projector.model.mystery.weight (3, 3): unknown key" in msg
  assert ("omg_llava: projector_text2vision.model.0.weight (5, 64) -> text2vision.fc1.kernel: "
          "shape (64, 5) after linear_weight, the model expects (64, 64)") in msg
  assert "model parameter projector.query_fc2.bias (64,): no checkpoint key fills it" in msg
  _assert_no_output(tmp_path)


def test_config_backbone_and_replacement_problems_reported_together(release, tmp_path):
  import shutil
  rel = release["rel"]
  base = tmp_path / "internlm"
  shutil.copytree(release["files"]["internlm"], base)
  (base / "config.json").write_text(json.dumps(internlm2_config(
      CFG.llm, num_key_value_heads=4, rope_scaling={"type": "linear", "factor": 4.0})))
  omg = {k: t for k, t in rel.omg.items() if k != OMG + "model.tok_embeddings.weight"}
  torch.save(omg, tmp_path / "omg.pth")
  seg = {k: t for k, t in rel.seg.items() if not k.startswith("backbone.")}
  torch.save({"state_dict": seg}, tmp_path / "seg.pth")
  files = dict(release["files"], internlm=str(base), omg_llava=str(tmp_path / "omg.pth"),
               omg_seg=str(tmp_path / "seg.pth"))
  with pytest.raises(ConversionError) as e:
    run_cli(files, tmp_path / "out")
  msg = str(e.value)
  assert "internlm2 config.json: num_key_value_heads: 4, the model expects 2" in msg
  assert ("internlm2 config.json: rope_scaling: {'type': 'linear', 'factor': 4.0}; only none or "
          "the shipped dynamic-NTK") in msg
  assert ("omg.pth: no llm.base_model.model.model.tok_embeddings.weight: the release .pth carries "
          "the resized (4 added tokens) version that replaces the base's (156, 64)") in msg
  # ... which then also shows as the base's embedding not fitting the model:
  assert ("internlm2+lora: model.tok_embeddings.weight (156, 64) -> llm.embed_tokens.embedding: "
          "shape (156, 64) after identity, the model expects (160, 64)") in msg
  assert "has no backbone.* keys and no --openclip file was given" in msg
  assert "model parameter backbone.stem.conv.kernel (4, 4, 3, 8): no checkpoint key fills it" in msg
  _assert_no_output(tmp_path)


# ------------------------------------------------------------------------------------------------
# The release key set at full size (metadata only: nothing allocated).

class _Meta:
  def __init__(self, name, sd):
    self.path = f"<{name}>"
    self._meta = {k: v if isinstance(v, TensorInfo) else TensorInfo(tuple(v.shape), "float32", "-")
                  for k, v in sd.items()}

  def metadata(self):
    return self._meta


def test_release_key_set_plans_completely_at_7b():
  cfg = OMGLLaVAConfig.omg_llava_7b(num_class_prototypes=5)
  rel = Release(cfg, materialize=False, r=512, r_output=512)
  # Spot checks of the release shapes (omg_llava.md §2.3).
  assert rel.omg[OMG + "model.layers.0.attention.wqkv.lora_B.default.weight"].shape == (6144, 512)
  assert rel.omg[OMG + "output.base_layer.weight"].shape == (92548, 4096)
  assert rel.base["model.tok_embeddings.weight"].shape == (92544, 4096)
  assert rel.omg["projector.model.model_feat.0.weight"].shape == (4096, 6656)
  assert rel.seg["panoptic_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight"
                 ].shape == (192, 256)
  cls = _Meta("class_embed", {ClassEmbedFile.KEY: TensorInfo((133, 5, 768), "float32", "-")})
  plan = plan_omg_llava(internlm2_config(cfg.llm), _Meta("internlm2", rel.base),
                        _Meta("omg_llava", rel.omg), _Meta("omg_seg", rel.seg), cls,
                        dtype="bfloat16", size="omg_llava_7b")
  filled = {".".join(map(str, p)) for s in plan.steps.values() if s is not None for p in s.paths}
  assert filled == set(rel.expected) == {".".join(map(str, p)) for p in plan.expected}
  assert len(plan.notes["lora_merged"]) == 32 * 5 + 1
  # The LLM is stored bf16, everything else float32; the largest group is one LLM layer.
  per_group: dict[str, int] = {}
  for p, (s, dt) in plan.expected.items():
    assert dt == (np.dtype(ml_dtypes.bfloat16) if p[0] == "llm" else np.float32), p
    g = omg_llava_table.group_of(p)[0]
    per_group[g] = per_group.get(g, 0) + math.prod(s)
  big = sorted(per_group.values(), reverse=True)
  assert big[:2] == [per_group["llm.embed_tokens"], per_group["llm.lm_head"]] == [92548 * 4096] * 2
  assert big[2] == per_group["llm.layers.0"] == 218_112_000
  assert isinstance(plan.sources[0], pipeline.Source)
