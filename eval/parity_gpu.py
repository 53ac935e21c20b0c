"""Issue 3 GPU parity: the port against PyTorch at full size, bf16, the same random weights.

    python -m eval.parity_gpu --out DIR [--tiny] [--seq-len 640] [--photo chelsea]

Vicuna-7B-shaped LLaMA (transformers `LlamaForCausalLM`), CLIP ViT-L/14-336 (transformers
`CLIPVisionModel`) and SAM ViT-H (segment-anything `sam_model_registry["vit_h"]`) get random
weights of realistic scale (each library's own initialisation under `torch.manual_seed`; norms
1 + 0.1 N(0,1); SAM's zero-initialised pos_embed / rel-pos tables N(0, 0.02^2)), run in bf16 on
the GPU, and are copied tensor by tensor into the port through the checkpoint name tables
(`models/llama/params.py`, `models/clip/params.py`, `models/sam/params.py`, via
`models/param_tables.py`), never holding a second full copy on the host. Each part is compared,
then freed, before the next is built.

Inputs: `--seq-len` random token ids (LLaMA); a scikit-image photo preprocessed by
`eval/preprocess.py` (CLIP 336 and SAM 1024 branches); [SEG]-like prompts: `--segs` random
text embeddings (N(0, 0.5^2)) through SAM's prompt encoder and mask decoder.

Reported per tensor (ours vs PyTorch, both bf16, compared in float32):
`rel_l2` = ||ours - ref|| / ||ref||, `max_rel` = max|ours - ref| / max|ref|, `mean_rel` =
mean|ours - ref| / mean|ref|, plus task-level agreement (next-token argmax per position; mask
sign agreement and IoU of `logits > 0`). Expect bf16-level differences (rel_l2 around 1e-3 to
1e-2 per part; two bf16 implementations round at different points). Writes DIR/parity_gpu.json
after each part.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU

import numpy as np  # noqa: E402


def compare(ours, ref) -> dict:
  a = np.asarray(ours, np.float32)
  r = np.asarray(ref, np.float32)
  if a.shape != r.shape:
    raise ValueError(f"compare: shapes differ, ours {a.shape} vs reference {r.shape}")
  d = np.abs(a - r)
  return dict(shape=list(a.shape), finite=bool(np.isfinite(a).all()),
              rel_l2=float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-30)),
              max_rel=float(d.max() / max(np.abs(r).max(), 1e-30)),
              mean_rel=float(d.mean() / max(np.abs(r).mean(), 1e-30)),
              max_abs=float(d.max()), ref_max_abs=float(np.abs(r).max()))


def _t2np(t) -> np.ndarray:
  return t.detach().float().cpu().numpy()


class Record:
  def __init__(self, path, meta):
    self.path, self.data = path, dict(meta=meta)
    self.save()

  def set(self, key, value):
    self.data[key] = value
    self.save()
    print(f"{key}: {json.dumps(value, default=str)[:600]}", flush=True)

  def save(self):
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(self.path + ".tmp", self.path)


def _load_abstract(ctor, fill):
  """Build `ctor(rngs)` shape-only and let `fill(module)` load every parameter."""
  from flax import nnx
  module = nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))
  fill(module)
  return module


_DTYPE = {"name": "bfloat16"}


def _torch_dtype():
  import torch
  return getattr(torch, _DTYPE["name"])


def _jax_dtype():
  import jax.numpy as jnp
  return getattr(jnp, _DTYPE["name"])


def llama_part(cfg, dev, rec, seq_len, seed):
  import jax
  import jax.numpy as jnp
  import torch
  from eval import torch_reference as ref
  from models.llama.modeling import LlamaForCausalLM
  from models.llama.params import HF_LLAMA_TABLE
  from models.param_tables import load_state_dict

  t0 = time.perf_counter()
  hf = ref.build_llama(cfg, dev, _torch_dtype(), seed=seed)
  ours = _load_abstract(lambda r: LlamaForCausalLM(cfg, rngs=r),
                        lambda m: load_state_dict(m, hf.state_dict(), HF_LLAMA_TABLE))
  load_s = time.perf_counter() - t0
  ids = np.random.default_rng(seed).integers(3, cfg.vocab_size - 8, (1, seq_len))
  with torch.inference_mode():
    ref_logits = _t2np(hf(input_ids=torch.as_tensor(ids, device=dev)).logits)
  del hf
  gc.collect()
  if dev == "cuda":
    torch.cuda.empty_cache()

  @jax.jit
  def fwd(m, ids):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, _ = m(m.embed(ids), pos)
    return m.logits(hidden)
  logits = np.asarray(fwd(ours, jnp.asarray(ids, jnp.int32)), np.float32)
  res = compare(logits, ref_logits)
  res["argmax_agreement"] = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
  res["seq_len"], res["load_s"] = seq_len, load_s
  rec.set("llama_logits", res)
  del ours


def clip_part(cfg, dev, rec, clip_px, seed):
  import jax
  import jax.numpy as jnp
  import torch
  from eval import torch_reference as ref
  from models.clip.modeling import CLIPVisionModel
  from models.clip.params import HF_CLIP_VISION_TABLE
  from models.param_tables import load_state_dict

  hf = ref.build_clip(cfg, dev, _torch_dtype(), seed=seed)
  ours = _load_abstract(lambda r: CLIPVisionModel(cfg, rngs=r),
                        lambda m: load_state_dict(m, hf.state_dict(), HF_CLIP_VISION_TABLE))
  px = torch.as_tensor(clip_px.transpose(2, 0, 1)[None], device=dev).to(_torch_dtype())
  with torch.inference_mode():
    out = hf(pixel_values=px, output_hidden_states=True)
    ref_hidden = [_t2np(h) for h in out.hidden_states]
  del hf, out
  gc.collect()

  @jax.jit
  def run(m, p):
    return m(p).hidden_states, m.features(p, select_layer=-2)[0]
  hidden, feats = run(ours, jnp.asarray(clip_px[None], _jax_dtype()))
  per_layer = [compare(h, r) for h, r in zip(hidden, ref_hidden)]
  rec.set("clip", dict(
      hidden_states_worst_rel_l2=max(p["rel_l2"] for p in per_layer),
      hidden_states_worst_max_rel=max(p["max_rel"] for p in per_layer),
      hidden_states=per_layer,
      features_layer_m2=compare(feats, ref_hidden[-2][:, 1:]),
      num_hidden_states=[len(hidden), len(ref_hidden)]))
  del ours


def sam_part(cfg, dev, rec, sam_px, segs, seed):
  import jax
  import jax.numpy as jnp
  import torch
  from eval import torch_reference as ref
  from models.sam import Sam
  from models.sam import params as sam_params

  t = ref.build_sam(cfg, dev, _torch_dtype(), seed=seed)
  ours = _load_abstract(lambda r: Sam(cfg, rngs=r),
                        lambda m: sam_params.load_state_dict(m, t.state_dict(),
                                                             dtype=_jax_dtype()))
  px = torch.as_tensor(sam_px.transpose(2, 0, 1)[None], device=dev).to(_torch_dtype())
  text = np.random.default_rng(seed).normal(0, 0.5, (segs, cfg.prompt_encoder.embed_dim))
  text = text.astype(np.float32)
  with torch.inference_mode():
    ref_emb_t = t.image_encoder(px)
    tt = torch.as_tensor(text, device=dev).to(_torch_dtype())
    ref_masks = _t2np(ref.sam_decode_text_prompts(t, ref_emb_t, tt)[0])
    ref_emb = _t2np(ref_emb_t)                                    # [1,C,h,w]
  del t
  gc.collect()

  emb_fn = jax.jit(lambda m, p: m.embed_image(p))
  dec_fn = jax.jit(lambda m, e, x: m.decode_text_prompts(e, x)[0])
  emb = emb_fn(ours, jnp.asarray(sam_px[None], _jax_dtype()))      # [1,h,w,C]
  text_j = jnp.asarray(text, _jax_dtype())
  masks = np.asarray(dec_fn(ours, emb, text_j), np.float32)
  masks_on_ref = np.asarray(dec_fn(ours, jnp.asarray(ref_emb.transpose(0, 2, 3, 1),
                                                     _jax_dtype()), text_j), np.float32)

  def agreement(a, r):
    pa, pr = a > 0, r > 0
    inter, union = (pa & pr).sum(), (pa | pr).sum()
    return dict(sign_agreement=float((pa == pr).mean()),
                iou=float(inter / union) if union else 1.0)
  rec.set("sam", dict(
      image_embedding=compare(np.asarray(emb, np.float32).transpose(0, 3, 1, 2), ref_emb),
      mask_logits=dict(compare(masks, ref_masks), **agreement(masks, ref_masks)),
      mask_logits_on_reference_embedding=dict(compare(masks_on_ref, ref_masks),
                                              **agreement(masks_on_ref, ref_masks)),
      segs=segs))
  del ours


def photo(name: str, tiny: bool):
  """A scikit-image photo (falls back to a synthetic scene where scikit-image's data is absent)."""
  try:
    import skimage.data
    img = getattr(skimage.data, name)()
    source = f"skimage.data.{name}"
  except Exception as e:  # noqa: BLE001
    yy, xx = np.mgrid[0:300, 0:451]
    img = np.stack([(xx * 255 // 450), (yy * 255 // 299), ((xx + yy) % 256)], -1)
    img = img.astype(np.uint8)
    source = f"synthetic gradient ({type(e).__name__}: {e})"
  return img, source


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m eval.parity_gpu", description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
  p.add_argument("--seq-len", type=int, default=None, help="LLaMA sequence (default 640; tiny 24)")
  p.add_argument("--photo", default="chelsea")
  p.add_argument("--segs", type=int, default=4)
  p.add_argument("--parts", default="llama,clip,sam")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="both frameworks' weights and compute (float32: full-precision matmuls)")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)

  import jax
  import torch
  from eval import preprocess
  from eval import torch_reference as ref
  from models.clip.config import CLIPVisionConfig
  from models.llama.config import LlamaConfig
  from models.sam.config import SamConfig
  import jax.numpy as jnp

  ref.import_transformers()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  _DTYPE["name"] = a.dtype
  if a.dtype == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
  bf = _jax_dtype()
  if a.tiny:
    llama = LlamaConfig.tiny(dtype=bf, param_dtype=bf)
    clip = CLIPVisionConfig.tiny(dtype=bf, param_dtype=bf)
    sam = SamConfig.tiny()
  else:
    llama = LlamaConfig.vicuna_7b(dtype=bf, param_dtype=bf)
    clip = CLIPVisionConfig.clip_vit_l14_336(dtype=bf, param_dtype=bf)
    sam = SamConfig.vit_h()
  seq_len = a.seq_len or (24 if a.tiny else 640)
  img, source = photo(a.photo, a.tiny)
  clip_px = preprocess.clip_preprocess(img, size=clip.image_size)
  sam_px, resized = preprocess.sam_preprocess(img, size=sam.image_encoder.img_size)
  import transformers
  rec = Record(os.path.join(a.out, f"parity_gpu_{a.dtype}.json"), dict(
      date=time.strftime("%Y-%m-%d %H:%M:%S"), tiny=a.tiny, torch_device=dev,
      torch_device_name=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
      jax_device=str(jax.devices()[0]), jax=jax.__version__, torch=torch.__version__,
      transformers=transformers.__version__, dtype=a.dtype, photo=source,
      photo_shape=list(img.shape), sam_resized=list(resized), seq_len=seq_len))
  parts = a.parts.split(",")
  t0 = time.perf_counter()
  if "llama" in parts:
    llama_part(llama, dev, rec, seq_len, a.seed)
  if "clip" in parts:
    clip_part(clip, dev, rec, clip_px, a.seed + 1)
  if "sam" in parts:
    sam_part(sam, dev, rec, sam_px, a.segs, a.seed + 2)
  rec.set("wall_s", time.perf_counter() - t0)
  print(f"wrote {rec.path}")


if __name__ == "__main__":
  main()
