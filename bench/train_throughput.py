"""Train-step throughput of ftjax against timm + torch.compile, same device, same call (issue 6).

ViT-B/16 and ResNet-50 at 224 px, batch 256, bf16 compute (float32 parameters
and optimizer state), AdamW (lr 1e-4, weight decay 0.01), 100 classes, random
init, synthetic data already on the device; the same figures as
``shared/bench/timm_baseline.py`` (one compiling step, 4 warm-up steps, 20 timed
steps).  Modes: ``full`` fine-tune, ``head_only``, ``layer_decay`` (0.75),
``lora`` (when ``ftjax/lora.py`` exists) and ``forward`` (forward + loss, no
gradients: what a head-only step should cost).  Each (model, mode) runs in its
own process, so the device's peak memory is that configuration's alone.

    # on the GPU: the timm baseline first, then ours (goals first), then the ratio table
    python bench/train_throughput.py --baseline path/to/timm_baseline.py --out $OUT/bench.jsonl \
        --budget 480
    # a lever: the plain runs, then ViT and ResNet full again with XLA flags added
    python bench/train_throughput.py --baseline-json timm.jsonl --modes full \
        --variant notriton=--xla_gpu_enable_triton_gemm=false
    # the run order in full: [NAME] is an --arch-variant (model options) or a --variant (XLA flags)
    python bench/train_throughput.py --runs 'vit:full,vit:full[xla],resnet:full[notriton]' \
        --arch-variant 'xla={"attention": "xla"}' --variant notriton=--xla_gpu_enable_triton_gemm=false
    # a kernel-time breakdown of chosen runs (3 more steps traced after the timed ones)
    python bench/train_throughput.py --runs vit:full,resnet:full --profile-runs vit:full,resnet:full \
        --profile-dir /tmp/ftjax-profile
    # the table again from the JSON lines of a run (timm and ftjax rows together)
    python bench/train_throughput.py --table bench.jsonl
    # CPU: tiny settings (ViT "test" variant and ResNet-18, batch 4, 64 px, 2 timed steps)
    python bench/train_throughput.py --smoke

Prints one JSON line per configuration (``framework: ftjax``; the baseline's
lines pass through unchanged), then the ratio table.  MFU is given twice: from
ftjax's count of the lowered step's matrix products, convolutions and cuDNN
attention (``ftjax.metrics.step_flops``, the trainer's count; the column keeps
its name ``mfu_xla``), and from the analytic per-image counts
in shared/anchors.md (ViT-B/16 35.2 GFLOP forward, 105.5 per training image;
ResNet-50 8.2 / 24.7).  Peak memory is the device allocator's
``peak_bytes_in_use`` (none on CPU) and XLA's own buffer assignment for the
step (arguments + outputs not aliased to arguments + temporaries), which the
CPU reports too.

``--runs`` fixes the configurations and their order: ``model:mode`` or
``model:mode[NAME]``, NAME an ``--arch-variant`` (model options), a
``--variant`` (XLA flags added to that child's ``XLA_FLAGS``) or both (a lever
that needs the two together). A ``--variant`` named in ``--runs`` runs only
there; the others still run after the plain runs on each of ``--variant-configs``.
``--repeat-runs`` (labels as in ``--runs``) also runs two steps twice from one
state and records in the row's ``repeat`` whether the results are bit-identical.

``--profile-runs`` (labels as in ``--runs``; ``vit:full`` is the plain run only)
traces 3 more steps of those configurations after their timed steps, so the
timed figures are untouched, and summarises the device's kernels
(``bench/kernel_profile.py``): ``<dir>/<model>-<mode>[-<variant>].profile.json``
holds the summary, next to the raw trace and the step's HLO text (keep
``--profile-dir`` out of a device call's ``$OUT``: those are large). The row gets
the per-step totals and ms per category under ``profile``; after the ratio
table the parent prints each profiled run's table with its top ops.

No GPU figure exists yet: see bench/NOTES.md for the predictions and the
command of the next GPU session.  On the 2-core development machine
``--smoke`` runs its 9 configurations in about 3 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

MODES = ("full", "head_only", "layer_decay", "lora", "forward")
NUM_CLASSES = 100  # the timm baseline's
LORA_RANK = 8  # PEFT's default r
PROFILE_STEPS = 3  # traced after the timed steps: enough to see a step's kernels repeat

# name -> (family, arch, smoke arch, timm model, analytic forward GFLOP per image at 224 px)
MODELS = {
    "vit": ("vit", {"variant": "B/16"}, {"variant": "test"}, "vit_base_patch16_224", 35.2),
    "resnet": ("resnet", {"variant": "resnet50"}, {"variant": "resnet18"}, "resnet50", 8.2),
}

# ours (model, mode) -> the timm row it is compared with, and the issue's goal ratio.
REFERENCE = {"full": ("full", True), "layer_decay": ("full", True), "lora": ("full", True),
             "head_only": ("head_only", False)}
GOALS = {("vit", "full"): 1.25, ("resnet", "full"): 1.25, ("vit", "head_only"): 1.0}


@dataclasses.dataclass(frozen=True)
class Settings:
  batch: int = 256
  image_size: int = 224
  steps: int = 20
  warmup: int = 4
  smoke: bool = False
  peak_tflops: float | None = None  # overrides ftjax.metrics' device table


# --------------------------------------------------------------------------- one configuration


def optimizer_config(mode: str) -> dict:
  """The optim config of a bench mode: torch's AdamW defaults at lr 1e-4, as the timm baseline."""
  cfg = {"name": "adamw", "kwargs": {}, "lr": 1e-4, "schedule": {"name": "constant"},
         "weight_decay": 0.01, "param_groups": [(".*", {})]}
  if mode in ("head_only", "forward"):
    cfg["param_groups"] = [("head/.*", {}), (".*", None)]
  elif mode == "layer_decay":
    cfg["layer_decay"] = 0.75
  return cfg


