"""Per-example preprocessing: resize and crop, inception crop, flip, RandAugment, normalise.

Each transform takes a PIL image (decoding gives one, and PIL resizes with
antialiasing) and randomness only from the ``numpy`` Generator it is handed, so the
loader makes every example's augmentation a function of (seed, epoch, example).
Crop and resize are one ``Image.resize(..., box=...)`` call: no intermediate image.

>>> import numpy as np
>>> from PIL import Image
>>> im = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
>>> p = Preprocess(image_size=4, crop_fraction=1.0)
>>> np.array_equal(p.apply(im), np.asarray(im))  # already the size: untouched
True
>>> normalize(np.full((1, 1, 1, 3), 255, np.uint8), mean=(0.5,) * 3, std=(0.5,) * 3)[0, 0, 0]
array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from ftjax.data import randaugment

Box = tuple[float, float, float, float]


def center_box(width: int, height: int, crop_fraction: float, resize: str) -> Box:
  """The source region that the eval transform maps onto the output square.

  "shorter_side": a centred square of side ``crop_fraction * min(w, h)`` (aspect kept);
  "squash": the centred ``crop_fraction`` of each side (aspect changed).

  >>> center_box(400, 300, 0.5, "shorter_side")
  (125.0, 75.0, 275.0, 225.0)
  """
  if resize == "squash":
    cw, ch = width * crop_fraction, height * crop_fraction
  else:
    cw = ch = min(width, height) * crop_fraction
  left, top = (width - cw) / 2, (height - ch) / 2
  return (left, top, left + cw, top + ch)


def inception_box(rng: np.random.Generator, width: int, height: int,
                  scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
  """An Inception-style random crop: area fraction in ``scale``, aspect ratio in ``ratio``
  (log-uniform); after 10 failed tries, the largest centred crop with a ratio in range.

  >>> inception_box(np.random.default_rng(0), 100, 100, (1.0, 1.0), (1.0, 1.0))
  (0.0, 0.0, 100.0, 100.0)
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    cw = round(math.sqrt(target * aspect))
    ch = round(math.sqrt(target / aspect))
    if 0 < cw <= width and 0 < ch <= height:
      left = int(rng.integers(0, width - cw + 1))
      top = int(rng.integers(0, height - ch + 1))
      return (float(left), float(top), float(left + cw), float(top + ch))
  in_ratio = width / height
  if in_ratio < ratio[0]:
    cw, ch = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    cw, ch = round(height * ratio[1]), height
  else:
    cw, ch = width, height
  left, top = (width - cw) // 2, (height - ch) // 2
  return (float(left), float(top), float(left + cw), float(top + ch))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What happens to one image between decoding and batching (hashable: a cache key)."""

  image_size: int
  resize: str = "shorter_side"
  crop_fraction: float = 0.875
  random_resized_crop: bool = False
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  randaugment_num_ops: int = 0
  randaugment_magnitude: float = 9.0

  @classmethod
  def from_config(cls, config, image_size: int, *, train: bool) -> "Preprocess":
    """Eval (``train=False``) drops every random transform."""
    aug = config.augment
    return cls(image_size=int(image_size), resize=config.resize,
               crop_fraction=float(config.crop_fraction),
               random_resized_crop=train and bool(aug.random_resized_crop),
               scale=tuple(float(s) for s in aug.scale), ratio=tuple(float(r) for r in aug.ratio),
               flip=train and bool(aug.flip),
               randaugment_num_ops=int(aug.randaugment_num_ops) if train else 0,
               randaugment_magnitude=float(aug.randaugment_magnitude))

  @property
  def random(self) -> bool:
    """Whether the output depends on the random generator."""
    return self.random_resized_crop or self.flip or self.randaugment_num_ops > 0

  def apply(self, im, rng: np.random.Generator | None = None) -> np.ndarray:
    """PIL image (or a file not decoded yet, see ``folder.ImageFile``) -> uint8 [size, size, 3]."""
    s = self.image_size
    width, height = im.size
    if self.random_resized_crop:
      box = inception_box(rng, width, height, self.scale, self.ratio)
    else:
      box = center_box(width, height, self.crop_fraction, self.resize)
    if hasattr(im, "decode_region"):
      im, box = im.decode_region(box, s)  # decodes only as finely as the crop needs
    if box == (0.0, 0.0, float(s), float(s)) and im.size == (s, s):
      out = im
    else:
      out = im.resize((s, s), Image.BILINEAR, box=box)
    if self.flip and rng.random() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if self.randaugment_num_ops:
      out = randaugment.apply(out, rng, self.randaugment_num_ops, self.randaugment_magnitude)
    return np.asarray(out, np.uint8)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32 ``(x / 255 - mean) / std`` (mean, std on the 0..1 scale)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # Two passes over the batch instead of three; equal to the formula up to float rounding.
  # The loader's on-device normalisation does the same arithmetic, bit for bit.
  return (images.astype(np.float32) - 255.0 * mean) * (1.0 / (255.0 * std))
