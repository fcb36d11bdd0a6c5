"""Verified orbax checkpoints: keep the latest and the best, fall back past damage.

Orbax commits a step atomically (a temporary directory renamed into place) but
does not check array data on restore: a flipped bit comes back as a wrong
value, a truncated file makes the step unreadable while it stays "latest", and
the best-N retention of its ``CheckpointManager`` can delete the newest step.
So orbax writes each step (``ocp.Checkpointer`` with two ``Composite`` items)
and this module does the rest:

* a step holds ``state`` (the arrays) and ``manifest`` (JSON: sha256, shape and
  dtype of every leaf, the step, the config fingerprint, the caller's ``extra``
  such as the data position, the metrics and the library versions, and a
  sha256 of the manifest itself), plus ``files.json``, the size and sha256 of
  every file orbax wrote (a flipped bit in a byte orbax never reads back is
  still damage); all three are committed by one rename of the finished step;
* restore verifies the files and every leaf and falls back to the newest step
  that verifies, logging one warning per skipped step;
* retention is ours: the union of the latest K steps and the best N by a metric
  (a NaN or missing metric ranks worst), so the newest step is never deleted;
* a state holding a non-finite float is never committed;
* a failed background write surfaces as :class:`CheckpointError` at the next
  ``save``, ``wait`` or ``close``, never as success.

Layout on disk (``WORKDIR/checkpoints`` is where the trainer puts them)::

  WORKDIR/checkpoints/<step>/state/...      orbax StandardSave of a nested dict
  WORKDIR/checkpoints/<step>/manifest/...   orbax JsonSave of the manifest
  WORKDIR/checkpoints/<step>/files.json     size and sha256 of every other file
  WORKDIR/checkpoints/.writing-<step>/      a step being written (never read)
  WORKDIR/checkpoints/rejected/<step>/      damaged steps moved aside on resume

Only one process may write a directory at a time.  On several processes
(``jax.process_count() > 1``, a shared filesystem) that is process 0: the state
is replicated, so process 0 holds every value on its host and orbax is told it
works alone (each process is orbax's only active process, so none of orbax's
cross-process barriers runs).  The others check the same values and write
nothing; :meth:`Checkpointer.wait` returns on every process only once process 0
has committed, and :meth:`Checkpointer.restore_latest` restores on every process
the step that process 0 picked, and raises on every process when any of them
failed to.  One process runs no barrier at all.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> ckpt = Checkpointer(d, keep_latest=1, async_save=False)
>>> state = {"params": {"w": np.arange(3.0, dtype=np.float32)}, "step": np.int32(7)}
>>> ckpt.save(7, state, extra={"data_position": 56})
>>> step, restored, extra = ckpt.restore_latest(state)
>>> step, restored["params"]["w"].tolist(), extra
(7, [0.0, 1.0, 2.0], {'data_position': 56})
>>> ckpt.close()
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ftjax import distributed
from ftjax.config import differing_keys, with_defaults
from ftjax.errors import CheckpointError, ConfigError, NumericsError
from ftjax.tree import flatten, map_with_path, unflatten

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"  # WORKDIR/checkpoints holds the steps
REJECTED_SUBDIR = "rejected"  # damaged steps are moved here, never silently deleted
FORMAT = "ftjax-checkpoint/1"
FILES = "files.json"
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax's marker for a write not yet finished
_WRITING = ".writing-"  # a step written by orbax, not yet committed by our rename
_DELETING = ".deleting-"  # a step renamed away before its files are removed
_VERSIONED = ("ftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class _Damaged(Exception):
  """A step that does not verify; the message says why (one short line)."""


# ---------------------------------------------------------------------------
# Pure pieces: digests, manifests, retention.


def digest(array: np.ndarray) -> str:
  """sha256 of an array's C-order bytes.

  >>> digest(np.zeros(2, np.float32))[:16]
  'af5570f5a1810b7a'
  """
  # A flat uint8 view: hashes the bytes without a copy, whatever the dtype (bfloat16 too).
  return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def host_state(state) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Copies a pytree to host: ``({path: numpy array}, {path: prng impl})``.

  Typed PRNG keys are stored as their raw key data; their implementation name
  is returned so a restore can wrap them again.  The arrays are copies: the
  caller may donate or overwrite its buffers while a background write runs.

  >>> flat, impls = host_state({"w": np.ones(2), "rng": jax.random.key(0)})
  >>> sorted(flat), flat["rng"].dtype.name, impls
  (['rng', 'w'], 'uint32', {'rng': 'threefry2x32'})
  """
  flat = flatten(state)
  impls = {p: str(jax.random.key_impl(x)) for p, x in flat.items() if _is_key(x)}
  leaves = [jax.random.key_data(x) if p in impls else x for p, x in flat.items()]
  # A replicated array over several processes' devices: jax.device_get refuses it; the
  # local copy is the whole value.
  leaves = [distributed.host_value(x) if _spans_processes(x) else x for x in leaves]
  # One device_get for all leaves, then a copy so no buffer is shared with jax.
  host = [np.array(x, copy=True) for x in jax.device_get(leaves)]
  return dict(zip(flat, host)), impls


