"""What a run records: the metrics file, TensorBoard, evaluation metrics, plots, MFU, early stopping.

Every event of a run is one JSON line in ``DIR/metrics.jsonl``,
``{"step": 120, "kind": "train", "loss": 0.43, ...}``, mirrored as TensorBoard
scalars tagged ``kind/key``.  A resumed run first cuts the file back to the
restored checkpoint's step, so each step's rows appear exactly once however
often the run was killed.

Evaluation metrics are sums accumulated on device (:func:`eval_counts`, added
batch by batch with :func:`add_counts`) and turned into rates once at the end
(:func:`summarize`); a mask keeps padding examples out, so every example counts
exactly once.

>>> import jax.numpy as jnp
>>> logits = jnp.array([[2., 0., 0.], [0., 3., 0.], [9., 9., 9.]])
>>> counts = eval_counts(logits, jnp.array([0, 2, 1]), jnp.array([1, 1, 0]), num_classes=3)
>>> s = summarize(counts)
>>> s["n"], s["top1"], s["confusion"]
(2, 0.5, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # pyplot is never imported: no backend, no window

from ftjax.errors import ConfigError, DataError
from ftjax.flops import hlo_flops

METRICS_FILE = "metrics.jsonl"

# ---------------------------------------------------------------------------
# The metrics file


def _to_python(x):
  """numpy / jax scalars and arrays -> python numbers and (nested) lists."""
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, Mapping):
    return {str(k): _to_python(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_python(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return _to_python(np.asarray(x).tolist())
  raise TypeError(f"cannot write a {type(x).__name__} to {METRICS_FILE}: {x!r}")


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _nonfinite_to_str(x):
  # JSON has no NaN or infinity; the strings keep the information and the line stays valid JSON.
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # 'nan', 'inf', '-inf'
  if isinstance(x, dict):
    return {k: _nonfinite_to_str(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_nonfinite_to_str(v) for v in x]
  return x


def _str_to_nonfinite(x):
  if x in ("nan", "inf", "-inf"):
    return float(x)
  if isinstance(x, dict):
    return {k: _str_to_nonfinite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_str_to_nonfinite(v) for v in x]
  return x


def _row(step: int, kind: str, values: Mapping[str, Any]) -> dict:
  clash = {"step", "kind"} & set(values)
  if clash:
    raise ValueError(f"metric names {sorted(clash)} are reserved in {METRICS_FILE} rows")
  return {"step": int(step), "kind": str(kind), **_to_python(dict(values))}


def _json_line(row: dict) -> str:
  return json.dumps(_nonfinite_to_str(row), allow_nan=False) + "\n"


def encode_row(step: int, kind: str, values: Mapping[str, Any]) -> str:
  """One metrics row as one line of strict JSON (with its newline).

  >>> import numpy as np
  >>> encode_row(3, "eval", {"top1": np.float32(0.5), "loss": float("nan"), "pc": np.array([1, 2])})
  '{"step": 3, "kind": "eval", "top1": 0.5, "loss": "nan", "pc": [1, 2]}\\n'
  """
  return _json_line(_row(step, kind, values))


def _parse_lines(path: str) -> tuple[list[tuple[str, dict]], bool]:
  """``(line, row)`` for every complete line, and whether a torn last line (a kill mid-write) was left out."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines(keepends=True)
  except FileNotFoundError:
    return [], False
  torn = bool(lines) and not lines[-1].endswith("\n")
  if torn:
    lines.pop()
  parsed = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
      if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
        raise ValueError("not a row with an integer step")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      raise DataError("damaged metrics file", where=f"{path}:{i + 1}", value=repr(line[:80]),
                      hint=f"{e}; only a torn last line is repaired automatically") from None
    parsed.append((line, row))
  return parsed, torn


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics file (or of ``DIR/metrics.jsonl`` when given a directory).

  Non-finite values written as ``"nan"``/``"inf"``/``"-inf"`` come back as floats;
  a torn last line is skipped, so a file being written can be read.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  return [_str_to_nonfinite(row) for _, row in _parse_lines(path)[0]]


