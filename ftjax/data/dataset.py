"""A random-access labelled image set: ``ds.image(i)`` is uint8 HWC RGB, ``ds.label(i)`` an int.

Every source (built-in sets, folders, tfds, numpy arrays) is a :class:`Dataset` over a
*source* object that reads one record; subsets (splits, few-shot sampling) are index
views over the same source, so nothing is copied or read until an image is needed.

>>> import numpy as np
>>> ds = from_arrays(np.zeros((6, 4, 4), np.uint8), [0, 1, 2, 0, 1, 2])
>>> ds.num_examples, ds.num_classes, ds.class_names
(6, 3, ('0', '1', '2'))
>>> ds.image(0).shape  # grayscale becomes RGB
(4, 4, 3)
>>> few = take_per_class(ds, 1, seed=0)
>>> sorted(few.labels.tolist())
[0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ftjax.errors import DataError


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3); RGBA drops alpha.

  >>> to_rgb(np.zeros((2, 3), np.uint8)).shape
  (2, 3, 3)
  """
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    return np.ascontiguousarray(image[..., :3])
  return image


class ArraySource:
  """Images held in memory: uint8 [N, H, W] or [N, H, W, C]."""

  in_memory = True

  def __init__(self, images: np.ndarray):
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def read(self, j: int) -> Image.Image:
    return Image.fromarray(to_rgb(self.images[j]))

  def describe(self, j: int) -> str:
    return f"example {j}"


class Dataset:
  """Labelled images with random access.

  Attributes:
    name: where the data came from ("mnist5k/train", a folder path, "tfds:cifar10/train").
    class_names: label i is ``class_names[i]``.
    num_classes, num_examples: as named.
    labels: int32 [num_examples] (read on first use for tfds).
    index: the source records behind the examples (None: all, in order).
    skipped: files left out because they could not be decoded.
  """

  def __init__(self, source, *, name: str, class_names: Sequence[str], labels=None,
               index: np.ndarray | None = None, skipped: Sequence[str] = ()):
    self.source = source
    self.name = name
    self.class_names = tuple(str(c) for c in class_names)
    self._labels = None if labels is None else np.asarray(labels, np.int32)
    self.index = index
    self.skipped = tuple(skipped)
    self.cache: dict = {}  # transformed in-memory images, keyed by the transform

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_examples(self) -> int:
    if self.index is not None:
      return len(self.index)
    if self._labels is not None:
      return len(self._labels)
    return len(self.source)

  def __len__(self) -> int:
    return self.num_examples

  @property
  def labels(self) -> np.ndarray:
    if self._labels is None:
      # Sources without a label column (tfds) read every record's label once.
      labels = np.asarray(self.source.labels(self.index), np.int32)
      # tfds marks an unlabelled record -1 (ImageNet's test split): one-hot would make it
      # all zeros (no loss) and evaluation would index the last class.
      bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
      if len(bad):
        raise DataError("label out of range", where=self.describe(int(bad[0])),
                        value=f"label {labels[bad[0]]} of {self.num_classes} classes, "
                              f"{len(bad)} of {len(labels)} examples",
                        hint="-1 marks an unlabelled split: train and evaluate on labelled ones")
      self._labels = labels
    return self._labels

  def record(self, i: int) -> int:
    """The source record behind example ``i``."""
    return int(i) if self.index is None else int(self.index[i])

  def read(self, i: int) -> Image.Image:
    """Example ``i`` as an RGB PIL image."""
    return self.source.read(self.record(i))

  def open(self, i: int):
    """Example ``i`` for the loader: a PIL image, or for files not decoded yet an object
    with ``size`` and ``decode_region(box, out_size)`` (see ``ftjax.data.folder``)."""
    opener = getattr(self.source, "open", self.source.read)
    return opener(self.record(i))

  def image(self, i: int) -> np.ndarray:
    """Example ``i`` as uint8 [H, W, 3]."""
    return to_rgb(np.asarray(self.read(i)))

  def label(self, i: int) -> int:
    return int(self.labels[i])

  def describe(self, i: int) -> str:
    return self.source.describe(self.record(i))

  def subset(self, indices, *, name: str | None = None) -> "Dataset":
    """A view of the examples at ``indices`` (positions in this dataset)."""
    indices = np.asarray(indices, np.int64)
    base = np.arange(self.num_examples) if self.index is None else self.index
    return Dataset(self.source, name=name or self.name, class_names=self.class_names,
                   labels=self.labels[indices], index=base[indices], skipped=self.skipped)

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, num_examples={self.num_examples}, "
            f"num_classes={self.num_classes})")


