"""Tests of the device SLIC, the host connectivity pass and the image -> keep-indices pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import ndimage
from skimage import color, data, measure, segmentation, transform, util

from altp_jax import altp, connectivity, connectivity_device, pipeline, slic_device, superpixels
from eval import superpixel_metrics as metrics


def _photo(size=64, name="astronaut"):
  img = transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True)
  return (img * 255).round().astype(np.uint8)


def _synthetic(size=96):
  """Flat-colour regions with straight, slanted and curved edges, and its region map."""
  yy, xx = np.mgrid[:size, :size]
  regions = ((xx + 0.6 * yy > size * 0.52).astype(int)
             + 2 * (((yy - 0.62 * size) ** 2 + (xx - 0.3 * size) ** 2) < (0.2 * size) ** 2)
             + 4 * ((xx > 0.73 * size) & (yy < 0.42 * size)))
  colours = np.random.RandomState(0).randint(0, 256, (8, 3))
  return colours[regions].astype(np.uint8), regions


def _random_batch(b, h, w, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (b, h, w, 3)).astype(np.uint8)


def test_lab_matches_skimage():
  rgb = np.random.RandomState(1).rand(500, 3).astype(np.float32)
  rgb[:4] = [[0, 0, 0], [1, 1, 1], [0.01, 0.02, 0.03], [1, 0, 0]]  # both branches of both curves
  got = np.asarray(slic_device.rgb_to_lab(jnp.asarray(rgb)))
  np.testing.assert_allclose(got, color.rgb2lab(rgb.astype(np.float64)), atol=2e-3)


@pytest.mark.parametrize("h,w,n", [(336, 336, 29), (336, 336, 100), (40, 64, 10), (17, 9, 3),
                                   (8, 8, 1000)])
def test_grid_matches_skimage(h, w, n):
  g = slic_device.slic_grid(h, w, n)
  _, sy, sx = util.regular_grid((1, h, w), n)
  want_y, want_x = np.arange(h)[sy], np.arange(w)[sx]
  np.testing.assert_array_equal(g.start_y + g.step_y * np.arange(g.ny), want_y)
  np.testing.assert_array_equal(g.start_x + g.step_x * np.arange(g.nx), want_x)
  assert slic_device.num_centres(h, w, n) == len(want_y) * len(want_x)


def test_gaussian_blur_matches_scipy():
  x = np.random.RandomState(2).rand(12, 20, 3).astype(np.float32)
  for sigma in (0.7, 2.0, 5.0):  # 5.0: kernel wider than the image (repeated reflection)
    got = np.asarray(jax.jit(slic_device._gaussian_blur, static_argnums=1)(jnp.asarray(x), sigma))
    want = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_shapes_range_and_determinism():
  images = _random_batch(3, 40, 52)
  n = 12
  g_max = slic_device.num_centres(40, 52, n)
  out = slic_device.slic(jnp.asarray(images), n_segments=n)
  assert out.shape == (3, 40, 52) and out.dtype == jnp.int32
  out = np.asarray(out)
  assert out.min() >= 0 and out.max() < g_max
  np.testing.assert_array_equal(out, np.asarray(slic_device.slic(jnp.asarray(images),
                                                                 n_segments=n)))
  # Unbatched input, float input in [0, 1], extra leading dims: same labels.
  np.testing.assert_array_equal(np.asarray(slic_device.slic(jnp.asarray(images[1]),
                                                            n_segments=n)), out[1])
  np.testing.assert_array_equal(
      np.asarray(slic_device.slic(jnp.asarray(images / 255.0, jnp.float32), n_segments=n)), out)
  np.testing.assert_array_equal(
      np.asarray(slic_device.slic(jnp.asarray(images.reshape(1, 3, 40, 52, 3)), n_segments=n)),
      out.reshape(1, 3, 40, 52))


def test_flat_regions_are_cut_along_true_edges():
  image, regions = _synthetic()
  for n in (16, 64):
    labels = np.asarray(slic_device.slic(jnp.asarray(image), n_segments=n))
    assert metrics.boundary_recall(labels, regions, tolerance=2) >= 0.95
    # And no superpixel straddles two regions.
    assert metrics.achievable_segmentation_accuracy(labels, regions) >= 0.99


def test_agrees_with_skimage_on_a_photo():
  """Without the connectivity pass, skimage and the device SLIC solve the same problem; the
  window is the only difference (radius=2 with skimage's box is nearly skimage's own window)."""
  image = _photo(96)
  ref = segmentation.slic(image, n_segments=50, start_label=0, enforce_connectivity=False)
  same = {}
  for radius in (1, 2):
    labels = np.asarray(slic_device.slic(jnp.asarray(image), n_segments=50, radius=radius))
    same[radius] = (labels == ref).mean()
    assert metrics.boundary_recall(labels, ref) >= 0.95
  assert same[2] >= 0.95, same
  assert same[1] >= 0.7, same


def test_empty_centres_keep_their_place():
  """Two colours and almost no spatial weight: most centres lose every pixel. Labels must stay
  in range and in use by at most the two colour clusters' winners, with no NaN fallout."""
  image = np.zeros((48, 48, 3), np.uint8)
  image[:, 24:] = 255
  labels = np.asarray(slic_device.slic(jnp.asarray(image), n_segments=36, compactness=1e-3))
  g_max = slic_device.num_centres(48, 48, 36)
  assert labels.min() >= 0 and labels.max() < g_max
  assert len(np.unique(labels)) < g_max  # some centres did end up empty
  # Every pixel on one side of the colour edge shares the other side's labels with nobody.
  assert not set(np.unique(labels[:, :24])) & set(np.unique(labels[:, 24:]))


