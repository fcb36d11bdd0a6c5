"""Model FLOPs of a lowered jax program, counted from its HLO text on any backend.

MFU needs the FLOPs a step must do.  XLA's own count of a lowered program
(``Lowered.cost_analysis()``) is not available where the backend is a PJRT
plugin (CUDA, ROCm: jax returns None there), and the count of a compiled
program leaves out what the backend turned into library calls (on an H100,
5.2 of a ViT-B/16 training image's 105.5 GFLOP were left).  So ftjax counts
the program jax hands the compiler, the same text on every backend:

* ``dot``: 2 x output elements x the contracted size;
* ``convolution``: 2 x output elements x the kernel's elements per output
  feature (input features per group x window), which also holds for the
  gradients' convolutions; an input gradient's (dilated by the stride) counts
  the taps that meet a value, so a gradient costs what its forward did (for
  atrous kernels, which ftjax's models do not use, only roughly);
* cuDNN attention (``__cudnn$fmha*`` custom calls, which jax emits itself):
  4 B H Sq Sk D forward, 8 B H Sq Sk D backward, the matrix products an
  unfused attention would do (its softmax recomputation is not counted);
* called computations (``call``, ``conditional``'s largest branch) with their
  multiplicity, and a ``while`` body times its trip count where the loop counts
  up to a constant as ``lax.scan`` and ``fori_loop`` lower (gradient
  accumulation's scan over micro-batches); another loop's body counts once.

Elementwise work is not counted: these are the "model FLOPs" of MFU as the
large-model papers define it, 2 per multiply-add.

>>> import jax, jax.numpy as jnp
>>> f = jax.jit(lambda x, w: jnp.tanh(x @ w))
>>> hlo_flops(f.lower(jnp.ones((16, 32)), jnp.ones((32, 8))).as_text(dialect="hlo"))  # tanh: not counted
8192.0
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*?)?\s*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")


def _integer_constants(instructions) -> dict[str, int]:
  out = {}
  for name, shape, opcode, operands, _ in instructions:
    if opcode == "constant" and re.match(r"[su]\d+\[\]", shape) and operands:
      try:
        out[name] = int(operands[0])
      except ValueError:
        pass
  return out


def _trip_count(computations, caller: str, operands: list[str], condition: str, attrs: str) -> int:
  """Iterations of a ``while``: XLA's ``known_trip_count`` if given, else a condition
  ``counter < N`` (N a constant) with the counter's initial value a constant of the caller
  (``lax.scan``: 0); 1 when the loop is not of that form."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  if known:
    return int(known[1])
  cond = computations.get(condition, ())
  if not cond or cond[-1][2] != "compare" or "direction=LT" not in cond[-1][4]:
    return 1
  counter, limit = cond[-1][3][:2]
  limit = _integer_constants(cond).get(limit)
  tuple_index = next((re.search(r"index=(\d+)", a) for n, _, op, _, a in cond
                      if n == counter and op == "get-tuple-element"), None)
  if limit is None or tuple_index is None:
    return 1
  insts = computations.get(caller, ())
  init = next((ops for n, _, op, ops, _ in insts if n == operands[0] and op == "tuple"), None)
  start = _integer_constants(insts).get(init[int(tuple_index[1])]) if init else None
  return max(limit - start, 0) if start is not None else 1


def _dims(shape: str) -> list[int]:
  """The dimensions of the first array in an HLO shape: ``f32[2,17,32]{2,1,0}`` -> [2, 17, 32]."""
  m = _ARRAY.search(shape)
  return [int(d) for d in m[1].split(",") if d] if m else []


def _split_call(rest: str) -> tuple[list[str], str]:
  """``a.1, b.2), attr=...`` -> (operand names, attribute text): up to the matching parenthesis."""
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  operands = [item.split()[-1].lstrip("%") for item in _top_level(rest[:i - 1]) if item.strip()]
  return operands, rest[i:]


