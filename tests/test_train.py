"""The trainer end to end on a tiny ViT and real digits: outputs, resume, parallelism, errors."""

import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import checkpoint, train
from ftjax.errors import ConfigError, NumericsError
from ftjax.tree import flatten

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, launch_cmd, state_sha, subprocess_env, tiny_config, write_config  # noqa: E402


def _final_state(workdir):
  tree, extra = checkpoint.read_checkpoint(Path(workdir) / "checkpoints")
  return flatten(tree), extra


def _rows(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_two_step_run_leaves_checkpoint_metrics_and_config(tiny_vit_npz, tmp_path, capsys):
  wd = tmp_path / "wd"
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 2, "train.eval_every": 0,
                                     "train.plots": True, "train.tensorboard": True})
  summaries = train.train_and_evaluate(cfg, str(wd))
  assert capsys.readouterr().out.splitlines()[-1] == (
      f"workdir {wd}: checkpoints/ metrics.jsonl config.json TensorBoard events learning_curves.png "
      "confusion_test.png")
  assert (wd / "checkpoints" / "2").is_dir()
  stored = json.loads((wd / "config.json").read_text())
  assert stored["model"]["source"] == cfg.model.source and stored["train"]["total_steps"] == 2
  rows = _rows(wd)
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [2]
  assert summaries["test"]["n"] == 360  # digits test split, every example once (360 % 64 != 0)
  assert list(wd.glob("events.out.tfevents.*"))
  assert (wd / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (wd / "confusion_test.png").exists()
  flat, extra = _final_state(wd)
  assert int(flat["step"]) == 2 and extra["model"]["family"] == "vit"


def test_eval_counts_each_example_once_and_matches_direct_computation(tiny_vit_npz, tmp_path):
  from ftjax import data as data_lib
  from ftjax import models

  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "train.eval_batch_size": 48,
                                     "train.checkpoint_every": 0})
  summaries = train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  flat, _ = _final_state(tmp_path / "wd")
  params = {k.removeprefix("params/"): v for k, v in flat.items() if k.startswith("params/")}
  from ftjax.tree import unflatten
  model, _, report = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
  ds = data_lib.build(cfg.data, split="test")
  logits, labels = [], []
  for b in data_lib.eval_iterator(ds, cfg.data, global_batch=360, image_size=32, mean=report.mean,
                                  std=report.std):
    logits.append(np.asarray(model.apply({"params": unflatten(params)}, b["image"], train=False)))
    labels.append(b["label"])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  assert len(labels) == 360
  top1 = float(np.mean(logits.argmax(-1) == labels))
  assert summaries["test"]["n"] == 360
  assert summaries["test"]["top1"] == pytest.approx(top1, abs=1e-9)


def _killed_resumed_and_uninterrupted(npz, tmp_path, overrides: dict, kill_at: str, committed: int):
  """An uninterrupted run (ref), and one SIGKILLed at ``kill_at`` then resumed (wd), whose
  newest checkpoint at the kill was ``committed``; asserts both end bit-identical.
  Returns (ref, wd, the final state)."""
  ref, wd = tmp_path / "ref", tmp_path / "wd"
  train.train_and_evaluate(tiny_config(npz, **overrides), str(ref))
  killed = subprocess.run(launch_cmd(write_config(tmp_path, npz, **overrides), str(wd)),
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(FTJAX_TEST_KILL_AT=kill_at))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert checkpoint.committed_steps(wd / "checkpoints")[-1] == committed
  train.train_and_evaluate(tiny_config(npz, **overrides), str(wd))
  ours, _ = _final_state(wd)
  theirs, _ = _final_state(ref)
  assert ours.keys() == theirs.keys()
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  return ref, wd, ours


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_killed_run_resumes_bit_identical(tiny_vit_npz, tmp_path):
  overrides = {"train.total_steps": 6, "train.checkpoint_every": 2, "train.eval_every": 3}
  ref, wd, _ = _killed_resumed_and_uninterrupted(tiny_vit_npz, tmp_path, overrides, "after:5", 4)
  assert state_sha(wd) == state_sha(ref)
  rows = _rows(wd)
  train_steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
  assert [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"] == \
      [(r["step"], r["loss"]) for r in _rows(ref) if r["kind"] == "train"]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_early_stopping_counts_patience_afresh_when_a_phase_unfreezes(tiny_vit_npz, tmp_path):
  # As above, but block 1 unfreezes at step 2: the evaluation at step 3 is the first with it
  # trained, so patience starts again there and the run stops at step 4, not 3 (a head
  # that had converged used to end a gradual-unfreezing run before the body ever trained).
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 20, "train.eval_every": 1,
                                     "train.early_stopping_patience": 2, "optim.lr": 1e-20,
                                     "train.checkpoint_every": 0,
                                     "optim.param_groups": [("head/.*", {}), ("Transformer/encoderblock_1/.*", {}),
                                                            (".*", None)],
                                     "optim.unfreeze": [(2, "Transformer/encoderblock_1/.*")]})
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert [r["step"] for r in _rows(tmp_path / "wd") if r["kind"] == "eval"] == [1, 2, 3, 4]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_run_killed_after_saving_at_an_unfreezing_step_resumes_bit_identical(tiny_vit_npz, tmp_path):
  # The checkpoint at step 2, the second phase's first step, holds the first phase's
  # optimizer state (step 2's update has not run): the resume must rebuild that phase's
  # state to restore into, then move to the next phase as the uninterrupted run did.
  overrides = {"train.total_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 0,
               "optim.param_groups": [("head/.*", {}), ("Transformer/encoderblock_1/.*", {}), (".*", None)],
               "optim.unfreeze": [(2, "Transformer/encoderblock_1/.*")]}
  _, _, ours = _killed_resumed_and_uninterrupted(tiny_vit_npz, tmp_path, overrides, "after:3", 2)
  block1 = "params/Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
  assert not np.array_equal(ours[block1], np.load(tiny_vit_npz)[block1.removeprefix("params/")])


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_sigterm_saves_exits_75_and_resume_recomputes_nothing(tiny_vit_npz, tmp_path):
  overrides = {"train.total_steps": 400, "train.checkpoint_every": 0, "train.eval_every": 0,
               "train.log_every": 1}
  cfg_file = write_config(tmp_path, tiny_vit_npz, **overrides)
  wd = tmp_path / "wd"
  proc = subprocess.Popen(launch_cmd(cfg_file, str(wd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=subprocess_env())
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert time.time() - sent < 30
  assert proc.returncode == 75, err[-2000:]
  assert "preempted" in err.splitlines()[-1]
  saved = checkpoint.committed_steps(wd / "checkpoints")
  assert saved and 3 <= saved[-1] < 400
  logged = [r["step"] for r in _rows(wd) if r["kind"] == "train"]
  assert logged == list(range(1, saved[-1] + 1))
  # Resuming continues from the saved step: the next logged step is saved + 1.
  # (total_steps is not a key that makes it another experiment: a run may be extended.)
  cfg = tiny_config(tiny_vit_npz, **{**overrides, "train.total_steps": saved[-1] + 2})
  train.train_and_evaluate(cfg, str(wd))
  assert json.loads((wd / "config.json").read_text())["train"]["total_steps"] == saved[-1] + 2
  logged = [r["step"] for r in _rows(wd) if r["kind"] == "train"]
  assert logged == list(range(1, saved[-1] + 3))


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, monkeypatch):
  # Found at the first save, it cost every step trained until then. (Root writes anywhere:
  # the refusal is simulated.)
  from ftjax.errors import ConfigError
  (tmp_path / "wd" / "checkpoints").mkdir(parents=True)
  write_text = Path.write_text

  def refuse(self, *args, **kwargs):
    if self.parent.name == "checkpoints":
      raise PermissionError(13, "Permission denied")
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(Path, "write_text", refuse)
  with pytest.raises(ConfigError, match=r"^ftjax: error: workdir is not writable \(.*/wd/checkpoints\): "
                                        r"Permission denied; choose another --workdir$"):
    train._make_workdir(tmp_path / "wd")
  train._make_workdir(tmp_path / "other")  # a new workdir has no checkpoints/ to probe yet
  assert sorted(p.name for p in (tmp_path / "other").iterdir()) == []


def test_a_plot_that_fails_is_a_warning_after_the_results(tmp_path, monkeypatch, capsys):
  # A full disk, or a class name matplotlib cannot draw (a non-UTF-8 folder name), while
  # drawing the plots: the results are printed first and the run ends normally.
  import types
  from ftjax import metrics as metrics_lib

  def full_disk(*args, **kwargs):
    raise OSError(27, "File too large")

  monkeypatch.setattr(metrics_lib, "plot_confusion", full_disk)
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n")
  cfg = tiny_config("unused.npz", **{"train.plots": True})
  run = types.SimpleNamespace(workdir=tmp_path, config=cfg, num_classes=3,
                              eval_sets={"test": types.SimpleNamespace(class_names=["a", "b", "c"])})
  summary = {"top1": 0.5, "top5": 1.0, "loss": 0.7, "n": 4, "confusion": np.eye(3, dtype=int)}
  train._finish(run, {"test": summary})
  out, err = capsys.readouterr()
  assert out.splitlines() == [  # top5 of 3 classes is 100% by definition: not shown
      "final test: top1 50.00%  loss 0.7000  (4 examples)",
      f"workdir {tmp_path}: checkpoints/ metrics.jsonl config.json learning_curves.png"]
  assert err == f"ftjax: warning: plots not written ({tmp_path}): OSError: [Errno 27] File too large\n"
  assert (tmp_path / "learning_curves.png").is_file()


def test_a_data_error_mid_run_saves_the_trained_steps_first(tiny_vit_npz, tmp_path, monkeypatch, capsys):
  # The training folder vanished after step 3 (no example reads): the three trained steps
  # are saved before the error ends the run, and a rerun resumes from them.
  from ftjax.errors import DataError
  real = train._train_iterator

  def failing(run, start_step):
    it = real(run, start_step)
    for _ in range(3):
      yield next(it)
    it.close()
    raise DataError("no example reads", where="folder[train]")

  monkeypatch.setattr(train, "_train_iterator", failing)
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 6, "train.eval_every": 0, "train.checkpoint_every": 0})
  with pytest.raises(DataError, match="no example reads"):
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints") == [3]
  assert "reading the training data failed at step 3: step 3 saved first; rerun to resume from it" in capsys.readouterr().err


