"""Vision Transformer: the Flax module, its variants, checkpoint converters, pos-emb resampling.

The parameter layout is Google's vit_jax / big_vision one, so their ``.npz``
files map 1:1 and the converters for PyTorch layouts (transformers, timm) only
rename and transpose::

  params/embedding/{kernel (p, p, 3, D), bias}
  params/cls                                              (1, 1, D), with a class token
  params/Transformer/posembed_input/pos_embedding         (1, N (+1), D)
  params/Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}
  params/Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/
      {query, key, value}/{kernel (D, heads, head_dim), bias (heads, head_dim)}
      out/{kernel (heads, head_dim, D), bias (D,)}
  params/Transformer/encoderblock_{i}/LayerNorm_2/{scale, bias}
  params/Transformer/encoderblock_{i}/MlpBlock_3/{Dense_0, Dense_1}/{kernel, bias}
  params/Transformer/encoder_norm/{scale, bias}           (norm, then pool)
  params/fc_norm/{scale, bias}                            (instead: pool, then norm; timm avg)
  params/pre_logits/{kernel, bias}                        (optional)
  params/head/{kernel, bias}

>>> model = create_model({"variant": "test"}, num_classes=3)
>>> x = jnp.zeros((2, 32, 32, 3))  # NHWC, normalised
>>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: instant
>>> block = variables["params"]["Transformer"]["encoderblock_0"]
>>> block["MultiHeadDotProductAttention_1"]["query"]["kernel"].shape  # (D, heads, head_dim)
(32, 2, 16)
>>> jax.eval_shape(model.apply, variables, x).shape
(2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models.common import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, Converted, Family,
                                 config_number, space_to_depth)

# --------------------------------------------------------------------------------------------
# Architecture: variants and options.

_DIMS = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size")

VARIANTS: dict[str, dict[str, int]] = {
    name: dict(zip(_DIMS, dims)) for name, dims in {
        "Ti/16": (192, 12, 3, 768, 16),
        "S/16": (384, 12, 6, 1536, 16),
        "S/32": (384, 12, 6, 1536, 32),
        "B/8": (768, 12, 12, 3072, 8),
        "B/16": (768, 12, 12, 3072, 16),
        "B/32": (768, 12, 12, 3072, 32),
        "L/16": (1024, 24, 16, 4096, 16),
        "L/32": (1024, 24, 16, 4096, 32),
        "H/14": (1280, 32, 16, 5120, 14),
        "So400m/14": (1152, 27, 16, 4304, 14),  # SigLIP's shape-optimised tower
        "test": (32, 2, 2, 64, 8),  # tiny, for tests: compiles and runs in well under a second
    }.items()
}

OPTIONS: dict[str, Any] = {
    # "token": the class token's output; "gap": mean of the patch tokens; "map": big_vision's
    # multihead attention pooling (MAPHead_0: a learned probe attends over the patch tokens),
    # as in SigLIP and timm's global_pool="map"; "token_gap": the class token's output and the
    # patch tokens' mean side by side (DINOv2's linear evaluation, transformers'
    # Dinov2ForImageClassification): a head of twice the width.
    "pooling": "token",
    "class_token": None,  # None: a class token exactly when pooling is "token" or "token_gap"
    "reg_tokens": 0,  # register tokens after the class token (timm reg_tokens, DINOv2 "reg4")
    # "learn": a learned table (pos_embedding); "sincos2d": big_vision's fixed 2-D sin-cos
    # table (no parameter; its "Better plain ViT baselines" models), any image size.
    "posemb": "learn",
    # Whether the position embedding has rows for the class (and register) tokens: vit_jax,
    # timm and transformers add it after they are prepended (True); big_vision adds it to
    # the patches before (False: timm's no_embed_class).  None: True for "learn", False for
    # "sincos2d".
    "posemb_class_token": None,
    # LayerScale (CaiT, DeiT III, DINOv2): each block's attention and MLP outputs are scaled
    # per channel by learned vectors started at this value; None: none.
    "layer_scale": None,
    # False: the final norm on all tokens, then pool (vit_jax); True: pool, then norm (timm avg).
    "fc_norm": False,
    "representation_size": None,  # width of the tanh pre-logits layer, None for none
    "layer_norm_eps": 1e-6,  # vit_jax and timm; Hugging Face ViTs use 1e-12
    "dropout_rate": 0.0,
    "attention_dropout_rate": 0.0,
    "droppath_rate": 0.0,  # stochastic depth of the last block; earlier blocks get linearly less (timm)
    "remat": False,  # recompute each block in the backward pass: less memory, ~1/3 more compute
    # "xla": jax.nn.dot_product_attention's XLA lowering (scores materialised, any device);
    # "cudnn": cuDNN flash attention (GPU, 16-bit compute dtype); "auto": cudnn where it
    # applies and is accepted, xla otherwise.  On an H100, ViT-B/16 training at batch 256:
    # attention forward + backward 1.52 ms with cudnn vs 3.38 with xla, the step +27%.
    "attention": "auto",
    # cudnn only: the token axis is zero-padded to a multiple of this (the padding keys
    # masked out): jax 0.11 refuses cuDNN training attention over 197 tokens.
    "attention_pad_multiple": 8,
    # Where that padding happens. "encoder": once, before the first block (the padding
    # tokens go through every block, masked out of attention, and are dropped before the
    # final norm); "attention": around each attention call (q, k, v padded, its output
    # sliced: on an H100 about 1 GB of copies a ViT-B/16 layer at batch 256, per XLA's
    # deviceless compile).  The same logits either way.
    "token_padding": "encoder",
    # True: the tanh GELU (about 1e-3 off); False: the exact erf GELU of ViT, timm and
    # transformers (logit parity), which is also the cheaper one here: see gelu().
    "gelu_approximate": False,
    # True: the attention's key bias is left out (softmax is unchanged by adding the same
    # q.b_k to every key of a query) and its value bias is applied after the output
    # projection, as b_v W_out (the weights of a query sum to one): the same function,
    # rounded differently, without the two [tokens x width] bias adds a layer that a GEMM
    # feeding cuDNN attention cannot absorb (deviceless H100 compile of ViT-B/16 at batch
    # 256: 1.7 GiB fewer bytes written a step, and their reads, and 96 fewer kernels in
    # training).  The key bias stays in the tree (loaded, saved, exported) and gets a zero
    # gradient.  Attention dropout keeps the value bias where it is (dropped weights no
    # longer sum to one).  False: every bias added where the checkpoint's model adds it.
    "fold_attention_bias": True,
    # "ftjax": LayerNorm with its own backward pass, reusing the forward's row statistics
    # (see layer_norm(); the same values as flax's); "flax": flax.linen.LayerNorm,
    # differentiated by JAX.
    "layer_norm_impl": "ftjax",
    # "ftjax": the patch embedding as one matrix product over the image cut into patches
    # (PatchEmbed: the same parameters and function as the convolution); "flax": nn.Conv
    # with stride = kernel = patch, which on an H100 (session 8 profile, ViT-B/16 at batch
    # 256) cuDNN ran at about 32 TFLOP/s: 1.86 ms a step forward, 0.36 backward.
    "patch_embed_impl": "ftjax",
}

POOLINGS = ("token", "gap", "map", "token_gap")
POSEMBS = ("learn", "sincos2d")
ATTENTION = ("xla", "cudnn", "auto")
LAYER_NORM_IMPLS = ("ftjax", "flax")
PATCH_EMBED_IMPLS = ("ftjax", "flax")
TOKEN_PADDING = ("encoder", "attention")
# The implementations that get the token axis padded to attention_pad_multiple.
PADDED_IMPLEMENTATIONS = ("cudnn",)

# <size>/<patch> as Google's file names have it: B/16, ViT-B_16, So400m_14, g/14, ...
_VARIANT_NAME = re.compile(r"(?:vit-)?([a-z][a-z0-9]*)[/_](\d+)", re.IGNORECASE)


def canonical_variant(name: str) -> str:
  """``ViT-B_16``, ``B_16``, ``b/16`` -> ``B/16``; unknown names are a ConfigError.

  >>> canonical_variant("ViT-B_16"), canonical_variant("Ti/16"), canonical_variant("test")
  ('B/16', 'Ti/16', 'test')
  """
  if name in VARIANTS:
    return name
  m = _VARIANT_NAME.fullmatch(name)
  if m:
    canonical = {v.lower(): v for v in VARIANTS}.get(f"{m.group(1)}/{m.group(2)}".lower())
    if canonical is not None:
      return canonical
  raise ConfigError("unknown ViT variant", where="arch.variant", value=repr(name),
                    hint=f"one of {list(VARIANTS)} (or ViT-B_16 style), or give {', '.join(_DIMS)}")


def resolve_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
  """A ViT arch dict (variant name and/or explicit options) -> every field, validated.

  >>> a = resolve_arch({"variant": "B/16", "pooling": "gap"})
  >>> a["hidden_size"], a["num_heads"], a["class_token"], a["fc_norm"]
  (768, 12, False, False)
  >>> resolve_arch({"variant": "B/16", "dropout": 0.1})  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unknown ViT arch option (arch): 'dropout'; known: variant, ...
  """
  unknown = sorted(set(arch) - {"variant", *_DIMS, *OPTIONS})
  if unknown:
    raise ConfigError("unknown ViT arch option", where="arch", value=", ".join(map(repr, unknown)),
                      hint=f"known: {', '.join(['variant', *_DIMS, *OPTIONS])}")
  out: dict[str, Any] = dict(OPTIONS)
  if arch.get("variant") is not None:
    out.update(VARIANTS[canonical_variant(arch["variant"])])
  out.update({k: v for k, v in arch.items() if k != "variant"})
  missing = [k for k in _DIMS if out.get(k) is None]
  if missing:
    raise ConfigError("ViT arch needs a variant or explicit dimensions", where="arch",
                      value=", ".join(missing),
                      hint=f"e.g. {{'variant': 'B/16'}}; variants: {list(VARIANTS)}")
  for k in _DIMS:
    if not isinstance(out[k], (int, np.integer)) or isinstance(out[k], bool) or out[k] <= 0:
      raise ConfigError("ViT dimension must be a positive integer", where=f"arch.{k}", value=out[k])
    out[k] = int(out[k])
  if out["hidden_size"] % out["num_heads"]:
    raise ConfigError("hidden_size must be divisible by num_heads", where="arch",
                      value=f"{out['hidden_size']} / {out['num_heads']}")
  if out["pooling"] not in POOLINGS:
    raise ConfigError("unknown ViT pooling", where="arch.pooling", value=repr(out["pooling"]),
                      hint=f"one of {list(POOLINGS)}")
  if out["class_token"] is None:
    out["class_token"] = out["pooling"] in ("token", "token_gap")
  if out["pooling"] in ("token", "token_gap") and not out["class_token"]:
    raise ConfigError(f"{out['pooling']} pooling needs a class token", where="arch.class_token", value=False)
  if out["posemb"] not in POSEMBS:
    raise ConfigError("unknown ViT position embedding", where="arch.posemb", value=repr(out["posemb"]),
                      hint=f"one of {list(POSEMBS)}")
  if out["posemb_class_token"] is None:
    out["posemb_class_token"] = out["posemb"] == "learn"
  if out["posemb"] == "sincos2d":
    if out["posemb_class_token"]:
      raise ConfigError("a sincos2d table has no class-token row", where="arch.posemb_class_token",
                        value=True, hint="leave it None (False) with posemb 'sincos2d'")
    if out["hidden_size"] % 4 or out["hidden_size"] < 8:
      raise ConfigError("sincos2d position embedding needs hidden_size a multiple of 4, at least 8",
                        where="arch.hidden_size", value=out["hidden_size"])
  reg = out["reg_tokens"]
  if isinstance(reg, bool) or not isinstance(reg, (int, np.integer)) or reg < 0:
    raise ConfigError("reg_tokens must be a non-negative integer", where="arch.reg_tokens", value=repr(reg))
  out["reg_tokens"] = int(reg)
  out["posemb_class_token"] = bool(out["posemb_class_token"]) and bool(out["class_token"] or reg)
  scale = out["layer_scale"]
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))
                            or not scale > 0):
    raise ConfigError("layer_scale must be a positive initial value or None", where="arch.layer_scale",
                      value=repr(scale))
  for k in ("dropout_rate", "attention_dropout_rate", "droppath_rate"):
    if not 0.0 <= float(out[k]) < 1.0:
      raise ConfigError("rate must be in [0, 1)", where=f"arch.{k}", value=out[k])
  for key, what, choices in (("attention", "attention implementation", ATTENTION),
                             ("token_padding", "token_padding", TOKEN_PADDING),
                             ("layer_norm_impl", "layer_norm_impl", LAYER_NORM_IMPLS),
                             ("patch_embed_impl", "patch_embed_impl", PATCH_EMBED_IMPLS)):
    if out[key] not in choices:
      raise ConfigError(f"unknown ViT {what}", where=f"arch.{key}", value=repr(out[key]),
                        hint=f"one of {list(choices)}")
  if out["attention"] == "cudnn" and out["attention_dropout_rate"] > 0:
    raise ConfigError("cuDNN attention has no attention dropout", where="arch.attention",
                      value="'cudnn'", hint="attention 'xla' or 'auto', or attention_dropout_rate 0")
  pad = out["attention_pad_multiple"]
  if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool) or pad < 1:
    raise ConfigError("attention_pad_multiple must be a positive integer",
                      where="arch.attention_pad_multiple", value=repr(pad))
  return out


# --------------------------------------------------------------------------------------------
# The Flax module.

_xavier = nn.initializers.xavier_uniform()


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches to ``features`` channels: NHWC in, (n, h/p, w/p, features) out.

  The function and parameters of ``nn.Conv(features, (p, p), strides=(p, p),
  padding="VALID")`` (``kernel`` (p, p, C, features), ``bias``; the same initial
  values), computed on the image cut into its patches: each patch flattened in
  the kernel's (row, column, channel) order, then a 1 x 1 convolution with the
  kernel flattened alike, a matrix product over p * p * C inputs.  The strided
  convolution reads C = 3 channels a tap: on an H100, cuDNN ran ViT-B/16's at
  about 32 TFLOP/s (session 8 profile, batch 256: 1.86 ms a step forward, 0.36
  backward).  A 1 x 1 convolution rather than a ``dot``: XLA's GPU compiler
  keeps the NHWC layout a cuDNN convolution fixes, while after a ``dot`` its
  layout assignment laid a training step's whole residual stream out batch-minor
  (deviceless H100 compile: 426 transposes, 19 GiB written by elementwise
  kernels instead of 8).  Rows and columns past the last whole patch are
  dropped, as VALID padding drops them.

  >>> x = jax.random.normal(jax.random.key(0), (2, 35, 32, 3))
  >>> conv = nn.Conv(8, (16, 16), strides=(16, 16), padding="VALID")
  >>> v = PatchEmbed(8, 16).init(jax.random.key(1), x)
  >>> jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), v, conv.init(jax.random.key(1), x))
  {'params': {'bias': True, 'kernel': True}}
  >>> bool(jnp.allclose(PatchEmbed(8, 16).apply(v, x), conv.apply(v, x), atol=1e-5))
  True
  """

  features: int
  patch_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    p, c = self.patch_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    h, w = x.shape[1] // p * p, x.shape[2] // p * p
    y = jax.lax.conv_general_dilated(space_to_depth(x[:, :h, :w], p), kernel.reshape(1, 1, p * p * c, -1),
                                     (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float, dtype):
  """LayerNorm over the last axis in float32, two-pass variance, the result in ``dtype``.

  The values of ``flax.linen.LayerNorm(use_fast_variance=False)`` (two-pass: the
  residual stream of trained ViTs carries large offsets, where E[x^2] - E[x]^2
  loses float32 digits and parity with PyTorch).  The backward pass reuses the
  forward's row mean and 1/std: without them XLA recomputed each row's
  statistics in the backward and wrote ``dy * x_hat`` out in float32 for the
  scale's gradient (deviceless H100 compile of ViT-B/16 at batch 256: a
  [51,200 x 768] float32 tensor per LayerNorm, 3.5 GiB written a step); with
  them that product is formed inside the gradient's column reduction.  The
  forward then writes the statistics out (a row sum fused with the residual add,
  a variance pass): 44 more small kernels, and about 5.7 GiB less traffic a step.
  With a frozen scale (LoRA, frozen blocks) nothing changes: no scale gradient,
  no statistics kept.  Option ``layer_norm_impl="flax"``: flax's LayerNorm,
  differentiated by JAX.

  >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3 + 100
  >>> ref = nn.LayerNorm(use_fast_variance=False)
  >>> v = ref.init(jax.random.key(1), x)
  >>> bool(jnp.array_equal(layer_norm(x, jnp.ones(8), jnp.zeros(8), 1e-6, jnp.float32), ref.apply(v, x)))
  True
  """
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _row_stats(x, eps: float):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return xf, mean, jax.lax.rsqrt(var + eps)


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  xf, mean, rstd = _row_stats(x, eps)
  y = (xf - mean) * (rstd * scale) + bias  # flax's order of operations: the same rounding
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, res, g):
  x, mean, rstd, scale, bias = res
  xf = x.astype(mean.dtype)
  gf = g.astype(mean.dtype)
  x_hat = (xf - mean) * rstd
  rows = tuple(range(x.ndim - 1))
  d_bias = jnp.sum(gf, axis=rows)
  # The scale's gradient from the statistics as they are: XLA may not recompute them in
  # this reduction's producer (a row reduction there kept the column reduction apart, the
  # product written out in float32).  Unused (a frozen scale), it is dropped, barrier too.
  mean_s, rstd_s = jax.lax.optimization_barrier((mean, rstd))
  d_scale = jnp.sum(gf * ((xf - mean_s) * rstd_s), axis=rows)
  gs = gf * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - x_hat * jnp.mean(gs * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with flax's parameters (``scale`` ones, ``bias`` zeros, float32): :func:`layer_norm`."""

  epsilon: float = 1e-6
  dtype: Any = None  # the result's; None: that of the input and parameters, as flax

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, scale, bias)
    return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))


