"""The embedded default job: ALTP and the baselines on real photos shipped with scikit-image.

    python -m eval.demo --out out/demo

For each photo (CLIP-style 336x336 crop, GLaMM's 24x24 token grid) it runs ALTP, top-k by score,
random and grid selection at 50/75/90% visual-token reduction, writes one picture per photo (the
methods side by side at the `--show` reduction) and a table of tokens kept, superpixel coverage
and selection time.

No model weights are needed: the token score is the patch's mean gradient magnitude and the token
features are the patch's Lab colour mean and spread. With a model, the score is CLIP's CLS
attention and the features are the projected visual tokens (see `models/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

import altp_jax
from altp_jax import viz

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "immunohistochemistry")
GRID = (24, 24)
SIZE = 336


def load_photo(name: str) -> np.ndarray:
  """A scikit-image photo as a 336x336 uint8 RGB centre crop (shortest side resized first)."""
  import skimage.data
  from skimage.transform import resize

  img = getattr(skimage.data, name)()
  if name == "stereo_motorcycle":
    img = img[0]
  rgb = altp_jax.superpixels.as_rgb_float(img)
  h, w = rgb.shape[:2]
  s = SIZE / min(h, w)
  nh, nw = max(SIZE, round(h * s)), max(SIZE, round(w * s))
  rgb = resize(rgb, (nh, nw), anti_aliasing=True)
  top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
  return (np.clip(rgb[top:top + SIZE, left:left + SIZE], 0, 1) * 255).round().astype(np.uint8)


def patch_features(image: np.ndarray, grid=GRID) -> np.ndarray:
  """[N, 6] per-token Lab mean and standard deviation: stand-in features without a model."""
  from skimage.color import rgb2lab

  lab = rgb2lab(image).astype(np.float32)
  h, w = grid
  p = lab.reshape(h, SIZE // h, w, SIZE // w, 3)
  return np.concatenate([p.mean((1, 3)), p.std((1, 3))], -1).reshape(h * w, 6)


def _time_ms(fn, repeats=20):
  jax.block_until_ready(fn())                     # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def run(out_dir: str, photos=PHOTOS, reductions=(0.5, 0.75, 0.9), show=0.9, seed=0,
        config=altp_jax.ALTPConfig()):
  from tqdm import tqdm

  os.makedirs(out_dir, exist_ok=True)
  n = GRID[0] * GRID[1]
  rows, pictures = [], []
  for name in tqdm(photos, desc="photos", unit="img"):
    image = load_photo(name)
    scores = altp_jax.patch_detail(image, GRID)
    feats = patch_features(image)
    for reduction in reductions:
      k = altp_jax.keep_count(n, reduction)
      n_seg = config.n_segments(k)
      t0 = time.perf_counter()
      pix = altp_jax.slic_labels(image, n_segments=n_seg, compactness=config.compactness,
                                 sigma=config.sigma, max_segments=2 * n_seg)
      slic_ms = (time.perf_counter() - t0) * 1e3
      g = 2 * n_seg
      tok = altp_jax.token_labels(pix, GRID, g)
      methods = {
          "altp": lambda: altp_jax.altp_select(scores, tok, k, config=config, features=feats,
                                               num_segments=g),
          "topk": lambda: altp_jax.topk_select(scores, k),
          "random": lambda: altp_jax.random_select(jax.random.key(seed), (), n, k),
          "grid": lambda: altp_jax.grid_select(GRID, k),
      }
      present = np.unique(np.asarray(tok))
      panel = []
      for method, fn in methods.items():
        keep = np.asarray(fn())
        covered = np.isin(present, np.asarray(tok)[keep]).mean()
        rows.append(dict(photo=name, reduction=reduction, method=method, kept=int(keep.size),
                         superpixels=int(present.size), coverage=float(covered),
                         select_ms=_time_ms(fn), slic_ms=slic_ms))
        if abs(reduction - show) < 1e-9:
          budgets = None
          if method == "altp":
            q, e = altp_jax.altp_budgets(scores, tok, k, config=config, features=feats,
                                         num_segments=g)
            budgets = np.asarray(q + e)
          panel.append(viz.draw_selection(image, keep, GRID, pix, budgets,
                                          title=f"{name} {method} k={k} cover={covered:.0%}"))
      if panel:
        sheet = viz.contact_sheet(panel, len(panel))
        viz.save_png(sheet, os.path.join(out_dir, f"{name}.png"))
        pictures.append(f"{name}.png")
  table = _markdown(rows)
  _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(dict(
      rows=rows, pictures=pictures, config=str(config), device=str(jax.devices()[0])), indent=1))
  _write_atomic(os.path.join(out_dir, "summary.md"), table)
  return rows, table


def _markdown(rows):
  lines = ["| photo | reduction | method | kept | superpixels | coverage | select ms | SLIC ms |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['photo']} | {r['reduction']:.0%} | {r['method']} | {r['kept']} | "
                 f"{r['superpixels']} | {r['coverage']:.0%} | {r['select_ms']:.3f} | "
                 f"{r['slic_ms']:.1f} |")
  by = {}
  for r in rows:
    by.setdefault((r["reduction"], r["method"]), []).append(r["coverage"])
  lines += ["", "Mean superpixel coverage (fraction of superpixels with at least one kept token):",
            "", "| reduction | " + " | ".join(sorted({m for _, m in by})) + " |",
            "|---|" + "---|" * len({m for _, m in by})]
  for red in sorted({r for r, _ in by}):
    vals = [f"{np.mean(by[(red, m)]):.0%}" for m in sorted({m for _, m in by})]
    lines.append(f"| {red:.0%} | " + " | ".join(vals) + " |")
  return "\n".join(lines) + "\n"


def _write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
  parser.add_argument("--photos", default=",".join(PHOTOS),
                      help="comma-separated scikit-image photo names")
  parser.add_argument("--reductions", default="0.5,0.75,0.9",
                      help="visual-token reductions (fraction dropped)")
  parser.add_argument("--show", type=float, default=0.9, help="reduction drawn in the pictures")
  parser.add_argument("--density", default="dispersion", choices=altp_jax.altp.DENSITIES)
  args = parser.parse_args(argv)
  photos = tuple(p for p in args.photos.split(",") if p)
  reductions = tuple(float(x) for x in args.reductions.split(","))
  _, table = run(args.out, photos, reductions, args.show,
                 config=altp_jax.ALTPConfig(density=args.density))
  print(table)
  print(f"pictures and summary written to {args.out}/")


if __name__ == "__main__":
  main()
