"""The JAX half of `eval.bench` (issue 5): GLaMM-7B GCG in this repo, random bf16 weights.

Per batch it times (median of repeats after a warm-up call, `block_until_ready`): CLIP features,
mm_projector, the SAM image encoder, the mask decoder (per [SEG]); and per (method, reduction):
the LLM prefill, one decode step (stage caches from that prefill, donated) and end-to-end GCG
(`eval.gcg.gcg_forward`: CLIP -> pruning -> prefill -> `while_loop` decode of a fixed number of
tokens -> [SEG] states -> masks); for ALTP also its own cost, the selection program alone (device
superpixels, pixel detail, selection; `altp_cost`, with its fraction of the end-to-end time).
Every program is compiled ahead of time once (`jit.lower(...).compile()`), the programs of one
batch in parallel threads, and then timed one after another.

End to end, `--e2e split` (default) runs the SAM encoder program and the GCG program back to back
and blocks once at the end (the SAM encoder depends on no method, so it is compiled once per
batch instead of once per method); `--e2e fused` compiles SAM into each GCG program. The SAM
encoder runs in chunks of `--sam-chunk` images (`lax.map`) so its global-attention logits stay
bounded at large batches.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval import bench_common as common
from eval import bench_flops as flops
from eval.bench_llm_decode import _copy_bandwidth, _nbytes
from models.flat_state import flatten_state
from models.llama.fuse import fuse_split


def _sync(x):
  return jax.block_until_ready(x)


def matmul_rate(n: int, repeats: int) -> float:
  """bf16 n^3 matmul FLOP/s (random operands, never zeros)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x, y: x @ y)
  ms = common.median_ms(lambda: mm(a, b), _sync, repeats)["ms"]
  return 2 * n ** 3 / (ms / 1e3)