def test_jit_equals_eager():
  images = jnp.asarray(_random_batch(2, 20, 24, seed=3))
  fn = lambda x: slic_device._slic_single(
      slic_device.rgb_to_lab(x.astype(jnp.float32) / 255.0),
      grid=slic_device.slic_grid(20, 24, 9), compactness=10.0, num_iterations=3, radius=1,
      window_box=True)
  jitted = np.asarray(jax.jit(jax.vmap(fn))(images))
  with jax.disable_jit():  # eager is slow: one image
    np.testing.assert_array_equal(np.asarray(fn(images[0])), jitted[0])
  # The public entry point (rescaling is the identity for these full-range images).
  np.testing.assert_array_equal(
      np.asarray(slic_device.slic(images, n_segments=9, num_iterations=3)), jitted)


def test_vmap_equals_loop():
  images = jnp.asarray(_random_batch(4, 32, 32, seed=4))
  fn = lambda x: slic_device.slic(x, n_segments=16, compactness=5.0)
  batched = np.asarray(jax.vmap(fn)(images))
  loop = np.stack([np.asarray(fn(x)) for x in images])
  np.testing.assert_array_equal(batched, loop)


def test_sharded_equals_unsharded():
  assert jax.device_count() >= 8
  images = _random_batch(8, 32, 40, seed=5)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded_in = jax.device_put(jnp.asarray(images), NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda x: slic_device.slic(x, n_segments=20),
               out_shardings=NamedSharding(mesh, P("data")))
  sharded = fn(sharded_in)
  assert len(sharded.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(sharded),
                                np.asarray(slic_device.slic(jnp.asarray(images), n_segments=20)))


def test_bad_arguments_raise():
  img = jnp.zeros((16, 16, 3), jnp.uint8)
  with pytest.raises(ValueError, match="channels"):
    slic_device.slic(jnp.zeros((16, 16, 2)), n_segments=4)
  with pytest.raises(ValueError, match="n_segments"):
    slic_device.slic(img, n_segments=0)
  with pytest.raises(ValueError, match="compactness"):
    slic_device.slic(img, n_segments=4, compactness=0.0)
  with pytest.raises(ValueError, match="radius"):
    slic_device.slic(img, n_segments=4, radius=0)


def test_host_connectivity_pass():
  labels = np.asarray(slic_device.slic(jnp.asarray(_photo(64, "coffee")), n_segments=30,
                                       compactness=2.0))
  g = slic_device.num_centres(64, 64, 30)
  fixed = connectivity.enforce_connectivity(labels, num_centres=g, max_segments=g)
  n = fixed.max() + 1
  assert n <= g and set(np.unique(fixed)) == set(range(n))
  min_size = int(0.5 * 64 * 64 / g)
  for i in range(n):
    region = fixed == i
    assert measure.label(region, connectivity=1).max() == 1  # one 4-connected piece
    assert region.sum() >= min_size
  # Batched call = per-image calls; a label map that is already fine passes unchanged.
  two = connectivity.enforce_connectivity(np.stack([labels, labels]), num_centres=g,
                                          max_segments=g)
  np.testing.assert_array_equal(two[1], fixed)
  np.testing.assert_array_equal(connectivity.enforce_connectivity(fixed, num_centres=g), fixed)


def test_pipeline_device_is_the_composition_of_its_parts():
  b, size, grid, k = 2, 48, (6, 6), 8
  images = _random_batch(b, size, size, seed=6)
  images[1] = _photo(size, "chelsea")
  scores = jax.random.uniform(jax.random.key(0), (b, 36))
  cfg = altp.ALTPConfig(density="score_mass")
  keep = pipeline.keep_indices(images, scores, k=k, grid=grid, config=cfg)
  assert keep.shape == (b, k)
  keep = np.asarray(keep)
  assert all(len(set(r)) == k and (np.diff(r) > 0).all() for r in keep)
  n_seg = cfg.n_segments(k)
  g_slic = slic_device.num_centres(size, size, n_seg)
  # Defaults: radius 2, then the device connectivity pass.
  labels = connectivity_device.enforce_connectivity_device(
      slic_device.slic(jnp.asarray(images), n_segments=n_seg, radius=2), num_centres=g_slic)
  g_max = connectivity_device.num_connected_segments(size, size, g_slic)
  assert pipeline.device_num_segments(size, size, n_seg) == g_max
  tok = superpixels.token_labels(labels, grid, g_max)
  want = altp.altp_select(scores, tok, k, config=cfg, num_segments=g_max)
  np.testing.assert_array_equal(keep, np.asarray(want))
  # Without the pass the id bound is the SLIC centre count.
  assert pipeline.device_num_segments(size, size, n_seg, connectivity=False) == g_slic
  # Host superpixels through the same front door give a valid selection too.
  host = np.asarray(pipeline.keep_indices(images, scores, k=k, grid=grid, config=cfg,
                                          superpixels="host"))
  assert host.shape == (b, k) and all((np.diff(r) > 0).all() for r in host)
  with pytest.raises(ValueError, match="superpixels"):
    pipeline.keep_indices(images, scores, k=k, grid=grid, config=cfg, superpixels="gpu")
