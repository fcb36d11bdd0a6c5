"""SIGTERM is ftjax's to handle: save at the current step, finish the write, exit 75, recompute nothing.

tests/test_train.py sends SIGTERM between steps; here it arrives while an
asynchronous checkpoint write is held open, and during start-up.  The
``train.deterministic`` switch is checked to reach XLA before its backend starts.
"""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (REPO, cached_env, checkpoint, launch, launch_cmd, rows,  # noqa: E402
                      write_config)

pytestmark = pytest.mark.faults


def _wait_for(pred, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not pred():
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  assert pred()


def _train_steps(wd) -> list[int]:
  return [r["step"] for r in rows(wd) if r["kind"] == "train"]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_sigterm_during_held_async_write_saves_both_and_resumes_without_recomputing(
    tiny_vit_npz, tmp_path, jax_cache):
  overrides = {"train.total_steps": 400, "train.checkpoint_every": 2, "train.eval_every": 0,
               "train.log_every": 1, "train.async_checkpoint": True}
  cfg = write_config(tmp_path, tiny_vit_npz, **overrides)
  env = cached_env(jax_cache)
  wd = tmp_path / "wd"
  # The write of step 2 stays open for 4 s (after its manifest is made, before orbax writes).
  proc = subprocess.Popen(launch_cmd(cfg, str(wd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**env, "FTJAX_TEST_HOLD_AT": "ckpt:hashed:2=4"})
  _wait_for(lambda: len(_train_steps(wd)) >= 3, proc)
  assert checkpoint.committed_steps(wd / "checkpoints") == []  # step 2 is still being written
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert time.time() - sent < 30
  assert proc.returncode == 75, err[-3000:]
  saved = checkpoint.committed_steps(wd / "checkpoints")
  assert saved[0] == 2 and len(saved) == 2  # the held write finished, then the current step was saved
  last = saved[-1]
  assert err.strip().splitlines()[-1] == (f"ftjax: error: preempted by SIGTERM (step {last}): "
                                          f"{wd / 'checkpoints'}; rerun the same command to resume")
  assert _train_steps(wd) == list(range(1, last + 1))
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [str(s) for s in saved]
  # The same command, extended by two steps (total_steps may change on resume): nothing is redone.
  r = launch(cfg, wd, env, f"--config.train.total_steps={last + 2}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {last} in" in r.stdout
  assert _train_steps(wd) == list(range(1, last + 3))
  _, extra = checkpoint.read_checkpoint(wd / "checkpoints")
  assert extra["ledger"] == [[1, last], [last + 1, last + 2]]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_sigterm_at_startup_exits_75_without_saving(tiny_vit_npz, tmp_path, jax_cache):
  cfg = write_config(tmp_path, tiny_vit_npz, **{"train.total_steps": 400})
  wd = tmp_path / "wd"
  proc = subprocess.Popen(launch_cmd(cfg, str(wd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=cached_env(jax_cache, FTJAX_TEST_HOLD_AT="startup=3"))
  _wait_for(lambda: (wd / "checkpoints").is_dir(), proc)  # held just after the checkpointer opened
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("ftjax: error: preempted by SIGTERM (step 0): ")
  assert checkpoint.committed_steps(wd / "checkpoints") == [] and _train_steps(wd) == []


DETERMINISTIC_PROBE = textwrap.dedent('''
    import os, sys
    sys.argv = ["launch.py", "--config={cfg}", "--workdir={wd}", "--config.train.deterministic=true"]
    sys.path.insert(0, {repo!r})
    import launch
    from ftjax import train
    from jax._src import xla_bridge

    def probe(config, workdir, **kwargs):
      print("FLAGS", os.environ.get("XLA_FLAGS"), "STARTED", xla_bridge.backends_are_initialized())
    train.train_and_evaluate = probe
    from absl import app
    app.run(launch.main, flags_parser=launch._parse)
''')


def test_deterministic_switch_sets_the_xla_flag_before_the_backend_starts(tiny_vit_npz, tmp_path,
                                                                         jax_cache):
  cfg = write_config(tmp_path, tiny_vit_npz)
  script = tmp_path / "probe.py"
  script.write_text(DETERMINISTIC_PROBE.format(cfg=cfg, wd=tmp_path / "wd", repo=str(REPO)))
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                     env=cached_env(jax_cache, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("FLAGS"))
  assert line == ("FLAGS --xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true "
                  "STARTED False")
