"""GLaMM programs run once on one device and once per mesh by the sharding tests.

Each program is `fn(model, inputs, mesh) -> {name: numpy array}`; with `mesh=None` it runs
unsharded on the default device. Inputs are host arrays of the global batch; on a mesh they are
split by logical names (`put`, replaceable for multi-process runs). To check another program on
every mesh (e.g. `models.generate`), add one entry to `PROGRAMS`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import mesh as mesh_lib
from models.glamm.config import GLaMMConfig, IMAGE_TOKEN_INDEX
from models.glamm.modeling import GLaMM, abstract_glamm, expand_image_placeholder
from models.placement import put_global, to_host

BATCH = 8            # divides data x fsdp of every test mesh
DECODE_STEPS = 4
SEG_PER_IMAGE = 3


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0) -> GLaMM:
  """Tiny GLaMM with random weights drawn in numpy into the abstract model: the same values as a
  module init would give in distribution terms (fan-in scaled kernels, norms near 1), at a
  fraction of the cost of running every initializer eagerly (SAM's alone takes tens of seconds on
  a loaded 2-core machine). Cached: the test modules share one model."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract_glamm(GLaMMConfig.tiny()))

  def draw(path, var):
    shape, dtype = var.shape, var.dtype
    name = str(path[-1])
    if "norm" in ".".join(map(str, path)) and name in ("scale", "weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "bias" or len(shape) < 2:
      value = 0.1 * rng.standard_normal(shape)
    else:
      fan_in = max(int(np.prod(shape[:-1])), 1)
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    return var.replace(jnp.asarray(value.astype(dtype)))

  return nnx.merge(graphdef, nnx.State.from_flat_path(
      [(p, draw(p, v)) for p, v in state.flat_state()]))


def make_inputs(config: GLaMMConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch: prompt ids with the image placeholder expanded, CLIP and SAM pixels, [SEG]
  states for the mask decoder."""
  rng = np.random.default_rng(seed)
  n = config.num_visual_tokens
  ids, masks = [], []
  for b in range(BATCH):
    prompt = np.concatenate([[1], rng.integers(3, config.llm.vocab_size, 3), [IMAGE_TOKEN_INDEX],
                             rng.integers(3, config.llm.vocab_size, 5)]).astype(np.int32)
    i, m = expand_image_placeholder(prompt, n)
    ids.append(i)
    masks.append(m)
  s = config.vision.image_size
  t = config.sam.image_encoder.img_size
  return {
      "input_ids": np.stack(ids), "visual_mask": np.stack(masks),
      "clip_pixels": rng.normal(size=(BATCH, s, s, 3)).astype(np.float32),
      "sam_pixels": rng.normal(size=(BATCH, t, t, 3)).astype(np.float32),
      "seg_hidden": rng.normal(size=(BATCH, SEG_PER_IMAGE, config.llm.hidden_size)
                               ).astype(np.float32),
  }


INPUT_NAMES = {
    "input_ids": mesh_lib.ACT_TOKENS, "visual_mask": mesh_lib.ACT_TOKENS,
    "clip_pixels": mesh_lib.ACT_PIXELS, "sam_pixels": mesh_lib.ACT_PIXELS,
    "seg_hidden": ("batch", None, "act_embed"),
}


def _put(inputs, mesh, put):
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in inputs.items()}
  return {k: put(v, INPUT_NAMES[k], mesh) for k, v in inputs.items()}


@functools.lru_cache(maxsize=None)
def _compiled(fn, graphdef, mesh, **jit_kwargs):
  """jax.jit of fn(model, *args) taking the model's state as an argument; one per (program,
  model structure, mesh), so repeated calls (decode steps, batches) reuse the compilation."""
  return jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), mesh, *args), **jit_kwargs)


def _jit_model(fn, model, mesh, **jit_kwargs):
  graphdef, state = nnx.split(model)
  return functools.partial(_compiled(fn, graphdef, mesh, **jit_kwargs), state)


def clip_and_forward(model, inputs, mesh, put=put_global):
  """encode_image + splice + uncached LLM pass: visual tokens, CLS attention, logits, hidden."""
  x = _put(inputs, mesh, put)
  out = _jit_model(_clip_and_forward, model, mesh)(x["input_ids"], x["visual_mask"],
                                                   x["clip_pixels"])
  return {k: to_host(v) for k, v in out.items()}


def _clip_and_forward(m, mesh, ids, vmask, pixels):
  visual, cls_att = m.encode_image(pixels)
  logits, hidden = m.forward(ids, vmask, pixels)
  hidden = mesh_lib.constrain(hidden, mesh_lib.ACT_HIDDEN, mesh)
  return {"visual": visual, "cls_attention": cls_att, "logits": logits, "hidden": hidden,
          "tokens": jnp.argmax(logits, axis=-1)}


def sam_masks(model, inputs, mesh, put=put_global):
  """SAM image embedding, mask decoding of the [SEG] states, post-processing, threshold."""
  x = _put(inputs, mesh, put)
  size = model.config.sam.image_encoder.img_size
  original = (size - 10, size - 20)
  out = _jit_model(functools.partial(_sam_masks, original=original), model, mesh)(
      x["sam_pixels"], x["seg_hidden"])
  return {k: to_host(v) for k, v in out.items()}


def _sam_masks(m, mesh, pixels, seg, original):
  emb = mesh_lib.constrain(m.sam_embed(pixels), mesh_lib.ACT_SAM_EMBED, mesh)
  low = m.decode_masks(seg, emb)
  logits = m.postprocess_masks(low, original, original)
  return {"sam_embedding": emb, "mask_logits": logits, "masks": logits > 0}


def prefill_decode(model, inputs, mesh, put=put_global):
  """Prefill into a KV cache, then DECODE_STEPS greedy steps, each a jitted call of the LLM with
  the cache donated: tokens [B, 1 + steps], last hidden, and the final cache."""
  x = _put(inputs, mesh, put)
  ids, vmask = x["input_ids"], x["visual_mask"]
  b, length = ids.shape
  cache = model.llm.init_cache(b, length + DECODE_STEPS)
  if mesh is not None:
    cache = mesh_lib.shard_cache(cache, mesh)

  prefill_jit = _jit_model(_prefill, model, mesh)
  step_jit = _jit_model(_step, model, mesh, donate_argnums=(3,))   # (state, token, index, cache)
  token, hidden, cache = prefill_jit(ids, vmask, x["clip_pixels"], cache)
  tokens = [token]
  for i in range(DECODE_STEPS):
    token, hidden, cache = step_jit(token, jnp.int32(length + i), cache)
    tokens.append(token)
  return {"tokens": to_host(jnp.concatenate(tokens, axis=1)), "last_hidden": to_host(hidden),
          "cache_k0": to_host(cache.k[0]), "cache_valid": to_host(cache.valid),
          "_cache": cache}


def _prefill(m, mesh, ids, vmask, pixels, cache):
  visual, _ = m.encode_image(pixels)
  embeds = mesh_lib.constrain(m.splice(ids, visual, vmask), mesh_lib.ACT_HIDDEN, mesh)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  hidden, cache = m.llm(embeds, positions, cache=cache, cache_write_index=0)
  cache = mesh_lib.constrain_cache(cache, mesh)
  return jnp.argmax(m.llm.logits(hidden[:, -1:]), axis=-1), hidden[:, -1], cache


def _step(m, mesh, token, index, cache):
  embeds = mesh_lib.constrain(m.llm.embed(token), mesh_lib.ACT_HIDDEN, mesh)
  positions = jnp.broadcast_to(index, token.shape)
  hidden, cache = m.llm(embeds, positions, cache=cache, cache_write_index=index)
  cache = mesh_lib.constrain_cache(cache, mesh)
  return jnp.argmax(m.llm.logits(hidden), axis=-1), hidden[:, -1], cache


PROGRAMS = {
    "clip_and_forward": clip_and_forward,
    "sam_masks": sam_masks,
    "prefill_decode": prefill_decode,
}

EXACT = ("tokens", "masks", "cache_valid")   # compared for equality; the rest with a tolerance


# -- a GCG-shaped evaluation loop over hosts (eval.multihost) ---------------------------------------

def image_inputs(config: GLaMMConfig, image_index: int) -> dict[str, np.ndarray]:
  """The inputs of one 'image' (row `image_index % BATCH` of a seeded batch)."""
  bank = make_inputs(config, seed=100 + image_index // BATCH)
  return {k: v[image_index % BATCH] for k, v in bank.items()}


def eval_loop(model, names, pred_dir, mesh, max_steps=None):
  """Greedy-decode every pending image of `names` (ids like "img07") in lockstep global batches
  of BATCH; each process loads only its rows; process 0 writes one prediction file per image."""
  from eval import multihost
  from models.placement import from_process_local

  rows = multihost.process_rows(mesh, BATCH)
  put = lambda v, names_, m: from_process_local(v[rows], names_, m, global_rows=BATCH)
  steps = multihost.schedule(multihost.pending(names, pred_dir), BATCH)
  for batch in steps[:max_steps]:
    real = [n for n in batch if n is not None]
    items = [image_inputs(model.config, int((n or real[-1])[3:])) for n in batch]
    inputs = {k: np.stack([it[k] for it in items]) for k in items[0]}
    out = prefill_decode(model, inputs, mesh, put=put)
    multihost.write_predictions(pred_dir, {
        n: {"image_id": n, "tokens": out["tokens"][i].tolist(),
            "process_count": jax.process_count()} for i, n in enumerate(real)})


def write_checkpoint(model, out: str) -> dict:
  """`model` as a converted checkpoint directory (the converter's writer, one Orbax checkpoint
  per group, config.json); returns path -> numpy value."""
  import json
  import os
  from convert.glamm_table import group_of
  from convert.writer import GroupWriter

  flat = {p: np.asarray(v.get_value()) for p, v in nnx.state(model).flat_state()}
  writer = GroupWriter(out, {p: (a.shape, a.dtype) for p, a in flat.items()}, group_of)
  for path, array in flat.items():
    writer.add(path, array, source_key=".".join(map(str, path)))
  writer.finish({"sources": ["tests/_sharded_programs.tiny_model"]})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(model.config.to_dict(), f)
  return flat
