"""eval/preprocess.py against HF's CLIP image processor (PIL backend) and segment-anything's
ResizeLongestSide + GLaMM's normalise-and-pad, on real scikit-image photos."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from _eval_helpers import import_transformers
from eval.preprocess import (CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, clip_preprocess,
                             clip_resize_shape, load_image, sam_preprocess, sam_resize_shape, to_rgb)


def _rgba():
  rgb = skimage.data.chelsea()
  alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :].repeat(rgb.shape[0], 0)
  return np.concatenate([rgb, alpha[..., None]], axis=2)


# Aspect ratios: square, landscape 1.5, portrait (transposed chelsea), short side < 336 (upscale).
IMAGES = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "chelsea_portrait": lambda: np.ascontiguousarray(skimage.data.chelsea().transpose(1, 0, 2)),
    "rocket": skimage.data.rocket,
    "coffee": skimage.data.coffee,
    "camera_gray": skimage.data.camera,
    "chelsea_rgba": _rgba,
}


def _pil_rgb(image):
  """What cv2.imread / PIL .convert("RGB") hand to GLaMM's preprocessors."""
  return np.asarray(Image.fromarray(image).convert("RGB"))


@pytest.fixture(scope="module")
def clip_processor():
  transformers = import_transformers()
  # openai/clip-vit-large-patch14-336 preprocessor_config.json.
  return transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
      do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
      do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
      do_convert_rgb=True)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_clip_matches_hf_processor(name, clip_processor):
  image = IMAGES[name]()
  ref = clip_processor(_pil_rgb(image), return_tensors="np")["pixel_values"][0]  # [3,336,336]
  got = clip_preprocess(image)
  assert got.shape == (336, 336, 3) and got.dtype == np.float32
  np.testing.assert_array_equal(got, ref.transpose(1, 2, 0))


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_sam_matches_segment_anything(name):
  from segment_anything.utils.transforms import ResizeLongestSide
  image = IMAGES[name]()
  rgb = _pil_rgb(image)
  resized = ResizeLongestSide(1024).apply_image(rgb)
  x = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
  x = (x - torch.tensor(SAM_MEAN).view(-1, 1, 1)) / torch.tensor(SAM_STD).view(-1, 1, 1)
  x = F.pad(x, (0, 1024 - x.shape[2], 0, 1024 - x.shape[1]))
  got, resize_hw = sam_preprocess(image)
  assert resize_hw == resized.shape[:2]
  assert got.shape == (1024, 1024, 3) and got.dtype == np.float32
  np.testing.assert_array_equal(got, x.permute(1, 2, 0).numpy())


def test_resize_shapes_by_hand():
  # Short side 300 -> 336; long side int(336 * 451 / 300) = int(505.12) = 505.
  assert clip_resize_shape(300, 451) == (336, 505)
  assert clip_resize_shape(451, 300) == (505, 336)
  # SAM: 1024 / 451 * 300 = 681.15 -> 681 (round half up via int(x + 0.5)).
  assert sam_resize_shape(300, 451) == (681, 1024)
  assert sam_resize_shape(427, 640) == (683, 1024)  # 683.2


def test_image_modes(tmp_path):
  gray = skimage.data.camera()
  for arr in (gray, gray[..., None]):
    out = to_rgb(arr)
    assert out.shape == gray.shape + (3,)
    assert (out == gray[..., None]).all()
  rgba = _rgba()
  np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])  # alpha dropped, not composited
  Image.fromarray(rgba).save(tmp_path / "a.png")
  np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), rgba[..., :3])
  Image.fromarray(gray).save(tmp_path / "g.png")
  np.testing.assert_array_equal(load_image(str(tmp_path / "g.png")), to_rgb(gray))
  Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
  with pytest.raises(ValueError, match="p.png: unsupported image mode 'P'"):
    load_image(str(tmp_path / "p.png"))
  Image.fromarray(skimage.data.chelsea()).convert("CMYK").save(tmp_path / "c.jpg")
  with pytest.raises(ValueError, match="c.jpg: unsupported image mode 'CMYK'"):
    load_image(str(tmp_path / "c.jpg"))
  with pytest.raises(ValueError, match="uint8"):
    to_rgb(gray.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
    to_rgb(np.zeros((4, 4, 2), np.uint8))


def test_load_image_applies_exif_orientation(tmp_path):
  image = skimage.data.chelsea()  # 300 x 451
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display, as cv2.imread does
  Image.fromarray(image).save(tmp_path / "r.png", exif=exif)
  out = load_image(str(tmp_path / "r.png"))
  assert out.shape == (451, 300, 3)
  np.testing.assert_array_equal(out, np.rot90(image, k=-1))
