"""Trains a small GLaMM-architecture model end to end on the synthetic scenes (eval/scenes.py).

The model is the repository's `models.glamm.GLaMM` module at small sizes (`SyntheticTrainConfig`):
a CLIP-style ViT at 336 with patch 14, so the LLM sees the same 24x24 = 576 visual tokens as
GLaMM-7B; a small LLaMA; a small SAM (256x256 input, 16x16 image embedding, 64x64 low-res masks).
Everything is trained from scratch with GLaMM's losses (eval/glamm_losses.py): next-token CE over
the answer tokens + BCE and Dice on the mask of every [SEG] token, decoded from the LLM's final
hidden state at the token before the [SEG] and upsampled to the image size by SAM's
post-processing, as GLaMM's `model_forward` does.

Optimiser: optax AdamW (betas 0.9 / 0.95 and lr 3e-4 as GLaMM's train.py; decay on matrices only)
after global-norm clipping, linear warmup then cosine decay. One jit-compiled step updates the
state `nnx.split((model, optimizer))`.

Workdir layout (everything needed to resume, evaluate or export the model):
  config.json     SyntheticTrainConfig + the GLaMMConfig it implies + parameter count
  tokenizer/      copy of the data's tokenizer (the model's vocabulary)
  checkpoints/    Orbax CheckpointManager: step N = N optimiser updates done
  log.jsonl       {"kind": "train", "step", "loss", "ce", "bce", "dice", "lr", "grad_norm", ...}
                  and {"kind": "val", "step", "loss", ..., "token_acc", "mask_iou"} lines
  curves.png      the loss / metric curves

A run restarted on the same workdir restores the latest checkpoint and continues from its step
with the same batches (eval/synthetic_data.py: batches are a function of (seed, step)); log lines
past that step (written before the interruption) are dropped.

  python -m eval.train_synthetic --data DIR --workdir W --preset small      # GPU
  python -m eval.train_synthetic --data DIR --workdir W --preset micro      # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from eval.glamm_losses import mask_iou, mask_losses, token_cross_entropy
from eval.synthetic_data import (SyntheticGCGData, clip_normalize, prefetch_batches,
                                 sam_normalize)
from eval.tokenizer import load_tokenizer
from models.clip.config import CLIPVisionConfig
from models.glamm.config import GLaMMConfig
from models.glamm.modeling import GLaMM
from models.llama.config import LlamaConfig
from models.sam.config import (SamConfig, SamImageEncoderConfig, SamMaskDecoderConfig,
                               SamPromptEncoderConfig)

_TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                    "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class SyntheticTrainConfig:
  """Model sizes, data shapes, optimisation and bookkeeping of one training run."""
  # CLIP-style ViT (the LLM sees (image_size / patch_size)^2 tokens; 336/14 -> 576 like GLaMM).
  image_size: int = 336
  patch_size: int = 14
  vit_width: int = 192
  vit_layers: int = 4            # features from hidden_states[-2]: 3 layers run
  vit_heads: int = 3
  vit_mlp: int = 768
  # LLaMA.
  llm_width: int = 256
  llm_layers: int = 4
  llm_heads: int = 4
  llm_mlp: int = 704
  # SAM (seg_dim = image-encoder out_chans = prompt width = decoder width = text_hidden_fcs out).
  sam_image_size: int = 256
  sam_patch: int = 16
  sam_width: int = 128
  sam_depth: int = 4
  sam_heads: int = 4
  sam_window: int = 8
  sam_global_attn: tuple[int, ...] = (1, 3)
  seg_dim: int = 128
  sam_decoder_mlp: int = 512
  sam_decoder_heads: int = 4
  sam_decoder_depth: int = 2
  compute_dtype: str = "bfloat16"   # CLIP/projectors/LLM activations; parameters stay float32
  fast_compile: bool = False        # XLA without backend optimisation (CPU smoke runs, tests)
  # Data.
  max_masks: int = 6
  max_answer_tokens: int = 112
  # Optimisation.
  batch_size: int = 32
  steps: int = 20000
  warmup_steps: int = 500
  peak_lr: float = 3e-4
  end_lr_ratio: float = 0.01
  weight_decay: float = 0.01
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  grad_clip: float = 1.0
  ce_weight: float = 1.0
  bce_weight: float = 2.0
  dice_weight: float = 0.5
  seed: int = 0
  # Bookkeeping (eval_every 0: no validation).
  log_every: int = 20
  eval_every: int = 500
  eval_examples: int = 128
  ckpt_every: int = 500
  keep_checkpoints: int = 3
  data_workers: int = 8

  def __post_init__(self):
    if self.llm_width % self.llm_heads:
      raise ValueError(f"SyntheticTrainConfig: llm_width {self.llm_width} is not a multiple of "
                       f"llm_heads {self.llm_heads}")
    if self.sam_image_size % self.sam_patch:
      raise ValueError(f"SyntheticTrainConfig: sam_image_size {self.sam_image_size} is not a "
                       f"multiple of sam_patch {self.sam_patch}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"SyntheticTrainConfig: warmup_steps {self.warmup_steps} must be in "
                       f"[0, steps={self.steps})")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"SyntheticTrainConfig: compute_dtype {self.compute_dtype!r} must be "
                       "'float32' or 'bfloat16'")

  @classmethod
  def small(cls, **overrides) -> "SyntheticTrainConfig":
    """The GPU configuration (the field defaults): about 7 M parameters."""
    return cls(**overrides)

  @classmethod
  def micro(cls, **overrides) -> "SyntheticTrainConfig":
    """A seconds-per-step CPU configuration (4x4 visual tokens, 96x96 SAM) for tests/smoke runs."""
    base = dict(image_size=56, vit_width=32, vit_layers=2, vit_heads=2, vit_mlp=64,
                llm_width=32, llm_layers=1, llm_heads=2, llm_mlp=64,
                sam_image_size=96, sam_width=32, sam_depth=1, sam_heads=2, sam_window=4,
                sam_global_attn=(0,), seg_dim=16, sam_decoder_mlp=32, sam_decoder_heads=2,
                sam_decoder_depth=1,
                compute_dtype="float32", fast_compile=True, batch_size=2, steps=30, warmup_steps=3, peak_lr=3e-3,
                log_every=1, eval_every=10, eval_examples=2, ckpt_every=10, data_workers=0)
    return cls(**{**base, **overrides})

  def glamm_config(self, vocab_size: int) -> GLaMMConfig:
    """The GLaMMConfig of this run for a tokenizer of `vocab_size` ids (pieces + added tokens)."""
    dt = jnp.dtype(self.compute_dtype)
    grid = self.sam_image_size // self.sam_patch
    return GLaMMConfig(
        vision=CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size,
                                hidden_size=self.vit_width, intermediate_size=self.vit_mlp,
                                num_layers=self.vit_layers, num_heads=self.vit_heads,
                                dtype=dt, param_dtype=jnp.float32),
        llm=LlamaConfig(vocab_size=vocab_size, hidden_size=self.llm_width,
                        num_layers=self.llm_layers, num_heads=self.llm_heads,
                        num_kv_heads=self.llm_heads, head_dim=self.llm_width // self.llm_heads,
                        intermediate_size=self.llm_mlp, max_position_embeddings=2048,
                        dtype=dt, param_dtype=jnp.float32),
        sam=SamConfig(
            image_encoder=SamImageEncoderConfig(
                img_size=self.sam_image_size, patch_size=self.sam_patch, embed_dim=self.sam_width,
                depth=self.sam_depth, num_heads=self.sam_heads, out_chans=self.seg_dim,
                window_size=self.sam_window, global_attn_indexes=tuple(self.sam_global_attn),
                # Training differentiates SAM's attention: keep the explicit einsum path, whose
                # backward is the one the recorded runs used (the fused paths are for inference).
                attention_impl="einsum"),
            prompt_encoder=SamPromptEncoderConfig(
                embed_dim=self.seg_dim, image_embedding_size=(grid, grid),
                input_image_size=(self.sam_image_size, self.sam_image_size)),
            mask_decoder=SamMaskDecoderConfig(
                transformer_dim=self.seg_dim, transformer_depth=self.sam_decoder_depth,
                transformer_num_heads=self.sam_decoder_heads,
                transformer_mlp_dim=self.sam_decoder_mlp, iou_head_hidden_dim=self.seg_dim)))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["sam_global_attn"] = list(self.sam_global_attn)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "SyntheticTrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"SyntheticTrainConfig.from_dict: unknown fields {unknown}")
    d = dict(d)
    if "sam_global_attn" in d:
      d["sam_global_attn"] = tuple(d["sam_global_attn"])
    return cls(**d)


PRESETS = {"small": SyntheticTrainConfig.small, "micro": SyntheticTrainConfig.micro}


# ------------------------------------------------------------------------------------------------
# Model, optimiser, step.


def lr_schedule(cfg: SyntheticTrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.peak_lr * cfg.end_lr_ratio)


@functools.lru_cache(maxsize=None)
def make_tx(cfg: SyntheticTrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decoupled weight decay on matrices only).

  Written out as `optax.adamw`'s own chain (scale_by_adam, add_decayed_weights,
  scale_by_learning_rate) with the Adam moments kept on one flat vector (`optax.flatten`): the
  same arithmetic, but a few ops instead of a dozen per parameter array, which cuts the step's
  compile time several-fold. Cached per config: the transformation is part of the optimiser's
  graphdef, so the same object keeps the jitted step's compile cache warm across restarts.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.flatten(optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                                optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2))),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr_schedule(cfg)))


@functools.lru_cache(maxsize=None)
def _initializer(cfg: SyntheticTrainConfig, vocab_size: int):
  @nnx.jit
  def create():
    # The RBG generator: a threefry initialisation of every array compiles several times slower.
    key = jax.random.key(cfg.seed, impl="rbg")
    model = GLaMM(cfg.glamm_config(vocab_size), rngs=nnx.Rngs(key))
    return model, nnx.Optimizer(model, make_tx(cfg), wrt=nnx.Param)
  return create


def init_state(cfg: SyntheticTrainConfig, vocab_size: int):
  """(graphdef, state) of (model, optimizer), initialised from cfg.seed. The initialisation is
  one compiled program: run eagerly, its thousands of small ops take tens of seconds on a CPU."""
  return nnx.split(_initializer(cfg, vocab_size)())


def param_count(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


@dataclasses.dataclass(frozen=True)
class StepStatics:
  """The static (hashable) arguments of the jitted steps."""
  ce_weight: float
  bce_weight: float
  dice_weight: float
  sam_input_size: tuple[int, int]
  image_size: tuple[int, int]


def compute_losses(model: GLaMM, batch: dict, st: StepStatics) -> tuple[jax.Array, dict]:
  """GLaMM's training loss of one batch (see eval/synthetic_data.py for the arrays)."""
  clip_pixels = clip_normalize(batch["clip_image"]).astype(model.config.vision.dtype)
  logits, hidden = model.forward(batch["input_ids"], batch["visual_mask"], clip_pixels)
  ce = token_cross_entropy(logits, batch["targets"], batch["loss_weight"])
  seg_hidden = jnp.take_along_axis(hidden, batch["seg_index"][..., None], axis=1)   # [B,K,D]
  sam_pixels = sam_normalize(batch["sam_image"], st.sam_input_size)
  low_res = model.decode_masks(seg_hidden, model.sam_embed(sam_pixels))             # [B,K,4h,4w]
  mask_logits = model.postprocess_masks(low_res, st.sam_input_size, st.image_size)  # [B,K,H,W]
  bce, dice = mask_losses(mask_logits, batch["masks"], batch["seg_valid"])
  loss = st.ce_weight * ce + st.bce_weight * bce + st.dice_weight * dice
  w = batch["loss_weight"]
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * w
  valid = batch["seg_valid"].astype(jnp.float32)
  aux = {"loss": loss, "ce": ce, "bce": bce, "dice": dice,
         "token_correct": jnp.sum(correct), "tokens": jnp.sum(w),
         "iou_sum": jnp.sum(mask_iou(mask_logits, batch["masks"]) * valid),
         "masks": jnp.sum(valid)}
  return loss, aux


