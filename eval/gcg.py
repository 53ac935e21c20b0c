"""GLaMM grounded conversation generation with pruning built in: images -> captions + masks.

One jitted program per (batch size, prompt bucket, pruning method) does, for a batch of images:
CLIP features and CLS attention -> pre-LLM pruning (ALTP / top-k / random / grid) or none ->
splice -> prefill with in-LLM pruning (FastV / PyramidDrop) if chosen -> `lax.while_loop` greedy
decoding -> the hidden state before each [SEG] -> SAM image embedding -> mask decoder. The host
then upsamples each mask to the original image size (PyTorch-exact bilinear, no antialias),
decodes the text and writes GLaMM's prediction JSON (glamm.md §4.10-4.12).

Nothing recompiles per image: images are preprocessed to fixed sizes, the prompt is padded to a
bucket, pruning keeps a static `k`, and the number of masks per image is bounded by `max_segs`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import altp_jax
from altp_jax import gather
from altp_jax import ranking
from altp_jax import pipeline
from altp_jax import superpixels
from models import generate as gen
from models.flat_state import split_flat
from models.sam.resize import linear_taps

METHODS = ("none", "altp", "fastv", "pdrop", "random", "grid", "topk")
PRE_LLM = ("altp", "random", "grid", "topk")
# ALTP options of the GCG pipeline: chosen on the synthetic val split (docs/SYNTHETIC.md, issue 9:
# over 3 generator seeds at 90% reduction, pixel-detail density with a quarter of the budget as
# superpixels raised AP50 on every seed against the field defaults). `ALTPConfig`'s own field
# defaults stay the ones that need no pixel input; this pipeline has the image, so it computes the
# per-token detail itself.
ALTP_DEFAULTS = altp_jax.ALTPConfig(density="pixel_detail", coverage=0.25)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """How visual tokens are pruned (static under jit).

  Attributes:
    method: one of `METHODS`. `altp`, `topk` (by CLIP CLS attention), `random` and `grid` prune
      before the LLM; `fastv` and `pdrop` inside it.
    keep_ratio: fraction of the N visual tokens kept at the pruning point (0.1 = "90%
      reduction"); for `pdrop` the layer-averaged fraction (see `pdrop_schedule`).
    altp: ALTP options (density, quota, coverage, SLIC settings).
    superpixels: `host` (scikit-image) or `device` (the jitted JAX SLIC) for ALTP.
    positions: `original` or `compact` position ids for pre-LLM pruning and FastV.
    fastv_layer: FastV's K.
    pdrop_layers, pdrop_base_ratios: PyramidDrop drop layers and ratio shape; the ratios are
      scaled so the layer-averaged retention equals `keep_ratio`.
    seed: seed of the `random` method.
  """

  method: str = "none"
  keep_ratio: float = 1.0
  altp: altp_jax.ALTPConfig = ALTP_DEFAULTS
  superpixels: str = "host"
  positions: str = "original"
  fastv_layer: int = 2
  pdrop_layers: tuple[int, ...] = (2, 8, 16, 24)
  pdrop_base_ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"--prune {self.method!r}: expected one of {METHODS}")
    if not 0.0 < self.keep_ratio <= 1.0:
      raise ValueError(f"--keep-ratio {self.keep_ratio}: must be in (0, 1]")
    if self.superpixels not in ("host", "device"):
      raise ValueError(f"--superpixels {self.superpixels!r}: expected 'host' or 'device'")
    if self.positions not in ("original", "compact"):
      raise ValueError(f"positions={self.positions!r}: expected 'original' or 'compact'")

  def kept(self, n: int) -> int:
    """Visual tokens kept at the pruning point (FastV rounding: 58 of 576 at 0.1)."""
    return n if self.method == "none" else altp_jax.keep_count(n, 1.0 - self.keep_ratio)

  def n_segments(self, n: int) -> int:
    return self.altp.n_segments(self.kept(n))

  def num_segments(self, n: int) -> int:
    """Static bound on superpixel ids for ALTP (host SLIC may return up to 2x n_segments)."""
    return 2 * self.n_segments(n)

  def plan(self, num_layers: int, n: int) -> gen.PrunePlan:
    """The in-LLM plan for `n` visual tokens entering the LLM."""
    if self.method == "fastv":
      return gen.PrunePlan.fastv(num_layers, n, altp_jax.FastVConfig(
          layer=self.fastv_layer, reduction=1.0 - self.keep_ratio, positions=self.positions))
    if self.method == "pdrop":
      layers = tuple(l for l in self.pdrop_layers if l < num_layers)
      ratios = self.pdrop_base_ratios[: len(layers)]
      sched = altp_jax.schedule_for_target(self.keep_ratio, num_layers, layers,
                                           base_ratios=ratios)
      return gen.PrunePlan.pdrop(n, sched)
    return gen.PrunePlan.none(num_layers, n)


@dataclasses.dataclass(frozen=True)
class GCGOptions:
  """Static options of one compiled GCG program."""

  prune: PruneConfig = PruneConfig()
  sampler: gen.SamplerConfig = gen.SamplerConfig()
  seg_id: int = 32004
  max_segs: int = 16
  grid: tuple[int, int] = (24, 24)


def altp_score(source: str, visual_tokens, cls_scores):
  """ALTP's token score [B, N] for the pre-LLM placement: `clip_cls` (CLS attention),
  `feature_norm` (L2 norm of the projected token) or `uniform` (all equal; ties then go to the
  lower index inside a superpixel)."""
  if source == "clip_cls":
    return cls_scores
  if source == "feature_norm":
    return jnp.linalg.norm(visual_tokens.astype(jnp.float32), axis=-1)
  if source == "uniform":
    return jnp.zeros(cls_scores.shape, jnp.float32)
  raise ValueError(f"ALTP score source {source!r} is not available before the LLM "
                   "(use clip_cls, feature_norm or uniform)")


def pre_llm_keep(method, k, visual_tokens, cls_scores, labels, rng, altp_cfg, num_segments,
                 grid, detail=None):
  """[B, k] ascending kept visual-token indices for the pre-LLM methods."""
  b, n = cls_scores.shape
  if method == "altp":
    return altp_jax.altp.altp_select(cls_scores, labels, k, config=altp_cfg,
                                     features=visual_tokens.astype(jnp.float32),
                                     detail=detail, num_segments=num_segments)
  if method == "topk":
    return altp_jax.topk_select(cls_scores, k)
  if method == "random":
    return altp_jax.random_select(rng, (b,), n, k)
  return altp_jax.grid_select(grid, k, (b,))


def seg_states(tokens, lengths, hidden, seg_id: int, max_segs: int):
  """The hidden states GLaMM decodes masks from, in [SEG] order.

  Args:
    tokens: [B, G] generated ids; hidden: [B, G, D] with hidden[:, t] the state that predicted
      tokens[:, t] (GLaMM's "state of the token right before [SEG]"); lengths: [B].
    seg_id: the [SEG] token id; max_segs: static bound on masks per image.

  Returns:
    (seg_hidden [B, max_segs, D], seg_valid [B, max_segs] bool). [SEG]s past `max_segs` are
    dropped (and counted by the caller).
  """
  g = tokens.shape[1]
  is_seg = (tokens == seg_id) & (jnp.arange(g)[None, :] < lengths[:, None])
  iota = jnp.arange(g, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(is_seg, iota, g + iota), axis=1)[:, :max_segs]
  if max_segs > g:
    order = jnp.pad(order, ((0, 0), (0, max_segs - g)))
  valid = jnp.take_along_axis(is_seg, order, axis=1) & (jnp.arange(max_segs) < g)[None]
  return jnp.take_along_axis(hidden, order[..., None], axis=1), valid


def gcg_forward(model, ids, valid, visual_mask, clip_pixels, sam_pixels, labels, images01, rng,
                *, options: GCGOptions):
  """Traceable GCG for a batch (see module docstring).

  Args:
    model: `models.glamm.GLaMM`.
    ids, valid, visual_mask: [B, T] prompt (N visual slots per row), right-padded.
    clip_pixels: [B, S, S, 3] CLIP-normalised; sam_pixels: [B, 1024, 1024, 3] SAM-normalised.
    labels: [B, N] int32 token superpixel labels (host superpixels) or None.
    images01: [B, S, S, 3] CLIP input in [0, 1] for device superpixels, or None.
    rng: PRNG key.

  Returns:
    dict with tokens [B, G], lengths [B], low-res mask logits [B, max_segs, 4h, 4w] f32,
    seg_valid [B, max_segs], num_segs [B], keep_visual [B, k] (pre-LLM methods; else [B, 0]).
  """
  prune, sampler = options.prune, options.sampler
  b, t = ids.shape
  visual, cls = model.encode_image(clip_pixels)
  n = visual.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  keep = jnp.zeros((b, 0), jnp.int32)
  if prune.method in PRE_LLM:
    k = prune.kept(n)
    rng, sub = jax.random.split(rng)
    keep = pre_llm_selection(prune, visual, cls, labels, images01, sub, options.grid)
    keep_all = gather.sequence_keep_mask(visual_mask, ranking.keep_mask(keep, n))
    length = t - (n - k)
    ids, index, _ = gather.gather_kept(ids, keep_all, length)
    positions = gather.kept_positions(keep_all, index, prune.positions)
    valid = jnp.take_along_axis(valid, index, axis=1)
    visual_mask = jnp.take_along_axis(visual_mask, index, axis=1)
    visual = jnp.take_along_axis(visual, keep[..., None], axis=1)
  embeds = model.splice(ids, visual, visual_mask)
  plan = prune.plan(model.llm.config.num_layers, int(visual.shape[1]))
  out = gen.generate_fn(model.llm, embeds, valid, visual_mask, rng, positions, plan=plan,
                        sampler=sampler)
  seg_hidden, seg_valid = seg_states(out.tokens, out.lengths, out.hidden, options.seg_id,
                                     options.max_segs)
  low_res = model.decode_masks(seg_hidden, model.sam_embed(sam_pixels)).astype(jnp.float32)
  num_segs = jnp.sum((out.tokens == options.seg_id) & (
      jnp.arange(out.tokens.shape[1])[None] < out.lengths[:, None]), axis=1)
  return dict(tokens=out.tokens, lengths=out.lengths, low_res=low_res, seg_valid=seg_valid,
              num_segs=num_segs, keep_visual=keep)


def pre_llm_selection(prune: PruneConfig, visual, cls, labels, images01, rng, grid):
  """[B, k] ascending kept visual-token indices of a pre-LLM method, everything it costs
  included: for ALTP the device superpixels (when `labels` is None), the pixel detail and the
  selection. The benchmark times this function alone as ALTP's own cost.

  Args:
    prune: a `PruneConfig` whose method is in `PRE_LLM`.
    visual: [B, N, D] projected visual tokens; cls: [B, N] CLS->patch attention.
    labels: [B, N] int32 token superpixel labels (host superpixels) or None.
    images01: [B, S, S, 3] CLIP input in [0, 1] (device superpixels, pixel detail), or None.
    rng: PRNG key (the `random` method); grid: (rows, cols) of the visual tokens.
  """
  n = visual.shape[1]
  k = prune.kept(n)
  if prune.method == "altp" and labels is None:
    if images01 is None:
      raise ValueError("ALTP with device superpixels needs images01 [B, H, W, 3] in [0, 1]")
    pix = pipeline.device_pixel_labels(images01, n_segments=prune.n_segments(n),
                                       config=prune.altp)
    g = pipeline.device_num_segments(images01.shape[1], images01.shape[2],
                                     prune.n_segments(n))
    labels = superpixels.token_labels(pix, grid, g, prune.altp.token_labels)
  else:
    g = prune.num_segments(n)
  if prune.method == "altp" and prune.altp.score != "clip_cls":
    cls = altp_score(prune.altp.score, visual, cls)
  detail = None
  if prune.method == "altp" and prune.altp.density == "pixel_detail":
    if images01 is None:
      raise ValueError("ALTP density 'pixel_detail' measures detail on the images: pass "
                       "images01 [B, H, W, 3] in [0, 1], or choose another density")
    # Mean Sobel magnitude per token patch of the CLIP input (same values as the host version).
    detail = superpixels.patch_detail_device(images01, grid)
  return pre_llm_keep(prune.method, k, visual, cls, labels, rng, prune.altp, g, grid, detail)


@functools.partial(jax.jit, static_argnames=("fdef", "options"))
def _gcg_jit(fdef, leaves, ids, valid, visual_mask, clip_pixels, sam_pixels, labels, images01,
             rng, *, options):
  return gcg_forward(fdef.merge(leaves), ids, valid, visual_mask, clip_pixels, sam_pixels,
                     labels, images01, rng, options=options)


class GCGRunner:
  """Holds a model split for jit and runs GCG batches; see `run_batch`.

  The state is kept as a flat list of arrays (`models.flat_state`): flattening an `nnx.State`
  on every call would cost milliseconds of host time per batch."""

  def __init__(self, model, options: GCGOptions):
    self.fdef, self.leaves = split_flat(model)
    self.options = options
    self.config = model.config

  def run_batch(self, ids, valid, visual_mask, clip_pixels, sam_pixels, labels=None,
                images01=None, rng=None):
    rng = jax.random.key(self.options.prune.seed) if rng is None else rng
    return _gcg_jit(self.fdef, self.leaves, ids, valid, visual_mask, clip_pixels, sam_pixels,
                    labels, images01, rng, options=self.options)


def _resize_axis_np(x, out_size, axis, keep=None):
  in_size = x.shape[axis]
  keep = out_size if keep is None else keep
  if in_size == out_size:
    return np.take(x, np.arange(keep), axis=axis)
  lo, hi, w_lo, w_hi = (a[:keep] for a in linear_taps(in_size, out_size))
  shape = [1] * x.ndim
  shape[axis] = keep
  return (np.take(x, lo, axis=axis) * w_lo.reshape(shape)
          + np.take(x, hi, axis=axis) * w_hi.reshape(shape))


def masks_to_original(low_res: np.ndarray, resized_hw: tuple[int, int],
                      original_hw: tuple[int, int], img_size: int = 1024) -> np.ndarray:
  """Host post-processing of one image's masks (glamm.md §4.10), without per-size compiles.

  low_res [S, 4h, 4w] float32 -> bilinear to img_size, crop to `resized_hw`, bilinear to
  `original_hw` (PyTorch `align_corners=False` arithmetic, no antialias) -> [S, H, W] bool (> 0).
  """
  x = np.asarray(low_res, np.float32)
  x = _resize_axis_np(x, img_size, 2, keep=resized_hw[1])
  x = _resize_axis_np(x, img_size, 1, keep=resized_hw[0])
  x = _resize_axis_np(x, original_hw[1], 2)
  x = _resize_axis_np(x, original_hw[0], 1)
  return x > 0.0


if __name__ == "__main__":
  from eval import run_gcg
  run_gcg.main()
