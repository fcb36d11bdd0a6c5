"""Fine-tuning: the train state, the compiled train and eval steps, and the loop around them.

``train_and_evaluate(config, workdir)`` is what ``launch.py`` calls; research code
can call :func:`train_step` and :func:`eval_step` directly.  The step is one pure
function ``(state, batch) -> (state, metrics)`` compiled once per unfreezing phase:

* gradients are taken with respect to the trainable leaves only, so frozen
  leaves cost no backward work and nothing reads their gradients;
* the rng of a step is ``fold_in(seed key, step)`` and the data of a step is a
  function of the step, so a resumed run repeats nothing and skips nothing;
* a non-finite loss or gradient never reaches the parameters: the step keeps
  the old state and records the step and the first offending quantity, which
  the host reads at its next logging or checkpoint point (no per-step sync).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import config as config_lib
from ftjax import distributed
from ftjax import data as data_lib
from ftjax import metrics as metrics_lib
from ftjax import models, optim
from ftjax.checkpoint import Checkpointer, committed_steps, first_non_finite
from ftjax.errors import (CheckpointError, ConfigError, DataError, FtjaxError, Interrupted,
                          NumericsError, Preempted)
from ftjax.progress import Progress
from ftjax.tree import flatten, path_str, rule_tree, unflatten

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly; one pytree, checkpointed whole."""

  step: jax.Array  # int32: updates done so far
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any
  ema_params: Any  # None without EMA
  # The EMA of batch_stats ({} without BatchNorm), None without EMA: evaluating the EMA
  # parameters with the live statistics would mismatch them (timm averages both).
  ema_batch_stats: Any
  rng: jax.Array  # uint32[2]: the seed's key; step keys are fold_in(rng, step)
  skipped: jax.Array  # int32: non-finite steps skipped so far
  consecutive_skips: jax.Array  # int32
  first_bad_step: jax.Array  # int32: step of the first non-finite update, -1 if none
  first_bad_what: jax.Array  # int32: 0 loss, i + 1 the i-th trainable leaf's gradient, -1 none
  first_bad_param: jax.Array  # int32: i the first trainable leaf with a non-finite gradient then, -1 none


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static (hashable) options of a compiled train step."""

  num_classes: int
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  accum_steps: int = 1
  update_batch_stats: bool = False  # BatchNorm statistics follow the batches
  ema_decay: float = 0.0
  axis_name: str | None = None  # set under pmap: gradients are averaged over it


def trainable_paths(mask) -> tuple[str, ...]:
  """Sorted paths of the True leaves of a bool mask tree (the order of first_bad_what)."""
  return tuple(p for p, m in flatten(mask).items() if m)


def _soft_labels(labels, opts: StepOptions):
  onehot = jax.nn.one_hot(labels, opts.num_classes, dtype=jnp.float32)
  if opts.label_smoothing:
    onehot = optax.smooth_labels(onehot, opts.label_smoothing)
  return onehot


def _first_false(flags: jax.Array) -> jax.Array:
  """The index of the first False in ``flags``, -1 if none (or no flags: nothing trainable)."""
  if flags.shape[0] == 0:
    return jnp.int32(-1)
  return jnp.where(jnp.all(flags), -1, jnp.argmin(flags)).astype(jnp.int32)


def finiteness(loss: jax.Array, grads: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(finite, global_norm)``: is the loss, then each gradient, finite; and the gradients' norm.

  One pass over each gradient serves both: a gradient counts as finite when its sum of
  squares is, so one whose squared norm overflows float32 (``|g|`` above about 1.8e19)
  counts as non-finite too, and no update could use it.  (A separate ``isfinite`` pass
  per leaf cost ViT-B/16's step about a hundred more small kernels.)

  >>> f, n = finiteness(jnp.float32(1.0), [jnp.array([3.0, 4.0]), jnp.array([jnp.inf]),
  ...                                      jnp.array([1e20])])
  >>> f.tolist(), bool(jnp.isinf(n))
  ([True, True, False, False], True)
  >>> finiteness(jnp.float32(jnp.nan), [jnp.array([3.0, 4.0])])[0].tolist()
  [False, True]
  >>> float(finiteness(jnp.float32(0.0), [jnp.array([3.0]), jnp.array([4.0])])[1])
  5.0
  >>> [x.tolist() for x in finiteness(jnp.float32(2.0), [])]  # nothing trainable yet
  [[True], 0.0]
  """
  sq_norms = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads] or
                       [jnp.zeros((), jnp.float32)])[:len(grads)]  # nothing trainable: no leaf
  finite = jnp.concatenate([jnp.isfinite(loss)[None], jnp.isfinite(sq_norms)])
  return finite, jnp.sqrt(jnp.sum(sq_norms))


# Primitives whose body runs once per use with the caller's arguments, recomputation
# included (jit, remat: jax.checkpoint's primitive is "remat2"); a leaf used by anything
# else (a custom_vjp's backward may read it apart from its body) is not followed.
_TRANSPARENT = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2")


def _cast_targets(jaxpr, var) -> set | None:
  """The dtypes the uses of ``var`` in ``jaxpr`` cast it to; None if a use is not a cast."""
  if any(v is var for v in jaxpr.outvars):
    return None
  targets: set = set()
  for eqn in jaxpr.eqns:
    for i, v in enumerate(eqn.invars):
      if v is not var:
        continue
      if eqn.primitive.name == "convert_element_type":
        targets.add(np.dtype(eqn.params["new_dtype"]))
        continue
      transparent = eqn.primitive.name in _TRANSPARENT
      inner = (eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")) if transparent else None
      inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's open one
      if inner is None or len(inner.invars) != len(eqn.invars):
        return None
      found = _cast_targets(inner, inner.invars[i])
      if found is None:
        return None
      targets |= found
  return targets


def cast_only_leaves(apply_fn: Callable, params, *args) -> dict[str, Any]:
  """``{path: dtype}``: the ``params`` leaves ``apply_fn(params, *args)`` only ever casts to ``dtype``.

  These are the weights a 16-bit forward pass casts from float32 on every call
  (dense and convolution kernels, their biases, embeddings), not those it reads
  in float32 (normalisation scales, BatchNorm statistics).  For such a leaf,
  frozen, a copy cast once gives the step the same values without its casts
  (:func:`train_step`'s ``frozen_cast``).  Found by tracing ``apply_fn``
  (arguments may be ShapeDtypeStructs) and following each leaf into jitted
  bodies; a leaf reaching anything else (a ``custom_vjp``, an output) is left out.

  >>> def apply(p, x):
  ...   return x @ p["w"].astype(jnp.bfloat16) * p["scale"] + p["b"].astype(jnp.bfloat16)
  >>> p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "scale": jnp.ones(2)}
  >>> cast_only_leaves(apply, p, jnp.ones((1, 2), jnp.bfloat16))
  {'b': dtype(bfloat16), 'w': dtype(bfloat16)}
  """
  closed = jax.make_jaxpr(apply_fn)(params, *args)
  keyed = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for (kp, leaf), var in zip(keyed, closed.jaxpr.invars):
    targets = _cast_targets(closed.jaxpr, var)
    if targets and len(targets) == 1:
      dtype = targets.pop()
      if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < np.dtype(leaf.dtype).itemsize:
        out[path_str(kp)] = dtype
  return dict(sorted(out.items()))


def _without_remat(model):
  """``model`` with ViT's recomputed blocks (``remat``) computed once, LoRA's wrapper kept.

  A recomputed block is a custom VJP, which :func:`cast_only_leaves` does not follow
  (a backward may read a leaf apart from its body); this one's backward recomputes
  the same forward, with the same casts, so the leaves the forward only casts are
  those of the model without it.
  """
  return _with_base(model, remat=False)


def _with_base(model, **changes):
  """``model`` with ``changes`` made to its flax module's attributes (under LoRA's wrapper,
  the base module's); an attribute the module does not have is left alone."""
  from ftjax import lora

  if isinstance(model, lora.LoraModel):
    base = _with_base(model.model, **changes)
    return model if base is model.model else lora.LoraModel(base, model.spec)
  changes = {k: v for k, v in changes.items() if hasattr(model, k) and getattr(model, k) != v}
  return model.clone(**changes) if changes else model


def frozen_cast_paths(model, params, batch_stats, image_shape: tuple[int, ...],
                      opts: StepOptions) -> dict[str, Any]:
  """:func:`cast_only_leaves` of the forward pass :func:`train_step` runs (one image)."""
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  model = _without_remat(model)

  def forward(params, batch_stats, images):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    mutable = ["batch_stats"] if opts.update_batch_stats else False
    return model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)},
                       mutable=mutable)

  return cast_only_leaves(forward, jax.tree.map(spec, params), jax.tree.map(spec, batch_stats),
                          jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))


def cast_frozen(params, paths: Mapping[str, Any]) -> dict[str, jax.Array]:
  """``{path: leaf cast to its dtype}`` for :func:`train_step`'s ``frozen_cast`` (jit it)."""
  flat = flatten(params)
  return {p: flat[p].astype(dtype) for p, dtype in paths.items()}


