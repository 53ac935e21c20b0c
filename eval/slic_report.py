"""Quality (and speed) report: device SLIC against host SLIC on scikit-image's photos.

Writes `docs/SUPERPIXELS.md` and pictures under `docs/img/`:

  python -m eval.slic_report [--bench-cpu docs/bench/slic_cpu.json]
                             [--bench-gpu docs/bench/slic_h100.json]

For every photo (336x336, CLIP-style resize + centre crop) it computes host superpixels (skimage
`slic` with its connectivity pass, via `altp_jax.superpixels.slic_labels`) and device superpixels
(`altp_jax.pipeline.device_pixel_labels`: device SLIC, radius 1 or 2, with or without the device
connectivity pass) with the ALTP default at 90% reduction (k = 58 of 576 tokens, n_segments =
round(0.5 k) = 29), and reports, with the host segmentation as reference: boundary recall (2 px),
under-segmentation error, achievable segmentation accuracy, the number of segments, and the
Jaccard overlap of the ALTP keep sets chosen with each. Keep sets
need token scores and features; no vision tower runs here, so the report uses stand-ins (named in
the output): the patch's mean Sobel magnitude and seeded random numbers as scores, and the raw
14x14x3 patch as the token feature for the `dispersion` density.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from skimage import segmentation
from skimage.segmentation._slic import _enforce_label_connectivity_cython

from altp_jax import altp, connectivity_device, pipeline, slic_device, superpixels
from eval import slic_photos
from eval import superpixel_metrics as metrics

SIZE, GRID, K = 336, (24, 24), 58  # GLaMM's CLIP input, its token grid, 90% reduction
DENSITIES = ("dispersion", "score_mass", "area")
SCORE_SOURCES = ("sobel", "random0", "random1", "random2")
# Device variants: (name, radius, device connectivity pass). The last is the pipeline default.
VARIANTS = (("r1", 1, False), ("r2", 2, False), ("r1 + pass", 1, True), ("r2 + pass", 2, True))
DEFAULT = "r2 + pass"


def _scores(name, image):
  if name == "sobel":
    return superpixels.patch_detail(image, GRID)
  seed = int(name.removeprefix("random"))
  return np.random.RandomState(seed).rand(GRID[0] * GRID[1]).astype(np.float32)


def _patch_features(image):
  """[N, 588] raw 14x14x3 patches in [0, 1]: a stand-in for the projected visual tokens."""
  h, w = GRID
  p = SIZE // h
  x = image.astype(np.float32).reshape(h, p, w, p, 3) / 255.0
  return x.transpose(0, 2, 1, 3, 4).reshape(h * w, -1)


def _keep_sets(labels_by_backend, scores, features):
  """{density: {backend: [k] keep indices}} from pixel labels of each backend."""
  out = {}
  for density in DENSITIES:
    cfg = altp.ALTPConfig(density=density)
    out[density] = {}
    for backend, (labels, g_max) in labels_by_backend.items():
      tok = superpixels.token_labels(jnp.asarray(labels), GRID, g_max, mode=cfg.token_labels)
      out[density][backend] = np.asarray(altp.altp_select(
          jnp.asarray(scores), tok, K, config=cfg, num_segments=g_max,
          features=jnp.asarray(features) if density == "dispersion" else None))
  return out


def _picture(path, image, host, device, keep_host, keep_device):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from skimage.segmentation import mark_boundaries

  fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.3), dpi=72)
  axes[0].imshow(mark_boundaries(image, host, color=(1, 1, 0)))
  axes[0].set_title(f"host skimage: {metrics.num_segments(host)} segments", fontsize=9)
  axes[1].imshow(mark_boundaries(image, device, color=(0, 1, 1)))
  axes[1].set_title(f"device {DEFAULT}: {metrics.num_segments(device)} segments", fontsize=9)
  # Kept tokens: green = both, orange = host only, magenta = device only.
  overlay = (image * 0.45).astype(np.uint8)
  p = SIZE // GRID[0]
  kh, kd = set(keep_host.tolist()), set(keep_device.tolist())
  for idx in kh | kd:
    r, c = divmod(idx, GRID[1])
    colour = (60, 220, 60) if idx in kh and idx in kd else (
        (255, 150, 0) if idx in kh else (255, 0, 255))
    overlay[r * p:(r + 1) * p, c * p:(c + 1) * p] = (
        0.35 * image[r * p:(r + 1) * p, c * p:(c + 1) * p] + 0.65 * np.array(colour))
  axes[2].imshow(overlay)
  axes[2].set_title(f"keep k={K}: Jaccard {metrics.jaccard(keep_host, keep_device):.2f}",
                    fontsize=9)
  for ax in axes:
    ax.axis("off")
  fig.tight_layout(pad=0.4)
  # bbox "tight" keeps the panel titles inside the saved picture.
  fig.savefig(path, bbox_inches="tight", pad_inches=0.05,
              pil_kwargs={"quality": 80, "optimize": True})
  plt.close(fig)


def _bench_section(path, title, note=None):
  lines = [f"### {title}", ""]
  if not path or not os.path.exists(path):
    return lines + ["*Not measured yet.*", ""]
  with open(path) as f:
    b = json.load(f)
  lines += [f"From `{path}`: `{b['device_kind']}` ({b['backend']}, {b['num_devices']} "
            f"device(s), {b['cpu_count']} CPU cores), JAX {b['jax']}, {b['size']}x{b['size']}, "
            f"{b['iterations']} iterations, median of {b['reps']} runs after a warm-up.", ""]
  if note:
    lines += [note, ""]
  lines += ["Device SLIC alone:", "",
            "| n_segments (centres) | radius | batch | ms / batch | ms / image | compile s |",
            "|---|---|---|---|---|---|"]
  for r in b["device_slic"]:
    lines.append(f"| {r['n_segments']} ({r['num_centres']}) | {r['radius']} | {r['batch']} | "
                 f"{r['ms_per_batch_median']:.2f} | {r['ms_per_image_median']:.3f} | "
                 f"{r['compile_s']:.1f} |")
  if b.get("connectivity"):
    lines += ["", "Device connectivity pass alone (on device SLIC labels):", "",
              "| n_segments (centres) | batch | ms / batch | ms / image |", "|---|---|---|---|"]
    for r in b["connectivity"]:
      lines.append(f"| {r['n_segments']} ({r['num_centres']}) | {r['batch']} | "
                   f"{r['ms_per_batch_median']:.2f} | {r['ms_per_image_median']:.3f} |")
  lines += ["", "Host skimage SLIC (with connectivity), one image at a time on this machine's CPU:",
            "", "| n_segments | ms / image (median) | ms / image (mean) |", "|---|---|---|"]
  for r in b["host_slic"]:
    lines.append(f"| {r['n_segments']} | {r['ms_per_image_median']:.1f} | "
                 f"{r['ms_per_image_mean']:.1f} |")
  if b.get("pipeline"):
    lines += ["", "Full image -> keep indices program (`pipeline.device_keep_indices`, "
              "density `score_mass`):", "",
              "| radius | connectivity pass | batch | ms / batch | ms / image |",
              "|---|---|---|---|---|"]
    for r in b["pipeline"]:
      conn = ("yes" if r["connectivity"] else "no") if "connectivity" in r else (
          "no (run before the pass existed)")
      lines.append(f"| {r['radius']} | {conn} | {r['batch']} | {r['ms_per_batch_median']:.2f} | "
                   f"{r['ms_per_image_median']:.3f} |")
  return lines + [""]


def _skimage_pass(labels, g):
  """skimage's own connectivity pass (its Cython helper) applied to device labels."""
  seg = labels.size / g
  return _enforce_label_connectivity_cython(labels[None].astype(np.intp), int(0.5 * seg),
                                            int(3 * seg), start_label=0)[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--docs", default="docs")
  parser.add_argument("--bench-cpu", default=None, help="slic_bench.json from a CPU run")
  parser.add_argument("--bench-gpu", default=None, help="slic_bench.json from a GPU run")
  args = parser.parse_args(argv)
  img_dir = os.path.join(args.docs, "img")
  os.makedirs(img_dir, exist_ok=True)

  n_seg = altp.ALTPConfig().n_segments(K)
  host_max = 2 * n_seg  # the host back end's default id bound
  g_slic = slic_device.num_centres(SIZE, SIZE, n_seg)
  photos = slic_photos.load(SIZE)
  batch = jnp.asarray(np.stack([img for _, img in photos]))
  cfg0 = altp.ALTPConfig()
  labels = {name: np.asarray(pipeline.device_pixel_labels(
      batch, n_segments=n_seg, config=cfg0, radius=radius, connectivity=conn))
            for name, radius, conn in VARIANTS}
  g_of = {name: pipeline.device_num_segments(SIZE, SIZE, n_seg, conn)
          for name, _, conn in VARIANTS}

  rows = []
  jac = {(v, d, s): [] for v, _, _ in VARIANTS for d in DENSITIES for s in SCORE_SOURCES}
  context = {}
  for i, (name, image) in enumerate(photos):
    host = superpixels.slic_labels(image, n_segments=n_seg, max_segments=host_max)
    # Raw skimage labels (centre ids, no connectivity pass): the same problem as device SLIC's.
    host_raw = segmentation.slic(image, n_segments=n_seg, compactness=10.0, start_label=0,
                                 enforce_connectivity=False)
    by_backend = {"host": (host, host_max)}
    by_backend.update({v: (labels[v][i], g_of[v]) for v, _, _ in VARIANTS})
    # Context: how much do other choices move the keep set against the host's?
    exact = _skimage_pass(labels["r2"][i], g_slic)
    by_backend.update({
        "host, no connectivity pass": (superpixels.slic_labels(
            image, n_segments=n_seg, max_segments=host_max, enforce_connectivity=False),
                                       host_max),
        "host, compactness 9.5": (superpixels.slic_labels(
            image, n_segments=n_seg, max_segments=host_max, compactness=9.5), host_max),
        "device r2 + skimage's own pass (host)": (exact, int(exact.max()) + 1),
    })
    feats = _patch_features(image)
    for s in SCORE_SOURCES:
      keeps = _keep_sets(by_backend, _scores(s, image), feats)
      for d in DENSITIES:
        for v in by_backend:
          j = metrics.jaccard(keeps[d]["host"], keeps[d][v])
          if v == "host":
            continue
          if (v, d, s) in jac:
            jac[(v, d, s)].append(j)
          else:
            context.setdefault(v, []).append(j)
      if s == "sobel":
        _picture(os.path.join(img_dir, f"slic_{name}.jpg"), image, host, labels[DEFAULT][i],
                 keeps["dispersion"]["host"], keeps["dispersion"][DEFAULT])
    for v, radius, conn in VARIANTS:
      dev = labels[v][i]
      raw = labels[f"r{radius}"][i]
      row = {"photo": name, "variant": v, "host_segments": metrics.num_segments(host),
             "device_segments": metrics.num_segments(dev),
             "br": metrics.boundary_recall(dev, host, 2),
             "use": metrics.undersegmentation_error(dev, host),
             "asa": metrics.achievable_segmentation_accuracy(dev, host),
             "same_as_raw": float((raw == host_raw).mean()),
             "jaccard": statistics.fmean([jac[(v, d, s)][-1] for d in DENSITIES
                                          for s in SCORE_SOURCES])}
      rows.append(row)
    print(name, {x["variant"]: round(x["jaccard"], 3) for x in rows[-len(VARIANTS):]},
          flush=True)

  # The jitted front door gives the same keep set as the composition used above.
  scores0 = jnp.asarray(np.stack([_scores("random0", img) for _, img in photos]))
  cfg = altp.ALTPConfig(density="score_mass")
  via_pipeline = np.asarray(pipeline.keep_indices(batch, scores0, k=K, grid=GRID, config=cfg))
  direct = np.asarray(altp.altp_select(
      scores0, superpixels.token_labels(jnp.asarray(labels[DEFAULT]), GRID, g_of[DEFAULT]), K,
      config=cfg, num_segments=g_of[DEFAULT]))
  assert np.array_equal(via_pipeline, direct), "pipeline.keep_indices disagrees with its parts"

  mean = statistics.fmean
  all_of = lambda v: [x for d in DENSITIES for s in SCORE_SOURCES for x in jac[(v, d, s)]]
  worst_of = lambda v: min(mean(jac[(v, d, s)]) for d in DENSITIES for s in SCORE_SOURCES)
  out = [
      "# Superpixels on the accelerator: device SLIC vs host SLIC", "",
      "*Generated by `python -m eval.slic_report --bench-cpu docs/bench/slic_cpu.json "
      "--bench-gpu docs/bench/slic_h100.json` (quality, pictures) from `python -m "
      "eval.bench_slic` runs (speed); do not edit by hand.*", "",
      "ALTP's Detail Density Capture needs superpixels of the model input (GLaMM: 336x336). "
      "`altp_jax.slic_device.slic` is a jit-compiled JAX SLIC with skimage's conventions (Lab "
      "as `rgb2lab` D65, skimage's centre grid, `d_lab^2/m^2 + d_xy^2/S^2`, fixed iterations, "
      "the first assignment spatial only) in a fixed shape: each pixel compares only the "
      "centres of the `(2r+1)^2` grid cells around its own (r = `radius`), plus skimage's 2S "
      "window; empty centres keep their place. "
      "`altp_jax.connectivity_device.enforce_connectivity_device` is skimage's connectivity "
      "pass in fixed shapes (4-connected pieces by FastSV hooking and pointer jumping; pieces "
      "under `0.5 H W / centres` pixels join an earlier neighbour, chosen by an approximation "
      "of skimage's BFS order). `altp_jax.pipeline.device_keep_indices` runs SLIC (default "
      "radius 2), the pass, token labels and `altp_select` as one jitted program; "
      "`pipeline.keep_indices(..., superpixels='device'|'host')` switches back ends.", "",
      "## Set-up", "",
      f"- Photos: {', '.join(n for n, _ in photos)} (scikit-image's bundled images; the left "
      "view of stereo_motorcycle; camera is grayscale, replicated to RGB), resized like CLIP "
      f"(shortest side to {SIZE}, bicubic, centre crop).",
      f"- 90% reduction: k = {K} of {GRID[0] * GRID[1]} tokens ({GRID[0]}x{GRID[1]} grid, 14 px "
      f"patches); ALTP default n_segments = round(0.5 k) = {n_seg}; compactness 10, sigma 0, "
      f"10 iterations on both back ends.",
      f"- Host: skimage `slic` with its connectivity pass, ids bounded by {host_max}. Device: "
      f"{g_slic} grid centres; ids bounded by {g_slic} without the pass and by "
      f"{g_of[DEFAULT]} (= H W // min_size) with it.",
      "- Device variants: `r1`/`r2` = SLIC with radius 1 (3x3 candidates) or 2 (5x5), no "
      "connectivity pass; `+ pass` = followed by the device connectivity pass. "
      f"`{DEFAULT}` is the pipeline default.",
      "- Reference for the segmentation metrics: the host segmentation. BR = boundary recall at "
      "2 px; USE = Neubert-Protzel under-segmentation error (0 is best); ASA = achievable "
      "segmentation accuracy; 'same px' = share of pixels where the device SLIC (before any "
      "pass) has the very same centre id as skimage *without* its pass (the same optimisation "
      "problem).",
      "- Keep-set overlap needs scores and features, and no vision tower runs here, so these "
      "are stand-ins: scores = the patch's mean Sobel magnitude (`sobel`) or seeded uniform "
      "noise (`random0..2`); features (for `dispersion`) = the raw 14x14x3 patch. Jaccard = "
      "|host keep & device keep| / |host keep | device keep|, for each photo, density "
      f"({', '.join(DENSITIES)}) and score stand-in.", "",
      "## ALTP keep sets: what each change did (mean Jaccard vs host superpixels, k = 58)", "",
      "| device variant | mean Jaccard (all) | worst (density, scores) mean | worst photo | "
      "segments (mean) |", "|---|---|---|---|---|"]
  for v, _, _ in VARIANTS:
    sel = [x for x in rows if x["variant"] == v]
    out.append(f"| {v}{' (default)' if v == DEFAULT else ''} | {mean(all_of(v)):.3f} | "
               f"{worst_of(v):.3f} | {min(x['jaccard'] for x in sel):.3f} | "
               f"{mean([x['device_segments'] for x in sel]):.1f} |")
  out += ["", f"Host segments (mean): {mean([x['host_segments'] for x in rows]):.1f}. "
          "Radius 2 alone barely helps (the device keeps all 25 centre ids while skimage's pass "
          "dissolves fragments); the pass alone helps more; together they close most of the gap, "
          "because radius 2 makes the device SLIC solve nearly the same clustering as skimage "
          "('same px' below) and the pass then dissolves the same fragments.", "",
          f"Acceptance (mean Jaccard >= 0.8 at 90% reduction), default `{DEFAULT}`: mean over "
          f"all photos, densities and score stand-ins **{mean(all_of(DEFAULT)):.3f}**; lowest "
          f"mean for a single (density, scores) pair **{worst_of(DEFAULT):.3f}** "
          f"({'met' if worst_of(DEFAULT) >= 0.8 else 'NOT met'}).", "",
          f"Per density and score stand-in, default `{DEFAULT}`:", "",
          "| density | " + " | ".join(SCORE_SOURCES) + " | all |",
          "|---|" + "---|" * (len(SCORE_SOURCES) + 1)]
  for d in DENSITIES:
    vals = [mean(jac[(DEFAULT, d, s)]) for s in SCORE_SOURCES]
    allv = mean([x for s in SCORE_SOURCES for x in jac[(DEFAULT, d, s)]])
    out.append(f"| {d} | " + " | ".join(f"{x:.3f}" for x in vals) + f" | {allv:.3f} |")
  out += ["", "### Context: how far other choices move the keep set", "",
          "Mean Jaccard against the host keep set over all photos, densities and score stand-ins. "
          "Even a small host change (compactness 9.5) moves it by about 0.1, so ~0.9 is the "
          "practical ceiling. 'skimage's own pass' applies skimage's Cython connectivity helper "
          "to the device r2 labels: the gap to the device pass is the approximation of skimage's "
          "BFS order in choosing which neighbour a fragment joins.", "",
          "| compared with host | mean Jaccard |", "|---|---|"]
  out += [f"| {v} | {mean(vals):.3f} |" for v, vals in context.items()]
  out += [f"| device {DEFAULT} | {mean(all_of(DEFAULT)):.3f} |", ""]
  out += ["## Quality: segmentations per photo", "",
          "Boundary recall rewards extra boundaries, so the raw device output (25 segments "
          "against the host's ~16) scores higher on BR than the merged one; USE and ASA, which "
          "penalise segments straddling host segments, improve several-fold with the pass.", ""]
  for v in ("r1", DEFAULT):
    sel = [x for x in rows if x["variant"] == v]
    out += [f"### device `{v}`", "",
            "| photo | host segs | device segs | BR@2 | USE | ASA | same px | Jaccard (mean) |",
            "|---|---|---|---|---|---|---|---|"]
    for x in sel:
      out.append(f"| {x['photo']} | {x['host_segments']} | {x['device_segments']} | "
                 f"{x['br']:.3f} | {x['use']:.3f} | {x['asa']:.3f} | {x['same_as_raw']:.3f} | "
                 f"{x['jaccard']:.3f} |")
    out.append("| **mean** | " + " | ".join(
        f"{mean([x[key] for x in sel]):.{1 if 'segments' in key else 3}f}"
        for key in ("host_segments", "device_segments", "br", "use", "asa", "same_as_raw",
                    "jaccard")) + " |")
    out.append("")
  out += ["## Pictures", "",
          "Left: host superpixel boundaries (yellow). Middle: device (cyan), "
          f"`{DEFAULT}`. Right: the ALTP keep sets (density `dispersion`, Sobel scores): green "
          "kept by both, orange host only, magenta device only.", ""]
  for name, _ in photos:
    out.append(f"![{name}](img/slic_{name}.jpg)")
  out += ["", "## Speed", "",
          "Device per-image cost is the batch time divided by the batch size. The host path is "
          "skimage on one CPU core per image.", ""]
  out += _bench_section(args.bench_cpu, "CPU (this development machine: 2 shared cores)",
                        note="CPU timings on a machine shared with other jobs are noisy.")
  gpu_note = None
  if args.bench_gpu and os.path.exists(args.bench_gpu):
    with open(args.bench_gpu) as f:
      if "connectivity" not in json.load(f):
        gpu_note = (
            "**Measured before the device connectivity pass existed**: the SLIC rows are "
            "unchanged by it (same code), but the pass alone and the pipeline with it (the new "
            "default) still need an H100 run: `python -m eval.bench_slic --out results/gpu` "
            "then `cp results/gpu/slic_bench.json docs/bench/slic_h100.json` and rerun this "
            "report. Acceptance (device SLIC at 336x336, batch 64, <= 1 ms per image) is met by "
            "both radii: see the batch-64 rows.")
  gpu = _bench_section(args.bench_gpu, "GPU (H100)", note=gpu_note)
  if gpu[2] == "*Not measured yet.*":
    gpu[2] = ("*To be filled by the lead from `python -m eval.bench_slic --out results/gpu` on "
              "an H100, then `python -m eval.slic_report --bench-gpu "
              "results/gpu/slic_bench.json`.*")
  out += gpu
  with open(os.path.join(args.docs, "SUPERPIXELS.md"), "w") as f:
    f.write("\n".join(out) + "\n")
  print("wrote", os.path.join(args.docs, "SUPERPIXELS.md"))


if __name__ == "__main__":
  main()
