"""Two processes joined by jax.distributed over loopback train like one process."""

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, subprocess_env  # noqa: E402

WORKER = textwrap.dedent('''
    import os, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import jax
    from ftjax import distributed
    if os.environ.get("JAX_NUM_PROCESSES"):
      distributed.initialize()
    from jax.sharding import Mesh
    from conftest import sgd_step_setup
    from ftjax import train
    params, tx, fn, batches = sgd_step_setup({npz!r}, 2)
    n, i = jax.process_count(), jax.process_index()
    runner = train.JitRunner(Mesh(np.asarray(jax.devices()), ("data",)))
    state = runner.put_state(train.initial_state(params, None, tx, 0, ema=False))
    step = runner.compile(fn, train.StepOptions(num_classes=10))
    for b in batches:  # each process feeds its own half of every global batch
      local = {{k: v[i * 16 // n:(i + 1) * 16 // n] for k, v in b.items()}}
      state, metrics = step(state, runner.put_batch(local))
    out = distributed.host_tree(runner.view(state).params)
    from ftjax.tree import flatten
    np.savez(sys.argv[1], devices=jax.device_count(), loss=distributed.host_value(metrics["loss"]),
             **flatten(out))
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_two_processes_agree_with_one(tiny_vit_npz, tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.npz")],
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**__import__("os").environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"p{pid}.npz")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "p0.npz") as p0, \
       np.load(tmp_path / "p1.npz") as p1:
    assert int(one["devices"]) == 1 and int(p0["devices"]) == 2
    moved = False
    for k in one.files:
      if k == "devices":
        continue
      np.testing.assert_allclose(p0[k], one[k], atol=1e-5, err_msg=k)
      np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # both hosts hold the same state
    with np.load(tiny_vit_npz) as init:
      moved = any(not np.allclose(one[f"{k}"], init[k]) for k in init.files)
    assert moved


TRAINER = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from ftjax import train
    train.train_and_evaluate(tiny_config({npz!r}, **json.loads(sys.argv[2])), sys.argv[1])
''')

# A constant learning rate: the schedule does not depend on total_steps, so 4 steps resumed
# to 6 must equal 6 steps in one go.  SGD, not Adam: Adam scales the rounding noise of a zero
# gradient (attention key biases) up to a full step.  Eval and checkpoint every 2 steps, the
# best step kept too.
LOOP = {"train.checkpoint_every": 2, "train.eval_every": 2, "train.log_every": 1,
        "train.keep_latest": 2, "train.keep_best": 1, "train.tensorboard": True, "train.plots": True,
        "optim.schedule.name": "constant", "optim.name": "sgd", "optim.kwargs": {"momentum": 0.9},
        "optim.lr": 0.1}


