"""OMG-LLaVA at full size on a GPU: parity against the plain-torch reference, and GCG speed.

    python -m eval.omg_gpu --out DIR [--part all|parity|speed] [--batches 1,8]
        [--methods none,altp,fastv,pdrop] [--reduction 0.9] [--budget-s 420] [--tiny]

`--tiny` runs the same code on the tiny configuration (CPU smoke run).

Parity (`--part parity`): `tests/omg_torch_reference.OMGLLaVARef` built at the release widths
(OMG-Seg ConvNeXt-L at 1024 x 1024, MSDeformAttn pixel decoder, 9-layer Mask2Former with 300
queries, projectors, and ONE InternLM2-7B-wide decoder layer with a 1024-id vocabulary), random
weights of realistic scale (the reference parts' own initialisers), loaded into the port through
the composed release key tables. One smooth random image. Compared against the torch model in
float32 (TF32 off, the truth):
- `vision`: the pixel tokens (+ separator) [256 + 1, 4096], the object count N and (when N
  agrees) the object tokens, and the mask features, for the port in bf16 (every vision / LLM
  parameter and activation bf16), the port in float32 (matmul precision highest), and torch
  under bf16 autocast (for scale: what bf16 costs PyTorch itself);
- `llm_layer`: one InternLM2 layer + final norm + head on the same spliced prompt (the
  reference's float32 visual tokens), post-norm hidden and logits, port bf16 / torch autocast;
- `seg_masks`: text2vision + the `_llm` decoder copy from two [SEG] states on the reference's
  float32 features, port bf16 / torch autocast.
Reported: max_abs, max_rel = max|ours - ref| / max|ref|, rel_l2, mean_rel (eval.parity_gpu).

Speed (`--part speed`): `OMGLLaVAConfig.omg_llava_7b` with random bf16 weights (every parameter
and activation bf16, vision included; `--vision-dtype float32` keeps the original's fp32 vision)
made on the device; a V_max = 513 visual span and ~45 text tokens (576 slots), 64 new tokens
forced (EOS ignored), 8 [SEG] masks decoded per image. Per batch: `vision` (encode_image and the
scores: ConvNeXt-L, pixel decoder, Mask2Former, perception prior, projector); per method (none,
ALTP with device SLIC at 1024^2, FastV K=2, PyramidDrop layers 2/8/16/24, all at 90% reduction
of the 256 pixel tokens): `prefill` (pruning + splice + packing + LLM prefill), `decode_step`
(one token through every stage cache, timed alone), `decode_loop` (32 steps in one
`lax.fori_loop`, reported per step, as generation runs them), and `e2e` (the vision program and the pruning + LLM +
masks program back to back, i.e. `OmgGCGRunner(split=True)`, blocked once at the end). Each is
the median of a few calls after a warm-up call, with `block_until_ready`; programs are compiled
ahead of time, a batch's programs in parallel threads. Per-image numbers divide by the batch.
Writes DIR/omg_gpu.json after every row; `--budget-s` stops starting new work (a call is
limited to 10 minutes; compile time counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU

import numpy as np  # noqa: E402

METHODS = ("none", "altp", "fastv", "pdrop")
BEFORE = (1, 17, 33, 5, 11)                       # BOS + "<|im_start|>user\n"-like ids
AFTER_LEN = 40                                    # question + "<|im_end|>\n<|im_start|>..."


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.omg_gpu", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output folder (omg_gpu.json)")
  p.add_argument("--part", default="all", choices=("all", "parity", "speed"))
  p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
  p.add_argument("--batches", default=None, help="default 1,8 (tiny: 1,2)")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--reduction", type=float, default=None,
                 help="fraction of the 256 pixel tokens dropped (PyramidDrop: layer-averaged); "
                      "default 0.9 (tiny: 0.5)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64 (tiny: 8)")
  p.add_argument("--segs", type=int, default=8, help="[SEG] masks decoded per image")
  p.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; tiny 2)")
  p.add_argument("--vision-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="speed model's vision dtype (the original runs OMG-Seg in float32)")
  p.add_argument("--no-fp32-port", action="store_true",
                 help="parity: skip the port's float32 vision pass (saves one compile)")
  p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                 help="speed model's LLM with fused q/k/v and gate/up matmuls")
  p.add_argument("--compile-workers", type=int, default=8)
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="start no new measurement after this many seconds; a batch's programs "
                      "are compiled only if the last batch's compile time still fits")
  a = p.parse_args(argv)
  a.batches = [int(x) for x in (a.batches or ("1,2" if a.tiny else "1,8")).split(",")]
  a.methods = [m for m in a.methods.split(",") if m]
  bad = [m for m in a.methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; expected a subset of {METHODS}")
  a.new_tokens = a.new_tokens or (8 if a.tiny else 64)
  a.reduction = a.reduction if a.reduction is not None else (0.5 if a.tiny else 0.9)
  a.repeats = a.repeats or (2 if a.tiny else 5)
  return a


# ------------------------------------------------------------------------------------------------
# Configurations and weights.


def with_dtypes(cfg, vision, llm):
  """`cfg` with the vision parts (ConvNeXt, pixel decoder, projectors; the Mask2Former head
  computes in the pixel decoder's dtype) and the LLM in the given dtypes (params and compute)."""
  import jax.numpy as jnp
  v, l = jnp.dtype(vision), jnp.dtype(llm)
  return dataclasses.replace(
      cfg, backbone=dataclasses.replace(cfg.backbone, dtype=v, param_dtype=v),
      pixel_decoder=dataclasses.replace(cfg.pixel_decoder, dtype=v, param_dtype=v),
      projector=dataclasses.replace(cfg.projector, dtype=v, param_dtype=v),
      llm=dataclasses.replace(cfg.llm, dtype=l, param_dtype=l))


def parity_config(tiny: bool):
  """Release widths (or tiny) with a one-layer LLM and a 1024-id vocabulary, float32."""
  from models.omg_llava.config import OMGLLaVAConfig
  import jax.numpy as jnp
  if tiny:
    cfg = OMGLLaVAConfig.tiny(image_size=256)
  else:
    cfg = OMGLLaVAConfig.omg_llava_7b(llm_dtype=jnp.float32, llm_param_dtype=jnp.float32)
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=1,
                                                          vocab_size=1024))


