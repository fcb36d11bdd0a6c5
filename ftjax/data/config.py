"""Every data key with its default, and the checks that need no data.

The trainer nests this under ``config.data``; ``build`` reads it.

>>> c = default_config()
>>> c.source, c.train_split, list(c.eval_splits), c.on_corrupt
('mnist5k', 'train', ['test'], 'skip')
>>> check(c)
>>> c.source = "mnist"
>>> check(c)
Traceback (most recent call last):
...
ftjax.errors.ConfigError: ftjax: error: unknown data source (config.data.source): 'mnist'; choose one of mnist5k, digits, folder, tfds, arrays
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections.config_dict import placeholder

from ftjax.errors import ConfigError

SOURCES = ("mnist5k", "digits", "folder", "tfds", "arrays")
ON_CORRUPT = ("skip", "error")
RESIZE = ("shorter_side", "squash")


def default_config() -> ml_collections.ConfigDict:
  """All data keys with defaults (documented inline)."""
  c = ml_collections.ConfigDict()
  c.source = "mnist5k"  # one of SOURCES
  # tfds: registered name ("cifar10", "oxford_iiit_pet:4.*"), prepared as array_record under data_dir.
  c.name = ""
  c.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.image_key = "image"
  c.label_key = "label"
  # arrays: an .npz file holding <split>_images (N,H,W[,C] uint8) and <split>_labels (N,) ints,
  # and optionally class_names.
  c.path = placeholder(str)
  c.train_split = "train"
  c.eval_splits = ["test"]
  # folder: root/<class>/**/*.{jpg,jpeg,png,webp,bmp} (images at any depth under a class
  # folder, see ftjax.data.folder); either root + val_fraction (a seeded, per-class split
  # into "train" and "val") or train_root + val_root.
  c.root = placeholder(str)
  c.train_root = placeholder(str)
  c.val_root = placeholder(str)
  c.val_fraction = 0.1
  c.split_seed = 0  # also seeds per_class sampling: it decides which examples exist, not their order
  c.verify_images = True  # folder: decode every image once at build, so bad files are known up front
  c.per_class = placeholder(int)  # keep N labelled train examples per class (few-shot)
  c.num_classes = placeholder(int)  # None: from the data; set: must agree with the data
  c.image_size = 224
  c.resize = "shorter_side"  # eval: shorter side to image_size / crop_fraction, then centre crop
  c.crop_fraction = 0.875  # 1.0 keeps the whole shorter side
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = True  # off: the deterministic eval resize + centre crop
  c.augment.scale = (0.08, 1.0)
  c.augment.ratio = (3 / 4, 4 / 3)
  c.augment.flip = True
  c.augment.randaugment_num_ops = 0  # 0: off
  c.augment.randaugment_magnitude = 9  # 0..10
  c.mixup_alpha = 0.0  # on device, per batch; 0: off
  c.cutmix_alpha = 0.0
  c.mix_switch_prob = 0.5  # both on: the chance that a batch uses cutmix instead of mixup
  c.num_workers = 0  # grain worker processes; 0: in the main process
  c.prefetch = 2  # batches put on device ahead of use
  c.on_corrupt = "skip"  # a corrupt image: "skip" (warn, count) or "error"
  # Order and augmentation, when train_iterator is not given a seed; the trainer passes
  # the top-level seed and refuses another value here.
  c.seed = 0
  return c


def _choice(value, choices, key: str) -> None:
  if value not in choices:
    raise ConfigError(f"unknown data {key}", where=f"config.data.{key}", value=repr(value),
                      hint=f"choose one of {', '.join(choices)}")


def _pair(value, key: str) -> tuple[float, float]:
  """``(lo, hi)`` of a two-number config value, or a ConfigError naming ``key``.

  >>> _pair((3, 4.5), "augment.ratio")
  (3.0, 4.5)
  >>> _pair((1, 2, 3), "augment.ratio")
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: augment.ratio must be two numbers (lo, hi) (config.data.augment.ratio): (1, 2, 3)
  """
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"{key} must be two numbers (lo, hi)", where=f"config.data.{key}",
                      value=value) from None
  return lo, hi


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a bad data config before any data is read."""
  _choice(config.source, SOURCES, "source")
  _choice(config.on_corrupt, ON_CORRUPT, "on_corrupt")
  _choice(config.resize, RESIZE, "resize")
  # Keys only one source reads (None by default): set for another source, they would be
  # ignored and the run would train on that source's data instead.
  for key, owner in (("root", "folder"), ("train_root", "folder"), ("val_root", "folder"),
                     ("path", "arrays")):
    if config[key] and config.source != owner:
      raise ConfigError(f"{key} is read by the {owner} source only", where=f"config.data.{key}",
                        value=repr(config[key]),
                        hint=f"the source is {config.source!r}: set --config.data.source={owner}")
  if config.source == "tfds" and not config.name:
    raise ConfigError("a tfds source needs a dataset name", where="config.data.name", value="''",
                      hint="for example --config.data.name=cifar10")
  if config.source == "folder" and not (config.root or config.train_root):
    raise ConfigError("a folder source needs a root", where="config.data.root", value=None,
                      hint="set root (with val_fraction) or train_root and val_root")
  if config.source == "folder" and config.root and config.train_root:
    raise ConfigError("set either root or train_root, not both", where="config.data.root",
                      value=f"{config.root!r} and {config.train_root!r}")
  if config.source == "folder" and config.root and config.val_root:
    # The val split of a single root is carved out of it: val_root would be ignored.
    raise ConfigError("val_root goes with train_root, not root", where="config.data.val_root",
                      value=repr(config.val_root),
                      hint=f"set train_root={config.root!r} for two folders, or drop val_root to "
                           "split root by val_fraction")
  if config.source == "arrays" and not config.path:
    raise ConfigError("an arrays source needs an .npz path", where="config.data.path", value=None,
                      hint="or call ftjax.data.from_arrays(images, labels) in code")
  if not 0.0 <= config.val_fraction < 1.0:
    raise ConfigError("val_fraction must be in [0, 1)", where="config.data.val_fraction",
                      value=config.val_fraction)
  if not 0.0 < config.crop_fraction <= 1.0:
    raise ConfigError("crop_fraction must be in (0, 1]", where="config.data.crop_fraction",
                      value=config.crop_fraction)
  if config.per_class is not None and config.per_class < 1:
    raise ConfigError("per_class must be at least 1", where="config.data.per_class",
                      value=config.per_class)
  for key in ("mixup_alpha", "cutmix_alpha"):
    # Beta(alpha, alpha) needs alpha > 0; mix.py reads "<= 0" as off, so a sign slip would be silent.
    if not 0.0 <= config[key] < math.inf:
      raise ConfigError(f"{key} must be a number >= 0", where=f"config.data.{key}",
                        value=config[key], hint="0 turns it off")
  if not 0.0 <= config.mix_switch_prob <= 1.0:
    raise ConfigError("mix_switch_prob must be in [0, 1]", where="config.data.mix_switch_prob",
                      value=config.mix_switch_prob)
  if config.split_seed < 0:
    raise ConfigError("split_seed must be >= 0", where="config.data.split_seed",
                      value=config.split_seed)
  if config.num_workers < 0 or config.prefetch < 0:
    raise ConfigError("num_workers and prefetch must be >= 0", where="config.data",
                      value=f"num_workers={config.num_workers}, prefetch={config.prefetch}")
  lo, hi = _pair(config.augment.scale, "augment.scale")
  if not 0.0 < lo <= hi <= 1.0:
    raise ConfigError("augment.scale must satisfy 0 < lo <= hi <= 1",
                      where="config.data.augment.scale", value=(lo, hi))
  # The crop's aspect ratio is drawn log-uniformly: both ends must be positive and finite.
  lo, hi = _pair(config.augment.ratio, "augment.ratio")
  if not 0.0 < lo <= hi < math.inf:
    raise ConfigError("augment.ratio must satisfy 0 < lo <= hi", where="config.data.augment.ratio",
                      value=(lo, hi), hint="width / height of the random crop, e.g. (0.75, 1.333)")
  num_ops = config.augment.randaugment_num_ops
  if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
    raise ConfigError("randaugment_num_ops must be an integer >= 0",
                      where="config.data.augment.randaugment_num_ops", value=repr(num_ops),
                      hint="0 turns RandAugment off")
  if not 0 <= config.augment.randaugment_magnitude <= 10:
    raise ConfigError("randaugment_magnitude must be in [0, 10]",
                      where="config.data.augment.randaugment_magnitude",
                      value=config.augment.randaugment_magnitude)