def train_step(state: TrainState, batch: Mapping[str, jax.Array],
               frozen_cast: Mapping[str, jax.Array] | None = None, *, model,
               tx: optax.GradientTransformation, trainable: tuple[str, ...],
               opts: StepOptions) -> tuple[TrainState, dict]:
  """One update: ``(state, batch) -> (state, metrics)``; pure, for ``jax.jit`` or ``jax.pmap``.

  Args:
    state: the train state.
    batch: ``{"image": [B, H, W, 3] float, "label": [B] int}``.
    frozen_cast: optional ``{path: leaf}``, frozen leaves already cast to the dtype
      the model casts them to (:func:`frozen_cast_paths`, :func:`cast_frozen`): the
      forward pass uses these, the same values, and skips those casts (on a GPU a
      kernel and a read of the float32 weight each, every step).  The state keeps
      the float32 leaves.
    model: the flax module.
    tx: the optimizer (frozen leaves mapped to ``optax.set_to_zero``).
    trainable: sorted '/'-paths of the trainable params; gradients are taken
      for these only.
    opts: static options.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  mix_rng, drop_rng = jax.random.split(rng)
  if opts.axis_name:
    # Under pmap each device holds its own slice of the batch: it draws its own dropout and
    # drop-path (jit draws them over the global batch). The mixing draw stays one per step.
    drop_rng = jax.random.fold_in(drop_rng, jax.lax.axis_index(opts.axis_name))
  flat = flatten(state.params)
  train_flat = {p: flat[p] for p in trainable}
  frozen_flat = {p: v for p, v in flat.items() if p not in train_flat}
  not_frozen = sorted(set(frozen_cast or {}) - set(frozen_flat))
  if not_frozen:
    raise ValueError(f"frozen_cast holds leaves that are not frozen: {not_frozen}")
  frozen_in = {**frozen_flat, **(frozen_cast or {})}
  images, labels = batch["image"], _soft_labels(batch["label"], opts)
  if opts.mixup_alpha or opts.cutmix_alpha:
    images, labels = data_lib.mixup_cutmix(mix_rng, images, labels, mixup_alpha=opts.mixup_alpha,
                                           cutmix_alpha=opts.cutmix_alpha,
                                           switch_prob=opts.mix_switch_prob)

  def loss_fn(train_flat, batch_stats, images, labels, drop_rng):
    variables = {"params": unflatten({**frozen_in, **train_flat})}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if opts.update_batch_stats:
      logits, new_vars = model.apply(variables, images, train=True, rngs={"dropout": drop_rng},
                                     mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
    else:
      logits = model.apply(variables, images, train=True, rngs={"dropout": drop_rng})
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()
    return loss, batch_stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if opts.accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(train_flat, state.batch_stats, images, labels, drop_rng)
  else:
    # Microbatches inside the one compiled step: only the gradient sum is kept.
    k = opts.accum_steps
    # Micro-batch i takes rows i, i + k, i + 2k, ...: each keeps a share of every device's
    # slice, so no device waits on another's rows (contiguous ones made XLA gather the
    # whole batch onto every device, which then computed all of it).
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def micro(carry, xs):
      g_sum, l_sum, bs = carry
      i, im, lb = xs
      (l, bs), g = grad_fn(train_flat, bs, im, lb, jax.random.fold_in(drop_rng, i))
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, bs), None

    zeros = jax.tree.map(jnp.zeros_like, train_flat)
    (g_sum, l_sum, batch_stats), _ = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
        (jnp.arange(k), split(images), split(labels)))
    grads, loss = jax.tree.map(lambda g: g / k, g_sum), l_sum / k
  if opts.axis_name:
    grads, loss, batch_stats = jax.lax.pmean((grads, loss, batch_stats), opts.axis_name)

  finite, grad_norm = finiteness(loss, [grads[p] for p in trainable])
  ok = jnp.all(finite)
  # Frozen leaves get a zero gradient the optimizer's set_to_zero discards;
  # XLA removes both, so their backward pass is never computed.
  full_grads = unflatten({**{p: jnp.zeros_like(v) for p, v in frozen_flat.items()}, **grads})
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  flat_updates = flatten(updates)
  # Only trainable leaves are written (and only when the step is finite): frozen
  # ones pass through untouched, bit-identical (even -0.0), with no copy made.
  new_flat = dict(flat)
  for p in trainable:
    new_flat[p] = jnp.where(ok, (flat[p] + flat_updates[p]).astype(flat[p].dtype), flat[p])
  params = unflatten(new_flat)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  opt_state = keep(opt_state, state.opt_state)
  batch_stats = keep(batch_stats, state.batch_stats)
  ema, ema_stats = state.ema_params, state.ema_batch_stats
  if opts.ema_decay:
    d = opts.ema_decay
    average = lambda avg, new: jax.tree.map(lambda e, x: d * e + (1 - d) * x, avg, new)
    ema = average(ema, params)
    if opts.update_batch_stats:  # frozen statistics: their EMA is their own value, kept exact
      ema_stats = average(ema_stats, batch_stats)
  bad = jnp.logical_not(ok)
  first_new = jnp.logical_and(bad, state.first_bad_step < 0)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=ema, ema_batch_stats=ema_stats, skipped=state.skipped + bad.astype(jnp.int32),
      consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1),
      first_bad_step=jnp.where(first_new, state.step + 1, state.first_bad_step),
      first_bad_what=jnp.where(first_new, jnp.argmin(finite).astype(jnp.int32), state.first_bad_what),
      first_bad_param=jnp.where(first_new, _first_false(finite[1:]), state.first_bad_param))
  return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": ok}


def eval_step(params, batch_stats, batch, *, model, num_classes: int) -> dict:
  """Sums of evaluation counts over one padded batch (``batch["mask"]`` marks real examples)."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
  return metrics_lib.eval_counts(logits, batch["label"], batch["mask"], num_classes)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Run:
  """What the loop needs besides the state (host-side, rebuilt on every start)."""

  config: Any
  workdir: Path
  model: Any
  report: Any
  family: str
  mesh: Mesh
  train_ds: Any
  eval_sets: dict
  num_classes: int
  total_steps: int
  steps_per_epoch: float  # n / batch
  overrides: dict
  phases: list = dataclasses.field(default_factory=list)  # start step of each unfreezing phase
  masks: list = dataclasses.field(default_factory=list)  # trainable mask of each phase
  plan: Any = None
  warnings: list = dataclasses.field(default_factory=list)
  config_dict: dict = dataclasses.field(default_factory=dict)
  lora: Any = None  # the LoraSpec when model.lora_rank > 0


# ---------------------------------------------------------------- checks before anything is written

CONFIG_FILE = "config.json"  # WORKDIR/config.json: the run's config of record
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def with_deterministic_flag(xla_flags: str | None) -> str:
  """``XLA_FLAGS`` with GPU determinism on (``train.deterministic``).

  On a GPU two identical runs differ bit-wise without it (atomics in reductions
  and scatters); on CPU they agree anyway.  XLA reads the variable once, when
  the backend starts, so it must be set before the first computation.

  >>> with_deterministic_flag("--xla_force_host_platform_device_count=8")
  '--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true'
  >>> with_deterministic_flag(DETERMINISTIC_FLAG)
  '--xla_gpu_deterministic_ops=true'
  """
  flags = (xla_flags or "").split()
  if DETERMINISTIC_FLAG not in flags:
    flags.append(DETERMINISTIC_FLAG)
  return " ".join(flags)


def _set_deterministic() -> None:
  flags = os.environ.get("XLA_FLAGS")
  if DETERMINISTIC_FLAG in (flags or "").split():
    return
  # jax has no public "has the backend started?"; if it has, the flag would be ignored silently.
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized() and jax.default_backend() != "cpu":
    raise ConfigError("train.deterministic set after JAX started", where="train.deterministic",
                      value=f"XLA_FLAGS={flags!r}",
                      hint=f"use launch.py, or export XLA_FLAGS={DETERMINISTIC_FLAG} before starting")
  os.environ["XLA_FLAGS"] = with_deterministic_flag(flags)


def _check_workdir(workdir: str) -> Path:
  """The workdir as a Path, if it exists and is writable or can be created; nothing is created."""
  if not workdir:
    raise ConfigError("no workdir given", where="--workdir", hint="pass --workdir DIR")
  wd = Path(workdir).absolute()
  existing = next(p for p in (wd, *wd.parents) if p.exists())
  if existing == wd and not wd.is_dir():
    raise ConfigError("workdir is not writable", where=str(wd), value="a file is in the way",
                      hint="choose another --workdir")
  if not existing.is_dir():
    raise ConfigError("workdir is not writable", where=str(wd), value=f"{existing} is not a directory",
                      hint="choose another --workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError("workdir is not writable", where=str(wd), value=f"{existing}: permission denied",
                      hint="choose another --workdir")
  return Path(workdir)


def _make_workdir(wd: Path) -> None:
  """Makes the workdir and checks that it, and a checkpoints/ directory already in it, take
  files: before training, not at the first save, when the steps trained would be lost."""
  for d in (wd, wd / "checkpoints"):
    if d != wd and not d.is_dir():
      continue
    try:
      d.mkdir(parents=True, exist_ok=True)
      probe = d / f".write_test_{os.getpid()}"
      probe.write_text("")
      probe.unlink()
    except OSError as e:
      raise ConfigError("workdir is not writable", where=str(d), value=e.strerror,
                        hint="choose another --workdir") from None


def _read_stored_config(path: Path) -> dict:
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError("stored config unreadable", where=str(path), value=f"{type(e).__name__}: {e}"[:200],
                      hint="restore the file, or use a new --workdir") from None
  if not isinstance(stored, dict):
    raise ConfigError("stored config unreadable", where=str(path), value="not a JSON object",
                      hint="restore the file, or use a new --workdir")
  return stored


