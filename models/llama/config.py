"""LLaMA decoder configuration (GLaMM's Vicuna-7B, OMG-LLaVA's InternLM2-chat-7B, tiny test sizes).

InternLM2 is the LLaMA architecture with fused/renamed weights (wqkv, w1/w2/w3, tok_embeddings,
output), so it runs on `LlamaForCausalLM`; its checkpoint names are mapped by
`models.llama.internlm2_params`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from models.cudnn import check_impl


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA-architecture decoder.

  `num_kv_heads < num_heads` gives grouped-query attention (`num_heads % num_kv_heads == 0`).
  `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of the weights.
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Runtime choice, not a checkpoint property: "auto" runs multi-token calls (prefill) through
  # cuDNN flash attention where it runs (NVIDIA GPU, bf16/fp16) and everything else through XLA;
  # "xla" / "cudnn" force one backend for every call.
  attention_impl: str = "auto"

  def __post_init__(self):
    check_impl("LlamaConfig", self.attention_impl)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for rotate-half RoPE")

  @classmethod
  def vicuna_7b(cls, **overrides) -> "LlamaConfig":
    """GLaMM-GCG's LLM (glamm.md §1.3): vocab 32007 = 32000 LLaMA pieces + 7 added tokens, MHA,
    untied lm_head, RoPE theta 10000, RMSNorm eps 1e-5."""
    base = dict(vocab_size=32007, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                head_dim=128, intermediate_size=11008, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096)
    return cls(**{**base, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A few-thousand-parameter decoder for CPU tests (pass num_kv_heads=2 for GQA)."""
    base = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                head_dim=16, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256)
    return cls(**{**base, **overrides})

  @classmethod
  def internlm2_chat_7b(cls, **overrides) -> "LlamaConfig":
    """OMG-LLaVA's LLM (omg_llava.md §1.6): InternLM2-chat-7B with GQA (32 query heads over 8 KV
    heads), FFN 14336, RoPE theta 1e6, untied `output` head. vocab 92548 = 92544 base pieces +
    [SEG], <p>, </p>, <region> (`<mark>`, added after the resize, has no row). The shipped config's
    dynamic-NTK rope_scaling is deliberately absent: XTuner swaps in plain RoPE."""
    base = dict(vocab_size=92548, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=1e6,
                max_position_embeddings=32768)
    return cls(**{**base, **overrides})

  @classmethod
  def internlm2_tiny(cls, **overrides) -> "LlamaConfig":
    """A tiny InternLM2-shaped decoder for CPU tests: GQA group 2, theta 1e6."""
    base = dict(vocab_size=160, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=1e6,
                max_position_embeddings=256)
    return cls(**{**base, **overrides})
