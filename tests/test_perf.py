"""Throughput properties checkable on CPU: no host sync in the loop, and what XLA compiles.

* the train step runs on device-resident state and batches under
  ``jax.transfer_guard("disallow")``: nothing in it moves data implicitly;
* the real training loop reads or waits for device values on log steps only
  (eval and checkpoint steps fall on log steps here), and its log lines carry
  the MFU of the compiled step;
* XLA's cost analysis of the compiled trainer step: a head-only step costs what
  a forward pass costs (the frozen backbone gets no backward pass), a full
  fine-tune about three forwards; XLA's buffer assignment: a head-only step
  needs far less memory than a full one.
"""

import dataclasses
import functools
import io
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from ftjax import metrics, models, optim, train
from ftjax.tree import flatten

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

NUM_CLASSES = 10
FULL = {"name": "adamw", "kwargs": {}, "lr": 1e-3, "schedule": {"name": "constant"},
        "weight_decay": 1e-4, "param_groups": [(".*", {})]}
HEAD_ONLY = dict(FULL, param_groups=[("head/.*", {}), (".*", None)])


@dataclasses.dataclass
class _Setup:
  """The trainer's own train_step, compiled by JitRunner, with its device-resident inputs."""
  step: Any
  state: train.TrainState
  batch: dict  # on the device
  host_batch: dict  # the same, numpy
  model: Any
  tx: optax.GradientTransformation
  update_batch_stats: bool
  runner: train.JitRunner


def _setup(family, arch, image_size, optim_config, *, batch=8) -> _Setup:
  trains_bn = family == "resnet" and optim_config is FULL
  if family == "resnet" and not trains_bn:
    arch = dict(arch, frozen_bn=True)  # as the trainer builds a frozen backbone
  model, _ = models.create(family, arch, num_classes=NUM_CLASSES, image_size=image_size)
  variables = models.init_variables(model, image_size)
  params = variables["params"]
  tx = optim.make_optimizer(params, optim_config, family=family, total_steps=100)
  state = train.initial_state(params, variables.get("batch_stats"), tx, 0, ema=False)
  runner = train.JitRunner(Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  trainable = train.trainable_paths(optim.trainable_mask(params, optim_config))
  opts = train.StepOptions(num_classes=NUM_CLASSES, update_batch_stats=trains_bn)
  step = runner.compile(functools.partial(train.train_step, model=model, tx=tx, trainable=trainable),
                        opts)
  host_batch = _host_batch(batch, image_size)
  return _Setup(step, runner.put_state(state), runner.put_batch(host_batch), host_batch, model, tx,
                trains_bn, runner)


def _host_batch(n: int, image_size: int) -> dict:
  rng = np.random.default_rng(n)
  return {"image": rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32),
          "label": (np.arange(n) % NUM_CLASSES).astype(np.int32)}