def _check_resume_config(wd: Path, config_dict: dict) -> None:
  """Refuses a workdir whose stored config differs in a key that makes it another experiment.

  Only a workdir holding checkpoints: a run that failed before its first save (a crash
  while compiling, say) has nothing to continue, and its config.json must not lock the
  corrected command out of the workdir.
  """
  stored_path = wd / CONFIG_FILE
  if stored_path.exists() and committed_steps(wd / "checkpoints"):
    stored = _read_stored_config(stored_path)
    diff = config_lib.resume_mismatches(stored, config_dict)
    if diff:
      recorded = config_lib.with_defaults(stored)  # a key the run predates ran at its default
      shown = ", ".join(f"{k} {config_lib._get(recorded, k)!r} -> {config_lib._get(config_dict, k)!r}"
                        for k in diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
      raise ConfigError("workdir holds a run with another config", where=str(stored_path),
                        value=shown, hint="use a new --workdir, or the stored config")


def stored_config(workdir: str | os.PathLike):
  """The locked config of record of a run (``WORKDIR/config.json``), or None if there is none.

  Resuming reads this JSON file: a ``config.py`` found in a workdir is never
  executed.  Keys are checked against ftjax's schema.
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  stored = _read_stored_config(path)
  # Keys added to ftjax since the run was recorded take their defaults, as the run did.
  config = ml_collections.ConfigDict(config_lib.with_defaults(stored))
  config_lib.check_schema(config)
  merged = config_lib.default_config()

  def fill(node, values, prefix=""):
    for key, value in values.items():
      if isinstance(value, dict) and prefix + key not in config_lib.FREE_FORM:
        fill(node[key], value, prefix + key + ".")
      else:
        node[key] = value

  try:
    fill(merged, stored)
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise ConfigError("stored config does not fit the schema", where=str(path),
                      value=" ".join(str(e).split())[:200], hint="use a new --workdir") from None
  return merged


# ---------------------------------------------------------------- fault-test hooks and the step ledger

TEST_KILL_ENV = "FTJAX_TEST_KILL_AT"  # "startup" | "step:N" | "after:N" | "eval:N" | "ckpt:<phase>:N"
TEST_HOLD_ENV = "FTJAX_TEST_HOLD_AT"  # "<moment>:N=SECONDS": sleep there (e.g. hold a checkpoint phase)
TEST_FAIL_ENV = "FTJAX_TEST_FAIL_AT"  # "<moment>:N": raise a full-disk OSError there
TEST_TERM_ENV = "FTJAX_TEST_TERM_AT"  # "<moment>:N": send this process a SIGTERM there


def _parse_moment(spec: str) -> tuple[str, int | None]:
  head, _, last = spec.rpartition(":")
  if head and last.lstrip("-").isdigit():
    return head, int(last)
  return spec, None


def fault_hook(kill: str | None = None, hold: str | None = None,
               fail: str | None = None, term: str | None = None) -> Callable[[str, int], None]:
  """``hit(moment, step)``, called at the run's fault-test points; kills, holds or fails where asked.

  Moments: "startup" (workdir ready, before the restore), "step" (a step
  dispatched, before its result is read), "after" (a step's logging, evaluation
  and save done), "eval" (inside an evaluation) and "ckpt:<phase>" (a
  checkpoint phase, see :class:`ftjax.checkpoint.Checkpointer`).  A failure
  is the ``OSError`` of a full disk; ``term`` sends SIGTERM (a preemption notice).  The
  trainer reads the specs from ``$FTJAX_TEST_KILL_AT``, ``$FTJAX_TEST_HOLD_AT``,
  ``$FTJAX_TEST_FAIL_AT`` and ``$FTJAX_TEST_TERM_AT``.

  >>> hit = fault_hook(hold="ckpt:hashed:2=0.01", fail="ckpt:written:4")
  >>> hit("ckpt:hashed", 2)  # sleeps 10 ms
  >>> hit("step", 3)  # nothing asked here
  >>> hit("ckpt:written", 4)
  Traceback (most recent call last):
  ...
  OSError: [Errno 28] No space left on device (injected at ckpt:written:4)
  """
  kill_at = _parse_moment(kill) if kill else None
  fail_at = _parse_moment(fail) if fail else None
  term_at = _parse_moment(term) if term else None
  hold_at, seconds = None, 0.0
  if hold:
    spec, _, secs = hold.partition("=")
    hold_at, seconds = _parse_moment(spec), float(secs or 0)

  def hit(moment: str, step: int) -> None:
    if hold_at and hold_at[0] == moment and hold_at[1] in (None, step):
      time.sleep(seconds)
    if kill_at and kill_at[0] == moment and kill_at[1] in (None, step):
      os.kill(os.getpid(), signal.SIGKILL)
    if fail_at and fail_at[0] == moment and fail_at[1] in (None, step):
      raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {moment}:{step})")
    if term_at and term_at[0] == moment and term_at[1] in (None, step):
      os.kill(os.getpid(), signal.SIGTERM)

  return hit


def record_step(ledger: list[list[int]], step_id: int, *, new_segment: bool) -> list[list[int]]:
  """The ledger after update ``step_id``: ``[[first, last], ...]``, a segment per process that trained.

  Saved with every checkpoint: the segments of a committed step must tile
  ``1..step`` exactly once, whatever crashed in between.

  >>> led = record_step([], 1, new_segment=True)
  >>> led = record_step(led, 2, new_segment=False)
  >>> record_step(led, 3, new_segment=True)
  [[1, 2], [3, 3]]
  """
  if new_segment or not ledger:
    return [*ledger, [step_id, step_id]]
  return [*ledger[:-1], [ledger[-1][0], step_id]]


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def _param_shardings(params, mesh: Mesh, rules) -> Any:
  """Replicated params, or FSDP-style sharding of the leaves ``rules`` select (largest divisible dim)."""
  replicated = NamedSharding(mesh, P())
  if not rules:
    return jax.tree.map(lambda _: replicated, params)
  n = mesh.devices.size
  chosen = rule_tree(params, [(r, True) for r in rules], what="shard_params rule", default=False)

  def pick(x, c):
    for d in sorted(range(x.ndim), key=lambda d: -x.shape[d]) if c else ():
      if x.shape[d] % n == 0:
        axes = [None] * x.ndim
        axes[d] = "data"
        return NamedSharding(mesh, P(*axes))
    return replicated

  return jax.tree.map(pick, params, chosen)


class _StateLayoutStep:
  """A step ``(state, *args) -> (state, metrics)`` under ``jax.jit``, the state donated and
  the new state given the shardings of the old one (metrics replicated).

  Left to itself, XLA's sharding propagation may lay an output out otherwise (with
  parameters sharded, the bias of a sharded layer came out sharded too), and a
  compiled step refuses arguments laid out otherwise than it was compiled for: the
  second step would fail.  ``lower`` and calls jit once per layout of the state.
  """

  def __init__(self, fn: Callable, replicated: NamedSharding):
    self._fn, self._replicated, self._jitted = fn, replicated, {}

  def _for(self, state):
    leaves, tree = jax.tree.flatten(state)
    shardings = tuple(getattr(x, "sharding", None) for x in leaves)
    key = (tree, shardings)
    if key not in self._jitted:  # a leaf not placed yet (no sharding): XLA's choice
      out = (None if any(s is None for s in shardings)
             else (jax.tree.unflatten(tree, shardings), self._replicated))
      self._jitted[key] = jax.jit(self._fn, donate_argnums=0, out_shardings=out)
    return self._jitted[key]

  def lower(self, state, *args):
    return self._for(state).lower(state, *args)

  def __call__(self, state, *args):
    return self._for(state)(state, *args)


def _like_params(tree, params, param_shardings, replicated) -> Any:
  """Shardings for ``tree`` (optimizer state, EMA): a leaf whose path ends with a
  parameter's path and has its shape is laid out like that parameter (Adam's
  moments), any other leaf replicated.

  >>> import numpy as np
  >>> ps = {"w": np.zeros((4, 2)), "b": np.zeros(2)}
  >>> _like_params({"mu": {"w": np.zeros((4, 2)), "b": np.zeros(2)}, "count": np.zeros(())}, ps,
  ...              {"w": "split", "b": "whole"}, "whole")
  {'count': 'whole', 'mu': {'b': 'whole', 'w': 'split'}}
  """
  leaves, by_path = flatten(params), flatten(param_shardings)

  def pick(key_path, leaf):
    parts = path_str(key_path).split("/")
    for i in range(len(parts)):
      p = "/".join(parts[i:])
      if p in by_path and np.shape(leaves[p]) == np.shape(leaf):
        return by_path[p]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


class JitRunner:
  """The step under ``jax.jit`` over a mesh of all devices: batch sharded on "data"."""

  def __init__(self, mesh: Mesh, shard_rules=()):
    self.mesh, self.shard_rules = mesh, tuple(shard_rules)

  def put_state(self, state: TrainState) -> TrainState:
    """The state on the mesh: parameters sharded by the rules, and what follows a
    parameter (its optimizer moments, its EMA) sharded as it is, since that is how
    the step's updates come out (and a compiled step takes only what it was
    compiled for); everything else replicated."""
    replicated = NamedSharding(self.mesh, P())
    shardings = jax.tree.map(lambda _: replicated, state)
    if self.shard_rules:
      params = _param_shardings(state.params, self.mesh, self.shard_rules)
      like = lambda tree: _like_params(tree, state.params, params, replicated)
      shardings = shardings.replace(params=params, opt_state=like(state.opt_state),
                                    ema_params=like(state.ema_params))
    return jax.device_put(state, shardings)

  def view(self, state: TrainState) -> TrainState:
    return state

  def eval_view(self, state: TrainState, mesh: Mesh) -> TrainState:
    return state

  def put_batch(self, batch: dict) -> dict:
    sharding = NamedSharding(self.mesh, P("data"))
    single = jax.process_count() == 1

    def put(v):
      if single and isinstance(v, jax.Array):  # the loader already put it on a device
        return jax.device_put(v, sharding)
      return jax.make_array_from_process_local_data(sharding, np.asarray(v))

    return {k: put(v) for k, v in batch.items()}

  def compile(self, fn: Callable, opts: StepOptions) -> Callable:
    """``fn`` jitted, the state donated and its update laid out as the state came in."""
    return _StateLayoutStep(functools.partial(fn, opts=opts), NamedSharding(self.mesh, P()))

  def cast_frozen(self, state: TrainState, paths: Mapping[str, Any]) -> dict:
    """:func:`cast_frozen` of the state's params, laid out as they are."""
    return jax.jit(lambda params: cast_frozen(params, paths))(state.params)

  program_copies = 1  # one program with the global shapes (metrics.step_flops)
  calls_compiled = True  # the step runs as the ahead-of-time compiled program


