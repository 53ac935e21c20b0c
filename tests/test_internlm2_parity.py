"""InternLM2 (OMG-LLaVA's LLM) on `LlamaForCausalLM`, and the LoRA merge, vs plain torch (fp32, CPU).

The reference below follows InternLM2's remote modeling code (as dispatched by XTuner: plain RoPE
with base rope_theta) with its real parameter names: fused `wqkv` read through
`view(b, q, Hkv, g+2, Dh)` (= the remote `rearrange("b q (h gs d) -> b q h gs d")`), queries
`[..., :g, :]` flattened `(h gs)`, keys `[..., -2, :]`, values `[..., -1, :]`; rotate-half RoPE;
GQA by `repeat_kv`; SwiGLU `w2(silu(w1 x) * w3 x)`; RMSNorm; untied `output`. LoRA wrappers carry
peft's names (`base_layer`, `lora_A.default`, `lora_B.default`) and compute
`base(x) + scale * lora_B(lora_A(x))`.

Proves: the split table loads the fused weights (HF names and OMG-LLaVA's prefixed names) so logits
match to 1e-4; prefill + decode through the KV cache equals the full forward; `merge_lora` equals
the unmerged computation to 1e-5; a LoRA-wrapped model (with resized, replaced embeddings/head)
equals our merged model; bad inputs give clear errors.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import jax
import jax.numpy as jnp
from flax import nnx

from convert.lora import (DEFAULT_LORA_ALPHA, lora_pairs, lora_scale, merge_lora,
                          merged_llm_state)
from models.llama.config import LlamaConfig
from models.llama.internlm2_params import (INTERNLM2_TABLE, OMG_LLM_PREFIX, fuse_wqkv,
                                           internlm2_table, split_wqkv, strip_omg_prefix)
from models.llama.modeling import LlamaForCausalLM
from models.param_tables import load_state_dict, map_key

ATOL = 1e-4


# -- plain-torch InternLM2 reference ----------------------------------------------------------------

class LoraLinear(nn.Module):
  """peft's wrapped Linear (no bias): base_layer + lora_A/lora_B ModuleDicts keyed by adapter."""

  def __init__(self, d_in, d_out, r, alpha):
    super().__init__()
    self.base_layer = nn.Linear(d_in, d_out, bias=False)
    self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
    self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
    self.scaling = alpha / r

  def forward(self, x):
    return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


def _linear(d_in, d_out, lora):
  return nn.Linear(d_in, d_out, bias=False) if lora is None else LoraLinear(d_in, d_out, *lora)


class RMSNorm(nn.Module):
  def __init__(self, d, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(d))
    self.eps = eps

  def forward(self, x):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.eps)).to(x.dtype)


