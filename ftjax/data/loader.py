"""Batches from a Dataset: training (infinite, step-addressed) and evaluation (each example once).

Training reads one endless stream of examples: epoch ``e`` is a permutation of the
dataset drawn from ``(seed, e)``, and the epochs follow each other without a gap, so
global position ``p`` is example ``perm_{p // n}[p % n]``. Step ``s`` is positions
``s * global_batch ...`` of which process ``k`` of ``P`` takes the ``k``-th of ``P``
equal slices. The batch at a step is therefore a pure function of (dataset, seed,
step): a run resumed at step ``k`` builds its iterator with ``start_step=k`` and sees
exactly the batches an uninterrupted run would have seen. Augmentation draws from a
generator seeded by ``(seed, epoch, example)``.

Batches are produced by grain: a ``MapDataset`` over step numbers mapped to whole
batches, so with ``num_workers > 0`` each worker process builds whole batches (one
transfer per batch, not per image). Batches stay uint8 until the last step, which
normalises them: on device after the transfer when ``prefetch > 0`` (``prefetch``
batches ahead), in numpy otherwise.

>>> import numpy as np
>>> order = stream_examples(num_examples=10, seed=0, positions=np.arange(20))
>>> sorted(order[:10].tolist()) == list(range(10)) == sorted(order[10:].tolist())
True
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
import warnings

import grain
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.data.dataset import Dataset
from ftjax.data.transforms import Preprocess, normalize
from ftjax.errors import ConfigError, DataError

# Steps a training stream is laid out for; far beyond any run, and finite for grain.
_HORIZON = 1 << 40
# In-memory sets whose transformed copy is at most this many bytes are transformed once.
_CACHE_BYTES = 512 << 20
# Unreadable examples in a row after which the data is taken to be gone (an unmounted disk),
# rather than trying (and warning about) every file of the dataset for each example.
_MAX_UNREADABLE = 100


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in ``epoch`` (its own stream: independent of other epochs)."""
  return np.random.default_rng([seed, 0, epoch]).permutation(num_examples)


def stream_examples(*, num_examples: int, seed: int, positions: np.ndarray,
                    perms: dict | None = None) -> np.ndarray:
  """Examples at global stream ``positions`` (epochs laid end to end).

  ``perms`` memoises epoch permutations across calls.
  """
  perms = {} if perms is None else perms
  epochs = positions // num_examples
  out = np.empty(len(positions), np.int64)
  for e in np.unique(epochs):
    if e not in perms:
      if len(perms) > 2:
        perms.pop(min(perms))  # batches move forward: older epochs are done with
      perms[e] = epoch_permutation(num_examples, seed, int(e))
    sel = epochs == e
    out[sel] = perms[e][positions[sel] % num_examples]
  return out


def local_positions(step: int, global_batch: int, process_index: int,
                    process_count: int) -> np.ndarray:
  """Stream positions of this process's slice of the global batch at ``step``.

  >>> local_positions(3, 8, 1, 2).tolist()
  [28, 29, 30, 31]
  """
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  return np.arange(start, start + local, dtype=np.int64)


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ConfigError("global batch must be a positive multiple of the process count",
                      where="batch_size", value=f"{global_batch} over {process_count} processes")
  return global_batch // process_count


class _Reader:
  """Reads and transforms examples; a corrupt file follows ``on_corrupt``."""

  def __init__(self, ds: Dataset, pre: Preprocess, on_corrupt: str):
    self.ds = ds
    self.pre = pre
    self.on_corrupt = on_corrupt

  def _example(self, i: int, seed) -> tuple[np.ndarray, int]:
    """(transformed image, example read): an example that fails only now (not verified at
    build, or changed since) is replaced by the next one that reads, so batches keep their
    size and stay deterministic; the caller takes the label of the example actually read."""
    n = self.ds.num_examples
    tries = min(n, _MAX_UNREADABLE)
    for k in range(tries):
      j = (i + k) % n
      try:
        rng = None if seed is None else np.random.default_rng(seed)
        return self.pre.apply(self.ds.open(j), rng), j
      except DataError as e:
        if self.on_corrupt == "error":
          raise
        warnings.warn(f"ftjax: skipping unreadable image {self.ds.describe(j)}: {e.value}",
                      stacklevel=2)
    raise DataError("no example reads", where=self.ds.name,
                    value=f"{tries} in a row from {self.ds.describe(i % n)}",
                    hint="is the data still where it was at the start?")

  def transformed_all(self) -> np.ndarray | None:
    """Every example through a deterministic transform, once, for small in-memory sets."""
    s = self.pre.image_size
    if (self.pre.random or not getattr(self.ds.source, "in_memory", False)
        or self.ds.num_examples * s * s * 3 > _CACHE_BYTES):
      return None
    if self.pre not in self.ds.cache:
      self.ds.cache[self.pre] = np.stack(
          [self.pre.apply(self.ds.read(i)) for i in range(self.ds.num_examples)])
    return self.ds.cache[self.pre]

  def images(self, examples: np.ndarray, seeds: list | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [len(examples), size, size, 3] and the examples actually read."""
    cached = self.transformed_all()
    if cached is not None:
      return cached[examples], examples
    pixels, used = [], []
    for k, i in enumerate(examples):
      image, j = self._example(int(i), None if seeds is None else seeds[k])
      pixels.append(image)
      used.append(j)
    return np.stack(pixels), np.asarray(used, np.int64)


class TrainBatches:
  """``step -> {"image" uint8, "label"}`` for one process: a pure function of the step.

  Picklable: worker processes each hold one and build whole batches.
  """

  def __init__(self, reader: _Reader, *, seed: int, global_batch: int, process_index: int,
               process_count: int):
    self.reader = reader
    self.seed = int(seed)
    self.global_batch = int(global_batch)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self._perms: dict = {}

  def examples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, examples) of this process's batch at ``step``."""
    n = self.reader.ds.num_examples
    pos = local_positions(step, self.global_batch, self.process_index, self.process_count)
    return pos // n, stream_examples(num_examples=n, seed=self.seed, positions=pos,
                                     perms=self._perms)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epochs, examples = self.examples(int(step))
    seeds = None
    if self.reader.pre.random:
      seeds = [[self.seed, 1, int(e), int(i)] for e, i in zip(epochs, examples)]
    pixels, used = self.reader.images(examples, seeds)
    return {"image": pixels, "label": self.reader.ds.labels[used].astype(np.int32)}