def build_model(config, ctor=None):
  """GLaMM (or `ctor(config, rngs=...)`, e.g. the SAM ImageEncoder with its config) with random
  bf16 parameters made on the default device, leaf by leaf; returns (graphdef, state).

  Matrices (ndim >= 2: kernels, embeddings, positional tables) are N(0, 0.02^2), as HF's
  `initializer_range`; vectors are ones (norm scales) or zeros (biases). One jitted program
  makes them all from one random draw (see `make`).
  """
  if ctor is None:
    from models.glamm.modeling import GLaMM as ctor
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ctor(config, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  kinds = []
  for path, leaf in leaves:
    name = str(path[-2]) if len(path) > 1 else ""
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      kinds.append("zeros")
    elif len(leaf.shape) >= 2:
      kinds.append("normal")
    else:
      kinds.append("zeros" if "bias" in name else "ones")

  sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
  pool = max(sizes) + 65536

  @jax.jit
  def make(key):
    # One draw, sliced at a different offset per leaf: a single random op compiles in seconds
    # where one draw per leaf costs minutes of XLA compilation (leaves overlap in values, which
    # timing does not notice).
    base = (0.02 * jax.random.normal(key, (pool,), jnp.float32)).astype(jnp.bfloat16)
    out = []
    for i, ((_, leaf), kind, size) in enumerate(zip(leaves, kinds, sizes)):
      if kind == "normal":
        off = (i * 7919) % (pool - size + 1)
        out.append(jax.lax.slice(base, (off,), (off + size,)).reshape(leaf.shape))
      elif kind == "zeros":
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        out.append(jnp.zeros(leaf.shape, jnp.bfloat16 if floating else leaf.dtype))
      else:
        out.append(jnp.ones(leaf.shape, jnp.bfloat16))
    return out
  return graphdef, jax.tree.unflatten(treedef, make(jax.random.key(0)))


class _Proxy:
  """The model with `sam_embed` replaced (precomputed embedding, or the chunked encoder)."""

  def __init__(self, model, sam_embed):
    self._model, self._sam_embed = model, sam_embed

  def __getattr__(self, name):
    return getattr(self._model, name)

  def sam_embed(self, pixels):
    return self._sam_embed(pixels)


def chunked_sam(model, pixels, chunk: int):
  """SAM image encoder over [B,...] in sequential chunks of `chunk` images."""
  return chunked(model.sam_embed, pixels, chunk)


def chunked(fn, pixels, chunk: int):
  """fn over [B,...] in sequential chunks of gcd(B, chunk) images (`lax.map`)."""
  b = pixels.shape[0]
  c = int(np.gcd(b, chunk))
  if c == b:
    return fn(pixels)
  out = jax.lax.map(fn, pixels.reshape((b // c, c) + pixels.shape[1:]))
  return out.reshape((b,) + out.shape[2:])


def sam_attention_paths(enc_config, impl: str) -> dict:
  """What `impl` runs on this backend in bf16: {"windowed": path, "global": path}."""
  from models.sam.image_encoder import resolve_attention_impl
  g, w = enc_config.grid_size, enc_config.window_size
  out = {}
  if w and any(enc_config.block_window_size(i) for i in range(enc_config.depth)):
    out["windowed"] = resolve_attention_impl(impl, jnp.bfloat16, enc_config.head_dim, (w, w),
                                             enc_config.use_rel_pos, windowed=True)
  if any(enc_config.block_window_size(i) == 0 for i in range(enc_config.depth)):
    out["global"] = resolve_attention_impl(impl, jnp.bfloat16, enc_config.head_dim, (g, g),
                                           enc_config.use_rel_pos)
  return out


def make_inputs(config, lay, b, seed=0):
  """Device inputs of one batch: smooth random images (CLIP, [0,1] copy for device SLIC), random
  SAM pixels, random prompt ids with N visual slots at `lay.offset`."""
  s, n, t = config.vision.image_size, lay.num_visual, lay.prompt_len
  sam_size = config.sam.image_encoder.img_size

  @jax.jit
  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    im = jax.random.uniform(k1, (b, 12, 12, 3))
    im01 = jax.image.resize(im, (b, s, s, 3), "linear")
    clip_px = ((im01 - 0.45) / 0.27).astype(jnp.bfloat16)
    sam_px = jax.random.normal(k2, (b, sam_size, sam_size, 3), jnp.bfloat16)
    ids = jax.random.randint(k3, (b, t), 3, config.llm.vocab_size - 8, jnp.int32)
    slot = jnp.arange(t)
    vmask = jnp.broadcast_to((slot >= lay.offset) & (slot < lay.offset + n), (b, t))
    return dict(images01=im01, clip_px=clip_px, sam_px=sam_px, ids=ids,
                valid=jnp.ones((b, t), bool), vmask=vmask)
  return make(jax.random.key(seed))


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    return dict(program_gb=(m.temp_size_in_bytes + m.argument_size_in_bytes
                            + m.output_size_in_bytes - m.alias_size_in_bytes) / 1e9)
  except Exception:  # noqa: BLE001 - not every backend reports it
    return {}


def _memory_now() -> dict:
  """Device memory when a program failed: in use, the allocator's limit and its largest free block
  (an out-of-memory with in_use + needed < limit points at fragmentation)."""
  stats = jax.devices()[0].memory_stats() or {}
  keys = {"bytes_in_use": "in_use_gb", "bytes_limit": "limit_gb",
          "largest_free_block_bytes": "largest_free_gb"}
  return {name: stats[k] / 1e9 for k, name in keys.items() if k in stats}


def _peak_gb():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 1e9 or None


compile_many = common.compile_many   # moved to bench_common (shared with eval.bench_scaling)


class Bench:
  """Holds the model and builds the programs of one batch."""

  def __init__(self, config, lay, args):
    self.config, self.lay, self.args = config, lay, args
    self.sam_only = getattr(args, "sam_only", False)
    t0 = time.perf_counter()
    if self.sam_only:   # only the SAM image encoder's parameters (--sam-only)
      from models.sam.image_encoder import ImageEncoder
      graphdef, state = build_model(config.sam.image_encoder, ImageEncoder)
    else:
      graphdef, state = build_model(config)
      if getattr(args, "fuse_projections", True):   # as `python -m eval.gcg` runs the model
        graphdef, state = fuse_split(graphdef, state)
    _sync(state)
    self.init_s = time.perf_counter() - t0
    self.model_bytes = _nbytes(state)
    if self.sam_only:
      self.non_llm_bytes = self.model_bytes
    else:
      llm_state = nnx.state(nnx.merge(graphdef, state).llm)
      self.non_llm_bytes = self.model_bytes - _nbytes(llm_state)
    # Programs take the state as a flat list: flattening an nnx.State costs ~4 ms of host time
    # per call, which would be timed as part of a decode step or a small component.
    self.fdef, self.state = flatten_state(graphdef, state)

  def model(self, state):
    return self.fdef.merge(state)

  def sam_encoder(self, state, impl=None):
    """The SAM image encoder of `state`, its attention switched to `impl` when given."""
    m = self.model(state)
    enc = m if self.sam_only else m.grounding_encoder.image_encoder
    if impl is not None:
      enc.set_attention_impl(impl)
    return enc

  def lower_sam(self, x, impl=None):
    """Thunk lowering the chunked SAM image encoder with attention path `impl`."""
    chunk = self.args.sam_chunk
    return lambda: jax.jit(lambda s, p: chunked(self.sam_encoder(s, impl), p, chunk)).lower(
        self.state, x["sam_px"])

  # -- program builders (each returns a thunk giving a `Lowered`) --------------------------------

  def lower_components(self, x):
    cfg, lay, st = self.config, self.lay, self.state
    b = x["ids"].shape[0]
    sel = cfg.vision_select_layer
    out = {}
    out["clip"] = lambda: jax.jit(
        lambda s, p: self.model(s).vision_tower.features(p, select_layer=sel)).lower(
            st, x["clip_px"])
    feats = jax.ShapeDtypeStruct((b, lay.num_visual, cfg.vision.hidden_size), jnp.bfloat16)
    out["projector"] = lambda: jax.jit(lambda s, f: self.model(s).mm_projector(f)).lower(st, feats)
    out["sam_encoder"] = self.lower_sam(x)
    for impl in getattr(self.args, "sam_attention", [])[1:]:   # the first is the config's
      out[("sam_encoder", impl)] = self.lower_sam(x, impl)
    g = cfg.sam.image_encoder.grid_size
    emb = jax.ShapeDtypeStruct((b, g, g, cfg.sam.image_encoder.out_chans), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, lay.segs, cfg.llm.hidden_size), jnp.bfloat16)
    out["mask_decoder"] = lambda: jax.jit(
        lambda s, h, e: self.model(s).decode_masks(h, e).astype(jnp.float32)).lower(st, seg, emb)
    return out

  def options(self, method, reduction):
    return gcg_options(self.config, self.lay, method, reduction)

  def lower_e2e(self, x, method, reduction):
    from eval.gcg import gcg_forward
    opts = self.options(method, reduction)
    fused = self.args.e2e == "fused"
    chunk = self.args.sam_chunk
    b = x["ids"].shape[0]
    g = self.config.sam.image_encoder.grid_size
    emb = jax.ShapeDtypeStruct((b, g, g, self.config.sam.image_encoder.out_chans), jnp.bfloat16)

    def fn(s, ids, valid, vmask, clip_px, sam_in, images01, rng):
      m = self.model(s)
      sam = (lambda p: chunked_sam(m, p, chunk)) if fused else (lambda _: sam_in)
      out = gcg_forward(_Proxy(m, sam), ids, valid, vmask, clip_px, sam_in, None,
                        images01 if method == "altp" else None, rng, options=opts)
      return out
    return lambda: jax.jit(fn).lower(self.state, x["ids"], x["valid"], x["vmask"], x["clip_px"],
                                     x["sam_px"] if fused else emb, x["images01"],
                                     jax.random.key(0))

  def lower_selection(self, x, method, reduction):
    """The pre-LLM selection alone (`eval.gcg.pre_llm_selection`: for ALTP the device
    superpixels, pixel detail and selection) on the batch's CLIP images. The visual tokens and
    CLS attention are inputs with the shapes `encode_image` gives (`selection_inputs`)."""
    from eval.gcg import pre_llm_selection
    opts = self.options(method, reduction)
    vis, cls = jax.eval_shape(lambda s, p: self.model(s).encode_image(p), self.state,
                              x["clip_px"])
    fn = lambda v, c, im, rng: pre_llm_selection(opts.prune, v, c, None, im, rng,  # noqa: E731
                                                 opts.grid)
    return lambda: jax.jit(fn).lower(vis, cls, x["images01"], jax.random.key(0))

  def selection_inputs(self, x):
    """(visual [B, N, D], CLS attention [B, N] summing to 1, images01, key) for
    `lower_selection`'s program: random values, the shapes and dtypes of `encode_image`."""
    vis, cls = jax.eval_shape(lambda s, p: self.model(s).encode_image(p), self.state,
                              x["clip_px"])
    k1, k2 = jax.random.split(jax.random.key(3))
    return (jax.random.normal(k1, vis.shape, vis.dtype),
            jax.nn.softmax(jax.random.normal(k2, cls.shape, cls.dtype), axis=-1),
            x["images01"], jax.random.key(0))

  def llm_inputs(self, b, method, reduction):
    return llm_inputs(self.config, self.lay, b, method, reduction)

  def lower_llm(self, b, method, reduction):
    plan, embeds, pos, valid, vmask = self.llm_inputs(b, method, reduction)
    lengths = plan.stage_lengths(embeds.shape[1])
    prefill, step = llm_step_fns(self.model, plan, self.lay.new_tokens, lengths)
    out_shape = jax.eval_shape(prefill, self.state, embeds, pos, valid, vmask)
    token = jax.ShapeDtypeStruct((b,), jnp.int32)
    data = dict(embeds=embeds, pos=pos, valid=valid, vmask=vmask, plan=plan, lengths=lengths)
    return data, {
        "prefill": lambda: jax.jit(prefill).lower(self.state, embeds, pos, valid, vmask),
        "decode_step": lambda: jax.jit(step, donate_argnums=2).lower(
            self.state, token, out_shape[0], out_shape[2]),
        "decode_loop": lambda: jax.jit(
            llm_decode_loop_fn(self.model, lengths), donate_argnums=2).lower(
                self.state, token, out_shape[0], out_shape[2])}


def gcg_options(config, lay, method, reduction):
  """GCGOptions of the benchmark: `lay.new_tokens` forced tokens (EOS ignored), `lay.segs` masks,
  device superpixels for ALTP."""
  from eval.gcg import GCGOptions, PruneConfig
  from models import generate as gen
  prune = PruneConfig(method=method, keep_ratio=1.0 - reduction,
                      superpixels="device") if method != "none" else PruneConfig()
  return GCGOptions(prune=prune,
                    sampler=gen.SamplerConfig(max_new_tokens=lay.new_tokens, ignore_eos=True),
                    seg_id=min(32004, config.llm.vocab_size - 1), max_segs=lay.segs,
                    grid=(config.vision.grid, config.vision.grid))


def llm_inputs(config, lay, b, method, reduction):
  """(plan, embeds, positions, valid, visual_mask) of the method's LLM input at batch b (random
  bf16 embeddings, N visual slots at `lay.offset`)."""
  plan, t_in, n_in, _ = common.prune_plan(config, method, reduction, lay.prompt_len)
  d = config.llm.hidden_size
  slot = jnp.arange(t_in)
  vmask = jnp.broadcast_to((slot >= lay.offset) & (slot < lay.offset + n_in), (b, t_in))
  embeds = (0.02 * jax.random.normal(jax.random.key(1), (b, t_in, d))).astype(jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(t_in, dtype=jnp.int32), (b, t_in))
  return plan, embeds, pos, jnp.ones((b, t_in), bool), vmask


def llm_step_fns(model_fn, plan, new_tokens, lengths, mesh=None):
  """(prefill, step) functions of state: prefill(s, embeds, positions, valid, visual_mask) ->
  (stage caches, last hidden, stage next positions); step(s, token [B], caches, next_pos) ->
  (greedy next token [B], caches). With `mesh`, the caches leave both pinned to their layout
  (`models.mesh.constrain_cache`), so a step compiled for that layout takes the prefill's."""
  from models import generate as gen
  from models import mesh as mesh_lib

  def pin(caches):
    return caches if mesh is None else tuple(mesh_lib.constrain_cache(c, mesh) for c in caches)

  def prefill(s, e, p, v, vm):
    caches, _, hidden, next_pos, _ = gen._prefill(model_fn(s).llm, e, p, v, vm, plan, new_tokens)
    return pin(caches), hidden, next_pos

  def step(s, token, caches, next_pos):
    llm = model_fn(s).llm
    h, caches = gen._decode_step(llm, token, caches, next_pos, lengths, 1)
    return jnp.argmax(llm.logits(h[:, None])[:, 0], -1).astype(jnp.int32), pin(caches)
  return prefill, step


DECODE_LOOP_STEPS = 32


def time_decode_loop(loop, state, token, box: dict, next_pos, sync, repeats: int) -> dict:
  """Per-step milliseconds (median/min/max over `repeats` calls, `steps` included) of a compiled
  `llm_decode_loop_fn` program; the donated caches travel through `box["caches"]`."""
  def run():
    nxt, box["caches"] = loop(state, token, box["caches"], next_pos)
    return nxt
  t = common.median_ms(run, sync, repeats)
  n = DECODE_LOOP_STEPS
  return dict(t, steps=n, **{k: t[k] / n for k in ("ms", "ms_min", "ms_max")})


def llm_decode_loop_fn(model_fn, lengths):
  """loop(s, token [B], caches, next_pos) -> (last greedy token [B], caches): DECODE_LOOP_STEPS
  decode steps in one `lax.fori_loop`, each feeding its argmax to the next, as generation runs
  them. `time_decode_loop` divides by the step count: the per-step cost without one host
  dispatch per step."""
  from models import generate as gen

  def loop(s, token, caches, next_pos):
    llm = model_fn(s).llm

    def body(i, carry):
      tok, c = carry
      h, c = gen._decode_step(llm, tok, c, next_pos, lengths, i)
      return jnp.argmax(llm.logits(h[:, None])[:, 0], -1).astype(jnp.int32), c
    return jax.lax.fori_loop(1, DECODE_LOOP_STEPS + 1, body, (token, caches))
  return loop


def run(args, log: common.JsonLog):
  """Measures everything the arguments select, adding rows to `log` as it goes."""
  start = time.perf_counter()
  config = common.bench_config(args.tiny)
  impls = list(getattr(args, "sam_attention", None) or ["auto"])
  config = common.with_sam_attention(config, impls[0])
  config = common.with_attention(config, getattr(args, "attention", "auto"))
  lay = common.layout(config, args.tiny, args.new_tokens, args.segs)
  dev = jax.devices()[0]
  enc = config.sam.image_encoder
  log.set("jax", dict(device=str(dev), device_kind=dev.device_kind, platform=dev.platform,
                      jax=jax.__version__, layout=lay.__dict__, e2e=args.e2e,
                      fuse_projections=getattr(args, "fuse_projections", True),
                      sam_chunk=args.sam_chunk, sam_attention=impls,
                      attention=config.llm.attention_impl,
                      sam_attention_paths={i: sam_attention_paths(enc, i) for i in impls}))
  n_mm = 256 if args.tiny else 8192
  rate = matmul_rate(n_mm, args.repeats)
  bw = _copy_bandwidth((1 << 20) if args.tiny else (2 << 30), args.repeats)
  log.set("jax_ceilings", dict(matmul_n=n_mm, matmul_tflops=rate / 1e12, copy_gbps=bw / 1e9))
  print(f"[jax] ceilings: bf16 matmul {rate / 1e12:.1f} TFLOP/s, copy {bw / 1e9:.0f} GB/s",
        flush=True)

  if getattr(args, "sam_only", False):
    return run_sam_only(args, log, config, lay, impls, rate, bw, start)
  bench = Bench(config, lay, args)
  log.set("jax_model", dict(init_s=bench.init_s, model_gb=bench.model_bytes / 1e9,
                            non_llm_gb=bench.non_llm_bytes / 1e9))
  print(f"[jax] model built in {bench.init_s:.1f} s ({bench.model_bytes / 1e9:.2f} GB)",
        flush=True)
  combos = [("none", 0.0)] + [(m, r) for m in args.methods if m != "none"
                              for r in args.reductions]
  if "none" not in args.methods:
    combos = combos[1:]
  llm = config.llm
  wbytes = flops.llm_weight_bytes(llm)

  def row(**kw):
    kw = dict(framework="jax", **kw)
    kw["peak_gb"] = _peak_gb()
    log.add(kw)

  for b in args.batches:
    t_batch = time.perf_counter()
    if t_batch - start > args.budget_s:
      log.add(dict(framework="jax", what="skipped", batch=b, reason="--budget-s spent"))
      continue
    x = make_inputs(config, lay, b)
    lowerings = {}
    if args.components:
      lowerings.update(bench.lower_components(x))
    llm_data = {}
    for method, red in combos:
      key = (method, red)
      lowerings[("e2e",) + key] = bench.lower_e2e(x, method, red)
      if method == "altp":
        lowerings[("altp_cost",) + key] = bench.lower_selection(x, method, red)
      if args.components:
        data, lw = bench.lower_llm(b, method, red)
        llm_data[key] = data
        for name, thunk in lw.items():
          lowerings[(name,) + key] = thunk
    if args.e2e == "split" and "sam_encoder" not in lowerings:
      lowerings["sam_encoder"] = bench.lower_components(x)["sam_encoder"]
    print(f"[jax] batch {b}: compiling {len(lowerings)} programs", flush=True)
    progs = compile_many(lowerings, args.compile_workers)
    print(f"[jax] batch {b}: compiled in {time.perf_counter() - t_batch:.1f} s", flush=True)
    st = bench.state
    sam_c = progs["sam_encoder"][0]
    emb = sam_c(st, x["sam_px"])

    if args.components:
      c, sec = progs["clip"]
      feats = c(st, x["clip_px"])[0]
      p = flops.clip_flops(config.vision, config.vision.num_layers - 1)
      t = common.median_ms(lambda: c(st, x["clip_px"]), _sync, args.repeats)
      row(what="clip", batch=b, **t, compile_s=sec, gflop_per_image=p / 1e9,
          **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw), **_memory(c))
      c, sec = progs["projector"]
      p = flops.projector_flops(lay.num_visual, config.vision.hidden_size, llm.hidden_size)
      t = common.median_ms(lambda: c(st, feats), _sync, args.repeats)
      row(what="projector", batch=b, **t, compile_s=sec, gflop_per_image=p / 1e9,
          **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw), **_memory(c))
      p = flops.sam_encoder_flops(config.sam.image_encoder)
      for impl in impls:
        key = "sam_encoder" if impl == impls[0] else ("sam_encoder", impl)
        sc, sec = progs[key]
        t = common.median_ms(lambda: sc(st, x["sam_px"]), _sync, args.repeats)
        row(what="sam_encoder", sam_attention=impl, batch=b, **t, compile_s=sec,
            gflop_per_image=p / 1e9, **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw),
            **_memory(sc))
      c, sec = progs["mask_decoder"]
      seg = (0.5 * jax.random.normal(jax.random.key(2), (b, lay.segs, llm.hidden_size))
             ).astype(jnp.bfloat16)
      p = flops.mask_decoder_flops(config.sam)
      t = common.median_ms(lambda: c(st, seg, emb), _sync, args.repeats)
      row(what="mask_decoder", batch=b, segs=lay.segs, **t,
          ms_per_seg=t["ms"] / (b * lay.segs), compile_s=sec, gflop_per_seg=p / 1e9,
          **flops.fractions(p * b * lay.segs, 0, t["ms"] / 1e3, rate, bw), **_memory(c))

    for method, red in combos:
      key = (method, red)
      plan, t_in, n_in, k = common.prune_plan(config, method, red, lay.prompt_len)
      lengths = plan.stage_lengths(t_in)
      kv = flops.kv_cache_bytes(llm, plan.bounds, lengths, lay.new_tokens, b)
      tag = dict(method=method, reduction=red, visual_kept=k,
                 visual_avg=round(plan.average_visual_retention() * n_in, 1),
                 llm_tokens=t_in, batch=b, kv_cache_gb=kv / 1e9)
      try:
        if args.components:
          d = llm_data[key]
          c, sec = progs[("prefill",) + key]
          p = flops.prefill_flops(llm, plan.bounds, lengths)
          holder = {}

          def run_prefill():
            holder["out"] = c(st, d["embeds"], d["pos"], d["valid"], d["vmask"])
            return holder["out"][1]
          t = common.median_ms(run_prefill, _sync, args.repeats)
          row(what="prefill", **tag, **t, compile_s=sec, gflop_per_image=p / 1e9,
              **flops.fractions(p * b, wbytes, t["ms"] / 1e3, rate, bw), **_memory(c))
          c2, sec = progs[("decode_step",) + key]
          caches, _, next_pos = holder.pop("out")
          box = {"caches": caches}
          tok = jnp.full((b,), 5, jnp.int32)

          def run_step():
            nxt, box["caches"] = c2(st, tok, box["caches"], next_pos)
            return nxt
          t = common.median_ms(run_step, _sync, args.repeats)
          p = flops.decode_step_flops(llm, plan.bounds, lengths, 1)
          nbytes = wbytes + kv
          row(what="decode_step", **tag, **t, compile_s=sec, floor_ms=nbytes / bw * 1e3,
              **flops.fractions(p * b, nbytes, t["ms"] / 1e3, rate, bw), **_memory(c2))
          # The same step inside one fori_loop (as generation runs it): per-step time.
          c3, sec = progs[("decode_loop",) + key]
          t = time_decode_loop(c3, st, tok, box, next_pos, _sync, args.repeats)
          row(what="decode_loop", **tag, **t, compile_s=sec, floor_ms=nbytes / bw * 1e3,
              of_floor=t["ms"] / (nbytes / bw * 1e3),
              **flops.fractions(p * b, nbytes, t["ms"] / 1e3, rate, bw), **_memory(c3))
          del box, caches
        c, sec = progs[("e2e",) + key]
        sam_s = 0.0 if args.e2e == "fused" else progs["sam_encoder"][1]
        t = _time_e2e(c, sam_c, st, x, args)
        gf = flops.gcg_flops(config, plan.bounds, lengths, lay.new_tokens, lay.segs,
                             num_visual_projected=lay.num_visual)
        nbytes = (bench.non_llm_bytes + lay.new_tokens * wbytes
                  + lay.new_tokens * kv)   # weights once per pass, the cache once per step
        row(what="e2e", **tag, **t, images_per_s=b / (t["ms"] / 1e3),
            ms_per_image=t["ms"] / b, compile_s=sec + sam_s, new_tokens=lay.new_tokens,
            segs=lay.segs, gflop_per_image=gf["total"] / 1e9,
            **flops.fractions(gf["total"] * b, nbytes, t["ms"] / 1e3, rate, bw), **_memory(c))
        if ("altp_cost",) + key in progs:
          # ALTP's own cost (issue 5: at most 2% of the per-image time at the best batch): the
          # same selection code as inside the e2e program, timed alone.
          c, sec = progs[("altp_cost",) + key]
          sel = bench.selection_inputs(x)
          ts = common.median_ms(lambda: c(*sel), _sync, args.repeats)
          row(what="altp_cost", **tag, **ts, ms_per_image=ts["ms"] / b,
              of_e2e=ts["ms"] / t["ms"], compile_s=sec, **_memory(c))
      except Exception as e:  # noqa: BLE001 - record the failure (e.g. out of memory) and go on
        row(what="error", **tag, error=f"{type(e).__name__}: {str(e)[:300]}", oom=common.is_oom(e),
            **_memory_now())
    del progs, x, emb
    print(f"[jax] batch {b} done in {time.perf_counter() - t_batch:.1f} s", flush=True)

  if args.search:
    search_max_batch(bench, config, lay, args, combos, log, row, start)