def test_a_ctrl_c_python_swallowed_during_start_up_still_stops_the_run(tiny_vit_npz, tmp_path, monkeypatch):
  # A Ctrl-C whose KeyboardInterrupt was raised inside a garbage-collection callback (jax
  # registers one) is lost to Python; cli.catch_signals_early records it, and the run
  # stops at its start-up check instead of training to the end and exiting 0.
  from ftjax import cli
  from ftjax.errors import Interrupted
  monkeypatch.setattr(cli, "SIGNALS_SEEN", [signal.SIGINT])
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 6, "train.eval_every": 0})
  with pytest.raises(Interrupted, match=r"^ftjax: error: interrupted by Ctrl-C \(step 0\)"):
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints") == [] and _rows(tmp_path / "wd") == []


@pytest.mark.slow  # a launch and a wait: 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tiny_vit_npz, tmp_path):
  cfg_file = write_config(tmp_path, tiny_vit_npz, **{"train.total_steps": 400})
  wd = tmp_path / "wd"
  proc = subprocess.Popen(launch_cmd(cfg_file, str(wd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=subprocess_env())
  for line in proc.stdout:  # the load report: start-up is under way, training not begun
    if line.startswith("loaded "):
      break
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("ftjax: error: interrupted by Ctrl-C") and "Traceback" not in err, err[-3000:]
  assert checkpoint.committed_steps(wd / "checkpoints") == []


@pytest.mark.slow  # a whole run with an evaluation: 12 s or more on 2 slow cores; CI runs it (-m slow)
def test_sigterm_after_the_last_step_lets_the_run_finish(tiny_vit_npz, tmp_path, monkeypatch, capsys):
  # The last step is saved and evaluated when SIGTERM comes: the run prints its results and
  # returns (it exited 75, and a rerun evaluated again).
  def hook(*specs):
    def hit(moment, step):
      if (moment, step) == ("after", 4):
        os.kill(os.getpid(), signal.SIGTERM)
    return hit

  monkeypatch.setattr(train, "fault_hook", hook)
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 4, "train.eval_every": 0, "train.checkpoint_every": 0})
  summaries = train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert summaries["test"]["n"] == 360 and "final test: top1" in capsys.readouterr().out
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints") == [4]


def test_ctrl_c_saves_exits_130_and_a_second_one_quits(tiny_vit_npz, tmp_path, monkeypatch):
  # A first Ctrl-C saves at the end of the step and exits 130; the handler is then the
  # default again (a second Ctrl-C quits at once), and restored when the run returns.
  from ftjax.errors import Interrupted
  handlers = []

  def hook(*specs):
    def hit(moment, step):
      if (moment, step) == ("after", 2):
        os.kill(os.getpid(), signal.SIGINT)
        handlers.append(signal.getsignal(signal.SIGINT))
    return hit

  monkeypatch.setattr(train, "fault_hook", hook)
  # Python's own handler, as a terminal starts it (a shell's background job starts with
  # SIGINT ignored, and the run restores whatever it found).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 6, "train.eval_every": 0,
                                       "train.checkpoint_every": 0, "train.log_every": 1})
    with pytest.raises(Interrupted) as info:
      train.train_and_evaluate(cfg, str(tmp_path / "wd"))
    after = signal.getsignal(signal.SIGINT)
  finally:
    signal.signal(signal.SIGINT, outer)
  assert info.value.exit_code == 130 and str(info.value).startswith("ftjax: error: interrupted by Ctrl-C (step 2)")
  assert handlers == [signal.default_int_handler] and after is signal.default_int_handler
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints") == [2]  # the step it was in


def test_early_stopping_stops_where_the_history_says(tiny_vit_npz, tmp_path, capsys):
  # lr ~ 0: the metric never improves after the first evaluation, so with patience 2
  # and evaluation every step, training stops at step 3.
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 20, "train.eval_every": 1,
                                     "train.early_stopping_patience": 2, "optim.lr": 1e-20,
                                     "train.checkpoint_every": 0})
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  rows = _rows(tmp_path / "wd")
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [1, 2, 3]
  assert re.search(r"early stopping at step 3: best test/top1 \S+ at step 1; predict, export and "
                   r"fewshot take the best kept step with --step best\n", capsys.readouterr().out)
  from ftjax import export
  # All three tie: the best is the first, as early stopping printed (it used to be the newest).
  assert export.run_step(tmp_path / "wd", "best") == 1
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints")[-1] == 3
  # The same command again: the run is over, nothing trains (it used to go on a step a rerun).
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints")[-1] == 3
  assert [r["step"] for r in _rows(tmp_path / "wd") if r["kind"] == "train"] == [1, 2, 3]


def test_keep_best_keeps_the_best_evaluated_step(tiny_vit_npz, tmp_path, capsys, monkeypatch):
  # Evaluations every 2 steps, checkpoints only at the end: each evaluated step is saved
  # as well, so the best of them survives retention beside the latest (before, only the
  # end was ever saved and ranked).  A loss ranked with best_mode "max" is a plan warning.
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 6, "train.eval_every": 2,
                                     "train.checkpoint_every": 0, "train.keep_latest": 1,
                                     "train.keep_best": 1, "train.best_metric": "test/loss",
                                     "train.best_mode": "min", "optim.lr": 0.05})
  # The same run's progress lines, on a clock where each evaluation takes 1,000 s and
  # anything else 1 ms a reading: images/s counts training steps only (an evaluation
  # used to count as training time, here 0.0 img/s), the ETA the evaluations too.
  now = [0.0]

  def clock():
    now[0] += 0.001
    return now[0]

  def slow_evaluate(*args, **kwargs):
    now[0] += 1000.0
    return evaluate(*args, **kwargs)

  evaluate, log = train._evaluate, io.StringIO()
  monkeypatch.setattr(train, "_evaluate", slow_evaluate)
  monkeypatch.setattr(train, "Progress", functools.partial(train.Progress, stream=log, clock=clock))
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  lines = re.findall(r"step (\d)/6 loss \S+ img/s ([\d.]+) eta (\S+)", log.getvalue())
  # Rates start after the first step (its one-off costs left out): step 1 shows its loss alone.
  assert re.match(r"step 1/6 loss \S+\n", log.getvalue()), log.getvalue()
  assert [int(s) for s, _, _ in lines] == [2, 3, 4, 5, 6]
  assert min(float(rate) for _, rate, _ in lines) > 1000, lines  # 16 images in a few ms
  assert dict((s, eta) for s, _, eta in lines)["3"] == "0:25:00"  # 3 steps left at (1,000 s + ms) / 2 steps
  losses = {r["step"]: r["test/loss"] for r in _rows(tmp_path / "wd") if r["kind"] == "eval"}
  assert sorted(losses) == [2, 4, 6]
  best = min(losses, key=losses.get)
  assert checkpoint.committed_steps(tmp_path / "wd" / "checkpoints") == sorted({best, 6})
  # predict / export / fewshot --step best: the step the run's own metric ranks best.
  from ftjax import export
  assert export.run_step(tmp_path / "wd", "best") == best and export.run_step(tmp_path / "wd", "6") == 6
  tree, _ = checkpoint.read_checkpoint(tmp_path / "wd", best)
  got, _ = export.read_run(tmp_path / "wd", step="best")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got["params"]),
                                                  jax.tree.leaves(tree["params"])))
  assert "best_mode 'max': the highest loss counts as best" not in capsys.readouterr().out
  run, _ = train.prepare(tiny_config(tiny_vit_npz, **{"train.best_metric": "test/loss", "train.eval_every": 2,
                                                     "train.early_stopping_patience": 2}), str(tmp_path / "w2"))
  assert run.warnings == [
      # evaluations at steps 2, 4, 6: the first sets the best, the third could only stop at the end
      "early stopping cannot end this run early: 3 evaluation(s) in 6 steps (train.eval_every 2) for "
      "patience 2",
      "train.best_metric test/loss with best_mode 'max': the highest loss counts as best"]
  run, _ = train.prepare(tiny_config(tiny_vit_npz, **{"model.dtype": "float16"}), str(tmp_path / "w4"))
  assert run.warnings == [
      "model.dtype float16 runs without loss scaling: gradients under about 6e-8 flush to zero in the "
      "backward pass; bfloat16 (A100, H100, TPU) has float32's range"]
  run, _ = train.prepare(tiny_config(tiny_vit_npz, **{"data.eval_splits": ["test", "train"]}),
                         str(tmp_path / "w5"))
  assert run.warnings == [
      "data.eval_splits holds the training split 'train': its accuracy is not held out, and early stopping "
      "and the best checkpoint rank by it if first"]
  with pytest.raises(ConfigError, match=r"early stopping watches a split that is not evaluated "
                                        r"\(train.best_metric\): 'top1'"):
    train.prepare(tiny_config(tiny_vit_npz, **{"data.eval_splits": [],
                                               "train.early_stopping_patience": 2}), str(tmp_path / "w3"))