class PmapRunner:
  """The same step under ``jax.pmap``: state replicated, gradients averaged over "batch"."""

  axis_name = "batch"

  def __init__(self, devices=None):
    self.devices = list(devices or jax.local_devices())
    # pmap's inputs: a leading axis of one slice per device, laid out across them.
    self._sharding = NamedSharding(Mesh(np.asarray(self.devices), ("d",)), P("d"))

  def put_state(self, state: TrainState) -> TrainState:
    n = len(self.devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
    return jax.device_put(stacked, self._sharding)

  def view(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x[0], state)

  def eval_view(self, state: TrainState, mesh: Mesh) -> TrainState:
    """The state for the evaluation step, a ``jit`` over ``mesh`` (every process's devices):
    in one process the first device's copy; across processes the parameters and BatchNorm
    statistics put on the mesh, replicated (a jit takes no array of one process's device)."""
    view = self.view(state)
    if jax.process_count() == 1:
      return view
    put = lambda tree: jax.device_put(jax.tree.map(np.asarray, tree), NamedSharding(mesh, P()))
    return view.replace(params=put(view.params), batch_stats=put(view.batch_stats),
                        ema_params=None if view.ema_params is None else put(view.ema_params),
                        ema_batch_stats=None if view.ema_batch_stats is None else put(view.ema_batch_stats))

  def put_batch(self, batch: dict) -> dict:
    n = len(self.devices)
    return {k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), self._sharding) for k, v in batch.items()}

  @property
  def program_copies(self) -> int:  # one device's program, run on each (metrics.step_flops)
    return len(self.devices) * jax.process_count()  # every process's devices run it

  @property
  def calls_compiled(self) -> bool:
    """Across processes pmap's compiled program takes global arrays; only the pmapped
    function turns each process's local slices into them, so the step is called through it
    (compiled a second time: the first, ahead of time, gives the memory and FLOPs)."""
    return jax.process_count() == 1

  def compile(self, fn: Callable, opts: StepOptions) -> Callable:
    opts = dataclasses.replace(opts, axis_name=self.axis_name)
    return jax.pmap(functools.partial(fn, opts=opts), axis_name=self.axis_name, donate_argnums=0)

  def cast_frozen(self, state: TrainState, paths: Mapping[str, Any]) -> dict:
    """:func:`cast_frozen` of the state's params, one copy per device."""
    if not paths:  # nothing to cast (float32 compute); pmap of no outputs fails across processes
      return {}
    return jax.pmap(lambda params: cast_frozen(params, paths), devices=self.devices)(state.params)


def initial_state(params, batch_stats, tx, seed: int, ema: bool) -> TrainState:
  """The state at step 0: ``tx.init(params)``, the seed's key, no skipped steps."""
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, batch_stats) if batch_stats else {},
      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.array, params) if ema else None,
      ema_batch_stats=jax.tree.map(jnp.array, batch_stats or {}) if ema else None,
      rng=jax.random.PRNGKey(seed), skipped=jnp.zeros((), jnp.int32),
      consecutive_skips=jnp.zeros((), jnp.int32), first_bad_step=jnp.full((), -1, jnp.int32),
      first_bad_what=jnp.full((), -1, jnp.int32), first_bad_param=jnp.full((), -1, jnp.int32))


def _model_meta(report, num_classes: int, class_names, lora_spec=None) -> dict:
  meta = {"family": report.family, "arch": report.arch, "num_classes": num_classes,
          "image_size": list(report.image_size), "mean": list(report.mean), "std": list(report.std),
          "class_names": list(class_names) if class_names else None}
  if lora_spec is not None:
    meta["lora"] = lora_spec.to_dict()  # export/predict merge the adapters with it
  return meta


# model.* config keys passed to the architecture (options that keep parameter shapes).
MODEL_OVERRIDES = ("dropout_rate", "droppath_rate", "bn_momentum", "remat", "attention")


def _build(config, workdir: Path) -> tuple[_Run, dict]:
  """Data, model and plan: everything that can fail on bad input, before any compilation."""
  warnings = []
  train_ds = data_lib.build(config.data, split=config.data.train_split)
  eval_sets = {s: data_lib.build(config.data, split=s) for s in config.data.eval_splits}
  data_lib.check_classifiable(train_ds)  # one class trains to loss 0 and learns nothing
  num_classes = train_ds.num_classes
  if config.model.num_classes is not None and config.model.num_classes != num_classes:
    raise DataError("class count disagrees with the data", where="model.num_classes",
                    value=f"config {config.model.num_classes} vs data {num_classes}",
                    hint="fix model.num_classes or the dataset")
  for split, ds in eval_sets.items():
    if ds.num_classes != num_classes:
      raise DataError("class count differs between splits", where=f"data split {split}",
                      value=f"{ds.num_classes} vs train {num_classes}")
    # Read now (tfds reads every record's): a label out of range (an unlabelled split)
    # fails before training, not at the first evaluation.
    _ = ds.labels
  # A warning, not an error: the class count is right (the head has every class), but the
  # run can never learn a class it has no example of; a val_fraction split can cause it.
  empty = data_lib.empty_classes(train_ds)
  if empty:
    names = ", ".join(map(repr, empty[:8])) + (", ..." if len(empty) > 8 else "")
    warnings.append(f"{len(empty)} of {num_classes} classes have no training example in "
                    f"{train_ds.name}: {names}; the model cannot learn them (check val_fraction, "
                    "the image count of each class, skipped files)")
  overrides = {k: config.model[k] for k in MODEL_OVERRIDES if config.model[k] is not None}
  arch = dict(config.model.arch)
  both = sorted(set(arch) & set(MODEL_OVERRIDES))
  if both:
    raise ConfigError("architecture option given twice", where=f"model.arch.{both[0]}",
                      value=f"model.arch.{both[0]} and model.{both[0]}", hint=f"use model.{both[0]}")
  overrides = {**arch, **overrides}
  dont_load = (".*",) if config.model.scratch else tuple(config.model.dont_load)
  model, variables, report = models.from_pretrained(
      config.model.source, num_classes=num_classes, image_size=config.data.image_size,
      dtype=DTYPES[config.model.dtype], dont_load=dont_load, **overrides)
  bad = first_non_finite(flatten(variables))
  if bad is not None:
    raise CheckpointError("non-finite value in the pretrained weights", where=config.model.source,
                          value=bad, hint="the file is damaged; nothing was trained")
  lora_spec = None
  if config.model.lora_rank:
    from ftjax import lora
    targets = tuple(config.model.lora_targets) or lora.DEFAULT_TARGETS
    lora_spec = lora.LoraSpec(rank=config.model.lora_rank, alpha=config.model.lora_alpha, targets=targets)
    model = lora.LoraModel(model, lora_spec)
    variables = {**variables, "params": lora.add_lora(variables["params"], lora_spec,
                                                      jax.random.key(config.seed, impl="rbg"))}
  # The loader runs epochs back to back and drops no remainder: an epoch is n / batch
  # steps, not a whole number (a few-shot set of 20 at batch 64 is 0.3125 steps).
  steps_per_epoch = train_ds.num_examples / config.train.batch_size
  run = _Run(config=config, workdir=workdir, model=model, report=report, family=report.family,
             mesh=_mesh(), train_ds=train_ds, eval_sets=eval_sets, num_classes=num_classes,
             total_steps=config.train.total_steps, steps_per_epoch=steps_per_epoch,
             overrides=overrides, warnings=warnings, lora=lora_spec)
  return run, variables


_SCALAR_METRICS = ("top1", "top5", "loss", "mean_class_accuracy", "ece")  # of metrics.summarize


