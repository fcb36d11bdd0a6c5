"""Where the time of a compiled step goes, kernel by kernel: a profiler trace summarised (issue 6).

``capture`` runs a few already-compiled steps under ``jax.profiler.trace`` and
returns the Chrome trace it wrote; ``summarize`` turns that trace (and,
optionally, the compiled module's ``compiled.as_text()``) into per-step
milliseconds by category (GEMM, attention, convolution, elementwise and
reduction fusions, copies, memcpy/memset), by phase of the step (forward,
backward, the rest: optimizer update and checks) and for the top HLO ops;
``format_summary`` prints it as a short table.

    # re-read what a GPU session left: a trace and, optionally, the step's HLO text
    python bench/kernel_profile.py /tmp/ftjax-profile/vit-full.trace/plugins/profile/*/*.trace.json.gz \
        --hlo /tmp/ftjax-profile/vit-full.hlo.txt.gz --steps 3
    # or a summary JSON that train_throughput.py wrote
    python bench/kernel_profile.py /tmp/ftjax-profile/vit-full.profile.json

What the trace is assumed to look like (only the CPU form was seen when this
was written; check the GPU form against the first real trace, ``--dump-names``
lists what was found):

* Chrome trace-event JSON, ``{"traceEvents": [...]}``, as jax writes it to
  ``<log_dir>/plugins/profile/<timestamp>/<host>.trace.json.gz``. Complete
  events are ``ph == "X"`` with ``pid``, ``tid``, ``name``, ``ts`` and ``dur``
  in microseconds, and ``args`` whose values are strings. ``ph == "M"`` events
  name processes (``process_name``: ``/host:CPU``, ``/device:GPU:0``) and
  threads (``thread_name``). Anything else (the trailing ``{}``, counters) is
  ignored, as is an event without a number in ``ts`` or ``dur``.
* GPU kernels (CUPTI) are in a process whose name starts with ``/device:``, one
  thread per CUDA stream named ``Stream #N(...)``. The same process can hold
  derived lines (``XLA Ops``, ``XLA Modules``, ``Steps``, ...) that repeat the
  kernels' time per op: when any thread's name starts with ``Stream`` only
  those threads count, otherwise every thread but the known derived lines.
* A kernel event's name is the CUDA kernel (``nvjet_...``, ``sm90_xmma_...``,
  ``cudnn_...``, ``loop_multiply_fusion``, ``triton_...``; possibly mangled);
  memory operations are named like ``MemcpyD2D`` or ``Memset``. Its ``args``
  may hold ``hlo_op`` (the HLO instruction, e.g. ``fusion.123``) and
  ``hlo_module``; when ``hlo_op`` is absent, an ``hlo_op=NAME`` inside any
  other string argument (an annotation) is used, then an HLO instruction whose
  name sanitised as XLA names kernels (``loop_add_fusion.3`` ->
  ``loop_add_fusion_3``) is the kernel's, and last the kernel name itself.
  jax 0.11.2 on an H100 (session 8) runs most of a step as command buffers
  (CUDA graphs) and tags each kernel with the buffer (``command_buffer_144``,
  1,148 kernels), not an HLO instruction: with the HLO text, such a name is
  read as absent (the kernel's fusion name, else the kernel name, keys it).
* No device process (the CPU), or one without events (no CUPTI): the host's
  XLA op events are used, those with an ``hlo_op`` argument, and the result
  says ``"source": "host"``. CPU thunks
  run on several threads at once, so there the summed time can exceed the span.
* The traced span may carry launch gaps that the timed steps do not have:
  compare ``busy_ms`` with the timed step, ``span_ms`` only loosely.

Categories are decided from the HLO instruction when the op is found in the
HLO text (custom-call target, the opcodes inside a fusion, the fusion kind),
else from keywords in the kernel name, else ``other``; a memcpy/memset event is
``memcpy`` whatever its op. Phases come from the instruction's ``op_name``
metadata (a fusion without it: the ops fused into it): ``transpose(`` is JAX's
backward pass, ``jvp(`` its forward pass, any other ``jit(...)/`` path ``rest``
(the optimizer update, gradient norm, finiteness checks and the state select; a
step without gradients is all ``rest``); no path, or no HLO, ``unknown``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Callable

CATEGORIES = ("gemm", "attention", "conv", "elementwise", "reduction", "copy", "memcpy", "other")
PHASES = ("forward", "backward", "rest", "unknown")
TOP_OPS = 25
HLO_CHARS = 160

# Lines a device plane can carry besides its streams: they re-list the kernels' time per op,
# module or step, so counting them would count a kernel twice (tsl/profiler xplane_schema).
DERIVED_LINES = frozenset({
    "Steps", "XLA Modules", "XLA Ops", "Async XLA Ops", "TensorFlow Ops", "Framework Ops",
    "TensorFlow Name Scope", "Framework Name Scope", "Launch Stats", "Source code",
    "Host Offload Ops", "_counters_", "Sparse Core Steps", "Sparse Core Modules",
    "Sparse Core Ops"})

MEMCPY = re.compile(r"memcpy|memset", re.I)
# Kernel-name keywords, first match wins: attention before conv ("flash_fprop"), conv before
# GEMM (cuDNN's "implicit_gemm" convolutions), reduction before copy before elementwise.
KERNEL_KEYWORDS = (
    ("attention", re.compile(r"fmha|flash|attention|sdpa", re.I)),
    ("conv", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad", re.I)),  # not "convert"
    ("gemm", re.compile(r"gemm|nvjet|cutlass|matmul|cublas|xmma|dot", re.I)),
    ("reduction", re.compile(r"reduc|softmax|norm", re.I)),
    ("copy", re.compile(r"transpose|copy|nchw|nhwc", re.I)),
    ("elementwise", re.compile(r"fusion|loop_|wrapped_|elementwise|convert|broadcast", re.I)),
)
REDUCE_OPS = frozenset({"reduce", "reduce-window", "scatter", "select-and-scatter", "sort"})
# Opcodes that only move or reshape data: a fusion of nothing else is a copy/transpose kernel.
MOVE_OPS = frozenset({
    "parameter", "constant", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
    "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "reverse", "tuple",
    "get-tuple-element", "iota", "bitcast-convert", "copy-start", "copy-done"})
COPY_OPS = frozenset({"copy", "transpose", "copy-start", "copy-done", "concatenate", "pad",
                      "slice", "dynamic-slice", "dynamic-update-slice", "reverse"})


# --------------------------------------------------------------------------- capture


def capture(run_steps: Callable[[], object], log_dir: str) -> str:
  """Runs ``run_steps()`` under ``jax.profiler.trace(log_dir)``; returns the trace it wrote.

  ``run_steps`` executes a few already-compiled steps and blocks until they are
  done (``jax.block_until_ready``): what is still queued when the trace stops is
  not in it. The path is ``<log_dir>/plugins/profile/<timestamp>/<host>.trace.json.gz``,
  or the ``<host>.xplane.pb`` beside it where jax wrote no JSON (:func:`load_trace` reads both).
  """
  import jax

  pattern = os.path.join(log_dir, "plugins", "profile", "*", "*.{}")
  before = set(glob.glob(pattern.format("*")))
  with jax.profiler.trace(log_dir):
    run_steps()
  for kind in ("trace.json.gz", "xplane.pb"):  # the JSON when jax wrote it, else its source
    written = sorted(set(glob.glob(pattern.format(kind))) - before, key=os.path.getmtime)
    if written:
      return written[-1]
  raise FileNotFoundError(f"jax.profiler.trace wrote neither {pattern.format('trace.json.gz')} "
                          "nor an .xplane.pb")


def xplane_to_trace(path: str) -> dict:
  """An ``.xplane.pb`` (the profiler's own record) as the Chrome trace JSON jax derives from it.

  A plane becomes a process named as the plane (``/device:GPU:0``), a line a thread
  named as the line (``Stream #7(...)``), an event an ``X`` event in microseconds
  whose ``args`` are the event's stats (``hlo_op``, ``hlo_module``, ...) as strings.
  For a jax that writes no ``.trace.json.gz``.
  """
  from jax.profiler import ProfileData

  events = []
  for pid, plane in enumerate(ProfileData.from_file(path).planes):
    events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": plane.name}})
    for tid, line in enumerate(plane.lines):
      events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                     "args": {"name": line.name}})
      for ev in line.events:
        events.append({"ph": "X", "pid": pid, "tid": tid, "name": ev.name, "ts": ev.start_ns / 1e3,
                       "dur": ev.duration_ns / 1e3, "args": {k: str(v) for k, v in ev.stats}})
  return {"traceEvents": events}


def read_text(path: str) -> str:
  """A text file, gzipped or not (by its name)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def load_trace(path: str) -> dict:
  """The Chrome trace JSON at ``path`` (``.json`` or ``.json.gz``; an ``.xplane.pb`` converted)."""
  if path.endswith(".xplane.pb"):
    return xplane_to_trace(path)
  return json.loads(read_text(path))


# --------------------------------------------------------------------------- HLO text


def _hlo_opcode(rest: str) -> str:
  """The opcode after an instruction's '=': the first ``name(`` past the shape.

  >>> _hlo_opcode("bf16[8,4]{1,0} fusion(%p.1), kind=kLoop")
  'fusion'
  >>> _hlo_opcode("(bf16[8]{0}, s8[64]{0}) custom-call(a, b), custom_call_target=\\"x\\"")
  'custom-call'
  """
  m = re.search(r"(?:^|[\s)])([a-z][a-z0-9\-]*)\(", rest)
  return m[1] if m else ""


def _hlo_operands(rest: str, opcode: str) -> list[str]:
  """The operand names of an instruction (inside its opcode's parentheses).

  >>> _hlo_operands("bf16[8,4]{1,0} fusion(%p.1, %get-tuple-element.2), kind=kLoop", "fusion")
  ['p.1', 'get-tuple-element.2']
  """
  m = re.search(re.escape(opcode) + r"\(([^)]*)\)", rest) if opcode else None
  return re.findall(r"%?([\w.\-]+)", m[1]) if m else []


def _hlo_shape(rest: str) -> str:
  """The result shape that starts an instruction's right-hand side (a tuple kept whole)."""
  if not rest.startswith("("):
    return rest.split(" ", 1)[0]
  depth = 0
  for i, c in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      return rest[:i + 1]
  return rest


def parse_hlo(text: str) -> dict:
  """Instructions of an HLO module's text by name: opcode, shape, fusion kind, callees, target.

  Tolerates the leading ``%`` of older XLA text and its absence in newer text.
  Returns ``{"instructions": {name: {...}}, "computations": {name: [instruction names]}}``.

  >>> h = parse_hlo('''
  ... %fused_computation.1 (p: f32[4,4]) -> f32[4,4] {
  ...   %p = f32[4,4]{1,0} parameter(0)
  ...   ROOT %dot.1 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ... }
  ... ENTRY main.2 (x: f32[4,4]) -> f32[4,4] {
  ...   x = f32[4,4]{1,0} parameter(0)
  ...   ROOT fusion.7 = f32[4,4]{1,0} fusion(x), kind=kOutput, calls=%fused_computation.1
  ... }''')
  >>> h["instructions"]["fusion.7"]["kind"], h["instructions"]["fusion.7"]["calls"]
  ('kOutput', ['fused_computation.1'])
  >>> h["computations"]["fused_computation.1"]
  ['p', 'dot.1']
  """
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    if not line or line.startswith("}"):
      continue
    if not line[0].isspace():  # a computation's header: [ENTRY] [%]name (params) -> shape {
      m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*[({]", line)
      current = m[1] if m and line.rstrip().endswith("{") else None
      if current:
        computations[current] = []
      continue
    m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
    if not m or current is None:
      continue
    name, rest = m[1], m[2]
    kind = re.search(r"\bkind=(k\w+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', rest)
    opcode = _hlo_opcode(rest)
    instructions[name] = dict(
        opcode=opcode, shape=_hlo_shape(rest), kind=kind and kind[1],
        operands=_hlo_operands(rest, opcode),
        calls=re.findall(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest),
        target=target and target[1], op_name=op_name and op_name[1],
        # A GEMM fusion says so only in its backend config (triton/cuBLAS/cuDNN/cutlass kinds).
        gemm_config=bool(re.search(r"gemm|cublas|cutlass", rest.split("backend_config=", 1)[-1])
                         if "backend_config=" in rest else False))
    computations[current].append(name)
  return {"instructions": instructions, "computations": computations}


def called_opcodes(hlo: dict, name: str) -> set[str]:
  """Opcodes of every instruction in the computations ``name`` calls, transitively."""
  ins, comps = hlo["instructions"], hlo["computations"]
  seen, todo, ops = set(), list(ins[name]["calls"]) if name in ins else [], set()
  while todo:
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for inner in comps.get(comp, ()):
      ops.add(ins[inner]["opcode"])
      todo += ins[inner]["calls"]
  return ops


def hlo_category(hlo: dict, name: str) -> str | None:
  """The category of HLO instruction ``name`` from the module's text; None when it cannot tell.

  >>> h = parse_hlo('''ENTRY m {
  ...   cc.1 = (bf16[8]{0}, s8[64]{0}) custom-call(), custom_call_target="__cudnn$fmhaSoftmax"
  ...   cc.2 = (bf16[8]{0}, s8[64]{0}) custom-call(), custom_call_target="__cublas$lt$matmul"
  ...   t.3 = bf16[8,4]{0,1} transpose(x), dimensions={1,0}
  ...   f.4 = bf16[4,8]{1,0} fusion(x), kind=kInput, calls=c.t
  ...   f.5 = f32[4]{0} fusion(x), kind=kInput, calls=c.r
  ... }
  ... c.t {
  ...   p = f32[8,4]{1,0} parameter(0)
  ...   c = bf16[8,4]{1,0} convert(p)
  ...   ROOT t = bf16[4,8]{1,0} transpose(c), dimensions={1,0}
  ... }
  ... c.r {
  ...   p = f32[4,8]{1,0} parameter(0)
  ...   ROOT r = f32[4]{0} reduce(p, z), dimensions={1}, to_apply=add
  ... }''')
  >>> [hlo_category(h, n) for n in ("cc.1", "cc.2", "t.3", "f.4", "f.5", "missing")]
  ['attention', 'gemm', 'copy', 'copy', 'reduction', None]
  """
  ins = hlo["instructions"].get(name)
  if ins is None:
    return None
  op = ins["opcode"]
  if op == "custom-call":
    target = (ins["target"] or "").lower()
    for category, keys in (("attention", ("fmha", "flash", "attention")), ("conv", ("conv",)),
                           ("gemm", ("cublas", "gemm", "matmul"))):
      if any(k in target for k in keys):
        return category
    return None
  if op == "fusion":
    inner = called_opcodes(hlo, name)
    if "convolution" in inner:
      return "conv"
    if "dot" in inner or (ins["kind"] == "kCustom" and ins["gemm_config"]):
      return "gemm"
    if "custom-call" in inner:
      return None  # e.g. a cuDNN graph: let the kernel name decide
    # Not the fusion kind: XLA's transpose emitter shares kInput with its reductions.
    if inner & REDUCE_OPS:
      return "reduction"
    # Data movement, possibly with a dtype cast on the way (a transposing convert is a copy).
    moves = inner <= MOVE_OPS or (inner & {"copy", "transpose"} and inner <= MOVE_OPS | {"convert"})
    if inner and moves:
      return "copy"
    return "elementwise"
  if op == "dot":
    return "gemm"
  if op == "convolution":
    return "conv"
  if op in COPY_OPS:
    return "copy"
  if op in REDUCE_OPS:
    return "reduction"
  return None


def hlo_op_name(hlo: dict | None, name: str) -> str | None:
  """The ``op_name`` of an instruction, else one of the instructions inside the fusion it calls.

  XLA leaves many fusions without metadata while the ops fused into them keep theirs.
  Inside, a backward op wins over a forward one (a backward fusion often recomputes a bit
  of the forward pass), a forward op over the rest.

  >>> h = parse_hlo('''ENTRY m {
  ...   f.1 = f32[4]{0} fusion(x), kind=kLoop, calls=c.1
  ... }
  ... c.1 {
  ...   a = f32[4]{0} exponential(p), metadata={op_name="jit(s)/jvp(V)/exp"}
  ...   b = f32[4]{0} multiply(a, a), metadata={op_name="jit(s)/transpose(jvp(V))/mul"}
  ... }''')
  >>> hlo_op_name(h, "f.1")
  'jit(s)/transpose(jvp(V))/mul'
  """
  ins = (hlo or {}).get("instructions", {})
  if name not in ins:
    return None
  if ins[name]["op_name"] or not ins[name]["calls"]:
    return ins[name]["op_name"]
  inner, seen, todo = [], set(), list(ins[name]["calls"])
  while todo:
    comp = todo.pop(0)
    if comp in seen:
      continue
    seen.add(comp)
    for n in hlo["computations"].get(comp, ()):
      # JAX's full path ("jit(step)/..."), not a reducer's parameter ("reduce_sum", "block/x/y")
      inner += [ins[n]["op_name"]] if (ins[n]["op_name"] or "").startswith("jit(") else []
      todo += ins[n]["calls"]
  for key in ("transpose(", "jvp(", ""):
    for op_name in inner:
      if key in op_name:
        return op_name
  return None


def hlo_phase(hlo: dict | None, name: str) -> str:
  """forward / backward / rest / unknown, from :func:`hlo_op_name` (see the module doc).

  >>> h = parse_hlo('''ENTRY m {
  ...   a = f32[4]{0} dot(x, y), metadata={op_name="jit(step)/transpose(jvp(ViT))/dot_general"}
  ...   b = f32[4]{0} add(x, y), metadata={op_name="jit(step)/jvp(ViT)/add"}
  ...   c = f32[4]{0} sqrt(x), metadata={op_name="jit(step)/sqrt"}
  ...   d = f32[4]{0} add(x, y), metadata={op_name="block_0/Dense_0/reduce_sum"}
  ... }''')
  >>> [hlo_phase(h, n) for n in "abcde"]
  ['backward', 'forward', 'rest', 'unknown', 'unknown']
  """
  op_name = hlo_op_name(hlo, name) or ""
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "rest" if op_name.startswith("jit(") else "unknown"


def hlo_description(hlo: dict | None, name: str, width: int = HLO_CHARS) -> str | None:
  """One line saying what ``name`` is: shape, opcode, kind/target, the ops inside, op_name's tail.

  >>> h = parse_hlo('''ENTRY m {
  ...   f.1 = bf16[256,197,768]{2,1,0} fusion(x), kind=kLoop, calls=c.2, metadata={op_name="jit(s)/jvp(V)/add"}
  ... }''')
  >>> hlo_description(h, "f.1")
  'bf16[256,197,768]{2,1,0} fusion kLoop op_name=jit(s)/jvp(V)/add'
  """
  ins = ((hlo or {}).get("instructions") or {}).get(name)
  if ins is None:
    return None
  parts = [ins["shape"], ins["opcode"]]
  if ins["kind"]:
    parts.append(ins["kind"])
  if ins["target"]:
    parts.append(ins["target"])
  if ins["opcode"] == "fusion":
    inner = sorted(called_opcodes(hlo, name) - {"parameter", "constant", "bitcast", "tuple",
                                               "get-tuple-element"})
    if inner:
      parts.append("[" + ",".join(inner) + "]")
  text = " ".join(parts)
  op_name = hlo_op_name(hlo, name)
  if op_name:
    room = width - len(text) - len(" op_name=")
    if room > 12:
      tail = op_name
      text += " op_name=" + (tail if len(tail) <= room else "..." + tail[-(room - 3):])
  return text if len(text) <= width else text[:width - 3] + "..."


# --------------------------------------------------------------------------- the trace


def kernel_category(kernel: str) -> str:
  """The category of a kernel from keywords in its name alone.

  >>> [kernel_category(k) for k in ("MemcpyD2D", "nvjet_tst_128x256", "input_reduce_fusion",
  ...                               "loop_multiply_fusion", "sm90_xmma_fprop_implicit_gemm", "x")]
  ['memcpy', 'gemm', 'reduction', 'elementwise', 'conv', 'other']
  """
  if MEMCPY.search(kernel):
    return "memcpy"
  for category, pattern in KERNEL_KEYWORDS:
    if pattern.search(kernel):
      return category
  return "other"


def _number(x) -> float | None:
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _names(events: list, what: str) -> dict:
  """``process_name`` (by pid) or ``thread_name`` (by (pid, tid)) metadata events as a dict."""
  out = {}
  for e in events:
    if isinstance(e, dict) and e.get("ph") == "M" and e.get("name") == what:
      key = e.get("pid") if what == "process_name" else (e.get("pid"), e.get("tid"))
      out[key] = str((e.get("args") or {}).get("name", ""))
  return out


def _hlo_op(event: dict) -> str | None:
  """The HLO instruction of an event: its ``hlo_op`` argument, or ``hlo_op=`` in an annotation."""
  args = event.get("args") or {}
  if args.get("hlo_op"):
    return str(args["hlo_op"])
  for value in args.values():
    m = re.search(r"hlo_op=([\w.\-]+)", str(value))
    if m:
      return m[1]
  return None


def select_kernels(trace: dict) -> tuple[str, list[dict], list[str]]:
  """The events to count: ``(source, events, thread names)``, source ``device``/``host``/``none``.

  Device: complete events of the ``/device:*`` processes, on their ``Stream`` threads when
  any thread is named so, else on every thread but the derived lines. Host (no device
  process, e.g. the CPU, or one without events): host events that carry an ``hlo_op``
  (XLA's op events).
  """
  events = (trace.get("traceEvents") or []) if isinstance(trace, dict) else []
  processes, threads = _names(events, "process_name"), _names(events, "thread_name")
  complete = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
              and _number(e.get("ts")) is not None and _number(e.get("dur")) is not None]
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  if devices:
    own = {k: v for k, v in threads.items() if k[0] in devices}
    streams = {k for k, v in own.items() if v.startswith("Stream")}
    if streams:
      keep = lambda e: (e.get("pid"), e.get("tid")) in streams
    else:
      keep = lambda e: (e.get("pid") in devices
                        and own.get((e.get("pid"), e.get("tid"))) not in DERIVED_LINES)
    chosen = [e for e in complete if keep(e)]
    used = sorted({own.get((e.get("pid"), e.get("tid")), str(e.get("tid"))) for e in chosen})
    if chosen:  # else no kernel was traced (CUPTI missing?): the host's op events at least
      return "device", chosen, used
  chosen = [e for e in complete if _hlo_op(e)]
  used = sorted({threads.get((e.get("pid"), e.get("tid")), str(e.get("tid"))) for e in chosen})
  return ("host" if chosen else "none"), chosen, used


def _busy_us(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of ``(start, end)`` intervals: time with at least one kernel running.

  >>> _busy_us([(0, 10), (5, 12), (20, 25)])
  17
  """
  busy, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      busy += e - s
      end = e
    elif e > end:
      busy += e - end
      end = e
  return busy


def summarize(trace: dict, hlo_text: str | None, steps: int, top: int = TOP_OPS) -> dict:
  """Per-step kernel time of ``steps`` traced steps: totals, categories, phases, top ops.

  ``total_ms`` sums the kernels' durations; ``busy_ms`` is the time at least one ran;
  ``span_ms`` runs from the first kernel's start to the last one's end, so
  ``idle_ms = span_ms - busy_ms`` is the device waiting (launch gaps, host work).
  Shares are of ``total_ms``. Ops are keyed by their HLO instruction when the event
  names one, else by the kernel name.
  """
  source, events, used_threads = select_kernels(trace)
  hlo = parse_hlo(hlo_text) if hlo_text else None
  # XLA names a fusion's kernel after the instruction, sanitised ("loop_add_fusion.3" ->
  # "loop_add_fusion_3"): the way back when an event carries no hlo_op.
  by_kernel_name = {re.sub(r"\W", "_", n): n for n in (hlo or {}).get("instructions", ())}
  steps = max(int(steps), 1)
  per_op, intervals, from_hlo = {}, [], {}
  categories, phases, counts, modules = (collections.Counter() for _ in range(4))
  for e in events:
    ts, dur = _number(e["ts"]), _number(e["dur"])
    kernel = str(e.get("name", ""))
    op = _hlo_op(e)
    if not op or (hlo and op not in hlo["instructions"]):
      # No hlo_op, or one that names no instruction: a command buffer (a CUDA graph thunk,
      # "command_buffer_144") tags every kernel it launches with its own name.
      op = by_kernel_name.get(kernel) or (None if hlo else op)
    # Per event, not per op: one op can run a kernel and a memset (a cuDNN call, a copy).
    if op not in from_hlo:  # once per op: a fusion's callees are walked
      from_hlo[op] = (hlo_category(hlo, op), hlo_phase(hlo, op)) if hlo and op else (None, "unknown")
    category = "memcpy" if MEMCPY.search(kernel) else from_hlo[op][0] or kernel_category(kernel)
    phase = from_hlo[op][1]
    entry = per_op.setdefault(op or kernel, dict(us=0.0, n=0, phase=phase,
                                                 kernels=collections.Counter(),
                                                 categories=collections.Counter()))
    entry["us"] += dur
    entry["n"] += 1
    entry["kernels"][kernel] += dur
    entry["categories"][category] += dur
    categories[category] += dur
    counts[category] += 1
    phases[phase] += dur
    modules[str((e.get("args") or {}).get("hlo_module", "?"))] += dur
    intervals.append((ts, ts + dur))

  ms = lambda us: round(us / steps / 1e3, 4)
  total_us = sum(categories.values())
  busy = _busy_us(intervals)
  span = max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else 0.0
  top_ops = []
  for op_key, v in sorted(per_op.items(), key=lambda kv: (-kv[1]["us"], kv[0]))[:top]:
    kernel = v["kernels"].most_common(1)[0][0]
    top_ops.append(dict(op=op_key, ms=ms(v["us"]), count=round(v["n"] / steps, 2),
                        category=v["categories"].most_common(1)[0][0], phase=v["phase"],
                        share=round(v["us"] / total_us, 4) if total_us else 0.0,
                        kernel=kernel[:100], hlo=hlo_description(hlo, op_key)))
  return dict(
      source=source, steps=steps, threads=used_threads[:16],
      kernels=round(len(events) / steps, 1), total_ms=ms(total_us), busy_ms=ms(busy),
      span_ms=ms(span), idle_ms=ms(max(span - busy, 0.0)),
      categories={c: dict(ms=ms(categories[c]), share=round(categories[c] / total_us, 4),
                          count=round(counts[c] / steps, 1))
                  for c in CATEGORIES if categories[c]},
      phases={p: ms(phases[p]) for p in PHASES if phases[p]},
      modules={m: ms(us) for m, us in modules.most_common(8)},
      top_ops=top_ops, hlo=hlo is not None)


def compact(summary: dict) -> dict:
  """The few numbers of a summary that fit in a bench row: totals, ms per category and phase."""
  keep = ("source", "steps", "kernels", "total_ms", "busy_ms", "span_ms", "idle_ms")
  return dict({k: summary.get(k) for k in keep},
              categories={c: v["ms"] for c, v in (summary.get("categories") or {}).items()},
              phases=dict(summary.get("phases") or {}))


def format_summary(summary: dict, title: str = "kernel profile") -> str:
  """A plain-text table: totals, ms/step and % per category and phase, then the top ops.

  Takes a full summary or a :func:`compact` one (whose categories are bare numbers).
  """
  if "error" in summary:
    return f"{title}: error: {summary['error']}"
  lines = [f"{title} ({summary.get('source')}, {summary.get('steps')} steps, per step): "
           f"{summary.get('kernels')} kernels, sum {summary.get('total_ms')} ms, busy "
           f"{summary.get('busy_ms')} ms, span {summary.get('span_ms')} ms, "
           f"idle {summary.get('idle_ms')} ms"]
  if summary.get("source") == "host":
    lines.append("  (no device kernels in the trace: the host's XLA op events, which overlap across threads)")
  total = summary.get("total_ms") or 0
  cats = summary.get("categories") or {}
  lines.append(f"  {'category':<12}{'ms/step':>10}{'%':>7}{'n/step':>8}")
  for c, v in cats.items():
    v = v if isinstance(v, dict) else dict(ms=v, share=v / total if total else 0, count=None)
    n = "" if v.get("count") is None else f"{v['count']:.0f}"
    lines.append(f"  {c:<12}{v['ms']:>10.3f}{100 * v['share']:>7.1f}{n:>8}")
  phases = summary.get("phases") or {}
  if phases:
    label = {"rest": "rest (optimizer, checks)"}
    lines.append("  phases: " + ", ".join(
        f"{label.get(p, p)} {x:.3f} ms ({100 * x / total:.1f}%)" if total else f"{label.get(p, p)} {x}"
        for p, x in phases.items()))
  ops = summary.get("top_ops") or []
  if ops:
    lines.append(f"  {'top ops':<28}{'ms/step':>9}{'%':>6}{'n':>6}  {'category':<12}{'phase':<9}what")
    for o in ops:
      what = o.get("hlo") or o.get("kernel") or ""
      lines.append(f"  {o['op'][:28]:<28}{o['ms']:>9.3f}{100 * o.get('share', 0):>6.1f}"
                   f"{o['count']:>6g}  {o['category']:<12}{o.get('phase', ''):<9}{what}")
      # The kernel too when its name says more than the op's (cuBLAS's, cuDNN's, triton's).
      if o.get("hlo") and o.get("kernel") not in (None, o["op"], re.sub(r"\W", "_", o["op"])):
        lines.append(f"  {'':<28}{'':>9}{'':>6}{'':>6}  kernel: {o['kernel']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("path", help="a *.trace.json[.gz] (summarised now) or a *.profile.json (printed)")
  ap.add_argument("--hlo", help="the step's compiled.as_text() (.txt or .txt.gz)")
  ap.add_argument("--steps", type=int, default=3, help="how many steps the trace holds")
  ap.add_argument("--top", type=int, default=TOP_OPS)
  ap.add_argument("--json", action="store_true", help="print the summary as JSON, not the table")
  ap.add_argument("--dump-names", action="store_true",
                  help="list the trace's processes and threads with their event counts")
  a = ap.parse_args(argv)
  data = load_trace(a.path)
  if "traceEvents" not in data:  # a summary already
    summary = data
  else:
    if a.dump_names:
      events = data["traceEvents"]
      processes, threads = _names(events, "process_name"), _names(events, "thread_name")
      n = collections.Counter((e.get("pid"), e.get("tid")) for e in events
                              if isinstance(e, dict) and e.get("ph") == "X")
      for (pid, tid), count in sorted(n.items(), key=lambda kv: str(kv[0])):
        print(f"{processes.get(pid, pid)!s:<24} {threads.get((pid, tid), tid)!s:<40} {count}")
    summary = summarize(data, read_text(a.hlo) if a.hlo else None, a.steps, a.top)
  print(json.dumps(summary, indent=1) if a.json else format_summary(summary, os.path.basename(a.path)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