def test_a_refused_resume_leaves_the_workdir_as_it_was(tiny_vit_npz, tmp_path):
  # config.json is the run's config of record: a config refused (another EMA, a run
  # already past the new end, which only the checkpoint can tell) must not replace it, or
  # the documented resume by --workdir alone would fail from then on.
  overrides = {"train.total_steps": 4, "train.eval_every": 0}
  wd = tmp_path / "wd"
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(wd))
  stored = (wd / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"another config .*: train.ema_decay 0.0 -> 0.9"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides, **{"train.ema_decay": 0.9}), str(wd))
  assert (wd / "config.json").read_text() == stored
  with pytest.raises(ConfigError, match=r"another config .*: optim.unfreeze_warmup_steps 0 -> 2"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides, **{"optim.unfreeze_warmup_steps": 2}),
                             str(wd))
  assert (wd / "config.json").read_text() == stored
  # A run recorded before the key existed ran with its default, and the refusal says so.
  older = json.loads(stored)
  del older["optim"]["unfreeze_warmup_steps"]
  (wd / "config.json").write_text(json.dumps(older))
  with pytest.raises(ConfigError, match=r"another config .*: optim.unfreeze_warmup_steps 0 -> 2"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides, **{"optim.unfreeze_warmup_steps": 2}),
                             str(wd))
  (wd / "config.json").write_text(stored)
  with pytest.raises(ConfigError, match=r"the checkpoint is past the run's end \(.*\): step 4 > "
                                        r"train.total_steps 2; raise total_steps"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **{**overrides, "train.total_steps": 2}), str(wd))
  assert (wd / "config.json").read_text() == stored
  train.train_and_evaluate(train.stored_config(wd), str(wd))  # and the run resumes as recorded


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_nan_loss_stops_with_numerics_code_and_keeps_last_good_checkpoint(tiny_vit_npz, tmp_path):
  cfg_file = write_config(tmp_path, tiny_vit_npz, **{
      "train.total_steps": 12, "train.checkpoint_every": 1, "train.eval_every": 0, "train.log_every": 2,
      "optim.name": "sgd", "optim.kwargs": {"momentum": 0.0}, "optim.lr": 1e30})
  wd = tmp_path / "wd"
  r = subprocess.run(launch_cmd(cfg_file, str(wd)), capture_output=True, text=True, timeout=300,
                     env=subprocess_env())
  assert r.returncode == 4, r.stderr[-2000:]
  line = r.stderr.strip().splitlines()[-1]
  # Step 1's update is huge but finite, and saved; step 2's loss is not, and is never saved.
  assert re.fullmatch(r"ftjax: error: non-finite value in training \(step 2\): loss, first non-finite "
                      r"gradient params/\S+; the last good checkpoint \(step 1\) is kept: rerun with "
                      r"train.on_nan=skip to resume from it, or with a lower optim.lr in a new --workdir", line), line
  assert checkpoint.committed_steps(wd / "checkpoints") == [1]
  for step in checkpoint.committed_steps(wd / "checkpoints"):
    flat, _ = checkpoint.read_checkpoint(wd / "checkpoints", step)
    for k, v in flatten(flat).items():
      if np.issubdtype(np.asarray(v).dtype, np.floating):
        assert np.all(np.isfinite(v)), (step, k)
  # The hint holds: the same workdir resumes with on_nan=skip (lr 1e30 then skips every step).
  r = subprocess.run(launch_cmd(cfg_file, str(wd), "--config.train.on_nan=skip",
                                "--config.train.max_consecutive_skips=3"),
                     capture_output=True, text=True, timeout=300, env=subprocess_env())
  assert r.returncode == 4 and "too many consecutive non-finite steps skipped" in r.stderr, r.stderr[-2000:]


def test_nan_skip_policy_leaves_state_bit_identical(tiny_vit_npz, tmp_path):
  from ftjax import models, optim

  cfg = tiny_config(tiny_vit_npz)
  model, variables, _ = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
  tx = optim.make_optimizer(variables["params"], cfg.optim, family="vit", total_steps=6)
  state = train.initial_state(variables["params"], None, tx, 0, ema=False)
  mask = optim.trainable_mask(variables["params"], cfg.optim)
  opts = train.StepOptions(num_classes=10)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx,
                                               trainable=train.trainable_paths(mask), opts=opts))
  good = {"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.arange(4, dtype=np.int32)}
  bad = {"image": np.full((4, 32, 32, 3), np.nan, np.float32), "label": np.arange(4, dtype=np.int32)}
  s1, m1 = step(state, good)
  s2, m2 = step(s1, bad)
  assert bool(m1["finite"]) and not bool(m2["finite"])
  for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state)), jax.tree.leaves((s2.params, s2.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s2.step) == 2 and int(s2.skipped) == 1 and int(s2.first_bad_step) == 2
  assert int(s2.first_bad_what) == 0  # the loss is the first non-finite quantity
  paths = train.trainable_paths(mask)
  assert int(s2.first_bad_param) == 0  # and every gradient with it: the first path is named
  with pytest.raises(NumericsError) as info:
    train._check_numerics(s2, paths, "stop", max_skips=10)
  assert str(info.value) == (
      f"ftjax: error: non-finite value in training (step 2): loss, first non-finite gradient "
      f"params/{paths[0]}; no checkpoint was saved before it: rerun with train.on_nan=skip to skip such "
      "steps, or with a lower optim.lr in a new --workdir")
  with pytest.raises(NumericsError) as info:  # the hint names the checkpoint only when there is one
    train._check_numerics(s2, paths, "stop", max_skips=10, last_saved=1)
  assert str(info.value) == (
      f"ftjax: error: non-finite value in training (step 2): loss, first non-finite gradient "
      f"params/{paths[0]}; the last good checkpoint (step 1) is kept: rerun with train.on_nan=skip to resume "
      "from it, or with a lower optim.lr in a new --workdir")
  with pytest.raises(Exception, match="too many consecutive"):
    train._check_numerics(s2, train.trainable_paths(mask), "skip", max_skips=1)
  assert train._check_numerics(s2, train.trainable_paths(mask), "skip", max_skips=5) == 1


class _TinyNet(nn.Module):
  """Flatten, (BatchNorm,) Dense 8, tanh, Dense: a train step that compiles in a moment."""
  num_classes: int
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(self.num_classes, name="head")(jnp.tanh(nn.Dense(8)(x)))


def _tiny_setup(num_classes, batch_norm=False):
  """A _TinyNet's state under SGD at lr 0.1 (all trainable), and ``step(opts)``: a jitted train_step."""
  from ftjax import optim
  model = _TinyNet(num_classes, batch_norm)
  variables = model.init(jax.random.key(0), np.zeros((1, 4, 4, 3), np.float32))
  params, stats = variables["params"], variables.get("batch_stats", {})
  cfg = {"name": "sgd", "kwargs": {}, "lr": 0.1, "schedule": {"name": "constant"},
         "weight_decay": 0.0}
  tx = optim.make_optimizer(params, cfg, total_steps=10)
  state = train.initial_state(params, stats, tx, 0, ema=False)
  trainable = train.trainable_paths(optim.trainable_mask(params, cfg))
  step = lambda opts: jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                                trainable=trainable, opts=opts))
  return model, state, step


def _batch(n, classes, seed=0, nan=False):
  image = np.random.default_rng(seed).normal(size=(n, 4, 4, 3)).astype(np.float32)
  return {"image": np.full_like(image, np.nan) if nan else image,
          "label": (np.arange(n) % classes).astype(np.int32)}


def test_accumulated_gradients_are_averaged_over_the_micro_batches():
  # 4 micro-batches of 2 make the same SGD step as one batch of 8 (no dropout, no BatchNorm).
  batch = _batch(8, 5)
  _, state, step = _tiny_setup(5)
  one, accum = step(train.StepOptions(num_classes=5)), step(train.StepOptions(num_classes=5, accum_steps=4))
  want, mw = one(state, batch)
  got, mg = accum(state, batch)
  assert not np.allclose(flatten(want.params)["head/kernel"], flatten(state.params)["head/kernel"])
  np.testing.assert_allclose(float(mg["loss"]), float(mw["loss"]), rtol=1e-5)
  for path, x in flatten(want.params).items():
    np.testing.assert_allclose(flatten(got.params)[path], x, rtol=1e-5, atol=1e-6, err_msg=path)