def analytic_flops_per_image(model_key: str, mode: str, s: Settings) -> float | None:
  """anchors.md's counts: a training image costs 3 forwards, a frozen backbone 1 (None off 224 px)."""
  if s.smoke or s.image_size != 224 or mode == "lora":
    return None  # LoRA: activation gradients but no weight gradients; no anchor count for it
  forward = MODELS[model_key][4] * 1e9
  return forward if mode in ("head_only", "forward") else 3 * forward


def _state(params, batch_stats, tx):
  from ftjax.train import initial_state

  return initial_state(params, batch_stats, tx, 0, ema=False)


def profile_name(model_key: str, mode: str, variant: str | None = None) -> str:
  """The file stem of a configuration's profile.

  >>> profile_name("vit", "full"), profile_name("vit", "full", "xla")
  ('vit-full', 'vit-full-xla')
  """
  return f"{model_key}-{mode}" + (f"-{variant}" if variant else "")


def _kernel_profile():
  """bench/kernel_profile.py: bench/ holds scripts, not a package, so import it by its folder."""
  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  import kernel_profile

  return kernel_profile


def profile_steps(advance, state, compiled, stem: str) -> dict:
  """Traces PROFILE_STEPS more steps and summarises their kernels; the row's compact profile.

  Writes ``<stem>.profile.json`` (the full summary), ``<stem>.hlo.txt.gz`` (the
  step's HLO, to re-summarise the trace later) and the trace under ``<stem>.trace/``.
  An error becomes the profile's ``error``: the timed figures stand without it.
  """
  import jax

  kp = _kernel_profile()

  def run():
    nonlocal state
    for _ in range(PROFILE_STEPS):
      state, m = advance(state)  # the state is donated: thread it through
    jax.block_until_ready((state, m))

  try:
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    trace = kp.capture(run, stem + ".trace")
    hlo = compiled.as_text()
    with gzip.open(stem + ".hlo.txt.gz", "wt") as f:
      f.write(hlo)
    summary = kp.summarize(kp.load_trace(trace), hlo, PROFILE_STEPS)
    summary.update(trace=trace, hlo_text=stem + ".hlo.txt.gz")
    with open(stem + ".profile.json", "w") as f:
      json.dump(summary, f, indent=1)
  except Exception as e:  # noqa: BLE001  (a failed trace must not lose the timed row)
    return {"error": f"{type(e).__name__}: {e}"[:300]}
  return dict(kp.compact(summary), path=stem + ".profile.json")