def run_sam_only(args, log, config, lay, impls, rate, bw, start):
  """`--sam-only`: the SAM image encoder alone (its parameters only), once per attention path of
  `--sam-attention` and per batch; a path that fails to compile (e.g. a cuDNN limit) gives an
  error row and the others go on. Rows also give each path's max abs difference from the first
  path's embedding (bf16; the paths compute the same maths)."""
  bench = Bench(config, lay, args)
  log.set("jax_model", dict(init_s=bench.init_s, model_gb=bench.model_bytes / 1e9,
                            sam_only=True))
  p = flops.sam_encoder_flops(config.sam.image_encoder)
  for b in args.batches:
    t_batch = time.perf_counter()
    if t_batch - start > args.budget_s:
      log.add(dict(framework="jax", what="skipped", batch=b, reason="--budget-s spent"))
      continue
    x = make_inputs(config, lay, b)
    errors = {}
    progs = compile_many({impl: bench.lower_sam(x, impl) for impl in impls},
                         args.compile_workers, errors)
    print(f"[jax] sam batch {b}: compiled {len(progs)} in {time.perf_counter() - t_batch:.1f} s",
          flush=True)
    first = None
    for impl in impls:
      if impl in errors:
        e = errors[impl]
        log.add(dict(framework="jax", what="error", part="sam_encoder", sam_attention=impl,
                     batch=b, error=f"{type(e).__name__}: {str(e)[:300]}",
                     oom=common.is_oom(e)))
        continue
      c, sec = progs[impl]
      try:
        emb = c(bench.state, x["sam_px"]).astype(jnp.float32)
        diff = None if first is None else float(jnp.max(jnp.abs(emb - first)))
        first = emb if first is None else first
        t = common.median_ms(lambda: c(bench.state, x["sam_px"]), _sync, args.repeats)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory at this batch
        log.add(dict(framework="jax", what="error", part="sam_encoder", sam_attention=impl,
                     batch=b, error=f"{type(e).__name__}: {str(e)[:300]}",
                     oom=common.is_oom(e)))
        continue
      log.add(dict(framework="jax", what="sam_encoder", sam_attention=impl,
                   sam_paths=sam_attention_paths(config.sam.image_encoder, impl), batch=b, **t,
                   compile_s=sec, gflop_per_image=p / 1e9, max_abs_diff_vs_first=diff,
                   **flops.fractions(p * b, 0, t["ms"] / 1e3, rate, bw), **_memory(c),
                   peak_gb=_peak_gb()))
    del progs, x, first
    print(f"[jax] sam batch {b} done in {time.perf_counter() - t_batch:.1f} s", flush=True)