def write_atomically(path, text: str) -> None:
  """Writes ``text`` to ``path`` through a synced temporary file and one rename."""
  path = str(path)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsWriter:
  """Appends metric rows to ``workdir/metrics.jsonl`` and TensorBoard scalars to ``workdir``.

  Args:
    workdir: the run's directory (created if missing).
    resume_step: the step of the checkpoint the run restored.  Rows with a larger
      step were written by a run killed after that checkpoint and are about to be
      produced again, so they are removed first (and hidden in TensorBoard).
      ``None`` means a new run from scratch: any rows left in the file came from
      a run that never saved a checkpoint, and are all removed.
    tensorboard: also write TensorBoard event files.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> with MetricsWriter(d, tensorboard=False) as w:
  ...   w.write(1, "train", {"loss": 0.5})
  ...   w.write(2, "train", {"loss": 0.25})
  >>> with MetricsWriter(d, resume_step=1, tensorboard=False) as w:
  ...   w.write(2, "train", {"loss": 0.3})
  >>> read_metrics(d)
  [{'step': 1, 'kind': 'train', 'loss': 0.5}, {'step': 2, 'kind': 'train', 'loss': 0.3}]
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
               tensorboard: bool = True):
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    old, torn = _parse_lines(self.path)
    kept = [line for line, row in old if resume_step is not None and row["step"] <= resume_step]
    if torn or len(kept) != len(old):
      write_atomically(self.path, "".join(kept))
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # imports torch when installed (seconds): only if asked
      # purge_step hides the killed run's events at or after it, like the JSONL cut above.
      purge = 0 if resume_step is None else resume_step + 1
      # tensorboardX names files by the second and opens them "wb": a resume within the same
      # second would overwrite the killed run's file.  Nanoseconds keep names unique and ordered.
      self._tb = SummaryWriter(logdir=workdir, purge_step=purge,
                               filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    """Appends ``{"step": step, "kind": kind, **values}``; numeric scalars also go to TensorBoard."""
    row = _row(step, kind, values)
    # One write and a flush per row: a kill loses no finished row and tears at most the last.
    try:
      self._file.write(_json_line(row))
      self._file.flush()
    except OSError as e:  # a full disk: one line, and the run stops as it does for a checkpoint
      try:
        self._file.close()  # drops the unwritten rest; a torn last line is repaired on resume
      except OSError:
        pass
      raise DataError("cannot write the metrics file", where=self.path, value=e.strerror or str(e),
                      hint="free disk space and rerun the same command: it resumes from the last "
                           "checkpoint") from None
    if self._tb is not None:
      for key, value in row.items():
        if key not in ("step", "kind") and _is_number(value):
          self._tb.add_scalar(f"{kind}/{key}", value, global_step=row["step"])

  def flush(self) -> None:
    if not self._file.closed:  # closed: a write failed, and said so
      self._file.flush()
      os.fsync(self._file.fileno())
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self._file.closed:
      self.flush()
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class NullWriter:
  """A :class:`MetricsWriter` that records nothing: what the processes of a
  multi-process run other than process 0 write to (their rows would repeat its rows)."""

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


# ---------------------------------------------------------------------------
# Evaluation metrics


# jit here too: called eagerly (tests, notebooks) it would otherwise dispatch ~30 small ops.
@functools.partial(jax.jit, static_argnames=("num_classes", "num_bins"))
def eval_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int, *,
                num_bins: int = 15) -> dict[str, jax.Array]:
  """Sums over one batch of the examples where ``mask`` is true; pure, usable inside jit.

  Args:
    logits: ``[batch, num_classes]``.
    labels: ``[batch]`` integer class ids (anything where ``mask`` is false).
    mask: ``[batch]``, true for real examples, false for padding.
    num_classes: the number of classes (static).
    num_bins: equal-width confidence bins for the expected calibration error;
      bin ``b`` holds confidences in ``[b/num_bins, (b+1)/num_bins)``, the last also 1.

  Returns:
    ``n``, ``loss_sum`` (softmax cross-entropy), ``top1``, ``top5`` (correct
    counts; top-k with k = min(5, num_classes)), ``confusion``
    ``[num_classes, num_classes]`` (row = true label, column = prediction) and,
    per confidence bin, ``bin_count``, ``bin_conf_sum``, ``bin_correct``.

  >>> c = eval_counts(jnp.array([[0., 1.], [5., 0.]]), jnp.array([1, 1]), jnp.array([True, True]), 2)
  >>> int(c["n"]), int(c["top1"]), int(c["top5"]), c["confusion"].tolist()
  (2, 1, 2, [[0, 0], [1, 1]])
  """
  if logits.ndim != 2 or logits.shape[-1] != num_classes:
    raise ValueError(f"logits must be [batch, {num_classes}], got {logits.shape}")
  if labels.shape != logits.shape[:1] or mask.shape != logits.shape[:1]:
    raise ValueError(f"labels {labels.shape} and mask {mask.shape} must be [{logits.shape[0]}]")
  mask = mask.astype(bool)
  # Padding rows may carry any label (-1, garbage) and any logits: keep both out of every sum
  # with where(), not by multiplying (0 * nan is nan).
  labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  correct = pred == labels
  _, topk = jax.lax.top_k(logits, min(5, num_classes))
  in_topk = jnp.any(topk == labels[:, None], axis=-1)
  confidence = jnp.exp(jnp.max(logp, axis=-1))
  bins = jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
  ones = mask.astype(jnp.int32)

  def masked_sum(x):
    return jnp.sum(jnp.where(mask, x, 0))

  def per_bin(x, dtype):
    return jnp.zeros(num_bins, dtype).at[bins].add(jnp.where(mask, x, 0).astype(dtype))

  return {
      "n": jnp.sum(ones),
      "loss_sum": masked_sum(loss),
      "top1": masked_sum(correct.astype(jnp.int32)),
      "top5": masked_sum(in_topk.astype(jnp.int32)),
      "confusion": jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, pred].add(ones),
      "bin_count": per_bin(ones, jnp.int32),
      "bin_conf_sum": per_bin(confidence, jnp.float32),
      "bin_correct": per_bin(correct, jnp.int32),
  }


def add_counts(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Adds two :func:`eval_counts` results (use ``None`` as the empty start).

  >>> add_counts({"n": 2}, {"n": 3})
  {'n': 5}
  >>> add_counts(None, {"n": 3})
  {'n': 3}
  """
  if a is None:
    return dict(b)
  return jax.tree.map(lambda x, y: x + y, dict(a), dict(b))


