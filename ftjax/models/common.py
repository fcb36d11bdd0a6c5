"""What every model family shares: converted checkpoints, the merge into a model, the load report.

A family converter turns a checkpoint's tensors (any layout) into a
:class:`Converted`: the architecture (from the checkpoint's own metadata), the
variables as a flat ``{"params/...": array, "batch_stats/...": array}`` dict in
ftjax's Flax layout, the preprocessing the checkpoint expects and its class
names.  :func:`merge` then fits those variables into the model the user asked
for (other class count, other image size, ``dont_load`` rules) and records every
decision in a :class:`LoadReport`.  Any difference nobody asked for is an error
naming the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import CheckpointError, ConfigError
from ftjax.tree import any_match

HEAD_PATHS = ("params/head/kernel", "params/head/bias")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


FrozenBN = bool | tuple[str, ...]


def frozen_here(path: Sequence[str], frozen_bn: FrozenBN) -> bool:
  """Whether the BatchNorm layer at module ``path`` uses and keeps its running statistics
  in training: ``frozen_bn`` is True or False for every layer, or the '/'-paths of the
  frozen ones (the trainer freezes a layer's statistics while its scale and bias are frozen).

  >>> frozen_here(("stage1", "block0", "bn1"), ("stage1/block0/bn1",)), frozen_here(("stem", "bn"), True)
  (True, True)
  >>> frozen_here(("stage4", "block0", "bn1"), ("stage1/block0/bn1",))
  False
  """
  if isinstance(frozen_bn, bool):
    return frozen_bn
  return "/".join(path) in frozen_bn


BN_EPS = 1e-5  # torch's
BN_MOMENTUM = 0.9  # flax convention: new = 0.9 * old + 0.1 * batch (torch's momentum=0.1)


class BatchNorm(nn.Module):
  """BatchNorm over all but the last axis, matching ``torch.nn.BatchNorm2d`` exactly (ResNet, EfficientNet).

  flax's ``nn.BatchNorm`` feeds the biased batch variance into the running
  average; torch feeds the unbiased one (``n / (n - 1)``).  With small feature
  maps (a 7x7 map, batch 2: n = 98) that is a 1% drift per step, so the running
  statistics of a fine-tuned torch checkpoint would wander off.  Statistics are
  computed in float32 whatever the compute dtype.

  The batch moments come from one pass over ``x`` (both sums fuse into one read;
  the two-pass form, mean then mean squared deviation, reads every activation map
  once more in the forward).  The sums are taken around one value of each channel
  from the batch itself, a few standard deviations from the mean at most, so
  ``E[d^2] - E[d]^2`` does not cancel when activations sit far from zero.

  Parameters ``scale``/``bias``; statistics ``batch_stats/{mean,var}``.
  ``use_running_average``: True or False, or the '/'-paths of the layers that use
  (and keep) their running statistics, the others normalising with the batch's
  (:func:`ftjax.models.common.frozen_here`).
  """

  use_running_average: FrozenBN
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  scale_init: Callable = nn.initializers.ones
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if frozen_here(self.path, self.use_running_average):
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      shift = jax.lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
      d = xf - shift
      d_mean = d.mean(axes)
      mean = shift + d_mean
      var = jnp.maximum(jnp.square(d).mean(axes) - jnp.square(d_mean), 0.0)
      if not self.is_initializing():
        n = math.prod(x.shape[:-1])
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype or x.dtype)



def space_to_depth(x, block: int):
  """(n, h * b, w * b, c) -> (n, h, w, b * b * c): each b x b block of pixels becomes one
  pixel's channels, in (row, column, channel) order, the order a (b, b, c, f) kernel
  flattens in.  Any array with ``reshape`` and ``transpose`` (numpy, jax).

  >>> x = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  >>> y = space_to_depth(x, 2)
  >>> y.shape, bool((y[1, 1, 2].reshape(2, 2, 3) == x[1, 2:4, 4:6]).all())
  ((2, 2, 3, 12), True)
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // block, w // block, block * block * c)


_REQUIRED = object()


def config_number(config: Mapping[str, Any], key: str, kind: type, where: str, default: Any = _REQUIRED):
  """``config[key]`` (``default`` where absent) as ``kind`` (int or float); a missing required
  field, or a value of another type (null, a string, a list, 2.5 for an int), is a CheckpointError.

  >>> config_number({"mlp_ratio": 4}, "mlp_ratio", float, "config.json")
  4.0
  >>> config_number({"hidden_size": None}, "hidden_size", int, "config.json")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.CheckpointError: ftjax: error: config.json field is not an integer (config.json): hidden_size=None
  """
  value = config.get(key, default)
  if value is _REQUIRED:
    raise CheckpointError("config.json lacks a field", where=where, value=repr(key))
  number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not number or (kind is int and not float(value).is_integer()):
    raise CheckpointError(f"config.json field is not {'an integer' if kind is int else 'a number'}",
                          where=where, value=f"{key}={value!r}")
  return kind(value)


def config_ints(config: Mapping[str, Any], key: str, where: str, default: Sequence[int]) -> list[int]:
  """``config[key]`` (``default`` where absent) as a non-empty list of positive integers.

  >>> config_ints({"depths": [1, "x"]}, "depths", "config.json", (3, 4))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.CheckpointError: ftjax: error: config.json field is not a list of positive integers (config.json): depths=[1, 'x']
  """
  value = config.get(key, default)
  if not (isinstance(value, (list, tuple)) and value and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()
      and v > 0 for v in value)):
    raise CheckpointError("config.json field is not a list of positive integers", where=where,
                          value=f"{key}={value!r}")
  return [int(v) for v in value]