def _plan(run: _Run, params) -> None:
  """Phases, masks and the optimizer of every phase: rule and schedule errors surface here."""
  cfg, total = run.config, run.total_steps
  groups = list(cfg.optim.param_groups)
  if run.lora is not None and len(groups) == 1 and groups[0][0] == ".*" and groups[0][1] is not None:
    from ftjax import lora
    # Adapters and head train under the one spec given (its lr_mult, optimizer), the base is frozen.
    cfg.optim.param_groups = [(rx, None if spec is None else groups[0][1])
                              for rx, spec in lora.PARAM_GROUPS]
  run.phases = optim.unfreeze_phases(cfg.optim, total)
  run.masks = [optim.trainable_mask(params, cfg.optim, phase=i) for i in range(len(run.phases))]
  for phase in range(len(run.phases)):
    tx = optim.make_optimizer(params, cfg.optim, family=run.family, total_steps=total,
                              steps_per_epoch=run.steps_per_epoch, phase=phase)
  _check_update(tx, params)
  t = cfg.train
  if t.keep_latest < 1 or t.keep_best < 0:
    raise ConfigError("keep at least the latest checkpoint", where="train.keep_latest / keep_best",
                      value=f"{t.keep_latest} / {t.keep_best}", hint="keep_latest >= 1, keep_best >= 0")
  if t.shard_params:
    rule_tree(params, [(r, True) for r in t.shard_params], what="train.shard_params rule", default=False)
  # A bare metric ranks by the first evaluated split: "val" for a folder, "test" for the rest.
  t.best_metric = config_lib.best_metric_key(t.best_metric, cfg.data.eval_splits)
  split, _, key = t.best_metric.rpartition("/")
  if split.startswith("ema_") and not t.ema_decay > 0 and (t.early_stopping_patience or t.keep_best):
    raise ConfigError("best metric of the EMA weights, but the run keeps none", where="train.best_metric",
                      value=repr(t.best_metric), hint="set train.ema_decay (e.g. 0.999), or rank by "
                      f"{split.removeprefix('ema_')}/{key}")
  if split.removeprefix("ema_") not in cfg.data.eval_splits:
    # Early stopping needs the metric; keeping the best checkpoints would silently keep
    # none by it (a run that evaluates nothing keeps the latest only, as it should).
    if t.early_stopping_patience:
      raise ConfigError("early stopping watches a split that is not evaluated", where="train.best_metric",
                        value=repr(t.best_metric), hint=f"evaluated splits: {list(cfg.data.eval_splits)} "
                        f"(--config.train.best_metric={key} takes the first)")
    if t.keep_best and cfg.data.eval_splits:
      raise ConfigError("keep_best ranks by a split that is not evaluated", where="train.best_metric",
                        value=repr(t.best_metric), hint=f"evaluated splits: {list(cfg.data.eval_splits)} "
                        f"(--config.train.best_metric={key} takes the first)")
  if t.early_stopping_patience:  # its own checks, before anything is written
    metrics_lib.EarlyStopping(t.best_metric, t.best_mode, t.early_stopping_patience,
                              t.early_stopping_min_delta)
    # Evaluations of the run (the last step's always); the first sets the best, so stopping
    # before the end takes patience more after it, and one more to come.
    evals = total // t.eval_every + bool(total % t.eval_every) if t.eval_every else 1
    if evals < t.early_stopping_patience + 2:
      run.warnings.append(f"early stopping cannot end this run early: {evals} evaluation(s) in {total} "
                          f"steps (train.eval_every {t.eval_every}) for patience {t.early_stopping_patience}")
  if key not in _SCALAR_METRICS:
    raise ConfigError("unknown evaluation metric", where="train.best_metric", value=repr(t.best_metric),
                      hint=f"<split>/<metric>, metric one of {', '.join(_SCALAR_METRICS)}")
  lower_is_better = key in ("loss", "ece")
  if (t.keep_best or t.early_stopping_patience) and lower_is_better == (t.best_mode == "max"):
    run.warnings.append(f"train.best_metric {t.best_metric} with best_mode {t.best_mode!r}: the "
                        f"{'highest' if t.best_mode == 'max' else 'lowest'} {key} counts as best")
  if cfg.data.train_split in cfg.data.eval_splits:
    run.warnings.append(f"data.eval_splits holds the training split {cfg.data.train_split!r}: its accuracy "
                        "is not held out, and early stopping and the best checkpoint rank by it if first")
  if cfg.model.dtype == "float16":
    run.warnings.append("model.dtype float16 runs without loss scaling: gradients under about 6e-8 "
                        "flush to zero in the backward pass; bfloat16 (A100, H100, TPU) has float32's range")
  run.plan = optim.fine_tuning_plan(params, cfg.optim, family=run.family, total_steps=total,
                                    num_train_examples=run.train_ds.num_examples,
                                    steps_per_epoch=run.steps_per_epoch)
  labels = optim.param_labels(params, cfg.optim, family=run.family, phase=len(run.phases) - 1)
  run.warnings += _check_head(params, run.plan, labels)
  if run.lora is not None:
    run.warnings += _check_lora(labels)


def _check_head(params, plan: optim.Plan, labels) -> list[str]:
  """Refuses a head of zeros (a new one: another class count) that never learns; warns when
  it starts learning after what is below it.

  Its logits are 0 for every image and no gradient reaches anything below it: frozen, or at
  a learning rate of 0, for the whole run, whatever else trains nothing moves and every
  prediction is class 0; frozen until an unfreezing step, what trains before then sees zero
  gradients (only weight decay moves it).  ``labels``: the last phase's, ``plan`` the run's.
  """
  head = flatten(params.get("head") or {})
  if not head or any(np.any(np.asarray(v)) for v in head.values()):
    return []
  rows = {r.label: r for r in plan.rows}
  head_labels = [label for p, label in flatten(labels).items() if p.split("/")[0] == "head"]
  learning = [rows[label] for label in head_labels if label != optim.FROZEN and rows[label].peak_lr > 0]
  if not learning:
    if all(label == optim.FROZEN for label in head_labels):
      raise ConfigError("the head is all zeros and frozen for the whole run", where="optim.param_groups",
                        value="every logit 0, no gradient below it: nothing would learn",
                        hint='train the head: put ("head/.*", {}) first in optim.param_groups')
    raise ConfigError("the head is all zeros and its learning rate is 0", where="optim.lr / lr_mult",
                      value="every logit 0, no gradient below it: nothing would learn",
                      hint="give the head a learning rate above 0")
  start = min(r.start_step for r in learning)
  before = sum(r.params for r in plan.rows if not r.frozen and r.start_step < start)
  if before:
    return [f"the head is all zeros and frozen until step {start}: the {before:,} parameters that train "
            "before it get no gradient until then (weight decay alone moves them); unfreeze the head first"]
  return []


def _check_lora(labels) -> list[str]:
  """Refuses LoRA whose adapters ``optim.param_groups`` freeze for the whole run; warns when
  base weights other than the head train too (the default groups freeze them).

  Param groups other than the single default ``.*`` one are the user's, and apply to the
  adapters (``lora/...``) as to any leaf: a head-only rule list froze every adapter.
  """
  from ftjax import lora
  flat = flatten(labels)
  adapters = [label for p, label in flat.items() if p.split("/")[0] == lora.LORA]
  if adapters and all(label == optim.FROZEN for label in adapters):
    raise ConfigError("model.lora_rank is set but optim.param_groups freeze every adapter",
                      where="optim.param_groups", value=f"{len(adapters)} lora/ leaves frozen",
                      hint=f'put ("{lora.LORA}/.*", {{}}) first in optim.param_groups, or leave it at its '
                           "default (adapters and head train)")
  base = sorted({p.split("/")[0] for p, label in flat.items()
                 if label != optim.FROZEN and p.split("/")[0] not in (lora.LORA, "head")})
  if base:
    return [f"LoRA with base weights training too ({', '.join(base)}): they take gradients and optimizer "
            f'state; add (".*", None) last in optim.param_groups to freeze them']
  return []


def _check_update(tx: optax.GradientTransformation, params) -> None:
  """Traces one update of the last phase's optimizer (every group trains by then), allocating nothing.

  optax checks most option values only when an update runs: ``optim.kwargs.b1='0.9x'``
  would otherwise fail with a traceback inside the first step's compilation, after the
  workdir was written.
  """
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
  try:
    jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), spec)
  except FtjaxError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError("the optimizer fails on an update", where="optim",
                      value=f"{type(e).__name__}: {' '.join(str(e).split())}"[:200],
                      hint="check optim.kwargs and the param groups' kwargs") from None


def frozen_batch_norm(freeze_bn: str, batch_stats, mask) -> bool | tuple[str, ...]:
  """The model's ``frozen_bn`` for a phase whose trainable parameters are ``mask``.

  True: every BatchNorm layer normalises with, and keeps, its running statistics in
  training; False: none does; else the '/'-paths of the layers that do.
  ``train.freeze_bn`` "yes" is True, "no" False; "auto" freezes a layer's statistics
  while its own scale and bias are frozen, as timm's ``freeze`` turns frozen modules'
  BatchNorm into ``FrozenBatchNorm2d``: a head-only phase moves no statistics, a phase
  that trains the last stage moves that stage's.

  >>> stats = {"stem": {"bn": {"mean": 0, "var": 0}}, "stage1": {"bn": {"mean": 0, "var": 0}}}
  >>> mask = {"stem": {"bn": {"scale": False, "bias": False}},
  ...         "stage1": {"bn": {"scale": True, "bias": True}}, "head": {"kernel": True}}
  >>> frozen_batch_norm("auto", stats, mask), frozen_batch_norm("no", stats, mask)
  (('stem/bn',), False)
  """
  if freeze_bn in ("yes", "no") or not batch_stats:
    return freeze_bn == "yes" or not batch_stats
  layers = sorted({p.rsplit("/", 1)[0] for p in flatten(batch_stats)})
  trains = flatten(mask)
  frozen = tuple(layer for layer in layers
                 if not (trains.get(f"{layer}/scale") or trains.get(f"{layer}/bias")))
  return True if len(frozen) == len(layers) else (frozen or False)