def from_arrays(images, labels, class_names: Sequence[str] | None = None, *,
                name: str = "arrays") -> Dataset:
  """An in-memory Dataset from uint8 images [N, H, W] / [N, H, W, C] and int labels [N].

  Class names default to the label numbers; there are ``max(labels) + 1`` classes.

  >>> ds = from_arrays(np.zeros((2, 8, 8, 3), np.uint8), [1, 0], ["cat", "dog"])
  >>> ds.label(0), ds.class_names[ds.label(0)]
  (1, 'dog')
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.dtype != np.uint8:
    raise DataError("images must be uint8 (0..255)", where=name, value=str(images.dtype),
                    hint="scale and cast with .astype(np.uint8)")
  if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
    raise DataError("images must be [N, H, W] or [N, H, W, C] with C in 1, 3, 4", where=name,
                    value=images.shape)
  if 0 in images.shape[1:3]:  # the loader's resize divided by it: a ZeroDivisionError
    raise DataError("images have zero height or width", where=name, value=images.shape,
                    hint="images must be [N, H, W] or [N, H, W, C] with H, W >= 1")
  if labels.shape != (len(images),):
    raise DataError("labels must be [N] for N images", where=name,
                    value=f"{labels.shape} labels for {len(images)} images")
  if len(images) == 0:
    raise DataError("zero examples", where=name, value=0)
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise DataError("labels must be non-negative integers", where=name,
                    value=f"{labels.dtype}, min {labels.min()}")
  if class_names is None:
    class_names = [str(i) for i in range(int(labels.max()) + 1)]
  if labels.max() >= len(class_names):
    raise DataError("a label has no class name", where=name,
                    value=f"label {int(labels.max())} with {len(class_names)} class names")
  return Dataset(ArraySource(images), name=name, class_names=class_names, labels=labels)


def take_per_class(ds: Dataset, n: int, *, seed: int) -> Dataset:
  """Keeps ``n`` examples of every class, chosen by ``seed``, in dataset order.

  A class with fewer than ``n`` examples is an error: a few-shot study must not
  silently get fewer shots for one class.

  >>> ds = from_arrays(np.zeros((6, 2, 2), np.uint8), [0, 0, 0, 1, 1, 1])
  >>> take_per_class(ds, 2, seed=1).labels.tolist()
  [0, 0, 1, 1]
  """
  labels = ds.labels
  keep = []
  for c in range(ds.num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < n:
      raise DataError("too few examples for per_class", where=f"{ds.name} class {ds.class_names[c]!r}",
                      value=f"{len(members)} < {n}", hint="lower config.data.per_class")
    # One stream per class index: a class's pick depends on the seed, its index and its own
    # examples, not on other classes' sizes (a class added before it in sorted order does
    # shift its index, and so its pick).
    keep.append(np.random.default_rng([seed, c]).choice(members, n, replace=False))
  return ds.subset(np.sort(np.concatenate(keep)), name=f"{ds.name}[{n}/class]")


def empty_classes(ds: Dataset) -> tuple[str, ...]:
  """Names of the classes no example of ``ds`` carries: trained on, the model never sees them.

  A seeded ``val_fraction`` split can send every image of a small class to val.

  >>> ds = from_arrays(np.zeros((3, 2, 2), np.uint8), [0, 2, 2], ["cat", "dog", "emu"])
  >>> empty_classes(ds)
  ('dog',)
  """
  counts = np.bincount(ds.labels, minlength=ds.num_classes)
  return tuple(ds.class_names[c] for c in np.flatnonzero(counts == 0))


def check_num_classes(ds: Dataset, expected: int | None) -> None:
  """DataError when the config names a class count the data disagrees with."""
  if expected is not None and expected != ds.num_classes:
    raise DataError("class count disagrees with the config", where=ds.name,
                    value=f"data has {ds.num_classes}, config.data.num_classes is {expected}",
                    hint="fix num_classes or the data (class folders, dataset name)")


def check_classifiable(ds: Dataset) -> None:
  """DataError when ``ds`` has fewer than 2 classes: a classifier has nothing to tell apart.

  A one-class set reads fine (for features or prediction); trained on, it went to loss 0 and
  exited 0, having learnt nothing.

  >>> check_classifiable(from_arrays(np.zeros((2, 2, 2), np.uint8), [0, 0], ["cat"]))
  Traceback (most recent call last):
  ...
  ftjax.errors.DataError: ftjax: error: a classifier needs at least 2 classes (arrays): 1 class, 'cat'; \
give the data a second class (a class folder, a label)
  """
  if ds.num_classes < 2:
    raise DataError("a classifier needs at least 2 classes", where=ds.name,
                    value=f"{ds.num_classes} class, " + ", ".join(map(repr, ds.class_names)),
                    hint="give the data a second class (a class folder, a label)")