def _spans_processes(x) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def first_non_finite(flat: Mapping[str, np.ndarray]) -> str | None:
  """Path of the first (sorted) float leaf holding a NaN or an infinity.

  >>> first_non_finite({"a": np.ones(2), "b": np.array([1.0, np.inf]), "c": np.nan})
  'b'
  >>> first_non_finite({"n": np.arange(3)}) is None
  True
  """
  for path in sorted(flat):
    a = np.asarray(flat[path])
    if jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
      return path
  return None


def _dotted(fingerprint: Mapping, path: str, unset: str = "<unset>"):
  """The value at ``path`` (``optim.schedule.name``) of a fingerprint keyed by dotted names.

  >>> _dotted({"seed": 0, "optim": {"schedule": {"name": "cosine"}}}, "optim.schedule.name")
  'cosine'
  """
  for key in sorted(fingerprint, key=len, reverse=True):
    if path == key or path.startswith(key + "."):
      value = fingerprint[key]
      for part in filter(None, path[len(key):].split(".")):
        if not isinstance(value, Mapping) or part not in value:
          return unset
        value = value[part]
      return value
  return unset


def _canonical(obj) -> bytes:
  # allow_nan: Python's json reads NaN and Infinity back, and `extra` may hold them.
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def _metric_value(v) -> float | None:
  """A metric as a JSON float; NaN and infinities become None (rank worst)."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if np.isfinite(f) else None


def make_manifest(step: int, flat: Mapping[str, np.ndarray], *, key_impls: Mapping[str, str] = {},
                  fingerprint: dict | None = None, extra: dict | None = None,
                  metrics: dict | None = None) -> dict:
  """The JSON manifest committed with a step; it carries its own sha256.

  >>> m = make_manifest(3, {"w": np.zeros(2, np.float32)}, extra={"pos": 24})
  >>> m["body"]["step"], m["body"]["leaves"]["w"]["shape"], m["body"]["extra"]
  (3, [2], {'pos': 24})
  >>> manifest_body(m, 3) == m["body"]
  True
  """
  leaves = {}
  for path, a in flat.items():
    leaf = {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": digest(a)}
    if path in key_impls:
      leaf["key_impl"] = key_impls[path]
    leaves[path] = leaf
  body = {
      "format": FORMAT,
      "step": int(step),
      "fingerprint": fingerprint,
      "extra": extra or {},
      "metrics": {k: _metric_value(v) for k, v in (metrics or {}).items()},
      "versions": _versions(),
      "leaves": leaves,
  }
  return _sealed(body)


def _sealed(body: dict) -> dict:
  return {"body": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}


def _unseal(doc, step: int, name: str, listing: str) -> dict:
  """Checks a sealed document's own digest, format and step; returns its body."""
  if not (isinstance(doc, dict) and isinstance(doc.get("body"), dict)):
    raise _Damaged(f"{name} is not an ftjax {name}")
  body = doc["body"]
  try:
    ok = hashlib.sha256(_canonical(body)).hexdigest() == doc.get("sha256")
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise _Damaged(f"{name} sha256 mismatch")
  if body.get("format") != FORMAT:
    raise _Damaged(f"{name} format {body.get('format')!r}, expected {FORMAT!r}")
  if body.get("step") != step:
    raise _Damaged(f"{name} says step {body.get('step')}")
  if not isinstance(body.get(listing), dict):
    raise _Damaged(f"{name} lists no {listing}")
  return body


def manifest_body(manifest, step: int) -> dict:
  """Checks a manifest's own digest, format and step; returns its body."""
  return _unseal(manifest, step, "manifest", "leaves")


def verify_leaves(body: dict, flat: Mapping[str, np.ndarray]) -> None:
  """Raises ``_Damaged`` naming the first leaf that differs from the manifest."""
  want = body["leaves"]
  missing = sorted(set(want) - set(flat))
  if missing:
    raise _Damaged(f"leaf missing from data: {missing[0]} ({len(missing)} in all)")
  unlisted = sorted(set(flat) - set(want))
  if unlisted:
    raise _Damaged(f"leaf not in manifest: {unlisted[0]} ({len(unlisted)} in all)")
  for path in sorted(want):
    a, w = flat[path], want[path]
    if a.dtype.name != w.get("dtype") or list(a.shape) != w.get("shape"):
      raise _Damaged(f"{path} is {a.dtype.name}{list(a.shape)}, manifest says "
                     f"{w.get('dtype')}{w.get('shape')}")
    if digest(a) != w.get("sha256"):
      raise _Damaged(f"sha256 mismatch at {path}")


def _file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_dir: Path) -> dict[str, Path]:
  """Every file of a step but the file list itself, by '/'-joined relative path."""
  out = {}
  for p in sorted(step_dir.rglob("*")):
    rel = p.relative_to(step_dir).as_posix()
    if p.is_symlink():  # a step is plain files; a link could point anywhere
      raise _Damaged(f"symbolic link in checkpoint: {rel}")
    if p.is_file() and rel != FILES:
      out[rel] = p
  return out


def list_files(step_dir: Path, step: int) -> dict:
  """The sealed ``files.json`` document: size and sha256 of every file of a step."""
  files = {rel: {"size": p.stat().st_size, "sha256": _file_sha256(p)}
           for rel, p in _step_files(step_dir).items()}
  return _sealed({"format": FORMAT, "step": int(step), "files": files})


