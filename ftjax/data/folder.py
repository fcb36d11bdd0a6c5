"""Image folders: ``root/<class>/**/*.{jpg,jpeg,png,webp,bmp}``.

Class names are the sub-folder names in sorted order (so label numbers are stable
across machines); a class's images are every image file anywhere under its folder,
in torchvision ``ImageFolder``'s order (see :func:`image_paths`), symbolic links
followed; hidden files and folders (``.ipynb_checkpoints``) are skipped at every
level, and files with other extensions are ignored. Splits are ``train`` and ``val``:
either two roots, or one root split per class by a seeded fraction.

A file that does not decode is skipped with a warning naming it and counted in
``Dataset.skipped`` (``on_corrupt="skip"``), or is an error (``"error"``).

Every image is read as 8-bit RGB (:func:`to_rgb8`): 16-bit greyscale PNGs keep
their top 8 bits, as Pillow already does for 16-bit colour PNGs.
"""

from __future__ import annotations

import errno
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from ftjax.data.dataset import Dataset
from ftjax.errors import ConfigError, DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Image formats a class folder may hold that are not read: scan() warns about them.
OTHER_IMAGES = (".tif", ".tiff", ".gif", ".jfif", ".jpe", ".ppm", ".pgm", ".pbm", ".pnm", ".heic",
                ".avif", ".jp2")
SPLITS = ("train", "val")
LAYOUT_HINT = "expected root/<class>/<images>, images at any depth under <class>"
# Folder names that are splits, not classes: a root holding only these is one level too high.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")
# What Pillow raises on a damaged file: truncated data, bad headers, absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
  """By extension, case-insensitive; hidden files are not images.

  >>> [is_image_file(n) for n in ("a.JPG", "b.webp", "notes.txt", ".c.png")]
  [True, True, False, False]
  """
  return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _is(entry: os.DirEntry, kind: str) -> bool:
  """``entry.is_dir()`` or ``entry.is_file()`` (symbolic links followed); a link that does not
  resolve for a reason other than a missing target is an error naming it."""
  try:
    return entry.is_dir() if kind == "dir" else entry.is_file()
  except OSError as e:
    # A link to itself, or a ring of links, fails stat with ELOOP (os.walk would file it
    # silently as a file); a missing target is False above, as os.walk takes it.
    loop = e.errno == errno.ELOOP
    raise DataError("symbolic-link cycle in an image folder" if loop else "image folder entry does not read",
                    where=entry.path, value=f"{type(e).__name__}: {e.strerror}",
                    hint="remove the link or point it at a file or folder" if loop
                    else "check its permissions") from None


def _folders(folder: str, ancestors: tuple[str, ...] = ()) -> Iterator[tuple[str, list]]:
  """(path, non-hidden ``os.DirEntry`` list) of ``folder`` and of every non-hidden folder
  under it, symbolic links followed; a link back to a folder it is inside is an error."""
  real = os.path.realpath(folder)
  if real in ancestors:
    # os.walk(followlinks=True), and so torchvision, would go round until the path is
    # too long for the OS (40 links deep on Linux): each image read 41 times or more.
    raise DataError("symbolic-link cycle in an image folder", where=folder,
                    value=f"the same folder as {real}",
                    hint="remove the link that points back to a folder containing it")
  try:
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
  except OSError as e:
    raise DataError("image folder does not read", where=folder, value=f"{type(e).__name__}: {e}",
                    hint="check its permissions") from None
  yield folder, entries
  for e in entries:
    if _is(e, "dir"):
      yield from _folders(e.path, ancestors + (real,))


def image_paths(folder: str) -> tuple[list[str], list[str]]:
  """(image paths at any depth under ``folder``, paths of images in other formats there).

  The order is torchvision ``ImageFolder``'s (``sorted(os.walk(folder, followlinks=True))``,
  then each folder's files sorted): folders by their path, then files by name. So a
  folder's own files come before those of its sub-folders, and ``a-b/`` before ``a/x/``
  ('-' sorts before '/'); sorting whole paths would put ``z.png`` last instead.
  Unlike torchvision, hidden files and folders are skipped, a symbolic-link cycle
  is a :class:`DataError` rather than the same images read 41 times over, and links
  named as images whose target is missing are left out with a warning naming one
  (torchvision fails on them when it reads them, or skips them silently).

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> for name in ("z.png", "a/c.png", "a-b/d.png", "a/x/e.png", "a/f.tif", ".ckpt/g.png"):
  ...   os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
  ...   open(os.path.join(d, name), "wb").close()
  >>> [[os.path.relpath(p, d) for p in group] for group in image_paths(d)]
  [['z.png', 'a/c.png', 'a-b/d.png', 'a/x/e.png'], ['a/f.tif']]
  """
  images, others, broken = [], [], []
  for path, entries in sorted(_folders(folder), key=lambda f: f[0]):
    names = sorted(e.name for e in entries if _is(e, "file"))
    images += [os.path.join(path, n) for n in names if is_image_file(n)]
    others += [os.path.join(path, n) for n in names if n.lower().endswith(OTHER_IMAGES)]
    broken += sorted(e.path for e in entries if is_image_file(e.name) and e.is_symlink()
                     and not os.path.exists(e.path))
  if broken:
    what = ("a symbolic link to a missing file (" if len(broken) == 1
            else f"{len(broken)} symbolic links to missing files (e.g. ")
    warnings.warn(f"ftjax: {folder}: not read: {what}{os.path.relpath(broken[0], folder)} -> "
                  f"{os.readlink(broken[0])})", stacklevel=2)
  return images, others