def _layer_norm(eps: float, dtype, name: str, impl: str = "ftjax") -> nn.Module:
  if impl == "flax":
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)
  return LayerNorm(epsilon=eps, dtype=dtype, name=name)


def gelu(x, approximate: bool = False):
  """GELU: exact, ``0.5 x (1 + erf(x / sqrt 2))`` as torch writes it, or the tanh form.

  Not ``jax.nn.gelu``'s exact form, the same function written with ``erfc``: XLA expands
  erfc into a polynomial that reads its argument many times, so on a GPU the argument
  ``-x / sqrt 2`` got a kernel and a tensor of its own (deviceless H100 compile of
  ViT-B/16: one [tokens x mlp_dim] tensor a layer written and read twice more); erf is
  one XLA op and fuses with the bias add before it.

  >>> x = jnp.linspace(-4.0, 4.0, 9)
  >>> bool(jnp.allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6))
  True
  """
  if approximate:
    return nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class MlpBlock(nn.Module):
  """Dense -> exact GELU -> dropout -> Dense -> dropout (vit_jax ``MlpBlock``)."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = None
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_xavier, bias_init=nn.initializers.normal(1e-6))
    width = x.shape[-1]
    x = dense(self.mlp_dim, name="Dense_0")(x)
    # ViT, timm and transformers use the erf GELU (the default, for logit parity); the tanh
    # form differs by about 1e-3 (option gelu_approximate).
    x = gelu(x, self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate, name="dropout_0")(x, deterministic=deterministic)
    x = dense(width, name="Dense_1")(x)
    return nn.Dropout(self.dropout_rate, name="dropout_1")(x, deterministic=deterministic)


def attention_implementation(choice: str, dtype: Any, dropout: bool) -> str:
  """The implementation ``attention`` resolves to for a compute dtype, on the default backend.

  "auto" takes cuDNN flash attention on a GPU with 16-bit compute and no attention
  dropout (which needs the weights materialised), XLA otherwise.

  >>> attention_implementation("auto", jnp.float32, dropout=False)
  'xla'
  """
  if choice != "auto":
    return choice
  sixteen_bit = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if sixteen_bit and not dropout and jax.default_backend() == "gpu" else "xla"


def padded_length(tokens: int, multiple: int) -> int:
  """``tokens`` rounded up to a multiple of ``multiple``.

  >>> padded_length(197, 8), padded_length(200, 8), padded_length(197, 1)
  (200, 200, 197)
  """
  return -(-tokens // multiple) * multiple


def attend(q, k, v, implementation: str = "xla", pad_multiple: int = 1, valid: int | None = None):
  """Softmax attention of (batch, tokens, heads, head_dim) arrays over the first ``valid`` tokens.

  ``valid`` (default: all) says how many leading tokens are real: the others are
  padding, masked out as keys (``key_value_seq_lengths``).  With ``pad_multiple``
  > 1 the token axis is zero-padded up to a multiple of it here, the padding
  masked the same way and sliced off the output: the result is that of the
  unpadded call, whatever the implementation.

  >>> q = jnp.ones((1, 5, 2, 8))
  >>> attend(q, q, q, "xla", pad_multiple=4).shape
  (1, 5, 2, 8)
  """
  b, t = q.shape[:2]
  n = t if valid is None else valid
  padded = padded_length(t, pad_multiple)
  if padded == t and n == t:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  if padded != t:
    widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  # Padding added here is sliced off, so its query rows may be skipped (query lengths).
  # Padding tokens that live on (``valid``) attend like any token, to the real ones only,
  # so that they stay finite: a fully masked row may come out of cuDNN as anything.
  y = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths if valid is None else None,
                                   key_value_seq_lengths=lengths, implementation=implementation)
  return y[:, :t]


class Projection(nn.DenseGeneral):
  """``nn.DenseGeneral`` (the same parameters, initialised the same) whose bias a call may leave out.

  ``add_bias=False`` returns ``x @ kernel`` only; the bias is still a parameter (read it
  with :meth:`bias`).  LoRA's interceptor sees an ordinary DenseGeneral call.

  >>> layer = Projection(features=(2, 3), axis=-1)
  >>> x = jnp.ones((1, 4))
  >>> v = layer.init(jax.random.key(0), x)
  >>> ref = nn.DenseGeneral(features=(2, 3), axis=-1).init(jax.random.key(0), x)
  >>> bool(jax.tree.all(jax.tree.map(jnp.array_equal, v, ref)))
  True
  >>> layer.apply(v, x, add_bias=False).shape, layer.apply(v, method="bias").shape
  ((1, 2, 3), (2, 3))
  """

  @nn.compact
  def __call__(self, inputs, add_bias: bool = True):
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    axis = tuple(a % inputs.ndim for a in axis)
    n_in = len(axis)
    if self.batch_dims:
      raise ValueError("Projection has no batch_dims")

    def flat_init(init, n_rows):  # DenseGeneral initialises the flattened (in, out) matrix
      def fn(rng, shape, dtype):
        flat = (math.prod(shape[:n_rows]), math.prod(shape[n_rows:])) if n_rows else (math.prod(shape),)
        return jnp.reshape(init(rng, flat, dtype), shape)
      return fn

    kernel = self.param("kernel", flat_init(self.kernel_init, n_in),
                        tuple(inputs.shape[a] for a in axis) + features, self.param_dtype)
    bias = self.param("bias", flat_init(self.bias_init, 0), features, self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, ((axis, tuple(range(n_in))), ((), ())),
                            precision=self.precision)
    return y + bias if add_bias else y

  def bias(self):
    return self.get_variable("params", "bias")


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with flax's projection layout, through ``jax.nn.dot_product_attention``."""

  num_heads: int
  attention_dropout_rate: float = 0.0
  dtype: Any = None
  attention: str = "auto"
  attention_pad_multiple: int = 8
  valid_tokens: int | None = None  # the tokens after these are padding (token_padding "encoder")
  fold_bias: bool = True  # option fold_attention_bias

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    proj = functools.partial(Projection, features=(self.num_heads, head_dim), axis=-1,
                             dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_xavier)
    out = Projection(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=_xavier, name="out")
    dropout = not deterministic and self.attention_dropout_rate > 0.0
    value = proj(name="value")
    q = proj(name="query")(x)  # (batch, tokens, heads, head_dim)
    k = proj(name="key")(x, add_bias=not self.fold_bias)
    v = value(x, add_bias=not self.fold_bias or dropout)
    impl = attention_implementation(self.attention, self.dtype, dropout)
    if not dropout and impl == "cudnn" and self.attention == "auto":
      try:  # the shape or dtype checks run while tracing: refused, take the XLA path
        y = attend(q, k, v, "cudnn", self.attention_pad_multiple, self.valid_tokens)
      except (NotImplementedError, RuntimeError, ValueError):
        y = attend(q, k, v, "xla", 1, self.valid_tokens)
    elif not dropout:
      multiple = self.attention_pad_multiple if impl in PADDED_IMPLEMENTATIONS else 1
      y = attend(q, k, v, impl, multiple, self.valid_tokens)
    else:
      # Dropout on the attention weights needs them materialised.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
      if self.valid_tokens is not None:
        keys = jnp.arange(logits.shape[-1]) < self.valid_tokens
        logits = jnp.where(keys, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      weights = nn.Dropout(self.attention_dropout_rate, name="attention_dropout")(
          weights, deterministic=False)
      y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = out(y)
    if self.fold_bias and not dropout:  # the value bias, through the projection (and its adapters)
      bias = value.bias()
      y = y + out(bias.astype(self.dtype or bias.dtype)[None, None], add_bias=False)
    return y


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  dtype: Any = None
  attention: str = "auto"
  attention_pad_multiple: int = 8
  gelu_approximate: bool = False
  valid_tokens: int | None = None
  fold_attention_bias: bool = True
  layer_norm_impl: str = "ftjax"
  layer_scale: float | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    # Stochastic depth drops a whole residual branch per example: the mask
    # broadcasts over tokens and channels (and is rescaled by 1/keep, like timm).
    def droppath(name):
      return nn.Dropout(self.droppath_rate, broadcast_dims=(1, 2), name=name)

    y = _layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0", self.layer_norm_impl)(x)
    y = MultiHeadDotProductAttention(self.num_heads, self.attention_dropout_rate, self.dtype,
                                     self.attention, self.attention_pad_multiple, self.valid_tokens,
                                     self.fold_attention_bias, name="MultiHeadDotProductAttention_1")(
        y, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate, name="dropout")(y, deterministic=deterministic)
    x = x + droppath("droppath_attention")(self._scaled(y, "layer_scale_attention"),
                                            deterministic=deterministic)
    y = _layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_2", self.layer_norm_impl)(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.gelu_approximate,
                 name="MlpBlock_3")(
        y, deterministic=deterministic)
    return x + droppath("droppath_mlp")(self._scaled(y, "layer_scale_mlp"), deterministic=deterministic)

  def _scaled(self, y, name: str):
    """``y`` times the per-channel LayerScale vector ``name`` (option layer_scale), else ``y``."""
    if self.layer_scale is None:
      return y
    gamma = self.param(name, nn.initializers.constant(self.layer_scale), (y.shape[-1],), jnp.float32)
    return y * gamma.astype(y.dtype)


