"""One-time conversion of released PyTorch checkpoints to Orbax, streaming one tensor at a time.

`python -m convert glamm --glamm DIR --clip DIR --out DIR` (convert/cli.py) writes a model
directory (layout: convert/writer.py); `convert.load_glamm(dir, mesh=None, shardings=None)`
restores it as a `models.glamm.GLaMM` with every array placed by its logical axis names.
"""


def load_glamm(model_dir, mesh=None, shardings=None, dtype=None):
  """See `convert.load.load_glamm` (imported lazily so the CLI starts fast)."""
  from convert.load import load_glamm as _load
  return _load(model_dir, mesh=mesh, shardings=shardings, dtype=dtype)