class EvalBatches:
  """``b -> {"image" uint8, "label", "mask"}``: batch ``b`` of the single ordered pass."""

  def __init__(self, reader: _Reader, *, global_batch: int, process_index: int,
               process_count: int):
    self.reader = reader
    self.global_batch = global_batch
    self.process_index = process_index
    self.process_count = process_count

  def __len__(self) -> int:
    return math.ceil(self.reader.ds.num_examples / self.global_batch)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    n = self.reader.ds.num_examples
    pos = local_positions(int(b), self.global_batch, self.process_index, self.process_count)
    mask = pos < n
    examples = np.where(mask, pos, 0)  # padding repeats example 0, masked out
    pixels, used = self.reader.images(examples, None)
    # An example that could not be read is not evaluated (its slot holds another image).
    return {"image": pixels, "label": self.reader.ds.labels[examples].astype(np.int32),
            "mask": mask & (used == examples)}


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
  """A grain worker's init: the worker exits once the process that started it is gone.

  A training process killed outright (SIGKILL, the OOM killer, a preemption past its grace
  period) runs no cleanup; its workers would live on, holding its output pipes open.
  """
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:  # reparented (to init or a subreaper): the parent died
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, name="ftjax-exit-with-parent", daemon=True).start()


def grain_batches(fn, start: int, stop: int, *, num_workers: int):
  """Iterator over ``fn(k)`` for k in [start, stop) through grain; ``num_workers`` processes
  each build whole batches (0: in this process)."""
  pipeline = grain.MapDataset.range(start, stop).map(fn)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain <= 0.2.18 reads an absl flag when it starts workers (google/grain#1355);
      # outside absl.app (notebooks, tests) nothing parsed them: take the defaults.
      flags.FLAGS.mark_as_parsed()
    # Whole batches per element: each worker builds batches, the main process only unpickles.
    it = pipeline.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
                        worker_init_fn=exit_with_parent)
  else:
    it = pipeline.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(it)


@jax.jit
def _normalize_on_device(images, shift, scale):
  return (images.astype(jnp.float32) - shift) * scale  # the same arithmetic as normalize()


class _Finish:
  """Normalises uint8 batches last: workers ship 4x fewer bytes, and with ``prefetch > 0``
  the float conversion runs on the accelerator after a uint8 transfer. ``size`` batches
  stay in flight on device (``device_put`` and jitted calls are asynchronous)."""

  def __init__(self, it, *, mean, std, size: int, sharding):
    self.it = it
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.size = size
    self.sharding = sharding
    self.queue: collections.deque = collections.deque()
    self._shift = self._scale = None  # mean/std on the device, put there once (explicitly)

  def close(self) -> None:
    self.queue.clear()
    if hasattr(self.it, "close"):
      self.it.close()  # stops grain's worker processes and frees their shared memory

  def _to_device(self, batch: dict) -> dict:
    if self.sharding is None:
      out = jax.device_put(batch)  # uncommitted: the jitted step may place it anywhere
    else:
      out = jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharding, x), batch)
    if self._shift is None:
      self._shift = jax.device_put(255.0 * self.mean)
      self._scale = jax.device_put(1.0 / (255.0 * self.std))
    out["image"] = _normalize_on_device(out["image"], self._shift, self._scale)
    return out

  def __next__(self) -> dict:
    if self.size == 0:
      batch = next(self.it)
      return {**batch, "image": normalize(batch["image"], self.mean, self.std)}
    while len(self.queue) <= self.size:
      try:
        self.queue.append(self._to_device(next(self.it)))
      except StopIteration:
        break
    if not self.queue:
      raise StopIteration
    return self.queue.popleft()