def speed_config(tiny: bool, vision_dtype: str):
  from models.omg_llava.config import OMGLLaVAConfig
  if tiny:   # 8 layers: PyramidDrop's first drop after layer 2 can reach the target
    cfg = OMGLLaVAConfig.tiny(image_size=256)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=8))
  else:
    cfg = OMGLLaVAConfig.omg_llava_7b()
  return with_dtypes(cfg, vision_dtype, "bfloat16")


def random_state(config, seed: int = 0):
  """(graphdef, state) of OMG-LLaVA with random weights made on the default device by one
  jitted program: matrices and kernels N(0, 0.02^2) in their own dtype (slices of one draw, so
  the program compiles in seconds), vectors ones (norm scales, layer scales) or zeros (biases),
  the class embedding unit-norm."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from models.omg_llava.modeling import abstract_omg_llava
  graphdef, abstract = nnx.split(abstract_omg_llava(config))
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
  pool = max(sizes) + 65536

  def kind(path, leaf):
    name = str(path[-2]) if len(path) > 1 else ""   # path[-1] is the Variable's `.value`
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return "zeros"
    if "class_embed" in str(path[0]):
      return "unit"
    if len(leaf.shape) >= 2:
      return "normal"
    return "zeros" if "bias" in name else "ones"
  kinds = [kind(p, l) for p, l in leaves]

  @jax.jit
  def make(key):
    base = 0.02 * jax.random.normal(key, (pool,), jnp.float32)
    out = []
    for i, ((_, leaf), k, size) in enumerate(zip(leaves, kinds, sizes)):
      if k in ("normal", "unit"):
        off = (i * 7919) % (pool - size + 1)
        x = jax.lax.slice(base, (off,), (off + size,)).reshape(leaf.shape)
        if k == "unit":
          x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        out.append(x.astype(leaf.dtype))
      elif k == "zeros":
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
      else:
        out.append(jnp.ones(leaf.shape, leaf.dtype))
    return out
  return graphdef, jax.tree.unflatten(treedef, make(jax.random.key(seed)))


def smooth_pixels(batch: int, size: int, seed: int = 0):
  """(CLIP-normalised pixels [B,S,S,3] float32, the [0,1] image) of smooth random images."""
  import jax
  import jax.numpy as jnp
  from eval.omg_llava_image import IMAGE_MEAN, IMAGE_STD
  im = jax.random.uniform(jax.random.key(seed), (batch, 12, 12, 3))
  im01 = jax.image.resize(im, (batch, size, size, 3), "linear")
  px = (im01 - jnp.asarray(IMAGE_MEAN)) / jnp.asarray(IMAGE_STD)
  return px.astype(jnp.float32), im01.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Parity.


def parity(args, log) -> None:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from eval.parity_gpu import compare
  from models.omg_llava.modeling import abstract_omg_llava
  from models.param_tables import load_state_dict
  from tests.omg_torch_reference import OMGLLaVARef, class_embed, nchw, reference_table

  t0 = time.perf_counter()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg = parity_config(args.tiny)
  ce = class_embed(cfg)
  ref = OMGLLaVARef(cfg, ce, seed=0)                    # random init on the host
  sd = ref.state_dict()
  ports = {}
  for dtype in ("bfloat16",) + (() if args.no_fp32_port else ("float32",)):
    model = abstract_omg_llava(with_dtypes(cfg, dtype, dtype))
    load_state_dict(model, sd, reference_table(cfg), strict=True)
    model.class_embed.set_value(jnp.asarray(ce.numpy()))
    ports[dtype] = model
  del sd
  ref = ref.to(dev)
  log.set("parity_setup", dict(seconds=time.perf_counter() - t0, torch_device=dev,
                               image_size=cfg.image_size,
                               llm=dict(hidden=cfg.llm.hidden_size, layers=cfg.llm.num_layers)))
  print(f"[parity] models built in {time.perf_counter() - t0:.1f} s", flush=True)

  pixels, _ = smooth_pixels(1, cfg.image_size, seed=3)
  pixels = np.asarray(pixels)
  auto = torch.autocast(device_type=dev, dtype=torch.bfloat16)
  with torch.no_grad(), torch.device(dev):
    want = ref.encode_image(nchw(pixels).to(dev))
    with auto:
      want_bf = ref.encode_image(nchw(pixels).to(dev))

  def t2np(t):
    return t.detach().float().cpu().numpy()

  g2 = cfg.num_pixel_tokens
  ref_vis = t2np(want["visual"][0])
  ref_mf = t2np(want["mask_features"].permute(0, 2, 3, 1))[0]

  def vision_rows(name, vis, n_vis, mf):
    n_ref = ref_vis.shape[0]
    row = dict(part="vision", who=name, n_objects=int(n_vis) - g2 - 1,
               n_objects_ref=n_ref - g2 - 1,
               pixel_tokens=compare(vis[:g2 + 1], ref_vis[:g2 + 1]),
               mask_features=compare(mf, ref_mf))
    if int(n_vis) == n_ref:
      row["object_tokens"] = compare(vis[g2 + 1:n_ref], ref_vis[g2 + 1:])
    log.add(row)

  vision_rows("torch_bf16_autocast", t2np(want_bf["visual"][0]), want_bf["visual"][0].shape[0],
              t2np(want_bf["mask_features"].permute(0, 2, 3, 1))[0])
  for dtype, model in ports.items():
    gd, st = nnx.split(model)
    ctx = jax.default_matmul_precision("highest" if dtype == "float32" else "default")
    with ctx:
      enc = jax.jit(lambda s, p: nnx.merge(gd, s).encode_image(p))(st, jnp.asarray(pixels))
    vision_rows(f"port_{dtype}", np.asarray(enc["visual"][0], np.float32),
                int(enc["num_visual"][0]), np.asarray(enc["mask_features"][0], np.float32))

  # One InternLM2 layer (+ final norm + head) on the same spliced prompt.
  model = ports["bfloat16"]
  after = list(range(40, 40 + AFTER_LEN))
  with torch.no_grad(), torch.device(dev):
    embeds = ref.prompt_embeds(BEFORE, want["visual"][0], after)
    w_logits, w_hidden = ref.llm_forward(embeds)
    with auto:
      b_logits, b_hidden = ref.llm_forward(embeds)
  e = jnp.asarray(t2np(embeds)).astype(model.llm.config.dtype)
  pos = jnp.arange(e.shape[1], dtype=jnp.int32)[None]
  gd, st = nnx.split(model)

  @jax.jit
  def llm_fwd(s, e, pos):
    m = nnx.merge(gd, s)
    h, _ = m.llm(e, pos)
    return h, m.llm.logits(h)
  h, logits = llm_fwd(st, e, pos)
  for name, hh, ll in (("torch_bf16_autocast", t2np(b_hidden[0]), t2np(b_logits[0])),
                       ("port_bfloat16", np.asarray(h[0], np.float32), np.asarray(logits[0]))):
    log.add(dict(part="llm_layer", who=name, hidden=compare(hh, t2np(w_hidden[0])),
                 logits=compare(ll, t2np(w_logits[0])),
                 argmax_agreement=float(np.mean(ll.argmax(-1) == t2np(w_logits[0]).argmax(-1)))))

  # [SEG] masks from two states of the prompt on the reference's float32 features.
  seg = w_hidden[0, [len(BEFORE) + 3, -1]]
  with torch.no_grad(), torch.device(dev):
    w_masks = ref.seg_masks(seg, torch.zeros(2, dtype=torch.long), want["mask_features"],
                            want["memories"])
    with auto:
      b_masks = ref.seg_masks(seg, torch.zeros(2, dtype=torch.long), want["mask_features"],
                              want["memories"])
  vdt = model.config.pixel_decoder.dtype
  mf = jnp.asarray(ref_mf[None]).astype(vdt)
  mems = [jnp.asarray(t2np(m.permute(0, 2, 3, 1))).astype(vdt) for m in want["memories"]]
  masks = jax.jit(lambda s, hh, mf, mems: nnx.merge(gd, s).seg_masks(hh, mf, mems))(
      st, jnp.asarray(t2np(seg))[None].astype(model.llm.config.dtype), mf, mems)
  wm = t2np(w_masks)
  for name, mm in (("torch_bf16_autocast", t2np(b_masks)),
                   ("port_bfloat16", np.asarray(masks[0], np.float32))):
    log.add(dict(part="seg_masks", who=name, mask_logits=compare(mm, wm),
                 sign_agreement=float(np.mean((mm > 0) == (wm > 0)))))
  del ref, ports
  if dev == "cuda":
    torch.cuda.empty_cache()
  log.set("parity_seconds", time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Speed.


def _options(config, method, args):
  from eval import gcg
  from eval.omg_gcg import OmgGCGOptions
  from models import generate as gen
  layers = config.llm.num_layers
  pdrop = (2, 8, 16, 24) if layers >= 32 else (2, 4, 6)      # tiny: 8 layers
  prune = gcg.PruneConfig() if method == "none" else gcg.PruneConfig(
      method=method, keep_ratio=1.0 - args.reduction, superpixels="device", pdrop_layers=pdrop)
  return OmgGCGOptions(prune=prune,
                       sampler=gen.SamplerConfig(max_new_tokens=args.new_tokens, eos_id=2,
                                                 pad_id=2, ignore_eos=True),
                       seg_id=config.llm.vocab_size - 4, max_masks=args.segs)


def _prompt(config, batch: int, seed: int = 0):
  """Random ids [B,L], valid, visual_mask: BOS + 4 text ids, the V_max span, AFTER_LEN text ids,
  padded to a multiple of 16 (the runner's prompt layout)."""
  rng = np.random.default_rng(seed)
  v = config.num_visual_tokens_max
  n = len(BEFORE) + v + AFTER_LEN
  l = -(-n // 16) * 16
  ids = rng.integers(3, config.llm.vocab_size - 8, (batch, l)).astype(np.int32)
  ids[:, :len(BEFORE)] = BEFORE
  slot = np.arange(l)
  vis = np.broadcast_to((slot >= len(BEFORE)) & (slot < len(BEFORE) + v), (batch, l))
  valid = np.broadcast_to(slot < n, (batch, l))
  return ids, np.ascontiguousarray(valid), np.ascontiguousarray(vis)


def speed(args, log, start: float) -> None:
  import jax
  import jax.numpy as jnp
  from eval import bench_common as common
  from eval import omg_gcg
  from eval.bench_jax import llm_decode_loop_fn
  from models import generate as gen
  from models.flat_state import flatten_state
  from models.llama.fuse import fuse_split

  def sync(x):
    return jax.block_until_ready(x)

  config = speed_config(args.tiny, args.vision_dtype)
  t0 = time.perf_counter()
  graphdef, state = random_state(config)
  sync(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  if args.fuse_projections:   # as `python -m eval.gcg --model omg_llava` runs the LLM
    graphdef, state = fuse_split(graphdef, state)
  fdef, state = flatten_state(graphdef, state)   # a flat list: cheap per call (models.flat_state)
  dev = jax.devices()[0]
  log.set("speed_setup", dict(init_s=time.perf_counter() - t0, model_gb=nbytes / 1e9,
                              device=str(dev), device_kind=dev.device_kind,
                              vision_dtype=args.vision_dtype, new_tokens=args.new_tokens,
                              segs=args.segs, reduction=args.reduction, jax=jax.__version__,
                              fuse_projections=args.fuse_projections))
  print(f"[speed] model built in {time.perf_counter() - t0:.1f} s ({nbytes / 1e9:.2f} GB)",
        flush=True)
  last_compile_s = 0.0

  for b in args.batches:
    if time.perf_counter() - start + 1.2 * last_compile_s > args.budget_s:
      log.add(dict(part="speed", what="skipped", batch=b,
                   reason=f"--budget-s: compiling would take about {last_compile_s:.0f} s"))
      continue
    t_batch = time.perf_counter()
    pixels, im01 = smooth_pixels(b, config.image_size)
    ids, valid, vis = _prompt(config, b)
    rng = jax.random.key(0)
    enc_fn = jax.jit(lambda s, p: omg_gcg.encode_stage(fdef.merge(s), p))
    enc_shape = jax.eval_shape(enc_fn, state, pixels)
    lowerings = {"vision": lambda: enc_fn.lower(state, pixels)}
    layouts = {}
    for method in args.methods:
      opts = _options(config, method, args)
      plan, t_llm = omg_gcg.llm_layout(opts, config, ids.shape[1])
      lengths = plan.stage_lengths(t_llm)
      layouts[method] = (opts, plan, t_llm)
      im = im01 if method == "altp" else None

      def full(s, enc, im, rng, opts=opts):
        return omg_gcg.llm_stage(fdef.merge(s), enc, ids, valid, vis, None, im, rng,
                                 options=opts)

      def prefill(s, enc, im, rng, opts=opts, plan=plan):
        m = fdef.merge(s)
        x = omg_gcg.llm_inputs(m, enc, ids, valid, vis, None, im, rng, options=opts)
        caches, _, hidden, next_pos, _ = gen._prefill(m.llm, x["embeds"], x["positions"],
                                                      x["valid"], x["pixel_mask"], plan,
                                                      opts.sampler.max_new_tokens)
        return caches, hidden, next_pos

      def step(s, token, caches, next_pos, lengths=lengths):
        llm = fdef.merge(s).llm
        h, caches = gen._decode_step(llm, token, caches, next_pos, lengths, 1)
        return jnp.argmax(llm.logits(h[:, None])[:, 0], -1).astype(jnp.int32), caches

      out_shape = jax.eval_shape(prefill, state, enc_shape, im, rng)
      token = jax.ShapeDtypeStruct((b,), jnp.int32)
      lowerings[("e2e", method)] = (lambda f=full, im=im: jax.jit(f).lower(
          state, enc_shape, im, rng))
      lowerings[("prefill", method)] = (lambda f=prefill, im=im: jax.jit(f).lower(
          state, enc_shape, im, rng))
      lowerings[("decode_step", method)] = (lambda f=step, o=out_shape: jax.jit(
          f, donate_argnums=2).lower(state, token, o[0], o[2]))
      lowerings[("decode_loop", method)] = (
          lambda f=llm_decode_loop_fn(fdef.merge, lengths), o=out_shape: jax.jit(
              f, donate_argnums=2).lower(state, token, o[0], o[2]))
    print(f"[speed] batch {b}: compiling {len(lowerings)} programs", flush=True)
    errors = {}
    progs = common.compile_many(lowerings, args.compile_workers, errors=errors)
    for name, e in errors.items():
      log.add(dict(part="speed", what="compile_error", batch=b, program=str(name),
                   error=f"{type(e).__name__}: {str(e)[:500]}"))
    last_compile_s = compile_s = time.perf_counter() - t_batch
    log.add(dict(part="speed", what="compile", batch=b, programs=len(lowerings),
                 seconds=compile_s, workers=args.compile_workers))
    if "vision" not in progs:
      continue
    vision, sec = progs["vision"]
    t = common.median_ms(lambda: vision(state, pixels), sync, args.repeats)
    log.add(dict(part="speed", what="vision", batch=b, **t, ms_per_image=t["ms"] / b,
                 compile_s=sec))
    enc = sync(vision(state, pixels))
    for method in args.methods:
      if time.perf_counter() - start > args.budget_s:
        log.add(dict(part="speed", what="skipped", batch=b, method=method,
                     reason="--budget-s spent"))
        continue
      if any((w, method) not in progs for w in ("prefill", "decode_step", "e2e")):
        continue
      try:
        _time_method(args, log, progs, state, enc, vision, pixels, im01, rng, b, method,
                     layouts[method], config)
      except Exception as e:  # noqa: BLE001 - an OOM at batch 8 must not lose the other rows
        if not common.is_oom(e):
          raise
        log.add(dict(part="speed", what="oom", batch=b, method=method, error=str(e)[:500]))


def _time_method(args, log, progs, state, enc, vision, pixels, im01, rng, b, method, layout,
                 config):
  """prefill, decode_step and e2e rows of one method at batch b."""
  import jax
  import jax.numpy as jnp
  from eval import bench_common as common
  from eval.bench_jax import time_decode_loop

  def sync(x):
    return jax.block_until_ready(x)
  g2 = config.num_pixel_tokens
  opts, plan, t_llm = layout
  im = im01 if method == "altp" else None
  kept = g2 if method == "none" else opts.prune.kept(g2)
  in_llm = method in ("fastv", "pdrop")
  tag = dict(method=method, batch=b, reduction=0.0 if method == "none" else args.reduction,
             pixel_tokens_kept=plan.visual_counts[1] if in_llm else kept,
             pixel_tokens_layer_avg=round(plan.average_visual_retention() * g2, 1)
             if in_llm else kept, llm_prompt_slots=t_llm,
             stage_lengths=list(plan.stage_lengths(t_llm)))
  c, sec = progs[("prefill", method)]
  box = {}

  def run_prefill():
    box["out"] = c(state, enc, im, rng)
    return box["out"][1]
  t = common.median_ms(run_prefill, sync, args.repeats)
  log.add(dict(part="speed", what="prefill", **tag, **t, ms_per_image=t["ms"] / b,
               compile_s=sec))
  c2, sec = progs[("decode_step", method)]
  caches, _, next_pos = box.pop("out")
  holder = {"caches": caches}
  tok = jnp.full((b,), 5, jnp.int32)

  def run_step():
    nxt, holder["caches"] = c2(state, tok, holder["caches"], next_pos)
    return nxt
  t = common.median_ms(run_step, sync, args.repeats)
  log.add(dict(part="speed", what="decode_step", **tag, **t, compile_s=sec))
  if ("decode_loop", method) in progs:   # the step inside one fori_loop, as generation runs it
    c4, sec = progs[("decode_loop", method)]
    t = time_decode_loop(c4, state, tok, holder, next_pos, sync, args.repeats)
    log.add(dict(part="speed", what="decode_loop", **tag, **t, compile_s=sec))
  del holder, caches
  c3, sec = progs[("e2e", method)]

  def run_e2e():
    return c3(state, vision(state, pixels), im, rng)["masks"]
  t = common.median_ms(run_e2e, sync, max(1, args.repeats // 2))
  log.add(dict(part="speed", what="e2e", **tag, **t, ms_per_image=t["ms"] / b,
               images_per_s=b / (t["ms"] / 1e3), new_tokens=args.new_tokens,
               segs=args.segs, compile_s=sec + progs["vision"][1]))


def main(argv=None):
  from eval import bench_common as common
  import jax
  args = parse_args(argv)
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  log = common.JsonLog(os.path.join(args.out, "omg_gpu.json"),
                       dict(argv=list(sys.argv[1:] if argv is None else argv), tiny=args.tiny,
                            date=time.strftime("%Y-%m-%d %H:%M:%S"),
                            device=str(jax.devices()[0])))
  if args.part in ("all", "parity"):
    parity(args, log)
  if args.part in ("all", "speed"):
    speed(args, log, start)
  log.set("seconds", time.perf_counter() - start)
  return log.data


if __name__ == "__main__":
  main()