def _forward_flops(t: _Setup) -> float:
  """FLOPs of the loss of a training-mode forward pass, no gradients: what a step builds on."""
  def loss(params, batch_stats, batch):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    if t.update_batch_stats:  # BatchNorm normalising by the batch's own statistics
      logits, _ = t.model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    else:
      logits = t.model.apply(variables, batch["image"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["label"]).mean()
  return metrics.step_flops(jax.jit(loss).lower(t.state.params, t.state.batch_stats, t.batch))


# ----------------------------------------------------------------------------- no host sync


def _host_callbacks(lowered) -> list[str]:
  """The host callbacks (jax.debug.print, pure_callback, io_callback) in a lowered program.

  Only jax emits them (XLA adds none), so the StableHLO before compilation says it all.
  """
  return re.findall(r"custom_call @(\w*callback\w*)", lowered.as_text())


def test_train_step_runs_under_transfer_guard_and_matches_unguarded_steps():
  t = _setup("vit", {"variant": "test"}, 32, FULL)
  # The same steps without the guard: the reference the guarded run must equal bit for bit.
  ref = jax.tree.map(jnp.copy, t.state)
  for _ in range(3):
    ref, _ = t.step(ref, t.batch)
  ref = jax.device_get(ref)

  state = t.state
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      state, m = t.step(state, t.batch)  # compiles on the first call, inside the guard too
    # The guard is on: a host batch (an implicit host-to-device copy) raises.
    with pytest.raises(Exception, match="Disallowed host-to-device"):
      t.step(state, t.host_batch)
    got, loss = jax.device_get((state, m["loss"]))  # explicit: allowed
  assert int(got.step) == 3 and np.isfinite(loss)
  for path, value in flatten(got.params).items():
    np.testing.assert_array_equal(value, flatten(ref.params)[path], err_msg=path)
  # XLA:CPU -> numpy reads are zero-copy and escape the guard (jax issue #16602);
  # what could read the host from inside a step is a host callback: there is none.
  assert _host_callbacks(t.step.lower(state, t.batch)) == []
  probe = jax.jit(lambda x: jax.debug.print("{}", x) or x).lower(jnp.ones(()))
  assert len(_host_callbacks(probe)) == 1  # the check sees one where there is one


class _Counted:
  """A jitted, lowered or compiled step that counts its calls; all else passes through."""

  def __init__(self, fn, calls: list):
    self._fn, self._calls = fn, calls

  def __call__(self, *args):
    self._calls.append(None)
    return self._fn(*args)

  def lower(self, *args, **kwargs):
    return _Counted(self._fn.lower(*args, **kwargs), self._calls)

  def compile(self, *args, **kwargs):
    return _Counted(self._fn.compile(*args, **kwargs), self._calls)

  def __getattr__(self, name):  # cost_analysis, input_shardings, ...
    return getattr(self._fn, name)


def test_training_loop_reads_the_device_only_on_log_steps_and_reports_mfu(tiny_vit_npz, tmp_path,
                                                                         monkeypatch):
  """Every device read or wait of train_and_evaluate between its first and last step is on a log step,
  but for one wait for the first step (its one-off costs stay out of images/s: Progress.start).

  On CPU ``jax.transfer_guard_device_to_host`` sees nothing (XLA:CPU -> numpy is
  zero-copy, jax issue #16602), so the test records the reads themselves:
  ``jax.device_get`` (explicit), ``jax.Array._value`` outside it (implicit:
  ``float(x)``, ``np.asarray(x)``, ``bool(x)``...) and ``block_until_ready``,
  each with the number of steps dispatched so far.
  """
  from jax._src import array as array_impl  # the class behind jax.Array: the one place values are read

  total, log_every = 8, 4
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": total, "train.log_every": log_every,
                                     "train.eval_every": 4, "train.checkpoint_every": 4})
  calls, reads = [], []  # reads: (kind, steps dispatched so far)
  inside_get = []
  compile_, device_get, value = train.JitRunner.compile, jax.device_get, array_impl.ArrayImpl._value
  block, block_array = jax.block_until_ready, array_impl.ArrayImpl.block_until_ready

  def recording_device_get(x):
    reads.append(("device_get", len(calls)))
    inside_get.append(None)
    try:
      return device_get(x)
    finally:
      inside_get.pop()

  def recording_value(self):
    if not inside_get:
      reads.append(("implicit", len(calls)))
    return value.fget(self)

  def recording_block(x):
    reads.append(("block_until_ready", len(calls)))
    return block(x)

  def recording_block_array(self):
    reads.append(("block_until_ready", len(calls)))
    return block_array(self)

  monkeypatch.setattr(train.JitRunner, "compile",
                      lambda self, fn, opts: _Counted(compile_(self, fn, opts), calls))
  monkeypatch.setattr(jax, "device_get", recording_device_get)
  monkeypatch.setattr(jax, "block_until_ready", recording_block)
  monkeypatch.setattr(array_impl.ArrayImpl, "_value", property(recording_value))
  monkeypatch.setattr(array_impl.ArrayImpl, "block_until_ready", recording_block_array)
  float(jnp.ones(()) + 1)  # the instrument sees an implicit read where there is one
  assert reads == [("implicit", 0)]
  reads.clear()
  # The CPU has no peak FLOP/s: give it one, and keep the step's FLOP count, to check the MFU line.
  step_flops = []
  count_flops = metrics.step_flops

  def recording_flops(lowered, copies=1):
    step_flops.append(count_flops(lowered, copies))
    return step_flops[-1]

  peak_dtypes = []  # the peak is asked for the run's compute dtype

  def peak(device=None, dtype="bfloat16"):
    peak_dtypes.append(dtype)
    return 1e9

  monkeypatch.setattr(metrics, "device_peak_flops", peak)
  monkeypatch.setattr(metrics, "step_flops", recording_flops)
  log = io.StringIO()
  monkeypatch.setattr(train, "Progress", functools.partial(train.Progress, stream=log))
  summaries = train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert len(calls) == total and summaries["test"]["n"] == 360
  inside = [(kind, s) for kind, s in reads if 0 < s < total]
  assert {r for r in inside if r[1] == 1} == {("block_until_ready", 1)}, sorted(set(inside))
  assert {s for _, s in inside if s != 1} == {4}, sorted(set(inside))  # the one log step inside the run
  assert ("device_get", 4) in inside

  # MFU on every log line: the step's XLA FLOPs x steps/s over the peak.
  lines = re.findall(r"step (\d+)/8 loss \S+ img/s ([\d.]+) .*mfu ([\d.]+)%", log.getvalue())
  assert [int(s) for s, _, _ in lines] == [4, 8] and len(step_flops) == 1
  assert peak_dtypes == [cfg.model.dtype]
  for _, img_s, util in lines:
    expected = 100 * step_flops[0] * float(img_s) / cfg.train.batch_size / 1e9
    assert abs(float(util) - expected) <= 0.051 + 1e-3 * expected, (util, expected)


