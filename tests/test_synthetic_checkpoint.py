"""Export of a synthetic training run to the small inference checkpoint, and loading it back."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import scenes
from eval.synthetic_checkpoint import export_workdir, load_model
from eval.train_synthetic import SyntheticTrainConfig, train


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("synckpt")
  data = str(root / "data")
  scenes.write_dataset(data, {"train": 4, "val": 2}, seed=3, progress=False)
  cfg = SyntheticTrainConfig.micro(steps=2, warmup_steps=1, eval_every=0, ckpt_every=2)
  result = train(cfg, data, str(root / "run"), plot=False, verbose=False)
  out = export_workdir(str(root / "run"), str(root / "export"))
  return result, out


def test_round_trip_restores_every_parameter(exported):
  result, out = exported
  trained = nnx.merge(result["graphdef"], result["state"])[0]
  model, tokenizer = load_model(out)
  # Every variable: parameters and fixed buffers (SAM's Fourier matrix).
  want = jax.tree.leaves(nnx.state(trained))
  got = jax.tree.leaves(nnx.state(model))
  assert len(want) == len(got) > 10
  for w, g in zip(want, got):
    assert g.dtype == jnp.float32 and g.shape == w.shape
    # float16 storage: relative error <= 2^-11 of each value.
    np.testing.assert_allclose(np.asarray(g), np.asarray(w, np.float32), rtol=2 ** -10, atol=1e-7)
  meta = json.load(open(os.path.join(out, "config.json")))
  assert meta["step"] == 2 and meta["train"]["steps"] == 2
  assert len(tokenizer) == model.config.llm.vocab_size


def test_load_names_missing_and_misshapen_parameters(exported, tmp_path):
  _, out = exported
  with np.load(os.path.join(out, "params.npz")) as d:
    params = {k: d[k] for k in d.files}
  dropped = sorted(params)[0]
  del params[dropped]
  bent = sorted(params)[-1]
  params[bent] = np.zeros((3, 1), np.float16)
  bad = tmp_path / "bad"
  os.makedirs(bad)
  np.savez(bad / "params.npz", **params)
  for name in ("config.json",):
    open(bad / name, "w").write(open(os.path.join(out, name)).read())
  os.symlink(os.path.join(out, "tokenizer"), bad / "tokenizer")
  with pytest.raises(ValueError) as e:
    load_model(str(bad))
  assert f"missing {dropped}" in str(e.value) and bent in str(e.value)
