"""One-time conversion of released PyTorch checkpoints to Orbax, streaming one tensor at a time.

`python -m convert glamm --glamm DIR --clip DIR --out DIR` (convert/cli.py) writes a model
directory (layout: convert/writer.py); `convert.load_glamm(dir, mesh=None, shardings=None)`
restores it as a `models.glamm.GLaMM` with every array placed by its logical axis names.
`python -m convert omg_llava ...` (convert/omg_llava.py) and `convert.load_omg_llava(dir, mesh=None)`
do the same for OMG-LLaVA (`models.omg_llava.modeling.OMGLLaVA`).
"""


def load_glamm(model_dir, mesh=None, shardings=None, dtype=None):
  """See `convert.load.load_glamm` (imported lazily so the CLI starts fast)."""
  from convert.load import load_glamm as _load
  return _load(model_dir, mesh=mesh, shardings=shardings, dtype=dtype)


def load_omg_llava(model_dir, mesh=None, shardings=None, dtype=None):
  """See `convert.load.load_omg_llava` (imported lazily so the CLI starts fast)."""
  from convert.load import load_omg_llava as _load
  return _load(model_dir, mesh=mesh, shardings=shardings, dtype=dtype)
