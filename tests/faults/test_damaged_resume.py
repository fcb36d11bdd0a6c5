"""The trainer over damaged checkpoints: it resumes from the newest step that verifies, never from scratch.

(tests/test_checkpoint.py damages steps in every way the issue lists; here the
whole CLI meets them: the warning, the fallback, the refusal and the way out.)
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cached_env, checkpoint, launch, rows, write_config  # noqa: E402

pytestmark = pytest.mark.faults


def _flip_a_bit(step_dir: Path) -> Path:
  """Flips one bit in the middle of the step's largest file (array data)."""
  victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x10
  victim.write_bytes(bytes(data))
  return victim


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_damaged_steps_are_skipped_with_a_warning_and_none_verifying_is_refused(tiny_vit_npz, tmp_path,
                                                                                jax_cache):
  # One config for every start (a restart compiles nothing new); the first run dies after step 4.
  cfg = write_config(tmp_path, tiny_vit_npz, **{"train.total_steps": 6, "train.checkpoint_every": 2,
                                                "train.eval_every": 0, "train.keep_latest": 2,
                                                "train.async_checkpoint": False})
  env = cached_env(jax_cache)
  wd = tmp_path / "wd"
  ckpts = wd / "checkpoints"
  r = launch(cfg, wd, {**env, "FTJAX_TEST_KILL_AT": "after:4"})
  assert r.returncode == -9, r.stderr[-3000:]
  assert checkpoint.committed_steps(ckpts) == [2, 4]

  # A flipped bit in the newest step: resume falls back to step 2, says so, and redoes 3 and 4 once.
  _flip_a_bit(ckpts / "4")
  r = launch(cfg, wd, env)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if "ftjax: warning: damaged checkpoint skipped" in l]
  assert len(warnings) == 1 and f"({ckpts / '4'})" in warnings[0] and "sha256 mismatch" in warnings[0]
  assert f"resumed from step 2 in {ckpts}" in r.stdout
  assert (ckpts / "rejected" / "4").is_dir()  # kept for inspection, out of the way
  assert checkpoint.committed_steps(ckpts) == [4, 6]
  assert [row["step"] for row in rows(wd) if row["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  _, extra = checkpoint.read_checkpoint(ckpts)
  assert extra["ledger"] == [[1, 2], [3, 6]]

  # Every step damaged: refused with one line and the data exit code, nothing started afresh.
  for step in (4, 6):
    _flip_a_bit(ckpts / str(step))
  r = launch(cfg, wd, env)
  assert r.returncode == 3, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"ftjax: error: no checkpoint verifies ({ckpts}): step 6: ")
  # the command line's way out is named (it said only "a new workdir")
  assert last.endswith("; restore a good copy, or start afresh: --allow_fresh_start (moves them to "
                       "rejected/) or a new workdir")
  assert checkpoint.committed_steps(ckpts) == [4, 6]  # untouched
  assert [(row["step"], row["kind"]) for row in rows(wd)] == [(s, "train") for s in range(1, 7)] + [(6, "eval")]

  # The explicit way out: the damaged steps are moved aside and the run starts at step 0.
  r = launch(cfg, wd, env, "--allow_fresh_start")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" not in r.stdout
  assert sorted(p.name for p in (ckpts / "rejected").iterdir()) == ["4", "4-2", "6"]
  _, extra = checkpoint.read_checkpoint(ckpts)
  assert extra["ledger"] == [[1, 6]]
