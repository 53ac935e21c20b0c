"""HF LLaMA state_dict names -> `LlamaForCausalLM` parameter paths (a table, see
models/param_tables).

Covers both `LlamaForCausalLM` checkpoints (`model.` prefix) and GLaMM's checkpoint, whose LLM keys
are the same (`model.layers.i...`, `lm_head.weight`). Non-LLM GLaMM keys (mm_projector, SAM, ...)
are not matched here: pass only the LLM keys, or use `strict=False`.
"""

from __future__ import annotations

from models.param_tables import Table, identity, linear_weight

_L = r"model\.layers\.(\d+)\."

HF_LLAMA_TABLE: Table = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", identity),
    (_L + r"self_attn\.(q|k|v|o)_proj\.weight", r"layers.\1.self_attn.\2_proj.kernel",
     linear_weight),
    # RoPE tables are recomputed from the config (theta 10000), never loaded.
    (_L + r"self_attn\.rotary_emb\.inv_freq", None, identity),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.kernel", linear_weight),
    (_L + r"(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight", identity),
    (r"model\.norm\.weight", "norm.weight", identity),
    (r"lm_head\.weight", "lm_head.kernel", linear_weight),
)