def _top_level(text: str) -> list[str]:
  """Splits at commas outside brackets and braces."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def _attr(attrs: str, key: str) -> str | None:
  """The value of ``key=`` in an instruction's attributes; a braced value whole, nested braces too.

  >>> _attr('x, operand_layout_constraints={bf16[2,3]{1,0}, f32[4]{0}}, api_version=1', "operand_layout_constraints")
  '{bf16[2,3]{1,0}, f32[4]{0}}'
  """
  m = re.search(rf"\b{key}=", attrs)
  if not m:
    return None
  rest = attrs[m.end():]
  if rest.startswith("{"):
    return rest[:len(_top_level(rest)[0])]
  value = re.match(r'"[^"]*"|[^,\s]+', rest)
  return value[0] if value else None


def _ints(value: str | None) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", value or "")]


def _names(value: str | None) -> list[str]:
  return [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", value or "")]


def _dot(out: list[int], lhs: list[int], attrs: str) -> float:
  contracted = math.prod(lhs[d] for d in _ints(_attr(attrs, "lhs_contracting_dims")))
  return 2.0 * math.prod(out) * contracted


def _convolution(out: list[int], rhs: list[int], attrs: str) -> float:
  # dim_labels=b01f_01io->b01f: the kernel's labels say which of its dims is the output feature.
  labels = (_attr(attrs, "dim_labels") or "").split("_")[-1].split("->")[0]
  per_output = math.prod(rhs) / rhs[labels.index("o")] if "o" in labels else 0
  # A strided convolution's input gradient runs on the output gradient dilated by the stride
  # (window={... lhs_dilate=2x2}): only one tap in stride**2 meets a value, the forward's count.
  dilate = re.search(r"lhs_dilate=([\dx]+)", _attr(attrs, "window") or "")
  return 2.0 * math.prod(out) * per_output / (math.prod(_ints(dilate[1])) if dilate else 1)


def _attention(target: str, attrs: str) -> float:
  # Operands as jax lays them out: query, key first, each (batch, tokens, heads, head dim).
  shapes = re.findall(r"\[([0-9,]*)\]", _attr(attrs, "operand_layout_constraints") or "")
  if len(shapes) < 2:
    return 0.0
  (b, sq, h, d), sk = _ints(shapes[0])[:4], _ints(shapes[1])[1]
  return (8.0 if "Backward" in target else 4.0) * b * h * sq * sk * d


def hlo_flops(text: str) -> float:
  """Model FLOPs of one run of the HLO module ``text`` (``lowered.as_text(dialect="hlo")``)."""
  computations: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0]:
      current = computations.setdefault(header[1], [])
      entry = header[1] if line.lstrip().startswith("ENTRY") else entry
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      operands, attrs = _split_call(m[4])
      current.append((m[1], m[2], m[3], operands, attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  memo: dict[str, float] = {}

  def count(name: str) -> float:
    if name not in memo:
      memo[name] = 0.0  # a (malformed) recursive call counts nothing rather than looping
      shapes = {n: s for n, s, *_ in computations.get(name, ())}
      total = 0.0
      for _, shape, opcode, operands, attrs in computations.get(name, ()):
        if opcode == "dot":
          total += _dot(_dims(shape), _dims(shapes.get(operands[0], "")), attrs)
        elif opcode == "convolution":
          total += _convolution(_dims(shape), _dims(shapes.get(operands[1], "")), attrs)
        elif opcode == "custom-call":
          target = _attr(attrs, "custom_call_target") or ""
          if target.strip('"').startswith("__cudnn$fmha"):
            total += _attention(target, attrs)
        elif opcode == "call":
          total += count(_names(_attr(attrs, "to_apply"))[0])
        elif opcode == "while":
          trips = _trip_count(computations, name, operands, _names(_attr(attrs, "condition"))[0], attrs)
          total += trips * count(_names(_attr(attrs, "body"))[0])
        elif opcode == "conditional":
          branches = (_names(_attr(attrs, "branch_computations"))
                      or _names(_attr(attrs, "true_computation")) + _names(_attr(attrs, "false_computation")))
          total += max((count(b) for b in branches), default=0.0)
      memo[name] = total
    return memo[name]

  return count(entry)