# The blocks of an encoder are identical modules: lifted through nn.jit, one
# trace serves them all (and later loads in the process), which makes init,
# eval_shape (every from_pretrained) and compilation several times faster.
# Parameter paths are unchanged.
_JitEncoder1DBlock = nn.jit(Encoder1DBlock, static_argnames=("deterministic",))


def _tied(tree, ct):
  """``tree`` with 0 * sum(ct) added to its floating leaves: the same values, which now cannot
  be computed before ``ct`` exists (XLA does not fold float x * 0: NaN * 0 is NaN).

  The leaves are the recomputation's inputs: the block's input and its parameters.  Tying
  the parameters too keeps XLA from sharing their bf16 casts between the forward pass and
  the recomputation, which would hold every block's cast weights for the whole step.
  """
  dep = jnp.sum(ct.astype(jnp.float32)) * 0.0
  return jax.tree.map(lambda r: r + dep.astype(r.dtype)
                      if hasattr(r, "dtype") and jnp.issubdtype(r.dtype, jnp.floating) else r, tree)


def _remat_block(block: Encoder1DBlock, x, deterministic: bool):
  """``block(x)`` keeping only ``x`` for the backward pass, which recomputes the rest (option "remat").

  Plain ``nn.remat`` fences the recomputation with an optimisation barrier, which
  XLA:CPU drops before scheduling: the recomputation then ran in the forward pass
  and held its activations to the end (ViT-B/16 at batch 8: 4.03 GB against 3.80
  without remat).  Here the recomputation takes the incoming gradient as an input,
  so no scheduler can move it ahead of the backward pass (2.26 GB).  Known limit:
  with dropout on, ``jax.grad`` of an already-jitted apply fails in flax's custom_vjp
  (a leaked tracer); ``jax.jit(jax.grad(...))``, the train step's form, works.
  """
  run = lambda mdl, x: mdl(x, deterministic)
  forward = lambda mdl, x: nn.vjp(nn.remat(run), mdl, x)  # residuals: x (and the parameters)
  backward = lambda vjp_fn, ct: _tied(vjp_fn, ct)(ct)
  return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(block, x)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's fixed 2-D position embedding, (1, h * w, width) float32.

  Rows are the patches in row-major order; columns are ``[sin(x w), cos(x w), sin(y w),
  cos(y w)]`` with frequencies ``w_j = temperature ** -(j / (width / 4 - 1))``, computed
  in float64 (big_vision computes them in float32: within a few float32 ulps).

  >>> pe = posemb_sincos_2d(2, 3, 8)
  >>> pe.shape, pe[0, 0].tolist()  # position (0, 0): sin 0 = 0, cos 0 = 1
  ((1, 6, 8), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
  >>> round(float(pe[0, 1, 0]), 6) == round(float(np.sin(1.0)), 6)  # x = 1 at the top frequency
  True
  """
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / (quarter - 1))
  y = np.einsum("m,d->md", y.reshape(-1).astype(np.float64), omega)
  x = np.einsum("m,d->md", x.reshape(-1).astype(np.float64), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds a position embedding to the tokens after the first ``skip``.

  ``kind`` "learn": the parameter ``pos_embedding`` (1, tokens - skip, width);
  "sincos2d": :func:`posemb_sincos_2d` over the patch ``grid``.  ``skip`` is the
  number of class tokens the embedding has no row for (big_vision's layout).
  """

  kind: str = "learn"
  skip: int = 0
  grid: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1] - self.skip, x.shape[2])
    if self.kind == "sincos2d":
      pos = jnp.asarray(posemb_sincos_2d(*self.grid, x.shape[2]))
      if pos.shape != shape:
        raise ValueError(f"sincos2d grid {self.grid} does not fit {shape[1]} tokens")
    else:
      pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape, jnp.float32)
    pos = pos.astype(x.dtype)
    if self.skip:  # zero rows for the class token(s): one add, as without them
      pos = jnp.pad(pos, ((0, 0), (self.skip, 0), (0, 0)))
    return x + pos


class MAPHead(nn.Module):
  """big_vision's ``MAPHead``: a learned ``probe`` attends over the tokens, then ``x + MLP(LN(x))``.

  The same parameters and names as big_vision (``probe``,
  ``MultiHeadDotProductAttention_0/{query,key,value,out}``, ``LayerNorm_0``,
  ``MlpBlock_0``) and timm's ``AttentionPoolLatent``; returns (batch, width).
  """

  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Any = None
  gelu_approximate: bool = False
  layer_norm_impl: str = "ftjax"

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    n, _, width = x.shape
    probe = self.param("probe", _xavier, (1, 1, width), jnp.float32)
    y = _ProbeAttention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(
        jnp.broadcast_to(probe.astype(x.dtype), (n, 1, width)), x)
    z = _layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0", self.layer_norm_impl)(y)
    y = y + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.gelu_approximate, name="MlpBlock_0")(
        z, deterministic=deterministic)
    return y[:, 0]


