"""InternLM2 checkpoint names -> `LlamaForCausalLM` parameter paths (a table, see
models/param_tables).

InternLM2 is the LLaMA architecture under other names (omg_llava.md §1.6):

  InternLM2 (HF remote code)                    LlamaForCausalLM
  model.tok_embeddings.weight      [V, D]       embed_tokens.embedding
  model.layers.i.attention.wqkv    [(Hq+2Hkv)Dh, D]  layers.i.self_attn.{q,k,v}_proj.kernel (split)
  model.layers.i.attention.wo      [D, HqDh]    layers.i.self_attn.o_proj.kernel
  model.layers.i.feed_forward.w1   [F, D]       layers.i.mlp.gate_proj.kernel
  model.layers.i.feed_forward.w3   [F, D]       layers.i.mlp.up_proj.kernel
  model.layers.i.feed_forward.w2   [D, F]       layers.i.mlp.down_proj.kernel
  model.layers.i.attention_norm    [D]          layers.i.input_layernorm.weight
  model.layers.i.ffn_norm          [D]          layers.i.post_attention_layernorm.weight
  model.norm                       [D]          norm.weight
  output.weight                    [V, D]       lm_head.kernel

`wqkv` is fused in a *grouped* layout: its rows are (Hkv groups) x (g query heads, 1 key head,
1 value head) x Dh, with g = Hq / Hkv. The remote code reads its output with
`rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=g+2)`, takes `[..., :g, :]` as the queries
(flattened `(h gs)`, so query head h*g + j belongs to KV head h, the same grouping as LLaMA's
`repeat_kv`), `[..., -2, :]` as keys and `[..., -1, :]` as values. `split_wqkv` undoes exactly that.

OMG-LLaVA's own checkpoint (`*.pth`) names the LLM through peft: `llm.base_model.model.<hf name>`,
with `.base_layer` inserted before `.weight` in LoRA-wrapped linears. `internlm2_table(cfg,
prefix=OMG_LLM_PREFIX)` accepts those names; LoRA factors (`lora_A`/`lora_B`) are not matched: merge
them first (convert/lora.py).
"""

from __future__ import annotations

import re

import numpy as np

from models.llama.config import LlamaConfig
from models.param_tables import Table, identity, linear_weight

OMG_LLM_PREFIX = "llm.base_model.model."


def split_wqkv(w: np.ndarray, num_kv_heads: int, head_dim: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """InternLM2 fused `wqkv.weight` [Hkv*(g+2)*Dh, D] -> Dense kernels (q [D, Hkv*g*Dh],
  k [D, Hkv*Dh], v [D, Hkv*Dh]); g (query heads per KV head) is read from the row count."""
  if w.ndim != 2:
    raise ValueError(f"split_wqkv expects a 2-D [rows, D] weight, got shape {w.shape}")
  rows, d = w.shape
  per_group = num_kv_heads * head_dim
  if rows % per_group or rows // per_group < 3:
    raise ValueError(f"wqkv has {rows} rows; expected num_kv_heads*(g+2)*head_dim = "
                     f"{num_kv_heads}*(g+2)*{head_dim} with g >= 1")
  gs = rows // per_group  # g + 2
  grouped = w.reshape(num_kv_heads, gs, head_dim, d)
  q = grouped[:, :gs - 2].reshape(-1, d)
  k = grouped[:, gs - 2].reshape(-1, d)
  v = grouped[:, gs - 1].reshape(-1, d)
  return q.T, k.T, v.T


def fuse_wqkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_kv_heads: int, head_dim: int
              ) -> np.ndarray:
  """Inverse of `split_wqkv`: Dense kernels q [D, Hq*Dh], k/v [D, Hkv*Dh] -> wqkv [rows, D]."""
  d = q.shape[0]
  qg = q.T.reshape(num_kv_heads, -1, head_dim, d)
  kg = k.T.reshape(num_kv_heads, 1, head_dim, d)
  vg = v.T.reshape(num_kv_heads, 1, head_dim, d)
  return np.concatenate([qg, kg, vg], axis=1).reshape(-1, d)


def internlm2_table(cfg: LlamaConfig, prefix: str = "") -> Table:
  """The InternLM2 -> LlamaForCausalLM table for decoder `cfg` (the wqkv split needs its head
  layout). `prefix`: "" for HF InternLM2 checkpoints, `OMG_LLM_PREFIX` for OMG-LLaVA's `.pth` names
  (then `.base_layer.weight` is accepted wherever `.weight` is)."""
  hq, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

  def wqkv(w: np.ndarray):
    if w.shape != ((hq + 2 * hkv) * dh, d):
      raise ValueError(f"wqkv weight has shape {w.shape}; config (heads {hq}, kv heads {hkv}, "
                       f"head_dim {dh}, hidden {d}) needs {((hq + 2 * hkv) * dh, d)}")
    return split_wqkv(w, hkv, dh)

  p = re.escape(prefix)
  w = r"(?:\.base_layer)?\.weight" if prefix else r"\.weight"
  layer = p + r"model\.layers\.(\d+)\."
  return (
      (p + r"model\.tok_embeddings" + w, "embed_tokens.embedding", identity),
      (layer + r"attention\.wqkv" + w,
       (r"layers.\1.self_attn.q_proj.kernel", r"layers.\1.self_attn.k_proj.kernel",
        r"layers.\1.self_attn.v_proj.kernel"), wqkv),
      (layer + r"attention\.wo" + w, r"layers.\1.self_attn.o_proj.kernel", linear_weight),
      (layer + r"feed_forward\.w1" + w, r"layers.\1.mlp.gate_proj.kernel", linear_weight),
      (layer + r"feed_forward\.w3" + w, r"layers.\1.mlp.up_proj.kernel", linear_weight),
      (layer + r"feed_forward\.w2" + w, r"layers.\1.mlp.down_proj.kernel", linear_weight),
      (layer + r"attention_norm\.weight", r"layers.\1.input_layernorm.weight", identity),
      (layer + r"ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight", identity),
      # RoPE tables are recomputed from the config (plain RoPE, theta 1e6), never loaded.
      (layer + r"attention\.rotary_emb\.inv_freq", None, identity),
      (p + r"model\.norm\.weight", "norm.weight", identity),
      (p + r"output" + w, "lm_head.kernel", linear_weight),
  )


# InternLM2-chat-7B (32 heads over 8 KV heads, head_dim 128) under HF names.
INTERNLM2_TABLE: Table = internlm2_table(LlamaConfig.internlm2_chat_7b())
# The same under OMG-LLaVA's checkpoint names (`llm.base_model.model.…`).
OMG_LLAVA_LLM_TABLE: Table = internlm2_table(LlamaConfig.internlm2_chat_7b(), OMG_LLM_PREFIX)


def strip_omg_prefix(key: str) -> str | None:
  """An OMG-LLaVA LLM key under its HF InternLM2 name (prefix and peft `.base_layer` removed):
  `llm.base_model.model.output.base_layer.weight` -> `output.weight`. None for keys outside the
  LLM. LoRA factor keys keep their `lora_A/B` part (see convert.lora)."""
  if not key.startswith(OMG_LLM_PREFIX):
    return None
  return key[len(OMG_LLM_PREFIX):].replace(".base_layer.", ".")