class TrainIterator:
  """Infinite training batches; the position is the step (``get_state``/``set_state``)."""

  def __init__(self, batches: TrainBatches, *, start_step: int, mean, std, num_workers: int,
               prefetch: int, sharding=None):
    self.batches = batches
    self.mean, self.std = mean, std
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.sharding = sharding
    self._it = None
    self._start(int(start_step))

  def _start(self, step: int) -> None:
    if step < 0:
      raise ConfigError("start_step must be >= 0", where="train_iterator", value=step)
    self.close()
    self.step = step  # the step of the next batch handed out
    it = grain_batches(self.batches, step, step + _HORIZON, num_workers=self.num_workers)
    self._it = _Finish(it, mean=self.mean, std=self.std, size=self.prefetch,
                       sharding=self.sharding)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.step += 1
    return batch

  def close(self) -> None:
    """Stops worker processes (also done when the iterator is garbage collected)."""
    if self._it is not None:
      self._it.close()

  def get_state(self) -> dict:
    """JSON-serialisable position: the next step, and what the stream depends on."""
    b = self.batches
    return {"step": self.step, "seed": b.seed, "global_batch": b.global_batch,
            "num_examples": b.reader.ds.num_examples, "process_index": b.process_index,
            "process_count": b.process_count}

  def set_state(self, state: dict) -> None:
    """Continues from a ``get_state`` dict; a stream it does not describe is an error."""
    mine = self.get_state()
    for key in ("seed", "global_batch", "num_examples", "process_count", "process_index"):
      if key in state and state[key] != mine[key]:
        raise DataError("loader state is for another data stream", where=f"loader state {key}",
                        value=f"saved {state[key]}, now {mine[key]}",
                        hint="resume with the same data, seed, batch size and process count")
    self._start(int(state["step"]))


class EvalIterator:
  """One ordered pass; ``len()`` batches, the last padded with ``mask`` False."""

  def __init__(self, batches: EvalBatches, *, mean, std, num_workers: int, prefetch: int,
               sharding=None):
    self.num_batches = len(batches)
    self._it = _Finish(grain_batches(batches, 0, self.num_batches, num_workers=num_workers), mean=mean,
                       std=std, size=prefetch, sharding=sharding)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def close(self) -> None:
    self._it.close()


def train_batches(ds: Dataset, config, *, global_batch: int, image_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> TrainBatches:
  """The host stage of ``train_iterator``: ``step -> uint8 batch`` (no loader around it)."""
  _local_batch(global_batch, process_count)
  if int(seed) < 0:
    raise ConfigError("the data seed must be >= 0", where="seed", value=seed)
  pre = Preprocess.from_config(config, image_size, train=True)
  return TrainBatches(_Reader(ds, pre, config.on_corrupt), seed=seed, global_batch=global_batch,
                      process_index=process_index, process_count=process_count)


def train_iterator(ds: Dataset, config, *, global_batch: int, image_size: int, mean, std,
                   seed: int | None = None, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1, sharding=None) -> TrainIterator:
  """Infinite ``{"image": float32 [B, H, W, 3], "label": int32 [B]}``, B = global / processes.

  The batch at step ``k`` is the same whether the iterator started at 0 or at ``k``.
  ``mean``/``std`` are on the 0..1 scale (the checkpoint's preprocessing); ``seed``
  (default ``config.seed``) fixes the order and the augmentation. With
  ``config.prefetch > 0`` batches come as device arrays (placed by ``sharding`` if given).
  """
  seed = config.seed if seed is None else seed
  batches = train_batches(ds, config, global_batch=global_batch, image_size=image_size, seed=seed,
                          process_index=process_index, process_count=process_count)
  return TrainIterator(batches, start_step=start_step, mean=mean, std=std,
                       num_workers=config.num_workers, prefetch=config.prefetch, sharding=sharding)


def eval_iterator(ds: Dataset, config, *, global_batch: int, image_size: int, mean, std,
                  process_index: int = 0, process_count: int = 1, sharding=None) -> EvalIterator:
  """``ceil(n / global_batch)`` batches of ``{"image", "label", "mask"}``; each example is
  in exactly one batch with mask True, padding has mask False (every process gets as many
  batches, so collective ops stay in step)."""
  _local_batch(global_batch, process_count)
  pre = Preprocess.from_config(config, image_size, train=False)
  reader = _Reader(ds, pre, config.on_corrupt)
  batches = EvalBatches(reader, global_batch=global_batch, process_index=process_index,
                        process_count=process_count)
  return EvalIterator(batches, mean=mean, std=std, num_workers=config.num_workers,
                      prefetch=config.prefetch, sharding=sharding)
