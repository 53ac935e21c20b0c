"""The benchmark's analytic FLOP / byte formulas (`eval/bench_flops.py`) against the modules'
actual parameter shapes and the caches `generate` allocates, and the benchmark's pruning plans."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import bench_common as common
from eval import bench_flops as flops
from models import generate as gen
from models.clip.config import CLIPVisionConfig
from models.clip.modeling import CLIPVisionModel
from models.glamm.config import GLaMMConfig
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM
from models.sam.config import SamImageEncoderConfig
from models.sam.image_encoder import ImageEncoder


def _sizes(module, prefix=()):
  """{path: size} of every parameter of an abstract module."""
  return {tuple(str(p) for p in path): math.prod(v.shape)
          for path, v in nnx.state(module, nnx.Param).flat_state()}


def _layer_kernel_params(sizes, *prefix):
  n = len(prefix)
  return sum(s for path, s in sizes.items()
             if path[:n] == prefix and path[-1] == "kernel")


@pytest.fixture(scope="module")
def gqa_llama():
  cfg = LlamaConfig.tiny(num_kv_heads=2, num_layers=3)
  return cfg, _sizes(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))


def test_llm_linear_flops_are_twice_the_layer_kernels(gqa_llama):
  cfg, sizes = gqa_llama
  per_layer = _layer_kernel_params(sizes, "layers", "0")
  assert per_layer > 0
  assert flops.llm_linear_flops_per_token_layer(cfg) == 2 * per_layer


def test_llm_weight_bytes_are_all_parameters_but_the_embedding(gqa_llama):
  cfg, sizes = gqa_llama
  total = sum(sizes.values())
  embed = sum(s for p, s in sizes.items() if p[0] == "embed_tokens")
  assert flops.llm_weight_bytes(cfg, bytes_per_value=2) == 2 * (total - embed)


def test_prefill_and_decode_attention_terms():
  cfg = LlamaConfig.tiny()
  lin = flops.llm_linear_flops_per_token_layer(cfg)
  hd = cfg.num_heads * cfg.head_dim
  head = 2 * cfg.hidden_size * cfg.vocab_size
  bounds, lengths = ((0, 1), (1, 4)), (3, 2)
  # Stage 0: 3 tokens, causal pairs 1 + 2 + 3; stage 1: 2 tokens, pairs 1 + 2.
  want = 1 * (3 * lin + 4 * hd * 6) + 3 * (2 * lin + 4 * hd * 3) + head
  assert flops.prefill_flops(cfg, bounds, lengths) == want
  # Step j attends to t_s + j keys in every stage.
  step2 = 1 * (lin + 4 * hd * 5) + 3 * (lin + 4 * hd * 4) + head
  assert flops.decode_step_flops(cfg, bounds, lengths, 2) == step2
  g = 4
  assert flops.generate_flops(cfg, bounds, lengths, g) == flops.prefill_flops(
      cfg, bounds, lengths) + sum(flops.decode_step_flops(cfg, bounds, lengths, j)
                                  for j in range(1, g))


def test_clip_flops_match_the_kernels():
  cfg = CLIPVisionConfig.tiny()
  sizes = _sizes(nnx.eval_shape(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))))
  num_p = (cfg.image_size // cfg.patch_size) ** 2
  n = num_p + 1
  patch = _layer_kernel_params(sizes, "embeddings")
  layer = _layer_kernel_params(sizes, "encoder", "layers", "0")
  assert flops.clip_flops(cfg, 0) == 2 * num_p * patch
  attn = 4 * n * n * cfg.hidden_size
  assert flops.clip_flops(cfg, 2) - flops.clip_flops(cfg, 1) == 2 * n * layer + attn


def test_sam_encoder_flops_match_the_kernels_and_window_padding():
  # 6x6 grid, window 4 pads to 8x8 (4 windows); block 1 is global.
  cfg = SamImageEncoderConfig(img_size=96, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                              out_chans=16, window_size=4, global_attn_indexes=(1,))
  sizes = _sizes(nnx.eval_shape(lambda: ImageEncoder(cfg, rngs=nnx.Rngs(0))))

  def block(i, part):
    return _layer_kernel_params(sizes, "blocks", str(i), part)
  g, e = 6, 32
  patch = _layer_kernel_params(sizes, "patch_embed")
  neck = sum(s for p, s in sizes.items() if p[0].startswith("neck_conv"))
  want = 2 * g * g * patch + 2 * g * g * neck
  for i, (w, gp) in enumerate([(4, 8), (6, 6)]):
    want += 2 * gp * gp * block(i, "attn") + 2 * g * g * block(i, "mlp")
    want += 4 * (gp // w) ** 2 * w ** 4 * e + 4 * gp * gp * w * e
  assert flops.sam_encoder_flops(cfg) == want


def test_kv_cache_bytes_match_what_prefill_allocates():
  cfg = LlamaConfig.tiny(num_layers=4, num_kv_heads=2, dtype=jnp.bfloat16,
                         param_dtype=jnp.bfloat16)
  llm = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  b, t, n, new = 3, 20, 12, 5
  plan = gen.PrunePlan(((0, 1), (1, 3), (3, 4)), (n, 6, 2), "fastv")
  vis = jnp.zeros((b, t), bool).at[:, 2:2 + n].set(True)
  emb = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  caches = jax.eval_shape(
      lambda m, e: gen._prefill(m, e, pos, jnp.ones((b, t), bool), vis, plan, new)[0], llm, emb)
  allocated = sum(np.prod(x.shape) * x.dtype.itemsize
                  for c in caches for x in list(c.k) + list(c.v))
  got = flops.kv_cache_bytes(cfg, plan.bounds, plan.stage_lengths(t), new, b, 2)
  assert got == allocated


def test_prune_plans_of_the_benchmark():
  cfg = GLaMMConfig.glamm_7b()
  plan, t_in, n_in, k = common.prune_plan(cfg, "altp", 0.9, 640)
  assert (t_in, n_in, k, plan.visual_counts) == (122, 58, 58, (58,))
  plan, t_in, n_in, k = common.prune_plan(cfg, "fastv", 0.9, 640)
  assert (t_in, n_in, k) == (640, 576, 58) and plan.visual_counts == (576, 58)
  assert plan.bounds == ((0, 2), (2, 32))
  plan, *_ = common.prune_plan(cfg, "pdrop", 0.75, 640)
  assert abs(plan.average_visual_retention() - 0.25) < 0.01
  plan, t_in, n_in, k = common.prune_plan(cfg, "none", 0.0, 640)
  assert (t_in, k, plan.visual_counts) == (640, 576, (576,))


def test_gcg_flops_total_is_the_sum_and_pruning_lowers_it():
  cfg = GLaMMConfig.glamm_7b()
  full = common.prune_plan(cfg, "none", 0.0, 640)[0]
  a = flops.gcg_flops(cfg, full.bounds, full.stage_lengths(640), 64, 8)
  assert a["total"] == sum(v for k, v in a.items() if k != "total")
  # 7B parameters, 640 prompt + 63 decoded tokens: about 2 * 6.5e9 * 703 FLOPs in the LLM.
  assert 0.9e13 < a["prefill"] + a["decode"] < 1.1e13
  pr = common.prune_plan(cfg, "altp", 0.9, 640)[0]
  b = flops.gcg_flops(cfg, pr.bounds, pr.stage_lengths(122), 64, 8)
  assert b["prefill"] < a["prefill"] / 4 and b["clip"] == a["clip"]


def test_sam_profile_sums_device_kernels_by_kind():
  from eval.profile_sam import device_kernel_times, kind_of
  assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
  assert kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_NNT") == "matmul"
  assert kind_of("gemm_fusion_dot_2") == "matmul"
  assert kind_of("loop_multiply_fusion_31") == "other"
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "gemm_a", "dur": 5.0, "args": {"hlo_op": "dot.1"}},
      {"ph": "X", "pid": 1, "name": "gemm_a", "dur": 3.0, "args": {"hlo_op": "dot.1"}},
      {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 2.0},
      {"ph": "X", "pid": 2, "name": "python", "dur": 100.0},     # host: not counted
  ]
  agg, total = device_kernel_times(events)
  assert total == 10.0
  assert agg[("dot.1", "gemm_a")] == [8.0, 2]
  assert agg[("loop_add_fusion", "loop_add_fusion")] == [2.0, 1]


def test_llm_profile_tiny_writes_prefill_and_decode_parts(tmp_path):
  # CPU smoke run of `python -m eval.profile_llm --tiny`: both programs profiled, the decode loop
  # set against a positive floor, the result written as JSON.
  import json
  from eval import profile_llm
  res = profile_llm.main(["--out", str(tmp_path), "--tiny", "--batch", "2", "--calls", "1"])
  saved = json.loads((tmp_path / "llm_profile.json").read_text())
  assert saved["batch"] == 2 and saved["decode_floor_ms_per_step"] > 0
  for part, steps in (("prefill", 1), ("decode_loop", 32)):
    assert saved[part]["steps"] == steps and saved[part]["device_ms_per_call"] > 0
    assert saved[part]["top"] and set(saved[part]["kinds_ms_per_call"]) <= {
        "matmul", "attention", "other"}
  assert res["decode_loop"]["of_floor"] == saved["decode_loop"]["of_floor"] > 0


def _e2e(framework, method, reduction, batch, ms, kept):
  return dict(framework=framework, what="e2e", method=method, reduction=reduction, batch=batch,
              ms=ms, visual_kept=kept, images_per_s=batch / ms * 1e3)


def test_report_joins_the_halves_by_method_reduction_and_batch(tmp_path):
  """`--part report` over two JSON halves: ALTP is set against the reference pruned to the same
  tokens (prelm at its reduction) and against the unpruned reference; FastV has no same-token
  counterpart; a batch without a reference row gets no ratio. Writes the table and the plot."""
  import json
  from eval import bench
  jax_rows = [_e2e("jax", "none", 0.0, 1, 400.0, 576), _e2e("jax", "altp", 0.9, 1, 300.0, 58),
              _e2e("jax", "altp", 0.5, 1, 350.0, 288),
              _e2e("jax", "fastv", 0.9, 1, 350.0, 58), _e2e("jax", "none", 0.0, 128, 5000.0, 576)]
  torch_rows = [_e2e("torch", "none", 0.0, 1, 2000.0, 576),
                _e2e("torch", "prelm", 0.9, 1, 1500.0, 58),
                _e2e("torch", "prelm", 0.5, 1, 1800.0, 288)]
  for name, rows in (("bench_jax_a", jax_rows), ("bench_torch_a", torch_rows)):
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(meta={}, rows=rows)))
  bench.report(str(tmp_path))
  joined = {(r["method"], r["reduction"], r["batch"]): r
            for r in json.loads((tmp_path / "bench.json").read_text())["e2e_joined"]}
  assert set(joined) == {("none", 0.0, 1), ("altp", 0.9, 1), ("altp", 0.5, 1), ("fastv", 0.9, 1),
                         ("none", 0.0, 128)}
  assert joined["altp", 0.9, 1]["vs_torch_same"] == pytest.approx(300 / 1500)
  assert joined["altp", 0.5, 1]["vs_torch_same"] == pytest.approx(350 / 1800)
  assert joined["altp", 0.9, 1]["vs_torch_none"] == pytest.approx(300 / 2000)
  assert joined["none", 0.0, 1]["vs_torch_same"] == pytest.approx(400 / 2000)
  assert joined["fastv", 0.9, 1]["vs_torch_same"] is None
  assert joined["fastv", 0.9, 1]["vs_torch_none"] == pytest.approx(350 / 2000)
  assert joined["none", 0.0, 128]["vs_torch_none"] is None
  md = (tmp_path / "bench.md").read_text()
  assert "| jax | altp | 0.9 | 58 | 1 | 300.0 |" in md
  assert (tmp_path / "bench.png").stat().st_size > 0


def test_altp_cost_program_selects_k_tokens_per_image():
  """The program the benchmark times as ALTP's own cost (`Bench.lower_selection`: device
  superpixels, pixel detail and selection on the batch's images) returns k distinct ascending
  visual-token indices per image, k from the reduction."""
  import argparse
  from eval import bench_jax
  config = common.bench_config(True)
  lay = common.layout(config, True)
  bench = bench_jax.Bench(config, lay, argparse.Namespace(fuse_projections=True))
  x = bench_jax.make_inputs(config, lay, 2)
  keep = np.asarray(bench.lower_selection(x, "altp", 0.5)().compile()(*bench.selection_inputs(x)))
  n = lay.num_visual
  assert keep.shape == (2, common.kept(n, 0.5)) and keep.shape[1] < n
  for row in keep:
    assert np.all(np.diff(row) > 0) and row[0] >= 0 and row[-1] < n