def summarize(counts: Mapping[str, Any], class_names: Sequence[str] | None = None) -> dict:
  """Summed counts -> python numbers ready for :class:`MetricsWriter`.

  Returns ``loss``, ``top1``, ``top5``, ``mean_class_accuracy`` (over classes
  with examples), ``per_class_accuracy`` (``None`` for a class without
  examples), ``confusion`` (nested lists), ``ece`` and ``n``; plus
  ``class_names`` when given.
  """
  c = {k: np.asarray(v) for k, v in counts.items()}  # one device -> host copy
  n = int(c["n"])
  if n == 0:
    raise DataError("no examples were evaluated", where="summarize", value=0,
                    hint="the evaluation split is empty or its mask is all false")
  confusion = c["confusion"].astype(np.int64)
  support = confusion.sum(axis=1)
  per_class = [float(confusion[i, i] / s) if s else None for i, s in enumerate(support)]
  seen = [a for a in per_class if a is not None]
  out = {
      "loss": float(c["loss_sum"]) / n,
      "top1": int(c["top1"]) / n,
      "top5": int(c["top5"]) / n,
      "mean_class_accuracy": float(np.mean(seen)),
      "per_class_accuracy": per_class,
      "confusion": confusion.tolist(),
      # sum over bins of |accuracy - confidence| weighted by the bin's share of examples
      "ece": float(np.abs(c["bin_correct"] - c["bin_conf_sum"].astype(np.float64)).sum() / n),
      "n": n,
  }
  if class_names is not None:
    if len(class_names) != confusion.shape[0]:
      raise ConfigError("class names do not match the classifier", where="summarize",
                        value=f"{len(class_names)} names for {confusion.shape[0]} classes")
    out["class_names"] = list(class_names)
  return out


# ---------------------------------------------------------------------------
# Plots


def _save_png(fig: Figure, path: str | os.PathLike) -> None:
  path = os.fspath(path)
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, path)  # a kill never leaves half a PNG


def _is_named(key: str, name: str) -> bool:
  # the trainer prefixes eval metrics with their split: "test/loss", "ema_test/top1"
  return key == name or key.endswith("/" + name)