def _launch(script, workdir, total_steps: int, processes: int, overrides: dict | None = None,
            process_env: dict[int, dict] | None = None, **env_extra) -> list[tuple[int, str, str]]:
  """Runs the full loop in ``processes`` processes on one workdir: ``(rc, stdout, stderr)`` of each.

  ``overrides``: config keys on top of LOOP; ``process_env``: environment of one process only.
  """
  overrides = json.dumps({**LOOP, **(overrides or {}), "train.total_steps": total_steps,
                          "train.distributed": processes > 1})
  env = subprocess_env(JAX_PLATFORMS="cpu", **env_extra)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
  process_env = process_env or {}
  procs = [subprocess.Popen([sys.executable, str(script), str(workdir), overrides],
                            env={**env, **process_env.get(i, {}), "JAX_PROCESS_ID": str(i)}
                            if processes > 1 else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  results = []
  for i, p in enumerate(procs):
    try:
      out, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # a barrier entered by one process only hangs
      for q in procs:
        q.kill()
      errs = [q.communicate()[1][-1500:] for q in procs]
      raise AssertionError(f"process {i} of {processes} hung; stderr tails: {errs}") from None
    results.append((p.returncode, out, err))
  return results


def _train(script, workdir, total_steps: int, processes: int) -> list[str]:
  """:func:`_launch` that must succeed; the stdout of each process."""
  results = _launch(script, workdir, total_steps, processes)
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i}: {err[-3000:]}"
  return [out for _, out, _ in results]


@pytest.mark.slow  # two processes, several launches: 30-50 s each on 2 cores
def test_two_processes_share_one_workdir(tiny_vit_npz, tmp_path):
  from ftjax import checkpoint, metrics
  from ftjax.tree import flatten

  script = tmp_path / "trainer.py"
  script.write_text(TRAINER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  one, two = tmp_path / "one", tmp_path / "two"
  _train(script, one, 6, processes=1)
  _train(script, two, 4, processes=2)
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]  # nothing half-done
  four, _ = checkpoint.read_checkpoint(two, step=4)
  outs = _train(script, two, 6, processes=2)  # resumes from step 4
  assert all("resumed from step 4" in out for out in outs)
  six, extra = checkpoint.read_checkpoint(two, step=6)
  assert extra["data_step"] == 6 and extra["ledger"] == [[1, 4], [5, 6]]  # each update once

  rows = metrics.read_metrics(two)
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4, 6]
  ref_rows = metrics.read_metrics(one)
  np.testing.assert_allclose([r["loss"] for r in rows if r["kind"] == "train"],
                             [r["loss"] for r in ref_rows if r["kind"] == "train"], rtol=1e-5)
  # Retention ran once per save, on one process: the latest two and the best by test/top1.
  top1 = {r["step"]: r["test/top1"] for r in rows if r["kind"] == "eval"}
  want = checkpoint.steps_to_keep(top1, keep_latest=2, keep_best=1)
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(str(s) for s in want)
  assert len(list(two.glob("events.out.tfevents.*"))) == 2  # one per invocation, not per process
  assert not [p for p in two.iterdir() if p.name.endswith(".tmp")]

  # The same global batches (8 examples from each process = the one process's 16): the same
  # parameters and optimizer state, before and after the resume.
  for step, ours in ((4, flatten(four)), (6, flatten(six))):
    ref = flatten(checkpoint.read_checkpoint(one, step=step)[0])
    assert sorted(ref) == sorted(ours)
    for k in ref:
      if k.startswith(("params/", "opt_state/")):
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, err_msg=f"step {step}: {k}")
  moved = max(np.abs(flatten(six)[k] - flatten(four)[k]).max() for k in flatten(six) if k.startswith("params/"))
  assert moved > 1e-3  # steps 5 and 6 change the parameters far beyond the tolerance


def _last_line(err: str) -> str:
  return err.strip().splitlines()[-1]


@pytest.mark.slow  # two processes, several launches: 30-50 s each on 2 cores
def test_a_process_failing_to_restore_or_write_stops_every_process(tiny_vit_npz, tmp_path):
  from ftjax import checkpoint
  script = tmp_path / "trainer.py"
  script.write_text(TRAINER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "1").mkdir(parents=True)
  (wd / "checkpoints" / "1" / "junk").write_text("not a checkpoint")
  (rc0, _, err0), (rc1, _, err1) = _launch(script, wd, 2, processes=2)
  assert (rc0, rc1) == (1, 1)
  assert "no checkpoint verifies" in _last_line(err0)
  assert "process 0 could not restore" in _last_line(err1)

  shutil.rmtree(wd / "checkpoints")  # a full disk at process 0's commit of step 2
  (rc0, _, err0), (rc1, _, err1) = _launch(script, wd, 2, processes=2,
                                           FTJAX_TEST_FAIL_AT="ckpt:written:2")
  assert (rc0, rc1) == (1, 1)
  assert "checkpoint write failed" in _last_line(err0) and "No space left" in _last_line(err0)
  assert "checkpoint write failed on process 0" in _last_line(err1)
  assert list((wd / "checkpoints").iterdir()) == []  # the staging dir removed, nothing committed

  # Process 1 alone fails to read the step process 0 picked: both stop, neither trains on.
  _train(script, wd, 2, processes=2)
  (rc0, _, err0), (rc1, _, err1) = _launch(script, wd, 4, processes=2,
                                           process_env={1: {"FTJAX_TEST_FAIL_AT": "ckpt:restore:2"}})
  assert (rc0, rc1) == (1, 1)
  assert "another process could not restore" in _last_line(err0) and "process 1" in _last_line(err0)
  assert "injected at ckpt:restore:2" in _last_line(err1)
  assert checkpoint.committed_steps(wd / "checkpoints") == [2]


