"""Verified checkpoints: bit-exact round trips, damage detection, retention, failed writes."""

import errno
import hashlib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import flax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from ftjax import checkpoint as ck
from ftjax.checkpoint import Checkpointer, read_checkpoint
from ftjax.errors import CheckpointError, ConfigError, NumericsError
from ftjax.tree import flatten


def train_state(seed: int):
  """A small but complete training state: params (f32 + bf16), adamw state, step, keys."""
  rng = np.random.default_rng(seed)
  params = {
      "body": {"kernel": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.bfloat16),
               "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu, nu, count
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed),
          "rng": jax.random.key(seed), "legacy_rng": jax.random.PRNGKey(seed)}


def as_bytes(x) -> tuple:
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  a = np.asarray(x)
  return a.dtype.name, a.shape, a.tobytes()


def assert_bit_identical(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert type(x) is type(y)
    assert as_bytes(x) == as_bytes(y)


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "ftjax.checkpoint" and r.levelno == logging.WARNING]


def listing(directory: Path) -> list[str]:
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---------------------------------------------------------------------------
# Round trips.


def test_async_roundtrip_is_bit_identical_with_optax_state_and_keys(tmp_path):
  state = train_state(7)
  with Checkpointer(tmp_path / "ck") as c:
    c.save(7, state, metrics={"acc": 0.25}, extra={"data_position": 7 * 32, "classes": ["a", "b"]})
    c.wait()
    step, restored, extra = c.restore_latest(train_state(99))
  assert step == 7
  assert extra == {"data_position": 224, "classes": ["a", "b"]}
  assert_bit_identical(restored, state)
  assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
  assert restored["rng"].dtype == state["rng"].dtype  # a typed key again, same impl
  assert restored["params"]["head"]["kernel"].dtype == jnp.bfloat16
  # The template-free reader returns the same bytes as plain nested dicts.
  tree, extra2 = read_checkpoint(tmp_path / "ck")
  assert extra2 == extra
  want = {p: as_bytes(x) for p, x in flatten(state).items()}
  assert {p: as_bytes(x) for p, x in flatten(tree).items()} == want


def test_save_copies_the_state_before_returning(tmp_path):
  w = np.arange(1000, dtype=np.float32)
  with Checkpointer(tmp_path, async_save=True) as c:
    c.save(1, {"w": w})
    w[:] = -1.0  # the trainer may overwrite (or donate) its buffers right away
    c.wait()
    _, restored, _ = c.restore_latest({"w": np.zeros(1000, np.float32)})
  np.testing.assert_array_equal(restored["w"], np.arange(1000, dtype=np.float32))


