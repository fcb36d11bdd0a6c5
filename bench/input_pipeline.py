"""Host input pipeline throughput: JPEG decode + random resized crop + flip to 224 px.

Real photographs: scikit-learn's two sample photos (china.jpg, flower.jpg, 640x427),
cut into 500x375 windows at different offsets, some mirrored, and re-encoded as
JPEG (quality 90) into an image folder. The folder goes through the real loader
(``ftjax.data.build``, the train iterator's host stage through grain) in the main
process (0 workers) and with 1 and 2 worker processes; then the whole
``train_iterator`` with float32 normalisation in numpy, or on device after prefetch.

    python bench/input_pipeline.py [--steps 40] [--batch 32]

Prints images/s and images/s per core (per worker process; 0 workers counts as
one core). The goal in issue 5 is at least 400 images/s per core for the host stage.

Measured 2026-11-27 on the 2-core development machine, shared with other jobs (load
average about 4.5), batch 32: plain loop 876 images/s; host stage 819 (0 workers),
743 (1 worker), 1,222 = 611 per core (2 workers); whole train_iterator 560 (0 workers,
numpy normalisation), 1,185 (2 workers, normalised on device).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

import ftjax.data as fd
from ftjax.data import loader
from ftjax.data.transforms import Preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_photos(root: str, per_class: int = 32) -> None:
  """``per_class`` distinct 500x375 JPEGs of each sample photo, one class per photo."""
  rng = np.random.default_rng(0)
  for name, photo in zip(("china", "flower"), load_sample_images().images):
    os.makedirs(os.path.join(root, name))
    h, w, _ = photo.shape
    for k in range(per_class):
      top, left = rng.integers(0, h - 375 + 1), rng.integers(0, w - 500 + 1)
      window = photo[top:top + 375, left:left + 500]
      if k % 2:
        window = window[:, ::-1]
      Image.fromarray(np.ascontiguousarray(window)).save(
          os.path.join(root, name, f"{k:03d}.jpg"), quality=90)


def _rate(it, *, batch: int, steps: int) -> float:
  next(it)  # start-up (worker processes, jit) is not throughput
  next(it)
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(next(it)["image"])
  rate = steps * batch / (time.perf_counter() - start)
  it.close()
  return rate


def time_host_stage(ds, config, *, batch: int, steps: int, workers: int) -> float:
  """Decode + crop + flip into uint8 batches through grain: the work the host must keep up."""
  fn = loader.train_batches(ds, config, global_batch=batch, image_size=224, seed=0)
  return _rate(loader.grain_batches(fn, 0, steps + 2, num_workers=workers), batch=batch,
               steps=steps)


def time_train_iterator(ds, config, *, batch: int, steps: int, workers: int, prefetch: int):
  """The whole iterator, normalised float32 batches out."""
  config.num_workers, config.prefetch = workers, prefetch
  it = fd.train_iterator(ds, config, global_batch=batch, image_size=224, mean=MEAN, std=STD,
                         seed=0)
  return _rate(it, batch=batch, steps=steps)


def time_transform_only(ds, config, n: int) -> float:
  """The per-example work alone, no loader: decode + crop + flip (uint8 out)."""
  pre = Preprocess.from_config(config, 224, train=True)
  start = time.perf_counter()
  for i in range(n):
    pre.apply(ds.read(i % ds.num_examples), np.random.default_rng([0, 1, 0, i]))
  return n / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    write_photos(root)
    c = fd.default_config()
    c.source, c.root, c.val_fraction, c.prefetch = "folder", root, 0.0, 0
    c.augment.random_resized_crop, c.augment.flip = True, True
    ds = fd.build(c, split="train")
    sizes = {Image.open(p).size for p in ds.source.paths}
    print(f"{ds.num_examples} JPEGs of {sorted(sizes)} px, {os.cpu_count()} cores, "
          f"batch {args.batch}, {args.steps} timed steps, 224 px out (float32, normalised)")
    rate = time_transform_only(ds, c, 300)
    print(f"decode+crop+flip, plain loop, 1 core:   {rate:6.0f} images/s")
    for workers in (0, 1, 2):
      rate = time_host_stage(ds, c, batch=args.batch, steps=args.steps, workers=workers)
      cores = max(workers, 1)
      print(f"host stage (uint8), {workers} workers:     {rate:6.0f} images/s, "
            f"{rate / cores:6.0f} per core")
    for workers, prefetch in ((0, 0), (2, 2)):
      rate = time_train_iterator(ds, c, batch=args.batch, steps=args.steps, workers=workers,
                                 prefetch=prefetch)
      where = "on device" if prefetch else "numpy"
      print(f"train_iterator, {workers} workers, normalise {where}: {rate:6.0f} images/s")

if __name__ == "__main__":
  main()