@dataclasses.dataclass
class Converted:
  """A checkpoint in ftjax's layout, before it is fitted to a model."""

  family: str  # key of ftjax.models.FAMILIES
  arch: dict  # keyword arguments of the family's create_model (variant, pooling, ...)
  num_classes: int  # classes of the checkpoint's head (0 when it has none)
  image_size: tuple[int, int]  # resolution the checkpoint was trained at
  variables: dict[str, np.ndarray]  # flat, collection-prefixed: "params/head/kernel"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  class_names: list[str] | None = None
  dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, why)


@dataclasses.dataclass(frozen=True)
class Family:
  """How ftjax builds and fits one model family.

  Attributes:
    name: the family's key ("vit", "resnet", ...).
    create_model: ``(arch: dict, num_classes: int, dtype) -> flax module``.
    resizers: ``(arch, image_size, old_image_size) -> {regex: fn(array, target_shape) -> array | None}``
      for leaves whose shape legitimately follows the image size (ViT position
      embeddings).
    check_image_size: ``(arch, image_size) -> None``; raises ConfigError.
  """

  name: str
  create_model: Callable[..., Any]
  resizers: Callable[..., dict[str, Callable]] = lambda arch, size, old_size=None: {}
  check_image_size: Callable[[dict, tuple[int, int]], None] = lambda arch, size: None


@dataclasses.dataclass
class LoadReport:
  """Everything :func:`ftjax.models.from_pretrained` decided, key by key."""

  source: str
  family: str
  arch: dict
  num_classes: int
  image_size: tuple[int, int]
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  class_names: list[str] | None = None
  matched: list[str] = dataclasses.field(default_factory=list)
  resized: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
  reinitialized: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)

  @property
  def preprocessing(self) -> dict:
    """What the checkpoint expects of its input: ``x = (pixels/255 - mean) / std``."""
    return {"mean": tuple(self.mean), "std": tuple(self.std), "image_size": tuple(self.image_size)}

  def __str__(self) -> str:
    arch = ", ".join(f"{k}={v}" for k, v in self.arch.items())
    lines = [f"loaded {self.source}",
             f"  family {self.family} ({arch}); {self.num_classes} classes; "
             f"image {self.image_size[0]}x{self.image_size[1]}; mean {self.mean} std {self.std}",
             f"  {len(self.matched)} tensors matched"]
    sections = [("resized", [f"{p}: {a} -> {b}" for p, a, b in self.resized]),
                ("re-initialised", [f"{p}: {why}" for p, why in self.reinitialized]),
                ("dropped from checkpoint", [f"{p}: {why}" for p, why in self.dropped]),
                ("missing", list(self.missing))]
    for title, rows in sections:
      if rows:
        lines.append(f"  {title} ({sum(map(_tensor_count, rows))} tensors):")
        lines.extend(f"    {r}" for r in rows)
    return "\n".join(lines)


def _tensor_count(row: str) -> int:
  """Tensors a report row stands for: one, or the N of a row grouping them ("... (N tensors)").

  >>> _tensor_count("*.num_batches_tracked (49 tensors): BatchNorm step counters"), _tensor_count("head/kernel: new")
  (49, 1)
  """
  grouped = re.match(r"[^:]* \((\d+) tensors\)(?::|$)", row)
  return int(grouped.group(1)) if grouped else 1