def _train_step(graphdef, state, batch, st: StepStatics):
  """One AdamW update: (state, batch) -> (new state, metrics)."""
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(compute_losses, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (_, aux), grads = grad_fn(model, batch, st)
  optimizer.update(model, grads)
  aux["grad_norm"] = jnp.linalg.norm(jax.flatten_util.ravel_pytree(grads)[0])
  return nnx.state((model, optimizer)), aux


def _eval_step(graphdef, state, batch, st: StepStatics):
  model, _ = nnx.merge(graphdef, state)
  _, aux = compute_losses(model, batch, st)
  return aux


# Backend optimisation off: the micro model's step compiles about 2x faster on a CPU and runs
# in well under a second either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_STEPS = {
    (fast, name): jax.jit(fn, static_argnums=(0, 3),
                          donate_argnums=(1,) if name == "train" else (),
                          compiler_options=_FAST_COMPILE if fast else None)
    for fast in (False, True) for name, fn in (("train", _train_step), ("eval", _eval_step))}


def train_step(graphdef, state, batch, st: StepStatics, fast_compile: bool = False):
  """Jitted `_train_step`; the state argument is donated."""
  return _STEPS[(fast_compile, "train")](graphdef, state, batch, st)


def eval_step(graphdef, state, batch, st: StepStatics, fast_compile: bool = False):
  """Jitted teacher-forced losses and metric sums of one batch."""
  return _STEPS[(fast_compile, "eval")](graphdef, state, batch, st)


