"""RandAugment (Cubuk et al. 2019): ``num_ops`` operations drawn uniformly, one magnitude.

Magnitude is on the paper's 0..10 scale. Geometric operations (rotate up to 30
degrees, shear 0.3, translate 0.45 of the side) pick a random sign, as timm and
big_vision do; colour enhancements are ``1 +- 0.9 * level``, also with a random
sign, as in timm's increasing variant (``rand-m9-n2-inc1``; timm's default and
big_vision use ``0.1 + 1.8 * level``, no sign, which at magnitude 5 does nothing).
Every drawn operation is applied (timm applies each with probability 0.5) and
``identity`` is one of them; timm's Invert and SolarizeAdd are not. All operations
are Pillow calls on the (already cropped) output image, so the cost is a few
small-image passes.

>>> import numpy as np
>>> from PIL import Image
>>> im = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
>>> out = apply(im, np.random.default_rng(0), num_ops=2, magnitude=9)
>>> out.size, out.mode
((8, 8), 'RGB')
>>> OPS[:4]
('identity', 'autocontrast', 'equalize', 'rotate')
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
FILL = (128, 128, 128)


def _affine(im: Image.Image, coeffs) -> Image.Image:
  return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=FILL)


def apply_op(im: Image.Image, op: str, level: float, sign: float) -> Image.Image:
  """One operation at ``level`` in [0, 1] (magnitude / 10) with ``sign`` +1 or -1.

  >>> im = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
  >>> np.asarray(apply_op(im, "solarize", 1.0, 1.0))[0, :, 0].tolist()  # threshold 0: all invert
  [255, 0]
  """
  if op == "identity":
    return im
  if op == "autocontrast":
    return ImageOps.autocontrast(im)
  if op == "equalize":
    return ImageOps.equalize(im)
  if op == "rotate":
    return im.rotate(sign * 30.0 * level, resample=Image.BILINEAR, fillcolor=FILL)
  if op == "solarize":
    return ImageOps.solarize(im, threshold=int(round(256 - 256 * level)))
  if op == "posterize":
    return ImageOps.posterize(im, max(1, int(round(8 - 4 * level))))
  enhancers = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
  if op in enhancers:
    return enhancers[op](im).enhance(1.0 + sign * 0.9 * level)
  if op == "shear_x":
    return _affine(im, (1, sign * 0.3 * level, 0, 0, 1, 0))
  if op == "shear_y":
    return _affine(im, (1, 0, 0, sign * 0.3 * level, 1, 0))
  if op == "translate_x":
    return _affine(im, (1, 0, sign * 0.45 * level * im.width, 0, 1, 0))
  if op == "translate_y":
    return _affine(im, (1, 0, 0, 0, 1, sign * 0.45 * level * im.height))
  raise ValueError(f"unknown RandAugment op {op!r}")


def apply(im: Image.Image, rng: np.random.Generator, num_ops: int, magnitude: float) -> Image.Image:
  """``num_ops`` operations chosen by ``rng`` (with replacement) at ``magnitude`` (0..10)."""
  ops = rng.integers(0, len(OPS), size=num_ops)
  signs = np.where(rng.random(num_ops) < 0.5, -1.0, 1.0)
  for op, sign in zip(ops, signs):
    im = apply_op(im, OPS[op], magnitude / 10.0, float(sign))
  return im
