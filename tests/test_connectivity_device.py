"""Tests of the device connectivity pass (`altp_jax.connectivity_device`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from skimage import measure
from skimage.segmentation._slic import _enforce_label_connectivity_cython

from altp_jax import connectivity_device as cd
from altp_jax import slic_device
from eval import superpixel_metrics as metrics


def _first_pixel_roots(labels):
  """Reference components: skimage's 4-connected labelling, named by each piece's first pixel."""
  comp = measure.label(labels, connectivity=1, background=-1)
  flat = comp.ravel()
  first = np.full(flat.max() + 1, flat.size)
  np.minimum.at(first, flat, np.arange(flat.size))
  return first[comp]


def _reference(labels, num_centres, min_size_factor=0.5):
  """The documented rule, sequentially in NumPy: pieces in raster order of their first pixel;
  a small piece joins, among its pixels that touch an earlier piece, the one farthest (Manhattan)
  from its first pixel, then the last in raster order, and of that pixel's earlier neighbours
  the one above, else below, else left, else right."""
  h, w = labels.shape
  min_size = int(min_size_factor * h * w / num_centres)
  root = _first_pixel_roots(labels)
  out = np.full((h, w), -1)
  new_id = 0
  for r in np.unique(root):  # ascending = raster order of first pixels
    piece = root == r
    if piece.sum() >= min_size:
      out[piece] = new_id
      new_id += 1
      continue
    ry, rx = divmod(int(r), w)
    best, target = None, new_id  # nothing earlier next door: the next new id (skimage)
    for y, x in zip(*np.nonzero(piece)):
      for prio, (dy, dx) in enumerate(((0, 1), (0, -1), (1, 0), (-1, 0))):
        yy, xx = y + dy, x + dx
        if 0 <= yy < h and 0 <= xx < w and root[yy, xx] < r:
          key = (abs(y - ry) + abs(x - rx), y * w + x, prio)
          if best is None or key > best:
            best, target = key, out[yy, xx]
    out[piece] = target
  return out


def _random_blocks(seed, h=20, w=24, n=5, block=2):
  """Blocky random labels: many pieces of many sizes, holes and enclosed islands."""
  rng = np.random.RandomState(seed)
  small = rng.randint(0, n, (-(-h // block), -(-w // block)))
  return np.kron(small, np.ones((block, block), int))[:h, :w].astype(np.int32)


def test_connected_components_on_hand_made_grids():
  grid = np.array([[0, 0, 1, 1, 0],
                   [1, 0, 1, 0, 0],
                   [1, 1, 1, 0, 2],
                   [0, 0, 1, 2, 2],
                   [0, 1, 1, 2, 0]], np.int32)
  want = np.array([[0, 0, 2, 2, 4],
                   [2, 0, 2, 4, 4],
                   [2, 2, 2, 4, 14],
                   [15, 15, 2, 14, 14],
                   [15, 2, 2, 14, 24]])
  np.testing.assert_array_equal(np.asarray(cd.connected_components(jnp.asarray(grid))), want)
  # Two interleaved spirals: each one piece, with long paths from their ends to their first pixels.
  spiral = np.ones((9, 9), np.int32)
  spiral[1, 1:8] = spiral[1:8, 7] = spiral[7, 1:8] = spiral[3:8, 1] = 0
  spiral[3, 1:6] = spiral[3:6, 5] = spiral[5, 3:6] = 0
  np.testing.assert_array_equal(np.asarray(cd.connected_components(jnp.asarray(spiral))),
                                _first_pixel_roots(spiral))
  assert len(np.unique(np.asarray(cd.connected_components(jnp.asarray(spiral))))) == 2
  # Diagonal contact does not connect (4-connectivity); a single pixel; a single row.
  diag = np.eye(4, dtype=np.int32)
  assert len(np.unique(np.asarray(cd.connected_components(jnp.asarray(diag))))) == 6
  np.testing.assert_array_equal(np.asarray(cd.connected_components(jnp.zeros((1, 1), int))), 0)
  row = np.array([[3, 3, 1, 3]], np.int32)
  np.testing.assert_array_equal(np.asarray(cd.connected_components(jnp.asarray(row))),
                                [[0, 0, 2, 3]])


def test_connected_components_match_skimage_on_random_labels():
  batch = np.stack([_random_blocks(s, block=b) for s, b in ((0, 1), (1, 2), (2, 3))])
  got = np.asarray(cd.connected_components(jnp.asarray(batch)))
  for g, lab in zip(got, batch):
    np.testing.assert_array_equal(g, _first_pixel_roots(lab))


def test_merge_on_a_hand_made_grid():
  # 6x6, num_centres 4 -> min_size int(0.5 * 36 / 4) = 4 pixels.
  grid = np.array([[0, 0, 0, 1, 1, 1],
                   [0, 2, 0, 1, 1, 1],
                   [0, 0, 0, 1, 3, 1],
                   [4, 4, 4, 5, 5, 5],
                   [4, 4, 4, 5, 5, 5],
                   [4, 4, 4, 5, 5, 6]], np.int32)
  want = np.array([[0, 0, 0, 1, 1, 1],
                   [0, 0, 0, 1, 1, 1],   # the 2 (1 px) joins the piece above it
                   [0, 0, 0, 1, 1, 1],   # the 3 (1 px) joins the 1 above it
                   [2, 2, 2, 3, 3, 3],
                   [2, 2, 2, 3, 3, 3],
                   [2, 2, 2, 3, 3, 3]])  # the corner 6 joins the 5 above it
  got = np.asarray(cd.enforce_connectivity_device(jnp.asarray(grid), num_centres=4))
  np.testing.assert_array_equal(got, want)
  # skimage's own pass agrees here (each small piece touches one earlier piece).
  sk = _enforce_label_connectivity_cython(grid[None].astype(np.intp), 4, 27, start_label=0)[0]
  np.testing.assert_array_equal(got, sk)
  # A piece of exactly min_size pixels stays; one pixel less and it is merged.
  four = np.zeros((6, 6), np.int32)
  four[2:4, 2:4] = 1
  assert len(np.unique(np.asarray(cd.enforce_connectivity_device(
      jnp.asarray(four), num_centres=4)))) == 2
  three = four.copy()
  three[3, 3] = 0
  np.testing.assert_array_equal(np.asarray(cd.enforce_connectivity_device(
      jnp.asarray(three), num_centres=4)), 0)


def test_small_first_piece_takes_the_next_new_id():
  # The top-left piece is small and has no earlier neighbour: skimage gives it the id the next
  # kept piece gets (0), so both end up one segment.
  grid = np.ones((6, 6), np.int32)
  grid[0, 0] = 0
  got = np.asarray(cd.enforce_connectivity_device(jnp.asarray(grid), num_centres=4))
  np.testing.assert_array_equal(got, 0)
  # (max_size 37 > H * W: skimage's max_size cut, which is not reproduced, stays out of play.)
  sk = _enforce_label_connectivity_cython(grid[None].astype(np.intp), 4, 37, start_label=0)[0]
  np.testing.assert_array_equal(got, sk)


@pytest.mark.parametrize("seed,block,centres", [(0, 1, 6), (1, 2, 6), (2, 2, 20), (3, 3, 3)])
def test_merge_matches_the_reference_rule_and_invariants(seed, block, centres):
  lab = _random_blocks(seed, block=block)
  h, w = lab.shape
  got = np.asarray(cd.enforce_connectivity_device(jnp.asarray(lab), num_centres=centres))
  np.testing.assert_array_equal(got, _reference(lab, centres))
  min_size = cd.min_segment_size(h, w, centres)
  n = got.max() + 1
  assert n <= cd.num_connected_segments(h, w, centres)
  assert set(np.unique(got)) == set(range(n))
  for i in range(n):
    region = got == i
    assert measure.label(region, connectivity=1).max() == 1  # one 4-connected piece
    assert region.sum() >= min_size  # nothing below the threshold survives
  # Pieces at or above the threshold are never merged with each other.
  roots = _first_pixel_roots(lab)
  kept = [r for r in np.unique(roots) if (roots == r).sum() >= min_size]
  assert len({int(got[roots == r][0]) for r in kept}) == len(kept) == n or (not kept and n == 1)
  # Already connected output passes unchanged.
  np.testing.assert_array_equal(np.asarray(cd.enforce_connectivity_device(
      jnp.asarray(got), num_centres=centres)), got)


def test_close_to_skimage_on_device_slic_of_a_photo():
  from skimage import data, transform
  img = (transform.resize(data.coffee(), (64, 64), anti_aliasing=True) * 255).astype(np.uint8)
  g = slic_device.num_centres(64, 64, 30)
  lab = np.asarray(slic_device.slic(jnp.asarray(img), n_segments=30, radius=2))
  got = np.asarray(cd.enforce_connectivity_device(jnp.asarray(lab), num_centres=g))
  seg = 64 * 64 / g
  sk = _enforce_label_connectivity_cython(lab[None].astype(np.intp), int(0.5 * seg),
                                          int(3 * seg), start_label=0)[0]
  assert metrics.num_segments(got) == metrics.num_segments(sk)
  asa = (metrics.achievable_segmentation_accuracy(got, sk)
         * metrics.achievable_segmentation_accuracy(sk, got))
  assert asa >= 0.95, asa


def test_jit_equals_eager_and_vmap_equals_loop():
  batch = np.stack([_random_blocks(s, h=10, w=12, block=2) for s in range(3)])
  fn = lambda x: cd._enforce_single(x, min_size=cd.min_segment_size(10, 12, 8))
  jitted = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(batch)))
  with jax.disable_jit():  # eager is slow: one image
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(batch[0]))), jitted[0])
  public = cd.enforce_connectivity_device(jnp.asarray(batch), num_centres=8)
  np.testing.assert_array_equal(np.asarray(public), jitted)
  loop = np.stack([np.asarray(cd.enforce_connectivity_device(jnp.asarray(x), num_centres=8))
                   for x in batch])
  np.testing.assert_array_equal(loop, jitted)
  vmapped = jax.vmap(lambda x: cd.enforce_connectivity_device(x, num_centres=8))(
      jnp.asarray(batch))
  np.testing.assert_array_equal(np.asarray(vmapped), jitted)
  # Extra leading dims.
  np.testing.assert_array_equal(np.asarray(cd.enforce_connectivity_device(
      jnp.asarray(batch[None]), num_centres=8))[0], jitted)


def test_sharded_equals_unsharded():
  assert jax.device_count() >= 8
  batch = np.stack([_random_blocks(s, block=2) for s in range(8)])
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  x = jax.device_put(jnp.asarray(batch), NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda l: cd.enforce_connectivity_device(l, num_centres=8),
               out_shardings=NamedSharding(mesh, P("data")))
  out = fn(x)
  assert len(out.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out), np.asarray(
      cd.enforce_connectivity_device(jnp.asarray(batch), num_centres=8)))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="labels must be"):
    cd.enforce_connectivity_device(jnp.zeros((5,), jnp.int32), num_centres=2)
  with pytest.raises(ValueError, match="integer"):
    cd.enforce_connectivity_device(jnp.zeros((4, 4)), num_centres=2)
  with pytest.raises(ValueError, match="num_centres"):
    cd.enforce_connectivity_device(jnp.zeros((4, 4), jnp.int32), num_centres=0)
  assert cd.num_connected_segments(336, 336, 25) == 50
  assert cd.num_connected_segments(4, 4, 100) == 16  # min_size 0: every pixel may be a segment