def test_template_leaf_types_are_kept(tmp_path):
  state = {"a": np.float32(1.5) * np.ones(3, np.float32), "n": 3, "x": jnp.arange(4.0)}
  with Checkpointer(tmp_path, async_save=False) as c:
    c.save(1, state)
    template = {"a": np.zeros(3, np.float32), "n": 0,
                "x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    _, out, _ = c.restore_latest(template)
  assert type(out["a"]) is np.ndarray and out["a"].tolist() == [1.5, 1.5, 1.5]
  assert type(out["n"]) is int and out["n"] == 3
  assert isinstance(out["x"], jax.Array) and out["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_phases_run_in_order_off_the_callers_thread(tmp_path):
  seen = []
  hook = lambda phase, step: seen.append((phase, step, threading.current_thread().name))
  with Checkpointer(tmp_path, on_phase=hook) as c:
    c.save(3, {"w": np.ones(2, np.float32)})
  assert [(p, s) for p, s, _ in seen] == [("copied", 3), ("hashed", 3), ("written", 3),
                                          ("committed", 3), ("retained", 3)]
  assert seen[0][2] == threading.current_thread().name
  assert all(t.startswith("ftjax-ckpt") for _, _, t in seen[1:])


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  ema_params: dict | None
  rng: jax.Array


def test_a_flax_struct_state_with_empty_and_none_fields_round_trips(tmp_path):
  params = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
  state = TrainState(step=jnp.int32(12), params=params, batch_stats={}, ema_params=None,
                     rng=jax.random.PRNGKey(3))
  with Checkpointer(tmp_path) as c:
    c.save(12, state, extra={"data_step": 12})
    c.wait()
    step, restored, extra = c.restore_latest(state.replace(step=jnp.int32(0)))
  assert (step, extra) == (12, {"data_step": 12})
  assert_bit_identical(restored, state)
  tree, _ = read_checkpoint(tmp_path)
  assert sorted(tree) == ["params", "rng", "step"]  # empty and None fields hold no leaves


def test_template_may_depend_on_the_restored_step(tmp_path):
  with Checkpointer(tmp_path, keep_latest=3, async_save=False) as c:
    c.save(1, {"opt": (np.ones(2, np.float32),)}, extra={"best": float("-inf")})
    c.save(2, {"opt": (np.ones(2, np.float32), np.full(3, 2, np.int32))})
  truncate(largest_data_file(tmp_path / "2"), 1)
  asked = []

  def template(step):  # the optimizer of step 1 has one slot, that of step 2 two
    asked.append(step)
    return {"opt": (np.zeros(2, np.float32),) + ((np.zeros(3, np.int32),) if step == 2 else ())}

  step, state, extra = Checkpointer(tmp_path).restore_latest(template)
  assert (step, asked, extra) == (1, [1], {"best": float("-inf")})
  assert state["opt"][0].tolist() == [1.0, 1.0]


def test_saving_a_committed_step_again_keeps_it(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as c:
    c.save(4, {"w": np.ones(2, np.float32)})
    c.save(4, {"w": np.zeros(2, np.float32)})
    assert c.all_steps() == [4]
    assert c.restore(4, {"w": np.zeros(2, np.float32)})[0]["w"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------
# Non-finite values and bad arguments.


def test_non_finite_state_is_never_committed(tmp_path):
  state = train_state(1)
  with Checkpointer(tmp_path) as c:
    c.save(1, state)
    c.wait()
    before = listing(tmp_path)
    bad = jax.tree.map(lambda x: x, state)
    bad["params"]["head"]["bias"] = bad["params"]["head"]["bias"].at[2].set(jnp.nan)
    with pytest.raises(NumericsError) as err:
      c.save(2, bad)
    c.wait()
    assert listing(tmp_path) == before
  assert str(err.value) == ("ftjax: error: non-finite value in the state to checkpoint (step 2): "
                            "params/head/bias; refusing to commit it; earlier checkpoints are kept")
  assert err.value.exit_code == 4


def test_bad_arguments_are_config_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"keep_latest must be an integer >= 1"):
    Checkpointer(tmp_path, keep_latest=0)
  with pytest.raises(ConfigError, match=r"best_mode must be 'max' or 'min' \(checkpoint.best_mode\)"):
    Checkpointer(tmp_path, best_mode="avg")
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError) as err:
    Checkpointer(tmp_path / "file" / "ck")
  assert str(err.value) == (f"ftjax: error: cannot use checkpoint directory ({tmp_path}/file/ck): "
                            "Not a directory; check the path and its permissions")


# ---------------------------------------------------------------------------
# Retention.


def test_fifty_saves_with_a_worsening_metric_keep_the_newest_and_the_best(tmp_path):
  with Checkpointer(tmp_path, keep_latest=2, keep_best=1, best_metric="acc",
                    async_save=False) as c:
    for s in range(1, 51):
      acc = float("nan") if s % 7 == 0 else 1.0 - s / 100  # worse every step, NaN now and then
      c.save(s, {"w": np.full(4, s, np.float32)}, metrics={"acc": acc})
      assert c.latest_step() == s
      assert c.all_steps() == sorted({1, max(s - 1, 1), s})
      assert c.best_step() == 1
    _, out, _ = c.restore_latest({"w": np.zeros(4, np.float32)})
    assert out["w"].tolist() == [50.0] * 4


def test_nan_metric_ranks_worst_in_both_modes(tmp_path):
  for mode, values, best in [("max", [float("nan"), 0.1, 0.3, float("nan"), 0.2], 3),
                             ("min", [float("nan"), 0.4, 0.1, float("inf"), 0.3], 3)]:
    d = tmp_path / mode
    with Checkpointer(d, keep_latest=1, keep_best=1, best_metric="m", best_mode=mode,
                      async_save=False) as c:
      for s, v in enumerate(values, 1):
        c.save(s, {"w": np.zeros(1, np.float32)}, metrics={"m": v})
      assert c.best_step() == best
      assert c.all_steps() == [best, len(values)]
    # A new Checkpointer reads the metrics back from the manifests.
    with Checkpointer(d, keep_latest=1, keep_best=1, best_metric="m", best_mode=mode) as c:
      assert c.best_step() == best
    assert ck.best_step(d, "m", mode) == best  # read-only, for predict/export --step best


def test_the_best_step_of_a_run_follows_its_config(tmp_path):
  from ftjax import export
  wd = tmp_path / "run"
  with Checkpointer(wd / "checkpoints", keep_latest=3, async_save=False) as c:
    for s, loss in [(2, 0.5), (4, 0.2), (6, 0.3)]:
      c.save(s, {"w": np.zeros(1, np.float32)}, metrics={"val/loss": loss, "val/top1": 1 - s / 10})
  from ftjax import config as config_lib

  def store(best_metric, best_mode="max", eval_splits=("test",)):
    cfg = config_lib.to_dict(config_lib.default_config())
    cfg["train"].update(best_metric=best_metric, best_mode=best_mode)
    cfg["data"]["eval_splits"] = list(eval_splits)
    (wd / "config.json").write_text(json.dumps(cfg))

  store("loss", "min", ["val"])
  assert [export.run_step(wd, s) for s in ("best", "latest", None, "2", 4)] == [4, None, None, 2, 4]
  store("test/top1")
  with pytest.raises(CheckpointError, match=r"no checkpoint records the metric .*'test/top1'; steps "
                                            r"present: \[2, 4, 6\]"):
    export.run_step(wd, "best")
  with pytest.raises(ConfigError, match=r"unknown checkpoint step \(--step\): 'newest'"):
    export.run_step(wd, "newest")
  (wd / "config.json").unlink()
  with pytest.raises(CheckpointError, match="the best step needs the run's config.json"):
    export.run_step(wd, "best")


# ---------------------------------------------------------------------------
# Damage: every corruption is detected and restore falls back with one warning.


def small_state(step: int):
  rng = np.random.default_rng(step)
  return {"params": {"w": rng.standard_normal(8192).astype(np.float32),
                     "b": rng.standard_normal(16).astype(np.float32)},
          "step": np.int32(step)}


@pytest.fixture
def three_steps(tmp_path):
  d = tmp_path / "ck"
  with Checkpointer(d, keep_latest=5, async_save=False, fingerprint={"arch": "tiny"}) as c:
    for s in (1, 2, 3):
      c.save(s, small_state(s), extra={"data_position": 32 * s})
  return d


def data_files(step_dir: Path) -> list[Path]:
  """The array data files of a step (ocdbt stores them under `d/` folders)."""
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def largest_data_file(step_dir: Path) -> Path:
  return max(data_files(step_dir), key=lambda p: p.stat().st_size)


def truncate(p: Path, size: int) -> None:
  with open(p, "r+b") as f:
    f.truncate(size)


def edit_manifest(step_dir: Path, edit) -> None:
  f = step_dir / "manifest" / "metadata"
  m = json.loads(f.read_text())
  edit(m)
  f.write_text(json.dumps(m))


def redo_file_list(p: Path) -> None:
  """Rewrites files.json to match the files: only the inner checks can catch what follows."""
  (p / ck.FILES).write_text(json.dumps(ck.list_files(p, int(p.name))))


def reseal_manifest(p: Path, edit) -> None:
  """Edits the manifest body and seals it again (its sha256 over the canonical JSON)."""
  def apply(m):
    edit(m["body"])
    canonical = json.dumps(m["body"], sort_keys=True, separators=(",", ":")).encode()
    m["sha256"] = hashlib.sha256(canonical).hexdigest()
  edit_manifest(p, apply)
  redo_file_list(p)


def copy_from_step_2(p: Path, item: str) -> None:
  shutil.rmtree(p / item)
  shutil.copytree(p.parent / "2" / item, p / item)


def link_to_a_moved_copy(p: Path) -> None:
  """The largest data file moved out of the checkpoint, a symbolic link to it in its place."""
  f = largest_data_file(p)
  outside = p.parent.parent / "moved_out"
  shutil.move(f, outside)
  f.symlink_to(outside)


DAMAGES = {  # name: (damage to step 3, the reason the warning must give)
    "truncated data file": (
        lambda p: truncate(largest_data_file(p), largest_data_file(p).stat().st_size // 2),
        r"file size changed: state/.*/d/\w+ is \d+ bytes, listed \d+"),
    "empty data file": (lambda p: truncate(largest_data_file(p), 0),
                        r"file size changed: state/.*/d/\w+ is 0 bytes"),
    "deleted data file": (lambda p: largest_data_file(p).unlink(),
                          r"file missing: state/.*/d/\w+"),
    "invalid metadata": (lambda p: (p / "state" / "_METADATA").write_text("{not json"),
                         r"file size changed: state/_METADATA is 9 bytes"),
    "deleted metadata": (lambda p: (p / "state" / "_METADATA").unlink(),
                         r"file missing: state/_METADATA"),
    "deleted step metadata": (lambda p: (p / "_CHECKPOINT_METADATA").unlink(),
                              r"file missing: _CHECKPOINT_METADATA"),
    "deleted manifest": (lambda p: shutil.rmtree(p / "manifest"), r"file missing: manifest/"),
    "edited manifest": (
        lambda p: edit_manifest(p, lambda m: m["body"]["extra"].update(data_position=0)),
        r"file (size changed|sha256 mismatch): manifest/metadata"),
    "deleted file list": (lambda p: (p / ck.FILES).unlink(), r"files.json missing"),
    "invalid file list": (lambda p: (p / ck.FILES).write_text("[1,"),
                          r"files.json unreadable: JSONDecodeError"),
    "unlisted file": (lambda p: (p / "state" / "junk").write_text("x"),
                      r"file not in files.json: state/junk"),
    "arrays of step 2": (lambda p: copy_from_step_2(p, "state"),
                         r"file (missing|not in files.json|size changed|sha256 mismatch): state/"),
    # With the file list rewritten to match, the manifest and leaf checks still catch it.
    "edited manifest, file list redone": (
        lambda p: (edit_manifest(p, lambda m: m["body"]["extra"].update(data_position=0)),
                   redo_file_list(p)),
        r"manifest sha256 mismatch"),
    "manifest of another format, resealed": (
        lambda p: reseal_manifest(p, lambda b: b.update(format="ftjax-checkpoint/0")),
        r"manifest format 'ftjax-checkpoint/0', expected 'ftjax-checkpoint/1'"),
    # The same bytes, but a step is plain files: a link could point anywhere.
    "data file linked from outside": (link_to_a_moved_copy,
                                      r"symbolic link in checkpoint: state/.*/d/\w+"),
    "manifest of step 2, file list redone": (
        lambda p: (copy_from_step_2(p, "manifest"), redo_file_list(p)),
        r"manifest says step 2"),
    "arrays of step 2, file list redone": (
        lambda p: (copy_from_step_2(p, "state"), redo_file_list(p)),
        r"sha256 mismatch at params/b"),
    # Sizes are checked before anything is allocated.
    "manifest claims a huge array, resealed": (
        lambda p: reseal_manifest(p, lambda b: b["leaves"]["params/w"].update(shape=[1 << 40])),
        r"arrays declare 4398046511172 bytes, more than this machine's memory \(\d+ bytes\)"),
    "manifest shape differs from the arrays, resealed": (
        lambda p: reseal_manifest(p, lambda b: b["leaves"]["params/b"].update(shape=[8])),
        r"params/b is stored as float32\[16\], manifest says float32\[8\]"),
}


@pytest.mark.faults
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_step_falls_back_with_one_warning(three_steps, damage, caplog):
  apply, reason = DAMAGES[damage]
  apply(three_steps / "3")
  with Checkpointer(three_steps, fingerprint={"arch": "tiny"}) as c:
    step, state, extra = c.restore_latest(small_state(0))
    assert (step, extra) == (2, {"data_position": 64})
    assert_bit_identical(state, small_state(2))
    assert c.all_steps() == [1, 2]
    # The damaged step is kept for inspection and the run may commit step 3 again.
    assert (three_steps / "rejected" / "3").is_dir()
    c.save(3, small_state(30))
    c.wait()
    assert c.restore_latest(small_state(0))[0] == 3
  [warning] = warnings_of(caplog)
  assert re.fullmatch(rf"ftjax: warning: damaged checkpoint skipped \({three_steps}/3\): "
                      rf"{reason}.*; moved to {three_steps}/rejected/3", warning), warning


@pytest.mark.faults
def test_twenty_random_bit_flips_are_all_detected(three_steps, caplog):
  rnd = random.Random(20)
  files = data_files(three_steps / "3")
  sizes = [p.stat().st_size for p in files]
  for trial in range(20):
    target = rnd.choices(files, weights=sizes)[0]
    offset, bit = rnd.randrange(target.stat().st_size), rnd.randrange(8)
    original = target.read_bytes()
    flipped = bytearray(original)
    flipped[offset] ^= 1 << bit
    target.write_bytes(bytes(flipped))
    caplog.clear()
    with Checkpointer(three_steps) as c:
      step, state, _ = c.restore_latest(small_state(0))
    assert step == 2, f"flip {trial} at {target.name}:{offset}.{bit} not detected"
    assert_bit_identical(state, small_state(2))
    assert len(warnings_of(caplog)) == 1
    os.rename(three_steps / "rejected" / "3", three_steps / "3")  # undo for the next trial
    target.write_bytes(original)


@pytest.mark.faults
def test_half_deleted_older_step_is_skipped_too(three_steps, caplog):
  truncate(largest_data_file(three_steps / "3"), 10)
  shutil.rmtree(three_steps / "2" / "state" / "ocdbt.process_0")  # an interrupted rm -r
  step, state, extra = Checkpointer(three_steps).restore_latest(small_state(0))
  assert (step, extra) == (1, {"data_position": 32})
  assert_bit_identical(state, small_state(1))
  assert [w.split(")")[0] for w in warnings_of(caplog)] == [
      f"ftjax: warning: damaged checkpoint skipped ({three_steps}/3",
      f"ftjax: warning: damaged checkpoint skipped ({three_steps}/2"]


@pytest.mark.faults
def test_unfinished_writes_of_a_newer_step_are_removed(three_steps, caplog):
  stale = three_steps / "4.orbax-checkpoint-tmp-1764221000"
  shutil.copytree(three_steps / "3", stale)
  largest_data_file(stale).unlink()
  (three_steps / ".deleting-1").mkdir()  # a retention delete cut short
  c = Checkpointer(three_steps)
  assert not stale.exists() and not (three_steps / ".deleting-1").exists()
  assert warnings_of(caplog) == [f"ftjax: warning: unfinished checkpoint write removed ({stale}): "
                                 "it was never committed"]
  assert c.restore_latest(small_state(0))[0] == 3


@pytest.mark.faults
def test_no_verified_step_is_an_error_unless_fresh_start_is_allowed(three_steps, caplog):
  for s in (1, 2, 3):
    (three_steps / str(s) / "state" / "_METADATA").unlink()
  c = Checkpointer(three_steps)
  with pytest.raises(CheckpointError) as err:
    c.restore_latest(small_state(0))
  assert str(err.value).startswith(f"ftjax: error: no checkpoint verifies ({three_steps}): "
                                   "step 3: file missing: state/_METADATA; step 2: ")
  assert str(err.value).endswith("; restore a good copy, or start afresh: --allow_fresh_start (moves them "
                                 "to rejected/) or a new workdir")
  assert err.value.exit_code == 3
  assert c.all_steps() == [1, 2, 3]  # nothing moved without permission
  assert warnings_of(caplog) == [f"ftjax: warning: damaged checkpoint skipped ({three_steps}/{s}): "
                                 "file missing: state/_METADATA" for s in (3, 2, 1)]
  assert c.restore_latest(small_state(0), allow_fresh=True) is None
  assert c.all_steps() == []
  assert sorted(p.name for p in (three_steps / "rejected").iterdir()) == ["1", "2", "3"]


def test_an_empty_directory_restores_nothing(tmp_path):
  assert Checkpointer(tmp_path / "new").restore_latest(small_state(0)) is None


# ---------------------------------------------------------------------------
# Mismatches that are the user's doing: no fallback, a clear error.


def test_a_different_fingerprint_is_a_config_error(three_steps):
  c = Checkpointer(three_steps, fingerprint={"arch": "base"})
  with pytest.raises(ConfigError) as err:
    c.restore_latest(small_state(0))
  assert str(err.value) == ("ftjax: error: config differs from the checkpointed run (arch): "
                            "'tiny' in step 3, now 'base'; resume with the run's own config, "
                            "or use a new workdir")
  assert c.all_steps() == [1, 2, 3]
  # A key the checkpoint did not record (it joined the fingerprint later) is not compared.
  newer = Checkpointer(three_steps, fingerprint={"arch": "tiny", "data.split_seed": 3})
  assert newer.restore_latest(small_state(0))[0] == 3
  with pytest.raises(ConfigError, match=r"config differs .*'tiny' in step 2, now 'base'"):
    c.restore(2, small_state(0))  # a step asked for by number is checked too


def test_a_template_of_another_model_is_refused(three_steps):
  c = Checkpointer(three_steps)
  other = small_state(0)
  other["params"]["w"] = np.zeros(10, np.float32)
  with pytest.raises(CheckpointError) as err:
    c.restore_latest(other)
  assert str(err.value) == ("ftjax: error: checkpoint does not fit the state (params/w): "
                            "stored float32[8192], expected float32[10]; "
                            "was it written by another model or config?")
  other = small_state(0)  # the right shape, another dtype: no silent cast
  other["params"]["b"] = jnp.zeros(16, jnp.bfloat16)
  with pytest.raises(CheckpointError, match=r"does not fit the state \(params/b\): "
                                            r"stored float32\[16\], expected bfloat16\[16\]"):
    c.restore_latest(other)
  other = small_state(0)
  other["params"]["extra"] = np.zeros(1, np.float32)
  del other["step"]
  with pytest.raises(CheckpointError) as err:
    c.restore(2, other)
  assert str(err.value) == (f"ftjax: error: checkpoint keys differ from the state ({three_steps}/2): "
                            "missing params/extra; unexpected step; "
                            "was it written by another model or config?")


# ---------------------------------------------------------------------------
# Reading without a template.


def test_read_checkpoint_takes_a_workdir_or_a_step(tmp_path):
  with Checkpointer(tmp_path / ck.CHECKPOINT_SUBDIR, keep_latest=3, async_save=False) as c:
    for s in (1, 2):
      c.save(s, small_state(s), extra={"family": "vit"})
  before = listing(tmp_path)
  tree, extra = read_checkpoint(tmp_path)
  assert extra == {"family": "vit"} and tree["step"] == 2
  assert read_checkpoint(tmp_path / "checkpoints", step=1)[0]["step"] == 1
  assert listing(tmp_path) == before  # reading writes nothing
  with pytest.raises(CheckpointError, match=r"checkpoint step not found .*: 5; steps present: "
                                            r"\[1, 2\]"):
    read_checkpoint(tmp_path, step=5)
  with pytest.raises(CheckpointError, match=r"checkpoint directory not found"):
    read_checkpoint(tmp_path / "nowhere")


def test_read_checkpoint_refuses_an_orbax_checkpoint_without_manifest(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, item_names=("state",))
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)})))
  mngr.close()
  with pytest.raises(CheckpointError) as err:
    read_checkpoint(tmp_path)
  assert str(err.value) == (f"ftjax: error: no checkpoint verifies ({tmp_path}): "
                            "step 1: files.json missing; the files are damaged or not an ftjax "
                            "checkpoint")


