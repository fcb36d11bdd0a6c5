"""SIGKILL at seeded random moments, restart with the same command: the result is bit-identical.

Moments: inside a step (dispatched, not finished), in each phase of an
asynchronous checkpoint write, inside an evaluation and at start-up.  Each
restart must find the newest committed step, repeat nothing and skip nothing:
the final params and optimizer state hash like an uninterrupted run's,
``metrics.jsonl`` has one row per step, no temporary checkpoint directory is
left, and the ledger of every committed step tiles ``1..step`` exactly once.

The quick mode (5 kills) runs by default; the full 20 kills are ``slow``.
"""

import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (cached_env, checkpoint, flatten, launch, rows, state_sha,  # noqa: E402
                      write_config)

pytestmark = pytest.mark.faults

TOTAL, CKPT_EVERY, EVAL_EVERY = 24, 2, 4
OVERRIDES = {"train.total_steps": TOTAL, "train.checkpoint_every": CKPT_EVERY,
             "train.eval_every": EVAL_EVERY, "train.log_every": 1, "train.async_checkpoint": True,
             "train.keep_latest": 2, "train.keep_best": 1}
PHASES = ("copied", "hashed", "written", "committed", "retained")
KINDS = ("startup", "step", "eval") + tuple(f"ckpt:{p}" for p in PHASES)


def _steps_after(committed: int, every: int) -> list[int]:
  return [s for s in range(committed + 1, TOTAL + 1) if s % every == 0 or s == TOTAL]


def kill_moment(kind: str, committed: int, rng: random.Random) -> str | None:
  """A ``FTJAX_TEST_KILL_AT`` spec of ``kind`` that the run resuming from ``committed`` reaches."""
  if kind == "startup":
    return "startup"
  if kind == "step":
    candidates = list(range(committed + 1, TOTAL + 1))
  elif kind == "eval":  # a finished run still evaluates once after its restore
    candidates = _steps_after(committed, EVAL_EVERY) or [TOTAL]
  else:
    candidates = _steps_after(committed, CKPT_EVERY)
  # Early candidates spread the kills over the run instead of piling them up at its end.
  return f"{kind}:{rng.choice(candidates[:2])}" if candidates else None


def ledger_steps(workdir, step: int) -> list[int]:
  _, extra = checkpoint.read_checkpoint(Path(workdir) / "checkpoints", step)
  assert extra["data_step"] == step
  return [s for first, last in extra["ledger"] for s in range(first, last + 1)]


def newest(workdir) -> int:
  steps = checkpoint.committed_steps(Path(workdir) / "checkpoints")
  return steps[-1] if steps else 0


def leftovers(workdir) -> list[str]:
  ckpts = Path(workdir) / "checkpoints"
  odd = [p.name for p in ckpts.iterdir() if not p.name.isdigit()]  # .writing-*, tmp, rejected/
  return odd + [p.name for p in Path(workdir).glob("*.tmp")]


@pytest.fixture(scope="module")
def setup(tiny_vit_npz, tmp_path_factory, jax_cache):
  """The config file, a shared compilation cache, and the uninterrupted run's outcome."""
  tmp = tmp_path_factory.mktemp("crash")
  cfg = write_config(tmp, tiny_vit_npz, **OVERRIDES)
  env = cached_env(jax_cache)
  ref = tmp / "ref"
  r = launch(cfg, ref, env)
  assert r.returncode == 0, r.stderr[-3000:]
  return cfg, env, tmp, state_sha(ref), rows(ref)


def _crash_and_resume(setup, kinds, seed, name):
  cfg, env, tmp, ref_sha, ref_rows = setup
  rng = random.Random(seed)
  wd = tmp / name
  done = []
  t0 = time.time()
  for kind in kinds:
    spec = kill_moment(kind, newest(wd), rng) or "startup"
    r = launch(cfg, wd, {**env, "FTJAX_TEST_KILL_AT": spec})
    assert r.returncode == -signal.SIGKILL, (spec, done, r.returncode, r.stderr[-3000:])
    done.append(spec)
    c = newest(wd)
    if c:
      assert ledger_steps(wd, c) == list(range(1, c + 1)), (spec, done)
  r = launch(cfg, wd, env)
  assert r.returncode == 0, (done, r.stderr[-3000:])
  print(f"\n{len(done)} kills ({', '.join(done)}) and {len(done) + 1} starts: {time.time() - t0:.1f} s")

  assert state_sha(wd) == ref_sha, done
  got = rows(wd)
  assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, TOTAL + 1))
  assert [r["step"] for r in got if r["kind"] == "eval"] == list(range(EVAL_EVERY, TOTAL + 1, EVAL_EVERY))
  # The same losses as the uninterrupted run, bit for bit, step by step.
  assert [(r["step"], r["loss"]) for r in got if r["kind"] == "train"] == \
      [(r["step"], r["loss"]) for r in ref_rows if r["kind"] == "train"]
  assert leftovers(wd) == []
  for step in checkpoint.committed_steps(wd / "checkpoints"):
    assert ledger_steps(wd, step) == list(range(1, step + 1))
    tree, _ = checkpoint.read_checkpoint(wd / "checkpoints", step)
    for k, v in flatten(tree).items():
      v = np.asarray(v)
      assert not np.issubdtype(v.dtype, np.floating) or np.isfinite(v).all(), (step, k)
  _, extra = checkpoint.read_checkpoint(wd / "checkpoints")
  assert len(extra["ledger"]) >= 2  # the final state was trained by more than one process
  return done


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_quick_kills_resume_bit_identical(setup):
  done = _crash_and_resume(setup, ["step", "ckpt:written", "eval", "ckpt:hashed", "startup"],
                           seed=8, name="quick")
  assert len(done) == 5


@pytest.mark.slow
def test_twenty_seeded_kills_resume_bit_identical(setup):
  rng = random.Random(20)
  kinds = list(KINDS)  # every kind of moment once, then random ones
  rng.shuffle(kinds)
  kinds += [rng.choice(KINDS) for _ in range(20 - len(kinds))]
  done = _crash_and_resume(setup, kinds, seed=20, name="full")
  assert len(done) == 20
  for kind in KINDS:
    assert any(d.startswith(kind) for d in done), kind
