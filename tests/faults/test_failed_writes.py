"""A checkpoint write that fails (a full disk, injected) is an error, never a success, and loses nothing.

The failure is raised inside the background writer; it must surface at the
next save or at the end of the run as one line with the data exit code, and
the previous good step must stay the one a rerun restores.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cached_env, checkpoint, launch, rows, write_config  # noqa: E402

pytestmark = pytest.mark.faults


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_failed_async_writes_surface_as_errors_and_the_previous_step_survives(tiny_vit_npz, tmp_path,
                                                                              jax_cache):
  cfg = write_config(tmp_path, tiny_vit_npz, **{"train.total_steps": 6, "train.checkpoint_every": 2,
                                                "train.eval_every": 0, "train.async_checkpoint": True,
                                                "train.keep_latest": 3})
  env = cached_env(jax_cache)
  wd = tmp_path / "wd"
  ckpts = wd / "checkpoints"

  # Step 4's write fails in the background: the save of step 6 reports it.
  r = launch(cfg, wd, {**env, "FTJAX_TEST_FAIL_AT": "ckpt:hashed:4"})
  assert r.returncode == 3, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"ftjax: error: checkpoint write failed ({ckpts / '4'}): OSError: [Errno 28] No space left on "
      f"device (injected at ckpt:hashed:4); disk full or not writable? step 2 is the newest earlier checkpoint")
  assert checkpoint.committed_steps(ckpts) == [2]
  assert sorted(p.name for p in ckpts.iterdir()) == ["2"]  # no half-written step left behind

  # The last step's write fails after orbax wrote it, before the commit: the end of the run reports it.
  r = launch(cfg, wd, {**env, "FTJAX_TEST_FAIL_AT": "ckpt:written:6"})
  assert r.returncode == 3, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"ftjax: error: checkpoint write failed ({ckpts / '6'}): OSError: [Errno 28]")
  assert "resumed from step 2" in r.stdout
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4"]
  assert "final test" not in r.stdout  # no success reported

  # Space again: the rerun resumes from the newest good step and finishes.
  r = launch(cfg, wd, env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from step 4" in r.stdout
  assert checkpoint.committed_steps(ckpts) == [2, 4, 6]
  assert [row["step"] for row in rows(wd) if row["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  _, extra = checkpoint.read_checkpoint(ckpts)
  assert extra["ledger"] == [[1, 2], [3, 4], [5, 6]]