class _SigtermFlag:
  """SIGTERM, or a first Ctrl-C, sets a flag; the loop saves at the step where :meth:`agreed`
  says so and exits with the preempted (interrupted) code.  A second Ctrl-C quits at once."""

  def __init__(self):
    self.raised = False
    self.interrupted = False
    self._old = {}

  def __enter__(self):
    from ftjax import cli
    for sig in cli.SIGNALS_SEEN:  # one whose exception Python swallowed (cli.catch_signals_early)
      self.raised = True
      self.interrupted |= sig == signal.SIGINT
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    self.raised = True
    if signum == signal.SIGINT:
      self.interrupted = True
      signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
      print("interrupted: saving at the end of this step (Ctrl-C again quits without saving)",
            file=sys.stderr, flush=True)

  def agreed(self, sync: bool) -> bool:
    """Whether to save and exit now.

    One process: as soon as SIGTERM came.  Several: each may get the signal at
    another step, and a process saving alone would wait forever in the save's
    collective; so they decide together, only where every process asks
    (``sync``: the log steps, which already wait for the device), and stop if
    any of them got the signal.
    """
    if jax.process_count() == 1:
      return self.raised
    if not sync:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _phase_step(run: _Run, mask, opts: StepOptions, batch_stats) -> tuple[Any, StepOptions]:
  """The model and step options of a phase: its BatchNorm layers frozen or not."""
  frozen = frozen_batch_norm(run.config.train.freeze_bn, batch_stats, mask)
  return (_with_base(run.model, frozen_bn=frozen),
          dataclasses.replace(opts, update_batch_stats=bool(batch_stats) and frozen is not True))


def _counting_model(model):
  """``model`` as its FLOPs are counted (model FLOPs, as MFU defines them): ViT's recomputed
  blocks (``remat``) once, EfficientNet's depthwise convolutions as convolutions (on a CPU
  they run as elementwise multiply-adds, which the count leaves out), ResNet's stem as the
  plain 7x7 convolution (``space_to_depth`` multiplies zero taps too).  The same function."""
  return _with_base(model, remat=False, depthwise_impl="conv", stem_conv_impl="flax")


def _compile_phase(run: _Run, runner, tx, mask, opts: StepOptions, state, cast_paths: Mapping[str, Any],
                   batch_stats):
  """A phase's step, its trainable paths, its frozen leaves cast once (``frozen_cast``), and
  the step whose program :func:`_compile_step` counts FLOPs in (None: the step itself)."""
  trainable = trainable_paths(mask)
  model, opts = _phase_step(run, mask, opts, batch_stats)
  fn = functools.partial(train_step, model=model, tx=tx, trainable=trainable)
  counting = _counting_model(model)
  count_fn = (None if counting is model else
              runner.compile(functools.partial(train_step, model=counting, tx=tx, trainable=trainable), opts))
  trains = set(trainable)
  casts = {p: d for p, d in cast_paths.items() if p not in trains}
  return runner.compile(fn, opts), trainable, runner.cast_frozen(state, casts), count_fn


def _evaluate(run: _Run, state: TrainState, eval_fn, put_batch, hit=lambda moment, step: None,
              step: int = 0) -> dict:
  """Top-1/top-5/loss/confusion/ECE on every eval split, each example counted once."""
  cfg = run.config
  out = {}
  param_sets = {"": (state.params, state.batch_stats)}
  if state.ema_params is not None:
    param_sets["ema_"] = (state.ema_params, state.ema_batch_stats)
  for split, ds in run.eval_sets.items():
    for prefix, (params, batch_stats) in param_sets.items():
      counts = None
      for batch in data_lib.eval_iterator(
          ds, cfg.data, global_batch=cfg.train.eval_batch_size, image_size=cfg.data.image_size,
          mean=run.report.mean, std=run.report.std, process_index=jax.process_index(),
          process_count=jax.process_count()):
        c = eval_fn(params, batch_stats, put_batch(batch))
        hit("eval", step)
        counts = c if counts is None else metrics_lib.add_counts(counts, c)
      out[f"{prefix}{split}"] = metrics_lib.summarize(distributed.host_tree(counts), class_names=ds.class_names)
  return out


def _check_numerics(state: TrainState, trainable: tuple[str, ...], policy: str, max_skips: int,
                    last_saved: int = -1) -> int:
  """Host check at sync points; returns the number of steps skipped so far.

  ``last_saved``: the step of the newest checkpoint (every one passed this check), -1 if none.
  """
  first_step, what, param, skipped, consecutive = (int(x) for x in distributed.host_tree(
      (state.first_bad_step, state.first_bad_what, state.first_bad_param, state.skipped,
       state.consecutive_skips)))
  if first_step < 0:
    return skipped
  quantity = "loss" if what <= 0 else f"gradient of params/{trainable[what - 1]}"
  if what <= 0 and param >= 0:
    quantity += f", first non-finite gradient params/{trainable[param]}"
  elif what <= 0:
    quantity += " (gradients finite)"
  if policy == "stop":
    kept = (f"the last good checkpoint (step {last_saved}) is kept: rerun with train.on_nan=skip to "
            "resume from it" if last_saved >= 0 else
            "no checkpoint was saved before it: rerun with train.on_nan=skip to skip such steps")
    raise NumericsError("non-finite value in training", where=f"step {first_step}", value=quantity,
                        hint=f"{kept}, or with a lower optim.lr in a new --workdir")
  if consecutive >= max_skips:
    raise NumericsError("too many consecutive non-finite steps skipped", where=f"step {first_step}",
                        value=f"{consecutive} in a row, first: {quantity}",
                        hint="raise train.max_consecutive_skips to resume, or lower optim.lr in a "
                             "new --workdir")
  return skipped


def _train_iterator(run: _Run, start_step: int):
  cfg = run.config
  return data_lib.train_iterator(
      run.train_ds, cfg.data, global_batch=cfg.train.batch_size, image_size=cfg.data.image_size,
      mean=run.report.mean, std=run.report.std, seed=cfg.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())


def prepare(config, workdir: str, *, make_workdir: bool = True) -> tuple[_Run, dict]:
  """Every check that needs no compilation, then the workdir: ``(run, variables)``.

  Config, devices, workdir, stored config, data, weights and the optimizer
  plan are checked before anything is written, so bad input fails here with
  one line and leaves no trace.  Only then is the workdir created (empty,
  unless ``make_workdir`` is False); its
  ``config.json`` is written by :func:`record_config` once the checkpoint, if
  any, has been restored: a config the checkpoint refuses is never recorded.
  """
  config_lib.check_schema(config)
  config_lib.validate(config)
  from ftjax.data import config as data_config
  data_config.check(config.data)
  if config.train.deterministic:
    _set_deterministic()
  if config.train.distributed:
    distributed.initialize()
  t = config.train
  n_dev = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if t[key] % n_dev:
      raise ConfigError("batch size not divisible by the device count", where=f"train.{key}",
                        value=f"{t[key]} / {n_dev} devices")
  accum = config.optim.accum_steps
  if not (isinstance(accum, (int, np.integer)) and not isinstance(accum, bool) and accum >= 1):
    raise ConfigError("accum_steps must be a positive integer", where="optim.accum_steps", value=repr(accum))
  if t.batch_size % (accum * n_dev):
    raise ConfigError("batch size not divisible by accum_steps x devices", where="optim.accum_steps",
                      value=f"{t.batch_size} / ({accum} x {n_dev})")
  if t.shard_params and t.parallel == "pmap":  # pmap replicates whatever it is given
    raise ConfigError("train.shard_params needs train.parallel=jit", where="train.shard_params",
                      value=f"{tuple(t.shard_params)} with parallel=pmap",
                      hint="drop train.parallel=pmap, or shard_params=()")
  if t.shard_params and jax.process_count() > 1:
    # Checkpoints are written by process 0 from its host copy of the (replicated) state.
    raise ConfigError("train.shard_params needs a single process", where="train.shard_params",
                      value=f"{jax.process_count()} processes",
                      hint="replicate the parameters (shard_params=()) on several hosts")
  wd = _check_workdir(workdir)
  config_dict = config_lib.to_dict(config)
  _check_resume_config(wd, config_dict)
  run, variables = _build(config, wd)
  _plan(run, variables["params"])
  run.config_dict = config_dict
  if make_workdir and writes_workdir():
    _make_workdir(wd)
  return run, variables


def print_plan(config, workdir: str) -> _Run:
  """Prints what a run would load and train (load report, plan, warnings); writes nothing."""
  run, _ = prepare(config, workdir, make_workdir=False)
  _print_plan(run)
  return run