class _ProbeAttention(nn.Module):
  """Attention of queries ``q_in`` over ``kv_in``, in flax's projection layout (one query: XLA)."""

  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, q_in, kv_in):
    width = kv_in.shape[-1]
    proj = functools.partial(Projection, features=(self.num_heads, width // self.num_heads), axis=-1,
                             dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_xavier)
    q, k, v = proj(name="query")(q_in), proj(name="key")(kv_in), proj(name="value")(kv_in)
    y = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return Projection(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=_xavier, name="out")(y)


class Encoder(nn.Module):
  """Position embedding, the blocks ``encoderblock_{i}`` and (optionally) ``encoder_norm``."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  final_norm: bool = True
  remat: bool = False
  dtype: Any = None
  attention: str = "auto"
  attention_pad_multiple: int = 8
  gelu_approximate: bool = False
  token_padding: str = "encoder"
  fold_attention_bias: bool = True
  layer_norm_impl: str = "ftjax"
  posemb: str = "learn"
  posemb_skip: int = 0  # leading (class, register) tokens the position embedding has no row for
  grid: tuple[int, int] | None = None  # the patch grid (h, w), for posemb "sincos2d"
  layer_scale: float | None = None

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    x = AddPositionEmbs(self.posemb, self.posemb_skip, self.grid, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=deterministic)
    tokens = x.shape[1]
    impl = attention_implementation(self.attention, self.dtype,
                                    not deterministic and self.attention_dropout_rate > 0.0)
    padded = tokens
    if self.token_padding == "encoder" and impl in PADDED_IMPLEMENTATIONS:
      padded = padded_length(tokens, self.attention_pad_multiple)
      x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0)))
    valid = tokens if padded != tokens else None
    for i in range(self.num_layers):
      rate = self.droppath_rate * i / max(self.num_layers - 1, 1)
      args = (self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dropout_rate,
              self.attention_dropout_rate, rate, self.dtype, self.attention,
              self.attention_pad_multiple, self.gelu_approximate, valid, self.fold_attention_bias,
              self.layer_norm_impl, self.layer_scale)
      if self.remat:
        x = _remat_block(Encoder1DBlock(*args, name=f"encoderblock_{i}"), x, deterministic)
      else:  # static by name (nn.jit's static_argnames)
        x = _JitEncoder1DBlock(*args, name=f"encoderblock_{i}")(x, deterministic=deterministic)
    x = x[:, :tokens]  # the padding tokens, if any, end here
    if self.final_norm:
      x = _layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm", self.layer_norm_impl)(x)
    return x


class VisionTransformer(nn.Module):
  """ViT classifier: NHWC normalised images in, float32 logits out.

  Build it with :func:`create_model` (variant names, validation); the fields
  are those of :func:`resolve_arch` plus ``num_classes`` and the compute
  ``dtype`` (parameters are always float32).
  """

  num_classes: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  pooling: str = "token"
  class_token: bool = True
  reg_tokens: int = 0
  posemb: str = "learn"
  posemb_class_token: bool = True
  layer_scale: float | None = None
  fc_norm: bool = False
  representation_size: int | None = None
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  remat: bool = False
  attention: str = "auto"
  attention_pad_multiple: int = 8
  gelu_approximate: bool = False
  token_padding: str = "encoder"
  fold_attention_bias: bool = True
  layer_norm_impl: str = "ftjax"
  patch_embed_impl: str = "ftjax"
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    deterministic = not train
    p = self.patch_size
    if self.patch_embed_impl == "flax":
      x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  param_dtype=jnp.float32, name="embedding")(x)
    else:
      x = PatchEmbed(self.hidden_size, p, self.dtype, name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.reg_tokens:  # [class, registers, patches], as timm orders them
      reg = self.param("reg", nn.initializers.normal(1e-6), (1, self.reg_tokens, c), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(reg.astype(x.dtype), (n, self.reg_tokens, c)), x], axis=1)
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
    prefix = int(self.class_token) + self.reg_tokens
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dropout_rate,
                self.attention_dropout_rate, self.droppath_rate, final_norm=not self.fc_norm,
                remat=self.remat, dtype=self.dtype, attention=self.attention,
                attention_pad_multiple=self.attention_pad_multiple,
                gelu_approximate=self.gelu_approximate, token_padding=self.token_padding,
                fold_attention_bias=self.fold_attention_bias, layer_norm_impl=self.layer_norm_impl,
                posemb=self.posemb, posemb_skip=0 if self.posemb_class_token else prefix,
                grid=(h, w), layer_scale=self.layer_scale,
                name="Transformer")(x, deterministic=deterministic)
    if self.pooling == "token":
      x = x[:, 0]
    elif self.pooling == "map":  # over the patch tokens: class and registers left out, as in timm
      x = MAPHead(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                  self.gelu_approximate, self.layer_norm_impl, name="MAPHead_0")(
          x[:, prefix:], deterministic=deterministic)
    elif self.pooling == "token_gap":
      x = jnp.concatenate([x[:, 0], jnp.mean(x[:, prefix:], axis=1)], axis=-1)
    else:  # the mean leaves the class and register tokens out, as timm's avg pooling does
      x = jnp.mean(x[:, prefix:], axis=1)
    if self.fc_norm:
      x = _layer_norm(self.layer_norm_eps, self.dtype, "fc_norm", self.layer_norm_impl)(x)
    if self.representation_size:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_xavier, name="pre_logits")(x)
      x = jnp.tanh(x)
    # A zero head starts fine-tuning from uniform predictions (vit_jax); the
    # logits are float32 whatever the compute dtype, for a stable loss.
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros, name="head")(x)
    return x.astype(jnp.float32)


def create_model(arch: Mapping[str, Any], num_classes: int, dtype: Any = None) -> VisionTransformer:
  """A :class:`VisionTransformer` from an arch dict (see :func:`resolve_arch`).

  >>> create_model({"variant": "test", "pooling": "gap"}, 10).class_token
  False
  """
  return VisionTransformer(num_classes=int(num_classes), dtype=dtype, **resolve_arch(arch))


def check_image_size(arch: Mapping[str, Any], image_size: tuple[int, int]) -> None:
  """Both sides must be positive multiples of the patch size.

  >>> check_image_size({"variant": "B/16"}, (224, 200))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: image size not divisible ...: 224x200; patch 16: try 224x208
  """
  p = resolve_arch(arch)["patch_size"]
  h, w = image_size
  if h <= 0 or w <= 0 or h % p or w % p:
    near = "x".join(str(max(p, -(-s // p) * p)) for s in (h, w))  # round up
    raise ConfigError("image size not divisible by the ViT patch size", where="image_size",
                      value=f"{h}x{w}", hint=f"patch {p}: try {near}")


# --------------------------------------------------------------------------------------------
# Position-embedding resampling, equal to timm's resample_abs_pos_embed.

def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                  np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))


def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of torch's ``interpolate(mode="bicubic", antialias=True)`` along one axis.

  PyTorch's antialiased kernel is PIL's: Keys cubic with a = -0.5 (its
  non-antialiased bicubic uses a = -0.75), stretched by the scale when
  downsampling, cut at the borders and renormalised (``align_corners=False``).

  >>> bicubic_aa_matrix(3, 3)
  array([[1., 0., 0.],
         [0., 1., 0.],
         [0., 0., 1.]])
  >>> bicubic_aa_matrix(4, 2).sum(axis=1)
  array([1., 1.])
  """
  scale = in_size / out_size
  support = 2.0 * max(scale, 1.0)  # the cubic kernel spans 2 input pixels each side
  inv = 1.0 / max(scale, 1.0)
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)  # int() truncates, like the C++ static_cast
    hi = min(int(center + support + 0.5), in_size)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv)
    m[i, lo:hi] = w / w.sum()
  return m


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """Resamples a (h, w, channels) grid to ``new_hw`` like torch's antialiased bicubic.

  >>> g = np.arange(8.0).reshape(2, 2, 2)
  >>> resample_grid(g, (2, 2)).tolist() == g.tolist()
  True
  """
  h, w, _ = grid.shape
  mh, mw = bicubic_aa_matrix(h, new_hw[0]), bicubic_aa_matrix(w, new_hw[1])
  return np.einsum("ih,hwc,jw->ijc", mh, grid.astype(np.float64), mw).astype(grid.dtype)