def scan(root: str) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted sub-folders) and each class's image paths (:func:`image_paths`)."""
  if not os.path.isdir(root):
    raise DataError("image folder not found", where=root, value=None, hint=LAYOUT_HINT)
  classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and _is(e, "dir"))
  if not classes:
    raise DataError("no class folders", where=root, value=0, hint=LAYOUT_HINT)
  if all(c.lower() in SPLIT_NAMES for c in classes):
    # Images in sub-folders are read, so root/train/<class>/... would train on 'train' vs 'val'.
    raise DataError("class folders are split names", where=root, value=", ".join(classes),
                    hint="point root at the split's folder (root/train), or set train_root "
                         "and val_root")
  files, left_out = [], []
  for c in classes:
    folder = os.path.join(root, c)
    images, others = image_paths(folder)
    left_out += [os.path.relpath(p, root) for p in others]
    if not images:
      raise DataError("empty class folder", where=folder, value="0 images",
                      hint=f"add images ({', '.join(EXTENSIONS)}) or remove the folder")
    files.append(images)
  if left_out:  # images a user may think are in the set, and are not
    warnings.warn(f"ftjax: {root}: not read: {len(left_out)} images in other formats inside "
                  f"class folders (e.g. {left_out[0]}); only {{{','.join(EXTENSIONS)}}} files "
                  "are read", stacklevel=2)
  return classes, files


# Pillow's modes for samples wider than 8 bits: 16-bit greyscale PNGs open as "I;16" ("I" in
# older Pillow), 32-bit data as "I" or "F". ``convert("RGB")`` casts their numbers without
# scaling them, so everything above 255 turns white.
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb8(im: Image.Image) -> Image.Image:
  """``im`` as 8-bit RGB, scaled to 8 bits where its samples are wider.

  Integer modes are 16-bit data (what a PNG can hold): ``value >> 8``, the byte
  Pillow keeps of a 16-bit colour PNG and torchvision's ``to_dtype(uint8, scale=True)``;
  an 8-bit image saved as 16 bits (``v * 257``) reads back exactly.  Float images
  are 0..1 (torchvision's and scikit-image's convention), rounded.

  >>> ramp = Image.fromarray(np.array([[0, 255, 256, 32768, 65535]], np.uint16))
  >>> ramp.mode, np.asarray(to_rgb8(ramp))[0, :, 0].tolist()
  ('I;16', [0, 0, 1, 128, 255])
  >>> np.asarray(to_rgb8(Image.fromarray(np.array([[-1, 0.5, 2]], np.float32))))[0].tolist()
  [[0, 0, 0], [128, 128, 128], [255, 255, 255]]
  """
  if im.mode in _INT_MODES:
    # int64: "I" is signed 32-bit, and a negative value must clip, not wrap.
    im = Image.fromarray((np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8))
  elif im.mode == "F":
    im = Image.fromarray(np.rint(np.clip(np.asarray(im), 0.0, 1.0) * 255).astype(np.uint8))
  return im if im.mode == "RGB" else im.convert("RGB")  # RGB: no copy of a large photo


def decode(path: str) -> Image.Image:
  """Opens and decodes ``path`` as 8-bit RGB."""
  with Image.open(path) as im:
    rgb = to_rgb8(im)
    # An RGB file comes back as the opened image itself, which closing frees: copy it then
    # only (a converted image is already new; copying first would copy every pixel twice).
    return rgb.copy() if rgb is im else rgb