def learning_curves(rows: Sequence[Mapping]) -> dict[str, dict[str, tuple[list, list]]]:
  """The series :func:`plot_learning_curves` draws: ``{panel: {label: (steps, values)}}``.

  A loss is a key ``loss`` or ``<split>/loss`` and goes to the "loss" panel; the
  other numbers of rows not of kind ``train`` go to "evaluation" (lists, strings
  and example counts ``n`` left out; train rows' lr, grad norm... are not curves).

  >>> rows = [{"step": 1, "kind": "train", "loss": 2.0, "lr": 0.1},
  ...         {"step": 2, "kind": "train", "loss": 1.0, "lr": 0.1},
  ...         {"step": 2, "kind": "eval", "test/loss": 1.5, "test/top1": 0.5, "test/n": 10}]
  >>> learning_curves(rows)
  {'loss': {'train loss': ([1, 2], [2.0, 1.0]), 'eval test/loss': ([2], [1.5])}, 'evaluation': {'eval test/top1': ([2], [0.5])}}
  """
  panels = {"loss": {}, "evaluation": {}}
  for row in rows:
    kind = row["kind"]
    for key, value in row.items():
      if key == "step" or _is_named(key, "n") or not _is_number(value):
        continue
      if _is_named(key, "loss"):
        panel = panels["loss"]
      elif kind != "train":
        panel = panels["evaluation"]
      else:
        continue
      steps, values = panel.setdefault(f"{kind} {key}", ([], []))
      steps.append(row["step"])
      values.append(value)
  return panels