def repeat_check(advance, state, steps: int = 2) -> dict:
  """Runs ``steps`` steps twice from copies of ``state``: are the two results bit-identical?

  On a GPU, reductions with atomics (cuBLAS split-K, cuDNN attention's backward,
  scatters) may add in a different order each run; ``--xla_gpu_deterministic_ops``
  (the trainer's ``train.deterministic``) should rule that out.  Compares the loss
  and every floating leaf of the state (parameters, optimizer state, BatchNorm
  statistics); ``max_abs_diff`` is over all of them.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  def run():
    st = jax.tree.map(jnp.copy, state)  # the step donates its state: never the caller's
    for _ in range(steps):
      st, m = advance(st)
    leaves = [x for x in jax.tree.leaves((st, m["loss"]))
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return [np.asarray(jax.device_get(x), np.float64) for x in leaves]

  a, b = run(), run()
  diff = max(float(np.abs(x - y).max(initial=0.0)) for x, y in zip(a, b))
  equal = all(np.array_equal(x, y) for x, y in zip(a, b))
  return {"steps": steps, "bit_identical": equal, "max_abs_diff": diff}


def forward_step(model):
  """``(state, batch, frozen) -> {"loss"}``: the forward pass and loss of a train step, no gradients.

  ``frozen``: weights already cast, used in place of the state's (as the train step does).
  """
  import jax
  import jax.numpy as jnp
  import optax

  from ftjax.tree import flatten, unflatten

  def forward(state, batch, frozen):
    variables = {"params": unflatten({**flatten(state.params), **frozen})}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, batch["image"], train=True)
    labels = jax.nn.one_hot(batch["label"], NUM_CLASSES, dtype=jnp.float32)
    return {"loss": optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()}

  return forward


def build_step(model_key: str, mode: str, arch: dict, mesh, image_size: int, total_steps: int,
               abstract: bool = False):
  """The bench's step of ``model_key:mode`` on ``mesh``: ``(step_fn, state, frozen, model, arch)``.

  ``arch``: the model's arch dict, returned as built (a frozen ResNet backbone gets
  ``frozen_bn``, as the trainer builds it).  The state is random-initialised and on
  the mesh's device, or with ``abstract`` ShapeDtypeStructs there (``jax.eval_shape``:
  for compiling without running, bench/gpu_aot.py).  The train step is the trainer's
  (``JitRunner.compile``, state donated), called as ``step_fn(state, batch, frozen)``:
  ``frozen`` holds the frozen weights cast to bf16 once, as the trainer casts them
  (``train.frozen_cast_paths``); the bench-only arch key ``"frozen_cast": false``
  leaves them out (every step casts them itself).  ``forward`` is
  :func:`forward_step` jitted (the state is only read: no donation, no copy of it),
  every weight frozen.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from ftjax import models, optim, train

  family = MODELS[model_key][0]
  use_casts = arch.get("frozen_cast", True)
  arch = {k: v for k, v in arch.items() if k != "frozen_cast"}
  trains_bn = family == "resnet" and mode not in ("head_only", "forward")
  if family == "resnet" and not trains_bn:
    arch = dict(arch, frozen_bn=True)  # what the trainer builds for a frozen backbone
  model, _ = models.create(family, arch, num_classes=NUM_CLASSES, image_size=image_size,
                           dtype=jnp.bfloat16)
  cfg = optimizer_config(mode)
  if mode == "lora":
    from ftjax import lora

    model = lora.LoraModel(model, lora.LoraSpec(rank=LORA_RANK))
    cfg["param_groups"] = lora.PARAM_GROUPS
  init = lambda: models.init_variables(model, image_size)
  variables = jax.eval_shape(init) if abstract else init()
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = optim.make_optimizer(params, cfg, family=family, total_steps=total_steps)
  runner = train.JitRunner(mesh)
  if abstract:  # one device: every leaf whole on it (put_state without shard rules)
    state = jax.eval_shape(lambda p, b: _state(p, b, tx), params, batch_stats)
    whole = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state)
  else:
    state = runner.put_state(_state(params, batch_stats, tx))
  trainable = () if mode == "forward" else train.trainable_paths(optim.trainable_mask(state.params, cfg))
  opts = train.StepOptions(num_classes=NUM_CLASSES, update_batch_stats=trains_bn)
  if mode == "forward":
    step_fn = jax.jit(forward_step(model))
  else:
    step_fn = runner.compile(functools.partial(train.train_step, model=model, tx=tx,
                                               trainable=trainable), opts)
  casts = {}
  if use_casts:
    casts = train.frozen_cast_paths(model, state.params, state.batch_stats,
                                    (image_size, image_size, 3), opts)
    trains = set(trainable)
    casts = {p: d for p, d in casts.items() if p not in trains}
  if abstract:
    frozen = jax.eval_shape(lambda p: train.cast_frozen(p, casts), state.params)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), frozen)
  else:
    frozen = runner.cast_frozen(state, casts)
  return step_fn, state, frozen, model, arch if use_casts else dict(arch, frozen_cast=False)