class ImageFile:
  """A file whose header is read but whose pixels are not: the crop is chosen first,
  then a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that still gives the
  crop at least ``out_size`` pixels a side: for a crop much larger than the output
  (big photos, eval resizes) most of the decoding work is never done.

  >>> import tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "a.jpg")
  >>> Image.new("RGB", (800, 600), (9, 9, 9)).save(path)
  >>> im, box = ImageFile(path).decode_region((0, 0, 800, 600), out_size=64)
  >>> im.size, box  # decoded at 1/8 scale: the box follows
  ((100, 75), (0.0, 0.0, 100.0, 75.0))
  """

  def __init__(self, path: str):
    self.path = path
    try:
      self.image = Image.open(path)  # reads the header only
    except DECODE_ERRORS as e:
      raise DataError("image does not decode", where=path, value=f"{type(e).__name__}: {e}",
                      hint="remove or replace the file") from None
    self.size = self.image.size
    self.width, self.height = self.size

  def decode_region(self, box, out_size: int):
    """(decoded RGB image, ``box`` in its pixels) for a crop of ``box`` resized to ``out_size``."""
    try:
      bw, bh = box[2] - box[0], box[3] - box[1]
      if self.image.format == "JPEG" and min(bw, bh) >= 2 * out_size:
        drafted = self.image.draft("RGB", (math.ceil(self.width * out_size / bw),
                                           math.ceil(self.height * out_size / bh)))
        if drafted is not None:
          # (mode, the whole image in the reduced grid): its size / the original = 1 / scale,
          # exact, where the reduced size itself is rounded up.
          f = drafted[1][2] / self.width
          box = (box[0] * f, box[1] * f, box[2] * f, box[3] * f)
      self.image.load()  # decodes, and closes the file Pillow opened
    except DECODE_ERRORS as e:
      self.image.close()
      raise DataError("image does not decode", where=self.path, value=f"{type(e).__name__}: {e}",
                      hint="remove or replace the file") from None
    return to_rgb8(self.image), tuple(float(b) for b in box)


def check_decodes(path: str) -> str | None:
  """None when ``path`` decodes, else the reason (every byte is decoded; JPEG at 1/8 scale)."""
  try:
    with Image.open(path) as im:
      if im.format == "JPEG":
        im.draft("RGB", (1, 1))
      im.load()
  except DECODE_ERRORS as e:
    return f"{type(e).__name__}: {e}"
  return None


class FolderSource:
  """Reads image files by record number."""

  in_memory = False

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, j: int) -> Image.Image:
    return self.open(j).decode_region((0, 0, 1, 1), out_size=1 << 30)[0]  # never reduced

  def open(self, j: int) -> ImageFile:
    return ImageFile(self.paths[j])

  def describe(self, j: int) -> str:
    return self.paths[j]


def _fraction_split(files: list[list[str]], fraction: float, seed: int, split: str):
  out = []
  for c, paths in enumerate(files):
    order = np.random.default_rng([seed, c]).permutation(len(paths))
    n_val = int(round(fraction * len(paths)))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    out.append([paths[k] for k in sorted(chosen)])
  return out


def _verify(paths: list[str], labels: list[int], on_corrupt: str):
  good_paths, good_labels, skipped = [], [], []
  for p, y in zip(paths, labels):
    reason = check_decodes(p)
    if reason is None:
      good_paths.append(p)
      good_labels.append(y)
      continue
    if on_corrupt == "error":
      raise DataError("corrupt image", where=p, value=reason,
                      hint="remove the file or set config.data.on_corrupt=skip")
    warnings.warn(f"ftjax: skipping corrupt image {p}: {reason}", stacklevel=2)
    skipped.append(p)
  return good_paths, good_labels, skipped


def load(config, split: str) -> Dataset:
  """The ``split`` ("train" or "val") of the folder source described by the data config."""
  if split not in SPLITS:
    raise ConfigError("unknown split for a folder source", where="split", value=repr(split),
                      hint=f"folder splits are {', '.join(SPLITS)}: set config.data.train_split "
                           "and config.data.eval_splits (--config.data.eval_splits='[\"val\"]')")
  if config.train_root:
    classes, files = scan(config.train_root)
    root = config.train_root
    if split == "val":
      if not config.val_root:
        raise ConfigError("no val_root for the val split", where="config.data.val_root", value=None)
      root = config.val_root
      val_classes, files = scan(root)
      if val_classes != classes:
        missing = sorted(set(classes) ^ set(val_classes))
        raise DataError("val_root classes differ from train_root classes", where=root,
                        value=f"{len(val_classes)} vs {len(classes)} classes",
                        hint=f"classes in only one of them: {', '.join(missing[:8]) or 'order'}")
  else:
    root = config.root
    classes, files = scan(root)
    if split == "val" and config.val_fraction == 0:
      raise ConfigError("the val split of a single root needs val_fraction > 0",
                        where="config.data.val_fraction", value=0.0)
    files = _fraction_split(files, config.val_fraction, config.split_seed, split)
  paths = [p for group in files for p in group]
  labels = [c for c, group in enumerate(files) for _ in group]
  skipped = []
  if config.verify_images:
    paths, labels, skipped = _verify(paths, labels, config.on_corrupt)
  if not paths:
    raise DataError("zero examples", where=f"{root} ({split})", value=0,
                    hint="check val_fraction and that the images decode")
  return Dataset(FolderSource(paths), name=f"{root}[{split}]", class_names=classes,
                 labels=labels, skipped=skipped)
