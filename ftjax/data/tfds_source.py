"""tensorflow-datasets through ``as_data_source``: array_record files, random access, no TensorFlow.

Reading needs only ``tensorflow-datasets`` (and ``array_record``); *preparing* a dataset
(downloading and writing its array_record files) needs TensorFlow, installed by the
optional extra ``pip install 'ftjax[prepare]'``. A dataset that is not prepared is a
DataError whose hint is the command that prepares it:

>>> print(prepare_command("cifar10", "/data/tfds"))
pip install 'ftjax[prepare]' && tfds build cifar10 --data_dir=/data/tfds --file_format=array_record
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ftjax.data.dataset import Dataset, to_rgb
from ftjax.errors import DataError


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command that writes ``name`` as array_record files under ``data_dir``."""
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"pip install 'ftjax[prepare]' && tfds build {name}{where} --file_format=array_record"


class TfdsSource:
  """One tfds split read record by record; images come back decoded as numpy arrays.

  ``label_source``, when given, is the same split read with the image left encoded
  (``tfds.decode.SkipDecoding``): the label column is read from it, so finding every
  record's label costs no image decode (ImageNet's 1.28M JPEGs would take the better
  part of an hour).
  """

  in_memory = False

  def __init__(self, source, *, name: str, image_key: str, label_key: str, label_source=None):
    self.source = source
    self.label_source = label_source
    self.name = name
    self.image_key = image_key
    self.label_key = label_key

  def __len__(self) -> int:
    return len(self.source)

  def example(self, j: int) -> dict:
    try:
      return self.source[int(j)]
    except Exception as e:  # a damaged record: name it whatever the reader raised
      raise DataError("tfds record does not read", where=self.describe(j),
                      value=f"{type(e).__name__}: {e}") from None

  def read(self, j: int) -> Image.Image:
    image = np.asarray(self.example(j)[self.image_key])
    if image.dtype == np.uint16:  # 16-bit: the top 8 bits, as image folders read them
      image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:  # a cast would wrap (int) or truncate (float 0..1) silently
      raise DataError("tfds image is neither 8- nor 16-bit", where=self.describe(j),
                      value=f"{self.image_key}: {image.dtype} {image.shape}",
                      hint="set config.data.image_key to an 8-bit image feature")
    return Image.fromarray(to_rgb(image))

  def label(self, j: int) -> int:
    return int(self.example(j)[self.label_key])

  def labels(self, index) -> list[int]:
    # tfds has no label column: every record is read once, on first use of ds.labels.
    records = range(len(self)) if index is None else index
    try:
      if self.label_source is not None:
        return [int(self.label_source[int(j)][self.label_key]) for j in records]
    except Exception:  # pylint: disable=broad-except
      pass  # a reader that cannot skip decoding (mock data), or a damaged record: named below
    return [self.label(j) for j in records]

  def describe(self, j: int) -> str:
    return f"{self.name} record {j}"


def load(config, split: str) -> Dataset:
  """``split`` of the tfds dataset ``config.name`` (array_record under ``config.data_dir``)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  name, data_dir = config.name, config.data_dir
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError("unknown tfds dataset", where="config.data.name", value=repr(name),
                    hint="see tfds.list_builders() for registered names") from None
  features = builder.info.features
  for key in (config.image_key, config.label_key):
    if key not in features:
      raise DataError("tfds dataset has no such feature", where=f"{name} features", value=repr(key),
                      hint=f"features are {', '.join(features.keys())}; set image_key / label_key")
  label_feature = features[config.label_key]
  if not hasattr(label_feature, "num_classes"):
    raise DataError("tfds label feature is not a ClassLabel", where=f"{name}/{config.label_key}",
                    value=type(label_feature).__name__)
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # tfds raises several types for "not written in a readable format"
    if not builder.is_prepared():
      raise DataError("tfds dataset is not prepared", where=str(builder.data_path), value=name,
                      hint=f"prepare it with: {prepare_command(name, data_dir)}") from None
    raise DataError("tfds split does not open", where=f"{name} split {split!r}",
                    value=f"{type(e).__name__}: {e}",
                    hint=f"it must be array_record: {prepare_command(name, data_dir)}") from None
  try:
    label_source = builder.as_data_source(
        split=split, decoders={config.image_key: tfds.decode.SkipDecoding()})
    if len(label_source) != len(source):
      label_source = None
  except Exception:  # pylint: disable=broad-except  # labels then come from decoded records
    label_source = None
  src = TfdsSource(source, name=f"{name}/{split}", image_key=config.image_key,
                   label_key=config.label_key, label_source=label_source)
  if len(src) == 0:
    raise DataError("zero examples", where=f"tfds:{name}/{split}", value=0)
  names = label_feature.names if label_feature.names else [str(i) for i in range(label_feature.num_classes)]
  return Dataset(src, name=f"tfds:{name}/{split}", class_names=names)