def run_one(model_key: str, mode: str, s: Settings, arch_overrides: dict | None = None,
            profile_dir: str | None = None, variant: str | None = None,
            check_repeat: bool = False) -> dict:
  """Compiles and times one configuration in this process; returns its JSON row.

  ``arch_overrides``: model options on top of the bench's (a lever such as the ViT's
  ``attention``), recorded in the row's ``arch``. ``profile_dir``: after the timed
  steps, trace a few more into it (:func:`profile_steps`, the file named by
  ``variant`` too) and put the summary's totals in the row's ``profile``.
  ``check_repeat``: before that, :func:`repeat_check` into the row's ``repeat``.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from ftjax import metrics

  family, arch, smoke_arch, _, _ = MODELS[model_key]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  step_fn, state, frozen, _, arch = build_step(model_key, mode, dict(smoke_arch if s.smoke else arch,
                                                                     **(arch_overrides or {})),
                                               mesh, s.image_size, total_steps=1 + s.warmup + s.steps)
  kx, ky = jax.random.split(jax.random.key(1))
  batch = jax.device_put(
      {"image": jax.random.normal(kx, (s.batch, s.image_size, s.image_size, 3), jnp.float32),
       "label": jax.random.randint(ky, (s.batch,), 0, NUM_CLASSES)},
      NamedSharding(mesh, P("data")))

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, frozen)
  compiled = lowered.compile()
  if mode == "forward":
    advance = lambda state: (state, compiled(state, batch, frozen))
  else:
    advance = lambda state: compiled(state, batch, frozen)
  state, m = advance(state)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(s.warmup):
    state, m = advance(state)
  jax.block_until_ready((state, m))
  t0 = time.perf_counter()
  for _ in range(s.steps):  # no host work in between: the device queue stays full
    state, m = advance(state)
  jax.block_until_ready((state, m))
  dt = (time.perf_counter() - t0) / s.steps
  loss = float(jax.device_get(m["loss"]))

  device = jax.devices()[0]
  peak = s.peak_tflops * 1e12 if s.peak_tflops else metrics.device_peak_flops(device)
  flops = metrics.step_flops(lowered)  # the program as lowered: the GEMMs are not yet library calls
  per_image = analytic_flops_per_image(model_key, mode, s)
  stats = device.memory_stats() or {}  # before any profiling: the step's peak alone
  # The timm name it is compared with; a smoke model is compared with nothing.
  name = f"{family}-{arch['variant']}" if s.smoke else MODELS[model_key][3]
  row = dict(
      framework="ftjax", key=model_key, model=name, arch=arch, mode=mode, bf16=True,
      batch=s.batch, image_size=s.image_size, steps=s.steps, step_ms=round(dt * 1e3, 2),
      img_s=round(s.batch / dt, 1), compile_s=round(compile_s, 1), loss=loss,
      gflop_per_image_xla=None if flops is None else round(flops / s.batch / 1e9, 3),
      mfu_xla=metrics.mfu(flops, 1 / dt, 1, peak),
      mfu_analytic=metrics.mfu(per_image and per_image * s.batch, 1 / dt, 1, peak),
      peak_bytes=stats.get("peak_bytes_in_use"), xla_bytes=(metrics.step_memory(compiled) or {}).get("peak"),
      device=device.device_kind, platform=device.platform, jax=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""))
  if check_repeat and mode != "forward":
    row["repeat"] = repeat_check(advance, state)  # on copies: `state` stays for the profile
  if profile_dir:
    # The timed row first: should the tracer crash or hang this process, the parent keeps it.
    print(json.dumps(row), flush=True)
    row["profile"] = profile_steps(advance, state, compiled,
                                   os.path.join(profile_dir, profile_name(model_key, mode, variant)))
  return row


# --------------------------------------------------------------------------- orchestration


def _json_lines(text: str) -> list[dict]:
  rows = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("{"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def _emit(row: dict, out) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if out:
    out.write(line + "\n")
    out.flush()


def _child_args(s: Settings) -> list[str]:
  args = ["--batch", str(s.batch), "--image-size", str(s.image_size), "--steps", str(s.steps),
          "--warmup", str(s.warmup)]
  if s.smoke:
    args.append("--smoke-models")
  if s.peak_tflops:
    args += ["--peak-tflops", str(s.peak_tflops)]
  return args


def _run_child(cmd: list[str], env: dict, timeout: float | None) -> tuple[str, str | None]:
  """``(stdout, error)`` of a child process: error None on success, else its exit code and last
  stderr line, or the timeout; what it printed before a timeout is kept."""
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    stdout = e.stdout or ""
    return stdout.decode() if isinstance(stdout, bytes) else stdout, f"timed out after {timeout:.0f} s"
  if p.returncode:
    return p.stdout, f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or ["no output"])[-1][-300:]
  return p.stdout, None


def run_isolated(model_key: str, mode: str, s: Settings, timeout: float,
                 variant: tuple[str, str, dict] | None = None, profile_dir: str | None = None,
                 check_repeat: bool = False) -> dict:
  """One configuration in a fresh process (its own peak memory); an error becomes a row.

  ``variant``: (name, XLA flags added to ``XLA_FLAGS`` for this process, arch overrides),
  a lever to compare. ``profile_dir``: profile it there after the timed steps;
  ``check_repeat``: check that two repeats of two steps agree bit for bit.
  """
  cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{model_key}:{mode}", *_child_args(s)]
  if profile_dir:
    cmd += ["--profile-dir", profile_dir] + (["--variant-name", variant[0]] if variant else [])
  if check_repeat:
    cmd.append("--check-repeat")
  env = dict(os.environ)
  base = dict(framework="ftjax", key=model_key, model=MODELS[model_key][3], mode=mode)
  if variant:
    base["variant"] = variant[0]
    if variant[1]:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {variant[1]}".strip()
    if variant[2]:
      cmd += ["--arch-json", json.dumps(variant[2])]
  stdout, failed = _run_child(cmd, env, timeout)
  rows = _json_lines(stdout)
  if rows and failed and profile_dir and "profile" not in rows[-1]:
    row = dict(rows[-1], profile={"error": f"{failed} (while profiling)"})  # timed, then lost
  elif failed or not rows:
    return dict(base, error=failed or "exit 0: no JSON row")
  else:
    row = rows[-1]
  return {**row, "variant": variant[0]} if variant else row


def run_baseline(path: str, models: list[str], s: Settings, out, timeout: float | None) -> list[dict]:
  """Runs timm_baseline.py (its own process: torch must be done with the GPU before jax starts)."""
  env = dict(os.environ, BATCH=str(s.batch), STEPS=str(s.steps))
  stdout, error = _run_child([sys.executable, path, *models], env, timeout)
  rows = _json_lines(stdout)
  for row in rows:
    _emit(row, out)
  if error:
    _emit(dict(framework="torch", error=f"timm baseline {error}"), out)
  return rows


def _timm_row(baseline: list[dict], timm_name: str, mode: str, compiled: bool) -> dict | None:
  for row in baseline:
    if (row.get("model"), row.get("mode"), row.get("compiled")) == (timm_name, mode, compiled):
      return row
  return None


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return "n/a" if x is None else format(x * scale, spec)


def ratio_table(ours: list[dict], baseline: list[dict]) -> str:
  """The issue's table: each ftjax row against its timm row, the goals, MFU and peak memory."""
  head = (f"{'model':<22}{'mode':<20}{'ftjax img/s':>12}{'timm ref':>22}{'timm img/s':>11}"
          f"{'ratio':>7}{'goal':>6}{'met':>5}{'MFU xla':>9}{'MFU anl':>9}{'peak GiB':>9}{'xla GiB':>9}")
  lines = [head, "-" * len(head)]
  by_key = {(r["model"], r["mode"], r.get("variant")): r for r in ours}
  for r in ours:
    key = r["key"]
    mode = f"{r['mode']}[{r['variant']}]" if r.get("variant") else r["mode"]
    ref_mode, compiled = REFERENCE.get(r["mode"], (None, None))
    ref = _timm_row(baseline, r["model"], ref_mode, compiled) if ref_mode else None
    ref_name = f"{ref_mode} {'compiled' if compiled else 'eager'}" if ref_mode else "-"
    if "error" in r:
      lines.append(f"{r['model']:<22}{mode:<20}  error: {r['error']}")
      continue
    ratio = r["img_s"] / ref["img_s"] if ref and ref.get("img_s") else None
    goal = GOALS.get((key, r["mode"])) if r["model"] == MODELS[key][3] else None  # not for smoke models
    met = "-" if goal is None or ratio is None else ("yes" if ratio >= goal else "NO")
    gib = 1 / 2**30
    lines.append(
        f"{r['model']:<22}{mode:<20}{r['img_s']:>12.1f}{ref_name:>22}"
        f"{_fmt(ref and ref.get('img_s'), '.1f'):>11}{_fmt(ratio, '.3f'):>7}"
        f"{_fmt(goal, '.2f'):>6}{met:>5}{_fmt(r.get('mfu_xla'), '.1f', 100):>9}"
        f"{_fmt(r.get('mfu_analytic'), '.1f', 100):>9}{_fmt(r.get('peak_bytes'), '.3f', gib):>9}"
        f"{_fmt(r.get('xla_bytes'), '.3f', gib):>9}")
  for model, variant in dict.fromkeys((r["model"], r.get("variant")) for r in ours):
    head_only, fwd, full = (by_key.get((model, m, variant)) for m in ("head_only", "forward", "full"))
    name = f"{model}[{variant}]" if variant else model
    if head_only and fwd and "error" not in head_only and "error" not in fwd:
      x = head_only["step_ms"] / fwd["step_ms"]
      gflop = [_fmt(r["gflop_per_image_xla"], ".3f") for r in (head_only, fwd)]
      lines.append(f"{name}: head-only step / forward step {x:.3f} (goal <= 1.05: "
                   f"{'yes' if x <= 1.05 else 'NO'}); XLA GFLOP/image {gflop[0]} vs {gflop[1]}")
    lora = by_key.get((model, "lora", variant))
    for small, what_mode in ((head_only, "head-only"), (lora, "LoRA")):
      if not (small and full and "error" not in small and "error" not in full):
        continue
      for field, what in (("peak_bytes", "device peak"), ("xla_bytes", "XLA buffers")):
        if small.get(field) and full.get(field):
          x = small[field] / full[field]
          lines.append(f"{name}: {what_mode} / full {what} memory {x:.3f} (goal <= 0.5: "
                       f"{'yes' if x <= 0.5 else 'NO'})")
  devices = {r.get("device") for r in ours if r.get("device")}
  gpus = {r.get("gpu") for r in baseline if r.get("gpu")}
  lines.append(f"ftjax on {', '.join(sorted(devices)) or '?'}; timm on {', '.join(sorted(gpus)) or 'n/a'}")
  if not baseline:
    lines.append("no timm baseline in this call: no ratios (run with --baseline or --baseline-json)")
  return "\n".join(lines)


