"""Host SLIC wrapper, image validation, token labels and patch detail."""

import numpy as np
import pytest
import skimage.data

import altp_jax
from altp_jax import superpixels


def _photo(name="astronaut", size=336):
  from skimage.transform import resize
  img = getattr(skimage.data, name)()
  return (resize(img, (size, size), anti_aliasing=True) * 255).astype(np.uint8)


def test_slic_labels_contract_on_a_real_photo():
  img = _photo()
  labels = altp_jax.slic_labels(img, n_segments=60, max_segments=64)
  assert labels.shape == (336, 336) and labels.dtype == np.int32
  ids = np.unique(labels)
  np.testing.assert_array_equal(ids, np.arange(len(ids)))        # consecutive from 0
  assert 10 < len(ids) <= 64
  # Raster order of first appearance: the top-left pixel is superpixel 0.
  assert labels[0, 0] == 0
  np.testing.assert_array_equal(labels, altp_jax.slic_labels(img, n_segments=60,
                                                             max_segments=64))


def test_slic_labels_merges_down_to_max_segments():
  img = _photo("coffee")
  full = altp_jax.slic_labels(img, n_segments=100, max_segments=1000)
  capped = altp_jax.slic_labels(img, n_segments=100, max_segments=20)
  assert len(np.unique(full)) > 20 and len(np.unique(capped)) == 20


def test_image_modes():
  rgb = _photo("chelsea", 112)
  gray = _photo("camera", 112)
  assert altp_jax.slic_labels(gray, n_segments=10).shape == (112, 112)
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
  np.testing.assert_array_equal(altp_jax.slic_labels(rgba, n_segments=10),
                                altp_jax.slic_labels(rgb, n_segments=10))
  np.testing.assert_array_equal(altp_jax.slic_labels(rgb / 255.0, n_segments=10),
                                altp_jax.slic_labels(rgb, n_segments=10))
  with pytest.raises(ValueError, match="2 channels"):
    superpixels.as_rgb_float(np.zeros((8, 8, 2), np.uint8))
  with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
    superpixels.as_rgb_float(np.full((8, 8, 3), 3.0))
  with pytest.raises(ValueError, match="dtype int16"):
    superpixels.as_rgb_float(np.zeros((8, 8, 3), np.int16))
  with pytest.raises(ValueError, match="NaN"):
    superpixels.as_rgb_float(np.full((8, 8, 3), np.nan))


def _brute_majority(labels, grid, g):
  h, w = grid
  ph, pw = labels.shape[0] // h, labels.shape[1] // w
  out = []
  for ty in range(h):
    for tx in range(w):
      patch = labels[ty * ph:(ty + 1) * ph, tx * pw:(tx + 1) * pw].ravel()
      out.append(np.bincount(patch, minlength=g).argmax())   # argmax: smallest id on ties
  return np.array(out)


def test_token_labels_majority_and_center():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (2, 12, 18)).astype(np.int32)
  got = altp_jax.token_labels(labels, (4, 6), 5)
  assert got.shape == (2, 24)
  for b in range(2):
    np.testing.assert_array_equal(got[b], _brute_majority(labels[b], (4, 6), 5))
  center = altp_jax.token_labels(labels, (4, 6), 5, mode="center")
  np.testing.assert_array_equal(center[0], labels[0, 1::3, 1::3].ravel())


def test_token_labels_tie_goes_to_smallest_id():
  labels = np.array([[3, 1], [1, 3]], np.int32)          # one 2x2 patch, a 2-2 tie
  assert int(altp_jax.token_labels(labels, (1, 1), 4)[0]) == 1


def test_token_labels_errors():
  with pytest.raises(ValueError, match="does not split into a 5x5 token grid"):
    altp_jax.token_labels(np.zeros((12, 12), np.int32), (5, 5), 3)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    altp_jax.token_labels(np.full((12, 12), 3, np.int32), (4, 4), 3)


def test_patch_detail_is_high_on_edges():
  img = np.zeros((28, 28, 3), np.uint8)
  img[:, 14:] = 255                                       # one vertical edge between two tokens
  det = altp_jax.patch_detail(img, (2, 2)).reshape(2, 2)
  assert det.shape == (2, 2) and np.all(det > 0)
  flat = altp_jax.patch_detail(np.full((28, 28, 3), 90, np.uint8), (2, 2))
  np.testing.assert_allclose(flat, 0.0, atol=1e-7)


def test_device_patch_detail_equals_host_patch_detail():
  import jax.numpy as jnp
  from skimage import data
  from altp_jax.superpixels import patch_detail, patch_detail_device
  images = [data.astronaut()[:336, :336], data.coffee()[:336, 64:400]]
  batch = jnp.asarray(np.stack(images).astype(np.float32) / 255.0)
  got = np.asarray(patch_detail_device(batch, (24, 24)))
  for i, im in enumerate(images):
    want = patch_detail(im.astype(np.float32) / 255.0, (24, 24))
    np.testing.assert_allclose(got[i], want, atol=1e-6)
    assert want.max() > 0.05   # real edges, not an all-zero comparison
