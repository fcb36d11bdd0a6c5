"""What XLA makes of a bench train step for an H100, compiled here without one (deviceless AOT).

Builds a configuration of ``bench/train_throughput.py`` (same model, optimizer,
state and ``ftjax.train.train_step``) with abstract state and batch placed on a
compile-only H100 (``jax.experimental.topologies.get_topology_desc`` with an XLA
``GpuTargetConfig``), compiles it for CUDA on the CPU, and summarises the
optimized GPU HLO statically with ``bench/kernel_profile.py``'s parser: kernels
per category and phase, the custom-call targets (cuBLAS GEMMs with their
epilogue, cuDNN attention and convolutions), the bytes each elementwise,
reduction and copy kernel writes (its output shape: a rough traffic measure),
and XLA's buffer assignment (``compiled.memory_analysis()``).  A lever that
leaves this summary unchanged will not change the step on the device either.

Needs a jax with the CUDA plugin (for its compiler, ptxas and libdevice), never a
GPU; keep the dev venv's CPU jax apart::

    python3 -m venv /tmp/aotvenv && . /tmp/aotvenv/bin/activate
    pip install -e . 'jax[cuda13]==0.10.2'
    # the plain ViT-B/16 and ResNet-50 full steps, batch 256 (10-15 s each on 2 cores)
    python bench/gpu_aot.py --runs vit:full,resnet:full
    # a lever: XLA flags and model options, the HLO kept to read or diff
    python bench/gpu_aot.py --runs vit:full --xla-flags=--xla_gpu_dot_merger_threshold_mb=1024 \\
        --arch-json '{"gelu_approximate": true}' --dump /tmp/aot-merge
    # what cuBLAS would get if the autotuner chose it for every GEMM (see below)
    python bench/gpu_aot.py --runs vit:full --xla-flags=--xla_gpu_enable_triton_gemm=false

What it cannot tell.  No timings: nothing runs.  No autotuning: without a device
XLA takes its default choice where it would measure.  Every matmul then stays a
Triton GEMM fusion with a default tiling, while on the device the autotuner may
replace a fusion by a cuBLAS(Lt) call (only the fusion's own contents: an
elementwise kernel fused separately stays separate), so the GEMM kernels' kind
and tiling here are not the device's; ``--xla_gpu_enable_triton_gemm=false``
shows the cuBLAS side (and its epilogue fusions).  cuDNN graphs (attention,
convolutions) are emitted as custom calls with their configuration, built only
when the step first runs: what is decided then (cuDNN's algorithm, the
deterministic attention backward that ``--xla_gpu_deterministic_ops`` asks for)
is not in the HLO.  The default Triton tiling can also fail where the
autotuner would have found one ("Couldn't find output tile sizes": ViT with
``attention="xla"``); compile such a run with Triton GEMMs off.  The XLA is the
local jax's, not necessarily the device's.  On the CPU, ViT's ``attention="auto"``
would resolve to XLA's path, so ViT runs get ``attention="cudnn"`` (what a GPU
resolves it to) unless the arch overrides say otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

# The CPU is the runtime; the H100 exists only as a compile target (set before jax loads).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# An H100 SXM 80GB (values as XLA's GpuTargetConfig proto spells them; runtime and cuDNN as
# the device session's CUDA 13 wheels). Only the compiler reads it.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 10
}
runtime_version {
  major: 13
  minor: 0
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# What the GPU's defaults resolve to, given explicitly: on the CPU they would resolve otherwise.
GPU_ARCH = {"vit": {"attention": "cudnn"}}
# Kernels counted per module kind, from the op_name of what they compute: the ViT's blocks share
# one trace (nn.jit), so every block's kernels carry encoderblock_0's name; per block is the
# count over the number of layers. ResNet: BatchNorm ("bn*") against convolutions ("conv*").
GROUPS = {"vit": r"encoderblock_\d+/([A-Za-z]+)", "resnet": r"/(bn|conv)\d*/"}

# Entry instructions that launch nothing: views, tuples, parameters, control flow (whose
# bodies are walked instead).
NO_KERNEL_OPS = frozenset({
    "parameter", "constant", "bitcast", "get-tuple-element", "tuple", "opt-barrier",
    "after-all", "add-dependency", "partition-id", "replica-id", "call", "while",
    "conditional", "async-start", "async-update", "async-done"})
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16}
TRAFFIC_CATEGORIES = ("elementwise", "reduction", "copy")


def _here_module(name: str):
  """A sibling script of bench/ (not a package) imported by its folder."""
  here = os.path.dirname(os.path.abspath(__file__))
  if here not in sys.path:
    sys.path.insert(0, here)
  return __import__(name)


# --------------------------------------------------------------------------- compiling


def compile_only_mesh(target_config: str = H100_TARGET_CONFIG):
  """A one-device mesh ("data") of a compile-only CUDA device described by ``target_config``."""
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(platform="cuda", target_config=target_config,
                                          topology="1x1x1")
  return topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("data",))


def build_step(model_key: str, mode: str, mesh, arch_overrides: dict | None = None,
               batch: int = 256, image_size: int = 224):
  """The bench's step of ``model_key:mode``, abstract: ``(jitted, args, model, arch)``.

  ``train_throughput.build_step`` with an abstract state (``jax.eval_shape`` in place of
  the random initialisation); the batch is ShapeDtypeStructs on ``mesh`` too.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  tt = _here_module("train_throughput")
  arch = {**tt.MODELS[model_key][1], **GPU_ARCH.get(model_key, {}), **(arch_overrides or {})}
  step, state, frozen, model, arch = tt.build_step(model_key, mode, arch, mesh, image_size,
                                                   total_steps=25, abstract=True)
  split = NamedSharding(mesh, P("data"))
  batch_spec = {"image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32,
                                              sharding=split),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)}
  return step, (state, batch_spec, frozen), model, arch