def resample_posemb(posemb: np.ndarray, new_hw: tuple[int, int], num_prefix_tokens: int,
                    old_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Resamples a (1, prefix + h*w, D) position embedding to a ``new_hw`` patch grid.

  The prefix (class token) rows are kept as they are; the old grid is square
  unless ``old_hw`` says otherwise (as timm assumes).

  >>> pe = np.ones((1, 1 + 4 * 4, 8), np.float32)
  >>> resample_posemb(pe, (2, 3), num_prefix_tokens=1).shape
  (1, 7, 8)
  """
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  if old_hw is None:
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
      raise CheckpointError("position embedding is not a square grid", where="pos_embedding",
                            value=f"{grid.shape[0]} patch positions",
                            hint="pass the checkpoint's grid (old_hw) to resample it")
    old_hw = (side, side)
  grid = resample_grid(grid.reshape(*old_hw, -1), new_hw)
  return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


POSEMB_PATH = "params/Transformer/posembed_input/pos_embedding"


def resizers(arch: Mapping[str, Any], image_size: tuple[int, int],
             old_image_size: tuple[int, int] | None = None) -> dict[str, Callable]:
  """``{regex: fn(array, target_shape)}``: the position embedding follows the image size.

  As timm's loader: the table is resampled when its row count differs from the model's, or
  when the checkpoint's grid (``old_image_size`` / patch, where it accounts for every row)
  differs from the new one at the same count (14 x 14 read at 7 x 28, or a 2 x 3 grid at 3 x 2).

  >>> pe = np.arange(9.0).reshape(1, 9, 1)   # the class row + a 2 x 4 grid ("test": patch 8)
  >>> wide_to_tall = resizers({"variant": "test"}, (32, 16), (16, 32))[re.escape(POSEMB_PATH)]
  >>> wide_to_tall(pe, pe.shape).shape        # the same count, another grid: resampled
  (1, 9, 1)
  >>> resizers({"variant": "test"}, (16, 32), (16, 32))[re.escape(POSEMB_PATH)](pe, pe.shape) is None
  True
  """
  a = resolve_arch(arch)
  if a["posemb"] != "learn":
    return {}  # a fixed table is computed for any grid
  p = a["patch_size"]
  # rows of the table for the class and register tokens, kept as they are
  prefix = (int(a["class_token"]) + a["reg_tokens"]) if a["posemb_class_token"] else 0
  old_hw = None if old_image_size is None else (old_image_size[0] // p, old_image_size[1] // p)
  new_hw = (image_size[0] // p, image_size[1] // p)

  def resize(arr, target_shape):
    arr = np.asarray(arr)
    positions = arr.shape[1] - prefix
    # the checkpoint's stated grid, where it accounts for every row (timm's rule)
    known = old_hw if old_hw and old_hw[0] * old_hw[1] == positions else None
    if tuple(arr.shape) == tuple(target_shape) and known in (None, new_hw):
      return None
    # Only a resampling of the checkpoint's own grid: class token(s) + (old image / patch)^2.
    grid = old_hw[0] * old_hw[1] if old_hw else math.isqrt(max(positions, 0)) ** 2
    if positions <= 0 or positions != grid or arr.shape[2:] != tuple(target_shape[2:]):
      raise CheckpointError("position embedding does not fit the model", where=POSEMB_PATH,
                            value=f"checkpoint {arr.shape} vs model {tuple(target_shape)}",
                            hint=f"not {prefix} class token(s) + the checkpoint's patch grid: another "
                                 "variant or image size, or class_token / pooling to pass?")
    out = resample_posemb(arr, new_hw, prefix, old_hw)
    if out.shape != tuple(target_shape):
      raise CheckpointError("resampled position embedding has the wrong shape", where=POSEMB_PATH,
                            value=f"{out.shape} vs model {tuple(target_shape)}")
    return out

  return {re.escape(POSEMB_PATH): resize}


FAMILY = Family("vit", create_model, resizers, check_image_size)


# --------------------------------------------------------------------------------------------
# Checkpoint converters.  Each maps every key of the file or says why it does not.

@dataclasses.dataclass
class _Mapped:
  variables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _map_keys(tensors: Mapping[str, np.ndarray], rules, source: str) -> _Mapped:
  """Applies ``[(regex, fn(match, array) -> {ftjax path: array} | str)]`` to every key.

  A rule returning a string drops the key with that reason; a key no rule
  matches is a CheckpointError (a file of another architecture).
  """
  compiled = [(re.compile(rx), fn) for rx, fn in rules]
  out = _Mapped()
  for key, arr in tensors.items():
    for rx, fn in compiled:
      m = rx.fullmatch(key)
      if m:
        try:
          got = fn(m, arr)
        except ValueError as e:  # a reshape into heads that cannot be: another architecture's tensor
          raise CheckpointError("tensor does not fit the architecture", where=f"{source}: {key}",
                                value=f"{tuple(arr.shape)} ({e})",
                                hint="a checkpoint for another variant?") from None
        if isinstance(got, str):
          out.dropped.append((key, got))
        else:
          out.variables.update({f"params/{k}": v for k, v in got.items()})
        break
    else:
      raise CheckpointError("key that a ViT checkpoint does not have", where=source, value=key,
                            hint="a checkpoint for another architecture?")
  return out


def _block(i) -> str:
  return f"Transformer/encoderblock_{i}"


_ATTN = "MultiHeadDotProductAttention_1"
_MAP, _ATTN_MAP = "MAPHead_0", "MultiHeadDotProductAttention_0"


def _linear(path: str, heads: int | None = None, split: str = "") -> Callable:
  """PyTorch ``nn.Linear`` weight (out, in) / bias -> flax kernel (in, out) / bias at ``path``.

  ``split="out"`` shapes an input projection's kernel to (in, heads, head_dim);
  ``split="in"`` shapes the output projection's kernel to (heads, head_dim, out).
  """
  def fn(m, arr):
    target = path.format(*m.groups())
    leaf = m.group(m.lastindex) if m.lastindex else None
    if split and arr.shape[0 if split == "out" else -1] % heads:
      raise ValueError(f"{arr.shape[0 if split == 'out' else -1]} features do not split into "
                       f"{heads} heads")
    if leaf == "bias":
      arr = arr.reshape(heads, -1) if split == "out" else arr
      return {f"{target}/bias": arr}
    kernel = arr.T
    if split == "out":
      kernel = kernel.reshape(kernel.shape[0], heads, -1)
    elif split == "in":
      kernel = kernel.reshape(heads, -1, kernel.shape[1])
    return {f"{target}/kernel": kernel}
  return fn


def _fused_linear(paths: Sequence[str], heads: int) -> Callable:
  """A fused input projection, rows stacked as ``paths`` (timm's qkv ``[q; k; v]``, its
  attention pool's ``[k; v]``, torch MultiheadAttention's in_proj) -> :func:`_linear`'s
  per-head kernel and bias at each path (``{0}``... formatted with the match's groups)."""
  def fn(m, arr):
    out = {}
    for path, part in zip(paths, np.split(np.asarray(arr), len(paths))):
      out.update(_linear(path, heads, "out")(m, part))
    return out
  return fn


def _norm(path: str) -> Callable:
  def fn(m, arr):
    leaf = {"weight": "scale", "bias": "bias"}[m.group(m.lastindex)]
    return {f"{path.format(*m.groups())}/{leaf}": arr}
  return fn


def _to(path: str) -> Callable:
  return lambda m, arr: {path.format(*m.groups()): arr}


def _conv_oihw(path: str) -> Callable:
  def fn(m, arr):
    if m.group(m.lastindex) == "bias":
      return {f"{path}/bias": arr}
    return {f"{path}/kernel": arr.transpose(2, 3, 1, 0)}  # OIHW -> HWIO, a view
  return fn


def _grid_size(posemb_len: int, prefix: int, patch: int, where: str) -> tuple[int, int]:
  n = posemb_len - prefix
  side = math.isqrt(max(n, 0))
  if side * side != n:
    raise CheckpointError("position embedding is not a square grid", where=where,
                          value=f"{n} patch positions")
  return (side * patch, side * patch)


def _num_classes(variables: Mapping[str, np.ndarray]) -> int:
  bias = variables.get("params/head/bias")
  return 0 if bias is None else int(bias.shape[-1])


def _variant_of(dims: Mapping[str, int]) -> str | None:
  return next((name for name, v in VARIANTS.items() if all(dims[k] == v[k] for k in _DIMS)), None)


def _arch(dims: Mapping[str, int], **options) -> dict[str, Any]:
  """A compact arch dict: the variant name where the dimensions are a registered variant."""
  variant = _variant_of(dims)
  arch = {"variant": variant} if variant else {k: int(dims[k]) for k in _DIMS}
  arch.update({k: v for k, v in options.items() if v != OPTIONS[k]})
  return arch


# Hugging Face transformers ViTForImageClassification / ViTModel.

_HF_ATTN = {"query": "query", "key": "key", "value": "value",  # saved layout
            "q_proj": "query", "k_proj": "key", "v_proj": "value"}  # transformers >= 5 in-memory names


def _hf_embedding_and_attention_rules(pre: str, layer: str, heads: int) -> list:
  """The rules transformers' ViT and DINOv2 layouts share: position and patch embeddings and
  each layer's attention (``pre``: the model prefix regex, ``layer``: a layer's, index captured)."""
  return [
      (pre + r"embeddings\.position_embeddings", _to("Transformer/posembed_input/pos_embedding")),
      (pre + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", _conv_oihw("embedding")),
      (layer + r"attention\.(?:attention\.)?(query|key|value|[qkv]_proj)\.(weight|bias)",
       lambda m, a: _linear(f"{_block(m.group(1))}/{_ATTN}/{_HF_ATTN[m.group(2)]}", heads, "out")(m, a)),
      (layer + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)",
       _linear(_block("{0}") + f"/{_ATTN}/out", heads, "in")),
  ]


# transformers' hidden_act names: is it the tanh form?
_HF_GELUS = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}

def convert_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
               preprocessor: Mapping[str, Any] | None = None) -> Converted:
  """A transformers ``ViTForImageClassification`` (or ``ViTModel``) checkpoint -> ftjax layout.

  The architecture comes from ``config`` (config.json); mean/std from
  ``preprocessor`` (preprocessor_config.json) when given, else the ViT image
  processor's default 0.5/0.5.  A ``ViTModel`` pooler is dropped (the
  classifier reads the class token) and recorded.
  """
  where = "config.json"
  act = config.get("hidden_act", "gelu")
  if not isinstance(act, str) or act not in _HF_GELUS:  # (a list or dict is unhashable)
    raise CheckpointError("unsupported ViT activation", where=where, value=repr(act),
                          hint=f"one of {list(_HF_GELUS)} (the erf GELU or its tanh form)")
  if not config.get("qkv_bias", True) or config.get("num_channels", 3) != 3:
    raise CheckpointError("unsupported ViT config", where=where,
                          value=f"qkv_bias={config.get('qkv_bias')} "
                                f"num_channels={config.get('num_channels')}")
  number = functools.partial(config_number, config, kind=int, where=where)
  dims = {"hidden_size": number("hidden_size"), "num_layers": number("num_hidden_layers"),
          "num_heads": number("num_attention_heads"), "mlp_dim": number("intermediate_size"),
          "patch_size": number("patch_size")}
  eps = config_number(config, "layer_norm_eps", float, where, 1e-12)
  heads = dims["num_heads"]
  pre = r"(?:vit\.)?"
  layer = pre + r"(?:encoder\.layer|layers)\.(\d+)\."
  rules = [
      (pre + r"embeddings\.cls_token", _to("cls")),
      *_hf_embedding_and_attention_rules(pre, layer, heads),
      (layer + r"layernorm_before\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_0")),
      (layer + r"layernorm_after\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_2")),
      (layer + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)",
       _linear(_block("{0}") + "/MlpBlock_3/Dense_0")),
      (layer + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_1")),
      (pre + r"layernorm\.(weight|bias)", _norm("Transformer/encoder_norm")),
      (pre + r"pooler\.dense\.(weight|bias)",
       lambda m, a: "ViTModel pooler: unused by a classifier, which reads the class token"),
      (r"classifier\.(weight|bias)", _linear("head")),
  ]
  mapped = _map_keys(tensors, rules, "Hugging Face ViT checkpoint")
  num_classes = _num_classes(mapped.variables)
  mean, std = _hf_stats(preprocessor)
  return Converted(family="vit",
                   arch=_arch(dims, layer_norm_eps=eps,
                              gelu_approximate=_HF_GELUS[act]),
                   num_classes=num_classes, image_size=_hf_image_size(config), variables=mapped.variables,
                   mean=mean, std=std, class_names=_hf_class_names(config, num_classes),
                   dropped=mapped.dropped)


def _hf_image_size(config: Mapping[str, Any], where: str = "config.json") -> tuple[int, int]:
  """config.json's ``image_size`` (an int or a pair; 224 when absent) as (height, width)."""
  size = config.get("image_size", 224)
  sides = list(size) if isinstance(size, (list, tuple)) else [size, size]
  if len(sides) != 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
                                and float(s).is_integer() for s in sides):
    raise CheckpointError("config.json image_size is not a positive integer or a pair of them", where=where,
                          value=f"image_size={size!r}")
  return (int(sides[0]), int(sides[1]))


