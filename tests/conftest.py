"""Test set-up: 8 CPU devices, fp32 matmuls, offline hubs, and a torchvision stand-in.

The environment variables must be set before jax is imported anywhere, which is why they live at
the top of the conftest rather than in a fixture.
"""

import os
import sys
import types

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

import hypothesis  # noqa: E402

# Each new shape drawn by hypothesis costs a jit compile; keep the example counts CI-sized.
hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _install_torchvision_stand_in():
  """segment-anything imports torchvision for resize helpers only; no CPU torchvision exists here.

  The stand-in supplies exactly what `segment_anything` touches: `resize` (PIL bilinear, which is
  what torchvision does for a PIL image), `to_pil_image`, and box helpers for the automatic mask
  generator. It is installed only when the real package is missing.
  """
  try:
    import torchvision  # noqa: F401
    return
  except Exception:  # noqa: BLE001 - a broken CUDA torchvision also lands here
    pass
  import numpy as np
  from PIL import Image

  tv = types.ModuleType("torchvision")
  transforms = types.ModuleType("torchvision.transforms")
  functional = types.ModuleType("torchvision.transforms.functional")
  ops = types.ModuleType("torchvision.ops")
  boxes = types.ModuleType("torchvision.ops.boxes")

  def resize(img, size, *args, **kwargs):
    h, w = size
    return img.resize((w, h), Image.BILINEAR)

  def to_pil_image(arr, mode=None):
    return Image.fromarray(np.asarray(arr), mode=mode)

  def box_area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

  def batched_nms(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: batched_nms is not available")

  functional.resize = resize
  functional.to_pil_image = to_pil_image
  transforms.functional = functional
  boxes.box_area = box_area
  boxes.batched_nms = batched_nms
  ops.boxes = boxes
  tv.transforms = transforms
  tv.ops = ops
  for name, mod in [("torchvision", tv), ("torchvision.transforms", transforms),
                    ("torchvision.transforms.functional", functional),
                    ("torchvision.ops", ops), ("torchvision.ops.boxes", boxes)]:
    sys.modules[name] = mod


_install_torchvision_stand_in()


# --- Compiled programs are dropped after every test module ---------------------------------------
# Each XLA:CPU executable keeps its JIT-compiled code in memory mappings of its own. Kept alive by
# jit caches for the whole session, ~440 tests reach the kernel's limit on mappings per process
# (vm.max_map_count = 65,530; 18,000 were counted after 120 tests), and the next compile then
# crashes inside LLVM (the segfaults/aborts CI saw late in the suite, in whichever test compiled
# next). Clearing the caches after each module releases them; few programs are shared across files.
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  yield
  import gc
  jax.clear_caches()
  gc.collect()