@pytest.mark.slow  # two processes, several launches: 30-50 s each on 2 cores
def test_sigterm_on_one_process_stops_both_at_the_same_step(tiny_vit_npz, tmp_path):
  # Process 1 alone is told to stop after step 3; the processes agree at the next log step
  # (4), both save it and exit with the preempted code, and a rerun finishes the run.
  from ftjax import checkpoint, metrics
  script = tmp_path / "trainer.py"
  script.write_text(TRAINER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  wd = tmp_path / "wd"
  quiet = {"train.log_every": 2, "train.checkpoint_every": 0, "train.eval_every": 0,
           "train.tensorboard": False, "train.plots": False}
  (rc0, _, err0), (rc1, _, err1) = _launch(script, wd, 8, processes=2, overrides=quiet,
                                           process_env={1: {"FTJAX_TEST_TERM_AT": "after:3"}})
  # (the script calls train_and_evaluate: Preempted is an exception here; launch.py exits 75)
  assert (rc0, rc1) == (1, 1), (err0[-1500:], err1[-1500:])
  for err in (err0, err1):
    assert _last_line(err).startswith("ftjax.errors.Preempted:") and "step 4" in _last_line(err), err[-1500:]
  assert checkpoint.committed_steps(wd / "checkpoints") == [4]
  assert [r["step"] for r in metrics.read_metrics(wd) if r["kind"] == "train"] == [2, 4]
  outs = _train_with(script, wd, 8, quiet)
  assert all("resumed from step 4" in out for out in outs)
  _, extra = checkpoint.read_checkpoint(wd, step=8)
  assert extra["ledger"] == [[1, 4], [5, 8]]
  assert [r["step"] for r in metrics.read_metrics(wd) if r["kind"] == "train"] == [2, 4, 6, 8]


def _train_with(script, workdir, total_steps: int, overrides: dict) -> list[str]:
  results = _launch(script, workdir, total_steps, 2, overrides=overrides)
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i}: {err[-3000:]}"
  return [out for _, out, _ in results]


@pytest.mark.slow  # one- and two-process launches: 30-50 s each on 2 cores
def test_two_processes_under_pmap_train_and_evaluate_as_one_under_jit(tiny_vit_npz, tmp_path):
  # pmap across processes: each process's compiled step takes its local slices (the
  # ahead-of-time program takes global ones), and evaluation, a jit over every process's
  # devices, gets the parameters replicated there; both failed before.
  from ftjax import checkpoint, metrics
  from ftjax.tree import flatten
  script = tmp_path / "trainer.py"
  script.write_text(TRAINER.format(tests=str(REPO / "tests"), npz=tiny_vit_npz))
  one, two = tmp_path / "one", tmp_path / "two"
  outs = _train(script, one, 4, processes=1) + _train_with(script, two, 4, {**LOOP, "train.parallel": "pmap"})
  # The same global batch is the same work: FLOPs (and MFU) count every process's devices.
  flops = [re.findall(r"compiled step, phase 0: .* ([\d.]+) GFLOP per step", out) for out in outs]
  assert len(flops) == 3 and all(len(f) == 1 for f in flops), outs
  assert float(flops[1][0]) == float(flops[2][0]) == pytest.approx(float(flops[0][0]), rel=0.01), flops
  ref, ours = (flatten(checkpoint.read_checkpoint(wd, step=4)[0]) for wd in (one, two))
  for k in ref:
    if k.startswith("params/"):
      np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, err_msg=k)
  evals = [[r for r in metrics.read_metrics(wd) if r["kind"] == "eval"] for wd in (one, two)]
  assert [r["step"] for r in evals[1]] == [2, 4]
  for a, b in zip(*evals):
    assert a["test/top1"] == b["test/top1"]
    np.testing.assert_allclose(b["test/loss"], a["test/loss"], rtol=1e-5)