def test_label_smoothing_reaches_the_loss_and_consecutive_skips_reset():
  import optax
  model, state, step = _tiny_setup(5)
  step = step(train.StepOptions(num_classes=5, label_smoothing=0.1))
  good, bad = _batch(4, 5), _batch(4, 5, nan=True)
  logits = model.apply({"params": state.params}, good["image"])
  want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(good["label"], 5), 0.1))
  s, m = step(state, good)
  np.testing.assert_allclose(float(m["loss"]), float(want.mean()), rtol=1e-5)
  # good, bad, good: the run of skips ends; then bad, bad: it is 2 long.
  s, _ = step(s, bad)
  assert (int(s.skipped), int(s.consecutive_skips)) == (1, 1)
  s, _ = step(s, good)
  assert (int(s.skipped), int(s.consecutive_skips)) == (1, 0)
  s, _ = step(step(s, bad)[0], bad)
  assert (int(s.skipped), int(s.consecutive_skips)) == (3, 2)


def test_a_skipped_step_keeps_the_batchnorm_statistics():
  # A NaN batch moves the running statistics to NaN: the skipped step must not keep them.
  _, state, step = _tiny_setup(3, batch_norm=True)
  step = step(train.StepOptions(num_classes=3, update_batch_stats=True))
  before = {p: np.array(v) for p, v in flatten(state.batch_stats).items()}
  s1, _ = step(state, _batch(4, 3))
  s2, m2 = step(s1, _batch(4, 3, nan=True))
  assert not bool(m2["finite"]) and int(s2.skipped) == 1
  after_good = flatten(s1.batch_stats)
  assert all(not np.array_equal(before[p], after_good[p]) for p in before)  # the good step moved them
  for path, x in flatten(s2.batch_stats).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(after_good[path]), err_msg=path)


# The CLI's one-line errors (unknown keys, bad values, class counts, missing folders, unwritable
# workdirs, ...) are the catalogue in tests/faults/test_malformed_inputs.py.


def test_resuming_into_a_workdir_with_another_config_is_refused(tiny_vit_npz, tmp_path):
  wd = tmp_path / "wd"
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **{"train.total_steps": 1}), str(wd))
  with pytest.raises(ConfigError, match="another config"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "optim.lr": 0.5}), str(wd))
  # A run that failed before its first checkpoint left only its config.json: nothing to
  # continue, so the corrected command is taken (it used to be refused for good).
  empty = tmp_path / "failed_at_start"
  empty.mkdir()
  (empty / "config.json").write_text((wd / "config.json").read_text())
  train.prepare(tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "optim.lr": 0.5}), str(empty))


def test_an_unlabelled_eval_split_fails_before_training(tiny_vit_npz, tmp_path, monkeypatch):
  # tfds reads labels on first use; an eval split of -1 labels used to fail (or, before
  # the check, score nonsense) only at the first evaluation, after eval_every steps.
  from PIL import Image
  from ftjax import data
  from ftjax.errors import DataError

  class Unlabelled:  # labels read on first use, as tfds's are; -1 for every record
    in_memory = True

    def __len__(self):
      return 4

    def read(self, j):
      return Image.new("RGB", (8, 8))

    def labels(self, index):
      return [-1] * 4

    def describe(self, j):
      return f"unlabelled record {j}"

  build = data.build
  unlabelled = data.Dataset(Unlabelled(), name="unlabelled", class_names=[str(d) for d in range(10)])
  monkeypatch.setattr(train.data_lib, "build",
                      lambda c, split: build(c, split=split) if split == "train" else unlabelled)
  with pytest.raises(DataError, match=r"^ftjax: error: label out of range \(unlabelled record 0\): label -1 "):
    train.prepare(tiny_config(tiny_vit_npz), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_an_optimizer_option_optax_refuses_fails_before_the_workdir_is_written(tiny_vit_npz, tmp_path):
  # optax reads b1 only inside an update: this used to be a traceback from the first
  # step's compilation, with config.json already written (and then refusing the fix).
  cfg = tiny_config(tiny_vit_npz, **{"optim.kwargs": {"b1": "0.9x"}})
  with pytest.raises(ConfigError, match=r"^ftjax: error: the optimizer fails on an update \(optim\): "
                                        r"TypeError: .*; check optim.kwargs"):
    train.prepare(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def _run_script(tmp_path, text: str) -> str:
  """Runs ``text`` as a Python process of its own (it sets XLA_FLAGS before jax starts: a
  device count this process cannot change); returns its stdout, failing on a non-zero exit."""
  script = tmp_path / "script.py"
  script.write_text(text)
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                     env=subprocess_env())
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


PARALLEL_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np, jax
    sys.path.insert(0, {tests!r})
    from conftest import sgd_step_setup
    from ftjax import train
    from jax.sharding import Mesh
    params, tx, fn, batches = sgd_step_setup({npz!r}, 3)
    opts = train.StepOptions(num_classes=10)
    def run(runner):
      state = runner.put_state(train.initial_state(params, None, tx, 0, ema=False))
      step = runner.compile(fn, opts)
      for b in batches:
        state, _ = step(state, runner.put_batch(b))
      return jax.device_get(runner.view(state).params)
    assert jax.device_count() == 8
    one = run(train.JitRunner(Mesh(np.asarray(jax.devices()[:1]), ("data",))))
    sharded = run(train.JitRunner(Mesh(np.asarray(jax.devices()), ("data",))))
    fsdp = run(train.JitRunner(Mesh(np.asarray(jax.devices()), ("data",)), (".*/kernel",)))
    pmapped = run(train.PmapRunner())
    worst = 0.0
    for other in (sharded, fsdp, pmapped):
      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other)):
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params)))
    print("WORST", worst, "MOVED", moved)
''')


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_jit_sharded_fsdp_and_pmap_match_one_device(tiny_vit_npz, tmp_path):
  stdout = _run_script(tmp_path, PARALLEL_SCRIPT.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  line = [l for l in stdout.splitlines() if l.startswith("WORST")][0].split()
  worst, moved = float(line[1]), float(line[3])
  assert moved > 1e-4  # the three steps really changed the parameters
  assert worst <= 1e-5


PMAP_DROPOUT_SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np, jax, optax
    import flax.linen as nn
    from ftjax import train

    class Drop(nn.Module):
      rate: float

      @nn.compact
      def __call__(self, x, train=False):
        x = nn.Dropout(self.rate, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(3, name="head")(x)

    half = {"image": np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32),
            "label": np.arange(4, dtype=np.int32) % 3}
    both = {k: np.concatenate([v, v]) for k, v in half.items()}  # each device: the same 4
    for rate in (0.0, 0.5):
      model = Drop(rate)
      params = model.init(jax.random.key(0), half["image"])["params"]
      tx = optax.sgd(0.1)
      fn = lambda state, batch, opts: train.train_step(state, batch, model=model, tx=tx,
                                                       trainable=("head/bias", "head/kernel"), opts=opts)
      losses = []
      for runner, batch in ((train.PmapRunner(jax.devices()[:1]), half), (train.PmapRunner(), both)):
        state = runner.put_state(train.initial_state(params, None, tx, 0, ema=False))
        _, m = runner.compile(fn, train.StepOptions(num_classes=3))(state, runner.put_batch(batch))
        losses.append(float(runner.view(m)["loss"]))
      print("RATE", rate, "LOSSES", *losses)
''')


def test_pmap_devices_draw_their_own_dropout(tmp_path):
  # Each device got the same dropout key: example i of every device's slice dropped the
  # same units (correlated draws, unlike jit's over the global batch). Two devices given
  # the same examples then computed one device's loss exactly.
  stdout = _run_script(tmp_path, PMAP_DROPOUT_SCRIPT)
  losses = {float(l.split()[1]): [float(x) for x in l.split()[3:]] for l in stdout.splitlines()
            if l.startswith("RATE")}
  assert losses[0.0][0] == losses[0.0][1]  # no dropout: the same examples, the same loss
  assert losses[0.5][0] != losses[0.5][1]  # dropout: device 1 draws its own units


FSDP_LOOP_SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import numpy as np, jax
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from ftjax import checkpoint, train
    from ftjax.tree import flatten
    over = {{"train.total_steps": 3, "train.eval_every": 0, "train.checkpoint_every": 3,
            "train.ema_decay": 0.5, "optim.name": "sgd", "optim.kwargs": {{"momentum": 0.9}},
            "optim.lr": 0.1, "optim.param_groups": [("head/.*", {{}}),
                                                    ("Transformer/encoderblock_1/.*", {{}}), (".*", None)]}}
    assert jax.device_count() == 4
    for name, rules in (("replicated", ()), ("sharded", (".*/kernel",))):
      train.train_and_evaluate(tiny_config({npz!r}, **over, **{{"train.shard_params": rules}}),
                               os.path.join({wd!r}, name))
    a, _ = checkpoint.read_checkpoint(os.path.join({wd!r}, "replicated", "checkpoints"))
    b, _ = checkpoint.read_checkpoint(os.path.join({wd!r}, "sharded", "checkpoints"))
    a, b = flatten(a), flatten(b)
    assert a.keys() == b.keys()
    print("WORST", max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
                       for k in a if np.asarray(a[k]).dtype.kind == "f"))
