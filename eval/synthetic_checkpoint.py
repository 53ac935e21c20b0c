"""The trained synthetic GLaMM as a small, self-contained inference checkpoint.

A training workdir (eval/train_synthetic.py) holds Orbax checkpoints of parameters *and* AdamW
moments (3x the parameters) in fp32. For inference and for the repository we keep only the
parameters (and fixed buffers), in float16 (10 mantissa bits: the round trip changes the bf16-computed outputs far less
than bf16 itself does), in one compressed `params.npz` keyed by the dotted NNX parameter path,
next to `config.json` (GLaMMConfig + the training config it came from) and the tokenizer files:

  DIR/params.npz  DIR/config.json  DIR/tokenizer/{tokenizer.model, added_tokens.json, ...}

    python -m eval.synthetic_checkpoint --workdir RUN --out DIR     # export the latest step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.glamm.config import GLaMMConfig
from models.glamm.modeling import GLaMM

_TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                    "tokenizer_config.json")


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  out = {}
  # Every variable, not only nnx.Param: SAM's random Fourier matrix is a fixed buffer.
  pure = nnx.to_pure_dict(nnx.state(model))

  def walk(tree, prefix):
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        walk(v, prefix + (str(k),))
    else:
      out[".".join(prefix)] = np.asarray(jax.device_get(tree))
  walk(pure, ())
  return out


def export_model(model: GLaMM, tokenizer_dir: str, out_dir: str, *, train_config: dict | None,
                 step: int | None, dtype: str = "float16") -> str:
  """Writes `model`'s parameters (cast to `dtype`), its config and the tokenizer to `out_dir`,
  atomically (a temporary sibling directory renamed into place). Returns `out_dir`."""
  for name in _TOKENIZER_FILES:
    if not os.path.exists(os.path.join(tokenizer_dir, name)):
      raise FileNotFoundError(f"export_model: tokenizer file {name!r} missing in {tokenizer_dir}")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  os.chmod(tmp, 0o755)
  params = {k: v.astype(dtype) for k, v in _flat_params(model).items()}
  np.savez_compressed(os.path.join(tmp, "params.npz"), **params)
  meta = {"glamm": model.config.to_dict(), "train": train_config, "step": step,
          "param_dtype": dtype, "params": int(sum(v.size for v in params.values()))}
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(meta, f, indent=2)
  os.makedirs(os.path.join(tmp, "tokenizer"))
  for name in _TOKENIZER_FILES:
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, "tokenizer", name))
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


def export_workdir(workdir: str, out_dir: str, dtype: str = "float16") -> str:
  """Exports the latest checkpoint of a training workdir."""
  from eval.train_synthetic import (SyntheticTrainConfig, checkpoint_manager, init_state,
                                    restore_checkpoint)
  with open(os.path.join(workdir, "config.json")) as f:
    run_cfg = json.load(f)
  cfg = SyntheticTrainConfig.from_dict(run_cfg["train"])
  graphdef, state = init_state(cfg, run_cfg["vocab_size"])
  mngr = checkpoint_manager(workdir, cfg)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"export_workdir: no checkpoint under {workdir}/checkpoints")
  state, _ = restore_checkpoint(mngr, step, state)
  mngr.close()
  model = nnx.merge(graphdef, state)[0]
  return export_model(model, os.path.join(workdir, "tokenizer"), out_dir,
                      train_config=run_cfg["train"], step=step, dtype=dtype)


def load_model(directory: str, compute_dtype=jnp.float32, seed: int = 0):
  """(GLaMM with float32 parameters, tokenizer) from an exported directory.

  `compute_dtype` sets the activation dtype (float32 on the CPU; training used bfloat16).
  Every parameter must be present with its shape; problems are reported together.
  """
  from eval.tokenizer import load_tokenizer
  path = os.path.join(directory, "params.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"load_model: {path} not found (export with "
                            "`python -m eval.synthetic_checkpoint`)")
  with open(os.path.join(directory, "config.json")) as f:
    meta = json.load(f)
  cfg = GLaMMConfig.from_dict(meta["glamm"])
  cfg = GLaMMConfig(
      vision=_with_dtype(cfg.vision, compute_dtype), llm=_with_dtype(cfg.llm, compute_dtype),
      sam=cfg.sam, vision_select_layer=cfg.vision_select_layer)
  model = nnx.eval_shape(lambda: GLaMM(cfg, rngs=nnx.Rngs(seed)))
  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  errors: list[str] = []
  with np.load(path) as data:
    stored = set(data.files)
    needed = set()

    def fill(tree, prefix):
      for k in list(tree):
        key = ".".join(prefix + (str(k),))
        if isinstance(tree[k], Mapping):
          fill(tree[k], prefix + (str(k),))
          continue
        needed.add(key)
        if key not in stored:
          errors.append(f"missing {key}")
          continue
        value = data[key]
        if tuple(value.shape) != tuple(tree[k].shape):
          errors.append(f"{key}: stored shape {value.shape}, model needs {tuple(tree[k].shape)}")
          continue
        tree[k] = jnp.asarray(value, dtype=tree[k].dtype)
    fill(pure, ())
  errors += [f"unexpected {k}" for k in sorted(stored - needed)]
  if errors:
    raise ValueError(f"load_model: {directory} does not match its config:\n  " +
                     "\n  ".join(errors))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model, load_tokenizer(os.path.join(directory, "tokenizer"))


def _with_dtype(cfg, dtype):
  return dataclasses.replace(cfg, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m eval.synthetic_checkpoint",
                              description="Export a synthetic training run for inference.")
  p.add_argument("--workdir", required=True, help="eval.train_synthetic --workdir")
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default="float16", choices=("float16", "float32", "bfloat16"))
  a = p.parse_args(argv)
  out = export_workdir(a.workdir, a.out, a.dtype)
  size = os.path.getsize(os.path.join(out, "params.npz"))
  print(f"exported {a.workdir} -> {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