def run_label(model_key: str, mode: str, variant: str | None = None) -> str:
  """A run as ``--runs`` and ``--profile-runs`` spell it.

  >>> run_label("vit", "full"), run_label("vit", "full", "xla")
  ('vit:full', 'vit:full[xla]')
  """
  return f"{model_key}:{mode}" + (f"[{variant}]" if variant else "")


def profile_text(row: dict) -> str:
  """A profiled row's kernel table: the full summary its file holds, else the row's totals."""
  profile = row["profile"]
  summary = profile
  if profile.get("path"):
    try:
      with open(profile["path"]) as f:
        summary = json.load(f)
    except (OSError, json.JSONDecodeError):
      pass
  label = run_label(row["key"], row["mode"], row.get("variant"))
  return _kernel_profile().format_summary(summary, f"kernels of {row['model']} {label}")


def lora_available() -> bool:
  return importlib.util.find_spec("ftjax.lora") is not None


def plan(models: list[str], modes: list[str]) -> list[tuple[str, str]]:
  """The (model, mode) pairs to run, the issue's goals first: a run cut short keeps what matters.

  >>> plan(["resnet", "vit"], list(MODES))[:5]
  [('vit', 'full'), ('vit', 'head_only'), ('vit', 'forward'), ('resnet', 'full'), ('resnet', 'head_only')]
  """
  # LoRA: ftjax.lora's default targets are the ViT's dense projections.
  pairs = [(m, x) for m in models for x in modes if x != "lora" or MODELS[m][0] == "vit"]
  return sorted(pairs, key=lambda p: PRIORITY.index(p) if p in PRIORITY else len(PRIORITY))