# ---------------------------------------------------------------------------
# Failed writes surface as errors; the previous step stays restorable.


class file_size_limit:
  """A real 'disk full': RLIMIT_FSIZE makes writes past `limit` bytes fail with EFBIG."""

  def __init__(self, limit: int):
    self.limit = limit

  def __enter__(self):
    self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

  def __exit__(self, *exc):
    resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
    signal.signal(signal.SIGXFSZ, self.handler)


def big_state(step: int):
  rng = np.random.default_rng(step)  # random bytes: orbax compresses, so no constants
  return {"w": rng.standard_normal(1 << 20).astype(np.float32), "step": np.int32(step)}


@pytest.mark.faults
def test_a_full_disk_surfaces_at_wait_and_keeps_the_previous_step(tmp_path):
  c = Checkpointer(tmp_path)
  c.save(1, big_state(1))
  c.wait()
  with file_size_limit(1 << 20):
    c.save(2, big_state(2))  # returns: the write runs in the background
    with pytest.raises(CheckpointError) as err:
      c.wait()
  line = str(err.value)
  assert line.startswith(f"ftjax: error: checkpoint write failed ({tmp_path}/2): ")
  assert "File too large" in line and "\n" not in line
  assert line.endswith("; disk full or not writable? step 1 is the newest earlier checkpoint")
  assert os.listdir(tmp_path) == ["1"]  # no temporary directory left behind
  step, state, _ = c.restore_latest(big_state(0))
  assert step == 1
  assert_bit_identical(state, big_state(1))
  c.close()