# ----------------------------------------------------------------------------- cost analysis


def _step_cost(t: _Setup, batch=None) -> tuple[float, int]:
  """(FLOPs, bytes) of a compiled step: XLA's cost analysis and its buffer assignment."""
  lowered = t.step.lower(t.state, t.batch if batch is None else batch)
  return metrics.step_flops(lowered), metrics.step_memory(lowered.compile())["peak"]


@pytest.mark.parametrize("family,arch,size,batch", [
    ("vit", {"variant": "test"}, 32, 4),
    pytest.param("resnet", {"variant": "resnet18"}, 32, 2, marks=pytest.mark.slow),  # ~30 s
])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_head_only_step_costs_a_forward_and_full_step_three(family, arch, size, batch):
  head = _setup(family, arch, size, HEAD_ONLY, batch=batch)
  head_flops, head_bytes = _step_cost(head)
  head_forward = _forward_flops(head)
  head_only = head_flops / head_forward

  # A full step also does per-parameter work that does not grow with the batch
  # (AdamW, the finiteness checks, the gradient norm: about 40 FLOPs a parameter,
  # under 0.1% of a ResNet-50 step at batch 256 and 224 px, but several forwards
  # of a ResNet-18 at batch 2 and 32 px); the cost of one more image leaves it out.
  full = _setup(family, arch, size, FULL, batch=batch)
  full_flops, full_bytes = _step_cost(full)
  double_flops, _ = _step_cost(full, full.runner.put_batch(_host_batch(2 * batch, size)))
  per_image = (double_flops - full_flops) / batch
  # Without BatchNorm statistics to update, the full step's forward is the head-only one.
  full_forward = _forward_flops(full) if full.update_batch_stats else head_forward
  full_per_forward = per_image / (full_forward / batch)
  print(f"{family}: head-only step {head_only:.4f} forwards; full step {full_per_forward:.4f} "
        f"forwards an image + {(2 * full_flops - double_flops) / 1e6:.1f} MFLOP a step; "
        f"head-only / full XLA bytes {head_bytes / full_bytes:.3f}")
  assert 1.0 <= head_only <= 1.05
  assert 2.5 <= full_per_forward <= 3.5
  assert head_bytes <= 0.5 * full_bytes


def test_each_unfreezing_phase_gets_its_own_flop_count_and_memory_line(tiny_vit_npz, tmp_path,
                                                                       monkeypatch, capsys):
  # The MFU base is the step being run: unfreezing the backbone at step 2 makes a step that
  # differentiates it, about three forwards' worth instead of one, and needs more memory
  # (gradients, moments, activations), which the plan's output reports before it runs.
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 4, "train.eval_every": 4,
                                     "train.checkpoint_every": 4})
  with cfg.unlocked():
    cfg.optim.param_groups = [("head/.*", {}), (".*", {})]
    cfg.optim.unfreeze = [(2, "Transformer/.*|embedding/.*|cls")]
  counts, count = [], metrics.step_flops

  def recording(lowered, copies=1):
    counts.append(count(lowered, copies))
    return counts[-1]

  memory, measure = [], metrics.step_memory

  def recording_memory(compiled):
    memory.append(measure(compiled))
    return memory[-1]

  monkeypatch.setattr(metrics, "step_flops", recording)
  monkeypatch.setattr(metrics, "step_memory", recording_memory)
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert len(counts) == 2 and 2.0 < counts[1] / counts[0] < 3.5, counts
  size = r"([\d.]+ [MG]iB)"
  lines = re.findall(rf"compiled step, phase (\d): peak memory {size} per device \(arguments {size}, "
                     rf"temporaries {size}\), ([\d.e+]+) GFLOP per step", capsys.readouterr().out)
  assert [int(p) for p, *_ in lines] == [0, 1] and memory[1]["peak"] > memory[0]["peak"]
  for (_, peak, args, temp, gflop), m, f in zip(lines, memory, counts):
    assert (peak, args, temp) == tuple(metrics.format_bytes(m[k]) for k in ("peak", "argument", "temp"))
    assert peak != "0.0 MiB"
    assert float(gflop) == pytest.approx(f / 1e9, rel=1e-2)