def evaluate(graphdef, state, data: SyntheticGCGData, cfg: SyntheticTrainConfig,
             st: StepStatics) -> dict:
  """Teacher-forced metrics on the first `eval_examples` examples (whole batches) of `data`."""
  n = max(cfg.batch_size, (min(cfg.eval_examples, len(data)) // cfg.batch_size) * cfg.batch_size)
  sums: dict[str, float] = {}
  batches = 0
  for start in range(0, n, cfg.batch_size):
    idx = [(start + i) % len(data) for i in range(cfg.batch_size)]
    aux = jax.device_get(eval_step(graphdef, state, data.batch(idx), st, cfg.fast_compile))
    batches += 1
    for k, v in aux.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {"loss": sums["loss"] / batches, "ce": sums["ce"] / batches,
          "bce": sums["bce"] / batches, "dice": sums["dice"] / batches,
          "token_acc": sums["token_correct"] / max(sums["tokens"], 1.0),
          "mask_iou": sums["iou_sum"] / max(sums["masks"], 1.0)}


# ------------------------------------------------------------------------------------------------
# Checkpoints, log, curves.


def checkpoint_manager(workdir: str, cfg: SyntheticTrainConfig) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, state):
  """Fills `state` (same structure) from checkpoint `step`; returns (state, meta)."""
  target = nnx.to_pure_dict(state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  nnx.replace_by_pure_dict(state, restored["state"])
  return state, restored["meta"]


def read_log(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: str, step: int) -> None:
  """Drops log lines past `step` (written after the checkpoint a resumed run starts from)."""
  rows = [r for r in read_log(path) if r["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def plot_curves(log_path: str, png_path: str) -> None:
  """Train loss components (log scale) and validation metrics against the step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_log(log_path)
  train = [r for r in rows if r["kind"] == "train"]
  val = [r for r in rows if r["kind"] == "val"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key in ("loss", "ce", "bce", "dice"):
    if train:
      axes[0].plot([r["step"] for r in train], [r[key] for r in train], label=f"train {key}")
    if val:
      axes[0].plot([r["step"] for r in val], [r[key] for r in val], "o--", label=f"val {key}")
  axes[0].set_yscale("log")
  axes[0].set_title("GLaMM losses (total = CE + 2 BCE + 0.5 Dice)")
  for key in ("token_acc", "mask_iou"):
    if val:
      axes[1].plot([r["step"] for r in val], [r[key] for r in val], "o-", label=f"val {key}")
  axes[1].set_ylim(0, 1)
  axes[1].set_title("teacher-forced validation metrics")
  if train:
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train], label="lr")
  axes[2].set_title("learning rate")
  for ax in axes:
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, png_path)


# ------------------------------------------------------------------------------------------------
# The loop.


def _prepare_workdir(workdir: str, data_root: str, cfg: SyntheticTrainConfig, vocab: int,
                     glamm_cfg: GLaMMConfig) -> None:
  os.makedirs(workdir, exist_ok=True)
  tok_dir = os.path.join(workdir, "tokenizer")
  os.makedirs(tok_dir, exist_ok=True)
  for name in _TOKENIZER_FILES:
    src = os.path.join(data_root, "tokenizer", name)
    dst = os.path.join(tok_dir, name)
    if os.path.exists(dst):
      with open(src, "rb") as a, open(dst, "rb") as b:
        if a.read() != b.read():
          raise ValueError(f"train_synthetic: {dst} differs from the data's {src}: this workdir "
                           "was trained with another tokenizer")
    else:
      shutil.copyfile(src, dst)
  path = os.path.join(workdir, "config.json")
  config = {"train": cfg.to_dict(), "glamm": glamm_cfg.to_dict(), "vocab_size": vocab,
            "data": os.path.abspath(data_root)}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("train") != config["train"]:
      diff = sorted(k for k in config["train"] if old.get("train", {}).get(k) != config["train"][k])
      raise ValueError(f"train_synthetic: {path} holds another configuration (differs in {diff});"
                       " use a new --workdir")
  else:
    with open(path + ".tmp", "w") as f:
      json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)


def train(cfg: SyntheticTrainConfig, data_root: str, workdir: str, *,
          stop_after: int | None = None, time_limit_s: float | None = None, plot: bool = True,
          verbose: bool = True) -> dict:
  """Trains (or resumes) to `cfg.steps`, or stops after step `stop_after` (an interruption), or
  at the first step that ends `time_limit_s` seconds after the start (checkpointed, so a later
  call continues; this fits a long run into time-limited sessions).

  Returns {"step", "state", "graphdef", "last_train", "last_val", "params"}.
  """
  tokenizer = load_tokenizer(os.path.join(data_root, "tokenizer"))
  vocab = len(tokenizer)
  glamm_cfg = cfg.glamm_config(vocab)
  _prepare_workdir(workdir, data_root, cfg, vocab, glamm_cfg)
  kw = dict(clip_size=cfg.image_size, sam_size=cfg.sam_image_size,
            num_visual_tokens=glamm_cfg.num_visual_tokens, max_masks=cfg.max_masks,
            max_answer_tokens=cfg.max_answer_tokens)
  train_data = SyntheticGCGData(data_root, "train", tokenizer, **kw)
  val_data = SyntheticGCGData(data_root, "val", tokenizer, **kw) if cfg.eval_every else None
  st = StepStatics(cfg.ce_weight, cfg.bce_weight, cfg.dice_weight, train_data.sam_input_size(),
                   train_data.image_hw)

  graphdef, state = init_state(cfg, vocab)
  mngr = checkpoint_manager(workdir, cfg)
  log_path = os.path.join(workdir, "log.jsonl")
  start = mngr.latest_step() or 0
  if start:
    state, meta = restore_checkpoint(mngr, start, state)
    if meta.get("step") != start:
      raise ValueError(f"train_synthetic: checkpoint {start} records step {meta.get('step')}")
    truncate_log(log_path, start)
    if verbose:
      print(f"resumed from step {start}", file=sys.stderr)
  elif os.path.exists(log_path):
    truncate_log(log_path, 0)
  n_params = param_count(nnx.merge(graphdef, state)[0])
  if verbose:
    print(f"GLaMM-synthetic: {n_params / 1e6:.2f} M parameters, {glamm_cfg.num_visual_tokens} "
          f"visual tokens, sequence {train_data.seq_len}, vocab {vocab}", file=sys.stderr)

  end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  schedule = lr_schedule(cfg)
  last_train, last_val = None, None
  t0, seen = time.time(), 0
  final = start
  with open(log_path, "a") as log:
    def write(row):
      log.write(json.dumps(row) + "\n")
      log.flush()

    for step, batch in prefetch_batches(train_data, cfg.batch_size, start, end, cfg.seed,
                                        workers=cfg.data_workers,
                                        tokenizer_dir=os.path.join(data_root, "tokenizer")):
      state, aux = train_step(graphdef, state, batch, st, cfg.fast_compile)
      done = final = step + 1
      out_of_time = time_limit_s is not None and time.time() - t0 >= time_limit_s
      seen += cfg.batch_size
      if done % cfg.log_every == 0 or done == end or out_of_time:
        aux = jax.device_get(aux)
        elapsed = time.time() - t0
        last_train = {"kind": "train", "step": done, "loss": float(aux["loss"]),
                      "ce": float(aux["ce"]), "bce": float(aux["bce"]),
                      "dice": float(aux["dice"]), "grad_norm": float(aux["grad_norm"]),
                      "token_acc": float(aux["token_correct"]) / max(float(aux["tokens"]), 1.0),
                      "mask_iou": float(aux["iou_sum"]) / max(float(aux["masks"]), 1.0),
                      "lr": float(schedule(step)), "examples_per_s": seen / max(elapsed, 1e-9),
                      "time": time.time(), "session": t0}
        if not all(math.isfinite(last_train[k]) for k in ("loss", "grad_norm")):
          raise FloatingPointError(f"train_synthetic: non-finite loss at step {done}: {last_train}")
        write(last_train)
        if verbose:
          print(f"step {done}: loss {last_train['loss']:.4f} ce {last_train['ce']:.4f} "
                f"bce {last_train['bce']:.4f} dice {last_train['dice']:.4f}", file=sys.stderr)
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
        last_val = {"kind": "val", "step": done, **evaluate(graphdef, state, val_data, cfg, st)}
        write(last_val)
      if done % cfg.ckpt_every == 0 or done == end or out_of_time:
        save_checkpoint(mngr, done, state, {"step": done, "params": n_params})
        if plot:
          plot_curves(log_path, os.path.join(workdir, "curves.png"))
      if out_of_time:
        if verbose:
          print(f"time limit {time_limit_s} s reached after step {done}", file=sys.stderr)
        break
  mngr.close()
  return {"step": final, "state": state, "graphdef": graphdef, "last_train": last_train,
          "last_val": last_val, "params": n_params}


def _override(cfg: SyntheticTrainConfig, items: Sequence[str]) -> SyntheticTrainConfig:
  """`key=value` overrides, parsed with the field's current type, applied together (so that e.g.
  `steps` and `warmup_steps` are validated as a pair)."""
  changes: dict[str, Any] = {}
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in fields:
      raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    cur = getattr(cfg, key)
    if isinstance(cur, tuple):
      changes[key] = tuple(int(v) for v in value.split(",") if v)
    elif isinstance(cur, bool):
      changes[key] = value.lower() in ("1", "true", "yes")
    else:
      changes[key] = type(cur)(value)
  return type(cfg).from_dict({**cfg.to_dict(), **changes})


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Train a small GLaMM on the synthetic scenes.")
  p.add_argument("--data", required=True, help="python -m eval.scenes --out directory")
  p.add_argument("--workdir", required=True)
  p.add_argument("--preset", choices=sorted(PRESETS), default="small")
  p.add_argument("--steps", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  p.add_argument("--stop-after", type=int, help="stop after this step (as if interrupted)")
  p.add_argument("--time-limit", type=float, help="checkpoint and stop after this many seconds")
  p.add_argument("--no-plot", action="store_true")
  a = p.parse_args(argv)
  items = list(a.set)
  if a.steps is not None:
    items.append(f"steps={a.steps}")
  if a.batch_size is not None:
    items.append(f"batch_size={a.batch_size}")
  cfg = _override(PRESETS[a.preset](), items)
  out = train(cfg, a.data, a.workdir, stop_after=a.stop_after, time_limit_s=a.time_limit,
              plot=not a.no_plot)
  print(json.dumps({"step": out["step"], "last_train": out["last_train"],
                    "last_val": out["last_val"]}))


if __name__ == "__main__":
  main()