def verify_files(step_dir: Path, step: int) -> None:
  """Raises ``_Damaged`` unless the files of a step are exactly those ``files.json`` lists."""
  path = step_dir / FILES
  if not path.is_file():
    raise _Damaged(f"{FILES} missing")
  if path.stat().st_size > (64 << 20):  # a real list is kilobytes; do not read a planted giant
    raise _Damaged(f"{FILES} is {path.stat().st_size} bytes")
  try:
    doc = json.loads(path.read_bytes())
  except ValueError as e:
    raise _Damaged(f"{FILES} unreadable: {_one_line(e)}") from None
  want = _unseal(doc, step, FILES, "files")["files"]
  have = _step_files(step_dir)
  missing = sorted(set(want) - set(have))
  if missing:
    raise _Damaged(f"file missing: {missing[0]}")
  unlisted = sorted(set(have) - set(want))
  if unlisted:
    raise _Damaged(f"file not in {FILES}: {unlisted[0]}")
  for rel in sorted(want):
    w = want[rel] if isinstance(want[rel], dict) else {}
    size = have[rel].stat().st_size
    if size != w.get("size"):
      raise _Damaged(f"file size changed: {rel} is {size} bytes, listed {w.get('size')}")
    if _file_sha256(have[rel]) != w.get("sha256"):
      raise _Damaged(f"file sha256 mismatch: {rel}")


def steps_to_keep(metrics: Mapping[int, float | None], *, keep_latest: int, keep_best: int,
                  best_mode: str = "max") -> set[int]:
  """The union of the ``keep_latest`` newest steps and the ``keep_best`` best ones.

  ``metrics`` maps every existing step to its metric (None when absent or
  non-finite: such steps are never "best").  Ties go to the older step: the
  first to reach a value is its best, as early stopping counts it (only a
  strict improvement moves its best step).

  >>> m = {100: 0.5, 200: 0.9, 300: float("nan"), 400: 0.1, 500: None}
  >>> sorted(steps_to_keep(m, keep_latest=2, keep_best=1))
  [200, 400, 500]
  >>> sorted(steps_to_keep(m, keep_latest=1, keep_best=2, best_mode="min"))
  [100, 400, 500]
  >>> sorted(steps_to_keep({100: 0.9, 200: 0.9, 300: 0.9}, keep_latest=1, keep_best=1))
  [100, 300]
  """
  steps = sorted(metrics)
  keep = set(steps[-keep_latest:]) if keep_latest > 0 else set()
  sign = 1.0 if best_mode == "max" else -1.0
  scored = [(sign * metrics[s], -s) for s in steps if _metric_value(metrics[s]) is not None]
  keep.update(-s for _, s in sorted(scored, reverse=True)[:max(keep_best, 0)])
  return keep


# ---------------------------------------------------------------------------
# The directory: committed steps, reading and verifying one step.


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Sorted steps committed in ``directory`` (integer-named subdirectories)."""
  d = Path(directory)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def run_workdir(path: str | os.PathLike) -> Path:
  """The run's workdir for ``path``: itself, or the parent of the checkpoint directory it names
  (``WORKDIR/checkpoints``) when only that parent holds the run's ``config.json``."""
  p = Path(path)
  if not (p / "config.json").is_file() and p.name == CHECKPOINT_SUBDIR and (p.parent / "config.json").is_file():
    return p.parent
  return p


def checkpoint_dir(path: str | os.PathLike) -> Path:
  """A checkpoint directory, or a run's workdir whose steps live in ``checkpoints/``."""
  p = Path(path).absolute()  # orbax reads absolute paths only
  if not committed_steps(p) and (p / CHECKPOINT_SUBDIR).is_dir():
    return p / CHECKPOINT_SUBDIR
  return p


def _one_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split()) or "(no message)"
  text = f"{type(e).__name__}: {text}"
  # Keep both ends: the operation comes first, the OS reason ("File too large") last.
  half = (limit - 5) // 2
  return text if len(text) <= limit else f"{text[:half]} ... {text[-half:]}"


def _alone() -> ocp.options.MultiprocessingOptions:
  """Orbax options that make this process the only one orbax knows of.

  On several processes ftjax decides who writes (process 0) and who reads; orbax
  would otherwise run barriers across all processes, and a barrier that only one
  process enters never returns.  One process keeps orbax's defaults.
  """
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _orbax_checkpointer() -> ocp.Checkpointer:
  """A synchronous orbax checkpointer for our two items (handlers named, so metadata reads)."""
  alone = _alone()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
      state=ocp.StandardCheckpointHandler(multiprocessing_options=alone),
      manifest=ocp.JsonCheckpointHandler(multiprocessing_options=alone)),
      multiprocessing_options=alone)


_FAILED = -2  # what process 0 broadcasts when its restore raised


def _from_process_0(value: int) -> int:
  """Process 0's ``value``, on every process.  A collective: every process must call it, in the
  same order; it is also a barrier (no process returns before process 0 has called it)."""
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _failed_processes(ok: bool) -> list[int]:
  """The processes that passed ``ok=False``, on every process (a collective, like
  :func:`_from_process_0`)."""
  oks = np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)
  return [i for i, v in enumerate(oks) if not v]


