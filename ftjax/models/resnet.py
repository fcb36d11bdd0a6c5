"""ResNet v1 (BatchNorm) and BiT ResNetV2 (GroupNorm + weight standardisation), with their loaders.

Two families live here because they share a converter skeleton and a naming
scheme:

* ``resnet`` (:data:`RESNET`): ResNet v1 as in torchvision, timm ``resnet*`` and
  Hugging Face ``ResNetForImageClassification``.  Basic blocks (18, 34) or
  bottlenecks (26, 50, 101, 152, 200) with the stride on the 3x3 conv ("v1.5");
  Hugging Face configs can put it on the first 1x1 instead.  BatchNorm
  statistics live in the ``batch_stats`` collection.
* ``resnetv2`` (:data:`RESNETV2`): BiT pre-activation ResNetV2 (R50x1 ...
  R152x4), the layout of the BiT ``.npz`` files and timm ``resnetv2_*_bit``.

Parameter paths (the optimizer's layer decay and freezing rules rely on them)::

  stem/conv, stem/bn                               (v2: stem/conv only)
  stage{1..}/block{0..}/conv1, bn1, conv2, bn2[, conv3, bn3]
  stage{1..}/block{0..}/downsample/conv, downsample/bn
  stage{1..}/block{0..}/norm1, conv1, norm2, conv2, norm3, conv3   (v2)
  norm                                             (v2: the final pre-head GroupNorm)
  head                                             (kernel (features, classes), bias)

>>> v1_config({"variant": "resnet50"})["depths"]
(3, 4, 6, 3)
>>> bit_variant("BiT-M-R101x3"), bit_variant("resnetv2_50x1_bit.goog_in21k")
('R101x3', 'R50x1')
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models.common import (BN_MOMENTUM, IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD,
                                 BatchNorm, Converted, Family, FrozenBN, config_ints, config_number,
                                 space_to_depth)

# ---------------------------------------------------------------------------------------------
# Variant tables
# ---------------------------------------------------------------------------------------------

V1_VARIANTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet26": ("bottleneck", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnet200": ("bottleneck", (3, 24, 36, 3)),
}
_V1_WIDTHS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}
_V1_STRUCTURE = ("block", "depths", "widths", "stem_width", "stride_in_1x1", "first_stage_stride")
# Options that change no parameter shape: the trainer may override them on any checkpoint.
_V1_OPTIONS = {"frozen_bn": False, "zero_init_residual": False, "max_pool_impl": "ftjax",
               "stem_conv_impl": "flax", "bn_momentum": BN_MOMENTUM}
MAX_POOL_IMPLS = ("ftjax", "flax")
STEM_CONV_IMPLS = ("flax", "space_to_depth")

BIT_VARIANTS: dict[str, tuple[tuple[int, ...], int]] = {
    "R50x1": ((3, 4, 6, 3), 1),
    "R50x3": ((3, 4, 6, 3), 3),
    "R101x1": ((3, 4, 23, 3), 1),
    "R101x3": ((3, 4, 23, 3), 3),
    "R152x2": ((3, 8, 36, 3), 2),
    "R152x4": ((3, 8, 36, 3), 4),
}
_BIT_NAME = re.compile(r"(?:BiT-[SML]-)?R(\d+)x(\d+)(?:-[\w.-]+)?", re.IGNORECASE)  # BiT-M-R50x1-ILSVRC2012
_TIMM_BIT_NAME = re.compile(r"resnetv2_(\d+)x(\d+)_bit(?:m|m_in21k)?")

# Weight standardisation epsilon: timm's BiT models use StdConv2d(eps=1e-8); the original BiT
# code used 1e-10.  Kernels of trained nets have variances around 1e-3, so the two agree to
# ~1e-6 relative; we follow timm, the reference the parity tests hold us to.
WS_EPS = 1e-8
GN_GROUPS = 32
GN_EPS = 1e-5


def _variant_error(what: str, value, table) -> ConfigError:
  return ConfigError(f"unknown {what}", value=repr(value), hint=f"one of {sorted(table)}")


def v1_config(arch: Mapping[str, Any]) -> dict[str, Any]:
  """The full ResNet v1 configuration for an arch dict: a ``variant`` or explicit structure.

  Explicit structure (Hugging Face configs): ``block`` ("basic" or "bottleneck"),
  ``depths``, ``widths`` (output channels of each stage), ``stem_width``,
  ``stride_in_1x1`` (bottleneck stride on the first 1x1 conv, original v1) and
  ``first_stage_stride``.  Options on top: ``frozen_bn`` (BatchNorm always uses
  and keeps its running statistics, for frozen backbones) and
  ``zero_init_residual`` (the last BatchNorm scale of every block starts at 0),
  ``max_pool_impl`` (the stem's max-pool: "ftjax", :func:`max_pool`, or "flax",
  ``nn.max_pool`` differentiated by JAX; the same values and gradients),
  ``stem_conv_impl`` (the stem's 7x7/2 convolution: "flax", ``nn.Conv``, or
  "space_to_depth", :class:`SpaceToDepthConv`; the same parameters and function).

  >>> cfg = v1_config({"variant": "resnet18", "frozen_bn": True})
  >>> cfg["block"], cfg["widths"], cfg["frozen_bn"]
  ('basic', (64, 128, 256, 512), True)
  >>> v1_config({"variant": "resnet51"})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unknown ResNet variant: 'resnet51'; one of ['resnet101', ...]
  >>> v1_config({"variant": "resnet50", "max_pool_impl": "xla"})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unknown max-pool implementation (max_pool_impl): 'xla'; 'ftjax' or 'flax'
  """
  arch = dict(arch)
  unknown = set(arch) - {"variant", *_V1_STRUCTURE, *_V1_OPTIONS}
  if unknown:
    raise ConfigError("unknown ResNet arch key", value=", ".join(sorted(unknown)),
                      hint=f"keys: variant, {', '.join(_V1_STRUCTURE + tuple(_V1_OPTIONS))}")
  cfg: dict[str, Any] = {"stem_width": 64, "stride_in_1x1": False, "first_stage_stride": 1}
  if "variant" in arch:
    variant = arch.pop("variant")
    if variant not in V1_VARIANTS:
      raise _variant_error("ResNet variant", variant, V1_VARIANTS)
    clash = set(arch) & set(_V1_STRUCTURE)
    if clash:
      raise ConfigError("ResNet arch gives both a variant and its structure",
                        value=", ".join(sorted(clash)), hint="give one or the other")
    block, depths = V1_VARIANTS[variant]
    cfg.update(block=block, depths=depths, widths=_V1_WIDTHS[block])
  else:
    missing = {"block", "depths", "widths"} - set(arch)
    if missing:
      raise ConfigError("ResNet arch needs a variant or block, depths and widths",
                        value=", ".join(sorted(missing)))
  cfg.update(_V1_OPTIONS)
  cfg.update(arch)
  cfg["depths"] = tuple(int(d) for d in cfg["depths"])
  cfg["widths"] = tuple(int(w) for w in cfg["widths"])
  if cfg["block"] not in ("basic", "bottleneck"):
    raise ConfigError("unknown ResNet block", value=repr(cfg["block"]), hint="basic or bottleneck")
  if cfg["max_pool_impl"] not in MAX_POOL_IMPLS:
    raise ConfigError("unknown max-pool implementation", where="max_pool_impl",
                      value=repr(cfg["max_pool_impl"]), hint=" or ".join(map(repr, MAX_POOL_IMPLS)))
  if cfg["stem_conv_impl"] not in STEM_CONV_IMPLS:
    raise ConfigError("unknown stem convolution implementation", where="stem_conv_impl",
                      value=repr(cfg["stem_conv_impl"]), hint=" or ".join(map(repr, STEM_CONV_IMPLS)))
  m = cfg["bn_momentum"]
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
    raise ConfigError("BatchNorm momentum must be in [0, 1)", where="bn_momentum", value=repr(m),
                      hint="flax's convention: the old statistics' weight, 0.9 for torch's momentum=0.1")
  cfg["bn_momentum"] = float(m)
  if len(cfg["depths"]) != len(cfg["widths"]) or not cfg["depths"]:
    raise ConfigError("ResNet depths and widths differ in length",
                      value=f"{cfg['depths']} vs {cfg['widths']}")
  return cfg


def bit_variant(name: str) -> str:
  """The BiT variant key (``R50x1``) of a BiT npz variant or a timm ``resnetv2_*_bit`` name."""
  base = name.split(".", 1)[0]
  m = _BIT_NAME.fullmatch(base) or _TIMM_BIT_NAME.fullmatch(base)
  key = f"R{m.group(1)}x{m.group(2)}" if m else None
  if key not in BIT_VARIANTS:
    raise _variant_error("BiT ResNetV2 variant", name, BIT_VARIANTS)
  return key


def v2_config(arch: Mapping[str, Any]) -> dict[str, Any]:
  """``{"variant": "R50x1"}`` or ``{"depths": (...), "width_factor": k}`` -> depths, width_factor.

  >>> v2_config({"variant": "R152x2"})
  {'depths': (3, 8, 36, 3), 'width_factor': 2}
  """
  arch = dict(arch)
  unknown = set(arch) - {"variant", "depths", "width_factor"}
  if unknown:
    raise ConfigError("unknown ResNetV2 arch key", value=", ".join(sorted(unknown)),
                      hint="keys: variant, or depths and width_factor")
  if "variant" in arch:
    if len(arch) > 1:
      raise ConfigError("ResNetV2 arch gives both a variant and its structure", value=repr(arch))
    depths, wf = BIT_VARIANTS[bit_variant(arch["variant"])]
  elif {"depths", "width_factor"} <= set(arch):
    depths, wf = arch["depths"], arch["width_factor"]
  else:
    raise ConfigError("ResNetV2 arch needs a variant or depths and width_factor", value=repr(arch))
  return {"depths": tuple(int(d) for d in depths), "width_factor": int(wf)}


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

# torchvision and timm initialise convs with kaiming-normal, fan_out, for ReLU.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding: int):
  """Max-pool over the two spatial axes of NHWC ``x``, padded with -inf like torch.

  The values of ``nn.max_pool(x, (window,) * 2, (stride,) * 2, ((padding,) * 2,) * 2)``;
  the gradient goes, as there, in torch and in XLA's select-and-scatter, to the
  first maximum of each window in row-major order, but is formed by gathering:
  each input element sums the output gradients of the windows (at most
  ``ceil(window / stride)**2`` of them) that chose it.  JAX's own gradient is a
  select-and-scatter, which XLA:GPU lowers to a window reduction writing four
  int32 index maps, a zeroed padded buffer and a scatter into it (ResNet-50's
  stem at batch 256: about 3.5 GiB of traffic a step, in a step that moves 65);
  here the forward keeps only which tap each window chose (int8, one byte an
  output element) and the backward is one elementwise pass that XLA fuses into
  the BatchNorm backward reading it: 3.6 GiB less traffic a step, in a step that
  moved 65 (deviceless compile).  Sums are taken in float32.

  >>> x = jnp.array([[1., 3., 3.], [0., 2., 5.], [4., 4., 0.]])[None, :, :, None]
  >>> max_pool(x, 3, 2, 1)[0, :, :, 0]
  Array([[3., 5.],
         [4., 5.]], dtype=float32)
  >>> jax.grad(lambda x: max_pool(x, 3, 2, 1).sum())(x)[0, :, :, 0]  # ties: the first one
  Array([[0., 1., 0.],
         [0., 0., 2.],
         [1., 0., 0.]], dtype=float32)
  """
  return _pool_taps(x, window, stride, padding)[0]


def _window_taps(window: int, stride: int, padding: int, size: Sequence[int], out: Sequence[int]):
  """For each tap (di, dj) of the window: where its values sit in the unpadded input.

  Yields the tap's index in row-major order and the ``lax.pad`` config (low, high,
  interior) per spatial axis that moves an output-sized map onto the input's grid.
  """
  for k in range(window * window):
    taps = divmod(k, window)
    yield k, [(t - padding, n - (t - padding) - ((o - 1) * stride + 1), stride - 1)
              for t, n, o in zip(taps, size, out)]


def _pool_taps(x, window, stride, padding):
  """The max-pool of ``x`` and each tap's values over all windows (row-major taps)."""
  if window * window > 127:
    raise ConfigError("max-pool window too large for its int8 tap index", value=window, hint="at most 11")
  size = x.shape[1:3]
  out = [(n + 2 * padding - window) // stride + 1 for n in size]
  neg = jnp.array(-jnp.inf, x.dtype)
  y, taps = None, []
  for _, cfg in _window_taps(window, stride, padding, size, out):
    # The inverse of the backward's placement: x's values under this tap, window by window.
    xk = jax.lax.pad(x, neg, [(0, 0, 0), *[(-lo, -hi, 0) for lo, hi, _ in cfg], (0, 0, 0)])
    xk = xk[:, ::stride, ::stride][:, :out[0], :out[1]]
    y = xk if y is None else jnp.maximum(y, xk)
    taps.append(xk)
  return y, taps


def _max_pool_fwd(x, window, stride, padding):
  y, taps = _pool_taps(x, window, stride, padding)
  # Which tap each window chose: the first (row-major) equal to the maximum, or a NaN.
  chosen = jnp.full(y.shape, window * window, jnp.int8)
  for k in reversed(range(len(taps))):
    chosen = jnp.where((taps[k] == y) | jnp.isnan(taps[k]), jnp.int8(k), chosen)
  # The input's height, width and dtype, for the backward, in an array with no elements.
  return y, (chosen, jnp.zeros((0, *x.shape[1:3], 0), x.dtype))


def _max_pool_bwd(window, stride, padding, res, g):
  chosen, like = res
  size = like.shape[1:3]
  gf = g.astype(jnp.float32)
  dx = jnp.zeros((g.shape[0], *size, g.shape[3]), jnp.float32)
  for k, cfg in _window_taps(window, stride, padding, size, g.shape[1:3]):
    dx = dx + jax.lax.pad(jnp.where(chosen == k, gf, 0.0), jnp.float32(0),
                          [(0, 0, 0), *cfg, (0, 0, 0)])
  return (dx.astype(like.dtype),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  # torch pads k // 2 on every side; flax's "SAME" would pad stride-2 convs asymmetrically.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class StdConv(nn.Module):
  """Weight-standardised convolution (BiT): each output filter is normalised to mean 0, var 1.

  Padding is timm's ``get_padding``: ``((stride - 1) + (kernel - 1)) // 2`` on every side.
  """

  features: int
  kernel: int
  stride: int = 1
  eps: float = WS_EPS
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", _conv_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                   jnp.float32)
    mean = k.mean((0, 1, 2), keepdims=True)
    var = jnp.square(k - mean).mean((0, 1, 2), keepdims=True)  # biased, as torch's batch_norm
    w = (k - mean) * jax.lax.rsqrt(var + self.eps)
    dtype = self.dtype or x.dtype
    pad = ((self.stride - 1) + (self.kernel - 1)) // 2
    return jax.lax.conv_general_dilated(
        x.astype(dtype), w.astype(dtype), (self.stride, self.stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Downsample(nn.Module):
  """The projection shortcut: a strided 1x1 conv (v1: and a BatchNorm)."""

  features: int
  stride: int
  v2: bool = False
  use_running_average: FrozenBN = True
  dtype: Any = None
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x):
    if self.v2:
      return StdConv(self.features, 1, self.stride, dtype=self.dtype, name="conv")(x)
    x = _conv(self.features, 1, self.stride, self.dtype, "conv")(x)
    return BatchNorm(self.use_running_average, self.bn_momentum, dtype=self.dtype, name="bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs, stride on the first."""

  width: int
  stride: int = 1
  project: bool = False
  use_running_average: FrozenBN = True
  zero_init_residual: bool = False
  dtype: Any = None
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x):
    bn = lambda name, **kw: BatchNorm(self.use_running_average, self.bn_momentum, dtype=self.dtype,
                                      name=name, **kw)
    y = nn.relu(bn("bn1")(_conv(self.width, 3, self.stride, self.dtype, "conv1")(x)))
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = bn("bn2", scale_init=last_init)(_conv(self.width, 3, 1, self.dtype, "conv2")(y))
    if self.project:
      x = Downsample(self.width, self.stride, use_running_average=self.use_running_average,
                     dtype=self.dtype, bn_momentum=self.bn_momentum, name="downsample")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 channels); the stride sits on the 3x3 ("v1.5") unless stride_in_1x1."""

  width: int  # output channels; the inner convs have width // 4
  stride: int = 1
  project: bool = False
  stride_in_1x1: bool = False
  use_running_average: FrozenBN = True
  zero_init_residual: bool = False
  dtype: Any = None
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x):
    bn = lambda name, **kw: BatchNorm(self.use_running_average, self.bn_momentum, dtype=self.dtype,
                                      name=name, **kw)
    mid = self.width // 4
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = nn.relu(bn("bn1")(_conv(mid, 1, s1, self.dtype, "conv1")(x)))
    y = nn.relu(bn("bn2")(_conv(mid, 3, s3, self.dtype, "conv2")(y)))
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = bn("bn3", scale_init=last_init)(_conv(self.width, 1, 1, self.dtype, "conv3")(y))
    if self.project:
      x = Downsample(self.width, self.stride, use_running_average=self.use_running_average,
                     dtype=self.dtype, bn_momentum=self.bn_momentum, name="downsample")(x)
    return nn.relu(y + x)


class SpaceToDepthConv(nn.Module):
  """A k x k convolution with stride 2 and padding k // 2 (torch's), computed on 2 x 2 blocks.

  The parameters, initial values and function of :func:`_conv` ``(features, k, 2)``
  (``kernel`` (k, k, C, features), no bias).  The padded image's 2 x 2 blocks become
  channels (C -> 4C, half the height and width) and the kernel, zero-padded to an even
  size, is rearranged alike into a ceil(k / 2)-square kernel with stride 1: for
  ResNet's stem, a 4 x 4 convolution over 12 channels instead of a 7 x 7 one over 3, a
  third more multiplications (the zero row and column) but four times the channels a
  tap (MLPerf's TPU ResNet-50 stem).  On an H100, cuDNN ran the 7 x 7 stem at about 17
  TFLOP/s (session 8 profile: 1.82 ms forward, 1.17 for its filter gradient, of a
  44.9 ms step).

  >>> x = jax.random.normal(jax.random.key(0), (2, 33, 30, 3))
  >>> conv = _conv(8, 7, 2, None, "conv")
  >>> v = SpaceToDepthConv(8, 7).init(jax.random.key(1), x)
  >>> jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v, conv.init(jax.random.key(1), x))
  {'params': {'kernel': True}}
  >>> y, want = SpaceToDepthConv(8, 7).apply(v, x), conv.apply(v, x)
  >>> y.shape, bool(jnp.allclose(y, want, atol=1e-5))
  ((2, 17, 15, 8), True)
  """

  features: int
  kernel_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", _conv_init, (k, k, c, self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    h, w = x.shape[1:3]
    pad, half = k // 2, (k + 1) // 2
    # Pad as torch does, plus a row / column at the end where the padded size is odd: that
    # one only ever meets the kernel's zero row / column.
    x = jnp.pad(x, ((0, 0), (pad, pad + (h + 2 * pad) % 2), (pad, pad + (w + 2 * pad) % 2), (0, 0)))
    kernel = jnp.pad(kernel, ((0, 2 * half - k), (0, 2 * half - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(half, 2, half, 2, c, self.features).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(half, half, 4 * c, self.features)
    return jax.lax.conv_general_dilated(space_to_depth(x, 2), kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class StemV1(nn.Module):
  """7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool (padding 1, -inf like torch)."""

  width: int
  use_running_average: FrozenBN = True
  dtype: Any = None
  max_pool_impl: str = "ftjax"
  conv_impl: str = "flax"
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x):
    if self.conv_impl == "space_to_depth":
      x = SpaceToDepthConv(self.width, 7, self.dtype, name="conv")(x)
    else:
      x = _conv(self.width, 7, 2, self.dtype, "conv")(x)
    x = nn.relu(BatchNorm(self.use_running_average, self.bn_momentum, dtype=self.dtype, name="bn")(x))
    if self.max_pool_impl == "flax":
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return max_pool(x, 3, 2, 1)


def _global_pool_head(x, num_classes: int, dtype, kernel_init=nn.initializers.lecun_normal()):
  x = x.astype(jnp.float32).mean(axis=(1, 2))
  logits = nn.Dense(num_classes, kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                    name="head")(x)
  # Losses and metrics want float32 logits whatever the compute dtype.
  return logits.astype(jnp.float32)


class StageV1(nn.Module):
  """``depth`` v1 blocks; the first one strides and projects when the shape changes."""

  depth: int
  width: int
  stride: int
  in_channels: int
  block: str = "bottleneck"
  stride_in_1x1: bool = False
  use_running_average: FrozenBN = True
  zero_init_residual: bool = False
  dtype: Any = None
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x):
    for b in range(self.depth):
      stride = self.stride if b == 0 else 1
      project = b == 0 and (stride != 1 or self.in_channels != self.width)
      kw = dict(width=self.width, stride=stride, project=project,
                use_running_average=self.use_running_average,
                zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                bn_momentum=self.bn_momentum, name=f"block{b}")
      if self.block == "basic":
        x = BasicBlock(**kw)(x)
      else:
        x = Bottleneck(stride_in_1x1=self.stride_in_1x1, **kw)(x)
    return x


class ResNet(nn.Module):
  """ResNet v1 with BatchNorm: ``apply(variables, x, train=False)``; NHWC input, float32 logits.

  ``train=True`` normalises with batch statistics and updates ``batch_stats``
  (pass ``mutable=["batch_stats"]``) unless ``frozen_bn``.

  >>> model = ResNet(num_classes=5, block="basic", depths=(1, 1), widths=(8, 16), stem_width=8)
  >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> sorted(shapes["params"])
  ['head', 'stage1', 'stage2', 'stem']
  >>> shapes["params"]["stage2"]["block0"]["downsample"]["conv"]["kernel"].shape
  (1, 1, 8, 16)
  """

  num_classes: int
  block: str
  depths: Sequence[int]
  widths: Sequence[int]
  stem_width: int = 64
  stride_in_1x1: bool = False
  first_stage_stride: int = 1
  frozen_bn: FrozenBN = False  # True, or the '/'-paths of the frozen BatchNorm layers
  zero_init_residual: bool = False
  max_pool_impl: str = "ftjax"
  stem_conv_impl: str = "flax"
  dtype: Any = None
  bn_momentum: float = BN_MOMENTUM  # flax's convention: torch's momentum=0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_ra = self.frozen_bn if train else True
    x = StemV1(self.stem_width, use_ra, self.dtype, self.max_pool_impl, self.stem_conv_impl,
               self.bn_momentum, name="stem")(x)
    channels = self.stem_width
    for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
      x = StageV1(depth=depth, width=width, stride=self.first_stage_stride if s == 0 else 2,
                  in_channels=channels, block=self.block, stride_in_1x1=self.stride_in_1x1,
                  use_running_average=use_ra, zero_init_residual=self.zero_init_residual,
                  dtype=self.dtype, bn_momentum=self.bn_momentum, name=f"stage{s + 1}")(x)
      channels = width
    return _global_pool_head(x, self.num_classes, self.dtype)


# ---------------------------------------------------------------------------------------------
# BiT ResNetV2
# ---------------------------------------------------------------------------------------------

def _group_norm(dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance: torch's group_norm is not the E[x^2] - E[x]^2 shortcut.
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class StemV2(nn.Module):
  """Weight-standardised 7x7/2 conv, then BiT's fixed padding: pad 1 with zeros, 3x3/2 max-pool.

  The stem output is not activated (pre-activation net), so padding with zeros
  rather than -inf changes border values; BiT and timm's ``stem_type="fixed"`` do this.
  """

  width: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.width, 7, 2, dtype=self.dtype, name="conv")(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return max_pool(x, 3, 2, 0)


class PreActBottleneck(nn.Module):
  """BiT unit: GN-ReLU -> 1x1 -> GN-ReLU -> 3x3 (stride) -> GN-ReLU -> 1x1, plus the shortcut.

  The projection shortcut reads the pre-activated input, as in BiT and timm.
  """

  width: int  # output channels; the inner convs have width // 4
  stride: int = 1
  project: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    mid = self.width // 4
    pre = nn.relu(_group_norm(self.dtype, "norm1")(x))
    shortcut = x
    if self.project:
      shortcut = Downsample(self.width, self.stride, v2=True, dtype=self.dtype, name="downsample")(pre)
    y = StdConv(mid, 1, dtype=self.dtype, name="conv1")(pre)
    y = StdConv(mid, 3, self.stride, dtype=self.dtype, name="conv2")(
        nn.relu(_group_norm(self.dtype, "norm2")(y)))
    y = StdConv(self.width, 1, dtype=self.dtype, name="conv3")(
        nn.relu(_group_norm(self.dtype, "norm3")(y)))
    return y + shortcut


class StageV2(nn.Module):
  """``depth`` BiT units; the first strides (except in stage 1) and projects."""

  depth: int
  width: int
  stride: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    for b in range(self.depth):
      # BiT projects in the first unit of every stage, even where the shape stays.
      x = PreActBottleneck(self.width, self.stride if b == 0 else 1, project=b == 0,
                           dtype=self.dtype, name=f"block{b}")(x)
    return x


class ResNetV2(nn.Module):
  """BiT ResNetV2: ``apply(variables, x, train=False)``; no batch statistics (GroupNorm).

  >>> model = ResNetV2(num_classes=3, depths=(1,), width_factor=1)
  >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> sorted(shapes["params"]), shapes["params"]["stage1"]["block0"]["conv2"]["kernel"].shape
  (['head', 'norm', 'stage1', 'stem'], (3, 3, 64, 64))
  """

  num_classes: int
  depths: Sequence[int]
  width_factor: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no batch statistics
    wf = self.width_factor
    x = StemV2(64 * wf, self.dtype, name="stem")(x)
    for s, depth in enumerate(self.depths):
      x = StageV2(depth, 256 * wf * 2**s, 1 if s == 0 else 2, self.dtype, name=f"stage{s + 1}")(x)
    x = nn.relu(_group_norm(self.dtype, "norm")(x))
    return _global_pool_head(x, self.num_classes, self.dtype, nn.initializers.normal(0.01))


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

def check_image_size(arch: dict, image_size: tuple[int, int]) -> None:
  """Convolutional nets take any positive size; nothing in their parameters depends on it."""
  if min(image_size) <= 0:
    raise ConfigError("image size must be positive", where="image_size",
                      value=f"{image_size[0]}x{image_size[1]}")


def create_resnet(arch: dict, num_classes: int, dtype=None) -> ResNet:
  """The ResNet v1 module for an arch dict (see :func:`v1_config`)."""
  return ResNet(num_classes=num_classes, dtype=dtype, **v1_config(arch))


def create_resnetv2(arch: dict, num_classes: int, dtype=None) -> ResNetV2:
  """The BiT ResNetV2 module for an arch dict (see :func:`v2_config`).

  ``frozen_bn`` is accepted and has nothing to do: GroupNorm keeps no statistics,
  so a trainer may pass it to every family alike.
  """
  arch = {k: v for k, v in arch.items() if k != "frozen_bn"}
  return ResNetV2(num_classes=num_classes, dtype=dtype, **v2_config(arch))


RESNET = Family("resnet", create_resnet, check_image_size=check_image_size)
RESNETV2 = Family("resnetv2", create_resnetv2, check_image_size=check_image_size)


# ---------------------------------------------------------------------------------------------
# Checkpoint converters
# ---------------------------------------------------------------------------------------------

# Each rule: (regex fully matching a checkpoint module path, ftjax module path from the match,
# layer kind).  The kind says how the module's tensors map (see _torch_leaves).
Rule = tuple[str, Callable[[re.Match], str], str]


def _blk(m: re.Match, stage_offset: int) -> str:
  return f"stage{int(m[1]) + stage_offset}/block{int(m[2])}"


_TORCH_V1_RULES: list[Rule] = [  # torchvision and timm resnet*
    (r"conv1", lambda m: "stem/conv", "conv"),
    (r"bn1", lambda m: "stem/bn", "bn"),
    (r"layer(\d+)\.(\d+)\.conv(\d)", lambda m: f"{_blk(m, 0)}/conv{m[3]}", "conv"),
    (r"layer(\d+)\.(\d+)\.bn(\d)", lambda m: f"{_blk(m, 0)}/bn{m[3]}", "bn"),
    (r"layer(\d+)\.(\d+)\.downsample\.0", lambda m: f"{_blk(m, 0)}/downsample/conv", "conv"),
    (r"layer(\d+)\.(\d+)\.downsample\.1", lambda m: f"{_blk(m, 0)}/downsample/bn", "bn"),
    (r"fc", lambda m: "head", "dense"),
]

_HF_STAGE = r"(?:resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)"
_HF_V1_RULES: list[Rule] = [  # transformers ResNetForImageClassification / ResNetModel
    (r"(?:resnet\.)?embedder\.embedder\.convolution", lambda m: "stem/conv", "conv"),
    (r"(?:resnet\.)?embedder\.embedder\.normalization", lambda m: "stem/bn", "bn"),
    (_HF_STAGE + r"\.layer\.(\d+)\.convolution", lambda m: f"{_blk(m, 1)}/conv{int(m[3]) + 1}", "conv"),
    (_HF_STAGE + r"\.layer\.(\d+)\.normalization", lambda m: f"{_blk(m, 1)}/bn{int(m[3]) + 1}", "bn"),
    (_HF_STAGE + r"\.shortcut\.convolution", lambda m: f"{_blk(m, 1)}/downsample/conv", "conv"),
    (_HF_STAGE + r"\.shortcut\.normalization", lambda m: f"{_blk(m, 1)}/downsample/bn", "bn"),
    (r"classifier\.1", lambda m: "head", "dense"),
]

_TIMM_STAGE = r"stages\.(\d+)\.blocks\.(\d+)"
_TIMM_V2_RULES: list[Rule] = [  # timm resnetv2_*_bit
    (r"stem\.conv", lambda m: "stem/conv", "conv"),
    (_TIMM_STAGE + r"\.norm(\d)", lambda m: f"{_blk(m, 1)}/norm{m[3]}", "gn"),
    (_TIMM_STAGE + r"\.conv(\d)", lambda m: f"{_blk(m, 1)}/conv{m[3]}", "conv"),
    (_TIMM_STAGE + r"\.downsample\.conv", lambda m: f"{_blk(m, 1)}/downsample/conv", "conv"),
    (r"norm", lambda m: "norm", "gn"),
    (r"head\.fc", lambda m: "head", "dense"),
]

_BIT_UNIT = r"resnet/block(\d+)/unit(\d+)"
_BIT_CONV = {"a": "1", "b": "2", "c": "3"}
_BIT_LEAF = {"gamma": "scale", "beta": "bias"}
# BiT .npz keys are already HWIO / flat; rules map whole keys: (regex, ftjax path, kind).
_BIT_NPZ_RULES: list[Rule] = [
    (r"resnet/root_block/standardized_conv2d/kernel", lambda m: "params/stem/conv/kernel", "hwio"),
    (_BIT_UNIT + r"/([abc])/standardized_conv2d/kernel",
     lambda m: f"params/stage{m[1]}/block{int(m[2]) - 1}/conv{_BIT_CONV[m[3]]}/kernel", "hwio"),
    (_BIT_UNIT + r"/([abc])/group_norm/(gamma|beta)",
     lambda m: f"params/stage{m[1]}/block{int(m[2]) - 1}/norm{_BIT_CONV[m[3]]}/{_BIT_LEAF[m[4]]}",
     "vector"),
    (_BIT_UNIT + r"/a/proj/standardized_conv2d/kernel",
     lambda m: f"params/stage{m[1]}/block{int(m[2]) - 1}/downsample/conv/kernel", "hwio"),
    (r"resnet/group_norm/(gamma|beta)", lambda m: f"params/norm/{_BIT_LEAF[m[1]]}", "vector"),
    (r"resnet/head/conv2d/kernel", lambda m: "params/head/kernel", "conv1x1_dense"),
    (r"resnet/head/conv2d/bias", lambda m: "params/head/bias", "vector"),
]


def _match_rule(key: str, rules: Sequence[Rule]) -> tuple[str, str] | None:
  for rx, to_path, kind in rules:
    m = re.fullmatch(rx, key)
    if m:
      return to_path(m), kind
  return None


def _unexpected(key: str, arr: np.ndarray, fmt: str) -> CheckpointError:
  return CheckpointError(f"{fmt} checkpoint holds a tensor no ResNet layer has", where=key,
                         value=f"shape {tuple(arr.shape)}",
                         hint="a checkpoint for another architecture, or the wrong source form?")


def _torch_leaf(kind: str, module: str, key: str, arr: np.ndarray) -> tuple[str, np.ndarray] | None:
  """One PyTorch tensor -> (ftjax variable path, array in Flax layout); None for dropped ones."""
  leaf = key.rpartition(".")[2]
  if kind == "conv" and leaf == "weight" and arr.ndim == 4:
    return f"params/{module}/kernel", arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == "dense" and leaf == "weight" and (arr.ndim == 2 or arr.shape[2:] == (1, 1)):
    # timm BiT's head is a 1x1 conv on the pooled features: (out, in, 1, 1).
    return f"params/{module}/kernel", arr.reshape(arr.shape[:2]).T  # (out, in) -> (in, out)
  if kind in ("bn", "gn", "dense") and leaf in ("weight", "bias") and arr.ndim == 1:
    return f"params/{module}/{'scale' if leaf == 'weight' else 'bias'}", arr
  if kind == "bn" and leaf in ("running_mean", "running_var") and arr.ndim == 1:
    return f"batch_stats/{module}/{leaf[len('running_'):]}", arr
  if kind == "bn" and leaf == "num_batches_tracked":
    return None
  raise _unexpected(key, arr, "PyTorch")


def _convert_torch(tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], fmt: str
                   ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
  """A PyTorch-layout state dict -> flat ftjax variables, plus what was deliberately dropped."""
  out: dict[str, np.ndarray] = {}
  counters = 0
  for key, arr in tensors.items():
    hit = _match_rule(key.rpartition(".")[0], rules)
    if hit is None:
      raise _unexpected(key, arr, fmt)
    mapped = _torch_leaf(hit[1], hit[0], key, arr)
    if mapped is None:
      counters += 1
    else:
      out[mapped[0]] = mapped[1]
  dropped = []
  if counters:
    dropped.append((f"*.num_batches_tracked ({counters} tensors)",
                    "BatchNorm step counters; ftjax's BatchNorm uses a fixed momentum"))
  return out, dropped


def _head_classes(variables: Mapping[str, np.ndarray]) -> int:
  kernel = variables.get("params/head/kernel")
  return int(kernel.shape[-1]) if kernel is not None else 0


def convert_torchvision(arch: str, state_dict: Mapping[str, np.ndarray]) -> Converted:
  """A torchvision ``resnet18`` ... ``resnet152`` state dict -> :class:`Converted`."""
  if arch not in V1_VARIANTS or arch in ("resnet26", "resnet200"):
    raise ConfigError("unsupported torchvision architecture", value=repr(arch),
                      hint="resnet18, resnet34, resnet50, resnet101 or resnet152")
  variables, dropped = _convert_torch(state_dict, _TORCH_V1_RULES, "torchvision")
  return Converted(family="resnet", arch={"variant": arch}, num_classes=_head_classes(variables),
                   image_size=(224, 224), variables=variables, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   dropped=dropped)


def _timm_image_size(tag: str) -> tuple[int, int]:
  # From timm's pretrained cfgs: BiT in21k->in1k fine-tunes run at 448, "_384" tags at 384.
  if tag.endswith("_384"):
    return (384, 384)
  if tag == "goog_in21k_ft_in1k":
    return (448, 448)
  return (224, 224)


# timm's ResNet tags trained on inputs scaled to [-1, 1] (their pretrained cfgs' mean and std
# 0.5); every other tag of the supported names has ImageNet's.
_TIMM_HALF_TAGS = ("ra4_e3600_r224_in1k", "ra4_e3600_r384_in1k", "ah_in1k")


def timm_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of a timm ResNet name's pretrained cfg (``.tag`` decides).

  >>> timm_stats("resnet34.ra4_e3600_r224_in1k")[0], timm_stats("resnet50.a1_in1k")[0]
  ((0.5, 0.5, 0.5), (0.485, 0.456, 0.406))
  """
  base, _, tag = name.partition(".")
  if base.startswith("resnetv2_"):
    return INCEPTION_MEAN, INCEPTION_STD
  if tag in _TIMM_HALF_TAGS:
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  return IMAGENET_MEAN, IMAGENET_STD


def convert_timm(name: str, tensors: Mapping[str, np.ndarray]) -> Converted:
  """timm ``resnet18/26/34/50/101/152/200`` or ``resnetv2_{50x1,...}_bit`` (``.tag`` allowed)."""
  base, _, tag = name.partition(".")
  if base.startswith("resnetv2_"):
    if not _TIMM_BIT_NAME.fullmatch(base):
      raise ConfigError("unsupported timm ResNetV2 model", value=repr(name),
                        hint="only the BiT models resnetv2_{50x1,50x3,101x1,101x3,152x2,152x4}_bit")
    variant = bit_variant(base)
    variables, dropped = _convert_torch(tensors, _TIMM_V2_RULES, "timm")
    return Converted(family="resnetv2", arch={"variant": variant}, num_classes=_head_classes(variables),
                     image_size=_timm_image_size(tag), variables=variables, mean=INCEPTION_MEAN,
                     std=INCEPTION_STD, dropped=dropped)
  if base not in V1_VARIANTS:
    raise ConfigError("unsupported timm ResNet model", value=repr(name),
                      hint=f"one of {sorted(V1_VARIANTS)} or resnetv2_*_bit (the d/t/s variants differ)")
  variables, dropped = _convert_torch(tensors, _TORCH_V1_RULES, "timm")
  mean, std = timm_stats(name)
  return Converted(family="resnet", arch={"variant": base}, num_classes=_head_classes(variables),
                   image_size=(224, 224), variables=variables, mean=mean, std=std, dropped=dropped)


def hf_arch(config: Mapping[str, Any]) -> dict[str, Any]:
  """A transformers ``ResNetConfig`` (config.json dict) -> ftjax ResNet arch dict.

  Missing keys take transformers' defaults (a ResNet-50).

  >>> arch = hf_arch({"layer_type": "basic", "depths": [2, 2], "hidden_sizes": [8, 16],
  ...                 "embedding_size": 8, "downsample_in_first_stage": True})
  >>> arch["block"], arch["widths"], arch["stem_width"], arch["first_stage_stride"]
  ('basic', [8, 16], 8, 2)
  """
  act = config.get("hidden_act", "relu")
  if act != "relu":
    raise CheckpointError("unsupported Hugging Face ResNet activation", where="config.json:hidden_act",
                          value=repr(act), hint="ftjax's ResNet uses relu")
  where = "config.json"
  if config_number(config, "num_channels", int, where, 3) != 3:
    raise CheckpointError("unsupported Hugging Face ResNet input channels",
                          where="config.json:num_channels", value=config["num_channels"],
                          hint="ftjax models take RGB input")
  block = config.get("layer_type", "bottleneck")
  if block not in ("basic", "bottleneck"):
    raise CheckpointError("unknown Hugging Face ResNet layer_type", where="config.json:layer_type",
                          value=repr(block), hint="basic or bottleneck")
  return {"block": block,
          "depths": config_ints(config, "depths", where, (3, 4, 6, 3)),
          "widths": config_ints(config, "hidden_sizes", where, (256, 512, 1024, 2048)),
          "stem_width": config_number(config, "embedding_size", int, where, 64),
          "stride_in_1x1": bool(config.get("downsample_in_bottleneck", False)),
          "first_stage_stride": 2 if config.get("downsample_in_first_stage", False) else 1}


def _hf_class_names(config: Mapping[str, Any], num_classes: int) -> list[str] | None:
  id2label = config.get("id2label") or {}
  if len(id2label) != num_classes or not num_classes:
    return None
  names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(num_classes)]
  # transformers writes LABEL_0, LABEL_1, ... when nobody named the classes: no information.
  if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
    return None
  return names


def convert_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
               preprocessor: Mapping[str, Any] | None = None) -> Converted:
  """A transformers ``ResNetForImageClassification`` (or ``ResNetModel``) checkpoint.

  ``preprocessor`` (preprocessor_config.json) overrides the ImageNet mean/std when given.
  """
  arch = hf_arch(config)
  variables, dropped = _convert_torch(tensors, _HF_V1_RULES, "Hugging Face ResNet")
  classes = _head_classes(variables)
  prep = preprocessor or {}
  return Converted(family="resnet", arch=arch, num_classes=classes, image_size=(224, 224),
                   variables=variables, mean=tuple(float(v) for v in prep.get("image_mean", IMAGENET_MEAN)),
                   std=tuple(float(v) for v in prep.get("image_std", IMAGENET_STD)),
                   class_names=_hf_class_names(config, classes), dropped=dropped)