def _hf_class_names(config: Mapping[str, Any], num_classes: int) -> list[str] | None:
  """config.json's id2label, unless it holds transformers' placeholders or another count."""
  labels = config.get("id2label") or {}
  names = [str(labels.get(str(i), labels.get(i, ""))) for i in range(len(labels))]
  if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)) or len(names) != num_classes:
    return None
  return names


def _hf_stats(preprocessor: Mapping[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of a preprocessor_config.json; the ViT and SigLIP processors' 0.5/0.5 without one."""
  prep = preprocessor or {}
  return (tuple(float(v) for v in prep.get("image_mean", INCEPTION_MEAN)),
          tuple(float(v) for v in prep.get("image_std", INCEPTION_STD)))


# transformers Dinov2Model / Dinov2ForImageClassification (dinov2) and their
# dinov2_with_registers forms.

def convert_hf_dinov2(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                      preprocessor: Mapping[str, Any] | None = None) -> Converted:
  """A transformers DINOv2 checkpoint -> ftjax layout (LayerScale; registers for ``dinov2_with_registers``).

  ``Dinov2ForImageClassification`` classifies the class token and the patch mean side by
  side (``pooling="token_gap"``); ``Dinov2Model`` has no classifier (pass ``num_classes``;
  its features are the class token's).  The pre-training ``mask_token`` is dropped and
  recorded.  With registers, transformers adds the class token's position-embedding row
  before it inserts the registers: that row is folded into the class token (the same
  sum, as timm converts these models) and the table keeps the patch rows only.
  A different image size resamples the table when it is loaded, as timm does
  (transformers resamples it at every call, without antialiasing).
  """
  where = "config.json"
  act = config.get("hidden_act", "gelu")
  if config.get("use_swiglu_ffn") or not isinstance(act, str) or act not in _HF_GELUS or not config.get(
      "qkv_bias", True) or config.get("num_channels", 3) != 3:
    raise CheckpointError("unsupported DINOv2 config", where=where,
                          value=f"use_swiglu_ffn={config.get('use_swiglu_ffn')} hidden_act="
                                f"{config.get('hidden_act')!r} qkv_bias={config.get('qkv_bias')}",
                          hint="the MLP DINOv2s (small, base, large) with the GELU; not giant's SwiGLU")
  number = functools.partial(config_number, config, where=where)
  width = number("hidden_size", int)
  # transformers' Dinov2MLP: int(hidden_size * mlp_ratio), mlp_ratio possibly fractional
  dims = {"hidden_size": width, "num_layers": number("num_hidden_layers", int),
          "num_heads": number("num_attention_heads", int),
          "mlp_dim": int(width * number("mlp_ratio", float, default=4)),
          "patch_size": number("patch_size", int, default=14)}
  heads = dims["num_heads"]
  regs = (number("num_register_tokens", int, default=0)
          if config.get("model_type") == "dinov2_with_registers" else 0)
  options: dict[str, Any] = {"layer_scale": number("layerscale_value", float, default=1.0),
                             "layer_norm_eps": number("layer_norm_eps", float, default=1e-6),
                             "gelu_approximate": _HF_GELUS[act]}
  pre = r"(?:dinov2\.|dinov2_with_registers\.)?"
  layer = pre + r"encoder\.layer\.(\d+)\."
  rules = [
      (pre + r"embeddings\.cls_token", _to("cls")),
      (pre + r"embeddings\.register_tokens", _to("reg")),
      (pre + r"embeddings\.mask_token", lambda m, a: "pre-training mask token: unused by a classifier"),
      *_hf_embedding_and_attention_rules(pre, layer, heads),
      (layer + r"norm1\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_0")),
      (layer + r"norm2\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_2")),
      (layer + r"layer_scale1\.lambda1", _to(_block("{0}") + "/layer_scale_attention")),
      (layer + r"layer_scale2\.lambda1", _to(_block("{0}") + "/layer_scale_mlp")),
      (layer + r"mlp\.fc1\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_0")),
      (layer + r"mlp\.fc2\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_1")),
      (pre + r"layernorm\.(weight|bias)", _norm("Transformer/encoder_norm")),
      (r"classifier\.(weight|bias)", _linear("head")),
  ]
  mapped = _map_keys(tensors, rules, "Hugging Face DINOv2 checkpoint")
  v = mapped.variables
  pos = v.get(POSEMB_PATH)
  if pos is None or np.ndim(pos) != 3 or "params/cls" not in v:
    raise CheckpointError("DINOv2 checkpoint lacks its class token or position embedding", where=where,
                          value=None if pos is None else f"position embedding {np.shape(pos)}")
  if regs:
    v["params/cls"], v[POSEMB_PATH] = _fold_class_row(v["params/cls"], pos)
    options.update(reg_tokens=regs, posemb_class_token=False)
  if "params/head/kernel" in v:
    options["pooling"] = "token_gap"
  image_size = _grid_size(v[POSEMB_PATH].shape[1], 0 if regs else 1, int(dims["patch_size"]), where)
  num_classes = _num_classes(v)
  mean, std = _hf_stats(preprocessor) if preprocessor else (IMAGENET_MEAN, IMAGENET_STD)
  return Converted(family="vit", arch=_arch(dims, **options), num_classes=num_classes, image_size=image_size,
                   variables=v, mean=mean, std=std, class_names=_hf_class_names(config, num_classes),
                   dropped=mapped.dropped)


# transformers SiglipVisionModel (model_type siglip_vision_model), SiglipModel and
# SiglipForImageClassification (siglip: the vision tower's config is its vision_config).

_HF_SIGLIP_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "patch_size": 16, "image_size": 224, "num_channels": 3,
                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def convert_hf_siglip(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                      preprocessor: Mapping[str, Any] | None = None) -> Converted:
  """A transformers SigLIP checkpoint's image tower -> ftjax layout.

  ``SiglipModel`` and ``SiglipVisionModel`` pool with their attention head
  (``pooling="map"``, no classifier: pass ``num_classes``); the text tower and the
  contrastive ``logit_scale``/``logit_bias`` are dropped and recorded.
  ``SiglipForImageClassification`` averages every token (``pooling="gap"``) into its
  ``classifier``; its unused attention head is dropped and recorded.  No class token;
  the position embedding is a table over the patches only.
  """
  where = "config.json"
  vision = config.get("vision_config") if config.get("model_type") == "siglip" else config
  if not isinstance(vision, Mapping):
    raise CheckpointError("SigLIP config.json has no vision_config", where=where,
                          value=type(vision).__name__)
  c = {**_HF_SIGLIP_DEFAULTS, **vision}  # transformers may leave defaults out of nested configs
  act = c["hidden_act"]
  if not isinstance(act, str) or act not in _HF_GELUS or c["num_channels"] != 3:  # (a list is unhashable)
    raise CheckpointError("unsupported SigLIP vision config", where=f"{where}: vision_config",
                          value=f"hidden_act={act!r} num_channels={c['num_channels']}",
                          hint=f"hidden_act one of {list(_HF_GELUS)}, 3 channels")
  number = functools.partial(config_number, c, where=f"{where}: vision_config")
  dims = {"hidden_size": number("hidden_size", int), "num_layers": number("num_hidden_layers", int),
          "num_heads": number("num_attention_heads", int), "mlp_dim": number("intermediate_size", int),
          "patch_size": number("patch_size", int)}
  heads = dims["num_heads"]
  classifier = "classifier.weight" in tensors
  pre = r"(?:vision_model\.)?"
  layer = pre + r"encoder\.layers\.(\d+)\."
  head = pre + r"head\."

  if classifier:
    unused = "SiglipForImageClassification averages the tokens: its attention-pooling head is unused"
    head_rules = [(head + r".*", lambda m, a: unused)]
  else:
    head_rules = [
        (head + r"probe", _to(f"{_MAP}/probe")),
        (head + r"attention\.in_proj_(weight|bias)",  # torch MultiheadAttention
         _fused_linear([f"{_MAP}/{_ATTN_MAP}/{n}" for n in ("query", "key", "value")], heads)),
        (head + r"attention\.out_proj\.(weight|bias)", _linear(f"{_MAP}/{_ATTN_MAP}/out", heads, "in")),
        (head + r"layernorm\.(weight|bias)", _norm(f"{_MAP}/LayerNorm_0")),
        (head + r"mlp\.fc([12])\.(weight|bias)",
         lambda m, a: _linear(f"{_MAP}/MlpBlock_0/Dense_{int(m.group(1)) - 1}")(m, a)),
    ]
  rules = [
      (pre + r"embeddings\.patch_embedding\.(weight|bias)", _conv_oihw("embedding")),
      (pre + r"embeddings\.position_embedding\.weight",
       lambda m, a: {POSEMB_PATH.removeprefix("params/"): np.asarray(a)[None]}),
      (layer + r"self_attn\.([qkv])_proj\.(weight|bias)",
       lambda m, a: _linear(f"{_block(m.group(1))}/{_ATTN}/{_HF_ATTN[m.group(2) + '_proj']}",
                            heads, "out")(m, a)),
      (layer + r"self_attn\.out_proj\.(weight|bias)", _linear(_block("{0}") + f"/{_ATTN}/out", heads, "in")),
      (layer + r"layer_norm1\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_0")),
      (layer + r"layer_norm2\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_2")),
      (layer + r"mlp\.fc1\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_0")),
      (layer + r"mlp\.fc2\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_1")),
      (pre + r"post_layernorm\.(weight|bias)", _norm("Transformer/encoder_norm")),
      *head_rules,
      (r"classifier\.(weight|bias)", _linear("head")),
      (r"text_model\..*|logit_scale|logit_bias",
       lambda m, a: "SigLIP text tower and contrastive logit scale: not part of an image classifier"),
  ]
  mapped = _map_keys(tensors, rules, "Hugging Face SigLIP checkpoint")
  has_head = any(k.startswith(f"params/{_MAP}/") for k in mapped.variables)
  num_classes = _num_classes(mapped.variables)
  mean, std = _hf_stats(preprocessor)
  arch = _arch(dims, pooling="map" if has_head else "gap", class_token=False,
               layer_norm_eps=number("layer_norm_eps", float), gelu_approximate=_HF_GELUS[act])
  return Converted(family="vit", arch=arch, num_classes=num_classes,
                   image_size=_hf_image_size(c, f"{where}: vision_config"),
                   variables=mapped.variables, mean=mean, std=std,
                   class_names=_hf_class_names(config, num_classes), dropped=mapped.dropped)


# timm vit_{size}_patch{p}[_gap]_{resolution}[.tag]