def merge(target: Mapping[str, Any], loaded: Mapping[str, np.ndarray], report: LoadReport, *,
          replace_head: bool, resizers: Mapping[str, Callable] = (),
          dont_load: Sequence[str] = (), init: Callable[[], Mapping[str, Any]] | None = None,
          ) -> dict[str, np.ndarray]:
  """Fits checkpoint tensors into a model's variables; records every decision in ``report``.

  Args:
    target: flat ``{path: ShapeDtypeStruct-like}`` of the model being built.
    loaded: flat ``{path: array}`` from the converter, same path convention.
    report: filled in place.
    replace_head: the class count changed: the head is zero-initialised.
    resizers: ``{regex: fn(array, target_shape) -> array | None}`` for leaves that follow
      the image size: called for every matching leaf, ``None`` keeps it as it is (a leaf
      can need resampling at an unchanged shape: a 14 x 14 grid read as 7 x 28).
    dont_load: regexes of model paths to leave at their initial value (and of
      checkpoint keys to drop).
    init: called at most once, only when some leaf needs real initial values.

  Returns:
    flat ``{path: np.ndarray}`` with exactly the target's paths, shapes and dtypes.

  >>> import numpy as np, jax
  >>> t = {"params/w": jax.ShapeDtypeStruct((2,), np.float32),
  ...      "params/head/kernel": jax.ShapeDtypeStruct((2, 3), np.float32),
  ...      "params/head/bias": jax.ShapeDtypeStruct((3,), np.float32)}
  >>> l = {"params/w": np.ones(2), "params/head/kernel": np.ones((2, 5)),
  ...      "params/head/bias": np.ones(5)}
  >>> r = LoadReport("x", "f", {}, 3, (1, 1), (0,) * 3, (1,) * 3)
  >>> out = merge(t, l, r, replace_head=True)
  >>> out["params/head/kernel"].sum(), r.matched, [p for p, _ in r.reinitialized]
  (np.float32(0.0), ['params/w'], ['params/head/bias', 'params/head/kernel'])
  """
  resize_items = list(dict(resizers).items())
  out: dict[str, np.ndarray] = {}
  initial: Mapping[str, Any] | None = None

  def initial_value(path):
    nonlocal initial
    if initial is None:
      if init is None:
        raise CheckpointError("leaf needs initialising but no initialiser was given", where=path)
      initial = init()
    return np.asarray(initial[path])

  for path in sorted(target):
    spec = target[path]
    shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
    if dont_load and any_match(path, dont_load, what="model.dont_load"):
      out[path] = initial_value(path).astype(dtype)
      report.reinitialized.append((path, "dont_load"))
      continue
    if replace_head and path in HEAD_PATHS:
      out[path] = np.zeros(shape, dtype)
      old = tuple(loaded[path].shape) if path in loaded else None
      report.reinitialized.append((path, f"new head, zeros {shape} (checkpoint {old})"))
      continue
    if path not in loaded:
      report.missing.append(path)
      raise CheckpointError("model key missing from the checkpoint", where=report.source,
                            value=f"{path} {shape}",
                            hint="a checkpoint for another architecture or variant? (dont_load=[regex] "
                                 "initialises a key on purpose)")
    arr = loaded[path]
    # (kinds, not np.floating: ml_dtypes' bfloat16 and float8 are not numpy floating types)
    if np.issubdtype(dtype, np.floating) and np.asarray(arr).dtype.kind in "iub":
      raise CheckpointError("non-float tensor for a float parameter", where=path,
                            value=f"checkpoint {np.asarray(arr).dtype} vs model {dtype}",
                            hint="a quantized checkpoint? only float weights are loaded")
    fn = next((f for rx, f in resize_items if any_match(path, [rx])), None)
    new = fn(arr, shape) if fn is not None else None
    if new is not None:
      report.resized.append((path, tuple(arr.shape), shape))
      arr = np.asarray(new)
    elif tuple(arr.shape) != shape:
      raise CheckpointError("shape mismatch", where=path,
                            value=f"checkpoint {tuple(arr.shape)} vs model {shape}",
                            hint="a checkpoint for another architecture or variant?")
    else:
      report.matched.append(path)
    out[path] = arr if arr.dtype == dtype else arr.astype(dtype)

  for path in sorted(set(loaded) - set(target)):
    if dont_load and any_match(path, dont_load, what="model.dont_load"):
      report.dropped.append((path, "dont_load"))
      continue
    raise CheckpointError("checkpoint key the model does not have", where=report.source,
                          value=f"{path} {tuple(loaded[path].shape)}",
                          hint="a checkpoint for another architecture or variant?")
  for i, rx in enumerate(dont_load or ()):  # a typo would keep the weights it meant to drop
    if not any(any_match(path, [rx], what="model.dont_load") for path in set(target) | set(loaded)):
      raise ConfigError("dont_load rule matches no parameter", where=f"model.dont_load #{i}",
                        value=repr(rx), hint=f"full match on paths such as {min(target)!r}")
  return out
