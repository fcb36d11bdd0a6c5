"""Tests for ftjax.metrics and ftjax.progress: the metrics file, TensorBoard, eval metrics, plots, MFU."""

import io
import json
import math
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from ftjax import metrics
from ftjax.errors import ConfigError, DataError
from ftjax.progress import Progress


def strict_json(line):
  def reject(token):
    raise ValueError(f"not strict JSON: {token}")
  return json.loads(line, parse_constant=reject)


def file_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return f.read().splitlines()


# --- the metrics file -------------------------------------------------------------------------


def test_rows_are_strict_json_with_numbers_converted(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(np.int64(3), "train", {"loss": jnp.float32(0.5), "lr": np.float64(1e-3),
                                   "ok": np.bool_(True), "hist": jnp.array([1, 2]),
                                   "bad": float("nan"), "big": np.float32(np.inf),
                                   "low": -math.inf, "name": "x"})
  (line,) = file_lines(tmp_path)
  assert strict_json(line) == {"step": 3, "kind": "train", "loss": 0.5, "lr": 1e-3, "ok": True,
                               "hist": [1, 2], "bad": "nan", "big": "inf", "low": "-inf",
                               "name": "x"}
  (row,) = metrics.read_metrics(tmp_path)
  assert math.isnan(row.pop("bad"))
  assert row == {"step": 3, "kind": "train", "loss": 0.5, "lr": 1e-3, "ok": True, "hist": [1, 2],
                 "big": math.inf, "low": -math.inf, "name": "x"}


def test_reserved_names_and_unknown_types_are_refused(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match="reserved"):
      w.write(1, "train", {"step": 2})
    with pytest.raises(TypeError, match="object"):
      w.write(1, "train", {"x": object()})
  assert file_lines(tmp_path) == []


def write_steps(w, steps):
  for s in steps:
    w.write(s, "train", {"loss": 1.0 / (s + 1)})
    if s % 5 == 0:
      w.write(s, "eval", {"top1": s / 100})


def keys(rows):
  return [(r["step"], r["kind"]) for r in rows]


def test_resume_removes_rows_after_the_checkpoint_step_and_never_duplicates(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  write_steps(w, range(1, 9))  # killed at step 8; the last checkpoint is step 5
  w.close()
  w = metrics.MetricsWriter(tmp_path, resume_step=5, tensorboard=False)
  assert keys(metrics.read_metrics(tmp_path)) == keys(
      [{"step": s, "kind": k} for s in range(1, 6) for k in (["train", "eval"] if s == 5 else ["train"])])
  write_steps(w, range(6, 11))
  w.close()
  rows = metrics.read_metrics(tmp_path)
  expected = [(s, k) for s in range(1, 11) for k in (("train", "eval") if s % 5 == 0 else ("train",))]
  assert keys(rows) == expected
  assert [r["loss"] for r in rows if r["kind"] == "train"] == [1.0 / (s + 1) for s in range(1, 11)]
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl.tmp"))


def test_a_new_run_replaces_rows_of_a_run_that_never_checkpointed(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    write_steps(w, range(0, 3))
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:  # resume_step=None: from scratch
    write_steps(w, range(0, 2))
  assert keys(metrics.read_metrics(tmp_path)) == [(0, "train"), (0, "eval"), (1, "train")]


def test_torn_last_line_is_skipped_on_read_and_dropped_on_reopen(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    write_steps(w, [1, 2])
  with open(os.path.join(tmp_path, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 3, "kind": "tr')  # killed in the middle of a write
  assert keys(metrics.read_metrics(tmp_path)) == [(1, "train"), (2, "train")]
  with metrics.MetricsWriter(tmp_path, resume_step=2, tensorboard=False) as w:
    write_steps(w, [3])
  lines = file_lines(tmp_path)
  assert [strict_json(x)["step"] for x in lines] == [1, 2, 3]


def test_torn_line_dropped_even_when_no_row_is_after_the_resume_step(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    write_steps(w, [1])
  with open(os.path.join(tmp_path, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 2')
  with metrics.MetricsWriter(tmp_path, resume_step=100, tensorboard=False) as w:
    write_steps(w, [2])
  assert [strict_json(x)["step"] for x in file_lines(tmp_path)] == [1, 2]


def test_damaged_line_inside_the_file_is_an_error(tmp_path):
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"step": 1, "kind": "train"}\n{"step": 2, "ki\n{"step": 3, "kind": "train"}\n')
  with pytest.raises(DataError, match=r"damaged metrics file \(.*metrics.jsonl:2\)"):
    metrics.read_metrics(path)
  with pytest.raises(DataError):
    metrics.MetricsWriter(tmp_path, resume_step=3, tensorboard=False)
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"step": 1, "kind": "train"}\n[1, 2]\n')
  with pytest.raises(DataError, match="metrics.jsonl:2.*not a row with an integer step"):
    metrics.read_metrics(path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_one_line_and_leaves_the_writer_closable(tmp_path):
  # It was an OSError traceback out of the training loop, whose cleanup then raised again
  # flushing the same buffer (before the checkpointer was closed).
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.write(1, "train", {"loss": 0.5})
  w._file.close()
  w._file = open("/dev/full", "w", encoding="utf-8")  # every write: ENOSPC
  with pytest.raises(DataError, match=r"^ftjax: error: cannot write the metrics file \(.*metrics.jsonl\): "
                                      r"No space left on device; free disk space and rerun"):
    w.write(2, "train", {"loss": 0.25})
  w.flush()
  w.close()
  assert metrics.read_metrics(tmp_path) == [{"step": 1, "kind": "train", "loss": 0.5}]


def test_killed_process_leaves_only_complete_rows(tmp_path):
  # A real SIGKILL: every row written before it is on disk and parses.
  code = ("import os, sys; from ftjax.metrics import MetricsWriter\n"
          "w = MetricsWriter(sys.argv[1], tensorboard=False)\n"
          "for s in range(1, 51): w.write(s, 'train', {'loss': s / 7})\n"
          "os.kill(os.getpid(), 9)\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True)
  assert proc.returncode == -9
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == list(range(1, 51))


def read_events(logdir):
  """Every Event in the TensorBoard files of logdir (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  events = []
  for name in sorted(os.listdir(logdir)):
    if ".tfevents." not in name:
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4  # length, its crc, data, its crc
  return events


def test_tensorboard_scalars_written_and_resume_purges_later_steps(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(1, "train", {"loss": 2.5, "note": "text", "hist": [1, 2], "ok": True})
    w.write(2, "eval", {"top1": np.float32(0.75)})
  with metrics.MetricsWriter(tmp_path, resume_step=1) as w:
    w.write(2, "eval", {"top1": 0.5})
  files = [n for n in os.listdir(tmp_path) if ".tfevents." in n]
  assert len(files) == 2 and all(os.path.getsize(os.path.join(tmp_path, n)) > 0 for n in files)
  events = read_events(tmp_path)
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars == [(1, "train/loss", 2.5), (2, "eval/top1", 0.75), (2, "eval/top1", 0.5)]
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [0, 2]  # TensorBoard hides the first run's steps >= 2


# --- evaluation metrics --------------------------------------------------------------------------


def reference_metrics(logits, labels, num_bins):
  """The same metrics from numpy and scikit-learn, one example at a time for ECE."""
  logits = logits.astype(np.float64)
  k = logits.shape[1]
  shifted = logits - logits.max(1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
  pred = logits.argmax(1)
  top5 = np.argsort(-logits, axis=1)[:, :min(5, k)]
  bins_acc, bins_conf, bins_n = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins)
  for p, y in zip(probs, labels):
    conf = p.max()
    b = min(int(conf * num_bins), num_bins - 1)
    bins_n[b] += 1
    bins_conf[b] += conf
    bins_acc[b] += p.argmax() == y
  ece = sum(abs(a / n - c / n) * n / len(labels) for a, c, n in zip(bins_acc, bins_conf, bins_n) if n)
  return {
      "n": len(labels),
      "loss": skm.log_loss(labels, probs, labels=range(k)),
      "top1": skm.accuracy_score(labels, pred),
      "top5": np.mean([y in t for y, t in zip(labels, top5)]),
      "confusion": skm.confusion_matrix(labels, pred, labels=range(k)).tolist(),
      "per_class_accuracy": skm.recall_score(labels, pred, labels=range(k), average=None,
                                             zero_division=0).tolist(),
      "mean_class_accuracy": skm.balanced_accuracy_score(labels, pred),
      "ece": ece,
  }


def padded_batches(rng, num_examples, batch, k):
  """Batches of real examples, the last padded with label -1 and NaN logits."""
  logits = rng.normal(size=(num_examples, k)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=num_examples)
  out = []
  for i in range(0, num_examples, batch):
    lg, lb = logits[i:i + batch], labels[i:i + batch]
    pad = batch - len(lb)
    mask = np.arange(batch) < len(lb)
    lg = np.concatenate([lg, np.full((pad, k), np.nan, np.float32)])
    lb = np.concatenate([lb, np.full(pad, -1)])
    out.append((lg, lb, mask))
  return logits, labels, out


@pytest.mark.parametrize("k", [7, 3])
def test_eval_counts_match_numpy_and_sklearn_with_padding(k):
  rng = np.random.default_rng(k)
  logits, labels, batches = padded_batches(rng, num_examples=101, batch=32, k=k)
  counts = None
  for lg, lb, mask in batches:
    counts = metrics.add_counts(counts, metrics.eval_counts(lg, lb, mask, k, num_bins=10))
  got = metrics.summarize(counts)
  ref = reference_metrics(logits, labels, num_bins=10)
  assert got["n"] == 101 and len(batches) == 4  # 27 padding rows never counted
  assert got["confusion"] == ref["confusion"]
  assert got["top1"] == ref["top1"]
  assert got["top5"] == ref["top5"]
  assert got["per_class_accuracy"] == pytest.approx(ref["per_class_accuracy"], abs=1e-12)
  assert got["mean_class_accuracy"] == pytest.approx(ref["mean_class_accuracy"], abs=1e-12)
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  assert got["ece"] == pytest.approx(ref["ece"], abs=1e-6)
  if k == 3:
    assert got["top5"] == 1.0  # top-k with k = number of classes


def test_summarize_absent_class_names_and_no_examples():
  logits = jnp.array([[3., 0., 0.], [0., 3., 0.], [3., 0., 0.]])
  counts = metrics.eval_counts(logits, jnp.array([0, 1, 1]), jnp.ones(3, bool), 3)
  s = metrics.summarize(counts, class_names=["cat", "dog", "eel"])
  assert s["per_class_accuracy"] == [1.0, 0.5, None]  # no eel in the data
  assert s["mean_class_accuracy"] == 0.75
  assert s["class_names"] == ["cat", "dog", "eel"]
  assert s["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
  with pytest.raises(ConfigError, match="2 names for 3 classes"):
    metrics.summarize(counts, class_names=["cat", "dog"])
  empty = metrics.eval_counts(logits, jnp.array([0, 1, 1]), jnp.zeros(3, bool), 3)
  with pytest.raises(DataError, match="no examples were evaluated"):
    metrics.summarize(empty)


# --- early stopping -------------------------------------------------------------------------------


def stop_step(es, history):
  for step, value in history:
    if es.update(step, value):
      return step
  return None


def test_early_stopping_stops_where_the_history_says():
  history = [(100, 0.50), (200, 0.60), (300, 0.605), (400, float("nan")), (500, 0.59),
             (600, 0.70), (700, 0.69), (800, 0.70), (900, 0.705), (1000, 0.70)]
  es = metrics.EarlyStopping("top1", "max", patience=3, min_delta=0.01)
  # 300 beats 0.60 by less than min_delta, 400 is NaN, 500 is worse: three in a row.
  assert stop_step(es, history) == 500
  # The best is the best value (as --step best ranks it), a gain under min_delta included.
  assert (es.best, es.best_step, es.reference) == (0.605, 300, 0.60)
  assert es.update(600, 0.99) is True  # once stopped, stays stopped
  es = metrics.EarlyStopping("top1", "max", patience=4, min_delta=0.01)
  assert stop_step(es, history) == 1000  # 600 improves; 700 to 1000 do not
  es = metrics.EarlyStopping("top1", "max", patience=5, min_delta=0.01)
  assert stop_step(es, history) is None
  assert (es.best, es.best_step, es.reference, es.bad_evals) == (0.705, 900, 0.70, 4)
  es = metrics.EarlyStopping("loss", "min", patience=2)
  assert stop_step(es, [(1, {"loss": 3.0}), (2, {"loss": 2.0}), (3, {"loss": 2.0}),
                        (4, {"loss": 2.5})]) == 4


def test_early_stopping_nan_first_min_delta_in_min_mode_and_restart_at_an_eval_step():
  # A NaN first evaluation is no best: a NaN best would make every later value "worse".
  es = metrics.EarlyStopping("top1", "max", 2)
  assert es.update(1, float("nan")) is False and es.update(2, 0.5) is False
  assert (es.best, es.best_step, es.bad_evals) == (0.5, 2, 0)
  # "min" mode needs a drop of more than min_delta: 0.95 is no improvement on 1.0.
  es = metrics.EarlyStopping("loss", "min", 1, min_delta=0.1)
  assert es.update(1, 1.0) is False and es.update(2, 0.95) is True
  # A phase starting at an evaluation's step (200) resets patience at the next one (300).
  es = metrics.EarlyStopping("top1", "max", 2, restarts=(200,))
  assert [es.update(s, v) for s, v in [(100, 0.7), (200, 0.6), (300, 0.6)]] == [False, False, False]


def test_early_stopping_resumes_to_the_same_step():
  history = [(s, v) for s, v in zip(range(10, 110, 10), [5, 4, 3, 3.5, 2.9, 3, 3, 2.95, 3, 1])]
  uninterrupted = stop_step(metrics.EarlyStopping("loss", "min", 3), history)
  assert uninterrupted == 80
  first = metrics.EarlyStopping("loss", "min", 3)
  assert stop_step(first, history[:6]) is None
  saved = json.loads(json.dumps(first.state_dict()))  # as stored with a checkpoint
  second = metrics.EarlyStopping("loss", "min", 3)
  second.load_state_dict(saved)
  assert second.update(60, 100.0) is False  # an evaluation repeated after the resume is ignored
  assert stop_step(second, history[6:]) == uninterrupted
  with pytest.raises(ConfigError, match="early_stopping.mode"):
    metrics.EarlyStopping("loss", "max", 3).load_state_dict(saved)
  # A state saved before "reference" existed counted improvements from its best.
  older = metrics.EarlyStopping("loss", "min", 3)
  older.load_state_dict({k: v for k, v in saved.items() if k != "reference"})
  assert older.reference == older.best == 2.9 and stop_step(older, history[6:]) == uninterrupted


def test_early_stopping_config_errors():
  with pytest.raises(ConfigError, match="mode"):
    metrics.EarlyStopping("top1", "maximum", 3)
  with pytest.raises(ConfigError, match="patience"):
    metrics.EarlyStopping("top1", "max", 0)
  with pytest.raises(ConfigError, match="min_delta"):
    metrics.EarlyStopping("top1", "max", 2, min_delta=-1)
  with pytest.raises(ConfigError, match="choose one of \\['loss', 'top1'\\]"):
    metrics.EarlyStopping("top5", "max", 2).update(1, {"loss": 1.0, "top1": 0.5})


# --- plots -----------------------------------------------------------------------------------------


def assert_png(path, min_size):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    pixels = np.asarray(im.convert("L"))
  assert pixels.std() > 5  # something was drawn
  assert not os.path.exists(str(path) + ".tmp")


def trainer_rows():
  # the trainer's layout: eval keys prefixed with their split
  rows = [{"step": s, "kind": "train", "loss": 2.0 / s, "grad_norm": 1.0} for s in range(1, 21)]
  rows += [{"step": s, "kind": "eval", "test/loss": 1.5 / s, "test/top1": s / 20, "test/n": 50,
            "test/ece": float("nan"), "test/per_class_accuracy": [0.5, None],
            "test/class_names": ["a", "b"]} for s in (10, 20)]
  return rows


def test_learning_curves_put_losses_left_and_eval_metrics_right():
  curves = metrics.learning_curves(trainer_rows())
  assert list(curves) == ["loss", "evaluation"]
  assert curves["loss"]["train loss"] == (list(range(1, 21)), [2.0 / s for s in range(1, 21)])
  assert curves["loss"]["eval test/loss"] == ([10, 20], [0.15, 0.075])
  assert list(curves["loss"]) == ["train loss", "eval test/loss"]
  assert list(curves["evaluation"]) == ["eval test/top1", "eval test/ece"]
  assert curves["evaluation"]["eval test/top1"] == ([10, 20], [0.5, 1.0])


def test_plots_are_valid_png_files(tmp_path):
  metrics.plot_learning_curves(trainer_rows(), tmp_path / "curves.png")
  assert_png(tmp_path / "curves.png", (1000, 400))
  metrics.plot_learning_curves([], tmp_path / "empty.png")
  assert_png(tmp_path / "empty.png", (1000, 400))
  matrix = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
  metrics.plot_confusion(matrix, ["cat", "dog", "eel"], tmp_path / "confusion.png")
  assert_png(tmp_path / "confusion.png", (400, 400))
  # A folder named b"b\xff" (not UTF-8) reaches python as "b\udcff": drawn escaped (it crashed).
  metrics.plot_confusion(matrix, ["cat", os.fsdecode(b"b\xff"), "eel"], tmp_path / "escaped.png")
  assert_png(tmp_path / "escaped.png", (400, 400))
  metrics.plot_confusion(np.eye(60, dtype=int), None, tmp_path / "big.png")
  assert_png(tmp_path / "big.png", (1000, 1000))
  with pytest.raises(ConfigError, match="2 names for 3 classes"):
    metrics.plot_confusion(matrix, ["cat", "dog"], tmp_path / "x.png")
  assert "matplotlib.pyplot" not in sys.modules  # no global figure state, no window


# --- MFU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA GeForce GTX 1080", None)])
def test_device_peak_flops(kind, peak):
  assert metrics.device_peak_flops(types.SimpleNamespace(platform="gpu", device_kind=kind)) == peak


def test_float32_peak_follows_the_default_matmul_precision():
  h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  v5e = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
  assert metrics.device_peak_flops(h100, "float16") == 989e12
  # jax's default: TensorFloat-32 on the GPU (half the bf16 rate), one bf16 pass on the TPU.
  assert metrics.device_peak_flops(h100, "float32") == 494.5e12
  assert metrics.device_peak_flops(v5e, "float32") == 197e12
  with jax.default_matmul_precision("bfloat16"):
    assert metrics.device_peak_flops(h100, "float32") == 989e12
  with jax.default_matmul_precision("tensorfloat32"):
    assert metrics.device_peak_flops(h100, "float32") == 494.5e12
    assert metrics.device_peak_flops(v5e, "float32") is None  # 3 bf16 passes: not in the table
  with jax.default_matmul_precision("float32"):  # true float32: its rate is not known here
    assert metrics.device_peak_flops(h100, "float32") is None
    assert metrics.device_peak_flops(h100, "bfloat16") == 989e12  # bf16 inputs are not affected
  with pytest.raises(ValueError, match="int8"):
    metrics.device_peak_flops(h100, "int8")


def test_cpu_has_no_peak_and_mfu_needs_one():
  assert metrics.device_peak_flops() is None  # the test machine's CPU
  assert metrics.mfu(1e9, 10.0, 1, None) is None
  assert metrics.mfu(4e12, 50.0, 2, 100e12) == 1.0


def test_step_flops_counts_the_whole_step_on_all_devices():
  f = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(jnp.ones((16, 32)), jnp.ones((32, 8)))
  assert metrics.step_flops(f) >= 2 * 16 * 32 * 8
  assert metrics.step_flops(f) < 2 * 16 * 32 * 8 + 16 * 8 * 100
  # A sharded jit program is counted with its global shapes (the compiled one would be one
  # device's share); a pmap program is one device's, counted once per device.
  code = ("import jax, jax.numpy as jnp\n"
          "from jax.sharding import NamedSharding, PartitionSpec as P\n"
          "from ftjax.metrics import step_flops\n"
          "x = jax.device_put(jnp.ones((64, 64)), NamedSharding(jax.make_mesh((2,), ('d',)), P('d')))\n"
          "f = jax.jit(lambda x, w: x @ w).lower(x, jnp.ones((64, 64)))\n"
          "print(f.compile().cost_analysis()['flops'], step_flops(f))\n"
          "p = jax.pmap(lambda x, w: x @ w).lower(jnp.ones((2, 64, 64)), jnp.ones((2, 64, 64)))\n"
          "print(step_flops(p, program_copies=2))\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  # (XLA's count of the unpartitioned pmap program is a few FLOPs short of 2 * 64^3: rounding
  # in its per-instruction estimate, 3 in a million.)
  np.testing.assert_allclose([float(x) for x in out], [64.0 ** 3, 2 * 64.0 ** 3, 2 * 2 * 64.0 ** 3],
                             rtol=1e-5)


# --- progress ----------------------------------------------------------------------------------------


def fake_clock(times):
  return iter(times).__next__


def test_progress_plain_lines_on_a_non_tty_stream():
  stream = io.StringIO()
  # construction at 0 s; the first step (compilation) ends at 30 s; then 0.25 s per step
  times = [0.0, 30.0] + [30.0 + 0.25 * i for i in range(1, 10)]
  p = Progress(10, start_step=0, batch_size=64, log_every=4, flops_per_step=1e12,
               peak_flops=10e12, stream=stream, clock=fake_clock(times))
  rates = [p.update(1)] + [p.update(s, loss=1.0 / s if s % 4 == 0 or s == 10 else None, lr=0.5)
                           for s in range(2, 11)]
  p.close()
  assert stream.getvalue().splitlines() == [
      "step 4/10 loss 0.2500 img/s 256.0 eta 0:00:02 mfu 40.0% lr 0.5",
      "step 8/10 loss 0.1250 img/s 256.0 eta 0:00:00 mfu 40.0% lr 0.5",
      "step 10/10 loss 0.1000 img/s 256.0 eta 0:00:00 mfu 40.0% lr 0.5",
  ]
  assert [r is not None for r in rates] == [s in (4, 8, 10) for s in range(1, 11)]
  assert rates[3] == {"img_per_sec": 256.0, "steps_per_sec": 4.0, "mfu": 0.4}


def test_progress_resumed_run_without_peak_and_no_device_values():
  stream = io.StringIO()
  p = Progress(2000, start_step=1200, batch_size=8, log_every=100, stream=stream,
               clock=fake_clock([0.0, 5.0, 105.0]))
  assert p.update(1201) is None
  p.update(1300, loss=0.43124)
  assert stream.getvalue() == "step 1300/2000 loss 0.4312 img/s 7.9 eta 0:11:47\n"
  with pytest.raises(TypeError, match="float\\(loss\\)"):
    p.update(1400, loss=jnp.float32(0.5))


def test_progress_built_after_compiling_and_updated_on_log_steps_only():
  stream = io.StringIO()
  p = Progress(12, batch_size=10, log_every=4, stream=stream, clock=fake_clock([0.0, 2.0, 3.0, 4.0]))
  assert p.update(4, loss=1.0) == {"img_per_sec": 20.0, "steps_per_sec": 2.0}
  assert p.update(4, loss=1.0) is None  # no time passed: nothing to report
  p.update(8, loss=0.5)
  assert stream.getvalue().splitlines() == ["step 4/12 loss 1.0000 img/s 20.0 eta 0:00:04",
                                            "step 8/12 loss 0.5000 img/s 20.0 eta 0:00:02"]


def test_progress_rates_start_after_the_first_step_and_phases_keep_their_flops():
  stream = io.StringIO()
  # construction 0 s; the first step's one-off costs end at 5 s; then 1 s a step; a phase
  # compiles for 100 s after step 3, and its steps cost 3 FLOPs instead of 1.
  p = Progress(9, batch_size=2, log_every=2, flops_per_step=1.0, peak_flops=2.0, stream=stream,
               clock=fake_clock([0.0, 5.0, 5.0, 6.0, 7.0, 7.0, 107.0, 108.0, 109.0, 110.0]))
  p.start(1)
  p.update(1)
  p.update(2, loss=1.5)
  p.update(3)
  with p.paused(one_off=True):
    p.set_flops_per_step(3, 3.0)
  assert p.update(4, loss=1.0) == {"img_per_sec": 2.0, "steps_per_sec": 1.0, "mfu": 1.0}  # (1 + 3) / 2 s
  p.update(5)
  p.update(6, loss=0.5)
  assert stream.getvalue().splitlines() == [
      "step 2/9 loss 1.5000 img/s 2.0 eta 0:00:07 mfu 50.0%",
      # 2 steps in 2 s of training; the compilation is in neither the rates nor the ETA
      "step 4/9 loss 1.0000 img/s 2.0 eta 0:00:05 mfu 100.0%",
      "step 6/9 loss 0.5000 img/s 2.0 eta 0:00:03 mfu 150.0%"]
  # A log step right after start() has no time measured yet: its loss alone, once.
  stream = io.StringIO()
  p = Progress(9, batch_size=2, log_every=1, stream=stream, clock=fake_clock([0.0, 5.0, 5.0, 5.0]))
  p.start(1)
  assert p.update(1, loss=2.0) is None and p.update(1, loss=2.0) is None
  assert stream.getvalue() == "step 1/9 loss 2.0000\n"


class FakeTerminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_draws_a_bar_on_a_terminal():
  stream = FakeTerminal()
  p = Progress(10, batch_size=2, log_every=5, stream=stream, clock=fake_clock([0.0, 1.0, 2.0, 3.0]))
  p.update(1)
  p.update(5, loss=0.5)
  p.update(10, loss=0.25)
  p.close()
  out = stream.getvalue()
  assert "10/10" in out and "loss 0.2500 img/s 10.0" in out
  assert "step 5/10" not in out  # no plain lines on a terminal