def _run_now(fn: Callable[[], None]) -> concurrent.futures.Future:
  """A finished future holding what ``fn()`` raised: a synchronous write, waited for like one in
  the background."""
  future = concurrent.futures.Future()
  try:
    future.set_result(fn())
  except Exception as e:  # _write raises CheckpointError; test hooks may raise anything
    future.set_exception(e)
  return future


def _physical_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _declared(leaf) -> tuple[str, tuple[int, ...], int]:
  """``(dtype name, shape, bytes)`` a manifest leaf declares, or ``_Damaged``."""
  try:
    dtype, shape = jnp.dtype(leaf["dtype"]), tuple(leaf["shape"])
  except (TypeError, KeyError):
    raise _Damaged(f"manifest leaf has no valid dtype and shape: {str(leaf)[:80]}") from None
  if not all(isinstance(n, int) and n >= 0 for n in shape):
    raise _Damaged(f"manifest leaf has an invalid shape: {shape!r}"[:120])
  return dtype.name, shape, int(np.prod(shape, dtype=object)) * dtype.itemsize


def check_sizes(body: dict, stored_meta: Mapping[str, Any]) -> None:
  """Before anything is allocated: orbax's own shapes must be the manifest's and fit in memory.

  ``stored_meta`` maps paths to orbax's array metadata (read from the stored
  array headers, which decide what a restore allocates).  A checkpoint from a
  stranger may claim absurd sizes; it is refused before any array is read.
  """
  declared = {p: _declared(leaf) for p, leaf in body["leaves"].items()}
  total = sum(n for _, _, n in declared.values())
  if total > _physical_memory():
    raise _Damaged(f"arrays declare {total} bytes, more than this machine's memory "
                   f"({_physical_memory()} bytes)")
  for path in sorted(set(declared) | set(stored_meta)):
    if path not in declared or path not in stored_meta:
      where = "manifest" if path not in declared else "stored arrays"
      raise _Damaged(f"leaf not in the {where}: {path}")
    meta = stored_meta[path]
    have = (jnp.dtype(meta.dtype).name, tuple(meta.shape))
    if have != declared[path][:2]:
      raise _Damaged(f"{path} is stored as {have[0]}{list(have[1])}, manifest says "
                     f"{declared[path][0]}{list(declared[path][1])}")


def _read_step(step_dir: Path, step: int) -> tuple[dict[str, np.ndarray], dict]:
  """Reads and verifies one step: ``({path: array}, manifest body)`` or ``_Damaged``."""
  verify_files(step_dir, step)  # cheap next to decoding, and catches every changed byte
  reader = _orbax_checkpointer()
  try:
    try:
      manifest = reader.restore(step_dir, args=ocp.args.Composite(
          manifest=ocp.args.JsonRestore()))["manifest"]
    except Exception as e:  # orbax/json raise many types; all mean "unreadable"
      raise _Damaged(f"manifest unreadable: {_one_line(e)}") from None
    body = manifest_body(manifest, step)
    try:
      stored_meta = flatten(reader.metadata(step_dir).item_metadata["state"].tree)
    except Exception as e:
      raise _Damaged(f"state metadata unreadable: {_one_line(e)}") from None
    check_sizes(body, stored_meta)
    try:
      state = reader.restore(step_dir, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))["state"]
    except Exception as e:  # truncated, empty or deleted files, bad metadata, ...
      raise _Damaged(f"state unreadable: {_one_line(e)}") from None
    flat = {p: np.asarray(a) for p, a in flatten(state).items()}
    verify_leaves(body, flat)
    return flat, body
  finally:
    reader.close()


def _verified_newest(directory: Path, steps: list[int]):
  """Walks ``steps`` newest first: ``(step, flat, body, skipped)``; step None if none verifies."""
  skipped = []
  for step in reversed(steps):
    try:
      flat, body = _read_step(directory / str(step), step)
    except _Damaged as e:
      skipped.append((step, str(e)))
      continue
    return step, flat, body, skipped
  return None, None, None, skipped


def _warn_skipped(directory: Path, step: int, reason: str, tail: str = "") -> None:
  log.warning("ftjax: warning: damaged checkpoint skipped (%s): %s%s", directory / str(step),
              reason, tail)


def _put_like(value, like: jax.Array) -> jax.Array:
  """``value`` on ``like``'s devices, committed to them only if ``like`` is.

  An uncommitted leaf (made by jnp on the default device) must stay so: on
  several processes a committed one cannot move to a mesh spanning them all.
  """
  return jax.device_put(value, like.sharding) if like.committed else jnp.asarray(value)