def plot_learning_curves(rows: Sequence[Mapping], path: str | os.PathLike) -> None:
  """Writes a PNG of :func:`learning_curves`: losses vs step (left), evaluation metrics (right)."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  for ax, (title, series) in zip(fig.subplots(1, 2), learning_curves(rows).items()):
    for label, (steps, values) in series.items():
      ax.plot(steps, values, label=label, marker="" if label.startswith("train ") else "o")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
    else:
      ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
  _save_png(fig, path)


def plot_confusion(matrix, class_names: Sequence[str] | None, path: str | os.PathLike) -> None:
  """Writes a PNG of a confusion matrix (rows = true label), coloured by each row's fractions.

  Class names are shown up to 50 classes, counts in the cells up to 20.
  """
  m = np.asarray(matrix)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"a confusion matrix must be square, got shape {m.shape}")
  k = m.shape[0]
  if class_names is not None and len(class_names) != k:
    raise ConfigError("class names do not match the confusion matrix", where="plot_confusion",
                      value=f"{len(class_names)} names for {k} classes")
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  # A folder name that is not UTF-8 reaches python with surrogate escapes, which matplotlib
  # cannot draw: shown escaped.
  names = [str(n).encode("utf-8", "backslashreplace").decode() for n in names]
  fraction = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  side = min(4 + 0.4 * k, 20)
  fig = Figure(figsize=(side + 1.5, side), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(fraction, vmin=0, vmax=1, cmap="Blues")
  fig.colorbar(image, ax=ax, label="fraction of the true class")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if k <= 50:
    ax.set_xticks(range(k), names, rotation=90)
    ax.set_yticks(range(k), names)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                color="white" if fraction[i, j] > 0.5 else "black")
  _save_png(fig, path)


# ---------------------------------------------------------------------------
# Model FLOPs utilisation

# Dense bf16 peak FLOP/s of one device (the vendor's figure without sparsity), by substring
# of ``jax.Device.device_kind`` (case-insensitive).  First match wins, so a longer name comes
# before its prefix ("TPU v5 lite" before "TPU v5", "L40S" before "L4").
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # "NVIDIA H100 80GB HBM3" (SXM)
    "H200 NVL": 835e12,  # before "H200": the first name found in the kind wins
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "TPU v4 lite": 138e12,  # v4i
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def device_peak_flops(device=None, dtype: str = "bfloat16") -> float | None:
  """Peak FLOP/s of ``device`` (default: the first device) for matrix products in ``dtype``.

  bfloat16 and float16 run at the dense bf16 peak (:data:`PEAK_FLOPS`).  float32
  matrix products at jax's default precision run on TPUs as one bfloat16 pass
  (the same peak) and on NVIDIA GPUs as TensorFloat-32, at half of it (every
  kind in the table).  With ``jax_default_matmul_precision`` set to anything
  but the default (or ``bfloat16``, or ``tensorfloat32`` on a GPU) the
  arithmetic is not known here: None, and no MFU is shown.  None too on CPU or
  an unknown kind.

  >>> import types
  >>> device_peak_flops(types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite"))
  197000000000000.0
  >>> [device_peak_flops(types.SimpleNamespace(platform="gpu", device_kind=k)) / 1e12
  ...  for k in ("NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe")]
  [989.0, 835.0, 989.0, 756.0]
  >>> device_peak_flops(types.SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB"), "float32")
  156000000000000.0
  """
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  peak = next((v for name, v in PEAK_FLOPS.items() if name.lower() in kind), None)
  if peak is None or dtype in ("bfloat16", "float16"):
    return peak
  if dtype != "float32":
    raise ValueError(f"no peak for compute dtype {dtype!r}: float32, bfloat16 or float16")
  precision = str(jax.config.jax_default_matmul_precision or "default").lower()
  if precision in ("default", "fastest", "bfloat16"):
    return peak if device.platform == "tpu" or precision == "bfloat16" else peak / 2
  if precision == "tensorfloat32" and device.platform == "gpu":
    return peak / 2
  return None


def step_flops(lowered, program_copies: int = 1) -> float | None:
  """Model FLOPs of one call of a lowered jax function (``jitted.lower(...)``), all devices together.

  Counted from the program jax hands the compiler (:func:`ftjax.flops.hlo_flops`:
  matrix products, convolutions and cuDNN attention, 2 per multiply-add), the
  same on every backend: XLA's own count of a lowered program is not available
  on a GPU (jax returns None for PJRT plugins), and its count of the compiled
  program leaves out what became cuBLAS/cuDNN calls.  The program as written:
  ViT's tokens padded for cuDNN (200 of 197) count too, 1.6% more than the
  unpadded model.  A jit program has the global shapes; a pmap program is one
  device's, so ``program_copies`` is then the number of devices.  None when the
  program has no such operation.

  >>> step_flops(jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8))))  # 8 * 8 outputs, 8 multiply-adds each
  1024.0
  """
  counted = hlo_flops(lowered.as_text(dialect="hlo"))
  return counted * program_copies if counted > 0 else None


def format_bytes(n: int) -> str:
  """A byte count for people: MiB below a GiB, GiB from there.

  >>> format_bytes(3 * 2**20), format_bytes(int(2.27 * 2**30))
  ('3.0 MiB', '2.27 GiB')
  """
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def step_memory(compiled) -> dict[str, int] | None:
  """Bytes of a compiled step on one device, from XLA's buffer assignment (None if not reported).

  ``peak`` is arguments + outputs + temporaries - outputs aliased to donated
  arguments: what the step needs resident at once.  On an H100 it matched the
  allocator's ``peak_bytes_in_use`` of a training run to 0.01%.

  >>> m = step_memory(jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8))).compile())
  >>> m["argument"], m["output"]  # 64 float32 in, 64 out
  (256, 256)
  """
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def mfu(flops_per_step: float | None, steps_per_sec: float, num_devices: int,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation, a fraction: achieved FLOP/s over the devices' summed peak.

  ``flops_per_step`` is the total over all devices (as :func:`step_flops` gives it).

  >>> round(mfu(105.5e9 * 256, 10.0, 1, 989e12), 4)  # ViT-B/16 train, batch 256, 10 steps/s, one H100
  0.2731
  >>> mfu(1e12, 1.0, 1, None) is None
  True
  """
  if flops_per_step is None or peak is None:
    return None
  return flops_per_step * steps_per_sec / (num_devices * peak)


# ---------------------------------------------------------------------------
# Early stopping