''')


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_training_loop_with_sharded_params_runs_and_matches_replicated(tiny_vit_npz, tmp_path):
  # train.shard_params through the whole loop on 4 devices: the momentum and the EMA of a
  # sharded parameter come out of the compiled step sharded like it, so the state must go in
  # that way too (they went in replicated, and the second step refused its arguments).
  stdout = _run_script(tmp_path, FSDP_LOOP_SCRIPT.format(tests=str(REPO / "tests"), npz=tiny_vit_npz,
                                                         wd=str(tmp_path)))
  worst = float([l for l in stdout.splitlines() if l.startswith("WORST")][0].split()[1])
  assert worst <= 1e-5


ACCUM_SCRIPT = textwrap.dedent('''
    import os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import numpy as np, jax
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    from conftest import sgd_step_setup
    from ftjax import train
    from ftjax.tree import flatten
    params, tx, fn, batches = sgd_step_setup({npz!r}, 1)
    runner = train.JitRunner(Mesh(np.asarray(jax.devices()), ("data",)))
    out = {{}}
    for k in (1, 4):
      step = runner.compile(fn, train.StepOptions(num_classes=10, accum_steps=k))
      state = runner.put_state(train.initial_state(params, None, tx, 0, ema=False))
      batch = runner.put_batch(batches[0])
      print("GATHERS", k, len(re.findall(r" all-gather\\(", step.lower(state, batch).compile().as_text())))
      state, metrics = step(state, batch)
      out[k] = flatten(runner.view(state).params), float(metrics["loss"])
    print("LOSS", out[1][1], out[4][1])
    print("WORST", max(float(np.max(np.abs(np.asarray(out[1][0][p]) - np.asarray(out[4][0][p])))) for p in out[1][0]))