def _time_e2e(c, sam_c, st, x, args, repeats=None):
  if args.e2e == "fused":
    fn = lambda: c(st, x["ids"], x["valid"], x["vmask"], x["clip_px"], x["sam_px"],  # noqa: E731
                   x["images01"], jax.random.key(0))
  else:
    fn = lambda: c(st, x["ids"], x["valid"], x["vmask"], x["clip_px"],  # noqa: E731
                   sam_c(st, x["sam_px"]), x["images01"], jax.random.key(0))
  return common.median_ms(fn, _sync, repeats or args.e2e_repeats)


def search_max_batch(bench, config, lay, args, combos, log, row, start):
  """Doubles the batch from 2 x the largest requested one until a program runs out of memory or
  `--search-cap-s` seconds have passed (per method), timing end-to-end GCG at each size."""
  wanted = [(m, r) for m, r in combos if (m == "none" or r == max(args.reductions))]
  for method, red in wanted:
    t0 = time.perf_counter()
    b = 2 * max(args.batches)
    best = None
    while (time.perf_counter() - t0 < args.search_cap_s
           and time.perf_counter() - start < args.budget_s):
      print(f"[jax] search {method}@{red}: batch {b}", flush=True)
      try:
        x = make_inputs(config, lay, b)
        lw = {"e2e": bench.lower_e2e(x, method, red)}
        if args.e2e == "split":
          lw["sam_encoder"] = bench.lower_components(x)["sam_encoder"]
        progs = compile_many(lw, args.compile_workers)
        c = progs["e2e"][0]
        sam_c = progs.get("sam_encoder", (None,))[0]
        t = _time_e2e(c, sam_c, bench.state, x, args, repeats=max(1, args.e2e_repeats // 2))
        best = dict(batch=b, ms=t["ms"], images_per_s=b / (t["ms"] / 1e3))
        row(what="search", method=method, reduction=red, batch=b, **t,
            images_per_s=b / (t["ms"] / 1e3), **_memory(c))
        del progs, x
      except Exception as e:  # noqa: BLE001
        row(what="search_stop", method=method, reduction=red, batch=b,
            error=f"{type(e).__name__}: {str(e)[:300]}", oom=common.is_oom(e))
        break
      b *= 2
    row(what="max_batch", method=method, reduction=red,
        largest_batch=None if best is None else best["batch"],
        images_per_s=None if best is None else best["images_per_s"],
        searched_s=time.perf_counter() - t0)
