"""LoRA: low-rank adapters on a frozen model's dense projections, and merging them back.

A targeted kernel ``W`` (viewed as an ``[in, out]`` matrix) is used as
``W + (a @ b) * alpha / rank`` with ``a: [in, rank]`` (random) and ``b: [rank, out]``
(zeros, so training starts from the pretrained function).  The adapters live in
the parameter tree beside the base weights, under a ``lora`` subtree that
mirrors the kernel's path::

  params/lora/Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel/{a, b}

so the trainer's param-group rules train them like any other leaf:
:data:`PARAM_GROUPS` (adapters and head train, all else frozen, no optimizer
state for the frozen base).  :class:`LoraModel` has the ``init``/``apply`` surface
of a flax module; inside ``apply`` each adapted layer computes
``x @ W + ((x @ a) @ b) * scale`` (a method interceptor on the layer: the sum
``W + a b`` is never materialised, so a train step holds no weight-sized
temporaries).  :func:`merge` folds the adapters into the base weights for
export; until then the base weights are untouched (bit-identical).

>>> import numpy as np
>>> params = {"Transformer": {"encoderblock_0": {"MlpBlock_3": {"Dense_0": {
...     "kernel": np.ones((4, 8), np.float32), "bias": np.zeros(8, np.float32)}}}},
...     "head": {"kernel": np.zeros((8, 2), np.float32), "bias": np.zeros(2, np.float32)}}
>>> spec = LoraSpec(rank=2, alpha=4.0)
>>> with_lora = add_lora(params, spec, jax.random.key(0))
>>> lora = with_lora["lora"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
>>> lora["a"].shape, lora["b"].shape, num_lora_params(params, spec)  # 2 * (4 + 8)
((4, 2), (2, 8), 24)
>>> bool((merge(with_lora, spec)["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
...       == 1.0).all())  # b starts at zero: merging changes nothing yet
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError
from ftjax.tree import flatten, rule_tree, unflatten

LORA = "lora"  # the top-level params key holding the adapters

# ViT attention query/key/value/out and both MLP projections of every block.
DEFAULT_TARGETS = (r"Transformer/encoderblock_\d+/(?:MultiHeadDotProductAttention_1/(?:query|key|value|out)"
                   r"|MlpBlock_3/Dense_[01])/kernel",)

# How many leading kernel axes are inputs (flax DenseGeneral kernels are (*in, *out)):
# the attention output projection contracts (heads, head_dim); everything else one axis.
INPUT_AXES = ((r"(?:.*/)?MultiHeadDotProductAttention_\d+/out/kernel", 2), (r".*", 1))

# Adapters and head train; the base model is frozen (no gradients, no optimizer state).
PARAM_GROUPS = [(LORA + "/.*", {}), ("head/.*", {}), (".*", None)]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Rank, scaling and which kernels get adapters.

  Attributes:
    rank: the adapters' inner dimension r.
    alpha: the update is scaled by ``alpha / rank``; None means ``alpha = rank``
      (scale 1).
    targets: regexes fully matching '/'-joined kernel paths of ``params``; every
      regex must match at least one kernel.
  """

  rank: int
  alpha: float | None = None
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
      raise ConfigError("LoRA rank must be a positive integer", where="lora.rank", value=self.rank)
    if self.alpha is not None and not float(self.alpha) > 0:
      raise ConfigError("LoRA alpha must be positive", where="lora.alpha", value=self.alpha)
    if isinstance(self.targets, str):  # a lone regex, not its characters
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    """``alpha / rank``.

    >>> LoraSpec(rank=8, alpha=16).scale, LoraSpec(rank=8).scale
    (2.0, 1.0)
    """
    return 1.0 if self.alpha is None else float(self.alpha) / self.rank

  def to_dict(self) -> dict:
    """Plain data for checkpoint metadata; :meth:`from_dict` inverts it."""
    return {"rank": int(self.rank), "alpha": None if self.alpha is None else float(self.alpha),
            "targets": list(self.targets)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraSpec":
    return cls(rank=int(d["rank"]), alpha=d.get("alpha"), targets=tuple(d["targets"]))


def _module_path(kernel_path: str) -> str:
  return kernel_path.rpartition("/")[0]


def target_shapes(params, spec: LoraSpec) -> dict[str, tuple[int, int]]:
  """``{kernel path: (in, out)}`` of the kernels ``spec`` adapts (sorted by path).

  A target regex that matches nothing, or matches something other than a
  ``.../kernel`` of two or more axes, is a ConfigError.

  >>> attn = {"query": {"kernel": np.zeros((8, 2, 4))}, "out": {"kernel": np.zeros((2, 4, 8))}}
  >>> target_shapes({"MultiHeadDotProductAttention_1": attn}, LoraSpec(1, targets=(".*/kernel",)))
  {'MultiHeadDotProductAttention_1/out/kernel': (8, 8), 'MultiHeadDotProductAttention_1/query/kernel': (8, 8)}
  """
  if LORA in params:
    raise ConfigError("params already hold LoRA adapters", where=f"params/{LORA}",
                      hint="add adapters to the base params only once")
  chosen = flatten(rule_tree(params, [(rx, True) for rx in spec.targets], what="LoRA target",
                             default=False))
  in_axes = flatten(rule_tree(params, INPUT_AXES, what="LoRA input-axes rule", allow_unused=True))
  leaves = flatten(params)
  out = {}
  for path, hit in chosen.items():
    if not hit:
      continue
    shape = tuple(np.shape(leaves[path]))
    # Dense kernels are 2-D and ftjax's DenseGeneral ones 3-D; a 4-D kernel is a convolution's
    # (HWIO), which the adapters' matmul cannot stand for. Refused here, before a run writes
    # its workdir, not at the first apply.
    if not path.endswith("/kernel") or not 2 <= len(shape) <= 3:
      raise ConfigError("LoRA target is not a dense kernel", where=path, value=shape,
                        hint="targets must match '.../kernel' leaves of Dense / DenseGeneral layers"
                             + (" (a 4-D kernel is a convolution's)" if len(shape) == 4 else ""))
    n = in_axes[path]
    out[path] = (math.prod(shape[:n]), math.prod(shape[n:]))
  return out


def num_lora_params(params, spec: LoraSpec) -> int:
  """Exactly ``sum over targets of rank * (in + out)``."""
  return sum(spec.rank * (i + o) for i, o in target_shapes(params, spec).values())


def init_lora(params, spec: LoraSpec, rng: jax.Array) -> dict:
  """The ``lora`` subtree for ``params``: ``a`` uniform in ``±1/sqrt(in)``, ``b`` zeros.

  The bound is PEFT's (``kaiming_uniform(a=sqrt(5))`` on ``a``); with ``b = 0``
  the adapted model starts equal to the base model.
  """
  shapes = target_shapes(params, spec)
  keys = jax.random.split(rng, max(len(shapes), 1))
  flat = {}
  for key, (path, (fan_in, fan_out)) in zip(keys, shapes.items()):
    bound = 1.0 / math.sqrt(fan_in)
    flat[f"{path}/a"] = jax.random.uniform(key, (fan_in, spec.rank), jnp.float32, -bound, bound)
    flat[f"{path}/b"] = jnp.zeros((spec.rank, fan_out), jnp.float32)
  return unflatten(flat)


def add_lora(params, spec: LoraSpec, rng: jax.Array) -> dict:
  """``{**params, "lora": init_lora(params, spec, rng)}``; the base leaves are the same objects."""
  return {**params, LORA: init_lora(params, spec, rng)}


def split_lora(params) -> tuple[dict, dict]:
  """(base params, the ``lora`` subtree or ``{}``)."""
  base = {k: v for k, v in params.items() if k != LORA}
  return base, params.get(LORA, {})


def _adapters(lora) -> dict[str, tuple[Any, Any]]:
  """``{kernel path: (a, b)}`` from a ``lora`` subtree; anything else in it is an error."""
  flat = flatten(lora)
  kernels = sorted({p.rpartition("/")[0] for p in flat})
  for path in kernels:
    if {f"{path}/a", f"{path}/b"} != {p for p in flat if p.rpartition("/")[0] == path}:
      raise ConfigError("LoRA adapter is not exactly a pair a, b", where=f"{LORA}/{path}",
                        value=sorted(p.rpartition("/")[2] for p in flat if p.rpartition("/")[0] == path))
  return {path: (flat[f"{path}/a"], flat[f"{path}/b"]) for path in kernels}


def merge(params, spec: LoraSpec) -> dict:
  """Base params with every adapter folded in: ``W + reshape(a @ b) * scale``.

  For export, or serving without the adapters' extra matmuls.  Params without a
  ``lora`` subtree come back unchanged.
  """
  base, lora = split_lora(params)
  flat = flatten(base)
  for path, (a, b) in _adapters(lora).items():
    w = flat.get(path)
    if w is None:
      raise ConfigError("LoRA adapter for a kernel the model does not have", where=path)
    if np.shape(a)[1:] != np.shape(b)[:1] or np.shape(a)[0] * np.shape(b)[1] != np.size(w):
      raise ConfigError("LoRA adapter does not fit its kernel", where=path,
                        value=f"a {np.shape(a)} b {np.shape(b)} for kernel {np.shape(w)}")
    # Full float32 precision: an export must not carry TF32 rounding of the update.
    delta = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * spec.scale
    flat[path] = (jnp.asarray(w, jnp.float32) + delta.reshape(np.shape(w))).astype(np.result_type(w))
  return unflatten(flat)


_A, _B = "lora_a", "lora_b"  # leaf names inside an adapted layer's own scope, in apply only


def _interceptor(next_fun, args, kwargs, context):
  """Adds ``((x @ a) @ b)`` to the output of every layer whose scope holds adapters.

  The adapters reach the layer as variables of its own scope (not through a
  closure), so lifted transforms such as the ViT blocks' ``nn.jit``, which
  trace one block and reuse it for the others, see each block's own adapters.
  """
  module = context.module
  if context.method_name != "__call__" or not module.has_variable("params", _A):
    return next_fun(*args, **kwargs)
  if not isinstance(module, (nn.Dense, nn.DenseGeneral)):
    raise ConfigError("LoRA target is not a Dense or DenseGeneral layer", where="/".join(module.path),
                      value=type(module).__name__)
  y = next_fun(*args, **kwargs)
  x = args[0]
  axis = getattr(module, "axis", -1)
  n_in = len(axis) if isinstance(axis, Sequence) else 1
  a, b = module.get_variable("params", _A), module.get_variable("params", _B)
  xf = x.reshape(*x.shape[:-n_in], -1)
  if xf.shape[-1] != a.shape[0]:
    raise ConfigError("LoRA adapter does not fit its layer's input", where="/".join(module.path),
                      value=f"a {a.shape} for input {x.shape}", hint="check lora.INPUT_AXES")
  delta = (xf @ a.astype(x.dtype)) @ b.astype(x.dtype)
  return y + delta.reshape(y.shape).astype(y.dtype)


def _place(base, lora, scale: float) -> dict:
  """The base params with each adapter beside its kernel (``b`` pre-scaled)."""
  flat = flatten(base)
  for path, (a, b) in _adapters(lora).items():
    if path not in flat:
      raise ConfigError("LoRA adapter for a kernel the model does not have", where=path)
    module = _module_path(path)
    flat[f"{module}/{_A}"] = a
    # Scaling b here (traced, differentiable) keeps the interceptor free of state.
    flat[f"{module}/{_B}"] = b * scale
  return unflatten(flat)


class LoraModel:
  """A model with LoRA adapters, used like the flax module it wraps.

  ``init(rngs, x, **kw)`` initialises the base model and adds adapters;
  ``apply(variables, x, **kw)`` takes the same arguments as the base module's
  apply (``train=``, ``rngs=``, ``mutable=``) and returns what it returns.

  >>> from ftjax import models
  >>> base, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  >>> model = LoraModel(base, LoraSpec(rank=4))
  >>> x = jnp.zeros((1, 32, 32, 3))
  >>> shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> sorted(shapes["params"])
  ['Transformer', 'cls', 'embedding', 'head', 'lora']
  >>> jax.eval_shape(model.apply, shapes, x).shape
  (1, 3)
  """

  def __init__(self, model: nn.Module, spec: LoraSpec):
    self.model = model
    self.spec = spec

  def init(self, rngs, x, *args, **kwargs) -> dict:
    variables = dict(self.model.init(rngs, x, *args, **kwargs))
    key = rngs["params"] if isinstance(rngs, Mapping) else rngs
    variables["params"] = add_lora(variables["params"], self.spec, jax.random.fold_in(key, 0x10A))
    return variables

  def apply(self, variables, x, *args, **kwargs):
    base, lora = split_lora(variables["params"])
    inner = {**variables, "params": _place(base, lora, self.spec.scale)}
    with nn.intercept_methods(_interceptor):
      return self.model.apply(inner, x, *args, **kwargs)

  def merge(self, params) -> dict:
    """See :func:`merge`."""
    return merge(params, self.spec)


__all__ = ["DEFAULT_TARGETS", "INPUT_AXES", "LORA", "LoraModel", "LoraSpec", "PARAM_GROUPS", "add_lora",
           "init_lora", "merge", "num_lora_params", "split_lora", "target_shapes"]