_TIMM_SIZES = {  # hidden_size, num_layers, num_heads, mlp_dim (timm's model functions)
    "tiny": (192, 12, 3, 768), "small": (384, 12, 6, 1536), "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096), "huge": (1280, 32, 16, 5120), "giant": (1408, 40, 16, 6144),
    # SigLIP image towers only (int(1152 * 3.7362) = 4304, timm's rounding).
    "so400m": (1152, 27, 16, 4304), "giantopt": (1536, 40, 16, 6144),
}
_TIMM_SIGLIP_ONLY = ("so400m", "giantopt")
# timm's *_gap_* models: no class token, final norm then mean (fc_norm=False),
# and their own head counts.
_TIMM_GAP_HEADS = {"base": 16, "huge": 16, "giant": 16}
# timm's SigLIP towers with the tanh GELU, (size, patch, resolution or None for any): its
# SigLIP 2 ports.  The others have timm's default erf GELU.
_TIMM_SIGLIP_TANH = {("base", 32, 256), ("large", 16, 512), ("so400m", 16, None), ("giantopt", 16, None)}
_TIMM_NAME = re.compile(r"vit_(tiny|small|base|large|huge|giant|so400m|giantopt)_patch(\d+)"
                        r"(_siglip)?(_gap)?_(\d+)")
