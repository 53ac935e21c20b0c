"""The PyTorch half of `eval.bench` (issue 5): the reference path a GLaMM user runs today.

transformers `CLIPVisionModel` (all layers, `output_hidden_states=True`, features from
`hidden_states[-2]`), the mm_projector, segment-anything's SAM ViT-H image encoder, transformers
`LlamaForCausalLM.generate` from `inputs_embeds` (eager, SDPA, greedy, `min_new_tokens =
max_new_tokens`, `output_hidden_states=True, return_dict_in_generate=True` as GLaMM calls it),
text_hidden_fcs and SAM's mask decoder per image, all bf16, random weights, same shapes as the JAX
half. Times are wall-clock medians with `torch.cuda.synchronize()`.

Pruning on the reference path: `prelm` drops visual tokens before the LLM (what ALTP / top-k do;
here by the feature norm, a stand-in score whose cost is negligible), so HF generate sees
`k` visual tokens (58 at 90%). FastV's and PyramidDrop's reference implementations patch a
specific transformers version's LLaMA forward and are not pip-installable, so there is no
in-LLM pruning row on this side.

The prefill row is `generate(max_new_tokens=1)`; the decode step is
(generate(G) - generate(1)) / (G - 1).
"""

from __future__ import annotations

import time

from eval import bench_common as common
from eval import bench_flops as flops
from eval import torch_reference as ref


