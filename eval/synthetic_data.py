"""Training examples from the synthetic scenes (eval/scenes.py layout) for GLaMM's GCG task.

One example = the GCG prompt (glamm.md §4.4, the evaluation instruction) followed by the grounded
caption as the assistant answer and `</s>`, i.e. the llava_v1 conversation LLaVA/GLaMM train on;
the image placeholder is expanded to N visual slots (`eval.prompt.expand_image_tokens`) and the
sequence right-padded to a static length L. Arrays (K = max masks per image, S/Ss the CLIP/SAM input
sides, H = W the image side):

  input_ids    [L] int32   prompt + answer ids (visual slots and padding: the pad id)
  visual_mask  [L] bool    the N visual slots
  targets      [L] int32   the id position t predicts (= input_ids[t + 1]); 0 where unused
  loss_weight  [L] float32 1 on the positions that predict an answer token (incl. `</s>`)
  seg_index    [K] int32   position of the token *before* each [SEG] (GLaMM's hidden-state
                           choice, glamm.md §4.7); 0 on padded slots
  seg_valid    [K] bool
  clip_image   [S,S,3] u8  resized + centre-cropped like eval.preprocess.clip_preprocess
  sam_image    [Ss,Ss,3] u8 resized like eval.preprocess.sam_preprocess (zeros where padded)
  masks        [K,H,W] u8  ground-truth masks in [SEG] order (zeros on padded slots)

Images and masks stay uint8 on the host (a quarter of the bytes to move between worker processes
and to the device); `clip_normalize` / `sam_normalize` finish the two preprocessors on the device,
equal to `clip_preprocess` / `sam_preprocess` up to float32 rounding.

Batches for step s are a pure function of (seed, s): epoch e visits the split in the order of
`default_rng([seed, e]).permutation`, and step s takes the next `batch_size` examples of that
endless sequence, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import queue
import threading
from typing import Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from eval import scenes
from eval.preprocess import (CLIP_MEAN, CLIP_RESCALE, CLIP_STD, SAM_MEAN, SAM_STD,
                             clip_resize_shape, load_image, sam_resize_shape)
from eval.prompt import build_gcg_prompt
from eval.tokenizer import LlamaSlowTokenizer, seg_token_id


class SyntheticGCGData:
  """The examples of one split of a scenes directory.

  Args:
    root: the `python -m eval.scenes --out` directory.
    split: "train", "val" or "test".
    tokenizer: the synthetic tokenizer (`root/tokenizer`).
    clip_size / sam_size: model input sides (336 / the small SAM's image size).
    num_visual_tokens: N = (clip_size / patch)^2.
    max_masks: K.
    max_answer_tokens: answer ids (incl. `</s>`) allowed; longer answers are an error.
  """

  def __init__(self, root: str, split: str, tokenizer: LlamaSlowTokenizer, *, clip_size: int,
               sam_size: int, num_visual_tokens: int, max_masks: int = scenes.MAX_OBJECTS,
               max_answer_tokens: int = 112):
    cap_path, mask_path = scenes.annotation_paths(root, split)
    for p in (cap_path, mask_path):
      if not os.path.exists(p):
        raise FileNotFoundError(f"SyntheticGCGData: no {split} annotations at {p}; run "
                                f"`python -m eval.scenes --out {root} --{split} N` first")
    with open(cap_path) as f:
      cap = json.load(f)
    with open(mask_path) as f:
      msk = json.load(f)
    self.root, self.split, self.tokenizer = root, split, tokenizer
    self.clip_size, self.sam_size = clip_size, sam_size
    self.num_visual_tokens, self.max_masks = num_visual_tokens, max_masks
    self.images = cap["images"]
    by_image: dict[str, list[dict]] = {}
    for a in msk["annotations"]:
      by_image.setdefault(a["image_id"], []).append(a)
    self.captions = {a["image_id"]: a for a in cap["annotations"]}
    self.masks = by_image
    sizes = {(im["height"], im["width"]) for im in self.images}
    if len(sizes) > 1:
      raise ValueError(f"SyntheticGCGData: {cap_path} mixes image sizes {sorted(sizes)}; the "
                       "training step needs one static size")
    self.image_hw = sizes.pop() if sizes else (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)

    prompt = build_gcg_prompt(tokenizer, num_visual_tokens, buckets=None)
    self.prompt_ids = prompt.ids            # expanded, [P]
    self.prompt_visual_mask = prompt.visual_mask
    self.seg_id = seg_token_id(tokenizer)
    self.max_answer_tokens = max_answer_tokens
    self.seq_len = len(self.prompt_ids) + max_answer_tokens

  def __len__(self) -> int:
    return len(self.images)

  def answer_ids(self, grounded_caption: str) -> list[int]:
    return self.tokenizer.encode(grounded_caption, add_special_tokens=False) + \
        [self.tokenizer.eos_id]

  def example(self, i: int) -> dict[str, np.ndarray]:
    im = self.images[i]
    stem = im["id"]
    cap = self.captions.get(stem)
    if cap is None or "grounded_caption" not in cap:
      raise ValueError(f"SyntheticGCGData: image {stem!r} of {self.split} has no caption "
                       "annotation with a 'grounded_caption'")
    answer = self.answer_ids(cap["grounded_caption"])
    if len(answer) > self.max_answer_tokens:
      raise ValueError(f"SyntheticGCGData: answer of {stem!r} has {len(answer)} tokens > "
                       f"max_answer_tokens {self.max_answer_tokens}")
    p, l = len(self.prompt_ids), self.seq_len
    ids = np.full((l,), self.tokenizer.pad_id, np.int32)
    ids[:p] = self.prompt_ids
    ids[p:p + len(answer)] = answer
    visual = np.zeros((l,), bool)
    visual[:p] = self.prompt_visual_mask
    targets = np.zeros((l,), np.int32)
    targets[:-1] = ids[1:]
    weight = np.zeros((l,), np.float32)
    weight[p - 1:p - 1 + len(answer)] = 1.0

    seg_pos = p + np.flatnonzero(np.asarray(answer) == self.seg_id)
    anns = self.masks.get(stem, [])
    if len(seg_pos) != len(anns) or len(anns) != len(cap.get("labels", anns)):
      raise ValueError(f"SyntheticGCGData: {stem!r} has {len(seg_pos)} [SEG] tokens, "
                       f"{len(anns)} masks and {len(cap.get('labels', []))} labels")
    if len(anns) > self.max_masks:
      raise ValueError(f"SyntheticGCGData: {stem!r} has {len(anns)} masks > max_masks "
                       f"{self.max_masks}")
    k = self.max_masks
    seg_index = np.zeros((k,), np.int32)
    seg_index[:len(seg_pos)] = seg_pos - 1
    seg_valid = np.zeros((k,), bool)
    seg_valid[:len(seg_pos)] = True
    h, w = self.image_hw
    masks = np.zeros((k, h, w), np.uint8)
    for j, a in enumerate(anns):
      rle = dict(a["segmentation"])
      rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) \
          else rle["counts"]
      masks[j] = mask_utils.decode(rle)

    image = load_image(os.path.join(scenes.image_dir(self.root, self.split), im["file_name"]))
    return {"input_ids": ids, "visual_mask": visual, "targets": targets, "loss_weight": weight,
            "seg_index": seg_index, "seg_valid": seg_valid,
            "clip_image": clip_resize_crop(image, self.clip_size),
            "sam_image": sam_resize_pad(image, self.sam_size), "masks": masks}

  def sam_input_size(self) -> tuple[int, int]:
    """(h, w) of the resized image inside the padded SAM input (for mask post-processing)."""
    return sam_resize_shape(*self.image_hw, self.sam_size)

  def batch(self, indices) -> dict[str, np.ndarray]:
    exs = [self.example(int(i)) for i in indices]
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def clip_resize_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H,W,3] -> uint8 [size,size,3]: `clip_preprocess` before its rescale/normalise."""
  new_h, new_w = clip_resize_shape(image.shape[0], image.shape[1], size)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def sam_resize_pad(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H,W,3] -> uint8 [size,size,3]: `sam_preprocess`'s resize, zero-padded."""
  new_h, new_w = sam_resize_shape(image.shape[0], image.shape[1], size)
  out = np.zeros((size, size, 3), np.uint8)
  out[:new_h, :new_w] = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
  return out


def clip_normalize(x):
  """uint8 [...,S,S,3] -> float32, (x / 255 - mean) / std (jnp or np)."""
  import jax.numpy as jnp
  x = jnp.asarray(x).astype(jnp.float32) * jnp.float32(CLIP_RESCALE)
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def sam_normalize(x, input_size: tuple[int, int]):
  """uint8 [B,Ss,Ss,3] -> float32 (x - mean) / std inside the resized `input_size` (h, w),
  zero in the padding (SAM pads *after* normalising)."""
  import jax.numpy as jnp
  y = (jnp.asarray(x).astype(jnp.float32) - jnp.asarray(SAM_MEAN, jnp.float32)) / \
      jnp.asarray(SAM_STD, jnp.float32)
  h, w = input_size
  rows = jnp.arange(y.shape[-3]) < h
  cols = jnp.arange(y.shape[-2]) < w
  return jnp.where((rows[:, None] & cols[None, :])[..., None], y, 0.0)


# Worker processes build their own dataset once (the tokenizer is not shared across processes) and
# write examples straight into shared-memory batch slots: returning a 1.2 MB example through the
# pool's result pipe made the pipe, not the workers, the limit (~80 ms per batch of 32 on a 16-core
# host, three times the H100's training step).
_WORKER_DATA: "SyntheticGCGData | None" = None
_WORKER_SLOTS: "list[dict[str, np.ndarray]] | None" = None
_WORKER_SHM: list = []


def _worker_init(root, split, tokenizer_dir, kwargs, slot_names=(), layout=None):
  global _WORKER_DATA, _WORKER_SLOTS
  from eval.tokenizer import load_tokenizer
  _WORKER_DATA = SyntheticGCGData(root, split, load_tokenizer(tokenizer_dir), **kwargs)
  if slot_names:
    _WORKER_SHM[:] = [_attach_shared_memory(name) for name in slot_names]
    _WORKER_SLOTS = [layout.views(shm.buf) for shm in _WORKER_SHM]


def _worker_fill(slot: int, row: int, index: int) -> None:
  ex = _WORKER_DATA.example(index)
  for k, v in _WORKER_SLOTS[slot].items():
    v[row] = ex[k]


def _attach_shared_memory(name: str):
  """Opens an existing segment without registering it with this process's resource tracker: the
  creating process owns (and unlinks) it; a second registration would make the tracker unlink or
  warn about it when a worker exits (Python < 3.13 has no `track=False`)."""
  from multiprocessing import resource_tracker, shared_memory
  register = resource_tracker.register
  resource_tracker.register = lambda *a, **k: None
  try:
    return shared_memory.SharedMemory(name=name)
  finally:
    resource_tracker.register = register


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Where each array of a batch of `batch_size` examples lies in one flat buffer."""
  batch_size: int
  fields: tuple[tuple[str, tuple[int, ...], str, int], ...]   # (key, example shape, dtype, offset)
  nbytes: int

  @classmethod
  def of(cls, example: dict[str, np.ndarray], batch_size: int) -> "BatchLayout":
    fields, offset = [], 0
    for k, v in example.items():
      fields.append((k, tuple(v.shape), v.dtype.str, offset))
      offset += -(-batch_size * v.nbytes // 64) * 64      # 64-byte aligned arrays
    return cls(batch_size, tuple(fields), max(offset, 1))

  def views(self, buf) -> dict[str, np.ndarray]:
    return {k: np.ndarray((self.batch_size, *shape), np.dtype(dt), buffer=buf, offset=off)
            for k, shape, dt, off in self.fields}


def step_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Example indices of training step `step` (see the module docstring)."""
  if n <= 0:
    raise ValueError("step_indices: empty split")
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(perm[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out)


def prefetch_batches(data: SyntheticGCGData, batch_size: int, first_step: int, last_step: int,
                     seed: int, workers: int = 4, depth: int = 3,
                     tokenizer_dir: str | None = None) -> Iterator[tuple[int, dict]]:
  """(step, batch) for steps [first_step, last_step), prepared `depth` batches ahead by a
  background thread. With `workers` > 0 and `tokenizer_dir`, that many worker processes build the
  examples (image decoding, resizing and tokenising hold the GIL) into two shared-memory batch
  slots (one fills while the other is copied out); otherwise the thread builds them. Every
  yielded batch owns its arrays."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  use_workers = workers > 0 and tokenizer_dir is not None

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.5)
        return True
      except queue.Full:
        continue
    return False

  def produce_in_thread():
    for step in range(first_step, last_step):
      if not put((step, data.batch(step_indices(len(data), batch_size, step, seed)))):
        return

  def produce_with_workers():
    from multiprocessing import shared_memory
    layout = BatchLayout.of(data.example(0), batch_size)
    kwargs = dict(clip_size=data.clip_size, sam_size=data.sam_size,
                  num_visual_tokens=data.num_visual_tokens, max_masks=data.max_masks,
                  max_answer_tokens=data.max_answer_tokens)
    segments = [shared_memory.SharedMemory(create=True, size=layout.nbytes) for _ in range(2)]
    slots: list[dict[str, np.ndarray]] = []
    try:
      slots = [layout.views(shm.buf) for shm in segments]
      pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
          initargs=(data.root, data.split, tokenizer_dir, kwargs,
                    tuple(shm.name for shm in segments), layout))
      with pool:
        pending = None      # (step, slot, results) being filled while the previous one is copied
        for step in range(first_step, last_step + 1):
          filling = None
          if step < last_step:
            idx = step_indices(len(data), batch_size, step, seed).tolist()
            filling = (step, step % 2, pool.map(_worker_fill, [step % 2] * batch_size,
                                                range(batch_size), idx,
                                                chunksize=max(1, batch_size // workers)))
          if pending is not None:
            done_step, slot, results = pending
            list(results)   # waits, and re-raises a worker's error
            # A copy, so the slot can be refilled while the consumer still holds this batch.
            if not put((done_step, {k: v.copy() for k, v in slots[slot].items()})):
              return
          pending = filling
    finally:
      slots.clear()
      for shm in segments:
        shm.close()
        shm.unlink()

  def produce():
    try:
      produce_with_workers() if use_workers else produce_in_thread()
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
      q.put(e)
      return
    q.put(None)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is None:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