def _fit(path: str, stored: np.ndarray, like, key_impl: str | None):
  """Gives a stored array the type, device and sharding of the template leaf ``like``."""
  if _is_key(like):
    want_shape, want_dtype = jax.random.key_data(like).shape, jax.random.key_data(like).dtype
  elif isinstance(like, (bool, int, float)):
    want_shape, want_dtype = (), np.asarray(stored).dtype  # any scalar of its kind fits
  else:
    want_shape, want_dtype = tuple(like.shape), np.dtype(like.dtype)
  if tuple(stored.shape) != tuple(want_shape) or stored.dtype != want_dtype:
    raise CheckpointError(
        "checkpoint does not fit the state", where=path,
        value=f"stored {stored.dtype.name}{list(stored.shape)}, "
              f"expected {np.dtype(want_dtype).name}{list(want_shape)}",
        hint="was it written by another model or config?")
  if _is_key(like):
    key = jax.random.wrap_key_data(stored, impl=key_impl or str(jax.random.key_impl(like)))
    return _put_like(key, like)
  if isinstance(like, (bool, int, float)):
    return type(like)(stored.item())
  if isinstance(like, jax.Array):
    return _put_like(stored, like)
  if isinstance(like, jax.ShapeDtypeStruct):
    return jax.device_put(stored, like.sharding) if like.sharding is not None else jnp.asarray(stored)
  if isinstance(like, np.generic):
    return stored[()]  # a numpy scalar again
  return stored


def fit_template(template, flat: Mapping[str, np.ndarray], body: dict, where: str = "checkpoint"):
  """Builds a tree shaped like ``template`` from verified ``{path: array}``.

  >>> fit_template({"w": np.zeros(2)}, {"w": np.ones(2)}, {"leaves": {}})
  {'w': array([1., 1.])}
  """
  want = flatten(template)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
      parts.append(f"unexpected {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    raise CheckpointError("checkpoint keys differ from the state", where=where,
                          value="; ".join(parts), hint="was it written by another model or config?")
  leaves = body.get("leaves", {})
  return map_with_path(lambda p, like: _fit(p, flat[p], like, leaves.get(p, {}).get("key_impl")),
                       template)