# DINOv2 (518 px, LayerScale 1e-5; reg4: four registers the position embedding has no rows for).
_TIMM_DINOV2 = re.compile(r"vit_(small|base|large)_patch14_(reg4_)?dinov2")
# Pretrained tags whose preprocessing is not the Google 0.5/0.5 of timm's ViT default.
_TIMM_TAG_STATS = {
    "dino": (IMAGENET_MEAN, IMAGENET_STD), "mae": (IMAGENET_MEAN, IMAGENET_STD),
    "in1k_ijepa": (IMAGENET_MEAN, IMAGENET_STD), "in22k_ijepa": (IMAGENET_MEAN, IMAGENET_STD),
    "bamboo": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def timm_arch(name: str) -> tuple[dict[str, Any], tuple[int, int]]:
  """(arch, image size) of a timm ViT model name (a ``.tag`` suffix is ignored).

  >>> timm_arch("vit_base_patch16_224.augreg2_in21k_ft_in1k")
  ({'variant': 'B/16'}, (224, 224))
  >>> timm_arch("vit_base_patch16_gap_224")[0]["pooling"]
  'gap'
  >>> timm_arch("vit_base_patch16_siglip_256.webli")
  ({'variant': 'B/16', 'pooling': 'map', 'class_token': False}, (256, 256))
  """
  base = name.split(".", 1)[0]
  dino = _TIMM_DINOV2.fullmatch(base)
  if dino:
    dims = dict(zip(_DIMS, (*_TIMM_SIZES[dino.group(1)], 14)))
    regs = {"reg_tokens": 4, "posemb_class_token": False} if dino.group(2) else {}
    return _arch(dims, layer_scale=1e-5, **regs), (518, 518)
  m = _TIMM_NAME.fullmatch(base)
  size, patch, siglip, gap, res = m.groups() if m else (None,) * 5
  if (not m or (gap and not siglip and size not in _TIMM_GAP_HEADS)
      or (size in _TIMM_SIGLIP_ONLY and not siglip)):
    raise ConfigError("unsupported timm ViT", where="timm:" + name, value=repr(base),
                      hint="names like vit_base_patch16_224, vit_tiny_patch16_384, vit_base_patch16_gap_224, "
                           "vit_so400m_patch14_siglip_224, vit_base_patch14_reg4_dinov2")
  dims = dict(zip(_DIMS, (*_TIMM_SIZES[size], int(patch))))
  image_size = (int(res), int(res))
  if siglip:  # no class token; attention pooling (MAPHead) or, _gap, the mean after the final norm
    tanh = bool({(size, int(patch), int(res)), (size, int(patch), None)} & _TIMM_SIGLIP_TANH)
    return _arch(dims, pooling="gap" if gap else "map", class_token=False,
                 gelu_approximate=tanh), image_size
  if gap:
    dims["num_heads"] = _TIMM_GAP_HEADS[size]
    return _arch(dims, pooling="gap", class_token=False), image_size
  return _arch(dims), image_size


def timm_preprocessing(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) timm's pretrained config gives ``name`` (Google's 0.5/0.5 unless its tag says).

  >>> timm_preprocessing("vit_base_patch16_224.augreg_in21k")
  ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
  >>> timm_preprocessing("vit_base_patch16_224.mae")[0]
  (0.485, 0.456, 0.406)
  """
  base, _, tag = name.partition(".")
  if _TIMM_DINOV2.fullmatch(base):  # every DINOv2 tag (lvd142m) uses ImageNet's statistics
    return IMAGENET_MEAN, IMAGENET_STD
  return _TIMM_TAG_STATS.get(tag, (INCEPTION_MEAN, INCEPTION_STD))


def _fold_class_row(cls, pos) -> tuple[np.ndarray, np.ndarray]:
  """(class token + its position row, the table without it): DINOv2 with registers adds the
  class token's row before the registers are inserted, which is the same sum as a class
  token that carries it and a table of patch rows only (timm's no_embed_class layout)."""
  pos = np.asarray(pos)
  return np.asarray(cls) + pos[:, :1], pos[:, 1:]


def _dinov2_original_to_timm(tensors: Mapping[str, np.ndarray], source: str
                             ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
  """facebookresearch/dinov2's own state dict (``dinov2_vits14_reg4_pretrain.pth``) -> timm's keys.

  What timm's ``checkpoint_filter_fn`` does for these files: the pre-training
  ``mask_token`` is dropped (and recorded); ``register_tokens`` become ``reg_token``, and
  since timm's DINOv2 with registers adds no position embedding to the class token and the
  registers, the class token's row of ``pos_embed`` is folded into ``cls_token``.
  """
  out = dict(tensors)
  dropped = [("mask_token", "DINOv2 pre-training mask token: unused by a classifier")]
  del out["mask_token"]
  if "register_tokens" in out:
    pos, cls = out.get("pos_embed"), out.get("cls_token")
    if pos is None or cls is None or np.ndim(pos) != 3 or np.ndim(cls) != 3 or np.shape(pos)[1] < 1:
      raise CheckpointError("DINOv2 checkpoint with registers lacks its class token or position embedding",
                            where=source, value=f"pos_embed {np.shape(pos)} cls_token {np.shape(cls)}")
    out["reg_token"] = out.pop("register_tokens")
    out["cls_token"], out["pos_embed"] = _fold_class_row(cls, pos)
  return out, dropped


def _timm_posemb_grid(arch: dict, full: Mapping[str, Any], rows: int, name_size: tuple[int, int],
                      requested_size: tuple[int, int] | None) -> tuple[int, int]:
  """The image size a timm position table of ``rows`` rows was made at; sets ``arch``'s
  ``posemb_class_token`` to False where the table has no rows for the prefix tokens.

  A model created with ``img_size=...`` or ``no_embed_class=True`` keeps its name, and a
  state dict stores neither, so the rows decide. With the class-token row (timm's default)
  first, then without it (``no_embed_class``): a table that fits the name's grid (timm's
  rule), else a square grid, else the grid of the size the model is built at.

  >>> a = {"variant": "Ti/16"}
  >>> _timm_posemb_grid(a, resolve_arch(a), 197, (224, 224), (112, 448)), a  # 14 x 14, resampled
  ((224, 224), {'variant': 'Ti/16'})
  >>> _timm_posemb_grid(a, resolve_arch(a), 169, (224, 224), (224, 192)), a  # 1 + 14 x 12
  ((224, 192), {'variant': 'Ti/16'})
  >>> _timm_posemb_grid(a, resolve_arch(a), 16, (224, 224), None), a         # 4 x 4, no class row
  ((64, 64), {'variant': 'Ti/16', 'posemb_class_token': False})
  """
  p = full["patch_size"]
  prefix = int(full["class_token"]) + full["reg_tokens"]
  # the name says (DINOv2 with registers), or there is no prefix: one reading only
  readings = [full["posemb_class_token"]] if "posemb_class_token" in arch or not prefix else [True, False]
  for class_row in readings:
    n = rows - (prefix if class_row else 0)
    side = math.isqrt(max(n, 0))
    sizes = [name_size, (side * p,) * 2 if n > 0 and side * side == n else None, requested_size]
    size = next((s for s in sizes if s and (s[0] // p) * (s[1] // p) == n), None)
    if size is not None:
      if not class_row and len(readings) > 1:
        arch["posemb_class_token"] = False  # timm's no_embed_class: no rows for the prefix tokens
      return tuple(size)
  return tuple(name_size)  # no reading fits a grid: resampling refuses the table, naming both shapes


def convert_timm(name: str, tensors: Mapping[str, np.ndarray],
                 requested_size: tuple[int, int] | None = None) -> Converted:
  """A timm ``vit_*`` state dict -> ftjax layout; the architecture comes from ``name``.

  The image size is the name's where the position embedding fits its grid, else that of
  the table's square grid (a model created with ``img_size=...`` keeps the name of its
  224 px variant), else ``requested_size`` (the size the model will be built at) where
  the table fits that: see :func:`_timm_posemb_grid`.  DINOv2's original files
  (facebookresearch/dinov2 ``.pth``: ``mask_token``, ``register_tokens``) are read as
  timm reads them.

  A model trained with a non-default ``global_pool='avg'`` holds ``fc_norm``,
  which the name does not announce: load it with the overrides
  ``pooling="gap", fc_norm=True, class_token=True`` (its class token is still
  there, only not pooled; ``pooling="gap"`` alone turns it off).
  """
  arch, image_size = timm_arch(name)
  full = resolve_arch(arch)
  heads = full["num_heads"]
  source = f"timm:{name}"
  dropped: list[tuple[str, str]] = []
  if "mask_token" in tensors:  # facebookresearch/dinov2's layout, which timm's loader reads too
    tensors, dropped = _dinov2_original_to_timm(tensors, source)

  blk = r"blocks\.(\d+)\."
  rules = [
      (r"cls_token", _to("cls")),
      (r"reg_token", _to("reg")),
      (blk + r"ls1\.gamma", _to(_block("{0}") + "/layer_scale_attention")),
      (blk + r"ls2\.gamma", _to(_block("{0}") + "/layer_scale_mlp")),
      (r"pos_embed", _to("Transformer/posembed_input/pos_embedding")),
      (r"patch_embed\.proj\.(weight|bias)", _conv_oihw("embedding")),
      (blk + r"norm1\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_0")),
      (blk + r"attn\.qkv\.(weight|bias)",
       _fused_linear([f"{_block('{0}')}/{_ATTN}/{n}" for n in ("query", "key", "value")], heads)),
      (blk + r"attn\.proj\.(weight|bias)", _linear(_block("{0}") + f"/{_ATTN}/out", heads, "in")),
      (blk + r"norm2\.(weight|bias)", _norm(_block("{0}") + "/LayerNorm_2")),
      (blk + r"mlp\.fc1\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_0")),
      (blk + r"mlp\.fc2\.(weight|bias)", _linear(_block("{0}") + "/MlpBlock_3/Dense_1")),
      (r"norm\.(weight|bias)", _norm("Transformer/encoder_norm")),
      (r"fc_norm\.(weight|bias)", _norm("fc_norm")),
      (r"head\.(weight|bias)", _linear("head")),
      (r"attn_pool\.latent", _to(f"{_MAP}/probe")),
      (r"attn_pool\.q\.(weight|bias)", _linear(f"{_MAP}/{_ATTN_MAP}/query", heads, "out")),
      (r"attn_pool\.kv\.(weight|bias)",
       _fused_linear([f"{_MAP}/{_ATTN_MAP}/{n}" for n in ("key", "value")], heads)),
      (r"attn_pool\.proj\.(weight|bias)", _linear(f"{_MAP}/{_ATTN_MAP}/out", heads, "in")),
      (r"attn_pool\.norm\.(weight|bias)", _norm(f"{_MAP}/LayerNorm_0")),
      (r"attn_pool\.mlp\.fc([12])\.(weight|bias)",
       lambda m, a: _linear(f"{_MAP}/MlpBlock_0/Dense_{int(m.group(1)) - 1}")(m, a)),
  ]
  mapped = _map_keys(tensors, rules, source)
  pos = mapped.variables.get(POSEMB_PATH)
  if pos is not None and pos.ndim == 3:
    image_size = _timm_posemb_grid(arch, full, pos.shape[1], image_size, requested_size)
  mean, std = timm_preprocessing(name)
  return Converted(family="vit", arch=arch, num_classes=_num_classes(mapped.variables),
                   image_size=image_size, variables=mapped.variables, mean=mean, std=std,
                   dropped=dropped + mapped.dropped)


# Google .npz (vit_jax, and big_vision's unscanned layout).

_BIG_VISION_RENAMES = (  # big_vision's auto-names -> vit_jax's
    (r"pos_embedding", "Transformer/posembed_input/pos_embedding"),
    (r"(Transformer/encoderblock_\d+)/LayerNorm_1/(.*)", r"\1/LayerNorm_2/\2"),
    (r"(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_0/(.*)", r"\1/" + _ATTN + r"/\2"),
    (r"(Transformer/encoderblock_\d+)/MlpBlock_0/(.*)", r"\1/MlpBlock_3/\2"),
)


_NPZ_PREFIXES = ("", "params/", "opt/target/", "params/img/")  # params/img/: a two-tower image tower
# big_vision's default image size, for a file whose fixed position embedding does not say.
SINCOS_IMAGE_SIZE = (224, 224)


def _unscan(path: str, arr: np.ndarray, key: str, source: str) -> dict[str, np.ndarray]:
  """A scanned block's ``Transformer/encoderblock/...`` leaf (layers stacked first) -> one per layer."""
  if arr.ndim == 0:
    raise CheckpointError("scanned block without a layer axis", where=source,
                          value=f"{key} shape {arr.shape}", hint="a damaged file?")
  rest = path[len("Transformer/encoderblock/"):]
  return {f"Transformer/encoderblock_{i}/{rest}": arr[i] for i in range(arr.shape[0])}


def _npz_dims(variables: Mapping[str, np.ndarray], source: str) -> dict[str, int]:
  """The dimensions a Google ViT file's shapes fix (for a variant the table lacks).

  >>> z = lambda *shape: np.zeros(shape, np.float32)
  >>> blk = "params/Transformer/encoderblock_{}/"
  >>> v = {"params/embedding/kernel": z(32, 32, 3, 384),
  ...      **{blk.format(i) + "MultiHeadDotProductAttention_1/query/kernel": z(384, 6, 64) for i in range(2)},
  ...      blk.format(0) + "MlpBlock_3/Dense_0/kernel": z(384, 1536)}
  >>> _npz_dims(v, "npz:S/32")
  {'hidden_size': 384, 'num_layers': 2, 'num_heads': 6, 'mlp_dim': 1536, 'patch_size': 32}
  """
  emb = variables.get("params/embedding/kernel")
  block0 = "params/Transformer/encoderblock_0/"
  query = variables.get(f"{block0}MultiHeadDotProductAttention_1/query/kernel")
  mlp = variables.get(f"{block0}MlpBlock_3/Dense_0/kernel")
  layers = {int(m.group(1)) for k in variables
            if (m := re.match(r"params/Transformer/encoderblock_(\d+)/", k))}
  if (emb is None or np.ndim(emb) != 4 or query is None or np.ndim(query) != 3 or mlp is None
      or np.ndim(mlp) != 2 or layers != set(range(len(layers)))):
    raise CheckpointError("cannot read the ViT's size from the file", where=source,
                          value="no embedding/kernel [p, p, 3, width], encoderblock_0 query kernel "
                                "[width, heads, head_dim] and MLP kernel, or blocks not numbered 0..n-1",
                          hint=f"a damaged file? known variants: {', '.join(VARIANTS)}")
  return {"hidden_size": int(emb.shape[-1]), "num_layers": len(layers), "num_heads": int(query.shape[1]),
          "mlp_dim": int(mlp.shape[-1]), "patch_size": int(emb.shape[0])}


def convert_npz(variant: str, arrays: Mapping[str, np.ndarray]) -> Converted:
  """A Google ViT ``.npz`` (``B/16``, ``ViT-B_16``, ...) -> ftjax layout.

  vit_jax files have ftjax's key names already; big_vision's (``params/``
  prefix, or a top-level ``pos_embedding``) are renamed, their scanned blocks
  (``Transformer/encoderblock/...``, layers stacked) split, and the image tower
  of a two-tower file (SigLIP: ``params/img/``) read, its other keys dropped.
  What the file holds sets the architecture:

  * ``pre_logits`` (ImageNet-21k checkpoints): a tanh pre-logits layer;
  * no class token: big_vision's ``pool_type="gap"``; a ``MAPHead_0``:
    ``pooling="map"``;
  * a position embedding without a class-token row (big_vision adds it before
    the class token): ``posemb_class_token=False``; none at all: big_vision's
    fixed ``posemb="sincos2d"``.

  The image size is the square grid of the position embedding times the patch
  size (224 for a sincos2d file, which any size fits).  ``variant`` names the size
  (``B/16``, ``ViT-B_16``); one that :data:`VARIANTS` lacks (``S/8``, ``g/14``) is
  read from the file's shapes.
  """
  source = f"npz:{variant}"
  named = _VARIANT_NAME.fullmatch(variant)
  try:
    arch: dict[str, Any] = {"variant": canonical_variant(variant)}
  except ConfigError:
    if named is None:
      raise ConfigError("unknown ViT variant", where=source, value=repr(variant),
                        hint="<size>/<patch> as Google's file names have it (B/16, ViT-S_32, g/14); "
                             "a size not in ftjax.models.vit.VARIANTS is read from the file") from None
    arch = {}  # a size the table lacks (S/8, g/14, ...): the file's shapes give it, below
  prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), None)
  if prefix is None:
    raise CheckpointError("not a Google ViT .npz: no embedding/kernel", where=source,
                          value=", ".join(list(arrays)[:4]), hint="a BiT or other checkpoint?")
  big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in arrays or any(
      k.startswith(f"{prefix}Transformer/encoderblock/") for k in arrays)
  variables, dropped = {}, []
  for key, arr in arrays.items():
    if not key.startswith(prefix):
      dropped.append((key, "not the image tower (params/img/) of a two-tower checkpoint"
                      if prefix == "params/img/" else f"outside {prefix}, the model's parameters"))
      continue
    path = key[len(prefix):]
    unscanned = (_unscan(path, np.asarray(arr), key, source) if path.startswith("Transformer/encoderblock/")
                 else {path: arr})
    for path, arr in unscanned.items():
      if big_vision:
        for rx, repl in _BIG_VISION_RENAMES:
          path = re.sub(f"^{rx}$", repl, path)
      variables[f"params/{path}"] = arr
      if path == "Transformer/posembed_input/pos_embedding" and np.ndim(arr) != 3:
        raise CheckpointError("position embedding is not (1, tokens, width)", where=source,
                              value=f"{key} shape {np.shape(arr)}", hint="a damaged file?")
  if not arch:
    arch.update(_npz_dims(variables, source))
    if arch["patch_size"] != int(named.group(2)):
      raise CheckpointError("the file's patch size is not the variant's", where=source,
                            value=f"embedding/kernel {arch['patch_size']} x {arch['patch_size']} vs "
                                  f"{variant}", hint=f"name it {named.group(1)}/{arch['patch_size']}")
  has_cls = "params/cls" in variables
  pos = variables.get(POSEMB_PATH)
  if pos is None:
    arch["posemb"] = "sincos2d"
  elif has_cls:  # vit_jax's table has a row for the class token; big_vision's none
    rows = pos.shape[1]
    if math.isqrt(rows) ** 2 == rows:
      arch["posemb_class_token"] = False
  if any(k.startswith("params/MAPHead_0/") for k in variables):
    arch["pooling"] = "map"
    if has_cls:
      arch["class_token"] = True
  elif not has_cls:  # big_vision's default pool_type 'gap': mean of all tokens
    n = 0 if pos is None else pos.shape[1]
    if pos is not None and math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1:
      raise CheckpointError("npz has no class token 'cls'", where=source,
                            hint="its position embedding has a class token's row: a damaged file?")
    arch["pooling"] = "gap"
  if "params/pre_logits/kernel" in variables:
    arch["representation_size"] = resolve_arch(arch)["hidden_size"]
  full = resolve_arch(arch)
  if pos is None:
    image_size = SINCOS_IMAGE_SIZE
  else:
    image_size = _grid_size(pos.shape[1], int(full["posemb_class_token"]), full["patch_size"], source)
  return Converted(family="vit", arch=arch, num_classes=_num_classes(variables), image_size=image_size,
                   variables=variables, mean=INCEPTION_MEAN, std=INCEPTION_STD, dropped=dropped)


__all__ = ["FAMILY", "MAPHead", "OPTIONS", "POOLINGS", "POSEMBS", "VARIANTS", "VisionTransformer",
           "bicubic_aa_matrix", "canonical_variant", "check_image_size", "convert_hf",
           "convert_hf_dinov2", "convert_hf_siglip", "convert_npz", "convert_timm", "create_model",
           "posemb_sincos_2d", "resample_grid", "resample_posemb", "resizers", "resolve_arch",
           "timm_arch", "timm_preprocessing"]
