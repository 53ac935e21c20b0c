"""Imports `transformers` for parity tests despite conftest's torchvision stand-in.

The stand-in module has no `__spec__`, so transformers' availability probe
(`importlib.util.find_spec("torchvision")`) raises at import; declaring it available instead makes
transformers import real torchvision symbols. So the stand-in is hidden from `sys.modules` while
transformers is imported and its (lru-cached) probe runs, which records "torchvision unavailable",
and then put back for segment_anything.
"""

import sys


def import_transformers():
  """Returns the `transformers` module with the classes the parity tests use already imported."""
  hidden = {n: sys.modules.pop(n) for n in list(sys.modules)
            if n == "torchvision" or n.startswith("torchvision.")}
  try:
    import transformers
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    # Resolve the lazy attributes the tests use now, while the probe sees no torchvision.
    for name in ("LlamaConfig", "LlamaForCausalLM", "CLIPVisionConfig", "CLIPVisionModel",
                 "AddedToken", "LlamaTokenizer", "CLIPImageProcessorPil", "BertConfig",
                 "BertModel", "BertTokenizer", "AutoModel", "AutoTokenizer"):
      getattr(transformers, name)
  finally:
    sys.modules.update(hidden)
  return transformers