def run(args, log: common.JsonLog):
  import torch
  from torch import nn

  start = time.perf_counter()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dt = torch.bfloat16
  config = common.bench_config(args.tiny)
  lay = common.layout(config, args.tiny, args.new_tokens, args.segs)
  name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  import transformers
  log.set("torch", dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                        layout=lay.__dict__))

  def sync(_=None):
    if dev == "cuda":
      torch.cuda.synchronize()

  def reset_peak():
    if dev == "cuda":
      torch.cuda.reset_peak_memory_stats()

  def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None

  # Ceilings measured by torch on the same device.
  n = 256 if args.tiny else 8192
  a = torch.randn(n, n, device=dev, dtype=dt)
  bm = torch.randn(n, n, device=dev, dtype=dt)
  with torch.inference_mode():
    ms = common.median_ms(lambda: a @ bm, sync, args.repeats)["ms"]
  rate = 2 * n ** 3 / (ms / 1e3)
  src = torch.randn(((1 << 20) if args.tiny else (2 << 30)) // 2, device=dev, dtype=dt)
  dst = torch.empty_like(src)
  ms = common.median_ms(lambda: dst.copy_(src), sync, args.repeats)["ms"]
  bw = 2 * src.numel() * 2 / (ms / 1e3)
  del a, bm, src, dst
  log.set("torch_ceilings", dict(matmul_n=n, matmul_tflops=rate / 1e12, copy_gbps=bw / 1e9))
  print(f"[torch] ceilings: bf16 matmul {rate / 1e12:.1f} TFLOP/s, copy {bw / 1e9:.0f} GB/s",
        flush=True)

  t0 = time.perf_counter()
  llm = ref.build_llama(config.llm, dev, dt)
  clip = ref.build_clip(config.vision, dev, dt)
  sam = ref.build_sam(config.sam, dev, dt)
  d, dv, c = config.llm.hidden_size, config.vision.hidden_size, config.text_out_dim
  torch.manual_seed(3)
  with torch.device(dev):
    projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d)).to(dt).eval()
    fcs = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, c)).to(dt).eval()
  sync()
  log.set("torch_model", dict(init_s=time.perf_counter() - t0))
  print(f"[torch] models built in {time.perf_counter() - t0:.1f} s", flush=True)
  wbytes = flops.llm_weight_bytes(config.llm)
  sel = config.vision_select_layer

  def row(**kw):
    kw = dict(framework="torch", **kw)
    kw["peak_gb"] = peak_gb()
    log.add(kw)

  def inputs(b):
    g = torch.Generator(device=dev).manual_seed(b)
    s, sz = config.vision.image_size, config.sam.image_encoder.img_size
    px = torch.randn(b, 3, s, s, device=dev, generator=g).to(dt)
    sam_px = torch.randn(b, 3, sz, sz, device=dev, generator=g).to(dt)
    ids = torch.randint(3, config.llm.vocab_size - 8, (b, lay.text), device=dev, generator=g)
    return px, sam_px, ids

  def visual_tokens(px, keep):
    feats = clip(pixel_values=px, output_hidden_states=True).hidden_states[sel][:, 1:]
    vis = projector(feats)
    if keep < vis.shape[1]:
      idx = vis.float().norm(dim=-1).topk(keep, dim=1).indices.sort(dim=1).values
      vis = torch.gather(vis, 1, idx[..., None].expand(-1, -1, vis.shape[-1]))
    return vis

  def splice(ids, vis):
    emb = llm.get_input_embeddings()(ids)
    return torch.cat([emb[:, :lay.offset], vis, emb[:, lay.offset:]], dim=1)

  def generate(embeds, new):
    return llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(
        embeds.shape[:2], dtype=torch.long, device=dev), max_new_tokens=new, min_new_tokens=new,
        do_sample=False, num_beams=1, output_hidden_states=True, return_dict_in_generate=True,
        pad_token_id=0, eos_token_id=2)

  def decode_masks(seg_hidden, img_emb):
    text = fcs(seg_hidden)                                   # [B, S, C]
    return [ref.sam_decode_text_prompts(sam, img_emb[i:i + 1], text[i])[0]
            for i in range(img_emb.shape[0])]

  def gcg(px, sam_px, ids, keep):
    vis = visual_tokens(px, keep)
    embeds = splice(ids, vis)
    img_emb = sam.image_encoder(sam_px)
    out = generate(embeds, lay.new_tokens)
    # hidden_states[t][-1]: last layer's (post-norm) states of step t; step 0 is the prompt.
    last = torch.stack([out.hidden_states[t][-1][:, -1] for t in range(lay.new_tokens)], 1)
    return out.sequences, decode_masks(last[:, :lay.segs], img_emb)

  combos = [("none", 0.0)] + [("prelm", r) for r in args.reductions]
  for b in args.batches:
    t_batch = time.perf_counter()
    if t_batch - start > args.budget_s:
      log.add(dict(framework="torch", what="skipped", batch=b, reason="--budget-s spent"))
      continue
    try:
      _run_batch(b, args, lay, config, combos, inputs, visual_tokens, splice, generate,
                 decode_masks, gcg, clip, projector, sam, sel, wbytes, rate, bw, sync,
                 reset_peak, row, torch)
    except Exception as e:  # noqa: BLE001 - keep the rows already written, note the failure
      row(what="error", batch=b, error=f"{type(e).__name__}: {str(e)[:300]}", oom=common.is_oom(e))
      if dev == "cuda":
        torch.cuda.empty_cache()
    print(f"[torch] batch {b} done in {time.perf_counter() - t_batch:.1f} s", flush=True)

  if args.search:
    for method, red in [("none", 0.0), ("prelm", max(args.reductions))]:
      t0 = time.perf_counter()
      b, best = 2 * max(args.batches), None
      keep = common.kept(lay.num_visual, red)
      while (time.perf_counter() - t0 < args.search_cap_s
             and time.perf_counter() - start < args.budget_s):
        print(f"[torch] search {method}@{red}: batch {b}", flush=True)
        try:
          px, sam_px, ids = inputs(b)
          reset_peak()
          with torch.inference_mode():
            t = common.median_ms(lambda: gcg(px, sam_px, ids, keep), sync,
                                 max(1, args.e2e_repeats // 2))
          best = dict(batch=b, images_per_s=b / (t["ms"] / 1e3))
          row(what="search", method=method, reduction=red, batch=b, **t,
              images_per_s=best["images_per_s"])
          del px, sam_px, ids
        except Exception as e:  # noqa: BLE001
          row(what="search_stop", method=method, reduction=red, batch=b,
              error=f"{type(e).__name__}: {str(e)[:300]}", oom=common.is_oom(e))
          if dev == "cuda":
            torch.cuda.empty_cache()
          break
        b *= 2
      row(what="max_batch", method=method, reduction=red,
          largest_batch=None if best is None else best["batch"],
          images_per_s=None if best is None else best["images_per_s"],
          searched_s=time.perf_counter() - t0)


def _run_batch(b, args, lay, config, combos, inputs, visual_tokens, splice, generate,
               decode_masks, gcg, clip, projector, sam, sel, wbytes, rate, bw, sync, reset_peak,
               row, torch):
  llm_cfg = config.llm
  px, sam_px, ids = inputs(b)
  with torch.inference_mode():
    if args.components:
      reset_peak()
      t = common.median_ms(lambda: clip(pixel_values=px, output_hidden_states=True), sync,
                           args.repeats)
      p = flops.clip_flops(config.vision)
      row(what="clip", batch=b, **t, gflop_per_image=p / 1e9,
          **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw))
      feats = clip(pixel_values=px, output_hidden_states=True).hidden_states[sel][:, 1:]
      reset_peak()
      t = common.median_ms(lambda: projector(feats), sync, args.repeats)
      p = flops.projector_flops(lay.num_visual, config.vision.hidden_size, llm_cfg.hidden_size)
      row(what="projector", batch=b, **t, gflop_per_image=p / 1e9,
          **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw))
      reset_peak()
      t = common.median_ms(lambda: sam.image_encoder(sam_px), sync, args.repeats)
      p = flops.sam_encoder_flops(config.sam.image_encoder)
      row(what="sam_encoder", batch=b, **t, gflop_per_image=p / 1e9,
          **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw))
      img_emb = sam.image_encoder(sam_px)
      seg = 0.5 * torch.randn(b, lay.segs, llm_cfg.hidden_size, device=px.device,
                              dtype=px.dtype)
      reset_peak()
      t = common.median_ms(lambda: decode_masks(seg, img_emb), sync, args.repeats)
      p = flops.mask_decoder_flops(config.sam)
      row(what="mask_decoder", batch=b, segs=lay.segs, **t, ms_per_seg=t["ms"] / (b * lay.segs),
          gflop_per_seg=p / 1e9, **flops.fractions(p * b * lay.segs, 0, t["ms"] / 1e3, rate, bw))
      del img_emb, feats

    for method, red in combos:
      plan, t_in, n_in, k = common.prune_plan(config, method, red, lay.prompt_len)
      lengths = plan.stage_lengths(t_in)
      kv = flops.kv_cache_bytes(llm_cfg, plan.bounds, lengths, lay.new_tokens, b)
      tag = dict(method=method, reduction=red, visual_kept=k, visual_avg=float(k),
                 llm_tokens=t_in, batch=b, kv_cache_gb=kv / 1e9)
      try:
        if args.components:
          embeds = splice(ids, visual_tokens(px, k))
          reset_peak()
          t1 = common.median_ms(lambda: generate(embeds, 1), sync, args.e2e_repeats)
          p = flops.prefill_flops(llm_cfg, plan.bounds, lengths)
          row(what="prefill", **tag, **t1, gflop_per_image=p / 1e9, note="generate(1)",
              **flops.fractions(p * b, wbytes, t1["ms"] / 1e3, rate, bw))
          reset_peak()
          tg = common.median_ms(lambda: generate(embeds, lay.new_tokens), sync, args.e2e_repeats)
          step = (tg["ms"] - t1["ms"]) / (lay.new_tokens - 1)
          p = flops.decode_step_flops(llm_cfg, plan.bounds, lengths, 1)
          nbytes = wbytes + kv
          row(what="decode_step", **tag, ms=step, note="(generate(G) - generate(1)) / (G - 1)",
              floor_ms=nbytes / bw * 1e3, generate_ms=tg["ms"],
              **flops.fractions(p * b, nbytes, step / 1e3, rate, bw))
          del embeds
        reset_peak()
        t = common.median_ms(lambda: gcg(px, sam_px, ids, k), sync, args.e2e_repeats)
        gf = flops.gcg_flops(config, plan.bounds, lengths, lay.new_tokens, lay.segs,
                             num_visual_projected=lay.num_visual,
                             clip_layers=config.vision.num_layers)
        row(what="e2e", **tag, **t, images_per_s=b / (t["ms"] / 1e3), ms_per_image=t["ms"] / b,
            new_tokens=lay.new_tokens, segs=lay.segs, gflop_per_image=gf["total"] / 1e9,
            **flops.fractions(gf["total"] * b, 0, t["ms"] / 1e3, rate, bw))
      except Exception as e:  # noqa: BLE001
        row(what="error", **tag, error=f"{type(e).__name__}: {str(e)[:300]}",
            oom=common.is_oom(e))
        if torch.cuda.is_available():
          torch.cuda.empty_cache()