def data_summary(run: _Run) -> str:
  """One line: what trains on what, and how often the run sees it."""
  t = run.config.train
  n = run.train_ds.num_examples
  evals = "; ".join(f"eval {s}: {ds.num_examples:,}" for s, ds in run.eval_sets.items()) or "no evaluation"
  return (f"data: train {run.train_ds.name}: {n:,} examples, {run.num_classes} classes; {evals}; "
          f"{run.total_steps:,} steps of batch {t.batch_size} = {run.total_steps * t.batch_size / n:.3g} epochs")


def _print_plan(run: _Run) -> None:
  print(run.report, flush=True)
  print(data_summary(run), flush=True)
  print(dataclasses.replace(run.plan, warnings=()), flush=True)  # its warnings once, below, with the run's
  for w in list(run.plan.warnings) + run.warnings:
    print(f"WARNING: {w}", flush=True)


def record_config(run: _Run) -> None:
  """Writes ``WORKDIR/config.json``, the config of record that a resume by ``--workdir`` reads."""
  if writes_workdir():
    metrics_lib.write_atomically(run.workdir / CONFIG_FILE,
                                 json.dumps(run.config_dict, indent=2, sort_keys=True))


def writes_workdir() -> bool:
  """Whether this process writes the workdir: on several processes only process 0 does.

  The others compute the same (replicated) metrics and states and skip writing
  them: two writers would duplicate metric rows and race on checkpoint renames.
  """
  return jax.process_index() == 0


def _compile_step(step_fn, state, batch, frozen, runner, phase: int, count_fn=None):
  """Compiles a phase's step; prints its memory and FLOPs; returns (compiled, FLOPs per step).

  The memory is XLA's buffer assignment for one device (the fine-tuning plan's
  "peak memory"): parameters, optimizer state, batch, the frozen weights' 16-bit
  copies and the activations kept for the backward pass, known before the first
  step runs.  The FLOPs are counted in ``count_fn``'s program when given (the same
  step as the model's FLOPs count it: :func:`_counting_model`); it is lowered, not compiled.
  """
  lowered = step_fn.lower(state, batch, frozen)
  compiled = lowered.compile()
  counted = lowered if count_fn is None else count_fn.lower(state, batch, frozen)
  flops = metrics_lib.step_flops(counted, runner.program_copies)
  mem = metrics_lib.step_memory(compiled)
  parts = []
  size = metrics_lib.format_bytes
  if mem:
    parts.append(f"peak memory {size(mem['peak'])} per device (arguments {size(mem['argument'])}, "
                 f"temporaries {size(mem['temp'])})")
  if frozen:
    copies = runner.view(frozen)
    parts.append(f"{len(copies)} frozen tensors cast once "
                 f"({size(sum(x.size * x.dtype.itemsize for x in copies.values()))})")
  if flops:
    parts.append(f"{flops / 1e9:.3g} GFLOP per step")
  if parts:
    print(f"compiled step, phase {phase}: " + ", ".join(parts), flush=True)
  if not runner.calls_compiled:
    compiled = step_fn  # see PmapRunner.calls_compiled
  return compiled, flops


def train_and_evaluate(config, workdir: str, *, allow_fresh: bool = False) -> dict:
  """Fine-tunes ``config.model`` on ``config.data``; leaves checkpoints, metrics and plots in ``workdir``.

  Rerunning the same command resumes from the newest verified checkpoint
  (damaged steps are skipped with a warning and moved to ``checkpoints/rejected``).
  When checkpoints exist but none verifies, this raises CheckpointError rather
  than start again from step 0, unless ``allow_fresh``.  A run that fails
  before writing any file removes the directories it created for ``workdir``.
  Returns the final evaluation summaries.
  """
  created = _first_missing(Path(workdir).absolute())
  run, variables = prepare(config, workdir)
  try:
    return _train_prepared(run, variables, allow_fresh)
  except BaseException:
    if created is not None and writes_workdir():
      _remove_empty_dirs(created)  # a run that failed before writing anything leaves no trace
    raise


def _first_missing(path: Path) -> Path | None:
  """The outermost of ``path`` and its parents that does not exist yet; None if ``path`` exists."""
  missing = None
  for p in (path, *path.parents):
    if p.exists():
      return missing
    missing = p
  return missing


def _remove_empty_dirs(root: Path) -> None:
  """Removes ``root`` and the directories under it that hold no file, deepest first; never a file."""
  if not root.is_dir():
    return
  for dirpath, _, _ in os.walk(root, topdown=False):  # children before their parent
    try:
      os.rmdir(dirpath)
    except OSError:  # not empty: something was written there, keep it
      pass


def _train_prepared(run: _Run, variables: dict, allow_fresh: bool) -> dict:
  config = run.config
  cfg, t, wd, config_dict = config, config.train, run.workdir, run.config_dict
  hit = fault_hook(os.environ.get(TEST_KILL_ENV), os.environ.get(TEST_HOLD_ENV),
                   os.environ.get(TEST_FAIL_ENV), os.environ.get(TEST_TERM_ENV))
  params = variables["params"]
  total = t.total_steps
  opts = StepOptions(num_classes=run.num_classes, label_smoothing=t.label_smoothing,
                     mixup_alpha=cfg.data.mixup_alpha, cutmix_alpha=cfg.data.cutmix_alpha,
                     mix_switch_prob=cfg.data.mix_switch_prob, accum_steps=cfg.optim.accum_steps,
                     ema_decay=t.ema_decay)

  def make_tx(phase):
    return optim.make_optimizer(params, cfg.optim, family=run.family, total_steps=total,
                                steps_per_epoch=run.steps_per_epoch, phase=phase)

  _print_plan(run)

  # SIGTERM from here on saves (once there is something new to save) and exits with the
  # preempted code; the handler only sets a flag that the loop reads between steps.
  sigterm = _SigtermFlag().__enter__()
  try:
    ckpt = Checkpointer(wd / "checkpoints", keep_latest=t.keep_latest, keep_best=t.keep_best,
                        best_metric=t.best_metric, best_mode=t.best_mode, async_save=t.async_checkpoint,
                        fingerprint={k: config_lib._get(config_dict, k) for k in config_lib.RESUME_KEYS},
                        on_phase=lambda phase, s: hit(f"ckpt:{phase}", s))
    hit("startup", 0)
    summaries = _run_loop(run, ckpt, params, variables.get("batch_stats"), make_tx, opts, hit, sigterm,
                          allow_fresh)
  finally:
    sigterm.__exit__()
  return summaries


def _preempted(step: int, wd: Path, flag: _SigtermFlag) -> Preempted:
  kind, what = (Interrupted, "interrupted by Ctrl-C") if flag.interrupted else (Preempted, "preempted by SIGTERM")
  return kind(what, where=f"step {step}", value=str(wd / "checkpoints"),
              hint="rerun the same command to resume")