PRIORITY = [("vit", "full"), ("vit", "head_only"), ("vit", "forward"), ("resnet", "full"),
            ("resnet", "head_only"), ("vit", "layer_decay"), ("resnet", "layer_decay"),
            ("vit", "lora"), ("resnet", "forward")]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="vit,resnet", help="comma list of: " + ", ".join(MODELS))
  ap.add_argument("--modes", default="full,head_only,layer_decay,lora,forward",
                  help="comma list of: " + ", ".join(MODES))
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=4)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny CPU run: ViT test variant and ResNet-18, batch 4, 64 px, 2 steps")
  ap.add_argument("--smoke-models", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--peak-tflops", type=float, help="device peak for MFU when not in the table")
  ap.add_argument("--baseline", help="timm_baseline.py to run first, in this call")
  ap.add_argument("--baseline-json", help="JSON lines of timm_baseline.py from this call")
  ap.add_argument("--out", help="also append every JSON line here")
  ap.add_argument("--timeout", type=float, default=240, help="seconds per configuration at most")
  ap.add_argument("--budget", type=float, default=None,
                  help="seconds for the whole call: no configuration starts after it, the table still prints")
  ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                  help="FLAGS added to XLA_FLAGS: run as model:mode[NAME] in --runs, else after the "
                       "plain runs on each of --variant-configs")
  ap.add_argument("--variant-configs", default="vit:full,resnet:full")
  ap.add_argument("--arch-variant", action="append", default=[], metavar="NAME=JSON",
                  help="model options of a lever, e.g. 'cudnn={\"attention\": \"cudnn\"}'; "
                       "run as model:mode[NAME] in --runs, else after the plain runs on vit:full")
  ap.add_argument("--runs", help="the configurations in this order instead of --models x --modes, "
                                 "comma-separated model:mode or model:mode[NAME] (NAME an "
                                 "--arch-variant or a --variant)")
  ap.add_argument("--profile-runs", default="",
                  help="comma list of the runs (labels as in --runs) whose kernels are profiled "
                       "after their timed steps; default none")
  ap.add_argument("--profile-dir", help="where profiles go (a child given it profiles itself); "
                                        "default /tmp/ftjax-profile when --profile-runs is given")
  ap.add_argument("--repeat-runs", default="",
                  help="comma list of the runs (labels as in --runs) that also check, after their "
                       "timed steps, that two repeats of two steps agree bit for bit")
  ap.add_argument("--check-repeat", action="store_true", help=argparse.SUPPRESS)  # the child's
  ap.add_argument("--arch-json", help=argparse.SUPPRESS)  # the child's arch overrides
  ap.add_argument("--variant-name", help=argparse.SUPPRESS)  # the child's variant, to name its profile
  ap.add_argument("--table", help="only print the ratio table of a JSON-lines file (timm and ftjax rows)")
  ap.add_argument("--one", help=argparse.SUPPRESS)  # model:mode, in this process
  a = ap.parse_args(argv)
  t0 = time.perf_counter()
  s = Settings(a.batch, a.image_size, a.steps, a.warmup, a.smoke_models, a.peak_tflops)
  if a.smoke:
    s = Settings(batch=4, image_size=64, steps=2, warmup=1, smoke=True, peak_tflops=a.peak_tflops)
  if a.one:
    overrides = json.loads(a.arch_json) if a.arch_json else None
    model_key, mode = a.one.split(":")
    print(json.dumps(run_one(model_key, mode, s, overrides, a.profile_dir, a.variant_name,
                             a.check_repeat)), flush=True)
    return 0
  if a.table:
    with open(a.table) as f:
      rows = _json_lines(f.read())
    print(ratio_table([r for r in rows if r.get("framework") == "ftjax"],
                      [r for r in rows if r.get("framework") != "ftjax"]))
    return 0

  models = [m for m in a.models.split(",") if m]
  modes = [m for m in a.modes.split(",") if m]
  for name, known in ((models, MODELS), (modes, MODES)):
    bad = [x for x in name if x not in known]
    if bad:
      ap.error(f"unknown {bad}; known: {list(known)}")
  if "lora" in modes and not lora_available():
    print("lora: skipped, ftjax/lora.py does not exist", file=sys.stderr)
    modes.remove("lora")
  out = open(a.out, "a") if a.out else None
  baseline = []
  if a.baseline_json:
    with open(a.baseline_json) as f:
      baseline = _json_lines(f.read())
  variants = [tuple(v.split("=", 1)) for v in a.variant]
  if any(len(v) != 2 for v in variants):
    ap.error("--variant takes NAME=FLAGS")
  arch_variants = {}
  for v in a.arch_variant:
    name, _, overrides = v.partition("=")
    try:
      arch_variants[name] = json.loads(overrides)
    except json.JSONDecodeError as e:
      ap.error(f"--arch-variant {name}: JSON after '=': {e}")
  flags = dict(variants)
  both = set(flags) & set(arch_variants)  # one lever of model options and XLA flags together
  if both and not a.runs:
    ap.error(f"{sorted(both)}: a NAME that is both an --arch-variant and a --variant runs only "
             "through --runs")
  in_runs = set()
  if a.runs:
    runs = []
    for c in a.runs.split(","):
      m = re.fullmatch(r"(\w+):(\w+)(?:\[(.+)\])?", c.strip())
      known = m and m[1] in MODELS and m[2] in MODES and (not m[3] or m[3] in {**flags, **arch_variants})
      if not known:
        ap.error(f"--runs: {c!r} is not model:mode or model:mode[NAME] with NAME an --arch-variant "
                 "or a --variant")
      runs.append((m[1], m[2], m[3] and (m[3], flags.get(m[3], ""), arch_variants.get(m[3], {}))))
      in_runs.add(m[3])
  else:
    runs = [(m, x, None) for m, x in plan(models, modes)]
    runs += [("vit", "full", (name, "", o)) for name, o in arch_variants.items()]
  if a.baseline:
    # Most of the budget at most: a hung torch.compile must leave time for ours.
    baseline += run_baseline(a.baseline, models, s, out, a.budget and 0.6 * a.budget)
  runs += [(*c.split(":"), (v[0], v[1], {})) for v in variants if v[0] not in in_runs
           for c in a.variant_configs.split(",") if c]
  to_profile = {c.strip() for c in a.profile_runs.split(",") if c.strip()}
  to_repeat = {c.strip() for c in a.repeat_runs.split(",") if c.strip()}
  labels = {run_label(m, x, v and v[0]) for m, x, v in runs}
  for option, chosen in (("--profile-runs", to_profile), ("--repeat-runs", to_repeat)):
    for c in sorted(chosen - labels):
      print(f"{option}: {c} is none of the runs, skipped", file=sys.stderr)
  profile_dir = a.profile_dir or "/tmp/ftjax-profile"
  ours = []
  for model_key, mode, variant in runs:
    left = a.timeout if a.budget is None else min(a.timeout, a.budget - (time.perf_counter() - t0))
    if left < 30:
      print(f"{model_key}:{mode}: skipped, {left:.0f} s of the budget left", file=sys.stderr)
      continue
    label = run_label(model_key, mode, variant and variant[0])
    row = run_isolated(model_key, mode, s, left, variant,
                       profile_dir if label in to_profile else None, label in to_repeat)
    _emit(row, out)
    ours.append(row)
  print(ratio_table(ours, baseline), flush=True)
  for row in ours:
    if row.get("repeat"):
      r = row["repeat"]
      print(f"repeat {run_label(row['key'], row['mode'], row.get('variant'))}: {r['steps']} steps twice, "
            f"bit-identical {'yes' if r['bit_identical'] else 'NO'} (max abs diff {r['max_abs_diff']:.3g}); "
            f"XLA_FLAGS {row.get('xla_flags') or '(none)'}", flush=True)
  for row in ours:
    if row.get("profile"):
      print("\n" + profile_text(row), flush=True)
  if out:
    out.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