''')


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_gradient_accumulation_keeps_each_micro_batch_on_every_device(tiny_vit_npz, tmp_path):
  # Contiguous micro-batches sat on a quarter of the devices each: XLA gathered the whole
  # batch onto every device, which computed all of it (4x the work, more memory).
  stdout = _run_script(tmp_path, ACCUM_SCRIPT.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  rows = [line.split() for line in stdout.splitlines()]
  assert [row[1:] for row in rows if row[0] == "GATHERS"] == [["1", "0"], ["4", "0"]], stdout
  # the same step: the mean of four micro-batch means is the batch mean (no BatchNorm here)
  (loss1, loss4), = [map(float, row[1:]) for row in rows if row[0] == "LOSS"]
  assert loss4 == pytest.approx(loss1, abs=1e-5)
  assert [float(row[1]) <= 1e-5 for row in rows if row[0] == "WORST"] == [True], stdout


def test_lora_param_groups_that_freeze_the_adapters_or_train_the_base_are_said(tiny_vit_npz, tmp_path):
  # Only the single default group becomes LoRA's; configs/vit_head_only.py's rules froze every
  # adapter, and ("head/.*", lr_mult 10), (".*", {}) trained the whole base, both silently.
  def lora_warnings(groups, name):
    cfg = tiny_config(tiny_vit_npz, **{"model.lora_rank": 2, "optim.param_groups": groups})
    run, _ = train.prepare(cfg, str(tmp_path / name))
    return [w for w in run.warnings if w.startswith("LoRA")]

  with pytest.raises(ConfigError, match=r"model.lora_rank is set but optim.param_groups freeze every adapter "
                                        r"\(optim.param_groups\): \d+ lora/ leaves frozen"):
    lora_warnings([("head/.*", {}), (".*", None)], "a")
  assert not (tmp_path / "a").exists()
  assert lora_warnings([("head/.*", {"lr_mult": 10.0}), (".*", {})], "b") == [
      "LoRA with base weights training too (Transformer, cls, embedding): they take gradients and optimizer "
      'state; add (".*", None) last in optim.param_groups to freeze them']
  assert lora_warnings([("lora/.*|head/.*", {}), (".*", None)], "c") == []
  assert lora_warnings([(".*", {})], "d") == []  # the default: LoRA's own groups


def test_lora_run_trains_adapters_and_head_only(tiny_vit_npz, tmp_path, capsys):
  wd = tmp_path / "wd"
  # remat on (the memory-bound LoRA setting): the adapters' gradients go through the
  # recomputed blocks.  The one param group's spec carries over to adapters and head.
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 3, "model.lora_rank": 2, "train.eval_every": 0,
                                     "optim.lr": 1e-2, "model.remat": True, "model.attention": "xla",
                                     "optim.param_groups": [(".*", {"lr_mult": 0.5})]})
  train.train_and_evaluate(cfg, str(wd))
  plan = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("g0 ", "g1 "))]
  assert [(row[0], row[3], row[4]) for row in plan] == [("g0", "0.5", "0.005"), ("g1", "0.5", "0.005")]
  flat, extra = _final_state(wd)
  assert extra["model"]["lora"]["rank"] == 2
  assert extra["model"]["arch"]["remat"] is True and extra["model"]["arch"]["attention"] == "xla"
  lora_keys = [k for k in flat if k.startswith("params/lora/")]
  assert lora_keys and any(np.any(flat[k] != 0) for k in lora_keys if k.endswith("/b"))
  with np.load(tiny_vit_npz) as init:
    for k in init.files:
      if not k.startswith("head/"):  # the base is frozen: bit-identical
        np.testing.assert_array_equal(flat[f"params/{k}"], init[k], err_msg=k)
  assert any(not np.array_equal(flat["params/head/kernel"], v) for v in [np.load(tiny_vit_npz)["head/kernel"]])
  opt_floats = sum(np.asarray(v).size for k, v in flat.items() if k.startswith("opt_state/")
                   and np.asarray(v).dtype == np.float32)
  trainable = sum(flat[k].size for k in lora_keys) + flat["params/head/kernel"].size + flat["params/head/bias"].size
  assert opt_floats == 2 * trainable  # adamw moments for adapters and head only


def test_ema_is_kept_checkpointed_and_evaluated(tiny_vit_npz, tmp_path):
  from ftjax import models
  wd = tmp_path / "wd"
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "train.ema_decay": 0.75,
                                     "train.eval_every": 0})
  summaries = train.train_and_evaluate(cfg, str(wd))
  assert set(summaries) == {"test", "ema_test"} and summaries["ema_test"]["n"] == 360
  flat, _ = _final_state(wd)
  _, start, _ = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
  for k, p0 in flatten(start).items():
    p1, ema = flat[k], flat[k.replace("params/", "ema_params/", 1)]
    np.testing.assert_allclose(ema, 0.75 * p0 + 0.25 * p1, rtol=1e-6, atol=1e-7, err_msg=k)
  rows = _rows(wd)
  assert any("ema_test/top1" in r for r in rows if r["kind"] == "eval")


def test_nothing_trainable_runs_with_the_warning_and_changes_nothing(tiny_vit_npz, tmp_path, capsys):
  # Every parameter frozen (the head too): the plan warns, and the run still steps through
  # (no gradient is taken, no weight moves) instead of failing inside the compiled step.
  wd = tmp_path / "wd"
  cfg = tiny_config(tiny_vit_npz, **{"optim.param_groups": [(".*", None)], "train.total_steps": 2,
                                     "train.eval_every": 0, "train.checkpoint_every": 2})
  train.train_and_evaluate(cfg, str(wd))
  out = capsys.readouterr().out
  assert out.count("nothing trains at step 0") == 1 and "WARNING: nothing trains at step 0" in out
  flat, _ = _final_state(wd)
  with np.load(tiny_vit_npz) as init:
    for k in init.files:
      np.testing.assert_array_equal(flat[f"params/{k}"], init[k], err_msg=k)
  rows = [r for r in _rows(wd) if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] == 0.0 for r in rows)
  # Without plots and TensorBoard, the last line names only what is there (it listed both).
  assert out.splitlines()[-1] == f"workdir {wd}: checkpoints/ metrics.jsonl config.json"


def test_a_head_of_zeros_frozen_for_the_whole_run_is_refused(tiny_vit_npz, tmp_path):
  # A new head (another class count: zeros) left out of the param groups: every logit 0 and
  # no gradient below it, so the block that "trains" never moves.  It used to run with a
  # warning that such a head "would keep its initialisation".
  cfg = tiny_config(tiny_vit_npz, **{"model.dont_load": ("params/head/.*",),
                                     "optim.param_groups": [("Transformer/encoderblock_1/.*", {}),
                                                            (".*", None)]})
  with pytest.raises(ConfigError, match=r"^ftjax: error: the head is all zeros and frozen for the whole "
                                        r"run \(optim.param_groups\): every logit 0"):
    train.prepare(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"optim.param_groups": [("head/.*", {"lr_mult": 0.0}), (".*", {})]}, r"optim.lr / lr_mult"),
    ({"optim.lr": 0.0}, r"optim.lr / lr_mult")])
def test_a_head_of_zeros_at_learning_rate_0_is_refused(tiny_vit_npz, tmp_path, overrides, match):
  # A zero head "trained" at lr 0 is as dead as a frozen one: it ran to 9.7% (every
  # prediction class 0) with at most a warning about lr_mult 0's cost.
  cfg = tiny_config(tiny_vit_npz, **{"model.dont_load": ("params/head/.*",), **overrides})
  with pytest.raises(ConfigError, match=r"^ftjax: error: the head is all zeros and its learning rate is 0 \("
                                        + match):
    train.prepare(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_a_head_of_zeros_unfrozen_after_the_body_is_a_plan_warning(tiny_vit_npz, tmp_path):
  # Until the zero head unfreezes, what trains below it gets exactly zero gradient.
  def head_warnings(dont_load, unfreeze):
    cfg = tiny_config(tiny_vit_npz, **{"model.dont_load": dont_load, "optim.unfreeze": unfreeze,
                                       "train.total_steps": 10})
    run, _ = train.prepare(cfg, str(tmp_path / f"wd{len(dont_load)}{len(unfreeze)}"))
    return [w for w in list(run.plan.warnings) + run.warnings if "head" in w]

  late = head_warnings(("params/head/.*",), [(5, "head/.*")])
  assert len(late) == 1 and late[0].startswith("the head is all zeros and frozen until step 5: the ")
  assert head_warnings(("params/head/.*",), [(5, "Transformer/.*")]) == []  # the head first: fine
  assert head_warnings((), [(5, "head/.*")]) == []  # a loaded head passes gradients down
  cfg = tiny_config(tiny_vit_npz, **{"optim.lr": 0.0})
  run, _ = train.prepare(cfg, str(tmp_path / "lr0"))  # a loaded head: allowed, but said
  assert "optim.lr is 0: no parameter moves (BatchNorm statistics alone may)" in run.plan.warnings


def test_a_class_left_without_training_examples_is_a_plan_warning(tiny_vit_npz, tmp_path):
  # A seeded val_fraction split sends the only image of "rare" to val: the class count still
  # agrees (3 folders, 3 outputs), but training would never see that class.
  from PIL import Image
  for name, n in [("a", 5), ("b", 5), ("rare", 1)]:
    (tmp_path / "img" / name).mkdir(parents=True)
    for i in range(n):
      Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / name / f"{i}.png")

  def warnings_at(val_fraction):
    cfg = tiny_config(tiny_vit_npz, **{"data.source": "folder", "data.root": str(tmp_path / "img"),
                                       "data.val_fraction": val_fraction, "data.eval_splits": ["val"]})
    run, _ = train.prepare(cfg, str(tmp_path / f"wd{val_fraction}"))
    assert cfg.train.best_metric == "val/top1"  # the default "top1" of the first evaluated split
    assert np.bincount(run.train_ds.labels, minlength=3).tolist() == (
        [2, 2, 0] if val_fraction == 0.6 else [3, 3, 1])
    return list(run.plan.warnings) + run.warnings

  assert [w for w in warnings_at(0.6) if "no training example" in w] == [
      f"1 of 3 classes have no training example in {tmp_path / 'img'}[train]: 'rare'; the model "
      "cannot learn them (check val_fraction, the image count of each class, skipped files)"]
  assert not [w for w in warnings_at(0.4) if "no training example" in w]


# ------------------------------------------------------------------- BatchNorm in a phase


@pytest.mark.parametrize("freeze_bn,groups,moved", [
    ("auto", [("head/.*", {}), (".*", None)], []),  # head only: no statistics move
    ("auto", [("head/.*|stage2/.*", {}), (".*", None)], ["stage2"]),  # the last stage's only
    ("yes", [("head/.*|stage2/.*", {}), (".*", None)], []),
    ("no", [("head/.*", {}), (".*", None)], ["stem", "stage1", "stage2"]),
])
def test_a_phase_moves_the_statistics_of_the_batchnorm_layers_it_trains(freeze_bn, groups, moved):
  # timm freezes a frozen module's BatchNorm (FrozenBatchNorm2d); "auto" does so layer by
  # layer and phase by phase, where it used to move every layer's statistics from step 0
  # once any phase trained any of the backbone.
  import types
  from jax.sharding import Mesh
  from ftjax import models, optim
  from ftjax.models.resnet import ResNet
  model = ResNet(num_classes=3, block="basic", depths=(1, 1), widths=(8, 16), stem_width=8)
  variables = models.init_variables(model, 16)
  params, stats = variables["params"], variables["batch_stats"]
  cfg = optim.default_config()
  cfg.param_groups = groups
  mask = optim.trainable_mask(params, cfg)
  run = types.SimpleNamespace(model=model, config=types.SimpleNamespace(
      train=types.SimpleNamespace(freeze_bn=freeze_bn)))
  phase_model, opts = train._phase_step(run, mask, train.StepOptions(num_classes=3), stats)
  tx = optim.make_optimizer(params, cfg, total_steps=10)
  runner = train.JitRunner(Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  step = runner.compile(functools.partial(train.train_step, model=phase_model, tx=tx,
                                          trainable=train.trainable_paths(mask)), opts)
  before = {p: np.array(v) for p, v in flatten(stats).items()}  # the step donates its input
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
           "label": np.arange(4, dtype=np.int32) % 3}
  state, _ = step(runner.put_state(train.initial_state(params, stats, tx, 0, ema=False)),
                  runner.put_batch(batch))
  after = flatten(runner.view(state).batch_stats)
  changed = sorted({p.split("/")[0] for p, v in before.items() if not np.array_equal(v, after[p])})
  assert changed == sorted(moved) and opts.update_batch_stats == bool(moved)


@pytest.mark.parametrize("freeze_bn", ["no", pytest.param("yes", marks=pytest.mark.slow)])  # 12-15 s each
def test_ema_averages_the_batchnorm_statistics_it_evaluates_with(freeze_bn):
  # timm's EMA averages BatchNorm's running statistics with the weights; the EMA weights
  # used to be evaluated with the live statistics.  Frozen statistics keep an exact EMA.
  import types
  from ftjax import models, optim
  from ftjax.models.resnet import ResNet
  model = ResNet(num_classes=3, block="basic", depths=(1, 1), widths=(8, 16), stem_width=8)
  variables = models.init_variables(model, 16)
  params, stats = variables["params"], variables["batch_stats"]
  cfg = optim.default_config()
  mask = optim.trainable_mask(params, cfg)
  run = types.SimpleNamespace(model=model, config=types.SimpleNamespace(
      train=types.SimpleNamespace(freeze_bn=freeze_bn)))
  phase_model, opts = train._phase_step(run, mask, train.StepOptions(num_classes=3, ema_decay=0.75), stats)
  tx = optim.make_optimizer(params, cfg, total_steps=10)
  step = jax.jit(functools.partial(train.train_step, model=phase_model, tx=tx,
                                   trainable=train.trainable_paths(mask), opts=opts))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
           "label": np.arange(4, dtype=np.int32) % 3}
  state = train.initial_state(params, stats, tx, 0, ema=True)
  one, _ = step(state, batch)
  two, _ = step(one, batch)
  s0, s1, s2, e2 = (flatten(x) for x in (stats, one.batch_stats, two.batch_stats, two.ema_batch_stats))
  assert s0.keys() == e2.keys() and s0
  for k in s0:
    if freeze_bn == "yes":
      np.testing.assert_array_equal(e2[k], s0[k], err_msg=k)
      np.testing.assert_array_equal(s2[k], s0[k], err_msg=k)
    else:
      np.testing.assert_allclose(e2[k], 0.5625 * s0[k] + 0.1875 * s1[k] + 0.25 * s2[k],
                                 rtol=1e-6, atol=1e-7, err_msg=k)
  if freeze_bn == "no":
    assert not all(np.array_equal(s2[k], s0[k]) for k in s0)
  assert train.initial_state(params, stats, tx, 0, ema=False).ema_batch_stats is None


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_ema_evaluation_and_export_use_the_ema_statistics(tmp_path):
  import torch
  import torchvision

  from ftjax import export, models
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
  wd = tmp_path / "wd"
  cfg = tiny_config(str(tmp_path / "unused.npz"), **{
      "model.source": f"torchvision:resnet18@{tmp_path / 'r18.pth'}", "train.freeze_bn": "no",
      "train.total_steps": 1, "train.ema_decay": 0.5, "train.eval_every": 0, "train.batch_size": 8})
  seen = []
  evaluate = train._evaluate

  def spy(run, state, eval_fn, *args, **kwargs):
    return evaluate(run, state, lambda p, bs, b: seen.append((p, bs)) or eval_fn(p, bs, b), *args, **kwargs)

  import unittest.mock
  with unittest.mock.patch.object(train, "_evaluate", spy):
    summaries = train.train_and_evaluate(cfg, str(wd))
  assert set(summaries) == {"test", "ema_test"}
  flat, _ = _final_state(wd)
  _, start, _ = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
  start = flatten(start["batch_stats"])
  for k, s0 in start.items():
    s1, ema = flat[f"batch_stats/{k}"], flat[f"ema_batch_stats/{k}"]
    np.testing.assert_allclose(ema, 0.5 * s0 + 0.5 * s1, rtol=1e-6, atol=1e-6, err_msg=k)
  key = sorted(start)[0]
  live, averaged = flat[f"batch_stats/{key}"], flat[f"ema_batch_stats/{key}"]
  assert not np.array_equal(live, averaged)
  # The live parameters are evaluated with the live statistics, the EMA ones with their EMA.
  head = "head/kernel"
  assert not np.array_equal(flat[f"params/{head}"], flat[f"ema_params/{head}"])
  pairs = {("ema" if np.array_equal(flatten(p)[head], flat[f"ema_params/{head}"]) else "live"):
           np.asarray(flatten(bs)[key]) for p, bs in seen}
  assert pairs.keys() == {"live", "ema"}
  np.testing.assert_array_equal(pairs["live"], live)
  np.testing.assert_array_equal(pairs["ema"], averaged)
  variables, _ = export.read_run(wd, ema=True)
  np.testing.assert_array_equal(flatten(variables["batch_stats"])[key], averaged)
  variables, _ = export.read_run(wd)
  np.testing.assert_array_equal(flatten(variables["batch_stats"])[key], live)


# ------------------------------------------------------------------- frozen weights cast once


def _cast_case(family, arch, groups, image_size=32):
  """A bf16 model, its AdamW state with ``groups`` trainable, the step's static pieces and 3 batches."""
  import jax.numpy as jnp

  from ftjax import models, optim

  model, _ = models.create(family, arch, num_classes=5, image_size=image_size, dtype=jnp.bfloat16)
  variables = models.init_variables(model, image_size)
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape),
                        variables["params"])
  cfg = {"name": "adamw", "kwargs": {}, "lr": 1e-2, "schedule": {"name": "constant"},
         "weight_decay": 0.01, "param_groups": groups}
  tx = optim.make_optimizer(params, cfg, family=family, total_steps=3)
  state = train.initial_state(params, variables.get("batch_stats", {}), tx, 0, ema=True)
  trainable = train.trainable_paths(optim.trainable_mask(params, cfg))
  opts = train.StepOptions(num_classes=5)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(4, image_size, image_size, 3)).astype(np.float32),
              "label": rng.integers(0, 5, 4).astype(np.int32)} for _ in range(3)]
  return model, state, tx, trainable, opts, batches


@pytest.mark.parametrize("family, arch, groups", [
    ("vit", {"variant": "test"}, [("head/.*", {}), (".*", None)]),
    # the backward pass goes through frozen blocks to a trainable embedding
    ("vit", {"variant": "test"}, [("head/.*", {}), ("embedding/.*", {}), (".*", None)]),
    # and through recomputed blocks (remat: a custom VJP recomputing the forward, casts too)
    ("vit", {"variant": "test", "remat": True}, [("head/.*", {}), ("embedding/.*", {}), (".*", None)]),
    ("resnet", {"variant": "resnet18", "frozen_bn": True}, [("head/.*", {}), (".*", None)]),
])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_frozen_weights_cast_once_give_bit_identical_steps(family, arch, groups):
  import functools

  model, state, tx, trainable, opts, batches = _cast_case(family, arch, groups)
  paths = train.frozen_cast_paths(model, state.params, state.batch_stats, (32, 32, 3), opts)
  paths = {p: d for p, d in paths.items() if p not in trainable}
  # The weights the bf16 forward casts, not those it reads in float32.
  kernels = [p for p in flatten(state.params) if p.endswith("kernel") and p not in trainable]
  assert kernels and set(kernels) <= set(paths)
  assert not any(re.search(r"LayerNorm|encoder_norm|/bn\d*/|/bn_", p) for p in paths), paths
  frozen = train.cast_frozen(state.params, paths)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, trainable=trainable, opts=opts))
  a = b = state
  for batch in batches:
    a, ma = step(a, batch)
    b, mb = step(b, batch, frozen)
    assert float(ma["loss"]) == float(mb["loss"]) and float(ma["grad_norm"]) == float(mb["grad_norm"])
  want, got = flatten(a), flatten(b)
  assert want.keys() == got.keys()
  for path, x in want.items():
    np.testing.assert_array_equal(got[path], x, err_msg=path)
  assert not np.array_equal(a.params["head"]["kernel"], state.params["head"]["kernel"])  # it trained
  # The copies must be the values the model would have cast: others change the step.
  wrong = {p: (v * 1.01).astype(v.dtype) for p, v in frozen.items()}
  assert float(step(state, batches[0], wrong)[1]["loss"]) != float(step(state, batches[0])[1]["loss"])
  with pytest.raises(ValueError, match="not frozen: .*head/kernel"):
    step(state, batches[0], {**frozen, "head/kernel": state.params["head"]["kernel"]})


def test_cast_only_leaves_follow_jitted_bodies_and_stop_at_other_uses():
  import jax.numpy as jnp

  inner = jax.jit(lambda w, x: x @ w.astype(jnp.bfloat16))
  apply = lambda p, x: (inner(p["w"], x) + p["b"].astype(jnp.float16).astype(jnp.bfloat16)
                        + p["both"].astype(jnp.bfloat16) * p["both"].astype(jnp.float16).astype(jnp.bfloat16)
                        + jnp.sum(p["raw"]) + p["half"])
  p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "both": jnp.ones(2), "raw": jnp.ones(2),
       "half": jnp.ones(2, jnp.bfloat16)}
  assert train.cast_only_leaves(apply, p, jnp.ones((1, 2), jnp.bfloat16)) == {
      "b": np.dtype(jnp.float16), "w": np.dtype(jnp.bfloat16)}
  # float32 compute casts nothing: no copies
  from ftjax import models
  model, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  params = models.init_variables(model, 32)["params"]
  assert train.frozen_cast_paths(model, params, {}, (32, 32, 3), train.StepOptions(num_classes=3)) == {}


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_gradual_unfreezing_in_bf16_equals_a_run_without_cast_copies(tiny_vit_npz, tmp_path, monkeypatch,
                                                                     capsys):
  # The loop casts each phase's frozen weights once; a run where it casts none (every step
  # casting them itself) ends bit-identical.
  overrides = {"model.dtype": "bfloat16", "train.total_steps": 4, "train.eval_every": 0,
               "train.checkpoint_every": 4,
               "optim.param_groups": [("head/.*", {}), ("Transformer/encoderblock_1/.*", {}), (".*", None)],
               "optim.unfreeze": [(2, "Transformer/encoderblock_1/.*")]}
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "cast"))
  out = capsys.readouterr().out
  counts = [int(n) for n in re.findall(r"phase \d: .* (\d+) frozen tensors cast once", out)]
  assert len(counts) == 2 and counts[0] > counts[1] > 0, out  # block 1's weights train from step 2
  with monkeypatch.context() as m:  # the copies are what the steps use: wrong ones show
    m.setattr(train, "cast_frozen", lambda params, paths: {
        p: (flatten(params)[p] * 1.01).astype(d) for p, d in paths.items()})
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "wrong"))
  capsys.readouterr()
  monkeypatch.setattr(train, "frozen_cast_paths", lambda *a, **k: {})
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "plain"))
  assert "cast once" not in capsys.readouterr().out
  got, _ = _final_state(tmp_path / "cast")
  want, _ = _final_state(tmp_path / "plain")
  wrong, _ = _final_state(tmp_path / "wrong")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert not np.array_equal(wrong["params/head/kernel"], want["params/head/kernel"])
  assert not np.array_equal(got["params/Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
                            np.load(tiny_vit_npz)["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"])


def test_pmap_head_only_in_bf16_casts_once_per_device_and_matches(tiny_vit_npz, tmp_path, monkeypatch, capsys):
  overrides = {"model.dtype": "bfloat16", "train.parallel": "pmap", "train.total_steps": 2,
               "train.eval_every": 0, "train.checkpoint_every": 2,
               "optim.param_groups": [("head/.*", {}), (".*", None)]}
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "cast"))
  assert re.search(r"phase 0: .* \d+ frozen tensors cast once", capsys.readouterr().out)
  monkeypatch.setattr(train, "frozen_cast_paths", lambda *a, **k: {})
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "plain"))
  got, _ = _final_state(tmp_path / "cast")
  want, _ = _final_state(tmp_path / "plain")
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert not np.array_equal(got["params/head/kernel"], np.load(tiny_vit_npz)["head/kernel"])


@pytest.mark.slow  # three launches of a two-phase run, about 20 s on 2 cores
def test_run_killed_mid_unfreeze_warmup_resumes_bit_identical(tiny_vit_npz, tmp_path):
  # Block 1 unfreezes at step 2 and ramps over 3 steps; the checkpoint at step 4 is
  # mid-ramp (its count 2 of 3): the resumed run must go on up the same ramp, with
  # microbatches, EMA and on_nan=skip around it.
  overrides = {"optim.accum_steps": 2, "train.ema_decay": 0.9, "train.on_nan": "skip", "train.total_steps": 6,
               "train.checkpoint_every": 2, "train.eval_every": 0,
               "optim.param_groups": [("head/.*", {}), ("Transformer/encoderblock_1/.*", {}), (".*", None)],
               "optim.unfreeze": [(2, "Transformer/encoderblock_1/.*")],
               "optim.unfreeze_warmup_steps": 3}
  _, _, ours = _killed_resumed_and_uninterrupted(tiny_vit_npz, tmp_path, overrides, "after:5", 4)
  block1 = "params/Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
  assert not np.array_equal(ours[block1], np.load(tiny_vit_npz)[block1.removeprefix("params/")])


def test_model_arch_options_reach_the_family_and_bad_ones_are_refused(tiny_vit_npz, tmp_path):
  cfg = tiny_config(tiny_vit_npz, **{"model.arch": {"patch_embed_impl": "flax", "layer_norm_eps": 1e-5}})
  run, _ = train.prepare(cfg, str(tmp_path / "ok"))
  assert (run.model.patch_embed_impl, run.model.layer_norm_eps) == ("flax", 1e-5)
  assert run.report.arch["patch_embed_impl"] == "flax"  # recorded with the model, for export
  cfg = tiny_config(tiny_vit_npz, **{"model.arch": {"stem_conv_impl": "space_to_depth"}})
  with pytest.raises(ConfigError, match=r"unknown ViT arch option \(arch\): 'stem_conv_impl'"):
    train.prepare(cfg, str(tmp_path / "wd"))
  cfg = tiny_config(tiny_vit_npz, **{"model.arch": {"remat": False}, "model.remat": True})
  with pytest.raises(ConfigError, match=r"architecture option given twice \(model.arch.remat\): "
                                        r"model.arch.remat and model.remat; use model.remat"):
    train.prepare(cfg, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_workdir(tiny_vit_npz, tmp_path, monkeypatch):
  cfg = tiny_config(tiny_vit_npz)
  monkeypatch.setenv(train.TEST_FAIL_ENV, "startup:0")  # workdir made, nothing restored or written
  with pytest.raises(OSError, match="injected at startup:0"):
    train.train_and_evaluate(cfg, str(tmp_path / "runs" / "a"))
  assert not (tmp_path / "runs").exists()  # the parent it created too
  (tmp_path / "mine").mkdir()  # a directory the user made stays
  with pytest.raises(OSError, match="injected at startup:0"):
    train.train_and_evaluate(cfg, str(tmp_path / "mine" / "a"))
  assert [p.name for p in tmp_path.iterdir()] == ["mine"] and not any((tmp_path / "mine").iterdir())
  # A run that recorded its config keeps it, with whatever else it wrote.
  monkeypatch.setenv(train.TEST_FAIL_ENV, "step:2")
  with pytest.raises(OSError, match="injected at step:2"):
    train.train_and_evaluate(cfg, str(tmp_path / "runs" / "b"))
  assert (tmp_path / "runs" / "b" / "config.json").is_file()


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_a_failed_evaluation_saves_the_trained_step_first(tiny_vit_npz, tmp_path, monkeypatch, capsys):
  # No checkpoint was due at step 3: before, the error lost steps 1-3 (the whole run with
  # checkpoint_every 0). Now step 3 is saved, and the rerun resumes to the uninterrupted state.
  overrides = {"train.total_steps": 6, "train.checkpoint_every": 0, "train.eval_every": 3}
  ref, wd = tmp_path / "ref", tmp_path / "wd"
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(ref))
  monkeypatch.setenv(train.TEST_FAIL_ENV, "eval:3")
  with pytest.raises(OSError, match="injected at eval:3"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(wd))
  assert checkpoint.committed_steps(wd / "checkpoints") == [3]
  assert "evaluation failed at step 3: step 3 saved first; rerun to resume from it" in capsys.readouterr().err
  monkeypatch.delenv(train.TEST_FAIL_ENV)
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(wd))
  assert state_sha(wd) == state_sha(ref)
  # The rerun evaluates step 3 first, as the uninterrupted run did: the same rows, values too.
  assert _rows(wd) == _rows(ref)


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_a_failed_evaluation_counts_for_early_stopping_once_rerun(tiny_vit_npz, tmp_path, monkeypatch):
  # The step saved before the failed evaluation used to carry early stopping's state without
  # that evaluation, and the rerun never made it: it stopped a step late, in another state.
  overrides = {"train.total_steps": 20, "train.eval_every": 1, "train.early_stopping_patience": 2,
               "optim.lr": 1e-20, "train.checkpoint_every": 0}
  ref, wd = tmp_path / "ref", tmp_path / "wd"
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(ref))
  monkeypatch.setenv(train.TEST_FAIL_ENV, "eval:2")
  with pytest.raises(OSError, match="injected at eval:2"):
    train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(wd))
  monkeypatch.delenv(train.TEST_FAIL_ENV)
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **overrides), str(wd))
  assert [r["step"] for r in _rows(wd) if r["kind"] == "eval"] == [1, 2, 3]  # stops at 3, as ref
  assert _rows(wd) == _rows(ref) and state_sha(wd) == state_sha(ref)


@pytest.mark.parametrize("overrides,message", [
    ({"train.best_metric": "ema_test/top1", "train.early_stopping_patience": 2},
     r"best metric of the EMA weights, but the run keeps none \(train.best_metric\): 'ema_test/top1'; "
     r"set train.ema_decay \(e.g. 0.999\), or rank by test/top1"),
    ({"train.best_metric": "ema_test/top1"}, r"best metric of the EMA weights"),  # keep_best 1 ranks by it
    ({"optim.accum_steps": 0}, r"accum_steps must be a positive integer \(optim.accum_steps\): 0$"),
    # pmap replicates what it is given: FSDP rules ran silently unsharded
    ({"train.parallel": "pmap", "train.shard_params": (".*/kernel",)},
     r"train.shard_params needs train.parallel=jit \(train.shard_params\)")],
    ids=["ema-early-stopping", "ema-keep-best", "accum-0", "pmap-shard_params"])
def test_settings_that_cannot_work_fail_before_the_workdir(tiny_vit_npz, tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.prepare(tiny_config(tiny_vit_npz, **overrides), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow  # three runs: 30 s on 2 slow cores; CI runs it (-m slow)
def test_step_flops_count_the_models_work_once(tiny_vit_npz, tmp_path, capsys):
  # The micro-batches run in a scan (a while loop in the program): its body counts once per trip.
  # Rematerialised blocks compute their forward twice: model FLOPs (MFU) count it once.
  printed = []
  for accum, remat in ((1, False), (4, False), (1, True)):
    cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "train.eval_every": 0, "optim.accum_steps": accum,
                                       "model.remat": remat})
    train.train_and_evaluate(cfg, str(tmp_path / f"a{accum}{remat}"))
    printed += re.findall(r"compiled step, phase 0: .* ([\d.]+) GFLOP per step", capsys.readouterr().out)
  # Equal but for what each micro-batch call does once (the folded attention value bias): 0.3%.
  assert len(printed) == 3 and float(printed[1]) == pytest.approx(float(printed[0]), rel=0.01), printed
  assert printed[2] == printed[0], printed  # it counted 23% more for ViT-B/16


def test_data_workers_exit_when_the_training_process_is_killed(tiny_vit_npz, tmp_path):
  # SIGKILL runs no cleanup: grain's worker processes lived on, holding the run's output open.
  import time
  import uuid
  marker = uuid.uuid4().hex

  def processes_with_marker():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
          found.append(int(pid))
      except OSError:
        pass
    return found

  cfg_file = write_config(tmp_path, tiny_vit_npz, **{"data.num_workers": 2, "train.checkpoint_every": 2})
  with open(tmp_path / "out.txt", "w") as out:  # a file, not a pipe a live worker would hold open
    r = subprocess.run(launch_cmd(cfg_file, str(tmp_path / "wd")), stdout=out, stderr=subprocess.STDOUT,
                       timeout=300, env=subprocess_env(FTJAX_TEST_KILL_AT="step:3", FTJAX_MARKER=marker))
  assert r.returncode == -signal.SIGKILL, (tmp_path / "out.txt").read_text()[-2000:]
  deadline = time.monotonic() + 20
  while processes_with_marker() and time.monotonic() < deadline:
    time.sleep(0.2)
  left = processes_with_marker()
  for pid in left:  # do not leave them to the next test
    os.kill(pid, signal.SIGKILL)
  assert not left, f"{len(left)} processes outlived the killed run"


def test_lengths_in_epochs_count_the_loaders_epochs(tiny_vit_npz, tmp_path):
  # An epoch is n / batch steps: the loader drops no remainder.  Rounding it down to whole
  # steps made warm-ups up to 29% short, and several times too long on a few-shot set.
  def schedule(**kw):
    cfg = tiny_config(tiny_vit_npz, **{"optim.schedule.name": "step", "train.total_steps": 500, **kw})
    run, _ = train.prepare(cfg, str(tmp_path / f"wd{len(list(tmp_path.iterdir()))}"))
    return run.steps_per_epoch, run.plan.rows[0].schedule

  # digits: 1,437 training images; at batch 16 an epoch is 89.8125 steps
  assert schedule(**{"optim.schedule.warmup_epochs": 2.0, "optim.schedule.boundary_epochs": [3, 4.5]}) == (
      1437 / 16, "step(warmup=180, x0.1 at [269, 404])")
  # 20 examples at batch 64: an epoch is 0.3125 steps, and 8 epochs are 2.5 steps, not 8
  assert schedule(**{"data.per_class": 2, "train.batch_size": 64, "optim.schedule.warmup_epochs": 8.0,
                     "optim.schedule.boundary_epochs": [1000]}) == (20 / 64, "step(warmup=2, x0.1 at [312])")