def _bit_leaf(kind: str, key: str, arr: np.ndarray) -> np.ndarray:
  if kind == "hwio" and arr.ndim == 4:
    return arr
  if kind == "vector" and arr.size == max(arr.shape, default=1) and arr.ndim >= 1:
    return arr.reshape(-1)  # tolerate keep-dims (1, 1, 1, C) exports of GroupNorm vectors
  if kind == "conv1x1_dense" and arr.ndim == 4 and arr.shape[:2] == (1, 1):
    return arr.reshape(arr.shape[2:])
  raise _unexpected(key, arr, "BiT .npz")


def convert_bit_npz(variant: str, arrays: Mapping[str, np.ndarray]) -> Converted:
  """A BiT ``.npz`` (``resnet/root_block/standardized_conv2d/kernel`` ...) -> :class:`Converted`.

  ``variant``: ``R50x1`` or ``BiT-M-R50x1`` style.  The head, a 1x1 conv in the
  file, becomes the dense ``head``.
  """
  key_variant = bit_variant(variant)
  variables = {}
  for key, arr in arrays.items():
    hit = _match_rule(key, _BIT_NPZ_RULES)
    if hit is None:
      raise _unexpected(key, arr, "BiT .npz")
    variables[hit[0]] = _bit_leaf(hit[1], key, arr)
  return Converted(family="resnetv2", arch={"variant": key_variant},
                   num_classes=_head_classes(variables), image_size=(224, 224), variables=variables,
                   mean=INCEPTION_MEAN, std=INCEPTION_STD)


__all__ = ["BIT_VARIANTS", "RESNET", "RESNETV2", "V1_VARIANTS", "BatchNorm", "ResNet", "ResNetV2",
           "StdConv", "bit_variant", "check_image_size", "convert_bit_npz", "convert_hf",
           "convert_timm", "convert_torchvision", "create_resnet", "create_resnetv2", "hf_arch",
           "v1_config", "v2_config"]
