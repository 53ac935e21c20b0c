"""models/flat_state.py: a module passed to jit as (static FlatModelDef, list of arrays)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.flat_state import flatten_state, split_flat
from models.llama.config import LlamaConfig
from models.llama.modeling import LlamaForCausalLM


def _forward(m, ids):
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  hidden, _ = m(m.embed(ids), pos)
  return m.logits(hidden)


@functools.partial(jax.jit, static_argnames="fdef")
def _logits(fdef, leaves, ids):
  return _forward(fdef.merge(leaves), ids)


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits_nnx_state(graphdef, state, ids):   # the usual split/merge: the reference
  return _forward(nnx.merge(graphdef, state), ids)


def _llm(seed):
  return LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(seed))


def test_flat_call_equals_the_module_and_reuses_the_compiled_program():
  ids = jnp.array([[1, 5, 7, 2]])
  llm_a, llm_b = _llm(0), _llm(1)
  fa, la = split_flat(llm_a)
  fb, lb = split_flat(llm_b)
  assert fa == fb and hash(fa) == hash(fb)          # same structure -> same static argument
  assert all(isinstance(x, jax.Array) for x in la)
  before = _logits._cache_size()
  out_a = _logits(fa, la, ids)
  out_b = _logits(fb, lb, ids)
  assert _logits._cache_size() == before + 1        # one compile for both weight sets
  for m, out in ((llm_a, out_a), (llm_b, out_b)):
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(_logits_nnx_state(*nnx.split(m), ids)))
  assert not np.allclose(np.asarray(out_a), np.asarray(out_b))


def test_flatten_state_round_trip_and_leaf_count_error():
  gd, st = nnx.split(_llm(0))
  fdef, leaves = flatten_state(gd, st)
  back = fdef.state(leaves)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(st)):
    assert x is y
  with pytest.raises(ValueError, match="state arrays"):
    fdef.merge(leaves[:-1])