class EarlyStopping:
  """Stops when ``metric`` has not improved for ``patience`` evaluations in a row.

  Improving means beating the value last counted as an improvement by more than
  ``min_delta`` (up for ``mode="max"``, down for ``"min"``); a NaN never improves.
  ``best`` and ``best_step`` are the best value and the first step to reach it, a
  smaller gain included (the step ``--step best`` and the kept checkpoints rank first).  Pure python state,
  saved with the checkpoint through :meth:`state_dict`, so a resumed run stops at
  the same step.  Feeding a step again (an evaluation repeated after a resume)
  changes nothing.

  ``restarts`` are the steps where gradual unfreezing starts a phase: the first
  evaluation after one counts patience afresh (the best so far stays), so a head
  that has converged before the body unfreezes does not end the run.

  >>> es = EarlyStopping("top1", "max", patience=2)
  >>> [es.update(s, v) for s, v in [(100, 0.5), (200, 0.7), (300, 0.6), (400, 0.7), (500, 0.8)]]
  [False, False, False, True, True]
  >>> es.best, es.best_step, es.stopped_step
  (0.7, 200, 400)
  >>> es = EarlyStopping("top1", "max", patience=2, restarts=(350,))
  >>> [es.update(s, v) for s, v in [(100, 0.5), (200, 0.7), (300, 0.6), (400, 0.7), (500, 0.6)]]
  [False, False, False, False, True]
  >>> es = EarlyStopping("top1", "max", patience=2, min_delta=0.01)  # 0.705: no improvement, but the best
  >>> [es.update(s, v) for s, v in [(100, 0.5), (200, 0.7), (300, 0.705), (400, 0.69)]]
  [False, False, False, True]
  >>> es.best, es.best_step
  (0.705, 300)
  """

  def __init__(self, metric: str, mode: str, patience: int, min_delta: float = 0.,
               restarts: tuple[int, ...] = ()):
    if mode not in ("max", "min"):
      raise ConfigError("early stopping mode must be 'max' or 'min'", where="early_stopping.mode",
                        value=repr(mode))
    if not (isinstance(patience, int) and patience >= 1):
      raise ConfigError("early stopping patience must be an integer >= 1",
                        where="early_stopping.patience", value=repr(patience))
    if not min_delta >= 0:
      raise ConfigError("early stopping min_delta must be >= 0", where="early_stopping.min_delta",
                        value=repr(min_delta))
    self.metric = metric
    self.mode = mode
    self.patience = patience
    self.min_delta = float(min_delta)
    self.restarts = tuple(int(r) for r in restarts)
    self.best: float | None = None
    self.best_step: int | None = None
    self.reference: float | None = None  # the value an improvement must beat by min_delta
    self.bad_evals = 0
    self.last_step: int | None = None
    self.stopped_step: int | None = None

  def _beats(self, value: float, than: float | None, delta: float) -> bool:
    if math.isnan(value):
      return False
    if than is None:
      return True
    if self.mode == "max":
      return value > than + delta
    return value < than - delta

  def update(self, step: int, value) -> bool:
    """Records the metric of the evaluation at ``step``; True means stop now (and from then on).

    ``value`` is a number or a mapping holding ``metric`` (a :func:`summarize` result).
    """
    if isinstance(value, Mapping):
      if self.metric not in value:
        raise ConfigError("early stopping metric is not evaluated", where="early_stopping.metric",
                          value=repr(self.metric), hint=f"choose one of {sorted(value)}")
      value = value[self.metric]
    step = int(step)
    if self.stopped_step is not None or (self.last_step is not None and step <= self.last_step):
      return self.stopped_step is not None
    since = self.last_step or 0
    if any(since <= r < step for r in self.restarts):
      self.bad_evals = 0  # the first evaluation with a newly unfrozen group trained
    self.last_step = step
    value = float(value)
    if self._beats(value, self.best, 0.0):
      self.best, self.best_step = value, step
    if self._beats(value, self.reference, self.min_delta):
      self.reference, self.bad_evals = value, 0
    else:
      self.bad_evals += 1
    if self.bad_evals >= self.patience:
      self.stopped_step = step
    return self.stopped_step is not None

  # patience, min_delta and restarts stay as configured: a resumed run may be given more patience.
  _STATE = ("metric", "mode", "best", "best_step", "reference", "bad_evals", "last_step", "stopped_step")

  def state_dict(self) -> dict:
    """The whole state as JSON-able python values."""
    return {k: getattr(self, k) for k in self._STATE}

  def load_state_dict(self, state: Mapping) -> None:
    """Restores :meth:`state_dict`; a state saved for another metric or mode is an error."""
    for k in ("metric", "mode"):
      if state[k] != getattr(self, k):
        raise ConfigError("the checkpoint's early stopping state is for another setting",
                          where=f"early_stopping.{k}", value=f"{state[k]!r} != {getattr(self, k)!r}",
                          hint="keep the setting, or start a new workdir")
    for k in self._STATE[2:]:
      # A state saved before "reference" existed counted improvements from its best.
      setattr(self, k, state.get(k, state["best"]) if k == "reference" else state[k])