def rotate_half(x):
  x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
  return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep):
  b, h, s, d = x.shape
  return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
  def __init__(self, cfg, lora):
    super().__init__()
    self.h, self.hkv, self.dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.groups = self.h // self.hkv
    self.theta = cfg.rope_theta
    self.wqkv = _linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.dh, lora)
    self.wo = _linear(self.h * self.dh, cfg.hidden_size, lora)

  def forward(self, x, pos):
    b, q, _ = x.shape
    qkv = self.wqkv(x).view(b, q, self.hkv, 2 + self.groups, self.dh)
    qs = qkv[..., :self.groups, :].reshape(b, q, self.h, self.dh).transpose(1, 2)
    ks = qkv[..., -2, :].transpose(1, 2)
    vs = qkv[..., -1, :].transpose(1, 2)
    inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dh, 2).float() / self.dh))
    freqs = pos.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    qs = qs * cos + rotate_half(qs) * sin
    ks = ks * cos + rotate_half(ks) * sin
    ks, vs = repeat_kv(ks, self.groups), repeat_kv(vs, self.groups)
    scores = qs @ ks.transpose(2, 3) / math.sqrt(self.dh)
    causal = torch.triu(torch.ones(q, q, dtype=torch.bool), 1)
    scores = scores.masked_fill(causal, float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(qs.dtype) @ vs
    return self.wo(out.transpose(1, 2).reshape(b, q, -1))


class FeedForward(nn.Module):
  def __init__(self, cfg, lora):
    super().__init__()
    self.w1 = _linear(cfg.hidden_size, cfg.intermediate_size, lora)
    self.w3 = _linear(cfg.hidden_size, cfg.intermediate_size, lora)
    self.w2 = _linear(cfg.intermediate_size, cfg.hidden_size, lora)

  def forward(self, x):
    return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
  def __init__(self, cfg, lora):
    super().__init__()
    self.attention = Attention(cfg, lora)
    self.feed_forward = FeedForward(cfg, lora)
    self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def forward(self, x, pos):
    x = x + self.attention(self.attention_norm(x), pos)
    return x + self.feed_forward(self.ffn_norm(x))


class Backbone(nn.Module):
  def __init__(self, cfg, lora):
    super().__init__()
    self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.layers = nn.ModuleList([DecoderLayer(cfg, lora) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
  """`lora=(r, alpha)` wraps every linear (wqkv, wo, w1, w2, w3, output) like peft does."""

  def __init__(self, cfg, lora=None):
    super().__init__()
    self.model = Backbone(cfg, lora)
    self.output = _linear(cfg.hidden_size, cfg.vocab_size, lora)

  def forward(self, ids, pos):
    x = self.model.tok_embeddings(ids)
    for layer in self.model.layers:
      x = layer(x, pos)
    return self.output(self.model.norm(x))


def _randomize(module, seed):
  """Non-trivial weights everywhere: norms around 1, LoRA B non-zero (peft inits it to 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
      elif "tok_embeddings" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=g))


# -- helpers ----------------------------------------------------------------------------------------

@jax.jit
def forward(model, ids, pos):
  hidden, _ = model(model.embed(ids), pos)
  return model.logits(hidden)


def _ref_logits(ref, ids, pos):
  with torch.no_grad():
    return ref(torch.as_tensor(np.array(ids)), torch.as_tensor(np.array(pos))).numpy()


def _ids(cfg, b, t, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


@pytest.fixture(scope="module")
def built():
  cfg = LlamaConfig.internlm2_tiny()
  torch.manual_seed(0)
  ref = InternLM2ForCausalLM(cfg).eval()
  _randomize(ref, 0)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, ref.state_dict(), internlm2_table(cfg))
  return cfg, ref, model


# -- layout -----------------------------------------------------------------------------------------

def test_split_wqkv_follows_the_grouped_layout():
  hkv, g, dh, d = 2, 3, 4, 5
  # Row r of wqkv holds the label of (kv group, slot in group, dim) it belongs to.
  labels = np.array([[kv * 100 + s * 10 + j] * d for kv in range(hkv) for s in range(g + 2)
                     for j in range(dh)], np.float32)
  q, k, v = split_wqkv(labels, hkv, dh)
  assert q.shape == (d, hkv * g * dh) and k.shape == v.shape == (d, hkv * dh)
  # Query head h*g + s is slot s of KV group h; keys are slot g, values slot g+1.
  want_q = [kv * 100 + s * 10 + j for kv in range(hkv) for s in range(g) for j in range(dh)]
  np.testing.assert_array_equal(q[0], want_q)
  np.testing.assert_array_equal(k[0], [kv * 100 + g * 10 + j for kv in range(hkv)
                                       for j in range(dh)])
  np.testing.assert_array_equal(v[0], [kv * 100 + (g + 1) * 10 + j for kv in range(hkv)
                                       for j in range(dh)])
  np.testing.assert_array_equal(fuse_wqkv(q, k, v, hkv, dh), labels)


def test_7b_table_maps_every_name():
  cfg = LlamaConfig.internlm2_chat_7b()
  paths, fn = map_key("model.layers.31.attention.wqkv.weight", INTERNLM2_TABLE)
  assert paths == (("layers", 31, "self_attn", "q_proj", "kernel"),
                   ("layers", 31, "self_attn", "k_proj", "kernel"),
                   ("layers", 31, "self_attn", "v_proj", "kernel"))
  # A zero-stride view: the output shapes without allocating the 6144x4096 weight.
  w = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (6144, 4096), (0, 0))
  assert [a.shape for a in fn(w)] == [(4096, 4096), (4096, 1024), (4096, 1024)]
  assert cfg.num_heads // cfg.num_kv_heads == 4  # gs = 6 per group, as in the release
  for key, want in [("model.tok_embeddings.weight", ("embed_tokens", "embedding")),
                    ("model.layers.0.feed_forward.w1.weight", ("layers", 0, "mlp", "gate_proj",
                                                                "kernel")),
                    ("model.layers.0.feed_forward.w3.weight", ("layers", 0, "mlp", "up_proj",
                                                                "kernel")),
                    ("model.layers.0.feed_forward.w2.weight", ("layers", 0, "mlp", "down_proj",
                                                                "kernel")),
                    ("model.layers.0.attention_norm.weight", ("layers", 0, "input_layernorm",
                                                               "weight")),
                    ("model.layers.0.ffn_norm.weight", ("layers", 0, "post_attention_layernorm",
                                                         "weight")),
                    ("output.weight", ("lm_head", "kernel"))]:
    assert map_key(key, INTERNLM2_TABLE)[0] == want
  assert strip_omg_prefix("llm.base_model.model.output.base_layer.weight") == "output.weight"
  assert strip_omg_prefix("projector.model.query_proj.weight") is None


# -- parity -----------------------------------------------------------------------------------------

def test_logits_match_torch_internlm2(built):
  cfg, ref, model = built
  ids = _ids(cfg, 2, 13)
  pos = np.broadcast_to(np.arange(13), ids.shape)
  want = _ref_logits(ref, ids, pos)
  assert want.std() > 0.3  # the comparison is not between near-zero numbers
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Positions far out make theta 1e6 (vs LLaMA's 1e4) matter.
  far = pos + 5000
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(far))),
                             _ref_logits(ref, ids, far), atol=ATOL, rtol=0)


def test_prefill_then_decode_matches_full_forward(built):
  cfg, ref, model = built
  total, t0, slots = 12, 8, 16
  ids = _ids(cfg, 2, total, seed=1)
  pos = np.broadcast_to(np.arange(total), ids.shape)
  want = _ref_logits(ref, ids, pos)
  step = jax.jit(lambda m, ids, p, c, i: (lambda h, c: (m.logits(h), c))(
      *m(m.embed(ids), p, cache=c, cache_write_index=i)))
  cache = model.init_cache(2, slots)
  got, cache = step(model, jnp.asarray(ids[:, :t0]), jnp.asarray(pos[:, :t0]), cache, 0)
  np.testing.assert_allclose(np.asarray(got), want[:, :t0], atol=ATOL, rtol=0)
  for s in range(t0, total):
    got, cache = step(model, jnp.asarray(ids[:, s:s + 1]), jnp.asarray(pos[:, s:s + 1]), cache, s)
    np.testing.assert_allclose(np.asarray(got)[:, 0], want[:, s], atol=ATOL, rtol=0,
                               err_msg=f"decode step {s}")


def test_load_errors_are_clear(built):
  cfg, ref, _ = built
  sd = dict(ref.state_dict())
  sd["model.layers.1.attention.wqkv.weight"] = sd["model.layers.1.attention.wqkv.weight"][:-16]
  del sd["output.weight"]
  with pytest.raises(ValueError, match=r"(?s)layers\.1\.attention\.wqkv\.weight.*wqkv weight has "
                                       r"shape \(112, 64\).*needs \(128, 64\).*lm_head\.kernel.*not "
                                       r"filled"):
    load_state_dict(LlamaForCausalLM(cfg, rngs=nnx.Rngs(1)), sd, internlm2_table(cfg))
  with pytest.raises(ValueError, match="g >= 1"):
    split_wqkv(np.zeros((2 * 2 * 16, 64)), 2, 16)


# -- LoRA -------------------------------------------------------------------------------------------

def test_merge_lora_equals_unmerged_module():
  rng = np.random.default_rng(0)
  d_in, d_out, r = 48, 40, 8
  w = rng.normal(size=(d_out, d_in)).astype(np.float32) * 0.2
  a = rng.normal(size=(r, d_in)).astype(np.float32) * 0.2
  b = rng.normal(size=(d_out, r)).astype(np.float32) * 0.2
  x = rng.normal(size=(7, d_in)).astype(np.float32)
  scale = lora_scale(a, alpha=4.0)
  assert scale == 0.5
  unmerged = x @ w.T + scale * (x @ a.T) @ b.T
  merged = merge_lora(torch.from_numpy(w).bfloat16(), a, torch.from_numpy(b), scale)
  assert merged.dtype == np.float32
  merged = merge_lora(w, a, b, scale)
  np.testing.assert_allclose(x @ merged.T, unmerged, atol=1e-5, rtol=0)
  assert np.abs(scale * (x @ a.T) @ b.T).max() > 0.3  # the LoRA term is not negligible
  # The release: r = 512, alpha = 256.
  assert lora_scale(np.zeros((512, 4)), DEFAULT_LORA_ALPHA) == 0.5
  with pytest.raises(ValueError, match="do not chain"):
    merge_lora(w, a, b[:, :4], scale)


def test_lora_pairs_and_their_errors():
  p = OMG_LLM_PREFIX
  keys = [p + "model.layers.3.attention.wqkv.lora_A.default.weight",
          p + "model.layers.3.attention.wqkv.lora_B.default.weight",
          p + "output.lora_A.default.weight", p + "output.lora_B.default.weight",
          p + "model.tok_embeddings.weight", "projector.model.query_proj.weight"]
  assert lora_pairs(keys) == {
      "model.layers.3.attention.wqkv.weight": (keys[0], keys[1]),
      "output.weight": (keys[2], keys[3])}
  bad = keys[1:3] + [p + "model.layers.0.feed_forward.w2.lora_B.other.weight"]
  with pytest.raises(ValueError, match=r"(?s)3 problems.*adapter 'other'.*"
                                       r"wqkv\.lora_B\.default\.weight': lora_B without lora_A.*"
                                       r"output\.lora_A\.default\.weight': lora_A without lora_B"):
    lora_pairs(bad)


def test_lora_model_matches_merged_model():
  """End to end: base InternLM2 (old 156-row vocab) + OMG-LLaVA-style .pth (LoRA on every linear,
  output included; resized embeddings and head under `llm.base_model.model.`) -> merged weights ->
  LlamaForCausalLM, vs the LoRA-wrapped torch model."""
  cfg = LlamaConfig.internlm2_tiny()
  r, alpha = 8, 4.0
  base = InternLM2ForCausalLM(LlamaConfig.internlm2_tiny(vocab_size=156)).eval()
  _randomize(base, 1)
  lora = InternLM2ForCausalLM(cfg, lora=(r, alpha)).eval()
  _randomize(lora, 2)
  with torch.no_grad():  # frozen base linears and norms are shared; embeddings/head are new
    for name, p in lora.named_parameters():
      if "lora_" not in name and "tok_" not in name and not name.startswith("output."):
        p.copy_(base.state_dict()[name.replace(".base_layer.", ".")])
  lsd = lora.state_dict()
  omg = {OMG_LLM_PREFIX + k: v for k, v in lsd.items()
         if "lora_" in k or "tok_" in k or k.startswith("output.")}
  omg["projector.model.seperate_embed.weight"] = torch.zeros(1, cfg.hidden_size)  # ignored
  assert OMG_LLM_PREFIX + "output.base_layer.weight" in omg
  merged = dict(merged_llm_state(base.state_dict(), omg, alpha=alpha))
  assert merged["model.tok_embeddings.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  load_state_dict(model, merged, internlm2_table(cfg))

  ids = _ids(cfg, 2, 11, seed=3)
  pos = np.broadcast_to(np.arange(11), ids.shape)
  want = _ref_logits(lora, ids, pos)
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # The adapters matter: the same model without them is far off.
  with torch.no_grad():
    for name, p in lora.named_parameters():
      if "lora_B" in name:
        p.zero_()
  assert np.abs(_ref_logits(lora, ids, pos) - want).max() > 0.1

  # Unpaired LoRA keys are refused before anything is merged.
  del omg[OMG_LLM_PREFIX + "model.layers.1.feed_forward.w2.lora_B.default.weight"]
  with pytest.raises(ValueError, match=r"w2\.lora_A\.default\.weight': lora_A without lora_B"):
    next(merged_llm_state(base.state_dict(), omg, alpha=alpha))


def test_prefixed_omg_names_load(built):
  """A full LLM state under OMG-LLaVA's names (`.base_layer` on the LoRA-wrapped linears) loads
  through the prefixed table to the same model."""
  cfg, ref, model = built
  sd = {}
  for k, v in ref.state_dict().items():
    if k.endswith(("wqkv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight")) \
        or k == "output.weight":
      k = k[:-len("weight")] + "base_layer.weight"
    sd[OMG_LLM_PREFIX + k] = v
  other = LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
  load_state_dict(other, sd, internlm2_table(cfg, OMG_LLM_PREFIX))
  for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(other, nnx.Param)),
                              nnx.to_flat_state(nnx.state(model, nnx.Param))):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
  with pytest.raises(ValueError, match="no conversion rule matches.*lora_A"):
    load_state_dict(other, {OMG_LLM_PREFIX + "output.lora_A.default.weight": np.zeros((8, 64))},
                    internlm2_table(cfg, OMG_LLM_PREFIX), strict=True)