def read_checkpoint(directory: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
  """The newest verified step (or ``step``) as nested dicts of numpy arrays, and its ``extra``.

  ``directory`` is a checkpoint directory or a run's workdir (steps under
  ``WORKDIR/checkpoints``).  Nothing is written.  Tuples and namedtuples of the
  saved state come back as dicts keyed by index or field name; PRNG keys as
  their raw key data.  Damaged steps are skipped with a warning.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with Checkpointer(f"{d}/checkpoints", async_save=False) as c:
  ...   c.save(1, {"params": {"b": np.ones(2, np.float32)}}, extra={"arch": "tiny"})
  >>> tree, extra = read_checkpoint(d)
  >>> tree["params"]["b"].tolist(), extra
  ([1.0, 1.0], {'arch': 'tiny'})
  """
  d = checkpoint_dir(directory)
  if not d.is_dir():
    raise CheckpointError("checkpoint directory not found", where=str(d), value=None,
                          hint="pass a checkpoint directory or a run's workdir")
  steps = committed_steps(d)
  if step is not None:
    if int(step) not in steps:
      raise CheckpointError("checkpoint step not found", where=str(d), value=step,
                            hint=f"steps present: {steps or 'none'}")
    steps = [int(step)]
  if not steps:
    raise CheckpointError("no checkpoint found", where=str(d), value=None,
                          hint=f"expected <dir>/<step>/ or <workdir>/{CHECKPOINT_SUBDIR}/<step>/")
  found, flat, body, skipped = _verified_newest(d, steps)
  for s, reason in skipped:
    _warn_skipped(d, s, reason, f"; using step {found}" if found is not None else "")
  if found is None:
    raise CheckpointError("no checkpoint verifies", where=str(d), value=_summary(skipped),
                          hint="the files are damaged or not an ftjax checkpoint")
  return unflatten(flat), body["extra"]


def recorded_metric(directory: str | os.PathLike, step: int, metric: str) -> float | None:
  """The ``metric`` a committed step's manifest records (saved with ``metrics=``), or None."""
  try:
    reader = _orbax_checkpointer()
    try:
      manifest = reader.restore(Path(directory).absolute() / str(step), args=ocp.args.Composite(
          manifest=ocp.args.JsonRestore()))["manifest"]
    finally:
      reader.close()
    return manifest_body(manifest, step)["metrics"].get(metric)
  except Exception:  # an unreadable manifest: the step cannot be "best"
    return None


def best_step(directory: str | os.PathLike, metric: str, mode: str = "max") -> int:
  """The committed step whose manifest records the best ``metric`` (oldest on ties).

  Steps saved without the metric (no evaluation at that step) never count.
  Nothing is written.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with Checkpointer(d, keep_latest=3, async_save=False) as c:
  ...   for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
  ...     c.save(step, {"w": np.zeros(1)}, metrics={"test/top1": acc})
  >>> best_step(d, "test/top1"), best_step(d, "test/top1", "min")
  (2, 1)
  """
  d = checkpoint_dir(directory)
  steps = committed_steps(d)
  best = steps_to_keep({s: recorded_metric(d, s, metric) for s in steps}, keep_latest=0,
                       keep_best=1, best_mode=mode)
  if not best:
    raise CheckpointError("no checkpoint records the metric", where=str(d), value=repr(metric),
                          hint=f"steps present: {steps or 'none'}; keep_best keeps evaluated steps")
  return best.pop()


def _summary(skipped: list[tuple[int, str]], limit: int = 3) -> str:
  text = "; ".join(f"step {s}: {r}" for s, r in skipped[:limit])
  return text + (f"; ... ({len(skipped)} steps)" if len(skipped) > limit else "")


# ---------------------------------------------------------------------------
# The checkpointer the trainer drives.


class Checkpointer:
  """Saves verified steps (asynchronously), keeps latest + best, restores the newest good one.

  Args:
    directory: where the steps go (the trainer uses ``WORKDIR/checkpoints``);
      created if missing.
    keep_latest: how many of the newest steps are always kept (at least 1).
    keep_best: how many steps with the best ``best_metric`` are kept as well.
    best_metric: key of ``metrics`` passed to :meth:`save` that ranks steps;
      None keeps only the latest.
    best_mode: "max" or "min".
    async_save: write in a background thread; :meth:`save` returns once the
      state is copied to host memory and checked.
    fingerprint: the config keys that matter; stored in every manifest and
      compared on restore (a difference is a :class:`ConfigError`).
    on_phase: test hook ``fn(phase, step)``, called at "copied" (caller's
      thread), then in the writer thread at "hashed" (manifest made), "written"
      (orbax done, step not yet renamed into place), "committed" and
      "retained"; and at "restore" when :meth:`restore` begins to read a step;
      a fault test may hold a phase open or kill the process there.

  On several processes every process constructs one on the same directory and
  calls :meth:`save`, :meth:`wait` and :meth:`restore_latest` at the same
  points; process 0 writes, cleans up and retains (see the module docstring).
  """

  def __init__(self, directory: str | os.PathLike, *, keep_latest: int = 2, keep_best: int = 1,
               best_metric: str | None = None, best_mode: str = "max", async_save: bool = True,
               fingerprint: dict | None = None,
               on_phase: Callable[[str, int], None] | None = None):
    if not (isinstance(keep_latest, int) and keep_latest >= 1):
      raise ConfigError("keep_latest must be an integer >= 1", where="checkpoint.keep_latest",
                        value=keep_latest, hint="the newest step is always kept")
    if not (isinstance(keep_best, int) and keep_best >= 0):
      raise ConfigError("keep_best must be an integer >= 0", where="checkpoint.keep_best",
                        value=keep_best)
    if best_mode not in ("max", "min"):
      raise ConfigError("best_mode must be 'max' or 'min'", where="checkpoint.best_mode",
                        value=repr(best_mode))
    if fingerprint is not None:
      _canonical(fingerprint)  # must be JSON: it goes into the manifest
    self.directory = Path(directory).absolute()  # orbax refuses relative paths
    self.keep_latest = keep_latest
    self.keep_best = keep_best if best_metric else 0  # no metric, no "best"
    self.best_metric, self.best_mode = best_metric, best_mode
    self.fingerprint = fingerprint
    self._on_phase = on_phase
    self._processes = jax.process_count()
    self._writes = jax.process_index() == 0  # the one process that touches the directory
    self._async = async_save
    if self._writes:
      try:
        self.directory.mkdir(parents=True, exist_ok=True)
        _remove_unfinished(self.directory)
      except OSError as e:
        raise CheckpointError("cannot use checkpoint directory", where=str(self.directory),
                              value=e.strerror or _one_line(e),
                              hint="check the path and its permissions") from None
    # Orbax writes each step synchronously, from our own writer thread when
    # async: a failed write then raises where we can report it, where orbax's
    # async CheckpointManager logs it and carries on.
    self._writer = _orbax_checkpointer()
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ftjax-ckpt")
                      if async_save and self._writes else None)
    # (step, its write) since the last wait(); the write is None on the processes that do not write.
    self._pending: tuple[int, concurrent.futures.Future | None] | None = None
    self._metrics: dict[int, float | None] = {}

  # -- queries ---------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (not yet verified; restore verifies)."""
    return committed_steps(self.directory)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The committed step with the best ``best_metric`` (oldest on ties), or None."""
    if not self.best_metric:
      return None
    metrics = {s: self._metric(s) for s in self.all_steps()}
    best = steps_to_keep(metrics, keep_latest=0, keep_best=1, best_mode=self.best_mode)
    return best.pop() if best else None

  # -- saving ----------------------------------------------------------------

  def save(self, step: int, state, *, metrics: dict | None = None,
           extra: dict | None = None) -> None:
    """Commits ``state`` as ``step`` (in the background when ``async_save``).

    Raises :class:`NumericsError` naming the first non-finite float leaf (and
    writes nothing), and :class:`CheckpointError` when the previous background
    write failed.  A step already committed is left as it is: the step count
    is part of the state, so the same step holds the same state.
    """
    self.wait()
    step = int(step)
    if self._writes and step in self.all_steps():
      log.info("checkpoint step %d already committed; not rewriting it", step)
    else:
      self._start_write(step, state, metrics, extra)
    if self._processes > 1 and self._pending is None:
      self._pending = (step, None)  # wait() is where every process learns that step is committed
    if not self._async:
      self.wait()

  def _start_write(self, step: int, state, metrics: dict | None, extra: dict | None) -> None:
    # Every process checks the state (they hold the same values), so all raise alike.
    flat, key_impls = host_state(state)
    bad = first_non_finite(flat)
    if bad is not None:
      raise NumericsError("non-finite value in the state to checkpoint", where=f"step {step}",
                          value=bad, hint="refusing to commit it; earlier checkpoints are kept")
    extra = dict(extra or {})
    _canonical(extra)  # JSON or a TypeError/ValueError now, not in the writer thread
    metrics = {k: _metric_value(v) for k, v in (metrics or {}).items()}
    self._phase("copied", step)
    if not self._writes:
      return
    write = functools.partial(self._write, step, flat, key_impls, metrics, extra)
    self._pending = (step, self._executor.submit(write) if self._executor else _run_now(write))

  def wait(self) -> None:
    """Blocks until the pending write is committed; raises CheckpointError if it failed.

    On several processes every process must call it at the same point: it
    returns once process 0 has committed (and retained), and raises on every
    process if that write failed.  A preempted or finished run calls it before
    exiting, so the step it saved is on disk for whichever process restarts.
    """
    if self._pending is None:
      return
    step, future = self._pending
    self._pending = None
    error = future.exception() if future is not None else None  # _write raises CheckpointError
    if self._processes > 1:
      committed = _from_process_0(error is None)  # every process calls it: it is the barrier
      if not committed and error is None:
        error = CheckpointError("checkpoint write failed on process 0",
                                where=str(self.directory / str(step)), hint="see process 0's error")
    if error is not None:
      raise error

  def close(self) -> None:
    """Finishes this process's pending write (raising if it failed) and releases resources.

    Unlike :meth:`wait` it does not wait for other processes: it runs on error
    paths too, where another process may never reach the same point.
    """
    try:
      if self._pending is not None:
        _, future = self._pending
        self._pending = None
        if future is not None:
          future.result()
    finally:
      if self._executor is not None:
        self._executor.shutdown(wait=True)
      self._writer.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _phase(self, phase: str, step: int) -> None:
    if self._on_phase is not None:
      self._on_phase(phase, step)

  def _write(self, step, flat, key_impls, metrics, extra) -> None:
    previous = self.all_steps()
    staging = self.directory / f"{_WRITING}{step}"
    try:
      manifest = make_manifest(step, flat, key_impls=key_impls, fingerprint=self.fingerprint,
                               extra=extra, metrics=metrics)
      self._phase("hashed", step)
      if staging.exists():
        _remove(staging)
      self._writer.save(staging, args=ocp.args.Composite(
          state=ocp.args.StandardSave(unflatten(flat)), manifest=ocp.args.JsonSave(manifest)))
      (staging / FILES).write_text(json.dumps(list_files(staging, step)))
      self._phase("written", step)
      os.rename(staging, self.directory / str(step))  # the commit: all of the step or none
    except Exception as e:  # full disk, permissions, I/O errors: all mean "not saved"
      try:
        _remove_unfinished(self.directory, quiet=True)
      except OSError:
        pass  # the next start removes what is left; the write error is what matters
      good = f"step {previous[-1]} is the newest earlier checkpoint" if previous else "no earlier checkpoint"
      raise CheckpointError("checkpoint write failed", where=str(self.directory / str(step)),
                            value=_one_line(e), hint=f"disk full or not writable? {good}") from e
    self._metrics[step] = metrics.get(self.best_metric) if self.best_metric else None
    self._phase("committed", step)
    self._retain()
    self._phase("retained", step)

  # -- retention -------------------------------------------------------------

  def _metric(self, step: int) -> float | None:
    if step not in self._metrics:
      self._metrics[step] = recorded_metric(self.directory, step, self.best_metric) \
          if self.best_metric else None
    return self._metrics[step]

  def _retain(self) -> None:
    steps = self.all_steps()
    keep = steps_to_keep({s: self._metric(s) for s in steps}, keep_latest=self.keep_latest,
                         keep_best=self.keep_best, best_mode=self.best_mode)
    try:
      for step in steps:
        if step not in keep:
          _delete_step(self.directory, step)
          self._metrics.pop(step, None)
    except OSError as e:
      raise CheckpointError("cannot delete an old checkpoint", where=str(self.directory),
                            value=_one_line(e), hint="check the directory's permissions") from e

  # -- restoring -------------------------------------------------------------

  def restore_latest(self, template, *, allow_fresh: bool = False) -> tuple[int, Any, dict] | None:
    """``(step, state, extra)`` of the newest step that verifies; None if there is none.

    ``state`` has the structure, leaf types, dtypes and shardings of
    ``template`` (jax arrays, numpy arrays, ShapeDtypeStructs, typed PRNG keys
    or Python scalars).  ``template`` may also be a function of the step that
    returns one, for states whose structure depends on the step (an optimizer
    that changes with the unfreezing phase).  Each damaged step skipped logs one warning and is
    moved to ``rejected/`` so that the run can commit that step again.  When
    steps exist but none verifies this raises :class:`CheckpointError`, unless
    ``allow_fresh`` (then they are moved aside and None is returned).  A step
    whose stored fingerprint differs from ours raises :class:`ConfigError`.
    """
    self.wait()
    if self._processes == 1:
      return self._restore_newest(template, allow_fresh)
    # Process 0 picks the step and the others restore that one: each walking the steps on its
    # own could pick another (process 0 moves damaged steps aside while they read; a read
    # error on one host).  The broadcast also keeps them from reading before it is done.
    if self._writes:
      try:
        found = self._restore_newest(template, allow_fresh)
      except BaseException:
        _from_process_0(_FAILED)
        raise
      _from_process_0(-1 if found is None else found[0])
    else:
      step = _from_process_0(0)
      if step == _FAILED:
        raise CheckpointError("process 0 could not restore", where=str(self.directory),
                              hint="see process 0's error")
      found = None
      if step >= 0:
        try:
          found = (step, *self.restore(step, template))
        except BaseException:
          _failed_processes(False)
          raise
    # Then all agree: a process that failed alone would leave the others waiting in the
    # first collective of the training step.
    failed = _failed_processes(True)
    if failed:
      raise CheckpointError("another process could not restore", where=str(self.directory),
                            value=f"process {', '.join(map(str, failed))}",
                            hint="see that process's error")
    return found

  def _restore_newest(self, template, allow_fresh: bool) -> tuple[int, Any, dict] | None:
    steps = self.all_steps()
    if not steps:
      return None
    found, flat, body, skipped = _verified_newest(self.directory, steps)
    if found is not None:
      template = template(found) if callable(template) else template
    if found is None and not allow_fresh:
      for s, reason in skipped:
        _warn_skipped(self.directory, s, reason)
      raise CheckpointError("no checkpoint verifies", where=str(self.directory),
                            value=_summary(skipped),
                            hint="restore a good copy, or start afresh: --allow_fresh_start "
                                 "(moves them to rejected/) or a new workdir")
    if found is not None:
      self._check_fingerprint(body, found)
    for s, reason in skipped:
      _warn_skipped(self.directory, s, reason, f"; moved to {self._reject(s)}")
    if found is None:
      return None
    return found, fit_template(template, flat, body, str(self.directory / str(found))), body["extra"]

  def restore(self, step: int, template) -> tuple[Any, dict]:
    """``(state, extra)`` of ``step``; CheckpointError when it is missing or does not verify.

    ``template`` is as for :meth:`restore_latest`.
    """
    self.wait()
    step = int(step)
    self._phase("restore", step)
    if step not in self.all_steps():
      raise CheckpointError("checkpoint step not found", where=str(self.directory), value=step,
                            hint=f"steps present: {self.all_steps() or 'none'}")
    try:
      flat, body = _read_step(self.directory / str(step), step)
    except _Damaged as e:
      raise CheckpointError("damaged checkpoint", where=str(self.directory / str(step)),
                            value=str(e), hint="restore another step") from None
    self._check_fingerprint(body, step)
    template = template(step) if callable(template) else template
    return fit_template(template, flat, body, str(self.directory / str(step))), body["extra"]

  def _check_fingerprint(self, body: dict, step: int) -> None:
    stored = body.get("fingerprint")
    if self.fingerprint is None or stored is None:
      return
    # Compare through JSON so that tuples and lists, ints and floats agree as stored.  Only
    # keys both sides record: a checkpoint written before a key joined the fingerprint
    # (config.RESUME_KEYS) says nothing about it; one written before a key joined a section
    # of it (optim) ran with that key's default.
    mine = json.loads(_canonical(self.fingerprint))
    stored = {k: with_defaults(v, k) for k, v in stored.items()}
    differ = [path for k in sorted(stored.keys() & mine.keys())
              for path in differing_keys(stored[k], mine[k], k)]
    if differ:
      k = differ[0]
      more = f" (and {len(differ) - 1} more keys)" if len(differ) > 1 else ""
      raise ConfigError("config differs from the checkpointed run", where=k,
                        value=f"{_dotted(stored, k)!r} in step {step}, now {_dotted(mine, k)!r}{more}",
                        hint="resume with the run's own config, or use a new workdir")

  def _reject(self, step: int) -> Path:
    target = self.directory / REJECTED_SUBDIR / str(step)
    n = 1
    while target.exists():
      n += 1
      target = self.directory / REJECTED_SUBDIR / f"{step}-{n}"
    target.parent.mkdir(exist_ok=True)
    os.rename(self.directory / str(step), target)
    self._metrics.pop(step, None)
    return target


def _delete_step(directory: Path, step: int) -> None:
  """Removes a step so that a crash midway never leaves a half-deleted step in place."""
  doomed = directory / f"{_DELETING}{step}"
  if doomed.exists():
    shutil.rmtree(doomed)
  os.rename(directory / str(step), doomed)  # atomic: the step is gone or whole
  shutil.rmtree(doomed)


def _remove_unfinished(directory: Path, quiet: bool = False) -> None:
  """Removes writes a crash left behind: orbax temporary dirs and half-done deletions."""
  for p in sorted(directory.iterdir()):
    if _ORBAX_TMP in p.name or p.name.startswith(_WRITING):
      if not quiet:
        log.warning("ftjax: warning: unfinished checkpoint write removed (%s): "
                    "it was never committed", p)
      _remove(p)
    elif p.name.startswith(_DELETING):
      _remove(p)


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  else:
    p.unlink()