@pytest.mark.faults
def test_a_failed_write_surfaces_at_the_next_save(tmp_path):
  def fail_step_2(phase, step):
    if phase == "hashed" and step == 2:
      raise OSError(errno.ENOSPC, "No space left on device")

  c = Checkpointer(tmp_path, on_phase=fail_step_2)
  c.save(1, small_state(1))
  c.save(2, small_state(2))
  with pytest.raises(CheckpointError, match=r"checkpoint write failed .*/2\): OSError: \[Errno 28\] "
                                            r"No space left on device; disk full"):
    c.save(3, small_state(3))
  assert c.all_steps() == [1]
  c.save(3, small_state(3))  # the error was reported once; saving goes on
  c.close()
  assert Checkpointer(tmp_path).all_steps() == [1, 3]


@pytest.mark.faults
def test_close_reports_a_failed_write(tmp_path):
  c = Checkpointer(tmp_path, on_phase=lambda phase, step: 1 / 0 if phase == "hashed" else None)
  c.save(1, small_state(1))
  with pytest.raises(CheckpointError, match=r"ZeroDivisionError"):
    c.close()
  assert c.all_steps() == []


# ---------------------------------------------------------------------------
# SIGKILL in each phase of an asynchronous write.

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from ftjax import checkpoint as ck

    phase = sys.argv[2]
    state = lambda s: {"w": np.random.default_rng(s).standard_normal(4096).astype(np.float32)}
    c = ck.Checkpointer(sys.argv[1], keep_latest=1, async_save=False)
    c.save(1, state(1))
    c.close()
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if phase == "writing":  # inside orbax: files written, its temporary directory not renamed
      atomicity.AtomicRenameTemporaryPath.finalize = die
    if phase == "deleting":  # an old step renamed away, its files not yet removed
      ck.shutil.rmtree = die
    c = ck.Checkpointer(sys.argv[1], keep_latest=1,
                        on_phase=lambda p, s: die() if p == phase and s == 2 else None)
    c.save(2, state(2))
    c.wait()
    """)


@pytest.mark.faults
@pytest.mark.parametrize("phase,survivor", [("hashed", 1), ("writing", 1), ("written", 1),
                                            ("committed", 2), ("deleting", 2)])
def test_sigkill_during_an_async_write_loses_nothing_committed(tmp_path, phase, survivor):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), phase], env=env,
                        capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  c = Checkpointer(tmp_path, keep_latest=1)
  assert [p.name for p in tmp_path.iterdir() if not p.name.isdigit()] == []
  step, state, _ = c.restore_latest({"w": np.zeros(4096, np.float32)})
  assert step == survivor
  want = np.random.default_rng(survivor).standard_normal(4096).astype(np.float32)
  assert state["w"].tobytes() == want.tobytes()
