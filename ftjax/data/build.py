"""``build(config, split=...)``: the Dataset a data config names.

Config errors are raised before any data is read; bad data raises DataError.

>>> from ftjax.data.config import default_config
>>> c = default_config()
>>> c.source, c.per_class = "digits", 3
>>> ds = build(c, split="train")
>>> ds.num_examples, ds.name
(30, 'digits/train[3/class]')
>>> c.num_classes = 100
>>> build(c, split="test")
Traceback (most recent call last):
...
ftjax.errors.DataError: ftjax: error: class count disagrees with the config (digits/test): data has 10, config.data.num_classes is 100; fix num_classes or the data (class folders, dataset name)
"""

from __future__ import annotations

import zipfile
import zlib

import numpy as np

from ftjax.data import builtin, folder, tfds_source
from ftjax.data.config import check
from ftjax.data.dataset import Dataset, check_num_classes, from_arrays, take_per_class
from ftjax.errors import ConfigError, DataError


def _load_npz(path: str, split: str, num_classes: int | None) -> Dataset:
  """The ``split`` of an ``.npz`` of ``<split>_images`` and ``<split>_labels``.

  Without ``class_names`` in the file the classes are numbered: ``num_classes`` of
  them when the config gives it, else one more than the largest label of any split
  in the file, so that a small split lacking the top class still agrees with the others.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      keys = set(f.files)
      if f"{split}_images" not in keys or f"{split}_labels" not in keys:
        raise DataError("arrays file lacks the split", where=path, value=repr(split),
                        hint=f"expected {split}_images and {split}_labels; it has {', '.join(sorted(keys))}")
      if "class_names" in keys:
        names = f["class_names"]
        if names.ndim != 1:  # a scalar did not iterate: a TypeError traceback
          raise DataError("class_names must be a 1-D array, one name per class", where=f"{path}:class_names",
                          value=f"shape {names.shape}", hint="e.g. np.array(['cat', 'dog'])")
        names = [str(n) for n in names]
      else:
        if num_classes is None:
          tops = [f[k].max() for k in sorted(keys) if k.endswith("_labels") and f[k].size
                  and np.issubdtype(f[k].dtype, np.integer)]
          num_classes = int(max(tops)) + 1 if tops else 0
        names = [str(i) for i in range(num_classes)]
      return from_arrays(f[f"{split}_images"], f[f"{split}_labels"], names, name=f"{path}/{split}")
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    if isinstance(e, DataError):
      raise
    raise DataError("arrays file does not read", where=path, value=f"{type(e).__name__}: {e}",
                    hint="expected an undamaged .npz written by np.savez") from None


def build(config, *, split: str) -> Dataset:
  """The ``split`` of the source ``config.source`` (a data config, see ``default_config``).

  ``per_class`` applies to ``config.train_split`` only: evaluation keeps every example.
  """
  check(config)
  if not isinstance(split, str) or not split:
    raise ConfigError("split must be a non-empty string", where="split", value=repr(split))
  source = config.source
  if source in builtin.SETS:
    ds = builtin.load(source, split)
  elif source == "folder":
    ds = folder.load(config, split)
  elif source == "tfds":
    ds = tfds_source.load(config, split)
  else:
    ds = _load_npz(config.path, split, config.num_classes)
  check_num_classes(ds, config.num_classes)
  if config.per_class is not None and split == config.train_split:
    ds = take_per_class(ds, config.per_class, seed=config.split_seed)
  return ds
