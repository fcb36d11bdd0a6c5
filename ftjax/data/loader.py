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
transfer per batch, not per image). ``prefetch`` batches are put on device ahead.

>>> import numpy as np
>>> from ftjax.data.dataset import from_arrays
>>> ds = from_arrays(np.arange(10, dtype=np.uint8).reshape(10, 1, 1), np.arange(10) % 2)
>>> order = stream_examples(num_examples=10, seed=0, positions=np.arange(20))
>>> sorted(order[:10].tolist()) == list(range(10)) == sorted(order[10:].tolist())
True
"""

from __future__ import annotations

import collections
import math
import warnings

import grain
from absl import flags
import jax
import numpy as np

from ftjax.data.dataset import Dataset
from ftjax.data.transforms import Preprocess, normalize
from ftjax.errors import ConfigError, DataError

# Steps a training stream is laid out for; far beyond any run, and finite for grain.
_HORIZON = 1 << 40
# In-memory sets whose transformed copy is at most this many bytes are transformed once.
_CACHE_BYTES = 512 << 20


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

  def __init__(self, ds: Dataset, pre: Preprocess, mean, std, on_corrupt: str):
    self.ds = ds
    self.pre = pre
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self.on_corrupt = on_corrupt
    self.draft = pre.decode_size()

  def _read(self, i: int):
    # A file that fails only now (not verified at build, or changed since) is replaced
    # by the next example that reads, so the batch keeps its size and stays deterministic.
    n = self.ds.num_examples
    for k in range(n):
      try:
        return self.ds.read((i + k) % n, self.draft)
      except DataError as e:
        if self.on_corrupt == "error":
          raise
        warnings.warn(f"ftjax: skipping unreadable image {self.ds.describe((i + k) % n)}: "
                      f"{e.value}", stacklevel=2)
    raise DataError("no example reads", where=self.ds.name, value=n)

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

  def images(self, examples: np.ndarray, seeds: list | None) -> np.ndarray:
    cached = self.transformed_all()
    if cached is not None:
      pixels = cached[examples]
    else:
      pixels = np.stack([
          self.pre.apply(self._read(int(i)),
                         None if seeds is None else np.random.default_rng(seeds[k]))
          for k, i in enumerate(examples)])
    return normalize(pixels, self.mean, self.std)


class TrainBatches:
  """``step -> {"image", "label"}`` for one process: a pure function of the step (picklable)."""

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
    return {"image": self.reader.images(examples, seeds),
            "label": self.reader.ds.labels[examples].astype(np.int32)}


class EvalBatches:
  """``b -> {"image", "label", "mask"}``: batch ``b`` of the single ordered pass."""

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
    return {"image": self.reader.images(examples, None),
            "label": self.reader.ds.labels[examples].astype(np.int32),
            "mask": mask}


def _grain_iter(fn, start: int, stop: int, num_workers: int):
  pipeline = grain.MapDataset.range(start, stop).map(fn)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain <= 0.2.18 reads an absl flag when it starts workers (google/grain#1355);
      # outside absl.app (notebooks, tests) nothing parsed them: take the defaults.
      flags.FLAGS.mark_as_parsed()
    # Whole batches per element: each worker builds batches, the main process only unpickles.
    it = pipeline.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2))
  else:
    it = pipeline.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(it)


def _to_device(batch: dict, sharding):
  if sharding is None:
    return jax.device_put(batch)  # uncommitted: the jitted step may place it anywhere
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class _DevicePrefetch:
  """Keeps ``size`` batches in flight on device (``device_put`` is asynchronous)."""

  def __init__(self, it, size: int, sharding):
    self.it = it
    self.size = size
    self.sharding = sharding
    self.queue: collections.deque = collections.deque()

  def __next__(self):
    if self.size == 0:
      return next(self.it)
    while len(self.queue) <= self.size:
      try:
        self.queue.append(_to_device(next(self.it), self.sharding))
      except StopIteration:
        break
    if not self.queue:
      raise StopIteration
    return self.queue.popleft()


class TrainIterator:
  """Infinite training batches; the position is the step (``get_state``/``set_state``)."""

  def __init__(self, batches: TrainBatches, *, start_step: int, num_workers: int, prefetch: int,
               sharding=None):
    self.batches = batches
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.sharding = sharding
    self._start(int(start_step))

  def _start(self, step: int) -> None:
    if step < 0:
      raise ConfigError("start_step must be >= 0", where="train_iterator", value=step)
    self.step = step  # the step of the next batch handed out
    it = _grain_iter(self.batches, step, step + _HORIZON, self.num_workers)
    self._it = _DevicePrefetch(it, self.prefetch, self.sharding)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.step += 1
    return batch

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

  def __init__(self, batches: EvalBatches, *, num_workers: int, prefetch: int, sharding=None):
    self.num_batches = len(batches)
    self._it = _DevicePrefetch(_grain_iter(batches, 0, self.num_batches, num_workers),
                               prefetch, sharding)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)


def train_iterator(ds: Dataset, config, *, global_batch: int, image_size: int, mean, std,
                   seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1, sharding=None) -> TrainIterator:
  """Infinite ``{"image": float32 [B, H, W, 3], "label": int32 [B]}``, B = global / processes.

  The batch at step ``k`` is the same whether the iterator started at 0 or at ``k``.
  ``mean``/``std`` are on the 0..1 scale (the checkpoint's preprocessing). With
  ``config.prefetch > 0`` batches come as device arrays (placed by ``sharding`` if given).
  """
  _local_batch(global_batch, process_count)
  pre = Preprocess.from_config(config, image_size, train=True)
  reader = _Reader(ds, pre, mean, std, config.on_corrupt)
  batches = TrainBatches(reader, seed=seed, global_batch=global_batch,
                         process_index=process_index, process_count=process_count)
  return TrainIterator(batches, start_step=start_step, num_workers=config.num_workers,
                       prefetch=config.prefetch, sharding=sharding)


def eval_iterator(ds: Dataset, config, *, global_batch: int, image_size: int, mean, std,
                  process_index: int = 0, process_count: int = 1, sharding=None) -> EvalIterator:
  """``ceil(n / global_batch)`` batches of ``{"image", "label", "mask"}``; each example is
  in exactly one batch with mask True, padding has mask False (every process gets as many
  batches, so collective ops stay in step)."""
  _local_batch(global_batch, process_count)
  pre = Preprocess.from_config(config, image_size, train=False)
  reader = _Reader(ds, pre, mean, std, config.on_corrupt)
  batches = EvalBatches(reader, global_batch=global_batch, process_index=process_index,
                        process_count=process_count)
  return EvalIterator(batches, num_workers=config.num_workers, prefetch=config.prefetch,
                      sharding=sharding)