# --------------------------------------------------------------------------- the HLO, statically


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (a tuple's elements summed; layouts and tokens ignored).

  >>> shape_bytes("bf16[256,197,768]{2,1,0}"), shape_bytes("(f32[4]{0}, s8[16]{0})"), shape_bytes("f32[]")
  (77463552, 32, 4)
  """
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES.get(dtype, 0)
  return total


def kernel_instructions(hlo: dict, computation: str) -> list[str]:
  """Instructions of ``computation`` that launch work, with called bodies (call, while) walked.

  Fusions are walked no further: a fusion is one kernel (or one library call).
  """
  ins, out = hlo["instructions"], []
  for name in hlo["computations"].get(computation, ()):
    op = ins[name]["opcode"]
    if op in ("call", "while", "conditional", "async-start"):
      for callee in ins[name]["calls"]:
        out += kernel_instructions(hlo, callee)
    elif op not in NO_KERNEL_OPS:
      out.append(name)
  return out


def entry_name(hlo_text: str) -> str:
  """The entry computation's name in an HLO module's text."""
  m = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.M)
  if not m:
    raise ValueError("no ENTRY computation in the HLO text")
  return m[1]


def kernel_kind(hlo: dict, name: str) -> str:
  """A label finer than the category: a custom call's target (cuBLAS with its epilogue), a
  fusion's backend kind (``__triton_nested_gemm_fusion``), else the opcode and fusion kind.
  """
  ins = hlo["instructions"][name]
  if ins["opcode"] == "custom-call":
    epilogue = ins.get("epilogue")
    return ins["target"] + (f" epilogue={epilogue}" if epilogue else "")
  if ins["opcode"] == "fusion":
    return f"fusion {ins.get('backend_kind') or ins['kind']}"
  return ins["opcode"]


def _backend_details(hlo: dict, hlo_text: str) -> None:
  """Adds each instruction's GEMM epilogue and fusion backend kind, which the parser leaves out."""
  for line in hlo_text.splitlines():
    m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
    if not m or m[1] not in hlo["instructions"]:
      continue
    ins = hlo["instructions"][m[1]]
    epilogue = re.search(r'"epilogue":\s*"(\w+)"', line)
    kind = re.search(r'"fusion_backend_config":\s*\{"kind":\s*"([^"]+)"', line)
    ins["epilogue"] = epilogue and epilogue[1]
    ins["backend_kind"] = kind and kind[1]


def summarize_hlo(hlo_text: str, group: str | None = None) -> dict:
  """A static summary of an optimized GPU module: kernels, custom calls, bytes written.

  ``group``: a regex with one group over the kernels' ``op_name`` (e.g. the ViT's
  :data:`GROUPS`); kernels are then also counted per phase and value of it. A
  fusion of ops from several modules counts once, under the op_name
  ``kernel_profile.hlo_op_name`` picks for it.

  >>> s = summarize_hlo('''
  ... %c.1 (p: f32[4]) -> f32[4] {
  ...   %p = f32[4]{0} parameter(0)
  ...   ROOT %e = f32[4]{0} exponential(%p), metadata={op_name="jit(s)/jvp(M)/exp"}
  ... }
  ... ENTRY %m (x: f32[4], w: f32[4,4]) -> f32[4] {
  ...   %x = f32[4]{0} parameter(0)
  ...   %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%c.1
  ...   ROOT %g = (f32[4]{0}, s8[8]{0}) custom-call(%f, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"epilogue":"GELU"}}
  ... }''', group=r"jvp\((\w)\)")
  >>> s["kernels"], s["categories"], s["custom_calls"], s["bytes"]["elementwise"], s["groups"]
  (2, {'elementwise': 1, 'gemm': 1}, {'__cublas$lt$matmul epilogue=GELU': 1}, 16, {'forward M': {'elementwise': 1}})
  >>> s["operand_bytes"]["elementwise"]  # what its kernels are given to read: x, 16 bytes
  16
  """
  kp = _here_module("kernel_profile")
  hlo = kp.parse_hlo(hlo_text)
  _backend_details(hlo, hlo_text)
  names = kernel_instructions(hlo, entry_name(hlo_text))
  categories, phases, by_phase, kinds, calls = (collections.Counter() for _ in range(5))
  traffic, groups = collections.Counter(), collections.defaultdict(collections.Counter)
  reads = collections.Counter()
  for name in names:
    ins = hlo["instructions"][name]
    category = kp.hlo_category(hlo, name) or "other"
    phase = kp.hlo_phase(hlo, name)
    categories[category] += 1
    phases[phase] += 1
    by_phase[f"{phase}/{category}"] += 1
    kinds[kernel_kind(hlo, name)] += 1
    if ins["opcode"] == "custom-call":
      calls[kernel_kind(hlo, name)] += 1
    if category in TRAFFIC_CATEGORIES:
      traffic[category] += shape_bytes(ins["shape"])
      reads[category] += sum(shape_bytes(hlo["instructions"][o]["shape"])
                             for o in ins.get("operands", ()) if o in hlo["instructions"])
    m = group and re.search(group, kp.hlo_op_name(hlo, name) or "")
    if m:
      groups[f"{phase} {m[1]}"][category] += 1
  return dict(
      kernels=len(names), categories=dict(categories.most_common()),
      phases=dict(phases.most_common()), by_phase=dict(sorted(by_phase.items())),
      kinds=dict(kinds.most_common()), custom_calls=dict(calls.most_common()),
      bytes={c: traffic[c] for c in TRAFFIC_CATEGORIES},
      operand_bytes={c: reads[c] for c in TRAFFIC_CATEGORIES},
      groups={k: dict(v.most_common()) for k, v in sorted(groups.items())})


# --------------------------------------------------------------------------- one run


def compile_run(model_key: str, mode: str, mesh, arch_overrides: dict | None, batch: int,
                image_size: int, dump: str | None) -> dict:
  """Lowers and compiles one configuration for the compile-only device; its summary row."""
  from ftjax import metrics

  step, args, model, arch = build_step(model_key, mode, mesh, arch_overrides, batch, image_size)
  t0 = time.perf_counter()
  lowered = step.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text()
  row = dict(run=f"{model_key}:{mode}", arch=arch, layers=getattr(model, "num_layers", None),
             batch=batch, image_size=image_size, xla_flags=os.environ.get("XLA_FLAGS", ""),
             lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
             memory=metrics.step_memory(compiled), **summarize_hlo(text, GROUPS.get(model_key)))
  if dump:
    os.makedirs(dump, exist_ok=True)
    path = os.path.join(dump, f"{model_key}-{mode}.hlo.txt")
    with open(path, "w") as f:
      f.write(text)
    row["hlo_path"] = path
  return row


def _counts(counts: dict, per: int | None = None) -> str:
  """``{"gemm": 24, ...}`` as ``gemm 24, ...`` (divided by ``per`` when given)."""
  return ", ".join(f"{k} {v / per:g}" if per else f"{k} {v}" for k, v in counts.items())


def format_row(row: dict) -> str:
  """A short plain-text report of one run's summary."""
  gib = 2**30
  lines = [f"{row['run']} arch={json.dumps(row['arch'])} batch {row['batch']} "
           f"XLA_FLAGS={row['xla_flags'] or '(none)'}",
           f"  compile {row['compile_s']} s (lower {row['lower_s']} s); {row['kernels']} kernels"]
  lines.append("  by category: " + _counts(row["categories"]))
  lines.append("  by phase: " + _counts(row["phases"]))
  lines.append("  phase/category: " + _counts(row["by_phase"]))
  lines.append("  custom calls: " + (", ".join(f"{k} x{v}" for k, v in row["custom_calls"].items())
                                     or "none"))
  other = {k: v for k, v in row["kinds"].items() if k not in row["custom_calls"]}
  lines.append("  other kernels: " + ", ".join(f"{k} x{v}" for k, v in other.items()))
  written = row["bytes"].items()
  lines.append("  bytes written: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in written))
  given = row.get("operand_bytes", {}).items()
  lines.append("  operand bytes (what they read, at most): "
               + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in given))
  m = row.get("memory")
  if m:
    lines.append("  memory: " + ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in m.items()))
  per = row.get("layers")
  for key, counts in row["groups"].items():
    each = f"  (per layer: {_counts(counts, per)})" if per else ""
    lines.append(f"  {key}: {_counts(counts)}{each}")
  if row.get("hlo_path"):
    lines.append(f"  HLO: {row['hlo_path']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", default="vit:full", help="comma list of model:mode (as train_throughput)")
  ap.add_argument("--xla-flags", default="", help="added to XLA_FLAGS for these compiles")
  ap.add_argument("--arch-json", help="model options on top of the bench's (and GPU_ARCH's)")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--image-size", type=int, default=224)
  ap.add_argument("--target-config", help="a GpuTargetConfig text proto file instead of the H100's")
  ap.add_argument("--dump", help="a folder to write each run's optimized HLO text into")
  ap.add_argument("--json", action="store_true", help="print each run's summary as one JSON line")
  a = ap.parse_args(argv)
  if a.xla_flags:  # read once, when XLA first starts: before anything below touches jax
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {a.xla_flags}".strip()
  overrides = json.loads(a.arch_json) if a.arch_json else None
  target = H100_TARGET_CONFIG
  if a.target_config:
    with open(a.target_config) as f:
      target = f.read()
  mesh = compile_only_mesh(target)
  for run in filter(None, (r.strip() for r in a.runs.split(","))):
    model_key, _, mode = run.partition(":")
    row = compile_run(model_key, mode, mesh, overrides, a.batch, a.image_size, a.dump)
    print(json.dumps(row) if a.json else format_row(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