def _run_loop(run: _Run, ckpt: Checkpointer, params, batch_stats, make_tx, opts: StepOptions, hit,
              sigterm, allow_fresh: bool) -> dict:
  """Restore, compile, train, evaluate, save: the loop of :func:`train_and_evaluate`."""
  cfg, t, wd, total, masks = run.config, run.config.train, run.workdir, run.total_steps, run.masks
  meta = _model_meta(run.report, run.num_classes, run.train_ds.class_names, run.lora)
  # Resume: the template's optimizer state must have the phase of the checkpoint's state
  # (the checkpoint may be older than the newest, if that one is damaged).
  template = lambda s: initial_state(params, batch_stats, make_tx(optim.state_phase(s, cfg.optim)),
                                      cfg.seed, t.ema_decay > 0)
  early = metrics_lib.EarlyStopping(t.best_metric, t.best_mode, t.early_stopping_patience,
                                    t.early_stopping_min_delta, restarts=tuple(run.phases[1:])
                                    ) if t.early_stopping_patience else None
  try:
    restored = ckpt.restore_latest(template, allow_fresh=allow_fresh)
  except BaseException:
    ckpt.close()
    raise
  ledger = []
  if restored is not None:
    step0, state, extra = restored
    if step0 > total:
      ckpt.close()
      raise ConfigError("the checkpoint is past the run's end", where=str(wd / "checkpoints"),
                        value=f"step {step0} > train.total_steps {total}",
                        hint="raise total_steps to go on, or use a new --workdir")
    if early is not None and extra.get("early_stopping"):
      try:
        early.load_state_dict(extra["early_stopping"])
      except ConfigError:
        ckpt.close()
        raise
    ledger = [list(seg) for seg in extra.get("ledger") or []]
    print(f"resumed from step {step0} in {wd / 'checkpoints'}", flush=True)
  else:
    state = template(0)
  # A step saved as its evaluation failed: that evaluation is done first, as the
  # uninterrupted run did it (its rows, early stopping's count).
  eval_pending = restored is not None and bool(extra.get("eval_pending"))
  record_config(run)  # the checkpoint took this config: it is now the run's config of record
  step = int(distributed.host_value(state.step))  # the step is state: everything below follows from it
  # A run that stopped early is over: rerunning it evaluates, as a finished run does.
  training = step < total and not (early is not None and early.stopped_step is not None)
  if step < total and not training:
    print(f"the run stopped early at step {early.stopped_step} (best {t.best_metric} {early.best:.4f} "
          f"at step {early.best_step}): nothing left to train", flush=True)
  phase = optim.state_phase(step, cfg.optim)  # the loop moves it on at the next phase's first step
  tx = make_tx(phase)
  runner = PmapRunner() if t.parallel == "pmap" else JitRunner(run.mesh, t.shard_params)
  state = runner.put_state(state)
  writer = (metrics_lib.MetricsWriter(wd, resume_step=step, tensorboard=t.tensorboard)
            if writes_workdir() else metrics_lib.NullWriter())
  progress = it = None
  last_saved = step if restored is not None else -1
  summaries = {}

  def save(step, summaries=None, eval_pending=False):
    view = runner.view(state)
    _check_numerics(view, trainable, t.on_nan, t.max_consecutive_skips, last_saved)
    flat_metrics = {f"{s}/{k}": v for s, d in (summaries or {}).items() for k, v in d.items()
                    if isinstance(v, (int, float))}
    extra = {"model": meta, "data_step": step, "phase": phase, "ledger": ledger,
             "early_stopping": early.state_dict() if early else None, "eval_pending": eval_pending}
    ckpt.save(step, view, metrics=flat_metrics or None, extra=extra)

  def saving_first(what: str, fn, *args):
    """``fn(*args)``; if it raises, the trained steps are saved first (the state is whole
    between steps).  One process only: a save is collective, and the others are not failing."""
    try:
      return fn(*args)
    except Exception:
      if last_saved != step and step > 0 and jax.process_count() == 1:
        _save_before_raising(lambda: (save(step), ckpt.wait()), step, what)
      raise

  def record_eval(step, summaries) -> bool:
    """Writes an evaluation's rows and feeds early stopping; True: stop now."""
    for split, s in summaries.items():
      writer.write(step, "eval", {f"{split}/{k}": v for k, v in s.items() if k != "confusion"})
    stop = early is not None and early.update(step, _lookup_metric(summaries, t.best_metric))
    if stop:
      print(f"early stopping at step {step}: best {t.best_metric} {early.best:.4f} "
            f"at step {early.best_step}" + ("; predict, export and fewshot take the best kept step with --step best"
                                            if t.keep_best else ""), flush=True)
    return stop

  try:
    eval_fn = jax.jit(functools.partial(eval_step, model=run.model, num_classes=run.num_classes))
    eval_put = JitRunner(run.mesh).put_batch
    if eval_pending:
      # The step is committed already (without this metric: keep_best cannot rank it).
      print(f"step {step}: the evaluation that failed, once more", flush=True)
      summaries = _evaluate(run, runner.eval_view(state, run.mesh), eval_fn, eval_put, hit, step)
      if record_eval(step, summaries):
        training = False
    it = _train_iterator(run, step)
    first_batch = runner.put_batch(next(it)) if training else None
    view = runner.view(state)
    cast_paths = {}
    if training:
      model, model_opts = _phase_step(run, masks[phase], opts, batch_stats)
      cast_paths = frozen_cast_paths(model, view.params, view.batch_stats,
                                     first_batch["image"].shape[-3:], model_opts)
    step_fn, trainable, frozen, count_fn = _compile_phase(run, runner, tx, masks[phase], opts, state,
                                                          cast_paths, batch_stats)
    compiled, flops = (_compile_step(step_fn, state, first_batch, frozen, runner, phase, count_fn)
                       if training else (None, None))
    peak = metrics_lib.device_peak_flops(dtype=cfg.model.dtype)
    progress = Progress(total, start_step=step, batch_size=t.batch_size, log_every=t.log_every,
                        flops_per_step=flops, peak_flops=peak * jax.device_count() if peak else None)
    stopped_early = False
    new_segment = True  # this process's updates start a new ledger segment
    if sigterm.agreed(sync=True):  # during start-up: nothing new to save
      raise _preempted(step, wd, sigterm)
    while training and step < total:
      batch = (first_batch if first_batch is not None
               else runner.put_batch(saving_first("reading the training data", next, it)))
      first_batch = None
      new_phase = optim.phase_at(step, cfg.optim)
      if new_phase != phase:
        with progress.paused(wait_for=state, one_off=True):  # compiling: out of img/s, MFU and ETA
          new_tx = make_tx(new_phase)
          view = runner.view(state)
          view = view.replace(opt_state=optim.transition_opt_state(view.opt_state, new_tx, view.params))
          state = runner.put_state(view)
          phase, tx = new_phase, new_tx
          del frozen  # before the next phase's copies exist
          step_fn, trainable, frozen, count_fn = _compile_phase(run, runner, tx, masks[phase], opts, state,
                                                                cast_paths, batch_stats)
          print(f"step {step}: unfreezing phase {phase}: {len(trainable)} trainable tensors", flush=True)
          compiled, flops = _compile_step(step_fn, state, batch, frozen, runner, phase, count_fn)
          progress.set_flops_per_step(step, flops)
          jax.block_until_ready((state, frozen))  # the new optimizer state and frozen copies, made now
      state, m = compiled(state, batch, frozen)
      hit("step", step + 1)  # the update is in flight
      step += 1
      ledger = record_step(ledger, step, new_segment=new_segment)
      if new_segment:  # this process's first step: its one-off costs stay out of the rates
        progress.start(step, wait_for=state)
      new_segment = False
      if step % t.log_every == 0 or step == total:
        m = distributed.host_tree(runner.view(m))
        skipped = _check_numerics(runner.view(state), trainable, t.on_nan, t.max_consecutive_skips,
                                  last_saved)
        saving_first("writing metrics.jsonl", writer.write, step, "train",
                     {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "skipped_steps": skipped})
        progress.update(step, loss=float(m["loss"]))
      evaluated = False
      if (t.eval_every and step % t.eval_every == 0) or step == total:
        with progress.paused(wait_for=state):  # images/s and MFU measure training steps only
          try:
            summaries = _evaluate(run, runner.eval_view(state, run.mesh), eval_fn, eval_put, hit, step)
          except Exception:
            if last_saved != step:  # the trained steps are not the evaluation's to lose
              _save_before_raising(lambda: (save(step, eval_pending=True), ckpt.wait()), step)
            raise
        evaluated = True
        stopped_early = record_eval(step, summaries)
      # An evaluated step is saved too when the best are kept: its metric ranks it.
      if ((t.checkpoint_every and step % t.checkpoint_every == 0) or step == total or stopped_early
          or (evaluated and t.keep_best)):
        with progress.paused(wait_for=state):
          save(step, summaries if evaluated else None)
        last_saved = step
      if stopped_early:
        break
      hit("after", step)
      # The last step is saved and evaluated: what is left (the results, the plots) finishes.
      if step < total and sigterm.agreed(sync=step % t.log_every == 0):
        if last_saved != step:
          save(step)
        ckpt.wait()
        raise _preempted(step, wd, sigterm)
    ckpt.wait()
  finally:
    if progress is not None:
      progress.close()
    if it is not None:
      it.close()  # stops grain worker processes
    writer.flush()
    ckpt.close()
  if not summaries:
    summaries = _evaluate(run, runner.eval_view(state, run.mesh), eval_fn, eval_put, hit, step)
  _finish(run, summaries)
  writer.close()
  return summaries


def _save_before_raising(save: Callable[[], Any], step: int, what: str = "evaluation") -> None:
  """Saves ``step`` on the way out of a failed ``what``; that error stays the one raised."""
  try:
    save()
  except Exception as e:  # noqa: BLE001 -- reported, then the first error is raised
    print(f"ftjax: warning: step {step} could not be saved before the error ({what}): "
          f"{type(e).__name__}: {' '.join(str(e).split())[:200]}", file=sys.stderr, flush=True)
  else:
    print(f"{what} failed at step {step}: step {step} saved first; rerun to resume from it",
          file=sys.stderr, flush=True)


def _lookup_metric(summaries: dict, name: str) -> float:
  split, _, key = name.partition("/")
  try:
    return float(summaries[split][key])
  except KeyError:
    raise ConfigError("best/early-stopping metric not produced by evaluation", where="train.best_metric",
                      value=repr(name), hint=f"available: {sorted(summaries)} x top1/top5/loss") from None


def _finish(run: _Run, summaries: dict) -> None:
  """Prints the results, then draws the plots: a plot that fails (a full disk, a class name
  matplotlib cannot draw) is a warning, not a lost result (the run is saved and evaluated)."""
  wd = run.workdir
  for split, s in summaries.items():
    top5 = f"top5 {100 * s['top5']:.2f}%  " if run.num_classes > 5 else ""  # else 100% by definition
    print(f"final {split}: top1 {100 * s['top1']:.2f}%  {top5}loss {s['loss']:.4f}  ({s['n']} examples)",
          flush=True)
  t = run.config.train
  written = ["checkpoints/", "metrics.jsonl", "config.json"] + (["TensorBoard events"] if t.tensorboard else [])
  if t.plots and writes_workdir():
    try:
      rows = metrics_lib.read_metrics(wd / "metrics.jsonl")
      metrics_lib.plot_learning_curves(rows, wd / "learning_curves.png")
      written.append("learning_curves.png")
      for split, s in summaries.items():
        if "confusion" in s:
          metrics_lib.plot_confusion(s["confusion"], run.eval_sets[split.removeprefix("ema_")].class_names,
                                     wd / f"confusion_{split}.png")
          written.append(f"confusion_{split}.png")
    except Exception as e:  # noqa: BLE001 -- the results above stand; the plots are extras
      print(f"ftjax: warning: plots not written ({wd}): {type(e).__name__}: {' '.join(str(e).split())[:200]}",
            file=sys.stderr, flush=True)
  print(f"workdir {wd}: {' '.join(written)}", flush=True)
